"""GRPO's data and evaluation: prompts → exact Mistral ids, and the mean reward of greedy answers.

A GRPO record is a prompt and the columns its rewards read::

    {"prompt": "Convert 7 km to m.", "answer": "7000"}
    {"messages": [{"role": "system", ...}, {"role": "user", ...}], "tool_name": "get_weather"}

``prompt`` is a string (one user message) or a list of messages; ``messages`` ending with the user's turn
works too. Every other column is handed to the rewards (`mistral_fast.rewards`). Before any model loads,
each record is checked: its conversation (the chat rules of SFT data), the columns its rewards need
(``file:line: reward 'numeric_answer' needs column 'answer'``), and room for a completion of
``train.max_completion_length`` tokens within ``model.max_seq_length``.

Prompts are encoded with the project's exact chat template as a generation prompt (``…[/INST]``, tested
id for id against `mistral_common`); TRL receives those ids and never templates the text itself
(`mistral_fast.train_grpo`). Completions are generated until ``</s>``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mistral_fast.config import DATA_DIR, RunConfig
from mistral_fast.constants import MAX_REASONS
from mistral_fast.data import read_records, split_examples
from mistral_fast.errors import DataError, TokenizerError
from mistral_fast.families import tokenizer_version
from mistral_fast.rewards import Reward
from mistral_fast.tokenizer import tokenizer_for, validate_conversation

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger("mistral_fast")

SAMPLE_GRPO = DATA_DIR / "sample_grpo.jsonl"
"""The prompt set written for this project (`scripts/make_grpo_data.py`): metric unit conversions."""

PROMPT_COLUMNS = ("prompt", "messages")  # what a record's prompt is read from; the rest goes to the rewards


@dataclass
class GrpoPrompt:
    """One validated prompt: its messages, the columns the rewards read, and where it came from."""

    messages: list[dict[str, str]]
    columns: dict[str, Any]
    where: str

    @property
    def question(self) -> str:
        """The text a reward receives as ``prompt``: the last user message."""
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")


def _messages(record: dict[str, Any]) -> list[dict[str, str]]:
    value = record.get("prompt", record.get("messages"))
    if isinstance(value, str) and value.strip():
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        return [{"role": m.get("role"), "content": m.get("content")} for m in value]
    raise DataError(
        f"no prompt: expected a non-empty 'prompt' (a string or a list of messages) or 'messages' ending with the "
        f"user's turn; the record has {sorted(record)}"
    )


def to_prompt(record: dict[str, Any], where: str, rewards: list[Reward], version: str | None) -> GrpoPrompt:
    """Validate one record into a `GrpoPrompt`.

    Raises:
        DataError: no prompt, a conversation that breaks the chat rules or does not end with the user, or a
            column a reward needs is missing (naming the reward and the column).
    """
    messages = _messages(record)
    if messages[-1]["role"] != "user":
        raise DataError(f"the prompt ends with {messages[-1]['role']!r}, not 'user' — GRPO completes the user's turn")
    try:
        validate_conversation(messages, version, training=False)
    except TokenizerError as err:
        raise DataError(str(err)) from None
    columns = {k: v for k, v in record.items() if k not in PROMPT_COLUMNS}
    for reward in rewards:
        missing = [c for c in reward.columns if c not in columns]
        if missing:
            raise DataError(
                f"reward {reward.name!r} needs column(s) {missing}, the record has {sorted(record)} — add the "
                "column to the prompt set or choose another reward (train.rewards)"
            )
    return GrpoPrompt(messages, columns, where)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: GrpoPrompt) -> list[int]:
    """The prompt's ids as a generation prompt: what the model completes (exact chat template)."""
    encoded = tokenizer.apply_chat_template(
        prompt.messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return list(encoded["input_ids"])


@dataclass
class GrpoData:
    """Encoded train/eval prompts and the `GrpoPrompt` records they came from."""

    train: Dataset
    eval: Dataset | None
    train_prompts: list[GrpoPrompt]
    eval_prompts: list[GrpoPrompt]
    format: str = "grpo"
    stats: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        """A few lines for the notebook and the CLI."""
        s = self.stats
        lines = [
            f"GRPO prompts: {s['train_examples']} train / {s['eval_examples']} held out",
            f"longest prompt {s['max_prompt_length']} tokens, completions up to {s['max_completion_length']} tokens",
        ]
        if s["skipped"]:
            lines.append(f"{s['skipped']} records skipped: " + "; ".join(s["skip_reasons"]))
        return "\n".join(lines)


def _row(tokenizer: PreTrainedTokenizerBase, prompt: GrpoPrompt) -> dict[str, Any]:
    ids = encode_prompt(tokenizer, prompt)
    # ``prompt`` (text) is what TRL logs and groups by; the model gets ``prompt_ids``. The record's own columns
    # travel as one JSON string: Arrow needs one type per column, users' columns mix ints and strings.
    return {
        "prompt": tokenizer.decode(ids),
        "prompt_ids": ids,
        "question": prompt.question,
        "where": prompt.where,
        "columns": json.dumps(prompt.columns, ensure_ascii=False, default=str),
    }


def resolve_source(path: Any) -> Any:
    """``data.path``, or the shipped sample file of that name (``sample_grpo.jsonl`` in a preset) if none is here."""
    if isinstance(path, str) and not Path(path).exists() and (DATA_DIR / path).is_file():
        return str(DATA_DIR / path)
    return path


def load_prompts(cfg: RunConfig, rewards: list[Reward], source: Any = None) -> tuple[list[GrpoPrompt], list[str]]:
    """Read and validate the prompt records of ``data.path``; returns (prompts, skip reasons).

    Raises:
        DataError: the first bad record (``file:line: …``) unless ``data.skip_invalid``; no usable prompt.
    """
    version = tokenizer_version(cfg.model)
    source = resolve_source(cfg.data.path if source is None else source)
    prompts, reasons, skipped = [], [], 0
    for record in read_records(source, split=cfg.data.split):
        try:
            prompts.append(to_prompt(record.data, record.where, rewards, version))
        except DataError as err:
            if not cfg.data.skip_invalid:
                raise DataError(f"{record.where}: {err} (or set data.skip_invalid=true to skip bad records)") from None
            skipped += 1
            if len(reasons) < MAX_REASONS:
                reasons.append(f"{record.where}: {err}")
    if not prompts:
        raise DataError(f"data.path={str(source)!r}: no usable prompt; first reasons: {reasons}")
    return prompts, [str(skipped), *reasons]


def prepare_prompts(
    cfg: RunConfig, rewards: list[Reward], tokenizer: PreTrainedTokenizerBase | None = None, source: Any = None
) -> GrpoData:
    """Load, validate, encode and split a run's GRPO prompts (the data stage of ``train.method: grpo``).

    Raises:
        DataError: a bad record, a missing reward column, or a prompt that leaves no room for
            ``train.max_completion_length`` tokens in ``model.max_seq_length``.
    """
    from datasets import Dataset

    prompts, (skipped, *reasons) = load_prompts(cfg, rewards, source)
    tokenizer = tokenizer or tokenizer_for(cfg.model)
    if cfg.data.max_examples:
        prompts = split_examples(prompts, 0.0, cfg.data.seed)[0][: cfg.data.max_examples]
    budget, limit = cfg.train.max_completion_length, cfg.model.max_seq_length
    rows = []
    for prompt in prompts:
        row = _row(tokenizer, prompt)
        if len(row["prompt_ids"]) + budget > limit:
            raise DataError(
                f"{prompt.where}: the prompt is {len(row['prompt_ids'])} tokens: with train.max_completion_length="
                f"{budget} it does not fit model.max_seq_length={limit} — raise model.max_seq_length or shorten it"
            )
        rows.append(row)
    train_ids, eval_ids = split_examples(list(range(len(rows))), cfg.data.eval_fraction, cfg.data.seed)
    stats = {
        "train_examples": len(train_ids),
        "eval_examples": len(eval_ids),
        "skipped": int(skipped),
        "skip_reasons": reasons,
        "max_prompt_length": max(len(r["prompt_ids"]) for r in rows),
        "max_completion_length": budget,
    }
    data = GrpoData(
        Dataset.from_list([rows[i] for i in train_ids]),
        Dataset.from_list([rows[i] for i in eval_ids]) if eval_ids else None,
        [prompts[i] for i in train_ids],
        [prompts[i] for i in eval_ids],
        stats=stats,
    )
    log.info("data: %s", data.summary().replace("\n", "; "))
    return data


def preview_prompt(tokenizer: PreTrainedTokenizerBase, row: dict[str, Any]) -> str:
    """A prompt as the model sees it (control tokens shown), then the columns its rewards read."""
    return f"{tokenizer.decode(row['prompt_ids'], skip_special_tokens=False)}⟦completion⟧\ncolumns: {row['columns']}"


# ------------------------------------------------------------------------------------------ evaluation


def score(rewards: list[Reward], weights: list[float], prompt: GrpoPrompt, completion: str) -> dict[str, float]:
    """Every reward of one completion and their weighted mean (``total``, in [0, 1] when the rewards are)."""
    scores = {r.name: r(prompt.question, completion, prompt.where, prompt.columns) for r in rewards}
    weights = weights or [1.0] * len(rewards)
    scores["total"] = sum(w * scores[r.name] for w, r in zip(weights, rewards, strict=True)) / sum(weights)
    return scores


def mean_rewards(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[GrpoPrompt],
    rewards: list[Reward],
    *,
    weights: list[float] | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Greedy answers to `prompts` scored by `rewards`: each reward's mean, the total's mean, and the answers.

    Greedy (temperature 0), so a before/after comparison measures the policy's best guess, not sampling luck.
    """
    from mistral_fast.evaluate import GenerationSettings, generate

    settings = GenerationSettings(max_new_tokens=max_new_tokens, batch_size=batch_size)
    answers = generate(model, tokenizer, [p.messages for p in prompts], settings)
    scored = [score(rewards, weights or [], p, a["text"]) for p, a in zip(prompts, answers, strict=True)]
    names = [*(r.name for r in rewards), "total"]
    means = {n: sum(s[n] for s in scored) / len(scored) for n in names} if scored else dict.fromkeys(names, 0.0)
    return {"means": means, "completions": [a["text"] for a in answers], "scores": scored}
