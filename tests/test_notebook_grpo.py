"""05_grpo executes headless through papermill on the tiny model (rewards defined in a cell: a built-in by name
and a lambda), draws the reward curve, prints before/after answers; a sweep over the group size runs it twice."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
import yaml

from mistral_fast.runner import NOTEBOOKS_DIR, read_parameters, run_notebook

pytestmark = pytest.mark.slow

FAST = {"train.sft_warmup_steps": 4, "train.max_steps": 2, "train.per_device_batch_size": 16, "data.max_examples": 40}


def test_grpo_parameters_map_to_config_fields() -> None:
    from mistral_fast.notebook import config_key

    params = read_parameters(NOTEBOOKS_DIR / "05_grpo.ipynb")
    assert params["train_method"].default == "grpo" and params["train_beta"].default == 0.0
    extra = {"smoke", "preset", "overrides", "gpu", "storage", "install_from"}
    assert all(config_key(name) for name in params if name not in extra)
    cells = nbformat.read(NOTEBOOKS_DIR / "05_grpo.ipynb", as_version=4).cells
    assert not any("def " in c.source or "class " in c.source for c in cells if c.cell_type == "code")


def test_grpo_notebook_runs_on_the_tiny_model(tmp_path: Path) -> None:
    done = run_notebook(
        "05_grpo", {"smoke": True, "overrides": FAST}, output=tmp_path / "05.ipynb", cwd=tmp_path, timeout=600
    )
    run = done.results["run"]
    assert done.results["config"]["train"]["method"] == "grpo"
    assert done.results["config"]["train"]["rewards"] == ["notebook:numeric_answer", "notebook:bare_number"]
    assert run["train"]["steps"] == 2 and run["train"]["backend"] == "hf"
    grpo = run["evaluation"]["grpo"]
    assert set(grpo["rewards_after"]) == {"numeric_answer", "bare_number", "total"}
    assert 0 <= grpo["reward_before"] <= 1 and 0 <= grpo["reward_after"] <= 1
    run_dir = tmp_path / "runs" / "grpo"
    assert (run_dir / "eval.json").is_file() and (run_dir / "sft_warmup" / "adapter").is_dir()
    outputs = [o for c in nbformat.read(done.output_notebook, as_version=4).cells for o in c.get("outputs", [])]
    text = "\n".join(str(o.get("text", "")) for o in outputs)
    assert "| reward | before | after |" in text and "⟦completion⟧" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the reward curve was drawn


def test_sweep_over_the_group_size(tmp_path: Path) -> None:
    from mistral_fast.runner import load_sweep, run_sweep

    spec = load_sweep(NOTEBOOKS_DIR / "sweep_grpo_generations.yaml")  # the shipped example checks out
    assert spec.notebook == "05_grpo" and [v["train_num_generations"] for v in spec.variations] == [2, 4, 8]
    fast = {**FAST, "train.max_steps": 1}
    sweep = {
        "notebook": "05_grpo",
        "parameters": {"smoke": True, "overrides": fast},
        "grid": {"train_num_generations": [2, 4]},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    rows, files = run_sweep(path, out=str(tmp_path / "out"))
    assert [r.get("train_num_generations") for r in rows] == [2, 4] and all(r["status"] == "done" for r in rows)
    assert all(0 <= r["reward_after"] <= 1 for r in rows) and "reward_after" in files["markdown"].read_text()
