"""The presets, sample data and notebooks ship inside the wheel, and an installed wheel runs with no checkout.

The slow test builds the wheel with the project's own build backend, installs it (not editable) into a
fresh ``--target`` directory and runs the CLI from an empty directory with only that directory on
PYTHONPATH: `config --list`, the demo, then 02_evaluate and 03_export on the demo's run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import nbformat
import pytest
from conftest import require_optional

from mistral_fast.resources import resource_dir

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _repository_url() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["urls"]["Repository"]


def test_in_a_checkout_the_checkouts_own_directories_are_used() -> None:
    for kind in ("configs", "data", "notebooks"):
        assert resource_dir(kind) == ROOT / kind


def test_set_up_cells_install_from_the_one_repository_url_with_unsloth_on_a_gpu() -> None:
    url = _repository_url()
    for path in NOTEBOOKS:
        cells = nbformat.read(path, as_version=4).cells
        params = next(c.source for c in cells if "parameters" in c.metadata.get("tags", []))
        assert f'install_from = "git+{url}"' in params, path.name
        setup = next(c.source for c in cells if "pip" in c.source and c.cell_type == "code")
        assert 'f"mistral-fast{extra} @ {install_from}"' in setup and '"[unsloth]" if shutil.which' in setup
        assert "find_spec(\"mistral_fast\") is None" in setup, "a no-op when already installed"


def test_readme_badges_open_the_repository_of_pyproject() -> None:
    url = _repository_url()
    slug = url.removeprefix("https://github.com/")
    badges = re.findall(r"colab\.research\.google\.com/github/([^/]+/[^/]+)/blob/", (ROOT / "README.md").read_text())
    assert badges and set(badges) == {slug}


def test_set_up_cell_is_a_no_op_headless(tmp_path) -> None:
    """Executed as it is in the notebook, outside Colab/Kaggle: no pip, no Drive mount, no error."""
    cells = nbformat.read(ROOT / "notebooks" / "01_finetune.ipynb", as_version=4).cells
    setup = next(c.source for c in cells if "pip" in c.source and c.cell_type == "code")
    env = {k: v for k, v in os.environ.items() if k != "KAGGLE_KERNEL_RUN_TYPE"}
    # pip would fail loudly on this bogus source: the cell must not get that far
    code = 'install_from = "file:///nonexistent"\nstorage = "drive"\n' + setup + "\nprint('skipped')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "skipped", done.stderr


def test_notebook_copy_writes_the_notebooks_and_never_overwrites(tmp_path) -> None:
    from mistral_fast.cli import main

    assert main(["notebook", "copy", str(tmp_path / "nb")]) == 0
    copied = sorted(p.name for p in (tmp_path / "nb").iterdir())
    assert copied == sorted(p.name for p in (ROOT / "notebooks").iterdir() if p.suffix in (".ipynb", ".yaml"))
    source = (ROOT / "notebooks" / "01_finetune.ipynb").read_bytes()
    assert (tmp_path / "nb" / "01_finetune.ipynb").read_bytes() == source
    (tmp_path / "nb" / "01_finetune.ipynb").write_text("my edits")
    assert main(["notebook", "copy", str(tmp_path / "nb")]) == 2, "an existing notebook is never replaced silently"
    assert (tmp_path / "nb" / "01_finetune.ipynb").read_text() == "my edits"
    assert main(["notebook", "copy", str(tmp_path / "nb"), "--force"]) == 0


# ------------------------------------------------------------------------------- the installed wheel


def _pip(*args: str, cwd: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, cwd=cwd)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel built from this checkout, installed without its dependencies (the venv supplies them)."""
    # Built with the venv's hatchling (scripts/setup.sh installs it, pinned), never in an isolated build env that
    # pip would fill from the package index: the suite needs no network.
    require_optional("hatchling", "hatchling (pip install 'mistral-fast[dev]'; scripts/setup.sh installs it)")
    tmp = tmp_path_factory.mktemp("wheel")
    _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(tmp / "dist"), str(ROOT), cwd=tmp)
    (wheel,) = (tmp / "dist").glob("mistral_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for shipped in ("configs/smoke.yaml", "data/sample_sentiment.jsonl", "notebooks/01_finetune.ipynb"):
        assert f"mistral_fast/_resources/{shipped}" in names, shipped
    assert not any(n.startswith(("configs/", "data/", "notebooks/", "tests/")) for n in names), "nothing top-level"
    _pip("install", "--no-deps", "--no-index", "-q", "--target", str(tmp / "target"), str(wheel), cwd=tmp)
    return tmp / "target"


def _cli(target: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    # only the installed copy on PYTHONPATH, first; the working directory is empty (no configs/ etc. there)
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mistral_fast.cli", *args], capture_output=True, text=True, cwd=cwd, env=env
    )
    assert done.returncode == 0, f"{args}: {done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


@pytest.mark.slow
def test_installed_wheel_runs_config_demo_evaluate_and_export_from_an_empty_directory(installed, tmp_path) -> None:
    work = tmp_path / "empty"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(installed)}
    probe = "import mistral_fast.resources as r; print(r.__file__); print(r.resource_dir('data'))"
    where = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=work, env=env)
    module_file, data_dir = where.stdout.split()
    assert Path(module_file).is_relative_to(installed), "the installed copy, not a checkout, is imported"
    assert Path(data_dir) == installed / "mistral_fast" / "_resources" / "data"

    presets = _cli(installed, work, "config", "--list").stdout.split()
    assert {"smoke", "a100", "colab-t4"} <= set(presets)
    shown = _cli(installed, work, "config", "smoke").stdout
    assert "name_or_path: tiny" in shown

    demo = ["--set", "train.max_steps=12", "--set", "eval.num_samples=4", "--out", "runs/demo"]
    printed = _cli(installed, work, "demo", *demo).stdout
    assert "held-out exact match over 4 prompts" in printed
    run = work / "runs" / "demo"
    config = json.loads((run / "results.json").read_text())["config"]
    assert Path(config["data"]["path"]).is_relative_to(installed), "the sample data came from the wheel"

    _cli(installed, work, "notebook", "run", "02_evaluate", "-p", "smoke", "true", "-p", "run_dir", "runs/demo",
         "-p", "num_samples", "2", "-p", "max_new_tokens", "4", "--out", "runs/nb")  # fmt: skip
    _cli(installed, work, "notebook", "run", "03_export", "-p", "smoke", "true", "-p", "run_dir", "runs/demo",
         "-p", "export_gguf", "[q8_0]", "-p", "export_merged", "false", "--out", "runs/nb")  # fmt: skip
    results = json.loads((run / "results.json").read_text())
    assert {"config", "run", "evaluation", "export"} <= set(results)
    assert (work / results["export"]["gguf"]["q8_0"]).is_file()

    _cli(installed, work, "notebook", "copy", "my-notebooks")  # the installed notebooks, out for editing
    shipped = installed / "mistral_fast" / "_resources" / "notebooks" / "03_export.ipynb"
    assert (work / "my-notebooks" / "03_export.ipynb").read_bytes() == shipped.read_bytes()
    assert sorted(p.name for p in work.iterdir()) == ["my-notebooks", "runs"], "nothing else in the directory"
