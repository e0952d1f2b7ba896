"""The data stage the pipeline calls: load → validate → split → template + tokenise + mask.

`prepare_data(cfg)` turns a run's data into tokenised train/eval splits (`PreparedData`), with the
conversations they came from and what was dropped. Bad records fail here, with ``file:line``, in
seconds and before any weights load. The tokenizer and its version come from the one rule in
`mistral_fast.families.tokenizer_version` (via `mistral_fast.tokenizer.tokenizer_for`).

Memory that does not grow with the data, in parallel, cached
-------------------------------------------------------------
`prepare_data` runs as `datasets` ``map`` passes over Arrow files on disk (memory-mapped), so the
process holds a batch at a time rather than every example as Python lists of ints:

1. the records are written as they are read into ``raw.arrow`` (a JSON-lines file line by line, raw
   bytes: the workers decode and parse them in parallel; other sources as one JSON text per record);
2. pass one (``data.num_proc`` processes): parse, tell the format, normalise and validate each record,
   keeping its ``file:line``; errors and skips are columns, so the first error *in file order* is raised
   and the first skip reasons are the same whatever the number of workers;
3. pass two: template, tokenise and mask (``tokenize_example``) the examples kept (after
   ``data.max_examples``'s seeded pick), marking those with no trained token left;
4. the seeded split picks rows by index, exactly as `prepare_data_in_memory` (the old in-process path,
   kept as the reference), and train/eval ids, labels and the conversations are saved with their stats:
   read as a stream and written in file order, the seeded order kept as an index (`_save_rows`), so
   saving does not map the whole pass output into the process at once.

The result is cached under ``$MISTRAL_FAST_CACHE/prepared/<key>`` (default ``~/.cache/mistral_fast``),
written in a hidden temporary directory renamed into place when whole (`mistral_fast.atomic`). The key
hashes everything that changes the result (`cache_key`): the data's *content* (sha256 of the file, not
its mtime), the tokenizer (its files or the built-in version), every data setting but ``num_proc``,
``model.max_seq_length`` and ``train.assistant_only_loss``; a second run, a resumed run and every sweep
variation that shares them reuse it (logged as such), any change rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

from mistral_fast.atomic import remove_stale_temps, temp_sibling, write_text_atomic
from mistral_fast.config import RunConfig
from mistral_fast.constants import IGNORE_INDEX, MAX_REASONS
from mistral_fast.data import (
    FILE_SUFFIXES,
    Example,
    Record,
    detect_format,
    load_hub_dataset,
    load_messages,
    normalise,
    parse_jsonl_line,
    read_records,
    split_examples,
)
from mistral_fast.errors import DataError, TokenizerError
from mistral_fast.families import tokenizer_version
from mistral_fast.tokenizer import tokenize_example, tokenizer_for

if TYPE_CHECKING:
    import numpy as np
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger("mistral_fast")

# Bump when the preparation's output changes for the same inputs (old cache entries are then never hit).
PREP_VERSION = 3  # 2: splits stored in file order with their seeded order as an index (`_save_rows`); 3: tools
# Below this many rows per process, a worker costs more to start than it saves (auto num_proc only).
MIN_ROWS_PER_PROC = 5000
BATCH_ROWS = 1000  # rows per map batch and per written Arrow batch: what one process holds at a time
# Row status in the pass columns
OK, BLANK, INVALID, FATAL, EMPTY = 0, 1, 2, 3, 4


@dataclass
class PreparedData:
    """Tokenised train/eval splits plus the conversations they came from and what was dropped.

    ``train_examples``/``eval_examples`` are sequences of `Example` (read from Arrow on demand when the
    data came through the cache, so the train set is never held as Python objects). ``cache`` says
    where the prepared data lives and whether it was reused (empty for `prepare_data_in_memory`).
    """

    train: Dataset
    eval: Dataset | None
    train_examples: Sequence[Example]
    eval_examples: Sequence[Example]
    format: str
    stats: dict[str, Any] = field(default_factory=dict)
    cache: str = ""

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
        if self.cache.startswith("reused"):
            lines.append(f"prepared data {self.cache}")
        return "\n".join(lines)


class ExampleRows(Sequence[Example]):
    """The `Example`s of a prepared split, decoded from an Arrow data set row by row when asked for."""

    def __init__(self, rows: Dataset) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    @overload
    def __getitem__(self, index: int) -> Example: ...

    @overload
    def __getitem__(self, index: slice) -> list[Example]: ...

    def __getitem__(self, index: int | slice) -> Example | list[Example]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return _example(self.rows[index])

    def __iter__(self) -> Iterator[Example]:
        for batch in self.rows.iter(batch_size=BATCH_ROWS):
            yield from map(_example, _rows(batch))


def _rows(batch: dict[str, list[Any]]) -> Iterator[dict[str, Any]]:
    """The rows of a columnar batch of examples (``where``, ``messages``, ``text``, ``tools``)."""
    columns = _EXAMPLE_COLUMNS
    for values in zip(*(batch[c] for c in columns), strict=True):
        yield dict(zip(columns, values, strict=True))


# An example as Arrow columns: conversations and tools as JSON text, so the schema is the same for every
# row whatever the tools' parameters look like (nested structs would have to be unified across rows)
_EXAMPLE_COLUMNS = ("where", "messages", "text", "tools")


def _example(row: dict[str, Any]) -> Example:
    messages = json.loads(row["messages"]) if row["messages"] is not None else None
    tools = json.loads(row["tools"]) if row.get("tools") is not None else None
    return Example(messages, row["text"], row["where"], tools)


def prepare_data_in_memory(
    cfg: RunConfig, tokenizer: PreTrainedTokenizerBase | None = None, source: Any = None
) -> PreparedData:
    """`prepare_data` in this process with every example in memory, and no cache (the reference path).

    Each example is held as Python lists of ints (about 100–135 bytes of RAM per token): the path for
    small data, for sources whose values are not JSON (see `prepare_data`), and the reference the
    tests compare the cached, parallel path with. Arguments and errors are `prepare_data`'s.
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


# ---------------------------------------------------------------------------------- cached, parallel path


def cache_root() -> Path:
    """Where prepared data is cached: ``$MISTRAL_FAST_CACHE/prepared`` (default ``~/.cache/mistral_fast``)."""
    return Path(os.environ.get("MISTRAL_FAST_CACHE") or Path.home() / ".cache" / "mistral_fast") / "prepared"


def resolve_num_proc(value: int, rows: int) -> int:
    """The processes a pass over ``rows`` rows uses for ``data.num_proc=value`` (1: in this process).

    -1 (auto) takes the cores this process may run on, but no more than one per `MIN_ROWS_PER_PROC`
    rows (starting a worker and sending it the tokenizer costs about a second); an explicit count is
    kept, up to one process per row.
    """
    if value in (0, 1) or rows <= 1:
        return 1
    if value > 1:
        return min(value, rows)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, rows // MIN_ROWS_PER_PROC))


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of what decides a tokenizer's ids and template: its vocabulary/merges/normaliser, chat
    template and special tokens (and the transformers version that renders the template)."""
    import transformers

    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = [
        type(tokenizer).__name__,
        backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items())),
        str(getattr(tokenizer, "chat_template", None)),
        json.dumps({k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}),
        transformers.__version__,
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _builtin_tokenizer_fingerprint(version: str) -> str:
    """The built-in tokenizer without building it (5 s): its version and the packages whose files and
    rendering it uses (the code that builds it is in `_code_fingerprint`)."""
    from importlib.metadata import version as installed

    packages = "-".join(installed(name) for name in ("mistral_common", "tokenizers", "transformers"))
    return f"builtin-{version}-{packages}"  # metadata, not imports: a cache hit stays cheap


def _code_fingerprint() -> str:
    """A hash of the modules whose code shapes the prepared rows (readers, validator, template, passes):
    changing any of them rebuilds, without anyone having to remember `PREP_VERSION`."""
    package = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for name in ("constants.py", "families.py", "tokenizer.py", "data.py", "dataset.py"):
        digest.update((package / name).read_bytes())
    return digest.hexdigest()


def cache_key(cfg: RunConfig, content: str, source: str, tokenizer: str, version: str) -> dict[str, Any]:
    """Everything that changes the prepared data; its hash names the cache entry.

    ``data.num_proc`` is not in it: the result does not depend on the number of processes. ``source``
    (the path as given) is, because every ``file:line`` in the skip reasons and examples carries it.
    """
    d = cfg.data
    return {
        "prep_version": PREP_VERSION,
        "code": _code_fingerprint(),
        "source": source,
        "content": content,
        "tokenizer": tokenizer,
        "tokenizer_version": version,
        "max_seq_length": cfg.model.max_seq_length,
        "format": d.format,
        "split": d.split,
        "system_prompt": d.system_prompt,
        "skip_invalid": d.skip_invalid,
        "eval_fraction": d.eval_fraction,
        "seed": d.seed,
        "max_examples": d.max_examples,
        "tool_call_ids": d.tool_call_ids,
        "assistant_only_loss": cfg.train.assistant_only_loss,
    }


@dataclass
class _Source:
    """The data as the passes read it: a JSON-lines file (raw lines) or any other records (JSON texts)."""

    kind: str  # "lines" or "records"
    name: str  # what the key and the messages call it
    content: str  # content hash
    path: Path | None = None
    records: Any = None  # an iterable of Record, for kind "records"


def _resolve_source(cfg: RunConfig, source: Any) -> _Source | None:
    """How to read ``source``; None when it cannot be keyed by content (then the in-memory path runs).

    Raises:
        DataError: a missing file or an unknown file type (read_records' own messages).
    """
    source = cfg.data.path if source is None else source
    if isinstance(source, str | Path):
        path = Path(source)
        if path.suffix.lower() not in FILE_SUFFIXES and not path.exists():  # a datasets name
            dataset = load_hub_dataset(str(source), cfg.data.split)
            where = f"{source}[{cfg.data.split}]"
            rows = (Record(dict(row), f"{where}[{i}]") for i, row in enumerate(dataset))
            return _Source("records", str(source), f"datasets-{dataset._fingerprint}", records=rows)
        if not path.is_file() or path.suffix.lower() not in FILE_SUFFIXES:
            for _ in read_records(source, split=cfg.data.split):  # raises what is wrong with the path
                break
        content = _sha256_file(path)
        if path.suffix.lower() == ".jsonl":
            return _Source("lines", str(source), content, path=path)
        return _Source("records", str(source), content, path=path, records=read_records(source))
    fingerprint = getattr(source, "_fingerprint", None)  # a datasets.Dataset
    if fingerprint is None:
        return None
    return _Source("records", str(source), f"datasets-{fingerprint}", records=read_records(source))


def _write_raw(src: _Source, target: Path) -> bool:
    """Stream the records into an Arrow file, a batch at a time; False when a value is not JSON."""
    import pyarrow as pa

    if src.kind == "lines":
        schema = pa.schema([("line", pa.int64()), ("raw", pa.binary())])
    else:
        schema = pa.schema([("where", pa.string()), ("raw", pa.string())])
    columns: tuple[list[Any], list[Any]] = ([], [])

    def flush(writer: Any) -> None:
        writer.write_batch(
            pa.record_batch([pa.array(c, type=t.type) for c, t in zip(columns, schema, strict=True)], schema)
        )
        columns[0].clear()
        columns[1].clear()

    with pa.OSFile(str(target), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        if src.kind == "lines":
            assert src.path is not None
            with src.path.open("rb") as handle:
                for number, raw in enumerate(handle, start=1):
                    if raw.strip():  # blank lines are no records (as in read_records)
                        columns[0].append(number)
                        columns[1].append(raw)
                        if len(columns[0]) >= BATCH_ROWS:
                            flush(writer)
        else:
            records = iter(src.records)
            while True:
                try:
                    record = next(records, None)
                except DataError as err:  # a broken record ends the reading where it is, as in load_messages
                    columns[0].append(str(err))
                    columns[1].append(None)  # a row with no JSON: `_record` raises its message
                    break
                if record is None:
                    break
                try:
                    text = json.dumps(record.data, ensure_ascii=False, allow_nan=True)
                except (TypeError, ValueError):
                    log.info("data: %s holds values that are not JSON; preparing it in memory", record.where)
                    return False
                columns[0].append(record.where)
                columns[1].append(text)
                if len(columns[0]) >= BATCH_ROWS:
                    flush(writer)
        flush(writer)
    return True


def _record(kind: str, path: str, row: dict[str, Any]) -> Record | None:
    """One raw row as a `Record` (None: a blank line). Raises DataError for an unreadable line."""
    if kind == "lines":
        return parse_jsonl_line(Path(path), row["line"], row["raw"])
    if row["raw"] is None:  # where the reading stopped: `where` holds the reader's error
        raise DataError(row["where"])
    return Record(json.loads(row["raw"]), row["where"])


def _detect_error(record: Record) -> str:
    try:
        detect_format(record.data)
    except DataError as err:
        return f"{record.where}: {err} (or set data.format)"
    return f"{record.where}: the format was told from an earlier record"  # not reached: see _first_format


def _first_format(raw: Dataset, kind: str, path: str, cfg: RunConfig) -> tuple[str | None, int]:
    """The format and the index of the record it is told from (format auto), as `load_messages` does:
    the first record whose columns tell it; those before it are bad records (raised, or skipped)."""
    if cfg.data.format != "auto":
        return cfg.data.format, 0
    index = 0
    for batch in raw.iter(batch_size=BATCH_ROWS):
        for values in zip(*batch.values(), strict=True):
            record = _record(kind, path, dict(zip(batch, values, strict=True)))
            if record is not None:
                try:
                    return detect_format(record.data), index
                except DataError as err:
                    if not cfg.data.skip_invalid:
                        raise DataError(
                            f"{record.where}: {err} (or set data.format) (or set data.skip_invalid=true to skip "
                            "bad records)"
                        ) from None
            index += 1
    return None, index


def _validate_batch(
    batch: dict[str, list[Any]],
    indices: list[int],
    *,
    kind: str,
    path: str,
    fmt: str | None,
    first: int,
    system_prompt: str,
    version: str,
    tool_call_ids: str = "keep",
    tokenise: dict[str, Any] | None = None,
) -> dict[str, list[Any]]:
    """Pass one: parse, normalise and validate a batch of raw rows; errors become columns.

    With ``tokenise`` (`_tokenise_batch`'s keywords) the valid rows are tokenised in the same pass: one
    pass instead of two when every valid example is used (no ``data.max_examples`` pick).
    """
    out: dict[str, list[Any]] = {"status": [], "error": [], "where": [], "messages": [], "text": [], "tools": []}
    if tokenise is not None:
        out |= {key: [] for key in _TOKEN_COLUMNS}
    for n, index in enumerate(indices):
        status, error, where, messages, text, tools, example = OK, "", "", None, None, None, None
        try:
            record = _record(kind, path, {key: column[n] for key, column in batch.items()})
        except DataError as err:
            record, status, error = None, FATAL, str(err)
        if record is None:
            status = FATAL if status == FATAL else BLANK
        elif fmt is None or index < first:  # before the record the format was told from
            status, where, error = INVALID, record.where, _detect_error(record)
        else:
            where = record.where
            try:
                example = normalise(record, fmt, system_prompt, version, tool_call_ids=tool_call_ids)
            except DataError as err:
                status, error = INVALID, str(err)
            else:
                messages = None if example.messages is None else json.dumps(example.messages, ensure_ascii=False)
                text = example.text
                tools = None if example.tools is None else json.dumps(example.tools, ensure_ascii=False)
        values: tuple[Any, ...] = (status, error, where, messages, text, tools)
        if tokenise is not None:
            values += _tokenise_one(example, **tokenise) if example is not None else _NOT_TOKENISED
        for key, value in zip(out, values, strict=True):
            out[key].append(value)
    return out


_TOKEN_COLUMNS = ("input_ids", "labels", "tstatus", "terror", "truncated", "trained", "length")
_NOT_TOKENISED = ([], [], BLANK, "", False, 0, 0)


def _tokenise_one(
    example: Example, *, tokenizer: PreTrainedTokenizerBase, max_length: int, version: str, extra: dict[str, Any]
) -> tuple[Any, ...]:
    """The `_TOKEN_COLUMNS` of one example: ids, labels, status, error, truncated, trained, length."""
    try:
        encoded = tokenize_example(tokenizer, example, max_length, version=version, **extra)
    except TokenizerError as err:
        return ([], [], FATAL, f"{example.where}: {err}", False, 0, 0)
    trained = encoded.trained_tokens
    if trained == 0:
        error = (
            f"{example.where}: no trained token left after truncation to model.max_seq_length={max_length} — "
            "raise it or shorten the example"
        )
        return ([], [], EMPTY, error, False, 0, 0)
    return (encoded.input_ids, encoded.labels, OK, "", encoded.truncated, trained, len(encoded.input_ids))


def _tokenise_batch(batch: dict[str, list[Any]], **tokenise: Any) -> dict[str, list[Any]]:
    """Pass two: template, tokenise and mask a batch of examples; errors become columns."""
    out: dict[str, list[Any]] = {key: [] for key in _TOKEN_COLUMNS}
    for row in _rows(batch):
        values = _tokenise_one(_example(row), **tokenise)
        for key, value in zip(_TOKEN_COLUMNS, values, strict=True):
            out[key].append(value)
    return out


def _short(path: Path) -> str:
    """A fingerprint for the passes' outputs (datasets wants ≤ 64 characters, and they are never reused)."""
    return hashlib.sha256(str(path).encode()).hexdigest()[:16]


def _column(dataset: Dataset, name: str) -> np.ndarray:
    return dataset.data.column(name).to_numpy()


def _first_error(
    dataset: Dataset, statuses: np.ndarray, fatal: tuple[int, ...], column: str = "error", rows: Any = None
) -> tuple[int, str] | None:
    """(status, message) of the first row whose status is in ``fatal``; ``rows`` maps the statuses'
    positions to the data set's rows (None: the same)."""
    import numpy as np

    bad = np.flatnonzero(np.isin(statuses, fatal))
    if not bad.size:
        return None
    row = int(bad[0] if rows is None else rows[bad[0]])
    return int(statuses[bad[0]]), dataset[row][column]


def _reasons(
    dataset: Dataset, statuses: np.ndarray, status: int, limit: int, column: str = "error", rows: Any = None
) -> list[str]:
    """The messages of the first ``limit`` rows with ``status`` (``rows`` as in `_first_error`)."""
    import numpy as np

    found = np.flatnonzero(statuses == status)[:limit]
    return [dataset[int(i if rows is None else rows[i])][column] for i in found]


def _build(
    cfg: RunConfig, src: _Source, tokenizer: PreTrainedTokenizerBase, version: str, work: Path, out: Path
) -> dict[str, Any] | None:
    """Run the passes into ``out``; returns the entry's meta data (None: the source is not JSON)."""
    import numpy as np
    from datasets import Dataset, Features, List, Value

    d = cfg.data
    start = time.perf_counter()  # for the debug log of the passes
    work.mkdir(parents=True)
    if not _write_raw(src, work / "raw.arrow"):
        return None
    raw = Dataset.from_file(str(work / "raw.arrow"))
    path = str(src.path) if src.path is not None else ""
    if len(raw) == 0:
        raise DataError(f"data.path={src.name!r}: no usable example (0 examples ({d.format}))")
    fmt, first = _first_format(raw, src.kind, path, cfg)

    log.debug("data: raw rows written at %.1f s", time.perf_counter() - start)
    tokenise = {
        "tokenizer": tokenizer,
        "max_length": cfg.model.max_seq_length,
        "version": version,
        "extra": {"assistant_only": cfg.train.assistant_only_loss},
    }
    token_features = Features(
        {"input_ids": List(Value("int32")), "labels": List(Value("int64")), "tstatus": Value("int8")}
        | {"terror": Value("string"), "truncated": Value("bool"), "trained": Value("int64")}
        | {"length": Value("int64")}
    )
    # Every valid example is tokenised unless max_examples picks some: then one pass does both
    fused = not d.max_examples
    procs = resolve_num_proc(d.num_proc, len(raw))
    validated = raw.map(
        _validate_batch,
        batched=True,
        batch_size=BATCH_ROWS,
        with_indices=True,
        remove_columns=raw.column_names,
        fn_kwargs={
            "kind": src.kind,
            "path": path,
            "fmt": fmt,
            "first": first,
            "system_prompt": d.system_prompt,
            "tool_call_ids": d.tool_call_ids,
            "version": version,
            "tokenise": tokenise if fused else None,
        },
        features=Features(
            {"status": Value("int8"), "error": Value("string"), "where": Value("string")}
            | {"messages": Value("string"), "text": Value("string"), "tools": Value("string")}
            | (dict(token_features) if fused else {})
        ),
        num_proc=procs if procs > 1 else None,
        cache_file_name=str(work / "validated.arrow"),
        new_fingerprint=f"{_short(out)}-validated",
        load_from_cache_file=False,
        writer_batch_size=BATCH_ROWS,
        desc="validating and tokenising" if fused else "validating",
    )
    log.debug("data: validated at %.1f s", time.perf_counter() - start)
    statuses = _column(validated, "status")
    failure = _first_error(validated, statuses, (FATAL,) if d.skip_invalid else (FATAL, INVALID))
    if failure:  # validation errors come first, wherever they are, as in load_messages
        status, error = failure
        raise DataError(error if status == FATAL else f"{error} (or set data.skip_invalid=true to skip bad records)")
    skipped = int((statuses == INVALID).sum())
    reasons = _reasons(validated, statuses, INVALID, MAX_REASONS)
    valid = np.flatnonzero(statuses == OK)  # the examples, in order: rows of `validated`
    if not valid.size:
        summary = f"0 examples ({fmt or 'auto'})" + (f", {skipped} skipped: " + "; ".join(reasons) if skipped else "")
        raise DataError(f"data.path={src.name!r}: no usable example ({summary})")

    if fused:
        tokenised, rows = validated, valid  # the token columns of example i are in row valid[i]
    else:  # the same seeded pick as prepare_data_in_memory, then only those are tokenised
        valid = valid[split_examples(list(range(len(valid))), 0.0, d.seed)[0][: d.max_examples]]
        chosen = validated.select(valid)
        procs = resolve_num_proc(d.num_proc, len(chosen))
        tokenised = chosen.map(
            _tokenise_batch,
            batched=True,
            batch_size=BATCH_ROWS,
            remove_columns=chosen.column_names,
            fn_kwargs=tokenise,
            features=token_features,
            num_proc=procs if procs > 1 else None,
            cache_file_name=str(work / "tokenised.arrow"),
            new_fingerprint=f"{_short(out)}-tokenised",
            load_from_cache_file=False,
            writer_batch_size=BATCH_ROWS,
            desc="tokenising",
        )
        rows = np.arange(len(valid))
    log.debug("data: tokenised at %.1f s", time.perf_counter() - start)
    statuses = _column(tokenised, "tstatus")[rows]
    failure = _first_error(tokenised, statuses, (FATAL,) if d.skip_invalid else (FATAL, EMPTY), "terror", rows)
    if failure:
        status, error = failure
        raise DataError(error if status == FATAL else f"{error} (or set data.skip_invalid=true to skip it)")
    skipped += int((statuses == EMPTY).sum())
    reasons = [*reasons, *_reasons(tokenised, statuses, EMPTY, MAX_REASONS, "terror", rows)][:MAX_REASONS]
    kept = np.flatnonzero(statuses == OK)  # positions among the examples
    if not kept.size:
        raise DataError(f"data.path={d.path!r}: no example left to train on; first reasons: {reasons}")

    train_ids, eval_ids = (
        np.asarray(ids, dtype=np.int64) for ids in split_examples(list(range(len(kept))), d.eval_fraction, d.seed)
    )
    lengths, trained = _column(tokenised, "length")[rows], _column(tokenised, "trained")[rows]
    log.debug("data: split at %.1f s", time.perf_counter() - start)
    for name, ids in (("train", train_ids), ("eval", eval_ids)):
        if ids.size:
            _save_rows(tokenised, rows[kept[ids]], ["input_ids", "labels"], out / name)
            _save_rows(validated, valid[kept[ids]], list(_EXAMPLE_COLUMNS), out / f"{name}_examples")
    stats = {
        "train_examples": len(train_ids),
        "eval_examples": len(eval_ids),
        "skipped": skipped,
        "skip_reasons": reasons,
        "truncated": int(_column(tokenised, "truncated")[rows][kept].sum()),
        "train_tokens": int(lengths[kept[train_ids]].sum()),
        "trained_tokens": int(trained[kept[train_ids]].sum()),
        "max_length": int(lengths[kept].max()),
    }
    log.debug("data: saved at %.1f s", time.perf_counter() - start)
    return {"format": fmt, "stats": stats, "processes": procs}


def _save_rows(dataset: Dataset, rows: np.ndarray, columns: list[str], out: Path) -> None:
    """Save ``columns`` of ``dataset``'s ``rows`` to ``out``; `_load_rows` gives them back in that order.

    Not ``dataset.select(rows).save_to_disk()``: that gathers the rows through the memory-mapped pass
    files in the split's shuffled order, touching every page of them at once (at 1M conversations the
    process's RSS grew to 2.2 GiB of mapped pages while saving). Here the pass files are read as a stream
    (`pyarrow.OSFile`: read into a batch-sized buffer, no map), the wanted rows are written in file order,
    and the seeded order is kept as an index (``order.npy``, 8 bytes a row) applied when loading.
    """
    import numpy as np
    import pyarrow as pa
    from datasets import Features

    if dataset._indices is not None:  # the pass outputs are plain files; a selection would need its mapping
        raise RuntimeError("internal: _save_rows needs a data set without an indices mapping")
    ordered = np.sort(rows)
    features = Features({name: dataset.features[name] for name in columns})
    schema = features.arrow_schema
    out.mkdir(parents=True)
    start = done = 0  # first row of the current batch; rows of `ordered` written so far
    with pa.OSFile(str(out / "rows.arrow"), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for info in dataset.cache_files:
            with pa.OSFile(info["filename"]) as source:
                for batch in pa.ipc.open_stream(source):
                    end = start + batch.num_rows
                    stop = int(np.searchsorted(ordered, end))
                    if stop > done:
                        take = pa.array(ordered[done:stop] - start)
                        arrays = [batch.column(batch.schema.get_field_index(name)).take(take) for name in columns]
                        writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=schema))
                    start, done = end, stop
    if start != len(dataset) or done != len(rows):
        raise RuntimeError(f"internal: read {start} of {len(dataset)} rows, wrote {done} of {len(rows)}")
    np.save(out / "order.npy", np.searchsorted(ordered, rows))  # rows are distinct: each one's place in file order


def _load_rows(path: Path) -> Dataset | None:
    """A split saved by `_save_rows` (memory-mapped), in its seeded order; None if there is none."""
    import numpy as np
    from datasets import Dataset

    if not path.is_dir():
        return None
    rows = Dataset.from_file(str(path / "rows.arrow"))
    # The order as an in-memory index (8 bytes a row): nothing is written into the cache entry on load.
    return rows.select(np.load(path / "order.npy"), keep_in_memory=True)


def _load(entry: Path, meta: dict[str, Any], cache: str) -> PreparedData:
    train, train_examples = _load_rows(entry / "train"), _load_rows(entry / "train_examples")
    if train is None or train_examples is None:
        raise RuntimeError(f"internal: the cache entry {entry} has no train split")
    eval_examples = _load_rows(entry / "eval_examples")
    return PreparedData(
        train,
        _load_rows(entry / "eval"),
        ExampleRows(train_examples),
        ExampleRows(eval_examples) if eval_examples is not None else [],
        meta["format"],
        meta["stats"],
        cache,
    )


def prepare_data(cfg: RunConfig, tokenizer: PreTrainedTokenizerBase | None = None, source: Any = None) -> PreparedData:
    """Load, validate, split and tokenise the data of a run (the data-preparation entry point).

    Runs as `datasets` passes over Arrow files with ``data.num_proc`` processes and caches the result
    (see the module's docstring); the ids, labels, split, stats and examples are those of
    `prepare_data_in_memory`, id for id.

    Args:
        cfg: the run config (``data`` section, ``model.max_seq_length``, ``model.tokenizer``).
        tokenizer: a tokenizer with the chat template; the exact Mistral one for ``cfg.model.tokenizer``
            if None.
        source: overrides ``cfg.data.path`` (a path, a `datasets` name or a `datasets.Dataset`).

    Raises:
        DataError: a bad record (``file:line: what — what to do``) or an example with no trained token
            left after truncation, unless ``data.skip_invalid`` is set.
    """
    version = tokenizer_version(cfg.model)
    src = _resolve_source(cfg, source)
    if src is None:
        return prepare_data_in_memory(cfg, tokenizer, source)
    if tokenizer is None and (cfg.model.tokenizer != "model" or cfg.model.name_or_path == "tiny"):
        tokenizer_key = _builtin_tokenizer_fingerprint(version)  # built only on a cache miss
    else:
        tokenizer = tokenizer if tokenizer is not None else tokenizer_for(cfg.model)
        tokenizer_key = _tokenizer_fingerprint(tokenizer)
    key = cache_key(cfg, src.content, src.name, tokenizer_key, version)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    entry = cache_root() / digest
    if (entry / "meta.json").is_file():
        meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
        prepared = _load(entry, meta, f"reused from the cache: {entry}")
        log.info("data: reusing prepared data from %s (same data, tokenizer and settings; not re-tokenised)", entry)
        log.info("data: %s", prepared.summary().replace("\n", "; "))
        return prepared

    start = time.perf_counter()
    tokenizer = tokenizer if tokenizer is not None else tokenizer_for(cfg.model)
    remove_stale_temps(entry)
    tmp = temp_sibling(entry)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        meta = _build(cfg, src, tokenizer, version, tmp / "work", tmp)
        if meta is None:
            return prepare_data_in_memory(cfg, tokenizer, source)
        shutil.rmtree(tmp / "work")
        meta |= {"key": key, "seconds": round(time.perf_counter() - start, 2)}
        write_text_atomic(tmp / "meta.json", json.dumps(meta, indent=1, ensure_ascii=False))
        try:
            os.rename(tmp, entry)  # whole or not at all; a directory rename is atomic
        except OSError:
            if not (entry / "meta.json").is_file():
                raise
            log.info("data: another process prepared %s first; using it", entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    prepared = _load(entry, meta, f"built in {entry}")
    log.info(
        "data: prepared in %.1f s with %d process(es); cached in %s",
        time.perf_counter() - start,
        meta["processes"],
        entry,
    )
    log.info("data: %s", prepared.summary().replace("\n", "; "))
    return prepared
