"""The data stage the pipeline calls: load → validate → split → template + tokenise + mask.

`prepare_data(cfg)` turns a run's data into tokenised train/eval splits (`PreparedData`), with the
conversations they came from and what was dropped. Bad records fail here, with ``file:line``, in
seconds and before any weights load. The tokenizer and its version come from the one rule in
`mistral_fast.families.tokenizer_version` (via `mistral_fast.tokenizer.tokenizer_for`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mistral_fast.config import RunConfig
from mistral_fast.constants import IGNORE_INDEX, MAX_REASONS
from mistral_fast.data import Example, load_messages, split_examples
from mistral_fast.errors import DataError, TokenizerError
from mistral_fast.families import tokenizer_version
from mistral_fast.tokenizer import tokenize_example, tokenizer_for

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

    version = tokenizer_version(cfg.model)
    loaded = load_messages(cfg.data, source, version=version)
    if tokenizer is None:
        tokenizer = tokenizer_for(cfg.model)
    examples = loaded.examples
    if cfg.data.max_examples:
        examples = split_examples(examples, 0.0, cfg.data.seed)[0][: cfg.data.max_examples]
    rows: list[dict[str, list[int]]] = []
    kept: list[Example] = []
    skipped, reasons, truncated = loaded.skipped, list(loaded.reasons), 0
    max_length = cfg.model.max_seq_length
    for example in examples:
        try:
            encoded = tokenize_example(
                tokenizer, example, max_length, version=version, assistant_only=cfg.train.assistant_only_loss
            )
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
            reasons = [*reasons, reason][:MAX_REASONS]
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
        "trained_tokens": sum(sum(t != IGNORE_INDEX for t in rows[i]["labels"]) for i in train_ids),
        "max_length": max(len(r["input_ids"]) for r in rows),
    }
    prepared = PreparedData(
        train, evaluation, [kept[i] for i in train_ids], [kept[i] for i in eval_ids], loaded.format, stats
    )
    log.info("data: %s", prepared.summary().replace("\n", "; "))
    return prepared
