"""RunDir: one reader of run directories — config, trained dtype, adapter — for evaluate, export and notebooks."""

from __future__ import annotations

import json

import pytest

from mistral_fast.config import RunConfig
from mistral_fast.errors import ConfigError, ModelError
from mistral_fast.notebook import check_parameter_names, notebook_config, resolve_run_dir
from mistral_fast.rundir import RunDir


def test_run_and_adapter_directories(tmp_path) -> None:
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    cfg = RunConfig().with_overrides({"model.compute_dtype": "float32", "train.output_dir": str(run)})
    cfg.save(run / "run_config.yaml")
    (run / "adapter" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "elsewhere"}))
    opened = RunDir.open(run)
    assert opened.config == cfg and opened.adapter_dir == run / "adapter"
    assert RunDir.open(run / "adapter").path == run  # an adapter directory inside a run reads the run's config
    assert not opened.is_finished
    with pytest.raises(ModelError, match="not a finished run"):
        opened.require_finished()
    assert opened.trained_compute_dtype() == "float32"  # not recorded yet: the config's, resolved
    (run / "result.json").write_text(json.dumps({"train": {"extra": {"compute_dtype": "bfloat16"}}}))
    assert opened.trained_compute_dtype() == "bfloat16"  # what training recorded wins over a re-resolved auto


def test_bare_adapter_directory_names_its_base(tmp_path) -> None:
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "mistralai/Mistral-7B-v0.3"}))
    run = RunDir.open(tmp_path)
    assert run.adapter_dir == tmp_path
    assert run.config.model.name_or_path == "mistralai/Mistral-7B-v0.3" and run.config.model.load_in_4bit
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelError, match="cannot tell the base model"):
        RunDir.open(tmp_path).config  # noqa: B018


def test_misspelled_notebook_parameter_is_refused_with_the_closest_field() -> None:
    with pytest.raises(ConfigError, match=r"'lora_rnak' is not a config field — did you mean lora_rank\?"):
        notebook_config({"smoke": True, "lora_rnak": 8})
    check_parameter_names({"smoke": True, "gpu": "t4", "lora_rank": 8, "mf": object(), "run_dir": ""})


def test_02_and_03_find_01s_run_for_the_preset_it_used() -> None:
    for preset in ("a100", "colab-t4", "smoke"):
        expected = notebook_config({"smoke": False, "preset": preset}).train.output_dir
        assert str(resolve_run_dir("", preset=preset)) == expected
    assert str(resolve_run_dir("", smoke=True, preset="a100")) == notebook_config({"smoke": True}).train.output_dir
    assert str(resolve_run_dir("mine")) == "mine"


def test_plots_leave_the_matplotlib_backend_alone(tmp_path) -> None:
    """A notebook kernel's inline backend must survive mf.run() (which draws the loss curve)."""
    import matplotlib

    from mistral_fast.runner import _plot
    from mistral_fast.train import plot_loss_curve

    original = matplotlib.get_backend()
    matplotlib.use("svg")  # any backend other than Agg: what a kernel's inline backend stands for here
    try:
        metrics = tmp_path / "metrics.jsonl"
        metrics.write_text("\n".join(json.dumps({"step": s, "loss": 3.0 / s}) for s in range(1, 5)))
        out = plot_loss_curve(metrics, tmp_path / "loss.png")
        _plot([{"name": "a", "train_loss": 1.0, "eval_loss": 1.2}], tmp_path / "sweep.png")
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(original)
    for png in (out, tmp_path / "sweep.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
