"""Preference data for DPO and ORPO: pairs → validated prompt/chosen/rejected → exact Mistral ids.

A preference pair is a prompt (a conversation ending with the user's turn) and two assistant answers,
the one people preferred (``chosen``) and the other (``rejected``). Records come in the forms users have:

* ``prompt`` (a string, or messages) with ``chosen`` / ``rejected`` as strings, one assistant message,
  or the whole conversation (TRL's conversational preference format);
* ``chosen`` / ``rejected`` alone, as whole conversations that share every turn but the last
  (UltraFeedback style): the shared turns are the prompt.

Files are read like SFT data (`mistral_fast.data.read_records`: jsonl/json/csv/parquet or a `datasets`
name), and every bad record is reported as ``where: what — what to do`` before any model loads.

Encoding is exact: ``prompt + chosen`` and ``prompt + rejected`` are encoded with the chat template, which
is tested id for id against `mistral_common`'s ``encode_chat_completion`` of the same whole conversations.
The prompt's ids are the shared prefix of both; the answer's ids are the rest, ending with the ``</s>``
that closes the assistant turn, so the model is also taught where the preferred answer stops. TRL's own
tokenisation (which re-renders the prompt alone and cuts where the two disagree) is bypassed.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mistral_fast.config import DATA_DIR, RunConfig
from mistral_fast.constants import MAX_REASONS
from mistral_fast.data import Record, read_records, split_examples
from mistral_fast.errors import DataError, TokenizerError
from mistral_fast.families import tokenizer_version
from mistral_fast.tokenizer import tokenizer_for, validate_conversation

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger("mistral_fast")

SAMPLE_PREFERENCES = DATA_DIR / "sample_preference.jsonl"
"""The preference set written for this project (`scripts/make_preference_data.py`): polite over curt."""

PREFERENCE_METHODS = ("dpo", "orpo")


@dataclass
class PreferencePair:
    """One validated pair: the prompt conversation and the two answers' texts, with where it came from."""

    prompt: list[dict[str, str]]
    chosen: str
    rejected: str
    where: str

    def conversation(self, which: str) -> list[dict[str, str]]:
        """The whole conversation ``prompt + answer`` for ``which`` = ``"chosen"`` or ``"rejected"``."""
        return [*self.prompt, {"role": "assistant", "content": getattr(self, which)}]


@dataclass
class EncodedPair:
    """A pair's token ids: the shared prompt prefix and each answer's ids (ending with ``</s>``)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    truncated: bool = False

    def row(self) -> dict[str, list[int]]:
        """The columns TRL's preference collator reads."""
        return {"prompt_ids": self.prompt_ids, "chosen_ids": self.chosen_ids, "rejected_ids": self.rejected_ids}


# ------------------------------------------------------------------------------------------ records → pairs


def _maybe_json(value: Any) -> Any:
    """CSV cells hold text: a cell that is a JSON list or object of messages is read as one."""
    if isinstance(value, str) and value.lstrip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _messages(value: Any, column: str) -> list[dict[str, str]] | str:
    """A column's value as a message list, or as text when it is a string."""
    value = _maybe_json(value)
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise DataError(
            f"column {column!r} must be a non-empty string or list of messages, got "
            f"{type(value).__name__} {value!r:.60}"
        )
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f'{column}[{i}] must be a {{"role": ..., "content": ...}} object, got {message!r:.60}')
        if not isinstance(message["content"], str):
            raise DataError(f"{column}[{i}].content must be a string, got {type(message['content']).__name__}")
        out.append({"role": message["role"], "content": message["content"]})
    return out


def _answer(value: list[dict[str, str]] | str, prompt: list[dict[str, str]], column: str) -> str:
    """The answer text of a ``chosen``/``rejected`` column given the prompt."""
    if isinstance(value, str):
        return value
    if len(value) > len(prompt) and value[: len(prompt)] == prompt:  # the whole conversation was given
        value = value[len(prompt) :]
    if len(value) != 1:
        raise DataError(
            f"column {column!r}: expected one assistant message after the prompt, got {len(value)} messages "
            f"(roles {[m['role'] for m in value]}) — give the answer only, or the whole conversation"
        )
    if value[0]["role"] != "assistant":
        raise DataError(
            f"{column}: the answer has role {value[0]['role']!r}, not 'assistant' — the preferred and the "
            "rejected message must both be the assistant's reply"
        )
    return value[0]["content"]


def _shared_prompt(chosen: Any, rejected: Any) -> list[dict[str, str]]:
    """The prompt of a pair given as two whole conversations: every turn but their last, which must agree."""
    if not isinstance(chosen, list) or not isinstance(rejected, list):
        raise DataError(
            "no 'prompt' column, so 'chosen' and 'rejected' must be whole conversations (lists of messages) "
            "sharing every turn but the last — add a 'prompt' column or give the conversations"
        )
    if len(chosen) < 2 or len(rejected) < 2:
        raise DataError(
            "no shared prompt: 'chosen' and 'rejected' need the prompt's turns before the answer "
            f"(got {len(chosen)} and {len(rejected)} messages) — add a 'prompt' column or the user turn"
        )
    if chosen[:-1] != rejected[:-1]:
        at = next(
            (i for i, (a, b) in enumerate(zip(chosen[:-1], rejected[:-1], strict=False)) if a != b),
            min(len(chosen), len(rejected)) - 1,
        )
        raise DataError(
            f"no shared prompt: 'chosen' and 'rejected' differ at messages[{at}], before their final answers — "
            "a pair must share every turn except the last assistant message"
        )
    return chosen[:-1]


def to_pair(data: dict[str, Any]) -> tuple[list[dict[str, str]], str, str]:
    """Normalise one record to ``(prompt messages, chosen text, rejected text)``; shape checks only.

    Raises:
        DataError: missing columns, a wrong role, a prompt that is not shared.
    """
    missing = [c for c in ("chosen", "rejected") if c not in data]
    if missing:
        raise DataError(
            f"missing column(s) {missing}; the record has {sorted(data)} — preference data needs 'chosen' and "
            "'rejected' (and 'prompt' unless they are whole conversations)"
        )
    chosen, rejected = _messages(data["chosen"], "chosen"), _messages(data["rejected"], "rejected")
    if data.get("prompt") not in (None, "", []):
        prompt = _messages(data["prompt"], "prompt")
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
    else:
        prompt = _shared_prompt(chosen, rejected)
    return prompt, _answer(chosen, prompt, "chosen"), _answer(rejected, prompt, "rejected")


def validate_pair(prompt: list[dict[str, str]], chosen: str, rejected: str, version: str | None) -> None:
    """The training rules for a pair: both whole conversations valid, answers non-empty and different.

    Raises:
        DataError: naming ``chosen``/``rejected`` and the message, with what to do.
    """
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise DataError(f"{name}: empty answer — every pair needs two non-empty answers")
    if chosen.strip() == rejected.strip():
        raise DataError("chosen and rejected are the same answer — nothing to prefer; drop the pair or fix it")
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        try:
            validate_conversation([*prompt, {"role": "assistant", "content": text}], version, training=True)
        except TokenizerError as err:
            raise DataError(f"{name}: {err}") from None


@dataclass
class LoadedPairs:
    """What `load_pairs` returns: the pairs plus what was skipped and why."""

    pairs: list[PreferencePair]
    skipped: int = 0
    reasons: list[str] = field(default_factory=list)


def _skip(loaded: LoadedPairs, reason: str, skip_invalid: bool) -> None:
    if not skip_invalid:
        raise DataError(f"{reason} (or set data.skip_invalid=true to skip bad records)")
    loaded.skipped += 1
    if len(loaded.reasons) < MAX_REASONS:
        loaded.reasons.append(reason)


def load_pairs(cfg: RunConfig, source: Any = None, *, version: str | None = None) -> LoadedPairs:
    """Read and validate preference pairs (``cfg.data``), each located as ``file:line`` in errors.

    Args:
        cfg: the run config (``data.path``, ``data.split``, ``data.skip_invalid``, ``data.system_prompt``).
        source: overrides ``cfg.data.path`` (a path, a `datasets` name or a `datasets.Dataset`).
        version: the run's tokenizer version (control-token strings are refused); None skips that check.

    Raises:
        DataError: the first bad record, unless ``data.skip_invalid``; or no usable pair at all.
    """
    source = cfg.data.path if source is None else source
    loaded = LoadedPairs([])
    record: Record
    for record in read_records(source, split=cfg.data.split):
        try:
            prompt, chosen, rejected = to_pair(record.data)
            if cfg.data.system_prompt and not any(m["role"] == "system" for m in prompt):
                prompt = [{"role": "system", "content": cfg.data.system_prompt}, *prompt]
            validate_pair(prompt, chosen, rejected, version)
        except DataError as err:
            _skip(loaded, f"{record.where}: {err}", cfg.data.skip_invalid)
            continue
        loaded.pairs.append(PreferencePair(prompt, chosen, rejected, record.where))
    if not loaded.pairs:
        raise DataError(f"data.path={str(source)!r}: no usable preference pair; first reasons: {loaded.reasons}")
    return loaded


# ------------------------------------------------------------------------------------------ pairs → ids


def _ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], **kwargs: Any) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"])


def encode_pair(
    tokenizer: PreTrainedTokenizerBase, pair: PreferencePair, *, max_answer_length: int | None = None
) -> EncodedPair:
    """Encode a pair exactly: ``prompt_ids + chosen_ids`` is the chat encoding of ``prompt + chosen``.

    The prompt is encoded as a generation prompt (what inference sends); it must be a prefix of both
    whole conversations, which holds for Mistral's formats (the system prompt sits in the last user
    turn, which both share) and is checked rather than assumed.

    Args:
        tokenizer: the run's tokenizer (`mistral_fast.tokenizer.tokenizer_for`).
        pair: a validated pair.
        max_answer_length: cut longer answers to this many tokens (their ``</s>`` is then lost).

    Raises:
        TokenizerError: the prompt's encoding is not a prefix of the whole conversation's.
    """
    prompt_ids = _ids(tokenizer, pair.prompt, add_generation_prompt=True)
    answers, truncated = [], False
    for which in ("chosen", "rejected"):
        full = _ids(tokenizer, pair.conversation(which))
        if full[: len(prompt_ids)] != prompt_ids:
            raise TokenizerError(
                f"{which}: the prompt's ids are not a prefix of the whole conversation's — the chat template "
                "renders the prompt differently on its own; this pair cannot be encoded exactly"
            )
        answer = full[len(prompt_ids) :]
        if max_answer_length is not None and len(answer) > max_answer_length:
            answer, truncated = answer[:max_answer_length], True
        answers.append(answer)
    return EncodedPair(prompt_ids, answers[0], answers[1], truncated)


@dataclass
class PreferenceData:
    """Encoded train/eval pairs (``prompt_ids``/``chosen_ids``/``rejected_ids``) and the pairs they came from."""

    train: Dataset
    eval: Dataset | None
    train_pairs: list[PreferencePair]
    eval_pairs: list[PreferencePair]
    format: str = "preference"
    stats: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        """A few lines for the notebook and the CLI."""
        s = self.stats
        lines = [
            f"preference pairs: {s['train_examples']} train / {s['eval_examples']} eval",
            f"tokens: {s['train_tokens']} in train (prompt + chosen + rejected), {s['trained_tokens']} answer "
            f"tokens scored, longest sequence {s['max_length']}",
        ]
        if s["truncated"]:
            lines.append(f"{s['truncated']} pairs with an answer cut to train.max_answer_length")
        if s["skipped"]:
            lines.append(f"{s['skipped']} records skipped: " + "; ".join(s["skip_reasons"]))
        return "\n".join(lines)


def prepare_preferences(
    cfg: RunConfig, tokenizer: PreTrainedTokenizerBase | None = None, source: Any = None
) -> PreferenceData:
    """Load, validate, encode and split the preference pairs of a run (DPO/ORPO's data stage).

    Limits: a prompt longer than ``train.max_prompt_length`` (or leaving no room for an answer within
    ``model.max_seq_length``) is refused, or skipped with ``data.skip_invalid``; an answer longer than
    ``train.max_answer_length`` or than the room left is cut and counted.

    Raises:
        DataError: a bad record (``file:line: what — what to do``) or a pair that does not fit.
    """
    from datasets import Dataset

    version = tokenizer_version(cfg.model)
    loaded = load_pairs(cfg, source, version=version)
    tokenizer = tokenizer or tokenizer_for(cfg.model)
    pairs = loaded.pairs
    if cfg.data.max_examples:
        pairs = split_examples(pairs, 0.0, cfg.data.seed)[0][: cfg.data.max_examples]
    rows, kept, truncated = [], [], 0
    for pair in pairs:
        try:
            prompt_len = len(_ids(tokenizer, pair.prompt, add_generation_prompt=True))
            room = min(cfg.train.max_answer_length, cfg.model.max_seq_length - prompt_len)
            if prompt_len > cfg.train.max_prompt_length or room < 1:
                raise DataError(
                    f"the prompt is {prompt_len} tokens, over train.max_prompt_length={cfg.train.max_prompt_length} "
                    f"or leaving no room for an answer in model.max_seq_length={cfg.model.max_seq_length} — raise "
                    "them or shorten the prompt"
                )
            encoded = encode_pair(tokenizer, pair, max_answer_length=room)
        except (DataError, TokenizerError) as err:
            _skip(loaded, f"{pair.where}: {err}", cfg.data.skip_invalid)
            continue
        truncated += encoded.truncated
        rows.append(encoded.row())
        kept.append(pair)
    if not rows:
        raise DataError(f"data.path={cfg.data.path!r}: no pair left to train on; first reasons: {loaded.reasons}")
    train_ids, eval_ids = split_examples(list(range(len(rows))), cfg.data.eval_fraction, cfg.data.seed)
    train = Dataset.from_list([rows[i] for i in train_ids])
    evaluation = Dataset.from_list([rows[i] for i in eval_ids]) if eval_ids else None

    def size(r: dict[str, list[int]]) -> int:
        return len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"])

    stats = {
        "train_examples": len(train_ids),
        "eval_examples": len(eval_ids),
        "skipped": loaded.skipped,
        "skip_reasons": loaded.reasons,
        "truncated": truncated,
        "train_tokens": sum(size(rows[i]) for i in train_ids),
        "trained_tokens": sum(len(rows[i]["chosen_ids"]) + len(rows[i]["rejected_ids"]) for i in train_ids),
        "max_length": max(len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in rows),
    }
    data = PreferenceData(train, evaluation, [kept[i] for i in train_ids], [kept[i] for i in eval_ids], stats=stats)
    log.info("data: %s", data.summary().replace("\n", "; "))
    return data


def preview_pair(tokenizer: PreTrainedTokenizerBase, row: dict[str, list[int]]) -> str:
    """A pair as the trainer sees it: the shared prompt, then ⟦chosen⟧ and ⟦rejected⟧ (the scored tokens)."""

    def text(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False)

    prompt = text(row["prompt_ids"])
    return f"chosen:   {prompt}⟦{text(row['chosen_ids'])}⟧\nrejected: {prompt}⟦{text(row['rejected_ids'])}⟧"


# ------------------------------------------------------------------------------------------ evaluation


def answer_logps(model: Any, rows: Any, *, pad_token_id: int, batch_size: int = 8) -> list[tuple[float, float]]:
    """Summed log-probability of each pair's chosen and rejected answer tokens (``</s>`` included) under `model`.

    Sequences are right-padded and only the answer positions are summed, so padding never counts. The
    model is scored in eval mode (no dropout) and left in the mode it was in.
    """
    import torch

    device = next(model.parameters()).device
    rows = list(rows)
    sequences = [(r["prompt_ids"], r[key]) for r in rows for key in ("chosen_ids", "rejected_ids")]
    scores: list[float] = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(sequences), batch_size):
            batch = sequences[start : start + batch_size]
            width = max(len(p) + len(a) for p, a in batch)
            ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            answer = torch.zeros_like(ids, dtype=torch.bool)
            for i, (p, a) in enumerate(batch):
                ids[i, : len(p) + len(a)] = torch.tensor(p + a)
                mask[i, : len(p) + len(a)] = 1
                answer[i, len(p) : len(p) + len(a)] = True
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            target = ids[:, 1:].to(device)
            token = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
            scores += (token * answer[:, 1:].to(device)).sum(-1).tolist()
    model.train(was_training)
    return [(scores[2 * i], scores[2 * i + 1]) for i in range(len(rows))]


def preference_accuracy(model: Any, rows: Any, *, pad_token_id: int, batch_size: int = 8) -> dict[str, float | int]:
    """How often `model` ranks the chosen answer above the rejected one, and by how much.

    Returns:
        ``accuracy`` (share of pairs with log p(chosen) > log p(rejected)), ``mean_margin`` (mean of
        log p(chosen) − log p(rejected), in nats) and ``pairs``.
    """
    scored = answer_logps(model, rows, pad_token_id=pad_token_id, batch_size=batch_size)
    margins = [c - r for c, r in scored]
    return {
        "accuracy": sum(m > 0 for m in margins) / len(margins) if margins else float("nan"),
        "mean_margin": sum(margins) / len(margins) if margins else float("nan"),
        "pairs": len(margins),
    }


def evaluate_preferences(model: Any, rows: Any, *, pad_token_id: int, batch_size: int = 8) -> dict[str, Any]:
    """Held-out preference accuracy and margin of the tuned model and of the base (adapter switched off)."""
    was_training = model.training
    model.eval()
    try:
        tuned = preference_accuracy(model, rows, pad_token_id=pad_token_id, batch_size=batch_size)
        with model.disable_adapter():
            base = preference_accuracy(model, rows, pad_token_id=pad_token_id, batch_size=batch_size)
    finally:
        model.train(was_training)
    return {"tuned": tuned, "base": base}
