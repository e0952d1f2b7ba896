"""The notebooks follow the house rules (DESIGN.md, Notebooks) and execute headless through papermill.

Structure checks are instant; execution runs real papermill kernels on the tiny model (slow).
"""

from __future__ import annotations

import ast
import json
import os
import re
from pathlib import Path

import nbformat
import pytest
from conftest import require_optional

from mistral_fast.runner import NOTEBOOKS_DIR, read_parameters, run_notebook

NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
FAST = {"train.max_steps": 4, "train.eval_steps": 2, "train.save_steps": 2, "data.max_examples": 32}
FAST |= {"eval.num_samples": 2, "eval.max_new_tokens": 8}
FAKE_TOKEN = "hf_" + "Zq7" * 12  # a made-up token: it must never reach an output notebook


def test_the_notebooks_exist() -> None:
    assert [p.stem for p in NOTEBOOKS] == ["01_finetune", "02_evaluate", "03_export", "04_preference", "06_tools"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_structure(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    first = nb.cells[0]
    assert first.cell_type == "markdown" and first.source.startswith("# "), "starts with a markdown title"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged parameters"
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        assert cell.outputs == [] and cell.execution_count is None, "committed without outputs"
        tree = ast.parse(cell.source)
        defs = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.ClassDef | ast.Lambda)]
        assert not defs, "no def/class/lambda in notebooks: logic lives in the package"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_parameters_are_commented_literals_with_a_smoke_switch(path: Path) -> None:
    params = read_parameters(path)  # refuses non-literals and missing `# help` comments
    assert params["smoke"].default is False, "defaults are those of a real run"
    assert all(p.help for p in params.values())
    source = next(
        c.source for c in nbformat.read(path, as_version=4).cells if "parameters" in c.metadata.get("tags", [])
    )
    for node in ast.parse(source).body:  # literals only: no names, calls or arithmetic on other parameters
        assert isinstance(node, ast.Assign)
        assert not any(isinstance(n, ast.Name | ast.Call | ast.BinOp) for n in ast.walk(node.value))


def test_finetune_defaults_are_a_real_run() -> None:
    params = read_parameters(NOTEBOOKS_DIR / "01_finetune.ipynb")
    assert params["model_name_or_path"].default == "mistralai/Mistral-7B-v0.3"


def test_every_finetune_parameter_maps_to_config_or_is_known() -> None:
    from mistral_fast.notebook import config_key

    params = read_parameters(NOTEBOOKS_DIR / "01_finetune.ipynb")
    extra = {"smoke", "preset", "overrides", "install_from", "storage", "gpu"}
    assert all(config_key(name) or name in extra for name in params)


# ----------------------------------------------------------------------------------- execution


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """01_finetune on the tiny model, with a (fake) HF token in the environment of the kernel."""
    tmp = tmp_path_factory.mktemp("nb")
    old = os.environ.get("HF_TOKEN")
    os.environ["HF_TOKEN"] = FAKE_TOKEN
    try:
        params = {"smoke": True, "train_output_dir": "run", "lora_rank": 4, "overrides": FAST}
        done = run_notebook("01_finetune", params, output=tmp / "01.ipynb", cwd=tmp, timeout=300)
    finally:
        os.environ.pop("HF_TOKEN") if old is None else os.environ.__setitem__("HF_TOKEN", old)
    return tmp, done


@pytest.mark.slow
def test_finetune_notebook_runs_and_returns_results(finetuned) -> None:
    tmp, done = finetuned
    results = done.results
    assert results["config"]["lora"]["rank"] == 4 and results["config"]["model"]["name_or_path"] == "tiny"
    assert results["run"]["train"]["steps"] == 4
    assert results["run"]["evaluation"]["perplexity"] > 1
    assert (tmp / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp / "run" / "eval.json").is_file()
    nb = nbformat.read(done.output_notebook, as_version=4)
    assert any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), "the output notebook has outputs"


@pytest.mark.slow
def test_hf_token_from_the_environment_never_reaches_the_output_notebook(finetuned) -> None:
    _, done = finetuned
    assert FAKE_TOKEN not in Path(done.output_notebook).read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def evaluated(finetuned):
    tmp, _ = finetuned
    params = {"smoke": True, "run_dir": "run", "num_samples": 2, "max_new_tokens": 6}
    return run_notebook("02_evaluate", params, output=tmp / "02.ipynb", cwd=tmp, timeout=300)


@pytest.fixture(scope="module")
def exported(finetuned):
    tmp, _ = finetuned
    params = {"smoke": True, "run_dir": "run", "export_gguf": ["q8_0"], "export_merged": True}
    return run_notebook("03_export", params, output=tmp / "03.ipynb", cwd=tmp, timeout=300)


@pytest.mark.slow
def test_evaluate_notebook_runs_on_the_finetuned_run(finetuned, evaluated) -> None:
    tmp, _ = finetuned
    done = evaluated
    assert set(done.results) >= {"config", "run", "evaluation"}, "sections of both notebooks are kept"
    evaluation = done.results["evaluation"]
    assert len(evaluation["samples"]) == 2 and evaluation["base"] is not None
    assert json.loads((tmp / "run" / "eval.json").read_text())["loss"] == evaluation["loss"]


@pytest.mark.slow
def test_export_notebook_runs_on_the_finetuned_run(finetuned, exported) -> None:
    """Skips only when the optional `gguf` package (the q8_0 GGUF writer) is missing, and says so; a broken
    mistral_fast.export fails here instead of reading as a skip."""
    require_optional("gguf")
    from mistral_fast.export import export_run  # noqa: F401  (fails loudly if the export package is broken)

    tmp, _ = finetuned
    done = exported
    exported = done.results["export"]
    assert set(exported["gguf"]) == {"q8_0"} and (tmp / exported["gguf"]["q8_0"]).is_file()  # relative to cwd
    assert (tmp / exported["modelfiles"]["q8_0"]).read_text().startswith("FROM ./")
    assert {"config", "run", "export"} <= set(done.results)


# Messages that buried cell outputs before (issue 13): library import noise, absl's rouge log, tqdm's
# missing-ipywidgets warning. Any other stderr line that is not a progress bar fails the test too.
NOISE = re.compile(
    r"Failed to load|_pytree|register_constant|Using default tokenizer|IProgress|TqdmWarning|"
    r"Warning|WARNING|deprecated|mtime may not be reliable|^[WE]\d{4} ",
    re.MULTILINE,
)
PROGRESS = re.compile(r"^\s*[^|\n]*\d+%\|[^|\n]*\|.*$")


@pytest.mark.slow
def test_smoke_output_notebooks_carry_no_library_warnings(finetuned, evaluated, exported) -> None:
    """Every stderr line of the three output notebooks is a progress bar; tqdm bars end in their last frame."""
    require_optional("gguf")
    for done in (finetuned[1], evaluated, exported):
        nb = nbformat.read(done.output_notebook, as_version=4)
        for index, cell in enumerate(nb.cells):
            for output in cell.get("outputs", []):
                where = f"{Path(done.output_notebook).name} cell {index}"
                if output.output_type == "stream":
                    assert not NOISE.search(output.text), f"{where}: {output.text[:400]}"
                    if output.name == "stderr":
                        lines = [ln for ln in re.split(r"[\r\n]+", output.text) if ln.strip()]
                        assert all(PROGRESS.match(ln) for ln in lines), f"{where}: {output.text[:400]}"
                elif "application/vnd.jupyter.widget-view+json" in output.get("data", {}):
                    text = output.data["text/plain"]
                    assert "100%|██████████|" in text, f"{where}: a bar frozen at its first frame: {text}"
