"""04_preference executes headless through papermill on the tiny model (DPO on the sample preference set),
and a papermill sweep over beta runs it once per value."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
import yaml
from test_runner import assert_runs_used

from mistral_fast.runner import NOTEBOOKS_DIR, read_parameters, run_notebook

pytestmark = pytest.mark.slow

FAST = {"train.max_steps": 4, "train.eval_steps": 2, "train.save_steps": 2, "data.max_examples": 24}


def test_preference_parameters_map_to_config_fields() -> None:
    from mistral_fast.notebook import config_key

    params = read_parameters(NOTEBOOKS_DIR / "04_preference.ipynb")
    assert params["train_method"].default == "dpo" and params["train_beta"].default == 0.1
    extra = {"smoke", "preset", "overrides", "gpu", "storage", "install_from"}
    assert all(config_key(name) for name in params if name not in extra)


def test_preference_notebook_runs_dpo_on_the_tiny_model(tmp_path: Path) -> None:
    params = {"smoke": True, "train_learning_rate": 0.003, "overrides": FAST}
    done = run_notebook("04_preference", params, output=tmp_path / "04.ipynb", cwd=tmp_path, timeout=600)
    run = done.results["run"]
    assert done.results["config"]["train"]["method"] == "dpo"
    assert run["train"]["steps"] == 4 and run["train"]["backend"] == "hf"
    assert set(run["evaluation"]) >= {"base", "tuned", "start", "split"}
    run_dir = Path(done.results["config"]["train"]["output_dir"])
    run_dir = run_dir if run_dir.is_absolute() else tmp_path / run_dir
    assert run_dir == tmp_path / "runs" / "preference" and (run_dir / "eval.json").is_file()
    text = "\n".join(
        str(o.get("text", ""))
        for c in nbformat.read(done.output_notebook, as_version=4).cells
        for o in c.get("outputs", [])
    )
    assert "| tuned |" in text and "⟦" in text  # the table and the pair preview were printed


def test_sweep_over_beta(tmp_path: Path) -> None:
    from mistral_fast.runner import run_sweep

    spec = {
        "notebook": "04_preference",
        "parameters": {"smoke": True, "train_learning_rate": 0.003, "overrides": {**FAST, "train.max_steps": 2}},
        "grid": {"train_beta": [0.05, 0.5]},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    rows, files = run_sweep(path, out=str(tmp_path / "out"))
    assert [r.get("train_beta") for r in rows] == [0.05, 0.5] and all(r["status"] == "done" for r in rows)
    # the beta each run trained with, from its own run_config.yaml (the row only echoes the spec)
    assert_runs_used(tmp_path / "out", rows, [{"train.beta": 0.05}, {"train.beta": 0.5}])
    assert all(0 <= r["preference_accuracy"] <= 1 for r in rows)
    assert "preference_accuracy" in files["markdown"].read_text()


def test_the_beta_sweep_example_checks_out() -> None:
    from mistral_fast.runner import NOTEBOOKS_DIR as NB
    from mistral_fast.runner import load_sweep

    spec = load_sweep(NB / "sweep_preference_beta.yaml")  # every variation checked against 04's parameters
    assert spec.notebook == "04_preference" and [v["train_beta"] for v in spec.variations] == [0.02, 0.1, 0.3, 1.0]
