"""Training: TRL's SFTTrainer wired for QLoRA, with metrics, checkpoints and crash-safe resume.

The data arrive already tokenised with assistant-only labels (`mistral_fast.tokenizer`), so TRL's
own templating is bypassed: what we tested against mistral_common is exactly what is trained on.

Run directory layout (`train.output_dir`)::

    run_config.yaml      the resolved config
    checkpoints/         checkpoint-N/ … each with a COMPLETE marker once fully written
    adapter/             the final LoRA adapter (peft) + tokenizer
    metrics.jsonl        one JSON line per log event, flushed as it happens
    loss_curve.png       train / eval loss against step
    tensorboard/         TensorBoard event files
    result.json          final metrics, timings, paths
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from mistral_fast.atomic import atomic_path
from mistral_fast.config import RunConfig
from mistral_fast.distributed import accumulation_for_world, rank, using_fsdp, world_size
from mistral_fast.errors import ConfigError
from mistral_fast.pause import pause_point
from mistral_fast.policies import resolve_optimizer, uses_chunked_loss
from mistral_fast.tracking import TrackerCallback, abort_run, external_trackers, trainer_arguments

if TYPE_CHECKING:
    from mistral_fast.dataset import PreparedData
    from mistral_fast.modeling import LoadedModel

log = logging.getLogger("mistral_fast")

COMPLETE_MARKER = "COMPLETE"  # written into a checkpoint dir after the Trainer finished saving it


@dataclass
class TrainResult:
    """What a training run produced and measured."""

    run_dir: str
    adapter_dir: str
    backend: str
    train_loss: float | None
    eval_loss: float | None
    perplexity: float | None
    first_logged_loss: float | None
    steps: int
    train_seconds: float
    tokens_per_second: float
    peak_memory_mb: float
    resumed_from: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for result.json."""
        return asdict(self)


class MetricsCallback(TrainerCallback):
    """Appends every log event to metrics.jsonl and flushes, so a killed run keeps its history."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            row = {"step": state.global_step, "epoch": state.epoch, **logs, "time": time.time()}
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(row) + "\n")
            if "loss" in logs:
                pause_point(f"log:{state.global_step}")  # tests: kill mid-run once this step is on record


class CompleteCheckpointCallback(TrainerCallback):
    """Marks a checkpoint complete once the Trainer has written all of it (on_save comes last).

    A run killed while a checkpoint is being written leaves a directory without the marker; resume
    skips it and takes the previous complete one instead of crashing on, or silently loading, a
    half-written state.
    """

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                pause_point(f"save:{state.global_step}")  # tests: kill with the checkpoint written, unmarked
                (ckpt / COMPLETE_MARKER).write_text(str(state.global_step))


class StepsRunCallback(TrainerCallback):
    """Records the step this process started training at and how many optimiser steps it ran.

    A resumed run starts at its checkpoint's step (the Trainer loads the state before `on_train_begin`)
    and must run only the steps left; ``result.json`` says both, so a resume that quietly retrained
    from scratch shows.
    """

    def __init__(self) -> None:
        self.start_step: int | None = None
        self.steps_run = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start_step = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        self.steps_run += 1


class TrainableFp32Callback(TrainerCallback):
    """Casts LoRA weights back to fp32 after the Trainer set-up (TRL casts them to bf16 on 4-bit bases).

    bf16 adapter weights lose small updates: on CPU at lr 2e-4 only about half of the lora_A entries
    moved in 20 steps, all of them in fp32 (see DESIGN.md).
    """

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from mistral_fast.modeling import cast_trainable_to_fp32

        if model is not None and not using_fsdp():  # FSDP flat parameters need one dtype
            cast_trainable_to_fp32(model)


def last_complete_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The highest-numbered checkpoint with its COMPLETE marker; incomplete ones are reported and skipped."""
    if not checkpoint_dir.is_dir():
        return None
    found = sorted(
        (p for p in checkpoint_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
    )
    for ckpt in reversed(found):
        if (ckpt / COMPLETE_MARKER).exists():
            return ckpt
        log.warning("skipping %s: incomplete (the run was interrupted while saving it)", ckpt)
    return None


def build_sft_config(cfg: RunConfig, loaded: LoadedModel, has_eval: bool, run_dir: Path) -> Any:
    """Translate the run config into TRL's `SFTConfig`."""
    import torch
    from trl import SFTConfig

    t = cfg.train
    on_gpu = torch.cuda.is_available()
    dtype = loaded.compute_dtype
    load_best = t.load_best_model_at_end and has_eval
    return SFTConfig(
        output_dir=str(run_dir / "checkpoints"),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        learning_rate=t.learning_rate,
        per_device_train_batch_size=t.per_device_batch_size,
        per_device_eval_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=accumulation_for_world(cfg),  # same effective batch on 1 or N devices
        warmup_steps=t.warmup_ratio,  # transformers 5: a float < 1 is a ratio of the total steps
        lr_scheduler_type=t.lr_scheduler,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=resolve_optimizer(t.optimizer, on_cuda=torch.cuda.is_available()),
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        load_best_model_at_end=load_best,
        metric_for_best_model="eval_loss" if load_best else None,
        greater_is_better=False if load_best else None,
        bf16=on_gpu and dtype == torch.bfloat16,
        fp16=on_gpu and dtype == torch.float16,
        use_cpu=not on_gpu,
        seed=t.seed,
        data_seed=t.seed,
        max_length=cfg.model.max_seq_length,
        packing=t.packing,
        # Unsloth applies its own (offloaded) gradient checkpointing in get_peft_model.
        gradient_checkpointing=t.gradient_checkpointing and loaded.backend == "hf",
        gradient_checkpointing_kwargs={"use_reentrant": False},
        # mlflow / wandb / trackio through transformers' integrations; TensorBoard is our callback (run directory)
        **trainer_arguments(cfg),
        disable_tqdm=False,
        include_num_input_tokens_seen="non_padding",  # tokens/s counts real tokens, not padding
        **_router_aux_loss_args(cfg, loaded),
    )


def _router_aux_loss_args(cfg: RunConfig, loaded: LoadedModel) -> dict[str, Any]:
    """Mixtral: TRL adds ``coef x aux_loss`` to the loss and logs ``aux_loss`` (metrics.jsonl); 0.0 turns it off.

    TRL's default (None) takes the model's own coefficient (0.02 for Mixtral-8x7B) and turns the router
    logits on; ``train.router_aux_loss: false`` passes 0.0, which TRL documents as off. Dense models get
    nothing (TRL refuses a coefficient on a model without a router).
    """
    if not hasattr(loaded.model.config, "output_router_logits"):
        return {}
    if not cfg.train.router_aux_loss:
        return {"router_aux_loss_coef": 0.0}
    return {"router_aux_loss_coef": cfg.train.router_aux_loss_coef}


def _callbacks(cfg: RunConfig, run_dir: Path) -> list[TrainerCallback]:
    """Our callbacks: metrics.jsonl, checkpoint markers, fp32 adapters, and what ``train.report_to`` asks for.

    TensorBoard writes into the run directory (``tensorboard/``); `TrackerCallback` opens the MLflow / W&B /
    Trackio runs whose metrics transformers' own integrations (``report_to``) log.
    """
    callbacks: list[TrainerCallback] = [
        MetricsCallback(run_dir / "metrics.jsonl"),
        CompleteCheckpointCallback(),
        TrainableFp32Callback(),
    ]
    if "tensorboard" in cfg.train.report_to:
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        callbacks.append(TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(run_dir / "tensorboard"))))
    if external_trackers(cfg):
        callbacks.append(TrackerCallback(cfg, run_dir))
    return callbacks


PACKING_ATTENTION = ("flash_attention_2", "flash_attention_3")


def check_packing(cfg: RunConfig, loaded: LoadedModel) -> None:
    """Refuse packing where packed examples would attend to each other.

    TRL packs examples into one row and marks their starts with `position_ids`; only flash attention
    turns that into separate sequences. With sdpa or eager attention (transformers 5.17) a packed
    example attends to the ones before it: measured on the tiny model, the logits of the second of two
    packed sequences differed from its logits alone by up to 8 (sdpa) and 10 (eager). Unsloth's GPU
    kernels handle packing themselves.

    Raises:
        ConfigError: ``train.packing`` is on for the hf backend without flash attention.
    """
    if not cfg.train.packing or loaded.backend == "unsloth":
        return
    impl = getattr(loaded.model.config, "_attn_implementation", None)
    if impl not in PACKING_ATTENTION:
        raise ConfigError(
            f"train.packing=true needs flash attention on the hf backend, but the model uses {impl!r}: packed "
            "examples would attend to each other — set model.attn_implementation=flash_attention_2 (CUDA, "
            "flash-attn installed), use model.backend=unsloth on a GPU, or set train.packing=false"
        )


def _trainer_class(loaded: LoadedModel) -> type:
    """TRL's SFTTrainer, or on the hf backend without CUDA a subclass whose loss works on a CPU.

    TRL 1.15 computes every loss through its fused LM head, a Triton kernel: on a CPU it fails
    ("0 active drivers") when triton is installed and cannot run when it is not. Without CUDA we
    compute the same causal-LM loss in chunks of tokens (`mistral_fast.modeling.chunked_loss`: never the
    full batch x seq x vocab logits, 2 GiB per 4k tokens with tekken's vocabulary); calls that want the
    outputs (logits) get transformers' own `Trainer.compute_loss`. Unsloth's CPU backend reroutes the
    fused head itself.
    """
    import torch
    from transformers import Trainer
    from trl import SFTTrainer

    if torch.cuda.is_available() or loaded.backend == "unsloth":
        return SFTTrainer

    from mistral_fast.modeling.chunked_loss import model_loss

    class CpuSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            vocab = int(getattr(self.model.config, "vocab_size", 0) or 0)
            # The plain loss: Mixtral's router aux loss comes from the model's own forward; 32k vocabularies are
            # what the memory estimate models so (policies.uses_chunked_loss); and under DDP the forward must go
            # through the wrapper (its gradient sync), which the chunked loss's direct decoder call would skip.
            plain = getattr(self, "aux_loss_enabled", False) or self.accelerator.num_processes > 1
            if plain or not uses_chunked_loss(vocab_size=vocab, on_cuda=False):
                loss, outputs = Trainer.compute_loss(self, model, inputs, True, num_items_in_batch)
                aux = outputs.get("aux_loss") if isinstance(outputs, dict) else getattr(outputs, "aux_loss", None)
                if aux is not None and self.aux_loss_enabled:
                    # Mixtral: the model added coef x aux to its loss. As TRL's own path: the aux loss is a
                    # per-micro-batch mean, so with the token-normalised loss (num_items_in_batch) it is averaged
                    # over the accumulation steps; and it is logged on its own (aux_loss in metrics.jsonl).
                    steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
                    if model.training and steps > 1:
                        loss = loss - self.router_aux_loss_coef * aux * (1 - 1 / steps)
                    mode = "train" if model.training else "eval"
                    gathered = self.accelerator.gather_for_metrics(aux.detach())
                    self._metrics[mode]["aux_loss"].append(gathered.mean().item())
                return (loss, outputs) if return_outputs else loss
            if return_outputs or inputs.get("labels") is None:
                return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
            loss = model_loss(model, inputs, num_items_in_batch)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # as Trainer.compute_loss: DDP averages gradients
            return loss

    return CpuSFTTrainer


def _start_run(cfg: RunConfig) -> tuple[Path, Path | None]:
    """The run directory (created) and the checkpoint ``train.resume`` continues from: SFT's and preference's.

    None: a fresh start, whose metrics history is cleared.
    """
    run_dir = Path(cfg.train.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    resume = last_complete_checkpoint(run_dir / "checkpoints") if cfg.train.resume else None
    if cfg.train.resume and resume is None:
        log.info("train.resume: no complete checkpoint in %s, starting from scratch", run_dir / "checkpoints")
    if resume is None:  # a fresh run starts a fresh history
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    return run_dir, resume


def _timed_train(trainer: Any, resume: Path | None, evaluate: bool) -> tuple[Any, float, float | None]:
    """Run `trainer` (from `resume`, or from scratch), timed, the CUDA peak counter reset first; then evaluate.

    Returns:
        The Trainer's train output, the training seconds, and the eval loss (None without an eval set).
    """
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()  # the result's peak memory is the training's own
    start = time.perf_counter()
    try:
        output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        seconds = time.perf_counter() - start
        eval_loss = trainer.evaluate()["eval_loss"] if evaluate else None
    except BaseException:
        abort_run()  # the tracker runs say FAILED rather than staying open
        raise
    return output, seconds, eval_loss


def train(cfg: RunConfig, loaded: LoadedModel, data: PreparedData) -> TrainResult:
    """Fine-tune the LoRA adapter of `loaded` on `data`; write the run directory; return the figures.

    With ``train.resume`` it continues from the last complete checkpoint in the run directory (a
    checkpoint caught mid-save is skipped). Only the main process writes files.
    """

    from mistral_fast.modeling import cast_trainable_to_fp32

    check_packing(cfg, loaded)
    run_dir, resume = _start_run(cfg)
    steps = StepsRunCallback()
    trainer = _trainer_class(loaded)(
        model=loaded.model,
        args=build_sft_config(cfg, loaded, data.eval is not None, run_dir),
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=loaded.tokenizer,
        callbacks=[*_callbacks(cfg, run_dir), steps],
    )
    if not using_fsdp():
        cast_trainable_to_fp32(trainer.model)
    output, seconds, eval_loss = _timed_train(trainer, resume, data.eval is not None)
    _router_logits_off(trainer.model)
    digest = adapter_digest(trainer.model)
    if world_size() > 1:  # every rank says what it holds: after DDP all ranks must hold the same adapter
        log.info("rank %d/%d adapter sha256 %s", rank(), world_size(), digest)
    adapter_dir = run_dir / "adapter"
    if trainer.is_world_process_zero():
        trainer.model.save_pretrained(adapter_dir)  # safetensors: adapter_model.safetensors + adapter_config
        loaded.tokenizer.save_pretrained(adapter_dir)
        plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss_curve.png")
    result = _result(cfg, loaded, trainer, output, seconds, eval_loss, adapter_dir, resume)
    # the Trainer's own count of processes in its process group: 2 means DDP really ran, data sharded
    result.extra.update(adapter_sha256=digest, world_size=trainer.args.world_size)
    result.extra.update(start_step=steps.start_step, steps_run=steps.steps_run)
    return result


def _router_logits_off(model: Any) -> None:
    """Mixtral: router logits (and the aux loss) off once training is done.

    TRL turned them on in the model config; generation on the same model (the evaluation stage) then
    fails in transformers' load-balancing loss, whose attention mask covers the prompt while a cached
    decoding step routes one token.
    """
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "output_router_logits", False):
        config.output_router_logits = False


def adapter_digest(model: Any) -> str:
    """sha256 over the trainable (LoRA) weights, by name: equal digests mean equal adapters."""
    import hashlib

    h = hashlib.sha256()
    for name, param in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
        h.update(name.encode())
        h.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _peak_memory_mb() -> float:
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _result(cfg, loaded, trainer, output, seconds, eval_loss, adapter_dir, resume) -> TrainResult:
    history = [row for row in trainer.state.log_history if "loss" in row]
    tokens = trainer.state.num_input_tokens_seen or 0
    return TrainResult(
        run_dir=cfg.train.output_dir,
        adapter_dir=str(adapter_dir),
        backend=loaded.backend,
        train_loss=history[-1]["loss"] if history else output.training_loss,
        eval_loss=eval_loss,
        perplexity=math.exp(eval_loss) if eval_loss is not None and eval_loss < 50 else None,
        first_logged_loss=history[0]["loss"] if history else None,
        steps=trainer.state.global_step,
        train_seconds=round(seconds, 2),
        tokens_per_second=round(tokens / seconds, 1) if seconds else 0.0,
        peak_memory_mb=round(_peak_memory_mb(), 1),
        resumed_from=str(resume) if resume else None,
        extra={
            "compute_dtype": str(loaded.compute_dtype).removeprefix("torch."),
            **{f"{key}_reason": reason for key, reason in loaded.reasons.items()},
        },
    )


def plot_loss_curve(metrics_path: Path, out: Path) -> Path | None:
    """Draw train and eval loss against step from metrics.jsonl into a PNG (written atomically)."""
    if not metrics_path.exists():
        return None
    # A bare Figure, not pyplot: switching the process's backend (matplotlib.use) would stop a notebook
    # kernel's inline figures from rendering after mf.run(); a Figure saves to PNG with any backend.
    from matplotlib.figure import Figure

    rows = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    for key, label in (("loss", "train loss"), ("eval_loss", "eval loss")):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=100, format="png")  # the temp name has no .png suffix to infer it from
    return out
