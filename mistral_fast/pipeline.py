"""The one pipeline: config → data → tokenizer → model → train → evaluate → export.

Every entry point (notebook, CLI, papermill sweep, Python) calls into here; this is the only module
that composes the stages, and it reads top to bottom like a recipe.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mistral_fast.atomic import write_text_atomic
from mistral_fast.config import RunConfig
from mistral_fast.dataset import prepare_data
from mistral_fast.tracking import check_trackers, finish_run

log = logging.getLogger("mistral_fast")


@dataclass
class RunResult:
    """Everything a run produced: where, and the figures (also written to ``result.json``)."""

    run_dir: str
    data: dict[str, Any]
    train: dict[str, Any]
    evaluation: dict[str, Any] | None = None  # loss/perplexity, ROUGE-L/BLEU, base vs tuned (eval.json)

    def summary(self) -> str:
        """A short human summary for the CLI and notebooks."""
        t = self.train
        lines = [
            f"run directory: {self.run_dir}",
            f"backend: {t['backend']}, {t['steps']} steps in {t['train_seconds']} s",
        ]
        if t["first_logged_loss"] is not None:
            lines.append(f"train loss: {t['first_logged_loss']:.4f} -> {t['train_loss']:.4f}")
        if t["eval_loss"] is not None:
            ppl = f" (perplexity {t['perplexity']:.2f})" if t["perplexity"] is not None else ""
            lines.append(f"eval loss: {t['eval_loss']:.4f}{ppl}")
        lines.append(f"adapter: {t['adapter_dir']}")
        e = self.evaluation
        if e and "grpo" in e:  # a grpo run
            g = e["grpo"]
            lines.append(
                f"held-out mean reward: {g['reward_before']:.3f} -> {g['reward_after']:.3f} ({e['prompts']} prompts)"
            )
        if e and "tuned" in e:  # a preference run (dpo/orpo)
            b, tuned = e["base"], e["tuned"]
            lines.append(
                f"held-out preference accuracy: base {b['accuracy']:.2f} -> tuned {tuned['accuracy']:.2f} "
                f"(mean margin {b['mean_margin']:.2f} -> {tuned['mean_margin']:.2f} nats, {tuned['pairs']} pairs)"
            )
        if e and e.get("rouge_l") is not None:
            lines.append(
                f"held-out answers: ROUGE-L {e['rouge_l']:.3f}, BLEU {e['bleu']:.2f}, exact {e['exact_match']:.2f}"
            )
        return "\n".join(lines)


def _token_ids(data: Any) -> set[int]:
    """Every token id in the prepared train and eval splits.

    Read in batches from the Arrow-backed splits: the set grows to the vocabulary at most, never with the data.
    """
    ids: set[int] = set()
    for split in (data.train, data.eval):
        if split is not None:
            for batch in split.iter(batch_size=4096):
                for row in batch["input_ids"]:
                    ids.update(row)
    return ids


def make_run_dir(run_dir: Path) -> Path:
    """Create the run directory, refusing a path that is (or lies under) a file, with the field to change.

    Raises:
        ConfigError: naming ``train.output_dir`` and what is in the way.
    """
    from mistral_fast.errors import ConfigError

    blocker = next((p for p in (run_dir, *run_dir.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ConfigError(
            f"train.output_dir={str(run_dir)!r}: {blocker} is a file, not a directory — "
            "choose another train.output_dir or move the file away"
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except PermissionError as err:
        raise ConfigError(
            f"train.output_dir={str(run_dir)!r}: cannot create it ({err.strerror}) — choose a writable directory"
        ) from None
    return run_dir


def run(cfg: RunConfig, *, rewards: Any = None) -> RunResult:
    """Run the whole pipeline for a config: data → model → train → evaluate → export; write the run directory.

    This is the recipe every entry point follows; read it top to bottom. ``train.method: dpo | orpo``
    follows the preference recipe (`run_preference`), ``grpo`` the reward recipe (`run_grpo`, where
    `rewards` — callables by name from a notebook — replace ``train.rewards``).
    """
    import json

    if cfg.train.method == "grpo":
        return run_grpo(cfg, rewards=rewards)
    if cfg.train.method != "sft":
        return run_preference(cfg)

    from mistral_fast.distributed import is_main_process
    from mistral_fast.memory import preflight
    from mistral_fast.modeling import load_model, resolve_backend, validate_model_request
    from mistral_fast.modeling.embeddings import check_untrained_tokens

    resolve_backend(cfg.model.backend)  # first: unsloth must be imported before transformers
    validate_model_request(cfg)  # path, architecture, LoRA targets: fails in a second, no weights loaded
    check_trackers(cfg)  # train.report_to: each tracker installed
    estimate = preflight(cfg)  # on a GPU: a run that will not fit stops here, with the numbers and a fix
    log.info("memory estimate: %.1f GiB per device (%s)", estimate.total / 2**30, estimate.device or "no device")
    run_dir = Path(cfg.train.output_dir)
    main = is_main_process()  # under torchrun/accelerate every rank runs this; only rank 0 writes
    data = prepare_data(cfg)  # bad records fail here, in seconds, before gigabytes of weights load
    if main:  # after every input check: a refused run leaves nothing at train.output_dir
        make_run_dir(run_dir)
        cfg.save(run_dir / "run_config.yaml")

    loaded = load_model(cfg)
    # Nemo base's control-token rows are untrained: stop before training on zeros (modeling/embeddings.py)
    check_untrained_tokens(loaded.model, _token_ids(data), loaded.tokenizer)

    from mistral_fast.train import train  # after load_model: imports TRL, which unsloth patches

    trained = train(cfg, loaded, data)

    from mistral_fast.evaluate import evaluate_model, save_eval

    result = RunResult(run_dir=str(run_dir), data=data.stats, train=trained.to_dict())
    if not main:  # the other ranks' work ends with training; rank 0 evaluates and writes
        return result
    from mistral_fast.families import tokenizer_version

    version = tokenizer_version(cfg.model)  # the [TOOL_CALLS] format generated calls are parsed in
    evaluation = evaluate_model(loaded, data.eval, data.eval_examples, cfg.eval, seed=cfg.train.seed, version=version)
    save_eval(evaluation, run_dir)
    result.evaluation = evaluation.to_dict()
    write_text_atomic(run_dir / "result.json", json.dumps(asdict(result), indent=2))
    from mistral_fast.manifest import write_manifest

    write_manifest(cfg, run_dir)  # the sha256 of every file above (`mistral-fast verify RUN_DIR`)
    from mistral_fast.export import export_run

    export_run(cfg)  # last: what cfg.export asks for (merged, GGUF) into export/, added to the manifest
    finish_run(run_dir)  # train.report_to: eval.json and the manifest to MLflow / W&B / Trackio, runs closed
    return result


def start_adapter(cfg: RunConfig, model: Any) -> str | None:
    """Put ``model.adapter``'s LoRA weights (a finished run or adapter directory) onto `model`'s fresh adapter.

    The new run must have the same base model and LoRA shape (rank, alpha, targets) as the one it starts from.

    Raises:
        ConfigError: naming ``model.adapter`` and the field that differs, with the value to set.
    """
    from mistral_fast.errors import ConfigError
    from mistral_fast.rundir import RunDir

    if not cfg.model.adapter:
        return None
    source = RunDir.open(cfg.model.adapter)
    if not source.adapter_weights.is_file():
        raise ConfigError(
            f"model.adapter={cfg.model.adapter!r}: no {source.adapter_weights} — give a finished run directory "
            "(or its adapter/ directory)"
        )
    theirs = source.adapter_config
    checks = {
        "model.name_or_path": (source.config.model.name_or_path, cfg.model.name_or_path),
        "lora.rank": (theirs.get("r"), cfg.lora.rank),
        "lora.alpha": (theirs.get("lora_alpha"), cfg.lora.alpha),
        "lora.targets": (sorted(theirs.get("target_modules") or []), sorted(cfg.lora.target_modules)),
    }
    for name, (expected, got) in checks.items():
        if expected != got:
            raise ConfigError(
                f"model.adapter={cfg.model.adapter!r} was trained with {name}={expected!r}, this run has "
                f"{name}={got!r} — set {name} to match, or start from the base (model.adapter='')"
            )
    source.apply_adapter(model, what=f"this run's model ({cfg.model.name_or_path})")
    return str(source.adapter_dir)


def run_preference(cfg: RunConfig) -> RunResult:
    """The preference recipe (``train.method: dpo | orpo``): pairs → model (+ start adapter) → train → eval.

    Evaluation is held-out preference accuracy: how often the policy gives the chosen answer a higher
    summed log-probability than the rejected one, and the mean margin, for the tuned model and the base.
    """
    import json

    from mistral_fast.distributed import is_main_process
    from mistral_fast.memory import preflight
    from mistral_fast.modeling import load_model, resolve_backend, validate_model_request
    from mistral_fast.preference import evaluate_preferences, preference_accuracy, prepare_preferences

    resolve_backend(cfg.model.backend)  # first: unsloth must be imported before transformers
    validate_model_request(cfg)
    check_trackers(cfg)
    preflight(cfg)
    run_dir = Path(cfg.train.output_dir)
    main = is_main_process()  # as in `run`: under torchrun every rank trains, only rank 0 writes
    data = prepare_preferences(cfg)  # bad pairs fail here, with file:line, before any weights load
    if main:
        make_run_dir(run_dir)
        cfg.save(run_dir / "run_config.yaml")

    loaded = load_model(cfg)
    started_from = start_adapter(cfg, loaded.model)
    rows = data.eval if data.eval is not None else data.train
    pad = loaded.tokenizer.pad_token_id
    # the start adapter before any update (from the base, the start is the base: measured once, after training)
    before = preference_accuracy(loaded.model, rows, pad_token_id=pad) if started_from else None

    from mistral_fast.train_preference import train_preference  # after load_model: imports TRL

    trained = train_preference(cfg, loaded, data)
    if not main:
        return RunResult(run_dir=str(run_dir), data=data.stats, train=trained.to_dict())
    after = evaluate_preferences(loaded.model, rows, pad_token_id=pad)
    evaluation = {
        "split": "eval" if data.eval is not None else "train (no eval split)",
        "base": after["base"],
        "start": before or after["base"],
        "tuned": after["tuned"],
        "started_from": started_from,
    }
    write_text_atomic(run_dir / "eval.json", json.dumps(evaluation, indent=2))
    result = RunResult(run_dir=str(run_dir), data=data.stats, train=trained.to_dict(), evaluation=evaluation)
    write_text_atomic(run_dir / "result.json", json.dumps(asdict(result), indent=2))
    from mistral_fast.manifest import write_manifest

    write_manifest(cfg, run_dir)
    finish_run(run_dir)
    return result


def _resolve_rewards(cfg: RunConfig, callables: Any) -> list[Any]:
    """The run's rewards: notebook callables when given, else ``train.rewards`` (module:function imported now)."""
    from mistral_fast.rewards import resolve_rewards, rewards_from_callables

    if callables:
        return rewards_from_callables(callables)
    t = cfg.train
    return resolve_rewards(t.rewards, tolerance=t.reward_tolerance, pattern=t.reward_pattern)


def sft_warmup(cfg: RunConfig, data: Any, run_dir: Path) -> RunConfig:
    """``train.sft_warmup_steps`` SFT steps on the train prompts answered by their ``train.sft_warmup_column``.

    A model that never earns a reward has nothing to learn from (every group's advantages are zero): the
    warm-up teaches the answer's form first. It is an ordinary SFT run in ``<run>/sft_warmup`` (the SFT
    recipe, same LoRA shape), and GRPO starts from its adapter. Held-out prompts are never trained on.

    Returns:
        The GRPO config with ``model.adapter`` set to the warm-up run.
    """
    from mistral_fast.data import write_jsonl
    from mistral_fast.errors import DataError

    t, column = cfg.train, cfg.train.sft_warmup_column
    missing = next((p for p in data.train_prompts if column not in p.columns), None)
    if missing is not None:
        raise DataError(
            f"{missing.where}: train.sft_warmup_steps={t.sft_warmup_steps} trains on column {column!r}, which the "
            "record lacks — add it, set train.sft_warmup_column, or set train.sft_warmup_steps=0"
        )
    warm_dir = run_dir / "sft_warmup"
    answer = [{"role": "assistant", "content": str(p.columns[column])} for p in data.train_prompts]
    rows = [{"messages": [*p.messages, a]} for p, a in zip(data.train_prompts, answer, strict=True)]
    path = write_jsonl(rows, warm_dir / "warmup_data.jsonl")
    warm = cfg.with_overrides(
        {
            "train.method": "sft",
            "train.max_steps": t.sft_warmup_steps,
            "train.learning_rate": t.sft_warmup_learning_rate,
            "train.per_device_batch_size": 8,  # SFT examples, not GRPO completions
            "train.gradient_accumulation_steps": 1,
            "train.output_dir": str(warm_dir),
            "train.resume": False,
            "train.load_best_model_at_end": False,
            "data.path": str(path),
            "data.eval_fraction": 0.0,
            "data.max_examples": 0,
            "model.adapter": "",
            "eval.num_samples": 0,
            "export.merged": False,
            "export.gguf": [],
            "export.gguf_adapter": None,
        }
    )
    run(warm)
    return cfg.with_overrides({"model.adapter": str(warm_dir)})


def run_grpo(cfg: RunConfig, *, rewards: Any = None) -> RunResult:
    """The reward recipe (``train.method: grpo``): prompts → (SFT warm-up) → model (+ start adapter) → GRPO → eval.

    Rewards, data and model are checked before anything is written: a reward module that does not import,
    a prompt without a column its reward needs, or no room for a completion stop the run with one line.
    Evaluation is the mean reward of greedy answers on the held-out prompts, at the start of GRPO (the base,
    the start adapter or the warm-up's) and after it: ``eval.json`` holds ``"grpo": {"reward_before": x,
    "reward_after": y}`` with each reward's mean and a few answers before and after.
    """
    import json

    from mistral_fast.distributed import is_main_process
    from mistral_fast.grpo import mean_rewards, prepare_prompts
    from mistral_fast.memory import preflight
    from mistral_fast.modeling import load_model, resolve_backend, validate_model_request

    resolve_backend(cfg.model.backend)  # first: unsloth must be imported before transformers
    reward_list = _resolve_rewards(cfg, rewards)  # a module that does not import fails here, nothing written
    if rewards:  # the run's config records the notebook's rewards by name
        cfg = cfg.with_overrides({"train.rewards": [f"notebook:{r.name}" for r in reward_list]})
    validate_model_request(cfg)
    check_trackers(cfg)
    preflight(cfg)
    run_dir = Path(cfg.train.output_dir)
    main = is_main_process()
    data = prepare_prompts(cfg, reward_list)  # bad prompts fail here, with file:line, before any weights load
    if main:
        make_run_dir(run_dir)
        cfg.save(run_dir / "run_config.yaml")
    if cfg.train.sft_warmup_steps:
        cfg = sft_warmup(cfg, data, run_dir)

    loaded = load_model(cfg)
    started_from = start_adapter(cfg, loaded.model)
    prompts = data.eval_prompts or data.train_prompts
    measure = {"weights": list(cfg.train.reward_weights), "max_new_tokens": cfg.train.max_completion_length}
    before = mean_rewards(loaded.model, loaded.tokenizer, prompts, reward_list, **measure)

    from mistral_fast.train_grpo import train_grpo  # after load_model: imports TRL, which unsloth patches

    trained = train_grpo(cfg, loaded, data, reward_list)
    if not main:
        return RunResult(run_dir=str(run_dir), data=data.stats, train=trained.to_dict())
    after = mean_rewards(loaded.model, loaded.tokenizer, prompts, reward_list, **measure)
    shown = min(len(prompts), max(cfg.eval.num_samples, 1))
    evaluation = {
        "split": "eval" if data.eval_prompts else "train (no eval split)",
        "prompts": len(prompts),
        "started_from": started_from,
        "grpo": {
            "reward_before": before["means"]["total"],
            "reward_after": after["means"]["total"],
            "rewards_before": before["means"],
            "rewards_after": after["means"],
        },
        "samples": [
            {"prompt": p.question, "columns": p.columns, "before": b, "after": a}
            for p, b, a in zip(prompts[:shown], before["completions"], after["completions"], strict=False)
        ],
    }
    write_text_atomic(run_dir / "eval.json", json.dumps(evaluation, indent=2, default=str))
    result = RunResult(run_dir=str(run_dir), data=data.stats, train=trained.to_dict(), evaluation=evaluation)
    write_text_atomic(run_dir / "result.json", json.dumps(asdict(result), indent=2, default=str))
    from mistral_fast.manifest import write_manifest

    write_manifest(cfg, run_dir)
    finish_run(run_dir)
    return result
