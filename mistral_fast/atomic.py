"""Atomic writes: a file appears at its final path whole, or not at all.

Every artefact the package writes (configs, metrics summaries, manifests, notebooks, plots, GGUF files)
goes through `atomic_path`, so a killed run or a full disk never leaves a truncated file where the next
tool would open it. Torch-free: the config stage uses it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path beside ``final`` that is renamed onto it only when the block succeeds.

    The temporary file is hidden and named after the process (``.NAME.tmp-PID``) so concurrent writers
    never share one; on an exception it is removed and ``final`` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 text to ``path`` through `atomic_path`; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def is_temp_name(name: str) -> bool:
    """True for the name of an atomic write's temporary file (ours, or a plain ``*.tmp``)."""
    return name.endswith(".tmp") or (name.startswith(".") and ".tmp-" in name)
