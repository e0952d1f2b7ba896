"""Fetch llama.cpp's own converters once, for the tests that compare our GGUF files with theirs.

``convert_hf_to_gguf.py``, ``convert_lora_to_gguf.py``, ``conversion/`` and ``gguf-py/`` at the commit the
installed llama-cpp-python was built from ship only in llama-cpp-python's *source* package. This script
downloads that sdist (``pip download --no-binary :all:`` of the installed version) and unpacks only those
files into ``.cache/llama-cpp-src/llama_cpp_python-<version>/vendor/llama.cpp`` at the repository root
(git-ignored, kept across sessions), so the test suite itself never needs the network. Idempotent: a
``.complete`` marker skips the download when the right version is already there.

Run by ``scripts/setup.sh``; by hand: ``.venv/bin/python scripts/fetch_converters.py``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "llama-cpp-src"
WANTED = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/")


def converter_root(llama_cpp_version: str, cache: Path = CACHE) -> Path:
    """Where the converters of one llama-cpp-python version live (tests/conftest.py reads the same path)."""
    return cache / f"llama_cpp_python-{llama_cpp_version}" / "vendor" / "llama.cpp"


def unpack_converters(sdist: Path, dest: Path) -> None:
    """Only the Python converters and their gguf-py, not llama.cpp's C++ tree (76 MB packed)."""
    with tarfile.open(sdist) as tar:
        members = []
        for member in tar.getmembers():
            parts = member.name.split("/", 3)  # llama_cpp_python-X/vendor/llama.cpp/<rest>
            if len(parts) == 4 and parts[1:3] == ["vendor", "llama.cpp"] and parts[3].startswith(WANTED):
                members.append(member)
        if not members:
            raise SystemExit(f"fetch_converters: {sdist.name} holds no vendor/llama.cpp converters")
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.11.4: no odd paths
        tar.extractall(dest, members=members, **safe)


def fetch(llama_cpp_version: str, cache: Path = CACHE) -> Path:
    """Download and unpack the converters of `llama_cpp_version` unless already there; return their root."""
    root = converter_root(llama_cpp_version, cache)
    if (root / ".complete").is_file():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        argv = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        argv += ["--disable-pip-version-check", "-q", f"llama-cpp-python=={llama_cpp_version}", "-d", tmp]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False)
        sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if proc.returncode or not sdists:
            raise SystemExit(
                f"fetch_converters: could not download the llama-cpp-python {llama_cpp_version} source package "
                f"(needs the package index once): {proc.stderr.strip()[-800:]}"
            )
        unpack_converters(sdists[0], Path(tmp) / "src")
        unpacked = Path(tmp) / "src" / f"llama_cpp_python-{llama_cpp_version}"
        (unpacked / "vendor" / "llama.cpp" / ".complete").touch()
        final = cache / f"llama_cpp_python-{llama_cpp_version}"
        shutil.rmtree(final, ignore_errors=True)  # a partial copy from an interrupted run (no .complete)
        unpacked.rename(final)
    return root


def main() -> int:
    """Fetch the converters of the installed llama-cpp-python; print where they are."""
    try:
        installed = version("llama-cpp-python")
    except PackageNotFoundError:
        print("fetch_converters: llama-cpp-python is not installed (pip install 'mistral-fast[gguf]')", file=sys.stderr)
        return 1
    print(fetch(installed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
