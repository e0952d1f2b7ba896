"""Test set-up: offline, one thread per process, tiny models built locally (nothing is downloaded)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Set before transformers / huggingface_hub are imported by any test module.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def torch_threads(request: pytest.FixtureRequest) -> Iterator[int]:
    """Run a test with torch on 1 and on 2 threads (CI sets OMP_NUM_THREADS=1, which would hide the
    threaded paths, e.g. the export kernels' one-range-per-thread loop)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    try:
        yield request.param
    finally:
        torch.set_num_threads(before)


def _need(reason: str, *, module_level: bool = False) -> None:
    """Fail under CI (everything is installed and the package index is reachable there), skip locally."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: this must work in CI)")
    pytest.skip(reason, allow_module_level=module_level)


def require_module(name: str, install: str) -> Any:
    """Import an optional dependency for a test module; missing: skip naming it (fail under ``CI=true``)."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as err:
        _need(f"{name} is not installed ({err}): {install}", module_level=True)


@pytest.fixture(scope="session")
def llama_cpp_source() -> Path:
    """llama.cpp's own converters (``convert_hf_to_gguf.py``, ``convert_lora_to_gguf.py``, ``conversion/``,
    ``gguf-py/``) at the commit the installed llama-cpp-python was built from.

    They ship in llama-cpp-python's *source* package: ``pip download --no-binary :all:`` of the installed
    version, unpacked once into ``$MISTRAL_FAST_CACHE`` (default ``~/.cache/mistral_fast``)/llama-cpp-src.
    Never committed. Locally a missing package or index skips with the reason; under ``CI=true`` it fails.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        wanted = version("llama-cpp-python")
    except PackageNotFoundError:
        _need("llama-cpp-python is not installed: pip install 'mistral-fast[gguf]'")
    cache = Path(os.environ.get("MISTRAL_FAST_CACHE") or Path.home() / ".cache" / "mistral_fast") / "llama-cpp-src"
    root = cache / f"llama_cpp_python-{wanted}" / "vendor" / "llama.cpp"
    if (root / ".complete").is_file():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        argv = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        argv += ["--disable-pip-version-check", "-q", f"llama-cpp-python=={wanted}", "-d", tmp]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False)
        sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if proc.returncode or not sdists:
            _need(f"could not download the llama-cpp-python {wanted} source package: {proc.stderr.strip()[-500:]}")
        _unpack_converters(sdists[0], Path(tmp) / "src")
        unpacked = Path(tmp) / "src" / f"llama_cpp_python-{wanted}"
        (unpacked / "vendor" / "llama.cpp" / ".complete").touch()
        final = cache / f"llama_cpp_python-{wanted}"
        shutil.rmtree(final, ignore_errors=True)  # a partial copy from an interrupted run (no .complete)
        unpacked.rename(final)
    return root


def _unpack_converters(sdist: Path, dest: Path) -> None:
    """Only the Python converters and their gguf-py, not llama.cpp's C++ tree (76 MB packed)."""
    wanted = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/")
    with tarfile.open(sdist) as tar:
        members = []
        for member in tar.getmembers():
            parts = member.name.split("/", 3)  # llama_cpp_python-X/vendor/llama.cpp/<rest>
            if len(parts) == 4 and parts[1:3] == ["vendor", "llama.cpp"] and parts[3].startswith(wanted):
                members.append(member)
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.11.4: no odd paths
        tar.extractall(dest, members=members, **safe)


@pytest.fixture(scope="session")
def go_executable() -> str:
    """Go's toolchain (Debian: ``apt-get install -y golang-go``) for the Ollama template renderer."""
    go = shutil.which("go")
    if go is None:
        _need("Go is not installed (Debian/Ubuntu: apt-get install -y golang-go): needed to render Ollama templates")
    return go
