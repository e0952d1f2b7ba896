"""Data: files and data sets in the formats users have → validated `messages` conversations → splits.

Every record keeps where it came from (``file:line`` for JSON lines, ``file:row N`` for CSV and
parquet, ``name[split][i]`` for a `datasets` data set) so that a bad record is reported as
``where: what is wrong — what to do`` before any model is loaded. With ``skip_invalid`` the bad
records are dropped instead, counted, and the first few reasons are kept for the summary.

Tool calls: a ``tools`` column (a list per row, or that list as a JSON string: CSV, or parquet and
`datasets` where nested schemas differ row to row) beside ``messages`` holds the functions the model may
call, ``[{"type": "function", "function": {"name", "description", "parameters"}}]``. Conversations use
OpenAI's message shapes (assistant ``tool_calls: [{"id", "type": "function", "function": {"name",
"arguments"}}]``, ``{"role": "tool", "tool_call_id", "content"}``), which is also OpenAI's fine-tuning
format (its legacy ``functions``/``function_call``/``"function"`` role and ``parallel_tool_calls`` are
mapped too); ShareGPT's ``function_call``/``observation`` turns (LLaMA-Factory's layout) become the same
messages, with call ids made from the conversation. `check_tool_calls` refuses, with ``file:line``, what
Mistral's format or the tools cannot take: a call id that is not 9 letters or digits (``data.tool_call_ids:
regenerate`` rewrites them, the same way in a call and its result), a result whose id matches no call, a
result not preceded by a call, a call to a tool that is not in ``tools``, and arguments that are not a JSON
object or do not fit the tool's ``parameters`` JSON schema (checked with `jsonschema`).

Tokenisation (ids + assistant-only labels) is the tokenizer stage's job: see
`mistral_fast.dataset.prepare_data`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mistral_fast.atomic import atomic_path
from mistral_fast.config import DataConfig
from mistral_fast.constants import MAX_REASONS
from mistral_fast.errors import DataError, TokenizerError
from mistral_fast.example import Example  # re-exported: `from mistral_fast.data import Example` keeps working
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
# ShareGPT turns that carry tool calls and their results (LLaMA-Factory's names)
SHAREGPT_CALL, SHAREGPT_RESULT = "function_call", "observation"
TOOL_CALL_ID = re.compile(r"[A-Za-z0-9]{9}")  # Mistral's call ids (mistral_common refuses any other)
_ID_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


@dataclass
class Record:
    """One raw record and the place it came from."""

    data: dict[str, Any]
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


def to_messages(record: dict[str, Any], fmt: str) -> list[dict[str, Any]]:
    """Normalise one record of format `fmt` to a list of ``{"role", "content"}`` messages.

    Conversations keep their tool calls (assistant ``tool_calls``) and results (``tool`` messages with
    ``tool_call_id``); see the module docstring for the shapes accepted.
    """
    if fmt == "messages":
        _require(record, ("messages",))
        messages = _chat(_json_column(record.get("messages"), "messages"), "messages", "role", "content", None)
        _check_parallel(messages, record.get("parallel_tool_calls"))
        return messages
    if fmt == "sharegpt":
        _require(record, ("conversations",))
        return _sharegpt(_json_column(record.get("conversations"), "conversations"))
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


def _json_column(value: Any, column: str) -> Any:
    """A nested column as read: CSV (and some parquet files) hold lists as JSON text."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as err:
        raise DataError(
            f"column {column!r} must be a list (or its JSON text); got text that is not JSON ({err.msg})"
        ) from None


def _chat(
    turns: Any, column: str, role_key: str, content_key: str, role_map: dict[str, str] | None
) -> list[dict[str, Any]]:
    if not isinstance(turns, list):
        raise DataError(f"column {column!r} must be a list of turns, got {type(turns).__name__}")
    messages = []
    for i, turn in enumerate(turns):
        calls = isinstance(turn, dict) and bool(turn.get("tool_calls") or turn.get("function_call"))
        if not isinstance(turn, dict) or role_key not in turn or (content_key not in turn and not calls):
            raise DataError(f"{column}[{i}] must be an object with {role_key!r} and {content_key!r}")
        role = turn[role_key]
        role = role_map.get(str(role).lower(), role) if role_map else role
        _refuse_images(turn, f"{column}[{i}]")
        content = turn.get(content_key)
        content = None if content is None and calls else _text(content, f"{column}[{i}].{content_key}")
        message: dict[str, Any] = {"role": "tool" if role == "function" else role, "content": content}
        if role_map is None:
            message |= _tool_fields(turn, f"{column}[{i}]")
        messages.append(message)
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


def _tool_fields(turn: dict[str, Any], at: str) -> dict[str, Any]:
    """The tool-call keys of an OpenAI-style message (None values, as parquet pads them, are absent)."""
    out: dict[str, Any] = {}
    if turn.get("tool_calls"):
        out["tool_calls"] = turn["tool_calls"]
    elif turn.get("function_call"):  # OpenAI's legacy single call: no id (data.tool_call_ids=regenerate adds one)
        out["tool_calls"] = [{"id": None, "type": "function", "function": turn["function_call"]}]
    if turn.get("role") == "function":  # the legacy result: named, no id; matched to the call by name
        out["name"] = turn.get("name")
        out["tool_call_id"] = None
    for key in ("tool_call_id", "name"):
        if turn.get(key) is not None:
            out[key] = turn[key]
    if "tool_calls" in out and not isinstance(out["tool_calls"], list):
        raise DataError(f"{at}.tool_calls must be a list of calls, got {type(out['tool_calls']).__name__}")
    return out


def _check_parallel(messages: list[dict[str, Any]], parallel: Any) -> None:
    """OpenAI's ``parallel_tool_calls: false``: every assistant turn makes at most one call."""
    if parallel is False:
        for i, message in enumerate(messages):
            if len(message.get("tool_calls") or []) > 1:
                raise DataError(
                    f"messages[{i}]: {len(message['tool_calls'])} tool calls in one turn but the record sets "
                    "parallel_tool_calls=false — split the turn or drop the flag"
                )


def _sharegpt(turns: Any) -> list[dict[str, Any]]:
    """ShareGPT turns → messages; a ``function_call`` turn (a JSON call or list of calls) becomes an assistant
    message with ``tool_calls`` and each following ``observation`` the result of the next call, in order."""
    if not isinstance(turns, list):
        raise DataError(f"column 'conversations' must be a list of turns, got {type(turns).__name__}")
    messages: list[dict[str, Any]] = []
    pending: list[str] = []  # ids of the last call turn not yet given a result
    for i, turn in enumerate(turns):
        at = f"conversations[{i}]"
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataError(f"{at} must be an object with 'from' and 'value'")
        _refuse_images(turn, at)
        speaker, value = str(turn["from"]).lower(), _text(turn["value"], f"{at}.value")
        if speaker == SHAREGPT_CALL:
            calls = _json_column(value, f"{at}.value")
            calls = calls if isinstance(calls, list) else [calls]
            if not all(isinstance(c, dict) and "name" in c for c in calls):
                raise DataError(f"{at}: a function_call value must be a JSON object with 'name' (or a list of them)")
            ids = [_make_id(f"{value}\0{i}\0{n}") for n in range(len(calls))]
            tool_calls = [
                {"id": id_, "type": "function", "function": {"name": c["name"], "arguments": c.get("arguments", {})}}
                for id_, c in zip(ids, calls, strict=True)
            ]
            messages.append({"role": "assistant", "content": None, "tool_calls": tool_calls})
            pending = ids
        elif speaker == SHAREGPT_RESULT:
            result_id = pending.pop(0) if pending else None  # None: the validator says there was no call
            messages.append({"role": "tool", "content": value, "tool_call_id": result_id})
        else:
            pending = []
            messages.append({"role": SHAREGPT_ROLES.get(speaker, turn["from"]), "content": value})
    return messages


# ------------------------------------------------------------------------------------------- tool calls


def _make_id(seed: str) -> str:
    """A 9-character alphanumeric call id derived from ``seed``: the same data always gets the same ids."""
    number = int.from_bytes(hashlib.sha256(seed.encode()).digest()[:8], "big")
    chars = []
    for _ in range(9):
        number, digit = divmod(number, len(_ID_ALPHABET))
        chars.append(_ID_ALPHABET[digit])
    return "".join(chars)


def record_tools(record: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The record's ``tools`` (or legacy ``functions``) column as ``[{"type": "function", "function": …}]``.

    A JSON string is parsed; a bare function ``{"name", "parameters"}`` is wrapped; keys whose value is
    None are dropped (parquet and `datasets` pad differing nested schemas with them). None: no tools.

    Raises:
        DataError: not a list (or its JSON), or a tool without a name.
    """
    column = "tools" if record.get("tools") is not None else "functions"
    value = _json_column(record.get(column), column)
    if value is None or value == []:
        return None
    if not isinstance(value, list):
        raise DataError(f"column {column!r} must be a list of tools (or its JSON), got {type(value).__name__}")
    tools = []
    for i, tool in enumerate(value):
        tool = _drop_nulls(tool)
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise DataError(
                f"{column}[{i}] must be {{'type': 'function', 'function': {{'name', 'description', 'parameters'}}}}"
            )
        if not isinstance(function.get("parameters", {}), dict):
            raise DataError(f"{column}[{i}] ({function['name']}): parameters must be a JSON schema object")
        tools.append({"type": "function", "function": function})
    return tools


def _drop_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def regenerate_tool_call_ids(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``data.tool_call_ids: regenerate``: new 9-character ids for every call, the same one in its result.

    Each call's new id is derived from its old id, its place and the conversation's text (deterministic).
    A result takes the new id of the call of the turn before it with the same old id (or, for legacy
    results with no id, the same function name); one that matches no call keeps its id, for the validator
    to report.
    """
    seed = json.dumps(messages, sort_keys=True, ensure_ascii=False, default=str)
    out: list[dict[str, Any]] = []
    renamed: dict[Any, str] = {}
    by_name: dict[Any, list[str]] = {}
    for i, message in enumerate(messages):
        message = dict(message)
        if message.get("tool_calls"):
            renamed, by_name = {}, {}
            calls = []
            for j, call in enumerate(message["tool_calls"]):
                new = _make_id(f"{seed}\0{i}\0{j}")
                if isinstance(call, dict):
                    renamed.setdefault(call.get("id"), new)
                    name = (call.get("function") or {}).get("name") if isinstance(call.get("function"), dict) else None
                    by_name.setdefault(name, []).append(new)
                    call = {**call, "id": new}
                calls.append(call)
            message["tool_calls"] = calls
        elif message["role"] == "tool":
            old = message.get("tool_call_id")
            if old is not None and old in renamed:
                message["tool_call_id"] = renamed[old]
            elif old is None and by_name.get(message.get("name")):
                message["tool_call_id"] = by_name[message.get("name")].pop(0)
        else:
            renamed, by_name = {}, {}
        out.append(message)
    return out


def check_tool_calls(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> None:
    """Refuse the tool calls and results that Mistral's format or the record's tools cannot take.

    Mistral's templates (and mistral_common) need 9-character alphanumeric call ids and a result that
    answers a call of the assistant turn just before it; a call must name one of ``tools`` with
    arguments that are a JSON object fitting that tool's ``parameters`` schema, or the model learns to
    call what does not exist. Errors read ``messages[i]…: what — what to do`` (the caller adds file:line).

    Raises:
        DataError: the first problem found.
    """
    known = {t["function"]["name"]: t["function"] for t in tools or []}
    calls: dict[Any, str] = {}  # id -> tool name, of the last assistant turn with calls
    call_turn: int | None = None
    for i, message in enumerate(messages):
        if message["role"] == "assistant" and message.get("tool_calls"):
            calls, call_turn = {}, i
            for j, call in enumerate(message["tool_calls"]):
                id_, name = _check_call(f"messages[{i}].tool_calls[{j}]", call, known)
                if id_ in calls:
                    raise DataError(
                        f"messages[{i}].tool_calls[{j}]: call id {id_!r} is used twice in this turn "
                        "— give each call its own id (or set data.tool_call_ids=regenerate)"
                    )
                calls[id_] = name
        elif message["role"] == "tool":
            _check_result(i, message, calls, call_turn)
        else:
            calls, call_turn = {}, None


def _check_call(at: str, call: Any, known: dict[str, dict[str, Any]]) -> tuple[str, str]:
    """One call of an assistant turn: its id and tool name, after checking both and its arguments."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise DataError(f"{at}: a call must be {{'id', 'type': 'function', 'function': {{'name', 'arguments'}}}}")
    id_, name = call.get("id"), function["name"]
    if not isinstance(id_, str) or not TOOL_CALL_ID.fullmatch(id_):
        raise DataError(
            f"{at}: call id {id_!r} is not 9 letters or digits, which Mistral's format needs — set "
            "data.tool_call_ids=regenerate to rewrite the ids (the same in the call and its result)"
        )
    if name not in known:
        where = f"this record's tools {sorted(known)}" if known else "this record, which has no tools column"
        raise DataError(f"{at}: call to {name!r}, which is not in {where} — add the tool to `tools` or fix the name")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{at}: the arguments of {name!r} are not valid JSON ({err.msg} at column {err.colno}) "
                "— write them as a JSON object"
            ) from None
    if not isinstance(arguments, dict):
        raise DataError(f"{at}: the arguments of {name!r} must be a JSON object, got {type(arguments).__name__}")
    problem = _schema_problem(arguments, known[name].get("parameters"))
    if problem:
        raise DataError(
            f"{at}: the arguments of {name!r} do not fit its parameters schema: {problem} "
            "— fix the arguments or the tool's schema"
        )
    return id_, name


def _schema_problem(arguments: dict[str, Any], schema: dict[str, Any] | None) -> str | None:
    """The first way ``arguments`` breaks the JSON schema (required keys, types, enums, …); None if it fits."""
    if not schema:
        return None
    import jsonschema  # a dependency of mistral_common

    try:
        validator_class = jsonschema.validators.validator_for(schema)
        validator_class.check_schema(schema)
    except jsonschema.SchemaError as err:
        return f"the schema itself is invalid ({err.message})"
    error = jsonschema.exceptions.best_match(validator_class(schema).iter_errors(arguments))
    if error is None:
        return None
    path = "".join(f"[{p!r}]" for p in error.absolute_path)
    return f"{error.message}" + (f" (at arguments{path})" if path else "")


def _check_result(i: int, message: dict[str, Any], calls: dict[Any, str], call_turn: int | None) -> None:
    if call_turn is None:
        raise DataError(
            f"messages[{i}] (tool): a tool result not preceded by an assistant tool call — add the call "
            "(assistant tool_calls) before it or drop the result"
        )
    id_ = message.get("tool_call_id")
    if id_ not in calls:
        raise DataError(
            f"messages[{i}] (tool): tool_call_id {id_!r} matches no call of messages[{call_turn}] "
            f"(ids {list(calls)}) — use the id of the call it answers"
        )


def normalise(
    record: Record, fmt: str, system_prompt: str = "", version: str | None = None, *, tool_call_ids: str = "keep"
) -> Example:
    """Turn one record into a validated `Example`; errors carry the record's location.

    Conversations go through `mistral_fast.tokenizer.validate_conversation` with the training rules:
    the one validator, so data files and chat calls are held to the same rules in the same words.
    ``version`` (the run's tokenizer version) also checks for control-token strings in the text. Tool
    calls are checked against the record's ``tools`` first (`check_tool_calls`), after
    ``tool_call_ids="regenerate"`` (``data.tool_call_ids``) has rewritten their ids.
    """
    try:
        if fmt == "text":
            _require(record.data, ("text",))
            text = _text(record.data["text"], "text")
            if not text.strip():
                raise DataError("empty text")
            return Example(None, text, record.where)
        messages = to_messages(record.data, fmt)
        tools = record_tools(record.data)
        if system_prompt and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": system_prompt}, *messages]
        if tool_call_ids == "regenerate":
            messages = regenerate_tool_call_ids(messages)
        check_tool_calls(messages, tools)
        validate_conversation(messages, version, tools, training=True)
        return Example(messages, None, record.where, tools)
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
            loaded.examples.append(normalise(record, fmt, cfg.system_prompt, version, tool_call_ids=cfg.tool_call_ids))
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
