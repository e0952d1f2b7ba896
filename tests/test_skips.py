"""One rule for skips (tests/conftest.py): a test that needs something optional asks a conftest helper
(`require_optional`, `require_module`, `require_platform`, the `llama_cpp_source` / `go_executable` fixtures),
which skips naming it locally and fails under CI=true, unless the skip is one of `ALLOWED_CI_SKIPS` (named,
with why). Every other skip form is refused here, by reading the test modules, and fails under CI=true anyway
(conftest's report hook)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import conftest
import pytest
from conftest import require_optional

TESTS = Path(__file__).parent
SKIP_NAMES = {"skip", "skipif", "importorskip", "SkipTest", "skipTest"}  # pytest's and unittest's


def test_a_missing_optional_dependency_skips_naming_it(monkeypatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setitem(conftest.OPTIONAL_PACKAGES, "no_such_module_xyz", "no-such-package")
    with pytest.raises(pytest.skip.Exception, match=r"no-such-package \(import no_such_module_xyz\) is not installed"):
        require_optional("no_such_module_xyz")
    require_optional("yaml")  # installed: no skip


def test_in_ci_any_missing_dependency_fails(monkeypatch) -> None:
    monkeypatch.setenv("CI", "true")
    monkeypatch.setitem(conftest.OPTIONAL_PACKAGES, "no_such_module_xyz", "no-such-package")
    with pytest.raises(pytest.fail.Exception, match=r"CI=true but .*no-such-package .* is not installed"):
        require_optional("no_such_module_xyz")
    with pytest.raises(pytest.fail.Exception, match=r"CI=true but .*another_missing_module_xyz"):
        require_optional("another_missing_module_xyz")
    with pytest.raises(KeyError, match="ALLOWED_CI_SKIPS"):  # an allowed skip must be listed, with why
        conftest.require_platform(False, "no such feature", ci_allowed="not-a-listed-key")


INNER = '''
import importlib.util
import pytest
from conftest import require_optional, require_platform

@pytest.mark.skipif(importlib.util.find_spec("no_such_module_xyz") is None, reason="not installed")
def test_skipif_on_find_spec():
    pass

def test_bare_skip_in_except():
    try:
        import no_such_module_xyz  # noqa: F401
    except ImportError:
        pytest.skip("not installed")

def test_importorskip():
    pytest.importorskip("llama_cpp")

def test_helper():
    require_optional("no_such_module_xyz")

def test_allowed():
    require_platform(False, "needs a CPU with AVX512-BF16", ci_allowed="avx512bf16")
'''


@pytest.mark.parametrize("ci", ["", "true"])
def test_every_skip_form_fails_in_ci_but_the_allowed_ones(ci, tmp_path) -> None:
    """A child pytest with each skip form found in the suite before (a `skipif` on `find_spec`, a bare
    `pytest.skip` in an `except`, `importorskip`) next to the helper and an allowed skip: locally all five skip;
    under CI=true only the allowed one does, and the summary names it and why."""
    (tmp_path / "shadow").mkdir()
    (tmp_path / "shadow" / "llama_cpp.py").write_text("raise ModuleNotFoundError('not installed here')\n")
    (tmp_path / "test_inner.py").write_text(INNER)
    env = {**os.environ, "CI": ci, "PYTHONPATH": os.pathsep.join([str(tmp_path / "shadow"), str(TESTS)])}
    env["PYTHONPATH"] += os.pathsep + os.environ.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-q", "-rN", "--rootdir",
         str(tmp_path), "-c", os.devnull, str(tmp_path / "test_inner.py")],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    out = proc.stdout
    if ci:
        # a `skipif` mark skips in set-up: its failure is reported as an error
        assert proc.returncode == 1 and "3 failed, 1 skipped, 1 error" in out, out[-3000:]
        assert "CI=true but llama-cpp-python is missing" in out
        assert out.count("a test skipped outside conftest's helpers") == 2, out[-3000:]
        assert "1 skipped, each and why" in out and "test_allowed: needs a CPU with AVX512-BF16 [allowed in CI:" in out
    else:
        assert proc.returncode == 0 and "5 skipped" in out, out[-3000:]
        assert "5 skipped, each and why" in out and "test_skipif_on_find_spec: not installed" in out


def _skip_forms(path: Path) -> list[str]:
    """``line: code`` of every skip form in a module: an attribute (``pytest.skip``, ``pytest.mark.skipif``) or
    an imported name (``from unittest import SkipTest``) in `SKIP_NAMES`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        name = node.attr if isinstance(node, ast.Attribute) else node.name if isinstance(node, ast.alias) else None
        if name in SKIP_NAMES:
            found.append((getattr(node, "lineno", 0), ast.unparse(node)))
    return [f"{line}: {code}" for line, code in sorted(found)]


def test_no_test_module_skips_outside_the_helpers() -> None:
    """Every test module (tests/**/*.py but conftest itself): no `pytest.skip`, `skipif`, `importorskip`,
    `unittest.SkipTest`; a missing dependency or platform goes through conftest's helpers."""
    modules = [p for p in sorted(TESTS.rglob("*.py")) if p.name != "conftest.py" and p != Path(__file__)]
    assert len(modules) > 40
    offenders = [f"{path.relative_to(TESTS.parent)}:{form}" for path in modules for form in _skip_forms(path)]
    assert not offenders, "skip through tests/conftest.py's helpers instead:\n" + "\n".join(offenders)


def test_the_scan_finds_each_form(tmp_path) -> None:
    path = tmp_path / "test_x.py"
    path.write_text(INNER + "\nfrom unittest import SkipTest\n")
    assert [f.split(": ", 1)[1] for f in _skip_forms(path)] == [
        "pytest.mark.skipif", "pytest.skip", "pytest.importorskip", "SkipTest",
    ]  # fmt: skip


def test_the_export_notebook_test_has_no_catch_all_skip() -> None:
    """It used to skip on *any* exception importing mistral_fast.export (a broken module read as a skip)."""
    import test_notebooks

    test = test_notebooks.test_export_notebook_runs_on_the_finetuned_run
    assert not [m for m in getattr(test, "pytestmark", []) if m.name in ("skip", "skipif")]
    assert not hasattr(test_notebooks, "_export_available")


def _timing_hazards(source: str) -> list[str]:
    """``line: code`` of an elapsed-time bound (``perf_counter() - start < 5``) or a fixed rendezvous port
    (``29500 + pid``) in a module's source: both fail on 2 busy cores or beside another session, not on a bug."""
    found = []
    for node in ast.walk(ast.parse(source)):
        left = node.left if isinstance(node, ast.Compare) else None
        clock = ("perf_counter", "monotonic", "time.time")
        if isinstance(left, ast.BinOp) and isinstance(left.op, ast.Sub) and any(c in ast.unparse(left) for c in clock):
            found.append((node.lineno, ast.unparse(node)))
        if isinstance(node, ast.Constant) and node.value in (29500, "29500"):
            found.append((node.lineno, "MASTER_PORT 29500 (take one from conftest.free_port())"))
    return [f"{line}: {code}" for line, code in sorted(found)]


def test_no_elapsed_time_bound_and_no_fixed_port() -> None:
    """Issue 21: tests kill at deterministic pause points, bound nothing by wall-clock time, and take
    rendezvous ports from the OS (`conftest.free_port`)."""
    code = "import time, os\ns = time.perf_counter()\nassert time.perf_counter() - s < 5\np = 29500 + os.getpid()\n"
    assert len(_timing_hazards(code)) == 2  # the scan finds both forms
    modules = [p for p in sorted(TESTS.rglob("*.py")) if p != Path(__file__)]
    offenders = [
        f"{path.relative_to(TESTS.parent)}:{form}" for path in modules for form in _timing_hazards(path.read_text())
    ]
    assert not offenders, "\n".join(offenders)


# ------------------------------------------------------------------------------------------ the fast lane


def test_quick_deselects_slow_unsloth_and_end_to_end_tests(tmp_path) -> None:
    """`pytest --quick` (what `scripts/test.sh --quick` runs) deselects, never skips: 0 skipped under CI=true."""
    (tmp_path / "test_lane.py").write_text(
        "import pytest\n\ndef test_fast():\n    pass\n\n@pytest.mark.slow\ndef test_slow():\n    pass\n\n"
        "@pytest.mark.unsloth\ndef test_unsloth():\n    pass\n"
    )
    env = {**os.environ, "CI": "true", "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    argv = [sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-q", "-c", os.devnull]
    argv += ["--rootdir", str(tmp_path), str(tmp_path / "test_lane.py")]
    quick = subprocess.run([*argv, "--quick"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert quick.returncode == 0 and "1 passed, 2 deselected" in quick.stdout, quick.stdout[-2000:]
    everything = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert everything.returncode == 0 and "3 passed" in everything.stdout, everything.stdout[-2000:]


def _quick_modules() -> list[Path]:
    """Test modules the fast lane runs at least one test of (read from the source: a test function without a
    ``slow``/``unsloth`` mark, in a module without such a ``pytestmark`` and not in QUICK_EXCLUDED_FILES)."""
    marks = ("slow", "unsloth")
    found = []
    for path in sorted(TESTS.glob("test_*.py")):
        if path.name in conftest.QUICK_EXCLUDED_FILES:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        module_marked = any(
            isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in n.targets)
            and any(f"mark.{m}" in ast.unparse(n.value) for m in marks)
            for n in tree.body
        )  # fmt: skip
        tests = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]
        quick = [t for t in tests if not any(f"mark.{m}" in ast.unparse(d) for d in t.decorator_list for m in marks)]
        if quick and not module_marked:
            found.append(path)
    return found


def test_the_fast_lane_touches_every_module_of_the_package() -> None:
    """Every mistral_fast module is imported (directly, or through the package's own imports) by a test module
    the fast lane runs, so an edit anywhere meets at least one quick test."""
    import test_architecture as arch

    graph = arch._graph()
    reached: set[str] = set()
    todo = [m for path in _quick_modules() for m in _package_imports(path)]
    while todo:
        module = todo.pop()
        module = module if module in graph else arch._top(module)
        if module in graph and module not in reached:
            reached.add(module)
            todo.extend(graph[module])
    unreached = sorted(set(graph) - reached - {"__main__"})
    assert not unreached, f"no quick test imports {unreached}: add a fast test of theirs (or drop a `slow` mark)"


def _package_imports(path: Path) -> set[str]:
    """mistral_fast modules a test file imports (``import mistral_fast as mf`` counts as ``__init__``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mistral_fast"):
            base = node.module.removeprefix("mistral_fast").lstrip(".")
            found |= {f"{base}.{a.name}".lstrip(".") for a in node.names} | ({base} if base else {"__init__"})
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "mistral_fast":
                    found.add("__init__")
                elif alias.name.startswith("mistral_fast."):
                    found.add(alias.name.removeprefix("mistral_fast."))
    return found
