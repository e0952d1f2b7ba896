"""Data: files and data sets in the formats users have → validated `messages` conversations → splits.

Every record keeps where it came from (``file:line`` for JSON lines, ``file:row N`` for CSV and
parquet, ``name[split][i]`` for a `datasets` data set) so that a bad record is reported as
``where: what is wrong — what to do`` before any model is loaded. With ``skip_invalid`` the bad
records are dropped instead, counted, and the first few reasons are kept for the summary.

Tokenisation (ids + assistant-only labels) is the tokenizer stage's job: see
`mistral_fast.dataset.prepare_data`.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mistral_fast.atomic import atomic_path
from mistral_fast.config import DataConfig
from mistral_fast.constants import MAX_REASONS
from mistral_fast.errors import DataError, TokenizerError
from mistral_fast.tokenizer import validate_conversation

FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text")
# sharegpt speaker names → roles (the spellings found in the wild)
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "model": "assistant",
    "system": "system",
}
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@dataclass
class Record:
    """One raw record and the place it came from."""

    data: dict[str, Any]
    where: str


@dataclass
class Example:
    """One normalised training example: a conversation, or raw text for continued pre-training."""

    messages: list[dict[str, str]] | None
    text: str | None
    where: str


@dataclass
class LoadedData:
    """What `load_messages` returns: examples plus what was skipped and why."""

    examples: list[Example]
    format: str
    skipped: int = 0
    reasons: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for logs: counts, format, first skip reasons."""
        line = f"{len(self.examples)} examples ({self.format})"
        if self.skipped:
            line += f", {self.skipped} skipped: " + "; ".join(self.reasons)
        return line


# ---------------------------------------------------------------------------------------------- reading


def read_records(source: Any, *, split: str = "train") -> Iterator[Record]:
    """Yield the raw records of a file, a `datasets` name or a `datasets.Dataset`, with their location.

    Raises:
        DataError: the file does not exist, has an unknown suffix, is not UTF-8, or a line is not JSON.
    """
    if not isinstance(source, str | Path):  # a datasets.Dataset (or anything list-like of dicts)
        name = (getattr(source, "info", None) and source.info.dataset_name) or "dataset"
        for i, row in enumerate(source):
            yield Record(dict(row), f"{name}[{i}]")
        return
    path = Path(source)
    if path.suffix.lower() not in FILE_SUFFIXES and not path.exists():
        yield from _read_hub_dataset(str(source), split)
        return
    if not path.is_file():
        raise DataError(f"data.path={str(source)!r}: no such file — check the path (relative to {Path.cwd()})")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _read_jsonl(path)
    elif suffix == ".json":
        yield from _read_json(path)
    elif suffix == ".csv":
        yield from _read_csv(path)
    elif suffix == ".parquet":
        yield from _read_parquet(path)
    else:
        raise DataError(f"{path}: unknown file type {suffix!r} — use one of {', '.join(FILE_SUFFIXES)}")


def _decode(path: Path, raw: bytes, line: int | None = None) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        where = f"{path}:{line}" if line else str(path)
        raise DataError(
            f"{where}: not UTF-8 (byte {raw[err.start]:#04x} at offset {err.start}) — re-save the file as UTF-8"
        ) from None


def _read_jsonl(path: Path) -> Iterator[Record]:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            record = parse_jsonl_line(path, number, raw)
            if record is not None:
                yield record


def parse_jsonl_line(path: Path, number: int, raw: bytes) -> Record | None:
    """One line of a JSON-lines file as a `Record` (None for a blank line).

    Raises:
        DataError: the line is not UTF-8, not JSON, or not a JSON object (``file:line: what — what to do``).
    """
    text = _decode(path, raw, number).strip()
    if not text:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno}) — each line must be one JSON object"
        ) from None
    if not isinstance(data, dict):
        raise DataError(f"{path}:{number}: expected a JSON object, got {type(data).__name__}")
    return Record(data, f"{path}:{number}")


def _read_json(path: Path) -> Iterator[Record]:
    text = _decode(path, path.read_bytes())
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg}) — fix the syntax") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of records (or {{'data': [...]}})")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"{path}: record {i} is {type(row).__name__}, expected an object")
        yield Record(row, f"{path}[{i}]")


def _read_csv(path: Path) -> Iterator[Record]:
    _decode(path, path.read_bytes())  # fail early and clearly on a non-UTF-8 file
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        for row in reader:
            # line_num is the line where the row ends: right even for quoted multi-line fields' last line
            yield Record({k: v for k, v in row.items() if k is not None}, f"{path}:{reader.line_num}")


def _read_parquet(path: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: cannot read as parquet ({err}) — is it a parquet file?") from None
    for i, row in enumerate(table.to_pylist()):
        yield Record(row, f"{path}:row {i + 1}")


def load_hub_dataset(name: str, split: str) -> Any:
    """``datasets.load_dataset(name, split=split)``, failing with what to do instead.

    Raises:
        DataError: offline, an unknown name or an unknown split.
    """
    import datasets

    try:
        return datasets.load_dataset(name, split=split)
    except Exception as err:  # offline, unknown name, unknown split: all end here
        raise DataError(
            f"data.path={name!r}: not a local file and `datasets.load_dataset` failed ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:200]}) — give a .jsonl/.json/.csv/.parquet path or a reachable data set"
        ) from None


def _read_hub_dataset(name: str, split: str) -> Iterator[Record]:
    for i, row in enumerate(load_hub_dataset(name, split)):
        yield Record(dict(row), f"{name}[{split}][{i}]")


# --------------------------------------------------------------------------------------------- formats


def detect_format(record: dict[str, Any]) -> str:
    """The format of a record, from its columns.

    Raises:
        DataError: no known set of columns is present.
    """
    keys = set(record)
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    raise DataError(
        f"cannot tell the format from columns {sorted(keys)} — expected one of: messages; conversations "
        "(sharegpt); instruction+output (alpaca); prompt+completion; text"
    )


def _text(value: Any, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{what} must be a string, got {type(value).__name__}")
    return value


def to_messages(record: dict[str, Any], fmt: str) -> list[dict[str, str]]:
    """Normalise one record of format `fmt` to a list of ``{"role", "content"}`` messages."""
    if fmt == "messages":
        _require(record, ("messages",))
        return _chat(record.get("messages"), "messages", "role", "content", None)
    if fmt == "sharegpt":
        _require(record, ("conversations",))
        return _chat(record.get("conversations"), "conversations", "from", "value", SHAREGPT_ROLES)
    if fmt == "alpaca":
        _require(record, ("instruction", "output"))
        instruction = _text(record["instruction"], "instruction")
        extra = _text(record.get("input"), "input")
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = [
            {"role": "user", "content": user},
            {"role": "assistant", "content": _text(record["output"], "output")},
        ]
        system = _text(record.get("system"), "system")
        return ([{"role": "system", "content": system}] if system.strip() else []) + messages
    if fmt == "prompt_completion":
        _require(record, ("prompt", "completion"))
        return [
            {"role": "user", "content": _text(record["prompt"], "prompt")},
            {"role": "assistant", "content": _text(record["completion"], "completion")},
        ]
    raise DataError(f"data.format={fmt!r}: unknown — use one of {', '.join(FORMATS)}")


def _require(record: dict[str, Any], columns: tuple[str, ...]) -> None:
    missing = [c for c in columns if c not in record]
    if missing:
        raise DataError(f"missing column(s) {missing}; the record has {sorted(record)} — all records need one format")


def _chat(
    turns: Any, column: str, role_key: str, content_key: str, role_map: dict[str, str] | None
) -> list[dict[str, str]]:
    if not isinstance(turns, list):
        raise DataError(f"column {column!r} must be a list of turns, got {type(turns).__name__}")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
            raise DataError(f"{column}[{i}] must be an object with {role_key!r} and {content_key!r}")
        role = turn[role_key]
        role = role_map.get(str(role).lower(), role) if role_map else role
        _refuse_images(turn, f"{column}[{i}]")
        messages.append({"role": role, "content": _text(turn[content_key], f"{column}[{i}].{content_key}")})
    return messages


_IMAGE_CHUNKS = ("image", "image_url", "input_image")


def _refuse_images(turn: dict[str, Any], where: str) -> None:
    """Refuse a turn carrying an image (an ``images`` field or an image content chunk), naming it.

    Why: Mistral 3 models (Mistral3ForConditionalGeneration) see images, but this tool fine-tunes their
    language model on text only; dropping the image silently would train answers about pictures the model
    never saw.
    """
    content = turn.get("content")
    chunks = content if isinstance(content, list) else []
    kinds = [c.get("type") for c in chunks if isinstance(c, dict) and c.get("type") in _IMAGE_CHUNKS]
    if turn.get("images") or turn.get("image") or kinds:
        found = f"a {kinds[0]!r} content chunk" if kinds else "an image field"
        raise DataError(
            f"{where} has {found}: images are not supported yet; mistral_fast fine-tunes text conversations "
            "(also for Mistral 3 vision-language models, whose vision tower is kept as it is). Remove the images "
            "or the records that have them"
        )


def normalise(record: Record, fmt: str, system_prompt: str = "", version: str | None = None) -> Example:
    """Turn one record into a validated `Example`; errors carry the record's location.

    Conversations go through `mistral_fast.tokenizer.validate_conversation` with the training rules:
    the one validator, so data files and chat calls are held to the same rules in the same words.
    ``version`` (the run's tokenizer version) also checks for control-token strings in the text.
    """
    try:
        if fmt == "text":
            _require(record.data, ("text",))
            text = _text(record.data["text"], "text")
            if not text.strip():
                raise DataError("empty text")
            return Example(None, text, record.where)
        messages = to_messages(record.data, fmt)
        if system_prompt and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": system_prompt}, *messages]
        validate_conversation(messages, version, training=True)
        return Example(messages, None, record.where)
    except (DataError, TokenizerError) as err:
        raise DataError(f"{record.where}: {err}") from None


def load_messages(cfg: DataConfig | None = None, source: Any = None, *, version: str | None = None) -> LoadedData:
    """Read and validate a data set, returning normalised examples.

    Args:
        cfg: data settings (format, skip_invalid, system_prompt, split); defaults if None.
        source: overrides ``cfg.path``: a file path, a `datasets` name or a `datasets.Dataset`.
        version: the run's tokenizer version, to refuse control-token strings in the text here, with the
            record's location (None: left to tokenisation).

    Raises:
        DataError: the first bad record (``where: what — what to do``), unless ``skip_invalid``; or no
            usable example at all.
    """
    cfg = cfg or DataConfig()
    source = cfg.path if source is None else source
    fmt = None if cfg.format == "auto" else cfg.format
    loaded = LoadedData([], fmt or "auto")
    for record in read_records(source, split=cfg.split):
        try:
            if fmt is None:
                try:
                    fmt = detect_format(record.data)
                except DataError as err:
                    raise DataError(f"{record.where}: {err} (or set data.format)") from None
                loaded.format = fmt
            loaded.examples.append(normalise(record, fmt, cfg.system_prompt, version))
        except DataError as err:
            if not cfg.skip_invalid:
                raise DataError(f"{err} (or set data.skip_invalid=true to skip bad records)") from None
            loaded.skipped += 1
            if len(loaded.reasons) < MAX_REASONS:
                loaded.reasons.append(str(err))
    if not loaded.examples:
        raise DataError(f"data.path={str(source)!r}: no usable example ({loaded.summary()})")
    return loaded


def split_examples(examples: list[Any], eval_fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Deterministic shuffled train/eval split: the same seed and data always give the same split."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = round(len(examples) * eval_fraction) if eval_fraction else 0
    if eval_fraction and len(examples) >= 2:
        n_eval = min(max(n_eval, 1), len(examples) - 1)
    eval_ids, train_ids = order[:n_eval], order[n_eval:]
    return [examples[i] for i in train_ids], [examples[i] for i in eval_ids]


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Write rows as JSON lines atomically (temp file + rename)."""
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return Path(path)
