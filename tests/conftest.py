"""Test set-up: offline, one thread per process, tiny models built locally (nothing is downloaded)."""

from __future__ import annotations

import os
from collections.abc import Iterator

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


# Optional dependencies: locally a missing one skips its tests, naming what to install; in CI (CI=true, where
# they are installed) a missing llama-cpp-python or unsloth fails instead, so a broken CI image cannot turn
# those tests into silent skips.
OPTIONAL_PACKAGES = {"llama_cpp": "llama-cpp-python", "unsloth": "unsloth", "gguf": "gguf"}
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
