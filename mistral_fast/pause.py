"""A deterministic pause point for fault-injection tests (kill a process at a named stage, not after a sleep).

Set ``MISTRAL_FAST_TEST_PAUSE_AT=<stage>`` and ``MISTRAL_FAST_TEST_PAUSE_MARKER=<file>`` in a process's
environment: when that process reaches `pause_point` with the same stage name it writes the marker file
(its pid), and waits while the file exists. A test waits for the marker, then kills the process (or
deletes the marker to let it go on). Unset, a pause point costs one dictionary lookup.

Stages named in the package: ``log:<step>`` (training: just after step ``<step>``'s log row reached
``metrics.jsonl``) and ``save:<step>`` (training: checkpoint ``<step>`` written by the Trainer, before its
COMPLETE marker). A notebook cell may call `pause_point` with a stage of its own.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

PAUSE_AT = "MISTRAL_FAST_TEST_PAUSE_AT"
PAUSE_MARKER = "MISTRAL_FAST_TEST_PAUSE_MARKER"


def pause_point(stage: str) -> None:
    """Pause here if the environment names `stage` (tests only); otherwise return at once.

    Args:
        stage: this point's name, e.g. ``"save:4"``.

    Raises:
        RuntimeError: the stage is requested but ``MISTRAL_FAST_TEST_PAUSE_MARKER`` is not set (a test
            set-up error: it would wait with nothing to tell the test it is waiting).
    """
    if os.environ.get(PAUSE_AT) != stage:
        return
    marker = os.environ.get(PAUSE_MARKER)
    if not marker:
        raise RuntimeError(f"{PAUSE_AT}={stage} needs {PAUSE_MARKER}=<file> to say where to signal the pause")
    path = Path(marker)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(str(os.getpid()), encoding="utf-8")
    tmp.replace(path)  # the marker appears whole: the test may read the pid as soon as it sees the file
    while path.exists():
        time.sleep(0.05)
