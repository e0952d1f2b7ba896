"""The one pipeline: config → data → tokenizer → model → train → evaluate → export.

Every entry point (notebook, CLI, papermill sweep, Python) calls into here; this is the only module
that composes the stages, and it reads top to bottom like a recipe.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mistral_fast.atomic import write_text_atomic
from mistral_fast.config import RunConfig
from mistral_fast.data import Example, load_messages, split_examples
from mistral_fast.errors import DataError, TokenizerError

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger("mistral_fast")


@dataclass
class PreparedData:
    """Tokenised train/eval splits plus the conversations they came from and what was dropped."""

    train: Dataset
    eval: Dataset | None
    train_examples: list[Example]
    eval_examples: list[Example]
    format: str
    stats: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        """A few lines for the notebook and the CLI."""
        s = self.stats
        lines = [
            f"format {self.format}: {s['train_examples']} train / {s['eval_examples']} eval examples",
            f"tokens: {s['train_tokens']} in train, {s['trained_tokens']} of them trained "
            f"({100 * s['trained_tokens'] / max(s['train_tokens'], 1):.1f}%), longest {s['max_length']}",
        ]
        if s["truncated"]:
            lines.append(f"{s['truncated']} examples truncated to model.max_seq_length")
        if s["skipped"]:
            lines.append(f"{s['skipped']} records skipped: " + "; ".join(s["skip_reasons"]))
        return "\n".join(lines)


def tokenizer_for(cfg: RunConfig) -> PreTrainedTokenizerBase:
    """The tokenizer a run uses: the exact built-in v3/v1 one, or the model's own (checked) one."""
    from mistral_fast.tokenizer import load_tokenizer

    if cfg.model.tokenizer == "model" and cfg.model.name_or_path != "tiny":
        return load_tokenizer(path=cfg.model.name_or_path)
    return load_tokenizer("v3" if cfg.model.tokenizer == "model" else cfg.model.tokenizer)


def prepare_data(cfg: RunConfig, tokenizer: PreTrainedTokenizerBase | None = None, source: Any = None) -> PreparedData:
    """Load, validate, split and tokenise the data of a run (the data-preparation entry point).

    Args:
        cfg: the run config (``data`` section, ``model.max_seq_length``, ``model.tokenizer``).
        tokenizer: a tokenizer with the chat template; the exact Mistral one for ``cfg.model.tokenizer``
            if None.
        source: overrides ``cfg.data.path`` (a path, a `datasets` name or a `datasets.Dataset`).

    Raises:
        DataError: a bad record (``file:line: what — what to do``) or an example with no trained token
            left after truncation, unless ``data.skip_invalid`` is set.
    """
    from datasets import Dataset

    from mistral_fast.tokenizer import tokenize_example

    loaded = load_messages(cfg.data, source)
    if tokenizer is None:
        tokenizer = tokenizer_for(cfg)
    examples = loaded.examples
    if cfg.data.max_examples:
        examples = split_examples(examples, 0.0, cfg.data.seed)[0][: cfg.data.max_examples]
    rows: list[dict[str, list[int]]] = []
    kept: list[Example] = []
    skipped, reasons, truncated = loaded.skipped, list(loaded.reasons), 0
    for example in examples:
        try:
            encoded = tokenize_example(tokenizer, example, cfg.model.max_seq_length)
        except TokenizerError as err:
            raise DataError(f"{example.where}: {err}") from None
        if encoded.trained_tokens == 0:
            reason = (
                f"{example.where}: no trained token left after truncation to "
                f"model.max_seq_length={cfg.model.max_seq_length} — raise it or shorten the example"
            )
            if not cfg.data.skip_invalid:
                raise DataError(reason + " (or set data.skip_invalid=true to skip it)")
            skipped += 1
            reasons = [*reasons, reason][:5]
            continue
        truncated += encoded.truncated
        rows.append({"input_ids": encoded.input_ids, "labels": encoded.labels})
        kept.append(example)
    if not rows:
        raise DataError(f"data.path={cfg.data.path!r}: no example left to train on; first reasons: {reasons}")
    order = list(range(len(rows)))
    train_ids, eval_ids = split_examples(order, cfg.data.eval_fraction, cfg.data.seed)
    train = Dataset.from_list([rows[i] for i in train_ids])
    evaluation = Dataset.from_list([rows[i] for i in eval_ids]) if eval_ids else None
    stats = {
        "train_examples": len(train_ids),
        "eval_examples": len(eval_ids),
        "skipped": skipped,
        "skip_reasons": reasons,
        "truncated": truncated,
        "train_tokens": sum(len(rows[i]["input_ids"]) for i in train_ids),
        "trained_tokens": sum(sum(t != -100 for t in rows[i]["labels"]) for i in train_ids),
        "max_length": max(len(r["input_ids"]) for r in rows),
    }
    prepared = PreparedData(
        train, evaluation, [kept[i] for i in train_ids], [kept[i] for i in eval_ids], loaded.format, stats
    )
    log.info("data: %s", prepared.summary().replace("\n", "; "))
    return prepared


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
            lines.append(f"eval loss: {t['eval_loss']:.4f} (perplexity {t['perplexity']:.2f})")
        lines.append(f"adapter: {t['adapter_dir']}")
        e = self.evaluation
        if e and e.get("rouge_l") is not None:
            lines.append(
                f"held-out answers: ROUGE-L {e['rouge_l']:.3f}, BLEU {e['bleu']:.2f}, exact {e['exact_match']:.2f}"
            )
        return "\n".join(lines)


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


def run(cfg: RunConfig) -> RunResult:
    """Run the whole pipeline for a config: data → model → train → evaluate → export; write the run directory.

    This is the recipe every entry point follows; read it top to bottom.
    """
    import json

    from mistral_fast.distributed import is_main_process
    from mistral_fast.memory import preflight
    from mistral_fast.modeling import load_model, resolve_backend, validate_model_request

    resolve_backend(cfg.model.backend)  # first: unsloth must be imported before transformers
    validate_model_request(cfg)  # path, architecture, LoRA targets: fails in a second, no weights loaded
    estimate = preflight(cfg)  # on a GPU: a run that will not fit stops here, with the numbers and a fix
    log.info("memory estimate: %.1f GiB per device (%s)", estimate.total / 2**30, estimate.device or "no device")
    run_dir = Path(cfg.train.output_dir)
    main = is_main_process()  # under torchrun/accelerate every rank runs this; only rank 0 writes
    data = prepare_data(cfg)  # bad records fail here, in seconds, before gigabytes of weights load
    if main:  # after every input check: a refused run leaves nothing at train.output_dir
        make_run_dir(run_dir)
        cfg.save(run_dir / "run_config.yaml")

    loaded = load_model(cfg)

    from mistral_fast.train import train  # after load_model: imports TRL, which unsloth patches

    trained = train(cfg, loaded, data)

    from mistral_fast.evaluate import evaluate_model, save_eval

    result = RunResult(run_dir=str(run_dir), data=data.stats, train=trained.to_dict())
    if not main:  # the other ranks' work ends with training; rank 0 evaluates and writes
        return result
    evaluation = evaluate_model(loaded, data.eval, data.eval_examples, cfg.eval, seed=cfg.train.seed)
    save_eval(evaluation, run_dir)
    result.evaluation = evaluation.to_dict()
    write_text_atomic(run_dir / "result.json", json.dumps(asdict(result), indent=2))
    from mistral_fast.manifest import write_manifest

    write_manifest(cfg, run_dir)  # the sha256 of every file above (`mistral-fast verify RUN_DIR`)
    from mistral_fast.export import export_run

    export_run(cfg)  # last: what cfg.export asks for (merged, GGUF) into export/, added to the manifest
    return result
