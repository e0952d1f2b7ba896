"""Typed run configuration: one `RunConfig` for every entry point.

A notebook's parameters, a YAML file, `--set key=value` overrides and Python calls all build the
same nested dataclasses. Every field has a default and a one-line comment; `__post_init__`
validates, so a bad value fails on construction with the field's dotted name, the value and what is
allowed. Unknown keys are refused rather than ignored (a typo in `lora.rnak` must not silently train
with the default). No torch here: config work stays instant.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from mistral_fast.atomic import write_text_atomic
from mistral_fast.constants import GGUF_TYPES, KQUANT_TYPES
from mistral_fast.errors import ConfigError
from mistral_fast.families import lora_target_sets, resolve_targets
from mistral_fast.resources import resource_dir

# the checkout's configs/ and data/, or the copies inside an installed wheel (mistral_fast.resources)
CONFIGS_DIR = resource_dir("configs")
DATA_DIR = resource_dir("data")


# TRL 1.15 DPOTrainer's pairwise loss types (`DPOConfig.loss_type`); ORPO has one loss, its odds ratio.
PREFERENCE_LOSS_TYPES: dict[str, tuple[str, ...]] = {
    "sft": ("sigmoid",),
    "dpo": ("sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "apo_zero",
            "apo_down", "sigmoid_norm"),
    "orpo": ("sigmoid",),
}


# train.report_to: TensorBoard writes into the run directory; the others go through transformers' integrations
REPORT_TO = ("tensorboard", "mlflow", "wandb", "trackio", "none")


def _fail(name: str, value: Any, allowed: str) -> typing.NoReturn:
    raise ConfigError(f"{name}={value!r} is invalid: {allowed}")


def _positive(name: str, value: float, *, zero_ok: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        _fail(name, value, "expected a number")
    if value < 0 or (value == 0 and not zero_ok):
        _fail(name, value, "must be >= 0" if zero_ok else "must be > 0")


@dataclass
class ModelConfig:
    """Which base model to load and how to quantise it."""

    name_or_path: str = "tiny"  # local dir, hub name, or "tiny" (a small random Mistral built locally)
    backend: Literal["auto", "unsloth", "hf"] = "auto"  # auto: unsloth on CUDA when it imports, else hf
    load_in_4bit: bool = True  # QLoRA: bitsandbytes 4-bit base weights
    quant_type: Literal["nf4", "fp4"] = "nf4"  # NF4 is information-optimal for normal weights
    double_quant: bool = True  # quantise the absmax constants too (~0.37 bit/param saved)
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"  # auto: bf16 if supported
    max_seq_length: int = 2048  # longest training example in tokens; longer ones are truncated
    # v3: Mistral-7B v0.3; v1: v0.1/v0.2; v3-tekken: Nemo 12B; v7-tekken: Small 3 24B; v11-/v13-tekken: the
    # Small 3.2 / Magistral formats on Nemo's vocabulary (a real checkpoint: `model`, its own tekken.json)
    tokenizer: Literal["v3", "v1", "v3-tekken", "v7-tekken", "v11-tekken", "v13-tekken", "model"] = "v3"
    trust_remote_code: bool = False  # never run a repository's Python unless asked
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2"] = "auto"  # hf backend kernel
    adapter: str = ""  # start from this finished run's (or adapter directory's) LoRA adapter; "" = fresh

    def __post_init__(self) -> None:
        if not self.name_or_path:
            _fail("model.name_or_path", self.name_or_path, "give a local directory, a hub name or 'tiny'")
        if self.max_seq_length < 16:
            _fail("model.max_seq_length", self.max_seq_length, "must be >= 16 tokens")
        if self.quant_type != "nf4" and not self.load_in_4bit:
            _fail("model.quant_type", self.quant_type, "only meaningful with model.load_in_4bit=true")


@dataclass
class LoraConfig:
    """The LoRA adapter: W + (alpha/r)·B·A on the target modules."""

    rank: int = 16  # r: 4-8 simple tasks, 16-32 instruction following, 64+ specialised domains
    alpha: int = 32  # scaling numerator; common choices: 2r, r or r/2
    dropout: float = 0.05  # dropout on the LoRA input; 0 lets Unsloth use its fastest path
    targets: str | list[str] = "all-linear"  # "attention", "all-linear" or a list of module names
    bias: Literal["none", "all", "lora_only"] = "none"  # train no biases (Mistral has none)
    use_rslora: bool = False  # rank-stabilised scaling alpha/sqrt(r) instead of alpha/r
    train_router: bool = False  # Mixtral: also train the router (`gate`) whole; frozen by default

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            _fail("lora.rank", self.rank, "a positive integer (4-8 simple, 16-32 instruction, 64+ domain)")
        _positive("lora.alpha", self.alpha)
        if not 0 <= self.dropout < 1:
            _fail("lora.dropout", self.dropout, "must be in [0, 1)")
        self.target_modules  # noqa: B018 - validates the target set

    @property
    def target_modules(self) -> list[str]:
        """The module names LoRA is applied to, resolved from a set name or an explicit list."""
        if isinstance(self.targets, str):
            if self.targets not in lora_target_sets():
                _fail("lora.targets", self.targets, f"one of {sorted(lora_target_sets())} or a list of module names")
        elif not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            _fail("lora.targets", self.targets, "a non-empty list of module names such as ['q_proj', 'v_proj']")
        return resolve_targets(self.targets)


@dataclass
class DataConfig:
    """Where the training data comes from and how it is split."""

    path: str = str(DATA_DIR / "sample_chat.jsonl")  # jsonl/json/csv/parquet file or a datasets name
    format: Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text"] = "auto"
    split: str = "train"  # split to read when `path` is a datasets name
    eval_fraction: float = 0.1  # share of examples held out for evaluation (0 = none)
    max_examples: int = 0  # use only the first N examples after shuffling (0 = all)
    skip_invalid: bool = False  # skip bad records (counted, first reasons shown) instead of failing
    system_prompt: str = ""  # added as a system message to conversations that have none
    seed: int = 42  # seed of the train/eval split
    num_proc: int = -1  # processes that prepare the data (-1: the cores available; 0 or 1: in this process)
    # tool call ids: keep (refuse ids that are not 9 letters/digits, as Mistral's format needs) or
    # regenerate (new 9-character ids, the same in a call and its result: data written for other models)
    tool_call_ids: Literal["keep", "regenerate"] = "keep"

    def __post_init__(self) -> None:
        # presets name the shipped sample sets as data/<file>: found from any working directory (and from
        # a pip install, which has no checkout), unless the working directory has such a file itself
        shipped = DATA_DIR / self.path.removeprefix("data/")
        if self.path.startswith("data/") and not Path(self.path).exists() and shipped.is_file():
            self.path = str(shipped)
        if self.tool_call_ids not in ("keep", "regenerate"):
            _fail("data.tool_call_ids", self.tool_call_ids, "one of 'keep', 'regenerate'")
        if not 0 <= self.eval_fraction < 1:
            _fail("data.eval_fraction", self.eval_fraction, "must be in [0, 1)")
        _positive("data.max_examples", self.max_examples, zero_ok=True)
        if self.num_proc < -1:
            _fail("data.num_proc", self.num_proc, "must be -1 (the cores available), 0/1 (in process) or a count")


@dataclass
class TrainConfig:
    """The training loop (TRL SFTTrainer) with the classic QLoRA defaults."""

    output_dir: str = "runs/default"  # run directory: adapter, checkpoints, metrics, manifest
    epochs: float = 3.0  # passes over the training split
    max_steps: int = -1  # stop after N optimiser steps (-1 = run all epochs)
    learning_rate: float = 2e-4  # the QLoRA paper's rate for adapters
    per_device_batch_size: int = 4  # examples per forward pass per device
    gradient_accumulation_steps: int = 4  # effective batch = batch x accumulation x devices
    warmup_ratio: float = 0.03  # share of steps with linearly rising learning rate
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    weight_decay: float = 0.0  # AdamW weight decay on the adapters
    max_grad_norm: float = 0.3  # gradient clipping, as in the QLoRA paper
    optimizer: str = "auto"  # auto: paged_adamw_8bit on CUDA, adamw_torch on CPU
    logging_steps: int = 10  # log train loss every N steps
    eval_steps: int = 50  # evaluate every N steps (needs an eval split)
    save_steps: int = 50  # write a checkpoint every N steps
    save_total_limit: int = 3  # keep at most N checkpoints (the best one is always kept)
    load_best_model_at_end: bool = True  # reload the checkpoint with the lowest eval loss
    packing: bool = False  # pack short examples into full sequences (faster on short data)
    assistant_only_loss: bool = True  # loss on assistant tokens (and their </s>) only; false: on every token
    gradient_checkpointing: bool = True  # trade compute for memory (Unsloth's mode on unsloth)
    seed: int = 42  # seed of model init, dropout and data order
    resume: bool = False  # continue from the last complete checkpoint in output_dir
    method: Literal["sft", "dpo", "orpo", "grpo"] = "sft"  # sft: answers; dpo/orpo: preference pairs; grpo: rewards
    beta: float = 0.1  # dpo/grpo: KL weight to the reference (grpo 0: no reference); orpo: odds-ratio weight
    loss_type: str = "sigmoid"  # dpo: sigmoid (the DPO paper), ipo, hinge, robust, …; orpo: sigmoid only
    max_prompt_length: int = 1024  # dpo/orpo: longest prompt in tokens; longer pairs are refused (or skipped)
    max_answer_length: int = 1024  # dpo/orpo: answers (chosen, rejected) longer than this are cut (</s> lost)
    num_generations: int = 8  # grpo: completions sampled per prompt (the group whose rewards are compared)
    temperature: float = 1.0  # grpo: sampling temperature of the group's completions
    max_completion_length: int = 256  # grpo: longest completion in tokens (</s> included); longer ones are cut
    rewards: list[str] = field(default_factory=list)  # grpo: built-in names (numeric_answer, …) or module:function
    reward_weights: list[float] = field(default_factory=list)  # grpo: one weight per reward (empty: all 1.0)
    reward_tolerance: float = 1e-6  # grpo numeric_answer: relative tolerance of the number
    reward_pattern: str = r"-?\d+(\.\d+)?"  # grpo regex_format: the regular expression a completion must match
    sft_warmup_steps: int = 0  # grpo: first N SFT steps on the reference column (no reward, nothing to learn)
    sft_warmup_learning_rate: float = 2e-4  # grpo: the warm-up's SFT learning rate (batches of 8 prompts)
    sft_warmup_column: str = "answer"  # grpo: the column holding the reference answer the SFT warm-up trains on
    router_aux_loss: bool = True  # Mixtral: add the router's load-balancing loss (logged as aux_loss)
    router_aux_loss_coef: float | None = None  # its weight; None: the model's config.json (0.02 for 8x7B)
    # where metrics go: tensorboard (run_dir/tensorboard), mlflow, wandb, trackio (optional extra `tracking`), none
    report_to: list[str] | str = field(default_factory=lambda: ["tensorboard"])
    experiment: str = ""  # MLflow experiment / W&B and Trackio project; "": MLFLOW_EXPERIMENT_NAME, WANDB_PROJECT, …
    run_name: str = ""  # the run's name in the trackers; "": the run directory's name

    def __post_init__(self) -> None:
        _positive("train.learning_rate", self.learning_rate)
        _positive("train.beta", self.beta, zero_ok=self.method not in ("dpo", "orpo"))  # grpo: 0 = reference-free
        if self.method == "grpo":
            self._check_grpo()
        allowed = PREFERENCE_LOSS_TYPES.get(self.method, ("sigmoid",))
        if self.loss_type not in allowed:
            _fail("train.loss_type", self.loss_type, f"one of {list(allowed)} with train.method={self.method}")
        for name in ("max_prompt_length", "max_answer_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 4:
                _fail(f"train.{name}", value, "an integer >= 4 (tokens)")
        _positive("train.epochs", self.epochs)
        for name in (
            "per_device_batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
            "eval_steps",
            "save_steps",
            "save_total_limit",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                _fail(f"train.{name}", value, "a positive integer")
        if self.load_best_model_at_end and self.save_steps % self.eval_steps:
            # the Trainer can only reload the best model if every evaluation step is also a save step
            _fail(
                "train.save_steps",
                self.save_steps,
                f"a multiple of train.eval_steps={self.eval_steps} when train.load_best_model_at_end is true",
            )
        if self.max_steps == 0 or self.max_steps < -1:
            _fail("train.max_steps", self.max_steps, "-1 (all epochs) or a positive integer")
        if not 0 <= self.warmup_ratio < 1:
            _fail("train.warmup_ratio", self.warmup_ratio, "must be in [0, 1)")
        _positive("train.weight_decay", self.weight_decay, zero_ok=True)
        _positive("train.max_grad_norm", self.max_grad_norm, zero_ok=True)
        if self.router_aux_loss_coef is not None:
            _positive("train.router_aux_loss_coef", self.router_aux_loss_coef, zero_ok=True)
        self.report_to = _trackers(self.report_to)

    def _check_grpo(self) -> None:
        """GRPO's own fields: a completion budget, a group, rewards, and a batch made of whole groups."""
        from mistral_fast.rewards import check_regex

        budget = self.max_completion_length
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            _fail("train.max_completion_length", budget, "an empty completion budget: give at least 1 token (e.g. 64)")
        if isinstance(self.num_generations, bool) or self.num_generations < 2:
            _fail("train.num_generations", self.num_generations, "an integer >= 2 (a group to compare)")
        _positive("train.temperature", self.temperature)
        if not self.rewards:
            _fail("train.rewards", self.rewards, "give at least one reward, e.g. [numeric_answer] or [mymodule:fn]")
        if self.reward_weights and len(self.reward_weights) != len(self.rewards):
            _fail("train.reward_weights", self.reward_weights, f"one weight per reward ({len(self.rewards)}) or []")
        completions = self.per_device_batch_size * self.gradient_accumulation_steps
        if completions % self.num_generations:
            _fail(
                "train.per_device_batch_size",
                self.per_device_batch_size,
                f"with grpo, per_device_batch_size x gradient_accumulation_steps ({completions} completions) must be "
                f"a multiple of train.num_generations={self.num_generations}",
            )
        _positive("train.sft_warmup_steps", self.sft_warmup_steps, zero_ok=True)
        check_regex(self.reward_pattern)


def _trackers(value: list[str] | str) -> list[str]:
    """``train.report_to`` as a list: ``"mlflow"`` and ``"mlflow,wandb"`` (what ``--set`` gives) are accepted.

    ``none`` (or an empty list) becomes ``[]``: no tracker, not even TensorBoard.

    Raises:
        ConfigError: an unknown tracker, or ``none`` together with another one.
    """
    names = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)
    unknown = [n for n in names if n not in REPORT_TO]
    if unknown:
        _fail("train.report_to", value, f"a list of {list(REPORT_TO)} (e.g. [tensorboard, mlflow])")
    if "none" in names and len(names) > 1:
        _fail("train.report_to", value, "`none` alone, or a list of trackers without it")
    return [] if names == ["none"] else list(dict.fromkeys(names))


@dataclass
class EvalConfig:
    """What to measure after training."""

    max_new_tokens: int = 128  # generation length for ROUGE/BLEU and samples
    num_samples: int = 8  # held-out prompts to generate answers for
    temperature: float = 0.0  # 0 = greedy decoding

    def __post_init__(self) -> None:
        _positive("eval.max_new_tokens", self.max_new_tokens)
        _positive("eval.num_samples", self.num_samples, zero_ok=True)
        _positive("eval.temperature", self.temperature, zero_ok=True)


@dataclass
class ExportConfig:
    """What artefacts to write after training."""

    adapter: bool = True  # the peft LoRA adapter (always small)
    merged: bool = False  # merged 16-bit safetensors for transformers and vLLM
    merge_base: Literal["dequantized", "original"] = "dequantized"  # base weights the LoRA is added to
    gguf: list[str] = field(default_factory=list)  # GGUF types: f16, bf16, q8_0, q4_k_m, …
    gguf_adapter: str | None = None  # LoRA adapter as a llama.cpp GGUF (f16, f32, bf16, q8_0) + base GGUF + Modelfile
    original_checkpoint: str | None = None  # 16-bit checkpoint for merge_base original on a *-bnb-4bit base

    def __post_init__(self) -> None:
        allowed = {*GGUF_TYPES, *KQUANT_TYPES}
        for kind in self.gguf:
            if kind not in allowed:
                _fail("export.gguf", self.gguf, f"each of {sorted(allowed)}")
        if self.gguf_adapter is not None and self.gguf_adapter not in ("f32", "f16", "bf16", "q8_0"):
            _fail("export.gguf_adapter", self.gguf_adapter, "one of f32, f16, bf16, q8_0 (or null for none)")


@dataclass
class RunConfig:
    """A whole run: model, LoRA, data, training, evaluation and export."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON ready)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> RunConfig:
        """Build from a nested dict, refusing unknown keys and coercing YAML scalars to field types."""
        return _build(cls, data, prefix="", source=source)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the resolved config as YAML, atomically (temp file + rename)."""
        return write_text_atomic(path, yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True))

    def with_overrides(self, overrides: list[str] | dict[str, Any]) -> RunConfig:
        """A copy with `section.field=value` overrides applied (values parsed as YAML scalars)."""
        data = self.to_dict()
        items = overrides.items() if isinstance(overrides, dict) else (_split_override(o) for o in overrides)
        for key, value in items:
            section, _, name = key.partition(".")
            if not name or section not in data:
                raise ConfigError(
                    f"override {key!r}: use section.field with section one of {sorted(data)} (e.g. lora.rank=32)"
                )
            if name not in data[section]:
                raise ConfigError(f"override {key!r}: unknown field; {section} has {sorted(data[section])}")
            data[section][name] = value
        return RunConfig.from_dict(data, source="overrides")


def _split_override(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not key=value (e.g. lora.rank=32)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _coerce(name: str, hint: Any, value: Any) -> Any:
    """Check `value` against a field's type hint, converting the harmless YAML cases (int -> float)."""
    origin = get_origin(hint)
    if origin is Literal:
        if value not in get_args(hint):
            _fail(name, value, f"one of {list(get_args(hint))}")
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for option in get_args(hint):
            try:
                return _coerce(name, option, value)
            except ConfigError:
                continue
        _fail(name, value, f"expected {hint}")
    if origin is list:
        (item,) = get_args(hint)
        if not isinstance(value, list):
            _fail(name, value, f"expected a list of {item.__name__}")
        return [_coerce(f"{name}[{i}]", item, v) for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # PyYAML reads "2e-4" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        _fail(name, value, f"expected {hint.__name__}, got {type(value).__name__}")
    return value


def _build(cls: type, data: Any, *, prefix: str, source: str) -> Any:
    where = prefix.rstrip(".") or "top level"
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {where} must be a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown} at {where}; known keys are {sorted(known)}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, prefix=f"{prefix}{key}.", source=source)
        else:
            try:
                kwargs[key] = _coerce(f"{prefix}{key}", hint, value)
            except ConfigError as err:  # name the file too, not only the field
                raise ConfigError(f"{source}: {err}") from None
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def load_config(
    path: str | os.PathLike[str] | None = None, overrides: list[str] | dict[str, Any] | None = None
) -> RunConfig:
    """Load a run config from YAML (a path, or a preset name from `configs/`) and apply overrides.

    Args:
        path: a YAML file, or the name of a preset such as ``"smoke"``; None for the defaults.
        overrides: ``["lora.rank=32", …]`` or ``{"lora.rank": 32}``.

    Raises:
        ConfigError: the file is missing or is not valid YAML, or a key or value is invalid.
    """
    cfg = RunConfig()
    if path is not None:
        file = Path(path)
        if not file.exists() and (CONFIGS_DIR / f"{path}.yaml").exists():
            file = CONFIGS_DIR / f"{path}.yaml"
        if not file.is_file():
            presets = sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))
            raise ConfigError(f"config {str(path)!r} not found: give a YAML file or a preset, one of {presets}")
        try:
            data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            raise ConfigError(
                f"{file}{line}: not valid YAML ({getattr(err, 'problem', err)}) — fix the syntax"
            ) from None
        cfg = RunConfig.from_dict(data, source=str(file))
    return cfg.with_overrides(overrides) if overrides else cfg


def list_presets() -> list[str]:
    """Names of the preset configs shipped in `configs/`."""
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))


def check_field(dotted: str, value: Any) -> Any:
    """Check one value against the type of a `RunConfig` field (``"lora.rank"``) and return it coerced.

    Only the type is checked (range and cross-field checks need the whole config); used to refuse a
    wrong notebook parameter before a kernel starts.

    Raises:
        ConfigError: unknown field, or a value of the wrong type, naming the field and what it expects.
    """
    section, _, name = dotted.partition(".")
    sections = get_type_hints(RunConfig)
    if section not in sections or name not in {f.name for f in fields(sections[section])}:
        raise ConfigError(f"{dotted!r} is not a config field (use section.field, e.g. lora.rank)")
    return _coerce(dotted, get_type_hints(sections[section])[name], value)
