"""GRPO: TRL's GRPOTrainer wired for QLoRA on exact Mistral ids, with verifiable rewards.

For each prompt the policy samples a group of ``train.num_generations`` completions (``train.temperature``,
at most ``train.max_completion_length`` tokens, ending at ``</s>``); every reward scores every completion;
a completion's advantage is its total reward against its group's mean (divided by the group's standard
deviation), and the clipped policy-gradient loss raises the log-probability of the better completions.
With ``train.beta: 0`` the loss is reference-free (no second forward, no KL); with ``beta > 0`` the
reference is the same model with its adapter off, or the start adapter frozen (as for DPO).

* **Prompts** arrive encoded (`mistral_fast.grpo.prepare_prompts`); `ExactGRPOTrainer` hands TRL those ids
  instead of letting it template or tokenise the text (the fast tokenizer transformers builds for Mistral
  differs from mistral_common).
* **Generation** on CPU (and on one GPU without vLLM) is transformers' ``generate`` inside TRL. Where vLLM
  is installed and a GPU is there, TRL's vLLM path (``GRPOConfig(use_vllm=True, vllm_mode="colocate")``)
  generates instead; set it through ``mistral_fast.train_grpo.VLLM_ARGS`` — documented, not tested here.
* **Rewards** are `mistral_fast.rewards.Reward` objects, wrapped in TRL's batched signature; TRL logs each
  one's mean as ``rewards/<name>/mean`` and the total as ``reward`` (metrics.jsonl, TensorBoard); the curve
  PNG draws the loss and the rewards.
* **Unsloth**: on a GPU, importing unsloth (the unsloth backend) replaces ``trl.GRPOTrainer`` by its patched
  trainer (``PatchFastRL``); ours subclasses whatever ``trl.GRPOTrainer`` is when the run starts. Unsloth's CPU
  fallback keeps TRL's trainer and routes TRL's fused LM head to unsloth_zoo's CPU kernel (temperature included).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mistral_fast.atomic import atomic_path
from mistral_fast.config import RunConfig
from mistral_fast.distributed import using_fsdp
from mistral_fast.train import TrainResult, _callbacks, _result, _start_run, _timed_train, adapter_digest
from mistral_fast.train_preference import (
    _common_args,
    _torch_fused_lm_head,
    drop_fresh_reference_adapter,
    restore_start_adapter,
)

if TYPE_CHECKING:
    from mistral_fast.grpo import GrpoData
    from mistral_fast.modeling import LoadedModel
    from mistral_fast.rewards import Reward

log = logging.getLogger("mistral_fast")

VLLM_ARGS: dict[str, Any] = {}
"""Extra `GRPOConfig` arguments: ``{"use_vllm": True, "vllm_mode": "colocate"}`` on a GPU with vLLM (untested)."""

_UNUSED = ("max_length", "eval_strategy", "eval_steps", "load_best_model_at_end", "metric_for_best_model")


def build_grpo_config(cfg: RunConfig, loaded: LoadedModel, run_dir: Path) -> Any:
    """TRL's `GRPOConfig` for the run: the shared Trainer arguments plus the group, sampling and loss settings.

    TRL's own evaluation (which would sample groups for the eval split) is off: the held-out reward is
    measured greedily before and after training (`mistral_fast.grpo.mean_rewards`).
    """
    from trl import GRPOConfig

    t = cfg.train
    args = {k: v for k, v in _common_args(cfg, loaded, False, run_dir).items() if k not in _UNUSED}
    return GRPOConfig(
        **args,
        eval_strategy="no",
        load_best_model_at_end=False,
        num_generations=t.num_generations,
        temperature=t.temperature,
        max_completion_length=t.max_completion_length,
        beta=t.beta,
        reward_weights=list(t.reward_weights) or None,
        log_completions=False,
        **VLLM_ARGS,
    )


def trl_reward(reward: Reward) -> Any:
    """`reward` in TRL's batched signature; the prompt's ``where``/``question``/``columns`` come from the dataset."""

    def score(prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
        rows = zip(completions, kwargs["question"], kwargs["where"], kwargs["columns"], strict=True)
        return [reward(question, text, where, json.loads(columns)) for text, question, where, columns in rows]

    score.__name__ = reward.name  # TRL's metric name: rewards/<name>/mean
    return score


def trainer_class(loaded: LoadedModel) -> type:
    """`trl.GRPOTrainer` (Unsloth's patched one on that backend) taking our exact prompt ids.

    Without CUDA on the hf backend, TRL's fused LM head (a Triton kernel) is recomputed in torch, at the
    sampling temperature as TRL's own head divides the logits.
    """
    import torch
    import trl

    cpu_head = not torch.cuda.is_available() and loaded.backend == "hf"

    class ExactGRPOTrainer(trl.GRPOTrainer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._prompt_ids: list[list[int]] = []
            if cpu_head:
                base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
                _torch_fused_lm_head(base, temperature=self.temperature)

        def _generate_and_score_completions(self, inputs):
            self._prompt_ids = [list(x["prompt_ids"]) for x in inputs]  # one per completion, in TRL's order
            return super()._generate_and_score_completions(inputs)

        def _tokenize_prompts(self, prompts):
            if len(prompts) != len(self._prompt_ids):
                raise RuntimeError("GRPO: the prompts to generate do not match the batch's encoded prompts")
            return self._prompt_ids, None, {}

    return ExactGRPOTrainer


def train_grpo(cfg: RunConfig, loaded: LoadedModel, data: GrpoData, rewards: list[Reward]) -> TrainResult:
    """GRPO-train the LoRA adapter of `loaded` on `data`'s prompts with `rewards`; write the run directory."""
    from mistral_fast.modeling import cast_trainable_to_fp32

    run_dir, resume = _start_run(cfg)
    loaded.tokenizer.padding_side = "left"  # generation pads prompts on the left (TRL does too)
    trainer = trainer_class(loaded)(
        model=loaded.model,
        reward_funcs=[trl_reward(r) for r in rewards],
        args=build_grpo_config(cfg, loaded, run_dir),
        train_dataset=data.train,
        processing_class=loaded.tokenizer,
        callbacks=_callbacks(cfg, run_dir),
    )
    if cfg.train.beta > 0 and not cfg.model.adapter:
        drop_fresh_reference_adapter(trainer.model)  # the reference is the base: adapter off, no copy
    if not using_fsdp():
        cast_trainable_to_fp32(trainer.model)
    if cfg.train.beta > 0 and cfg.model.adapter:
        restore_start_adapter(trainer.model)
    output, seconds, _ = _timed_train(trainer, resume, False)
    adapter_dir = run_dir / "adapter"
    if trainer.is_world_process_zero():
        trainer.model.save_pretrained(adapter_dir, selected_adapters=["default"])
        loaded.tokenizer.save_pretrained(adapter_dir)
        plot_reward_curve(run_dir / "metrics.jsonl", run_dir / "loss_curve.png", [r.name for r in rewards])
    result = _result(cfg, loaded, trainer, output, seconds, None, adapter_dir, resume)
    result.perplexity = None  # a policy-gradient loss is not a language-model loss
    logged = [row for row in trainer.state.log_history if "reward" in row]
    result.extra.update(
        method="grpo",
        rewards=[r.name for r in rewards],
        num_generations=cfg.train.num_generations,
        beta=cfg.train.beta,
        reference="none (beta 0)" if cfg.train.beta == 0 else "the base: adapter disabled",
        first_logged_reward=logged[0]["reward"] if logged else None,
        last_logged_reward=logged[-1]["reward"] if logged else None,
        adapter_sha256=adapter_digest(trainer.model),
    )
    return result


def plot_reward_curve(metrics_path: Path, out: Path, names: list[str]) -> Path | None:
    """Draw the loss (top) and each reward's mean and the total (bottom) against step into a PNG."""
    if not metrics_path.exists():
        return None
    from matplotlib.figure import Figure  # a bare Figure: no pyplot backend switch in a notebook kernel

    rows = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    fig = Figure(figsize=(6, 5))
    loss_ax, reward_ax = fig.subplots(2, 1, sharex=True)
    series = [(loss_ax, "loss", "loss"), (reward_ax, "reward", "total reward")]
    series += [(reward_ax, f"rewards/{n}/mean", n) for n in names]
    for ax, key, label in series:
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=label)
    loss_ax.set_ylabel("loss")
    reward_ax.set_ylabel("mean reward")
    reward_ax.set_xlabel("step")
    for ax in (loss_ax, reward_ax):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    return out
