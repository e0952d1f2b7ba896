"""The run manifest: what a run directory holds and how to check it was not changed or truncated.

``RUN_DIR/manifest.json`` records the resolved config, the seed, the Python and platform, the versions of
the packages that shape the result, the sha256 of the data file, and the sha256 + size of every file
the run wrote. `verify_run` recomputes the hashes (``mistral-fast verify RUN_DIR``).

What is hashed: every file under the run directory except ``checkpoints/`` (intermediate, pruned by
``save_total_limit``, and gigabytes on a 7B run; the final adapter is what the run produced),
``manifest.json`` itself, and temp files (``*.tmp``). Exports written later add theirs with
`update_manifest`. Writes are atomic (temp file + rename); only rank 0 calls this.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mistral_fast.atomic import atomic_path, is_temp_name
from mistral_fast.errors import MistralFastError

if TYPE_CHECKING:
    from mistral_fast.config import RunConfig

MANIFEST = "manifest.json"
# checkpoints: intermediate state (see the module docstring); wandb: W&B's own run files (train.report_to),
# which W&B keeps writing until its run is finished, after the manifest
EXCLUDED_DIRS = ("checkpoints", "wandb")
PACKAGES = (
    "torch",
    "transformers",
    "trl",
    "peft",
    "bitsandbytes",
    "datasets",
    "accelerate",
    "mistral_common",
    "safetensors",
    "gguf",
    "mistral_fast",
)
_CHUNK = 1 << 20


class ManifestError(MistralFastError):
    """A run directory does not match its manifest, or has none."""


def sha256_file(path: str | os.PathLike[str]) -> str:
    """sha256 of a file, read in 1 MiB chunks (constant memory for multi-GB weights)."""
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages that shape a run (None: not installed); unsloth when imported."""
    names = list(PACKAGES) + (["unsloth", "unsloth_zoo"] if "unsloth" in sys.modules else [])
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            try:
                versions[name] = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                versions[name] = None
    return versions


def _tracked(run_dir: Path, path: Path) -> bool:
    rel = path.relative_to(run_dir)
    return (
        path.is_file()
        and not path.is_symlink()
        and rel.parts[0] not in EXCLUDED_DIRS
        and rel.as_posix() != MANIFEST
        and not is_temp_name(path.name)
    )


def hash_files(run_dir: Path, paths: Iterable[str | os.PathLike[str]] | None = None) -> dict[str, dict[str, Any]]:
    """``{relative posix path: {"sha256", "size"}}`` for `paths` (default: every tracked file of `run_dir`).

    Args:
        run_dir: the run directory; keys are relative to it.
        paths: files or directories (all their files) inside `run_dir`: absolute, relative to the current
            directory, or relative to `run_dir`.

    Raises:
        ManifestError: a path that does not exist or lies outside the run directory.
    """
    root = Path(run_dir).resolve()
    if paths is None:
        chosen = [p for p in root.rglob("*") if p.is_file()]
    else:
        chosen = []
        for given in map(Path, paths):
            path = given if given.is_absolute() or given.exists() else root / given
            path = path.resolve()
            if not path.exists():
                raise ManifestError(f"{given}: no such file to add to the manifest of {run_dir}")
            if not path.is_relative_to(root):
                raise ManifestError(
                    f"{given}: outside the run directory {run_dir}; only its own files go in the manifest"
                )
            chosen += [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    return {
        p.relative_to(root).as_posix(): {"sha256": sha256_file(p), "size": p.stat().st_size}
        for p in sorted(chosen)
        if _tracked(root, p)
    }


def _data_hash(cfg: RunConfig) -> dict[str, Any]:
    path = Path(cfg.data.path)
    if path.is_file():
        return {"path": str(path.resolve()), "sha256": sha256_file(path), "size": path.stat().st_size}
    return {"path": cfg.data.path, "sha256": None, "note": "not a local file (a datasets name)"}


def _write(run_dir: Path, manifest: dict[str, Any]) -> Path:
    final = run_dir / MANIFEST
    with atomic_path(final) as tmp, tmp.open("w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=2, sort_keys=False, default=str)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())  # the manifest vouches for the other files: make it durable first
    return final


def write_manifest(cfg: RunConfig, run_dir: str | os.PathLike[str] | None = None) -> Path:
    """Write ``manifest.json`` for a finished run (rank 0 only): config, versions, seed, data and file hashes.

    Returns:
        The manifest path.
    """
    run_dir = Path(run_dir or cfg.train.output_dir)
    manifest = {
        "format": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seed": cfg.train.seed,
        "config": cfg.to_dict(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
        "data": _data_hash(cfg),
        "excluded": [f"{d}/" for d in EXCLUDED_DIRS],
        "files": hash_files(run_dir),
    }
    return _write(run_dir, manifest)


def read_manifest(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a run directory.

    Raises:
        ManifestError: none there, or it is not valid JSON.
    """
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        raise ManifestError(
            f"{path}: no manifest — is {run_dir} a run directory of a finished run? (runs write it at the end)"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ManifestError(f"{path}: unreadable manifest ({err}) — re-run the run to write a new one") from None


def update_manifest(run_dir: str | os.PathLike[str], paths: Iterable[str | os.PathLike[str]]) -> Path:
    """Add (or refresh) the hashes of files written after the run, e.g. by an export, to its manifest.

    Args:
        run_dir: the run directory (holds ``manifest.json``).
        paths: files or directories inside `run_dir` (absolute, or relative to it).

    Raises:
        ManifestError: no manifest yet, or a path outside the run directory.
    """
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    manifest["files"] = {**manifest.get("files", {}), **hash_files(run_dir, [Path(p) for p in paths])}
    manifest["files"] = dict(sorted(manifest["files"].items()))
    manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return _write(run_dir, manifest)


def verify_run(run_dir: str | os.PathLike[str]) -> dict[str, list[str]]:
    """Recompute the hashes of the files a run's manifest lists.

    Returns:
        ``{"ok", "missing", "changed", "untracked"}``: lists of relative paths; ``"data"``: one line on the
        training data file. Untracked files (present, not in the manifest, e.g. an output notebook saved
        into the run directory afterwards) and a changed data file are reported but are not failures.

    Raises:
        ManifestError: no readable manifest.
    """
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    report: dict[str, list[str]] = {"ok": [], "missing": [], "changed": [], "untracked": []}
    listed = manifest.get("files", {})
    for rel, entry in sorted(listed.items()):
        path = run_dir / rel
        if not path.is_file():
            report["missing"].append(rel)
        elif path.stat().st_size != entry.get("size") or sha256_file(path) != entry.get("sha256"):
            report["changed"].append(rel)
        else:
            report["ok"].append(rel)
    present = {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if _tracked(run_dir, p)}
    report["untracked"] = sorted(present - set(listed))
    report["data"] = [_data_state(manifest.get("data") or {})]
    return report


def _data_state(data: dict[str, Any]) -> str:
    """Whether the training data file still has the hash it had (reported, not a failure: it is an input)."""
    if not data.get("sha256"):
        return "not a local file"
    path = Path(data["path"])
    if not path.is_file():
        return f"{path}: no longer there"
    return f"{path}: unchanged" if sha256_file(path) == data["sha256"] else f"{path}: changed since the run"
