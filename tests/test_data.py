"""Data loading: every input format to `messages`, validation with file:line errors, splits."""

from __future__ import annotations

import json

import pytest

from mistral_fast.config import DATA_DIR, DataConfig
from mistral_fast.data import load_messages, split_examples
from mistral_fast.errors import DataError, TokenizerError
from mistral_fast.tokenizer import validate_conversation

CHAT = [
    {"role": "user", "content": "Convert 1 km to mi."},
    {"role": "assistant", "content": "1 km = 0.62 mi."},
]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_sample_chat_data_is_valid_and_varied() -> None:
    loaded = load_messages(DataConfig(path=str(DATA_DIR / "sample_chat.jsonl")))
    assert loaded.format == "messages" and len(loaded.examples) >= 200 and loaded.skipped == 0
    convs = [e.messages for e in loaded.examples]
    assert sum(any(m["role"] == "system" for m in c) for c in convs) >= 20
    assert sum(len(c) > 3 for c in convs) >= 20  # several turns


def test_sample_alpaca_is_converted() -> None:
    loaded = load_messages(DataConfig(path=str(DATA_DIR / "sample_alpaca.jsonl")))
    assert loaded.format == "alpaca"
    first = loaded.examples[0].messages
    assert [m["role"] for m in first] == ["user", "assistant"]
    assert "\n\n" in first[0]["content"]  # instruction + blank line + input


@pytest.mark.parametrize(
    ("row", "fmt", "roles"),
    [
        ({"messages": CHAT}, "messages", ["user", "assistant"]),
        (
            {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
            "sharegpt",
            ["user", "assistant"],
        ),
        (
            {
                "conversations": [
                    {"from": "system", "value": "be brief"},
                    {"from": "human", "value": "hi"},
                    {"from": "gpt", "value": "hello"},
                ]
            },
            "sharegpt",
            ["system", "user", "assistant"],
        ),
        ({"instruction": "Add", "input": "", "output": "2"}, "alpaca", ["user", "assistant"]),
        ({"prompt": "2+2=", "completion": "4"}, "prompt_completion", ["user", "assistant"]),
    ],
)
def test_formats_normalise_to_messages(tmp_path, row, fmt, roles) -> None:
    loaded = load_messages(DataConfig(path=write_jsonl(tmp_path / "d.jsonl", [row])))
    assert loaded.format == fmt
    assert [m["role"] for m in loaded.examples[0].messages] == roles


def test_raw_text(tmp_path) -> None:
    loaded = load_messages(DataConfig(path=write_jsonl(tmp_path / "d.jsonl", [{"text": "once upon a time"}])))
    assert loaded.format == "text" and loaded.examples[0].text == "once upon a time"


def test_csv_parquet_json_and_datasets_objects(tmp_path) -> None:
    import datasets

    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(3)]
    ds = datasets.Dataset.from_list(rows)
    ds.to_csv(tmp_path / "d.csv", index=False)
    ds.to_parquet(tmp_path / "d.parquet")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    for source in (tmp_path / "d.csv", tmp_path / "d.parquet", tmp_path / "d.json", ds):
        loaded = load_messages(DataConfig(), source=source)
        assert [e.messages[1]["content"] for e in loaded.examples] == ["a0", "a1", "a2"], source


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([json.dumps({"messages": CHAT}), "{not json"], r"d\.jsonl:2: not valid JSON"),
        (
            [json.dumps({"messages": [{"role": "robot", "content": "x"}, *CHAT]})],
            r"d\.jsonl:1: .*unknown role 'robot'",
        ),
        (
            [json.dumps({"messages": [CHAT[0], {"role": "assistant", "content": "  "}]})],
            r":1: .*empty content",
        ),
        ([json.dumps({"messages": [CHAT[0], CHAT[0], CHAT[1]]})], r":1: .*two 'user' turns in a row"),
        ([json.dumps({"messages": [CHAT[1], CHAT[0]]})], r":1: .*must start with 'user'"),
        ([json.dumps({"messages": [CHAT[0]]})], r":1: .*ends with 'user', not 'assistant'"),
        ([json.dumps({"messages": CHAT}), json.dumps({"question": "x"})], r":2: missing column.*'messages'"),
        (
            [json.dumps({"instruction": "x"}), json.dumps({"instruction": "y", "output": "z"})],
            r":1: cannot tell",
        ),
        ([json.dumps([1, 2])], r":1: expected a JSON object"),
        ([json.dumps({"messages": "hello"})], r":1: column 'messages' must be a list"),
        ([json.dumps({"messages": [{"role": "user", "content": 3}, CHAT[1]]})], r"must be a string"),
    ],
)
def test_bad_records_name_file_line_and_what_to_do(tmp_path, lines, message) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message) as info:
        load_messages(DataConfig(path=str(path)))
    assert "\n" not in str(info.value)


def test_non_utf8_file_names_the_line(tmp_path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps({"messages": CHAT}).encode() + b"\n" + b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: not UTF-8 .*re-save the file as UTF-8"):
        load_messages(DataConfig(path=str(path)))


def test_missing_file_and_empty_file(tmp_path) -> None:
    with pytest.raises(DataError, match="no such file"):
        load_messages(DataConfig(path=str(tmp_path / "nope.jsonl")))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="no usable example"):
        load_messages(DataConfig(path=str(tmp_path / "empty.jsonl")))


def test_skip_invalid_counts_and_keeps_first_reasons(tmp_path) -> None:
    bad = {"messages": [CHAT[0]]}
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}, bad, bad, {"messages": CHAT}])
    loaded = load_messages(DataConfig(path=path, skip_invalid=True))
    assert len(loaded.examples) == 2 and loaded.skipped == 2
    assert loaded.reasons[0].startswith(f"{path}:2:")
    assert "2 skipped" in loaded.summary()


def test_system_prompt_is_added_where_missing(tmp_path) -> None:
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [{"messages": CHAT}, {"messages": [{"role": "system", "content": "own"}, *CHAT]}],
    )
    loaded = load_messages(DataConfig(path=path, system_prompt="Be brief."))
    assert loaded.examples[0].messages[0] == {"role": "system", "content": "Be brief."}
    assert loaded.examples[1].messages[0]["content"] == "own"


def test_system_message_placement_follows_mistral_common() -> None:
    system = {"role": "system", "content": "s"}
    validate_conversation([system, CHAT[0], system, CHAT[1]], training=True)  # after a user turn: accepted
    with pytest.raises(TokenizerError, match=r"messages\[2\]: a system message directly after an assistant"):
        validate_conversation([CHAT[0], CHAT[1], system, CHAT[0], CHAT[1]], training=True)


def test_split_is_deterministic_and_disjoint() -> None:
    items = list(range(100))
    train, evaluation = split_examples(items, 0.1, seed=3)
    assert len(evaluation) == 10 and sorted(train + evaluation) == items
    assert split_examples(items, 0.1, seed=3) == (train, evaluation)
    assert split_examples(items, 0.1, seed=4)[1] != evaluation
    assert split_examples(items[:3], 0.01, seed=0)[1]  # at least one eval example when asked for
