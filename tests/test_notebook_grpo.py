"""05_grpo executes headless through papermill on the tiny model (rewards defined in a cell: a built-in by name
and a lambda), draws the reward curve, prints before/after answers; the group-size sweep file is checked."""

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
    assert run["train"]["steps"] == 2 and run["train"]["backend"] == "hf"
    grpo = run["evaluation"]["grpo"]
    assert set(grpo["rewards_after"]) == {"numeric_answer", "bare_number", "total"}
    assert 0 <= grpo["reward_before"] <= 1 and 0 <= grpo["reward_after"] <= 1
    run_dir = tmp_path / "runs" / "grpo"
    assert (run_dir / "eval.json").is_file() and (run_dir / "sft_warmup" / "adapter").is_dir()
    recorded = yaml.safe_load((run_dir / "run_config.yaml").read_text())["train"]["rewards"]
    assert recorded == ["notebook:numeric_answer", "notebook:bare_number"]  # the run says which rewards it used
    outputs = [o for c in nbformat.read(done.output_notebook, as_version=4).cells for o in c.get("outputs", [])]
    text = "\n".join(str(o.get("text", "")) for o in outputs)
    assert "| reward | before | after |" in text and "⟦completion⟧" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the reward curve was drawn


def test_the_group_size_sweep_checks_out_and_its_table_gets_the_rewards(tmp_path: Path) -> None:
    """The shipped sweep file is valid against 05's parameters; a 05 run's row carries reward_before/after.

    Sweeps themselves run notebooks through the same `run_notebook` (tests/test_notebook_preference.py runs one).
    """
    from mistral_fast.runner import _row, load_sweep, write_table

    spec = load_sweep(NOTEBOOKS_DIR / "sweep_grpo_generations.yaml")  # every variation checked against 05
    assert spec.notebook == "05_grpo" and [v["train_num_generations"] for v in spec.variations] == [2, 4, 8]
    evaluation = {"grpo": {"reward_before": 0.1, "reward_after": 0.367}}
    status = {"name": "v0", "variation": {"train_num_generations": 8}, "status": "done"}
    row = _row({**status, "results": {"run": {"train": {}, "evaluation": evaluation}}})
    assert (row["reward_before"], row["reward_after"], row["train_num_generations"]) == (0.1, 0.367, 8)
    assert "reward_after" in write_table([row], tmp_path)["markdown"].read_text()
