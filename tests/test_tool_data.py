"""Tool-call data: the ``tools`` column in every source, OpenAI and ShareGPT layouts, the validator, call ids.

References: mistral_common's own request validator (``MistralRequestValidatorV3`` in finetuning mode, fed
through ``ChatCompletionRequest.from_openai``) decides which call ids Mistral's format takes and whether a
converted conversation is one it accepts; pyarrow and `datasets` write the parquet and Arrow sources.
"""

from __future__ import annotations

import copy
import csv
import json
import random
import string

import pytest

from mistral_fast.config import DATA_DIR, DataConfig, RunConfig
from mistral_fast.data import check_tool_calls, load_messages, record_tools, regenerate_tool_call_ids, to_messages
from mistral_fast.errors import ConfigError, DataError

SAMPLE = DATA_DIR / "sample_tools.jsonl"
ROWS = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()]
# every tool of the sample (a row offers the tools it calls and sometimes one more)
ALL_TOOLS = list({t["function"]["name"]: t for r in ROWS for t in r["tools"]}.values())


def mistral_common_refusal(messages, tools) -> str | None:
    """What mistral_common's finetuning validator says about a conversation (None: accepted)."""
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.validator import MistralRequestValidatorV3, ValidationMode

    try:
        request = ChatCompletionRequest.from_openai(messages=copy.deepcopy(messages), tools=tools)
        MistralRequestValidatorV3(ValidationMode.finetuning).validate_request(request)
    except Exception as err:  # mistral_common raises several exception types (and pydantic's)
        return f"{type(err).__name__}: {err}"
    return None


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def one_call_row(index: int = 0) -> dict:
    return copy.deepcopy([r for r in ROWS if len(r["messages"]) == 4 and r["messages"][1].get("tool_calls")][index])


def test_sample_tools_is_valid_for_mistral_common_and_varied() -> None:
    assert len(ROWS) >= 300
    calls = [c for r in ROWS for m in r["messages"] for c in m.get("tool_calls") or []]
    assert {c["function"]["name"] for c in calls} == {"convert_units", "calculate", "lookup_capital"}
    assert sum(len(m.get("tool_calls") or []) > 1 for r in ROWS for m in r["messages"]) >= 20  # parallel calls
    assert sum(not any(m.get("tool_calls") for m in r["messages"]) for r in ROWS) >= 10  # no call needed
    requests = [r["messages"][0]["content"] for r in ROWS if r["messages"][1].get("tool_calls")]
    assert len(set(requests)) == len(requests)  # a held-out request is never a training request
    for row in ROWS:
        assert mistral_common_refusal(row["messages"], row["tools"]) is None
        check_tool_calls(to_messages(row, "messages"), record_tools(row))


def _random_id(rng: random.Random) -> str:
    """A call id as other models' data has them: often not Mistral's 9 alphanumerics."""
    kind = rng.choice(["mistral", "openai", "short", "long", "dash", "unicode"])
    alnum = string.ascii_letters + string.digits
    return {
        "mistral": "".join(rng.choice(alnum) for _ in range(9)),
        "openai": "call_" + "".join(rng.choice(alnum) for _ in range(24)),
        "short": "".join(rng.choice(alnum) for _ in range(rng.randint(1, 8))),
        "long": "".join(rng.choice(alnum) for _ in range(10)),
        "dash": "abcd-1234",
        "unicode": "abcdéf123",
    }[kind]


def test_call_id_verdicts_match_mistral_common_and_regenerate_fixes_them() -> None:
    """Our refusal of a call id agrees with mistral_common's, and after `regenerate` mistral_common accepts."""
    rng = random.Random(0)
    refused = 0
    for row in rng.sample(ROWS, 60):
        messages = to_messages(copy.deepcopy(row), "messages")
        answered = {}  # index of each result -> the name of the call it answers (from the original data)
        for message in messages:
            for call in message.get("tool_calls") or []:
                new = _random_id(rng)
                for j, other in enumerate(messages):
                    if other.get("tool_call_id") == call["id"]:
                        other["tool_call_id"], answered[j] = new, call["function"]["name"]
                call["id"] = new
        reference = mistral_common_refusal(messages, row["tools"])
        try:
            check_tool_calls(messages, row["tools"])
            ours = None
        except DataError as err:
            ours = str(err)
            assert "data.tool_call_ids=regenerate" in ours and "\n" not in ours
        assert (ours is None) == (reference is None), (ours, reference)
        refused += ours is not None
        fixed = regenerate_tool_call_ids(messages)
        assert mistral_common_refusal(fixed, row["tools"]) is None
        check_tool_calls(fixed, row["tools"])
        calls = {c["id"]: c["function"]["name"] for m in fixed for c in m.get("tool_calls") or []}
        assert {j: calls[fixed[j]["tool_call_id"]] for j in answered} == answered  # each result still its call's
        assert regenerate_tool_call_ids(messages) == fixed  # deterministic
    assert 10 <= refused < 60


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda r: r["messages"][1]["tool_calls"][0].update(id="call_1"),
            r"\.jsonl:2: messages\[1\]\.tool_calls\[0\]: call id 'call_1' is not 9 letters",
        ),
        (
            lambda r: r["messages"][2].update(tool_call_id="AAAAAAAAA"),
            r":2: messages\[2\] \(tool\): tool_call_id 'AAAAAAAAA' matches no call",
        ),
        (
            lambda r: r["messages"][1]["tool_calls"][0]["function"].update(name="nope"),
            r":2: .*call to 'nope', which is not in this record's tools",
        ),
        (lambda r: r.pop("tools"), r":2: .*call to '\w+', which is not in this record, which has no tools column"),
        (
            lambda r: r["messages"][1]["tool_calls"][0]["function"].update(arguments="{'x': 1}"),
            r":2: .*are not valid JSON",
        ),
        (
            lambda r: r["messages"][1]["tool_calls"][0]["function"].update(arguments="[1, 2]"),
            r":2: .*must be a JSON object, got list",
        ),
        (
            lambda r: r["messages"][1]["tool_calls"][0]["function"].update(arguments="{}"),
            r":2: .*do not fit its parameters schema: '\w+' is a required property",
        ),
        (
            lambda r: r["messages"].__setitem__(1, {"role": "assistant", "content": "ok"}),
            r":2: messages\[2\] \(tool\): a tool result not preceded by an assistant tool call",
        ),
        (lambda r: r.update(tools="[{"), r":2: column 'tools' must be a list \(or its JSON text\)"),
        (lambda r: r.update(tools=[{"type": "function", "function": {"description": "x"}}]), r":2: tools\[0\] must be"),
    ],
)
def test_bad_tool_records_are_one_line_with_file_line(tmp_path, edit, message) -> None:
    bad = one_call_row(1)
    edit(bad)
    path = write_jsonl(tmp_path / "t.jsonl", [one_call_row(0), bad])
    with pytest.raises(DataError, match=message) as info:
        load_messages(DataConfig(path=path), version="v3")
    assert "\n" not in str(info.value)


def test_arguments_are_checked_against_the_schema_types_and_enums() -> None:
    tools = next(r["tools"] for r in ROWS if any(t["function"]["name"] == "calculate" for t in r["tools"]))
    call = {"id": "abcdefghi", "type": "function", "function": {"name": "calculate"}}
    conversation = [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [call]}]
    for arguments, fits in [
        ({"operation": "add", "a": 3, "b": 4}, True),
        ('{"operation": "divide", "a": 2.5, "b": -1}', True),
        ({"operation": "add", "a": "3", "b": 4}, False),  # a string where a number is asked for
        ({"operation": "power", "a": 3, "b": 4}, False),  # not in the enum
        ({"operation": "add", "a": 3}, False),  # a required key missing
    ]:
        call["function"]["arguments"] = arguments
        if fits:
            check_tool_calls(conversation, tools)
        else:
            with pytest.raises(DataError, match="do not fit its parameters schema"):
                check_tool_calls(conversation, tools)


def test_regenerate_is_a_data_setting_and_makes_other_models_data_load(tmp_path) -> None:
    row = one_call_row(0)
    row["messages"][1]["tool_calls"][0]["id"] = row["messages"][2]["tool_call_id"] = "call_Xy1"
    path = write_jsonl(tmp_path / "openai.jsonl", [row])
    with pytest.raises(DataError, match=r"data\.tool_call_ids=regenerate"):
        load_messages(DataConfig(path=path), version="v3")
    loaded = load_messages(DataConfig(path=path, tool_call_ids="regenerate"), version="v3")
    messages = loaded.examples[0].messages
    assert mistral_common_refusal(messages, loaded.examples[0].tools) is None
    assert messages[1]["tool_calls"][0]["id"] == messages[2]["tool_call_id"] != "call_Xy1"
    assert RunConfig.from_dict({"data": {"tool_call_ids": "regenerate"}}).data.tool_call_ids == "regenerate"
    with pytest.raises(ConfigError, match=r"data\.tool_call_ids"):
        DataConfig(tool_call_ids="random")  # type: ignore[arg-type]


def test_the_tools_column_reads_the_same_from_every_source(tmp_path) -> None:
    """jsonl (a list), json, csv (JSON text), parquet (nested structs, nulls padded in) and `datasets`."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    rows = ROWS[:12]
    sources = {"jsonl": write_jsonl(tmp_path / "d.jsonl", rows)}
    (tmp_path / "d.json").write_text(json.dumps(rows), encoding="utf-8")
    sources["json"] = str(tmp_path / "d.json")
    with (tmp_path / "d.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, ["messages", "tools"])
        writer.writeheader()
        writer.writerows({k: json.dumps(r[k]) for k in ("messages", "tools")} for r in rows)
    sources["csv"] = str(tmp_path / "d.csv")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")  # arguments stay JSON strings
    sources["parquet"] = str(tmp_path / "d.parquet")
    as_text = [{"messages": r["messages"], "tools": json.dumps(r["tools"])} for r in rows]
    sources["datasets"] = Dataset.from_list(as_text)
    expected = [(to_messages(r, "messages"), r["tools"]) for r in rows]
    for name, source in sources.items():
        loaded = load_messages(DataConfig(), source=source, version="v3")
        got = [(e.messages, e.tools) for e in loaded.examples]
        assert got == expected, name


def test_sharegpt_function_call_and_observation_turns_become_calls_and_results(tmp_path) -> None:
    tools = ALL_TOOLS
    row = {
        "conversations": [
            {"from": "human", "value": "What is 2 plus 3, and the capital of Peru?"},
            {
                "from": "function_call",
                "value": json.dumps(
                    [
                        {"name": "calculate", "arguments": {"operation": "add", "a": 2, "b": 3}},
                        {"name": "lookup_capital", "arguments": {"country": "Peru"}},
                    ]
                ),
            },
            {"from": "observation", "value": '{"result": "5"}'},
            {"from": "observation", "value": '{"result": "Lima"}'},
            {"from": "gpt", "value": "5, and Lima."},
        ],
        "tools": json.dumps(tools),  # LLaMA-Factory's layout: the tools as JSON text
    }
    loaded = load_messages(DataConfig(path=write_jsonl(tmp_path / "s.jsonl", [row, row])), version="v3")
    assert loaded.format == "sharegpt"
    messages = loaded.examples[0].messages
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "tool", "assistant"]
    calls = messages[1]["tool_calls"]
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        ("calculate", {"operation": "add", "a": 2, "b": 3}),
        ("lookup_capital", {"country": "Peru"}),
    ]
    assert [m["tool_call_id"] for m in messages[2:4]] == [c["id"] for c in calls]
    assert [m["content"] for m in messages[2:4]] == ['{"result": "5"}', '{"result": "Lima"}']
    assert mistral_common_refusal(messages, loaded.examples[0].tools) is None
    assert loaded.examples[1].messages == messages  # ids are made from the data: the same row, the same ids
    row["conversations"].insert(4, {"from": "observation", "value": "extra"})
    with pytest.raises(DataError, match=r"s2\.jsonl:1: messages\[4\] \(tool\): tool_call_id None matches no call"):
        load_messages(DataConfig(path=write_jsonl(tmp_path / "s2.jsonl", [row])), version="v3")


def test_openai_fine_tuning_format_with_legacy_functions_and_parallel_flag(tmp_path) -> None:
    legacy = {
        "messages": [
            {"role": "user", "content": "Capital of Kenya?"},
            {"role": "assistant", "function_call": {"name": "lookup_capital", "arguments": '{"country": "Kenya"}'}},
            {"role": "function", "name": "lookup_capital", "content": '{"result": "Nairobi"}'},
            {"role": "assistant", "content": "Nairobi."},
        ],
        "functions": [t["function"] for t in ALL_TOOLS],
    }
    path = write_jsonl(tmp_path / "legacy.jsonl", [legacy])
    with pytest.raises(DataError, match=r"call id None is not 9 letters or digits.*regenerate"):
        load_messages(DataConfig(path=path), version="v3")
    example = load_messages(DataConfig(path=path, tool_call_ids="regenerate"), version="v3").examples[0]
    assert example.tools == ALL_TOOLS
    assert [m["role"] for m in example.messages] == ["user", "assistant", "tool", "assistant"]
    assert example.messages[2]["tool_call_id"] == example.messages[1]["tool_calls"][0]["id"]
    assert mistral_common_refusal(example.messages, example.tools) is None

    parallel = next(r for r in ROWS if len(r["messages"][1].get("tool_calls") or []) == 2)
    ok = load_messages(DataConfig(path=write_jsonl(tmp_path / "p.jsonl", [{**parallel, "parallel_tool_calls": True}])))
    assert len(ok.examples[0].messages[1]["tool_calls"]) == 2
    with pytest.raises(
        DataError, match=r"p2\.jsonl:1: messages\[1\]: 2 tool calls in one turn but .*parallel_tool_calls=false"
    ):
        load_messages(DataConfig(path=write_jsonl(tmp_path / "p2.jsonl", [{**parallel, "parallel_tool_calls": False}])))


def test_prepared_tool_data_keeps_the_tools_and_tokenises_as_mistral_common(tmp_path, monkeypatch) -> None:
    """The cached parallel path and the in-process path give the same rows and examples (tools included),
    and each row's ids are mistral_common's finetuning encoding of the conversation with its tools."""
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    from mistral_fast.dataset import prepare_data, prepare_data_in_memory
    from mistral_fast.tokenizer import load_tokenizer, reference_tokenizer

    monkeypatch.setenv("MISTRAL_FAST_CACHE", str(tmp_path / "cache"))
    rows = copy.deepcopy(ROWS[:40])
    for row in rows[::3]:  # other models' ids: rewritten by data.tool_call_ids=regenerate
        for message in row["messages"]:
            for call in message.get("tool_calls") or []:
                for other in row["messages"]:
                    if other.get("tool_call_id") == call["id"]:
                        other["tool_call_id"] = "call_" + call["id"]
                call["id"] = "call_" + call["id"]
    path = write_jsonl(tmp_path / "tools.jsonl", rows)
    overrides = {"data.path": path, "data.num_proc": 2, "data.tool_call_ids": "regenerate"}
    cfg = RunConfig().with_overrides({**overrides, "model.max_seq_length": 1024, "data.eval_fraction": 0.2})
    tok = load_tokenizer("v3")
    new, old = prepare_data(cfg, tok), prepare_data_in_memory(cfg, tok)
    assert new.train["input_ids"] == old.train["input_ids"] and new.train["labels"] == old.train["labels"]
    assert list(new.train_examples) == list(old.train_examples) and list(new.eval_examples) == list(old.eval_examples)
    assert all(e.tools for e in new.train_examples) and len(new.eval_examples) == 8
    reference = reference_tokenizer("v3", "finetuning")
    for row, example in zip(new.train, new.train_examples, strict=True):
        request = ChatCompletionRequest.from_openai(messages=copy.deepcopy(example.messages), tools=example.tools)
        assert row["input_ids"] == reference.encode_chat_completion(request).tokens, example.where
