"""Test set-up: offline, one thread per process, tiny models built locally (nothing is downloaded)."""

from __future__ import annotations

import os
import shutil
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


# The fast lane (`bash scripts/test.sh --quick`, i.e. `pytest --quick`): a representative subset for the edit-test
# loop, <= 5 minutes on 2 cores. It deselects (never skips) `slow`/`unsloth` tests and the end-to-end files below,
# whose every test runs a notebook kernel, llama.cpp's converter or several processes; CI runs everything.
QUICK_EXCLUDED_FILES: dict[str, str] = {
    "test_export_llama_cpp.py": "llama.cpp's converter on every test",
    "test_export_ollama.py": "Go renders each template in its own process, llama.cpp tokenises",
    "test_export_lora_gguf.py": "llama.cpp's LoRA converter and llama.cpp runs",
}
QUICK_EXCLUDED_TESTS: dict[str, str] = {  # file::test (any parametrisation) -> why
    "test_faults.py::test_bad_input_is_one_actionable_line": "60 cases, each a CLI process",
    "test_faults.py::test_cases_also_fail_cleanly_as_separate_processes": "a CLI process per case",
    "test_security.py::test_token_printed_by_a_cell_reaches_neither_terminal_nor_disk": "a notebook kernel",
    "test_security.py::test_token_is_on_no_intermediate_save_of_a_killed_notebook_run": "a notebook kernel, killed",
    "test_security.py::test_model_and_data_names_never_become_write_paths": "CLI processes",
    # the slowest of the rest (measured with --quick --durations): whole tiny-Nemo models and llama.cpp runs
    "test_tekken.py::test_load_a_model_directory_with_tekken_json": "a tiny Nemo directory built and loaded",
    "test_tekken.py::test_a_tokenizer_json_with_the_wrong_regex_is_named": "a tiny Nemo directory built and loaded",
    "test_chunked_loss.py::test_on_the_qlora_tiny_nemo_equal_to_the_models_own_loss": "a 4-bit tiny Nemo",
    "test_export_gguf.py::test_transformers_loads_our_gguf": "transformers' GGUF loader dequantises every type",
    "test_export_gguf.py::test_legacy_quants_are_what_llama_cpps_own_quantiser_writes": "llama.cpp's quantiser",
    "test_export_gguf.py::test_perplexity_of_f16_gguf_matches_merged_model": "llama.cpp runs the GGUF",
    "test_export_gguf.py::test_k_quant_through_llama_cpp": "llama.cpp's quantiser",
    # the tiny Mistral3 trained, merged and exported (46 s, 2026-12-05); its loading test stays in the lane
    "test_mistral3.py::test_pipeline_trains_the_language_model_and_exports_vision": "train, merge, export end to end",
    "test_mistral3.py::test_adapter_loads_with_peft_and_the_merge_is_peft_s": "the trained run",
    "test_mistral3.py::test_merge_writes_the_vision_tower_s_original_bytes": "the trained run",
    "test_mistral3.py::test_adapter_gguf_is_refused_with_what_to_use": "the trained run",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--quick", action="store_true", help="the fast lane: no slow, end-to-end or multi-process test")


def quick_selected(item: pytest.Item) -> bool:
    """Whether the fast lane keeps a test: not marked slow/unsloth, not in an end-to-end file."""
    test = f"{item.path.name}::{item.name.split('[')[0]}"
    return not (
        item.get_closest_marker("slow")
        or item.get_closest_marker("unsloth")
        or item.path.name in QUICK_EXCLUDED_FILES
        or test in QUICK_EXCLUDED_TESTS
    )


# The slowest files first (measured with --durations, 2026-12-04): `scripts/test.sh` runs the suite on two
# pytest-xdist workers, one file per worker at a time (`--dist loadfile`, so module fixtures are built once), in
# collection order. A 6-minute file collected last would leave one worker busy alone at the end; started first,
# the short files fill the other worker around it (longest-first scheduling).
SLOWEST_FILES = (
    "test_tool_eval.py",  # the tools-smoke preset through notebook 06 (about 12 min on one thread)
    "test_memory.py",
    "test_mixtral.py",
    "test_faults.py",
    "test_export_llama_cpp.py",
    "test_tool_calls.py",
    "test_tekken_gguf.py",
    "test_mistral3.py",
    "test_security.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order
    if not config.getoption("--quick"):
        return
    dropped = [item for item in items if not quick_selected(item)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if quick_selected(item)]


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


# One rule for every skip (issue 21). A test that needs something optional — unsloth, llama-cpp-python, gguf,
# Go, llama.cpp's converter source, a CPU feature — asks one of the helpers below. Locally a missing thing skips,
# naming it and what to install; under CI=true (where everything is installed) it fails, so a broken CI image
# cannot turn tests into silent skips. The only skips CI accepts are those in ALLOWED_CI_SKIPS, each with why;
# the run's summary lists every skip. tests/test_skips.py reads every test module and refuses any other skip form.
OPTIONAL_PACKAGES = {"llama_cpp": "llama-cpp-python", "unsloth": "unsloth", "gguf": "gguf"}
# the trackers and Ray: extras `tracking` and `ray`, which CI installs
OPTIONAL_PACKAGES |= {"mlflow": "mlflow-skinny", "wandb": "wandb", "trackio": "trackio", "ray": "ray"}
CI_REQUIRED = frozenset(OPTIONAL_PACKAGES)  # kept for callers; under CI=true every missing dependency fails

# key -> why CI may skip it; a test names the key in `require_platform(..., ci_allowed=KEY)`.
ALLOWED_CI_SKIPS: dict[str, str] = {
    "avx512bf16": "the bitsandbytes repack trap happens only on a CPU with AVX512-BF16, which CI's runners may "
    "lack (test_modeling.py proves the repair on any CPU by forcing the repack)",
    "cuda": "CPU-only behaviour: it does not apply on a CUDA machine, and CI runs on CPUs",
}
ALLOWED_TAG = "[allowed in CI: "


def in_ci() -> bool:
    """Whether this is a CI run (GitHub Actions and most CI services set CI=true)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _need(reason: str, *, module_level: bool = False, ci_allowed: str | None = None) -> None:
    """The one skip of the suite: skip locally; under CI=true fail, unless `ci_allowed` names an allowed skip.

    Args:
        reason: what is missing and what to install (shown in the skip or the failure).
        module_level: called at a test module's top level (the whole file depends on it).
        ci_allowed: a key of `ALLOWED_CI_SKIPS`: the skip stands under CI=true too, tagged with why.
    """
    if ci_allowed is not None:
        if ci_allowed not in ALLOWED_CI_SKIPS:
            raise KeyError(f"ci_allowed={ci_allowed!r} is not in tests/conftest.py ALLOWED_CI_SKIPS: add it with why")
        reason = f"{reason} {ALLOWED_TAG}{ALLOWED_CI_SKIPS[ci_allowed]}]"
    elif in_ci():
        pytest.fail(f"CI=true but {reason} (this must work in CI: install it)", False)
    pytest.skip(reason, allow_module_level=module_level)


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
    _need(f"optional dependency {package} (import {module}) is not installed", module_level=module_level)


def require_module(name: str, install: str) -> Any:
    """Import an optional dependency for a test module; missing: skip naming it (fail under ``CI=true``)."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as err:
        _need(f"{name} is not installed ({err}): {install}", module_level=True)


def require_platform(ok: bool, reason: str, *, ci_allowed: str | None = None) -> None:
    """Skip the calling test when the machine lacks what it checks (a CPU feature, Linux's /proc); under
    CI=true fail instead, unless `ci_allowed` names an entry of `ALLOWED_CI_SKIPS`."""
    if not ok:
        _need(reason, ci_allowed=ci_allowed)


def _reason(report: pytest.TestReport) -> str:
    """A skip report's reason, without pytest's ``Skipped: `` prefix."""
    reason = str(report.longrepr[2]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
    return reason.removeprefix("Skipped: ")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[pytest.TestReport]:
    """Under CI=true any skip that is not an allowed one fails: also ``pytest.importorskip``, a ``skipif``
    mark or a bare ``pytest.skip`` that slipped past tests/test_skips.py (or came from a plugin)."""
    report = yield
    if report.skipped and in_ci() and not hasattr(report, "wasxfail") and ALLOWED_TAG not in _reason(report):
        reason = _reason(report)
        missing = next((OPTIONAL_PACKAGES[m] for m in OPTIONAL_PACKAGES if f"could not import '{m}'" in reason), None)
        what = f"{missing} is missing" if missing else "a test skipped outside conftest's helpers"
        report.outcome = "failed"
        report.longrepr = f"CI=true but {what} ({reason}): under CI only ALLOWED_CI_SKIPS may skip (tests/conftest.py)"
    return report


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Name each skip and why (a CI run then reports 0 skipped, or each allowed skip and why it is allowed)."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if not hasattr(r, "wasxfail")]
    if skipped:
        terminalreporter.section(f"{len(skipped)} skipped, each and why")
        for report in skipped:
            terminalreporter.write_line(f"{report.nodeid or report.fspath}: {_reason(report)}")


REPO = Path(__file__).resolve().parent.parent
CONVERTER_CACHE = REPO / ".cache" / "llama-cpp-src"  # filled by scripts/fetch_converters.py (run by setup.sh)


@pytest.fixture(scope="session")
def llama_cpp_source() -> Path:
    """llama.cpp's own converters (``convert_hf_to_gguf.py``, ``convert_lora_to_gguf.py``, ``conversion/``,
    ``gguf-py/``) at the commit the installed llama-cpp-python was built from.

    Read from ``.cache/llama-cpp-src`` in the checkout, where ``scripts/fetch_converters.py`` (run by
    ``scripts/setup.sh``) unpacked them once: the tests never download anything. Missing: skip locally naming
    the command, fail under ``CI=true``.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        wanted = version("llama-cpp-python")
    except PackageNotFoundError:
        _need("llama-cpp-python is not installed: pip install 'mistral-fast[gguf]'")
    root = CONVERTER_CACHE / f"llama_cpp_python-{wanted}" / "vendor" / "llama.cpp"
    if not (root / ".complete").is_file():
        _need(f"llama.cpp's converter source for llama-cpp-python {wanted} is not in {root}: run "
              "`.venv/bin/python scripts/fetch_converters.py` (scripts/setup.sh does)")  # fmt: skip
    return root


@pytest.fixture(scope="session")
def go_executable() -> str:
    """Go's toolchain (Debian: ``apt-get install -y golang-go``) for the Ollama template renderer."""
    go = shutil.which("go")
    if go is None:
        _need("Go is not installed (Debian/Ubuntu: apt-get install -y golang-go): needed to render Ollama templates")
    return go


@pytest.fixture(scope="session")
def shared_adapter_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """One run directory as training leaves it (4-bit tiny base + LoRA with random non-zero B, adapter saved)
    and its loaded model, built once per session for the export tests that only read it (test_export_merge,
    test_export_gguf, test_export_lora_gguf each built the same one). Tests that edit a run copy it first."""
    from test_export_merge import make_adapter_run

    run_dir = tmp_path_factory.mktemp("shared-adapter-run") / "run"
    return run_dir, make_adapter_run(run_dir)


def free_port() -> int:
    """A TCP port the OS says is free now (bind to port 0), for a rendezvous (MASTER_PORT): a port derived from
    the pid can collide with another test session's on the same machine."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
