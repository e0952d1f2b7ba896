"""Data preparation end to end: ids and assistant-only labels checked against mistral_common."""

from __future__ import annotations

import json

import pytest

from mistral_fast.config import load_config
from mistral_fast.dataset import prepare_data
from mistral_fast.errors import DataError
from mistral_fast.tokenizer import (
    IGNORE_INDEX,
    load_tokenizer,
    preview_example,
    reference_chat_ids,
    reference_tokenizer,
)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("v3")


def write(tmp_path, rows) -> str:
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_labels_are_exactly_the_assistant_answers_and_their_eos(tok) -> None:
    cfg = load_config("smoke", ["data.max_examples=40"])
    data = prepare_data(cfg, tok)
    sp = reference_tokenizer("v3").instruct_tokenizer.tokenizer  # mistral_common's SentencePiece tokenizer
    for row, example in zip(data.train, data.train_examples, strict=True):
        trained = [t for t in row["labels"] if t != IGNORE_INDEX]
        expected = []
        for message in example.messages:
            if message["role"] == "assistant":
                expected += [*sp.encode(message["content"].rstrip(" "), bos=False, eos=False), sp.eos_id]
        assert trained == expected, example.where
        assert row["labels"][0] == IGNORE_INDEX and row["input_ids"][0] == sp.bos_id
    assert tok.pad_token_id != tok.eos_token_id


def test_split_is_deterministic_and_summary_counts(tok) -> None:
    cfg = load_config("smoke")
    a, b = prepare_data(cfg, tok), prepare_data(cfg, tok)
    assert a.train["input_ids"] == b.train["input_ids"] and a.eval["input_ids"] == b.eval["input_ids"]
    assert a.stats["train_examples"] + a.stats["eval_examples"] == 240 and a.stats["eval_examples"] == 24
    other = prepare_data(cfg.with_overrides({"data.seed": 7}), tok)
    assert other.eval["input_ids"] != a.eval["input_ids"]
    assert "216 train / 24 eval" in a.summary()


def test_truncation_guard_fails_loudly_or_skips(tmp_path, tok) -> None:
    long_system = {"role": "system", "content": "word " * 200}
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"messages": [long_system, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
    ]
    cfg = load_config(None, [f"data.path={write(tmp_path, rows)}", "model.max_seq_length=64", "data.eval_fraction=0"])
    with pytest.raises(DataError, match=r"d\.jsonl:2: no trained token left .*model\.max_seq_length=64"):
        prepare_data(cfg, tok)
    data = prepare_data(cfg.with_overrides({"data.skip_invalid": True}), tok)
    assert len(data.train) == 1 and data.stats["skipped"] == 1


def test_truncated_examples_keep_their_trained_prefix(tmp_path, tok) -> None:
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "long answer " * 40}]}]
    cfg = load_config(None, [f"data.path={write(tmp_path, rows)}", "model.max_seq_length=32", "data.eval_fraction=0"])
    data = prepare_data(cfg, tok)
    assert len(data.train[0]["input_ids"]) == 32 and data.stats["truncated"] == 1


def test_control_token_text_is_reported_with_file_line(tmp_path, tok) -> None:
    rows = [{"messages": [{"role": "user", "content": "say [INST]"}, {"role": "assistant", "content": "no"}]}]
    with pytest.raises(DataError, match=r"d\.jsonl:1: messages\[0\] \(user\).*'\[INST\]'"):
        prepare_data(load_config(None, [f"data.path={write(tmp_path, rows)}"]), tok)


def test_raw_text_trains_every_token_and_eos(tmp_path, tok) -> None:
    cfg = load_config(None, [f"data.path={write(tmp_path, [{'text': 'Once upon a time.'}])}", "data.eval_fraction=0"])
    row = prepare_data(cfg, tok).train[0]
    ids = [tok.bos_token_id, *tok.encode("Once upon a time.", add_special_tokens=False), tok.eos_token_id]
    assert row["input_ids"] == ids and row["labels"] == [IGNORE_INDEX, *ids[1:]]


def test_preview_marks_the_trained_part(tok) -> None:
    data = prepare_data(load_config("smoke", ["data.max_examples=5"]), tok)
    row, example = data.train[0], data.train_examples[0]
    text = preview_example(tok, row["input_ids"], row["labels"])
    answers = [m["content"] for m in example.messages if m["role"] == "assistant"]
    assert text.count("⟦") == len(answers) and all(f"⟦{a}</s>⟧" in text for a in answers)


def test_assistant_only_loss_false_trains_every_token_of_the_conversation(tok) -> None:
    """``train.assistant_only_loss``: true trains the answers and their </s> only; false trains every token
    (TRL's behaviour without an assistant mask: labels = input_ids; padding is masked later by the collator).
    Both keep mistral_common's ids; only the labels differ."""
    cfg = load_config("smoke", ["data.max_examples=20", "data.eval_fraction=0"])
    only = prepare_data(cfg, tok)
    every = prepare_data(cfg.with_overrides({"train.assistant_only_loss": False}), tok)
    assert only.train["input_ids"] == every.train["input_ids"]
    assert only.train["labels"] != every.train["labels"], "train.assistant_only_loss changed nothing"
    for a, b, example in zip(only.train, every.train, only.train_examples, strict=True):
        reference = reference_chat_ids(example.messages)  # mistral_common's ids for the whole conversation
        assert b["input_ids"] == reference, example.where
        assert b["labels"] == reference, "with assistant_only_loss=false every token is a target"
        # the prompt tokens (BOS, [INST] … [/INST], user text) are what assistant_only_loss=true leaves out
        masked = [t for t, label in zip(reference, a["labels"], strict=True) if label == IGNORE_INDEX]
        assert masked and masked[0] == tok.bos_token_id and tok.convert_tokens_to_ids("[INST]") in masked
        assert all(label in (IGNORE_INDEX, t) for t, label in zip(reference, a["labels"], strict=True))
    assert every.stats["trained_tokens"] == every.stats["train_tokens"] > only.stats["trained_tokens"]


def test_assistant_only_loss_false_truncates_like_true(tmp_path, tok) -> None:
    long_system = {"role": "system", "content": "word " * 200}
    rows = [{"messages": [long_system, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    cfg = load_config(None, [f"data.path={write(tmp_path, rows)}", "model.max_seq_length=64", "data.eval_fraction=0"])
    row = prepare_data(cfg.with_overrides({"train.assistant_only_loss": False}), tok).train[0]
    # the answer was cut off, but the system prompt is trained too: the example keeps trained tokens
    assert row["labels"] == row["input_ids"] and len(row["input_ids"]) == 64
