"""Skips are for a missing optional dependency only, named; in CI (CI=true) a missing llama-cpp-python or
unsloth fails instead of skipping (tests/conftest.py: `require_optional` and the importorskip hook)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import conftest
import pytest
from conftest import require_optional

TESTS = Path(__file__).parent


def test_a_missing_optional_dependency_skips_naming_it(monkeypatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setitem(conftest.OPTIONAL_PACKAGES, "no_such_module_xyz", "no-such-package")
    with pytest.raises(pytest.skip.Exception, match=r"no-such-package \(import no_such_module_xyz\) is not installed"):
        require_optional("no_such_module_xyz")
    require_optional("yaml")  # installed: no skip


def test_in_ci_a_missing_required_dependency_fails(monkeypatch) -> None:
    monkeypatch.setenv("CI", "true")
    monkeypatch.setitem(conftest.OPTIONAL_PACKAGES, "no_such_module_xyz", "no-such-package")
    monkeypatch.setattr(conftest, "CI_REQUIRED", conftest.CI_REQUIRED | {"no_such_module_xyz"})
    with pytest.raises(pytest.fail.Exception, match=r"CI=true but .*no-such-package .* is missing"):
        require_optional("no_such_module_xyz")
    with pytest.raises(pytest.skip.Exception):  # an optional module CI does not promise still skips
        require_optional("another_missing_module_xyz")


def test_ci_requires_llama_cpp_and_unsloth() -> None:
    assert {"llama_cpp", "unsloth"} <= conftest.CI_REQUIRED


@pytest.mark.parametrize("ci", ["", "true"])
def test_importorskip_of_llama_cpp_fails_in_ci(ci, tmp_path) -> None:
    """A test that calls pytest.importorskip("llama_cpp") directly (the GGUF tests) fails in CI when it
    cannot be imported; run in a child pytest with a `llama_cpp` that cannot be imported on its path."""
    (tmp_path / "shadow").mkdir()
    (tmp_path / "shadow" / "llama_cpp.py").write_text("raise ModuleNotFoundError('not installed here')\n")
    (tmp_path / "test_inner.py").write_text(
        "import pytest\n\ndef test_needs_llama():\n    pytest.importorskip('llama_cpp')\n"
    )
    env = {**os.environ, "CI": ci, "PYTHONPATH": os.pathsep.join([str(tmp_path / "shadow"), str(TESTS)])}
    env["PYTHONPATH"] += os.pathsep + os.environ.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-q", "--rootdir", str(tmp_path),
         "-c", os.devnull, str(tmp_path / "test_inner.py")],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    if ci:
        assert proc.returncode == 1 and "1 failed" in proc.stdout, proc.stdout[-3000:]
        assert "CI=true but llama-cpp-python is missing" in proc.stdout
    else:
        assert proc.returncode == 0 and "1 skipped" in proc.stdout, proc.stdout[-3000:]


def test_the_export_notebook_test_has_no_catch_all_skip() -> None:
    """It used to skip on *any* exception importing mistral_fast.export (a broken module read as a skip)."""
    import test_notebooks

    test = test_notebooks.test_export_notebook_runs_on_the_finetuned_run
    assert not [m for m in getattr(test, "pytestmark", []) if m.name in ("skip", "skipif")]
    assert not hasattr(test_notebooks, "_export_available")
