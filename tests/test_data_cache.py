"""Cached, parallel data preparation: the same rows as the in-process path and mistral_common, reused
when nothing that changes them changed, rebuilt when something did, errors with file:line from workers."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import yaml

import mistral_fast.dataset as dataset_module
from mistral_fast.config import DATA_DIR, load_config
from mistral_fast.constants import MAX_REASONS
from mistral_fast.dataset import cache_root, prepare_data, prepare_data_in_memory
from mistral_fast.errors import DataError
from mistral_fast.tokenizer import IGNORE_INDEX, load_tokenizer, reference_tokenizer

SAMPLE = [json.loads(line) for line in (DATA_DIR / "sample_chat.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("v3")


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch) -> Path:
    """Each test its own cache directory (and so its own misses)."""
    monkeypatch.setenv("MISTRAL_FAST_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def entries() -> list[Path]:
    root = cache_root()
    return sorted(p for p in root.iterdir()) if root.is_dir() else []


def mixed_file(tmp_path: Path) -> Path:
    """Sample conversations with bad records, blank lines, too-long examples and raw-JSON oddities
    spread over the file, so that two workers each meet some of them."""
    long_system = {"role": "system", "content": "word " * 200}
    lines = []
    for i, row in enumerate(SAMPLE):
        lines.append(json.dumps(row))
        if i % 23 == 5:
            lines.append(json.dumps({"messages": [{"role": "assistant", "content": "starts wrong"}]}))
        if i % 41 == 7:
            lines.append("   ")
        if i % 29 == 3:
            lines.append(json.dumps({"messages": [long_system, *row["messages"]]}))
        if i % 53 == 11:
            lines.append(
                json.dumps({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]})
            )
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def same(new, old) -> None:
    """Row for row, id for id: ids, labels, features, stats, format and the conversations behind them."""
    assert new.train["input_ids"] == old.train["input_ids"] and new.train["labels"] == old.train["labels"]
    assert new.train.features == old.train.features
    assert (new.eval is None) == (old.eval is None)
    if old.eval is not None:
        assert new.eval["input_ids"] == old.eval["input_ids"] and new.eval["labels"] == old.eval["labels"]
    assert new.stats == old.stats and new.format == old.format
    assert list(new.train_examples) == list(old.train_examples)
    assert list(new.eval_examples) == list(old.eval_examples)


@pytest.mark.parametrize("num_proc", [1, 2])
@pytest.mark.parametrize(
    "overrides",
    [
        ["data.skip_invalid=true", "model.max_seq_length=96", "data.eval_fraction=0.15"],
        ["data.skip_invalid=true", "data.max_examples=60", "data.seed=3", "data.system_prompt=Be brief."],
    ],
    ids=["skips", "max-examples"],
)
def test_cached_parallel_path_equals_in_process_path_and_mistral_common(tmp_path, tok, num_proc, overrides) -> None:
    path = mixed_file(tmp_path)
    cfg = load_config(None, [f"data.path={path}", f"data.num_proc={num_proc}", *overrides])
    new, old = prepare_data(cfg, tok), prepare_data_in_memory(cfg, tok)
    same(new, old)
    assert new.stats["skipped"] >= MAX_REASONS and len(new.stats["skip_reasons"]) == MAX_REASONS
    assert new.cache.startswith("built")
    # labels from mistral_common's own SentencePiece tokenizer, as tests/test_prepare.py does
    sp = reference_tokenizer("v3").instruct_tokenizer.tokenizer
    for row, example in zip(new.train, new.train_examples, strict=True):
        expected = []
        for message in example.messages:
            if message["role"] == "assistant":
                expected += [*sp.encode(message["content"].rstrip(" "), bos=False, eos=False), sp.eos_id]
        trained = [t for t in row["labels"] if t != IGNORE_INDEX]
        assert trained == expected[: len(trained)] and len(trained) > 0, example.where
        if len(row["input_ids"]) < cfg.model.max_seq_length:
            assert trained == expected, example.where


def test_other_formats_and_a_datasets_source_equal_the_in_process_path(tmp_path, tok) -> None:
    from datasets import Dataset

    alpaca = tmp_path / "a.json"
    alpaca.write_text(json.dumps([{"instruction": f"Say {i}", "input": "", "output": f"{i}"} for i in range(30)]))
    csv = tmp_path / "c.csv"
    csv.write_text("prompt,completion\n" + "".join(f'"Add {i} and 1","{i + 1}"\n' for i in range(30)))
    for source in (str(alpaca), str(csv), Dataset.from_list(SAMPLE[:40])):
        cfg = load_config(None, ["data.num_proc=2", "data.eval_fraction=0.2"])
        same(prepare_data(cfg, tok, source), prepare_data_in_memory(cfg, tok, source))


def test_second_call_reuses_the_cache_without_tokenising(tmp_path, tok, monkeypatch, caplog) -> None:
    calls = []
    real = dataset_module.tokenize_example

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(dataset_module, "tokenize_example", counting)  # in-process passes (num_proc=1) see it
    cfg = load_config("smoke", ["data.num_proc=1", "data.max_examples=30"])
    first = prepare_data(cfg, tok)
    assert len(calls) == 30 and first.cache.startswith("built")
    calls.clear()
    with caplog.at_level(logging.INFO, logger="mistral_fast"):
        second = prepare_data(cfg, tok)
    assert calls == [], "a cache hit must not tokenise"
    assert "reusing prepared data" in caplog.text and "reused from the cache" in second.summary()
    same(second, first)
    assert prepare_data(cfg.with_overrides({"data.num_proc": 2}), tok).cache.startswith("reused"), (
        "the number of processes does not change the result, so it is no part of the key"
    )
    assert calls == [] and len(entries()) == 1


@pytest.mark.parametrize(
    "change",
    [
        {"model.max_seq_length": 64},
        {"data.system_prompt": "Be brief."},
        {"data.skip_invalid": True},
        {"data.eval_fraction": 0.2},
        {"data.seed": 7},
        {"data.max_examples": 20},
        {"data.format": "messages"},
        {"train.assistant_only_loss": False},
        {"data.tool_call_ids": "regenerate"},
    ],
    ids=lambda c: next(iter(c)),
)
def test_a_change_in_a_key_field_rebuilds(tok, change) -> None:
    cfg = load_config("smoke", ["data.num_proc=1", "data.max_examples=30"])
    assert prepare_data(cfg, tok).cache.startswith("built")
    assert prepare_data(cfg.with_overrides(change), tok).cache.startswith("built")
    assert len(entries()) == 2


def test_the_key_is_the_file_content_not_its_mtime(tmp_path, tok) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in SAMPLE[:20]))
    cfg = load_config(None, [f"data.path={path}", "data.num_proc=1"])
    first = prepare_data(cfg, tok)
    os.utime(path, (1, 1))  # touched: same content
    assert prepare_data(cfg, tok).cache.startswith("reused")
    stat = path.stat()
    path.write_text("".join(json.dumps(r) + "\n" for r in SAMPLE[1:21]))  # new content, old mtime
    os.utime(path, (stat.st_atime, stat.st_mtime))
    again = prepare_data(cfg, tok)
    assert again.cache.startswith("built") and again.train["input_ids"] != first.train["input_ids"]
    assert prepare_data(cfg, load_tokenizer("v1")).cache.startswith("built"), "another tokenizer, another entry"


def test_errors_from_two_workers_keep_file_line_and_come_in_file_order(tmp_path, tok) -> None:
    lines = [json.dumps(r) for r in SAMPLE[:60]]
    lines[44] = json.dumps({"messages": [{"role": "user", "content": "hi"}]})  # line 45: in the second half
    lines[50] = "{not json"  # line 51: unreadable, after the first bad record
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    cfg = load_config(None, [f"data.path={path}", "data.num_proc=2"])
    with pytest.raises(DataError, match=r"d\.jsonl:45: .*'assistant'.*data\.skip_invalid=true"):
        prepare_data(cfg, tok)
    with pytest.raises(DataError, match=r"d\.jsonl:51: not valid JSON"):  # fatal even when skipping
        prepare_data(cfg.with_overrides({"data.skip_invalid": True}), tok)
    lines[50] = json.dumps(
        {"messages": [{"role": "user", "content": "say [INST]"}, {"role": "assistant", "content": "x"}]}
    )
    lines[3] = json.dumps({"messages": [{"role": "user", "content": "hi"}]})  # line 4: first half
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl:4: "):
        prepare_data(cfg, tok)
    skipping = cfg.with_overrides({"data.skip_invalid": True})
    data = prepare_data(skipping, tok)
    assert data.stats["skipped"] == 3
    assert [r.split(": ")[0].rsplit("/", 1)[-1] for r in data.stats["skip_reasons"]] == [
        "d.jsonl:4",
        "d.jsonl:45",
        "d.jsonl:51",
    ]
    assert data.stats == prepare_data_in_memory(skipping, tok).stats
    assert not [p for p in cache_root().iterdir() if p.name.startswith(".")], "no temporary left by failed builds"


def test_a_failed_build_leaves_no_entry(tmp_path, tok) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl:1: "):
        prepare_data(load_config(None, [f"data.path={path}"]), tok)
    assert entries() == []


@pytest.mark.slow
def test_a_sweeps_second_variation_reuses_the_first_ones_prepared_data(tmp_path, own_cache, monkeypatch) -> None:
    from mistral_fast.runner import run_sweep

    fast = {"train.max_steps": 2, "train.eval_steps": 2, "train.save_steps": 2, "data.max_examples": 24}
    spec = {
        "notebook": "01_finetune",
        "parameters": {"smoke": True, "overrides": fast | {"eval.num_samples": 1, "eval.max_new_tokens": 4}},
        "grid": {"lora_rank": [4, 8]},
        "out": str(tmp_path / "sweep"),
        "timeout": 300,
    }
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump(spec))
    monkeypatch.chdir(tmp_path)  # restored after the test
    rows, _ = run_sweep(sweep)  # the kernels inherit MISTRAL_FAST_CACHE
    assert [r["status"] for r in rows] == ["done", "done"]
    assert len(entries()) == 1, "both variations share one prepared data set"
    notebooks = [
        json.loads((Path(spec["out"]) / r["name"] / "status.json").read_text())["output_notebook"] for r in rows
    ]
    first, second = (Path(n).read_text() for n in notebooks)
    assert "reused from the cache" not in first
    assert "reused from the cache" in second


def test_num_proc_is_checked_and_resolved() -> None:
    from mistral_fast.dataset import MIN_ROWS_PER_PROC, resolve_num_proc
    from mistral_fast.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data\.num_proc=-2 is invalid"):
        load_config(None, ["data.num_proc=-2"])
    assert resolve_num_proc(0, 10**6) == resolve_num_proc(1, 10**6) == 1
    assert resolve_num_proc(4, 3) == 3, "no more processes than rows"
    assert resolve_num_proc(-1, MIN_ROWS_PER_PROC - 1) == 1, "auto: small data stays in process"
    assert 1 <= resolve_num_proc(-1, 10**7) <= len(os.sched_getaffinity(0))
