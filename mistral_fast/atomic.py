"""Atomic writes: a file appears at its final path whole, or not at all.

Every artefact the package writes (configs, metrics summaries, manifests, notebooks, plots, GGUF files)
goes through `atomic_path`, so a killed run or a full disk never leaves a truncated file where the next
tool would open it. Torch-free: the config stage uses it.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("mistral_fast")


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path beside ``final`` that is renamed onto it only when the block succeeds.

    The temporary file is hidden and named after its writer (`temp_sibling`), so concurrent writers
    never share one; on an exception it is removed and ``final`` is left as it was. What a killed
    writer left behind is removed first (`remove_stale_temps`).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(final)
    tmp = temp_sibling(final)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def temp_sibling(final: Path, kind: str = "tmp") -> Path:
    """The hidden name beside ``final`` that this process writes (or parks an old copy) under.

    ``.NAME.tmp-HOST-PID``: the host and process id let `remove_stale_temps` tell a killed writer's
    leftovers from a live writer's file.
    """
    return final.with_name(f".{final.name}.{kind}-{socket.gethostname()}-{os.getpid()}")


def remove_stale_temps(final: Path) -> list[Path]:
    """Remove the temporaries that killed writers of ``final`` left beside it; returns what was removed.

    A SIGKILL (or the OOM killer, or a Colab runtime reset) runs no cleanup, and a killed 7B GGUF
    export leaves 7.7 GB hidden beside its output, on disks that are small. A leftover is removed when
    it names this host and a process that no longer exists; a live process's, or another host's (a
    shared drive), is left alone.
    """
    removed = []
    host = socket.gethostname()
    for kind in ("tmp", "old"):
        prefix = f".{final.name}.{kind}-{host}-"
        for path in final.parent.glob(f"{glob.escape(prefix)}*"):
            pid = path.name.removeprefix(prefix)
            if not pid.isdigit() or _alive(int(pid)):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            log.info("removed %s, left by a killed writer (process %s)", path, pid)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 text to ``path`` through `atomic_path`; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def is_temp_name(name: str) -> bool:
    """True for the name of an atomic write's temporary file (ours, or a plain ``*.tmp``)."""
    return name.endswith(".tmp") or (name.startswith(".") and (".tmp-" in name or ".old-" in name))
