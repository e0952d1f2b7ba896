"""Preference tuning on the hf backend (CPU): DPO and ORPO learn the sample set's preference, the DPO
reference is the same model with its adapter off (no second model), and the run directory is complete.

The unsloth backend runs the same recipe in its own process (tests/test_unsloth_backend.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mistral_fast.config import RunConfig, load_config
from mistral_fast.preference import SAMPLE_PREFERENCES

pytestmark = pytest.mark.slow

# The settings of the done-when figures: the tiny model, 120 pairs of the sample set (96 train / 24
# held out), a constant learning rate; about a minute per run on one core.
PREFERENCE = [
    f"data.path={SAMPLE_PREFERENCES}",
    "data.max_examples=120",
    "data.eval_fraction=0.2",
    "model.max_seq_length=128",
    "lora.rank=8",
    "lora.alpha=16",
    "train.max_steps=30",
    "train.learning_rate=3e-3",
    "train.warmup_ratio=0",
    "train.lr_scheduler=constant",
    "train.max_grad_norm=1.0",
    "train.logging_steps=5",
    "train.eval_steps=30",
    "train.save_steps=30",
]


def preference_cfg(out: Path, method: str, *extra: str) -> RunConfig:
    return load_config("smoke", [*PREFERENCE, f"train.method={method}", f"train.output_dir={out}", *extra])


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    from mistral_fast.pipeline import run

    cfg = preference_cfg(tmp_path_factory.mktemp("dpo") / "run", "dpo")
    return cfg, run(cfg)


@pytest.fixture(scope="module")
def orpo_run(tmp_path_factory):
    from mistral_fast.pipeline import run

    cfg = preference_cfg(tmp_path_factory.mktemp("orpo") / "run", "orpo")
    return cfg, run(cfg)


@pytest.mark.parametrize("fixture", ["dpo_run", "orpo_run"])
def test_held_out_preference_accuracy_rises_to_09(fixture: str, request) -> None:
    cfg, result = request.getfixturevalue(fixture)
    evaluation = json.loads((Path(result.run_dir) / "eval.json").read_text())
    base, tuned = evaluation["base"], evaluation["tuned"]
    assert evaluation["split"] == "eval" and tuned["pairs"] == 24
    assert base["accuracy"] < 0.9, "the untrained model must not already rank the pairs"
    assert tuned["accuracy"] >= 0.9, evaluation
    assert tuned["mean_margin"] > base["mean_margin"]
    assert result.train["extra"]["method"] == cfg.train.method


def test_dpo_run_directory_metrics_and_manifest(dpo_run) -> None:
    from mistral_fast.manifest import verify_run
    from mistral_fast.rundir import RunDir

    _, result = dpo_run
    run_dir = Path(result.run_dir)
    rows = metrics(run_dir)
    logged = [r for r in rows if "loss" in r]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert all(key in r for r in logged), key
        assert any(f"eval_{key}" in r for r in rows), key
    # step 1 is scored before any update: policy == reference (adapter off), so every reward is exactly 0
    first = logged[0]
    assert first["step"] == 1 and first["rewards/chosen"] == first["rewards/margins"] == 0.0
    assert logged[-1]["rewards/margins"] > 1.0 and logged[-1]["rewards/accuracies"] == 1.0
    assert (run_dir / "loss_curve.png").stat().st_size > 1000
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (run_dir / "adapter").iterdir() if p.is_dir()) == []  # no `ref` adapter saved
    report = verify_run(run_dir)  # the manifest hashes every file, eval.json included
    assert not report["missing"] and not report["changed"] and "eval.json" in report["ok"]
    result_json = json.loads((run_dir / "result.json").read_text())
    assert result_json["train"]["extra"]["reference"] == "the base: adapter disabled"
    assert result_json["train"]["perplexity"] is None
    RunDir.open(run_dir).load()  # the saved adapter fits the model of the run's config


def test_orpo_logs_rewards_without_a_reference(orpo_run) -> None:
    _, result = orpo_run
    logged = [r for r in metrics(Path(result.run_dir)) if "loss" in r]
    assert all("rewards/margins" in r and "log_odds_ratio" in r for r in logged)
    assert result.train["extra"]["reference"] == "none (ORPO)"


def _trainer(cfg: RunConfig):
    from mistral_fast.modeling import load_model
    from mistral_fast.preference import prepare_preferences
    from mistral_fast.train_preference import build_preference_config, drop_fresh_reference_adapter, trainer_class

    data = prepare_preferences(cfg)
    loaded = load_model(cfg)
    before = {
        "params": sum(p.numel() for p in loaded.model.parameters()),
        "4bit": sum(type(m).__name__ == "Linear4bit" for m in loaded.model.modules()),
    }
    Path(cfg.train.output_dir).mkdir(parents=True, exist_ok=True)
    trainer = trainer_class("dpo", loaded)(
        model=loaded.model,
        args=build_preference_config(cfg, loaded, False, Path(cfg.train.output_dir)),
        train_dataset=data.train,
        processing_class=loaded.tokenizer,
    )
    drop_fresh_reference_adapter(trainer.model)
    return trainer, loaded, before


def test_dpo_reference_is_the_same_model_with_its_adapter_off(tmp_path: Path) -> None:
    import gc

    from peft import PeftModel
    from transformers import MistralForCausalLM  # the tiny model's class (its inner MistralModel is not counted)

    def live_models() -> set[int]:
        gc.collect()  # models of earlier tests, unreachable now, must not be counted
        found = [o for o in gc.get_objects() if isinstance(o, PeftModel | MistralForCausalLM)]
        return {id(o.get_base_model() if isinstance(o, PeftModel) else o) for o in found}

    earlier = live_models()  # session fixtures of other modules may hold theirs
    cfg = preference_cfg(tmp_path / "run", "dpo", "data.max_examples=8")
    trainer, loaded, before = _trainer(cfg)
    assert trainer.ref_model is None and list(trainer.model.peft_config) == ["default"]
    assert sum(p.numel() for p in trainer.model.parameters()) == before["params"]  # no reference copy
    assert sum(type(m).__name__ == "Linear4bit" for m in trainer.model.modules()) == before["4bit"]
    assert live_models() - earlier == {id(trainer.model.get_base_model())}  # one model: no reference copy

    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    # right padding (trl #1217): every row starts with BOS and its attention mask is 1…1 0…0
    assert (batch["input_ids"][:, 0] == loaded.tokenizer.bos_token_id).all()
    mask = batch["attention_mask"]
    assert (mask.sort(dim=1, descending=True).values == mask).all() and (mask[:, -1] == 0).any()

    with torch.no_grad():  # move the adapter away from zero: policy != base
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    trainer.model.eval()
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)

    def summed(model) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=mask).logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1)
        target = labels[:, 1:]
        picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (picked * (target != -100)).sum(-1)

    with torch.no_grad():
        policy = summed(trainer.model)
        with trainer.model.disable_adapter():
            base = summed(trainer.model)
    torch.testing.assert_close(torch.cat([ref_chosen, ref_rejected]), base, rtol=1e-4, atol=1e-3)
    assert (policy - base).abs().max() > 0.1  # the reference really is not the policy


def test_dpo_starts_from_an_sft_runs_adapter(tmp_path: Path) -> None:
    from mistral_fast.errors import ConfigError
    from mistral_fast.pipeline import run

    sft = load_config(
        "smoke",
        [
            "train.max_steps=4",
            "train.eval_steps=2",
            "train.save_steps=2",
            "data.max_examples=16",
            "model.max_seq_length=128",
            f"train.output_dir={tmp_path / 'sft'}",
        ],
    )
    run(sft)
    with pytest.raises(ConfigError, match=r"model\.adapter=.*lora\.rank=8.*lora\.rank=4"):
        run(preference_cfg(tmp_path / "bad", "dpo", f"model.adapter={tmp_path / 'sft'}", "lora.rank=4"))
    cfg = preference_cfg(
        tmp_path / "dpo",
        "dpo",
        f"model.adapter={tmp_path / 'sft'}",
        "train.max_steps=2",
        "data.max_examples=16",
        "train.eval_steps=2",
        "train.save_steps=2",
    )
    result = run(cfg)
    evaluation = result.evaluation
    assert evaluation["started_from"] == str(tmp_path / "sft" / "adapter")
    assert evaluation["start"] != evaluation["base"]  # the SFT adapter was on before training
    assert result.train["extra"]["reference"] == "the start adapter, frozen"
    first = next(r for r in metrics(tmp_path / "dpo") if "loss" in r)
    assert first["rewards/margins"] == 0.0  # the reference is the SFT adapter: equal to the policy at step 1


def test_resume_continues_from_the_last_complete_checkpoint(tmp_path: Path) -> None:
    import shutil

    from safetensors.torch import load_file

    from mistral_fast.pipeline import run

    common = [
        "data.max_examples=24",
        "train.max_steps=4",
        "train.save_steps=2",
        "train.eval_steps=2",
        "train.save_total_limit=5",
    ]
    straight = run(preference_cfg(tmp_path / "a", "dpo", *common))
    cfg = preference_cfg(tmp_path / "b", "dpo", *common)
    run(cfg)
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "checkpoint-4")  # as if killed between saves 2 and 4
    shutil.rmtree(tmp_path / "b" / "adapter")
    resumed = run(cfg.with_overrides({"train.resume": True}))
    assert resumed.train["resumed_from"].endswith("checkpoint-2") and resumed.train["steps"] == 4
    a = load_file(str(Path(straight.run_dir) / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter" / "adapter_model.safetensors"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)


def test_dpo_adapter_merges_and_passes_the_equivalence_report(dpo_run, tmp_path: Path) -> None:
    from mistral_fast.export import merge_adapter
    from mistral_fast.export.report import equivalence_report

    _, result = dpo_run
    merged = merge_adapter(result.run_dir, tmp_path / "merged")
    assert (merged / "model.safetensors").is_file()
    report = equivalence_report(
        result.run_dir,
        merged_dir=merged,
        out_dir=tmp_path / "report",
        eval_examples=0,
        merged_dtype="float32",
        max_new_tokens=8,
    )
    pair = report["pairs"][0]
    assert (pair["reference"], pair["other"]) == ("adapter", "merged")
    assert pair["relative_logit_diff"] < 0.02 and pair["top1_agreement"] > 0.95 and all(pair["greedy_match"])
