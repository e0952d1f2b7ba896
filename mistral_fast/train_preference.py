"""Preference tuning: TRL's DPOTrainer (DPO) and ORPOTrainer (ORPO) wired for QLoRA on exact Mistral ids.

The pairs arrive encoded (`mistral_fast.preference.prepare_preferences`): ``prompt_ids`` plus each
answer's ids, tested against `mistral_common`. Both trainers are given those ids as they are; TRL's own
templating and tokenisation are bypassed, as for SFT.

* **DPO** (`trl.DPOTrainer`). The reference model is the policy itself with its LoRA adapter switched
  off (``ref_model=None`` with a peft model): no second copy of the weights is loaded. When training
  starts from a finished SFT run's adapter (``model.adapter``), the reference is that adapter, frozen: TRL
  keeps a copy of the LoRA matrices only (an adapter named ``ref``), never of the base.
* **ORPO**: TRL 1.15 moved ``ORPOTrainer`` to ``trl.experimental.orpo``; that class is used, with its
  row tokenisation replaced by our exact ids. ORPO needs no reference at all. Its SFT term is TRL's:
  the NLL over prompt + chosen (kept on purpose to match the ORPO authors' code: trl #1516, #2527), while
  the odds-ratio term scores the answers only.

Padding is on the right for training (TRL's collators pad right; trl #1217 was left padding with
Mistral), and the run directory is written as for SFT (`mistral_fast.train`): checkpoints with
COMPLETE markers, resume, ``metrics.jsonl`` (with ``rewards/chosen``, ``rewards/rejected``,
``rewards/margins``, ``rewards/accuracies``), TensorBoard and the loss-curve PNG.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mistral_fast.config import RunConfig
from mistral_fast.distributed import accumulation_for_world, using_fsdp
from mistral_fast.policies import resolve_optimizer
from mistral_fast.tracking import trainer_arguments
from mistral_fast.train import (
    TrainResult,
    _callbacks,
    _result,
    _start_run,
    _timed_train,
    adapter_digest,
    plot_loss_curve,
)

if TYPE_CHECKING:
    from mistral_fast.modeling import LoadedModel
    from mistral_fast.preference import PreferenceData

log = logging.getLogger("mistral_fast")

REF_ADAPTER = "ref"  # the name TRL gives its frozen copy of a pre-trained adapter (the DPO reference)


def _common_args(cfg: RunConfig, loaded: LoadedModel, has_eval: bool, run_dir: Path) -> dict[str, Any]:
    """The Trainer arguments DPO and ORPO share with SFT (`mistral_fast.train.build_sft_config`)."""
    import torch

    t = cfg.train
    on_gpu = torch.cuda.is_available()
    dtype = loaded.compute_dtype
    load_best = t.load_best_model_at_end and has_eval
    return {
        "output_dir": str(run_dir / "checkpoints"),
        "num_train_epochs": t.epochs,
        "max_steps": t.max_steps,
        "learning_rate": t.learning_rate,
        "per_device_train_batch_size": t.per_device_batch_size,
        "per_device_eval_batch_size": t.per_device_batch_size,
        "gradient_accumulation_steps": accumulation_for_world(cfg),
        "warmup_steps": t.warmup_ratio,
        "lr_scheduler_type": t.lr_scheduler,
        "weight_decay": t.weight_decay,
        "max_grad_norm": t.max_grad_norm,
        "optim": resolve_optimizer(t.optimizer, on_cuda=on_gpu),
        "logging_steps": t.logging_steps,
        "logging_first_step": True,
        "eval_strategy": "steps" if has_eval else "no",
        "eval_steps": t.eval_steps,
        "save_strategy": "steps",
        "save_steps": t.save_steps,
        "save_total_limit": t.save_total_limit,
        "load_best_model_at_end": load_best,
        "metric_for_best_model": "eval_loss" if load_best else None,
        "greater_is_better": False if load_best else None,
        "bf16": on_gpu and dtype == torch.bfloat16,
        "fp16": on_gpu and dtype == torch.float16,
        "use_cpu": not on_gpu,
        "seed": t.seed,
        "data_seed": t.seed,
        "max_length": cfg.model.max_seq_length,
        "gradient_checkpointing": t.gradient_checkpointing and loaded.backend == "hf",
        "gradient_checkpointing_kwargs": {"use_reentrant": False},
        **trainer_arguments(cfg),  # mlflow / wandb / trackio (mistral_fast.tracking)
        "disable_tqdm": False,
        "remove_unused_columns": False,
    }


def build_preference_config(cfg: RunConfig, loaded: LoadedModel, has_eval: bool, run_dir: Path) -> Any:
    """TRL's `DPOConfig` (``train.method: dpo``) or `ORPOConfig` (``orpo``) for the run."""
    args = _common_args(cfg, loaded, has_eval, run_dir)
    if cfg.train.method == "orpo":
        from trl.experimental.orpo import ORPOConfig

        return ORPOConfig(**args, beta=cfg.train.beta, max_completion_length=cfg.train.max_answer_length)
    from trl import DPOConfig

    return DPOConfig(
        **args,
        beta=cfg.train.beta,
        loss_type=[cfg.train.loss_type],
        truncation_mode="keep_start",  # the prompt is kept whole; the data stage already capped it
        precompute_ref_log_probs=False,  # the reference pass runs per batch, without gradients
    )


def _torch_fused_lm_head(model: Any, temperature: float = 1.0) -> None:
    """Give `model` TRL's ``fused_lm_head=True`` forward in plain torch (TRL's own is a Triton kernel).

    ``temperature`` divides the logits, as TRL's head does for GRPO's sampling temperature.

    TRL 1.15's DPOTrainer asks the model for per-token log-probs through ``fused_lm_head=True``; the
    kernel behind it needs a CUDA device. This computes the same fields from the LM head's logits on the
    label positions only (the memory-saving tiling does not matter on a CPU).
    """
    import types

    import torch
    from trl.trainer.utils import FusedCausalLMOutput

    original = type(model).forward

    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kw):
        if not fused_lm_head:
            if labels is not None:
                kw["labels"] = labels
            return original(self, *args, **kw)
        kw["use_cache"] = False
        hidden = self.base_model(*args, **kw).last_hidden_state[:, :-1]
        labels = labels[:, 1:]
        mask = labels != -100
        logits = self.get_output_embeddings()(hidden[mask]).float() / temperature
        logp = torch.log_softmax(logits, dim=-1)
        picked = logp.gather(-1, labels[mask].unsqueeze(-1)).squeeze(-1)
        entropy = -(logp.exp() * logp).sum(-1).detach()
        fields = (picked, entropy, logits.mean(-1).detach(), logits.argmax(-1) == labels[mask])
        full = [x.new_zeros(mask.shape).masked_scatter(mask, x) for x in fields]
        loss = -full[0].sum() / mask.sum().clamp(min=1)
        return FusedCausalLMOutput(
            loss=loss, log_probs=full[0], entropy=full[1], mean_logits=full[2], is_top1=full[3], label_mask=mask
        )

    model.forward = types.MethodType(forward, model)


def trainer_class(method: str, loaded: LoadedModel) -> type:
    """The TRL trainer for ``method`` with its data preparation replaced by our exact ids.

    DPO: `trl.DPOTrainer`; without CUDA on the hf backend its fused LM head is recomputed in torch.
    ORPO: `trl.experimental.orpo.ORPOTrainer` (TRL 1.15 has it there only), whose ``tokenize_row``
    re-tokenises text; ours turns the encoded ids into the columns its collator pads.
    """
    import torch

    if method == "orpo":
        from trl.experimental.orpo import ORPOTrainer

        class ExactORPOTrainer(ORPOTrainer):
            def tokenize_row(self, feature, model=None):
                prompt, out = feature["prompt_ids"], {}
                out["prompt_input_ids"], out["prompt_attention_mask"] = prompt, [1] * len(prompt)
                for key in ("chosen", "rejected"):
                    answer = feature[f"{key}_ids"]
                    out[f"{key}_input_ids"] = prompt + answer
                    out[f"{key}_attention_mask"] = [1] * (len(prompt) + len(answer))
                    out[f"{key}_labels"] = [-100] * len(prompt) + answer
                return out

        return ExactORPOTrainer

    from trl import DPOTrainer

    cpu_head = not torch.cuda.is_available() and loaded.backend == "hf"

    class ExactDPOTrainer(DPOTrainer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if cpu_head:
                base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
                _torch_fused_lm_head(base)

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # already prompt_ids / chosen_ids / rejected_ids, exactly as mistral_common encodes

    return ExactDPOTrainer


def drop_fresh_reference_adapter(model: Any) -> bool:
    """Make the DPO reference "adapter off" when training starts from the base.

    TRL copies a peft model's adapter into a frozen ``ref`` adapter; for a fresh adapter (B = 0) that copy
    *is* the base, so it is deleted: the reference pass then runs with adapters disabled, on the same
    weights, and costs no extra LoRA matrices. Returns whether one was removed.
    """
    config = getattr(model, "peft_config", {})
    if REF_ADAPTER not in config:
        return False
    model.delete_adapter(REF_ADAPTER)
    model.set_adapter("default")
    return True


def restore_start_adapter(model: Any) -> int:
    """Copy the frozen ``ref`` adapter (the start adapter, fp32) back into the trained one; return the count.

    On a 4-bit base TRL casts the trainable LoRA weights to bf16 after copying them into ``ref``: casting
    back to fp32 cannot undo the rounding, so an SFT adapter would start DPO slightly off itself (measured:
    a reward margin of -0.0009 at step 1 instead of 0). The reference kept the exact values.
    """
    import torch

    copied = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if f".{REF_ADAPTER}." in name:
                model.get_parameter(name.replace(f".{REF_ADAPTER}.", ".default.")).data.copy_(param.data)
                copied += 1
    return copied


def train_preference(cfg: RunConfig, loaded: LoadedModel, data: PreferenceData) -> TrainResult:
    """Preference-tune the LoRA adapter of `loaded` on `data` (DPO or ORPO); write the run directory.

    ``train.resume`` continues from the last complete checkpoint, as for SFT.
    """
    from mistral_fast.modeling import cast_trainable_to_fp32

    run_dir, resume = _start_run(cfg)
    loaded.tokenizer.padding_side = "right"  # trl #1217: Mistral DPO with left padding trained on garbage
    trainer = trainer_class(cfg.train.method, loaded)(
        model=loaded.model,
        args=build_preference_config(cfg, loaded, data.eval is not None, run_dir),
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=loaded.tokenizer,
        callbacks=_callbacks(cfg, run_dir),
    )
    if cfg.train.method == "dpo" and not cfg.model.adapter:
        drop_fresh_reference_adapter(trainer.model)
    if not using_fsdp():
        cast_trainable_to_fp32(trainer.model)
    if cfg.train.method == "dpo" and cfg.model.adapter:
        restore_start_adapter(trainer.model)  # after the fp32 cast: the start adapter exactly, not bf16-rounded
    output, seconds, eval_loss = _timed_train(trainer, resume, data.eval is not None)
    adapter_dir = run_dir / "adapter"
    if trainer.is_world_process_zero():
        # only the trained adapter: a `ref` copy is the reference, not part of the result
        trainer.model.save_pretrained(adapter_dir, selected_adapters=["default"])
        loaded.tokenizer.save_pretrained(adapter_dir)
        plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss_curve.png")
    result = _result(cfg, loaded, trainer, output, seconds, eval_loss, adapter_dir, resume)
    result.perplexity = None  # a preference loss is not a language-model loss
    last = next((row for row in reversed(trainer.state.log_history) if "rewards/margins" in row), {})
    result.extra.update(
        method=cfg.train.method,
        beta=cfg.train.beta,
        loss_type=cfg.train.loss_type,
        reference="none (ORPO)"
        if cfg.train.method == "orpo"
        else ("the start adapter, frozen" if cfg.model.adapter else "the base: adapter disabled"),
        adapter_sha256=adapter_digest(trainer.model),
        world_size=trainer.args.world_size,
        **{k: v for k, v in last.items() if k.startswith("rewards/")},
    )
    return result
