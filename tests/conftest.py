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
# Prepared data is cached per test session (and its subprocesses and kernels), never in the user's ~/.cache.
if "MISTRAL_FAST_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["MISTRAL_FAST_CACHE"] = tempfile.mkdtemp(prefix="mistral-fast-cache-")
    atexit.register(shutil.rmtree, os.environ["MISTRAL_FAST_CACHE"], ignore_errors=True)


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


# Optional dependencies: locally a missing one skips its tests, naming what to install; in CI (CI=true, where
# they are installed) a missing llama-cpp-python or unsloth fails instead, so a broken CI image cannot turn
# those tests into silent skips.
OPTIONAL_PACKAGES = {"llama_cpp": "llama-cpp-python", "unsloth": "unsloth", "gguf": "gguf"}
# the trackers and Ray: extras `tracking` and `ray`, which CI installs
OPTIONAL_PACKAGES |= {"mlflow": "mlflow-skinny", "wandb": "wandb", "trackio": "trackio", "ray": "ray"}
CI_REQUIRED = frozenset(OPTIONAL_PACKAGES)  # gguf comes with llama-cpp-python in the [gguf] extra CI installs


def in_ci() -> bool:
    """Whether this is a CI run (GitHub Actions and most CI services set CI=true)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def require_optional(module: str, package: str | None = None, *, module_level: bool = False) -> None:
    """Skip the calling test (or module) when optional `module` is not installed; fail instead in CI.

    Only a *missing* module skips (``importlib.util.find_spec`` is None): one that is installed but
    broken fails where the test imports it. The module is not imported here (importing unsloth patches
    transformers in place; its tests import it in a subprocess).

    Args:
        module: the import name, e.g. ``"llama_cpp"``.
        package: the name to install it by (default from OPTIONAL_PACKAGES, else `module`).
        module_level: called at module level (a whole test file depends on it).
    """
    import importlib.util

    if importlib.util.find_spec(module) is not None:
        return
    package = package or OPTIONAL_PACKAGES.get(module, module)
    if in_ci() and module in CI_REQUIRED:
        pytest.fail(f"CI=true but optional dependency {package} (import {module}) is missing: install it", False)
    pytest.skip(f"optional dependency {package} (import {module}) is not installed", allow_module_level=module_level)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[pytest.TestReport]:
    """In CI, a test skipped by ``pytest.importorskip`` of a CI-required module fails instead.

    Covers the tests that call ``pytest.importorskip("llama_cpp")`` directly rather than `require_optional`.
    """
    report = yield
    if report.skipped and in_ci() and call.excinfo is not None and isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[2])
        missing = next((m for m in CI_REQUIRED if f"could not import '{m}'" in reason), None)
        if missing is not None:
            report.outcome = "failed"
            report.longrepr = f"CI=true but {OPTIONAL_PACKAGES[missing]} is missing ({reason}): install it"
    return report


def _need(reason: str, *, module_level: bool = False) -> None:
    """Fail under CI (everything is installed and the package index is reachable there), skip locally."""
    if in_ci():
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


def write_minimal_gguf(path: Path, chat_template: str | None = None) -> Path:
    """A real GGUF file holding only metadata (no tensors): enough for what reads a GGUF's keys (Modelfiles)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
