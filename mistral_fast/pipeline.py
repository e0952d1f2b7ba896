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
            lines.append(f"eval loss: {t['eval_loss']:.4f} (perplexity {t['perplexity']:.2f})")
        lines.append(f"adapter: {t['adapter_dir']}")
        e = self.evaluation
        if e and e.get("rouge_l") is not None:
            lines.append(
                f"held-out answers: ROUGE-L {e['rouge_l']:.3f}, BLEU {e['bleu']:.2f}, exact {e['exact_match']:.2f}"
            )
        return "\n".join(lines)


def _token_ids(data: Any) -> set[int]:
    """Every token id in the prepared train and eval splits."""
    ids: set[int] = set()
    for split in (data.train, data.eval):
        if split is not None:
            for row in split["input_ids"]:
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


def run(cfg: RunConfig) -> RunResult:
    """Run the whole pipeline for a config: data → model → train → evaluate; write the run directory.

    This is the recipe every entry point follows; read it top to bottom.
    """
    import json

    from mistral_fast.distributed import is_main_process
    from mistral_fast.memory import preflight
    from mistral_fast.modeling import load_model, resolve_backend, validate_model_request
    from mistral_fast.modeling.embeddings import check_untrained_tokens

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
    # Nemo base's control-token rows are untrained: stop before training on zeros (modeling/embeddings.py)
    check_untrained_tokens(loaded.model, _token_ids(data), loaded.tokenizer)

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

    write_manifest(cfg, run_dir)  # last: the sha256 of every file above (`mistral-fast verify RUN_DIR`)
    return result
