"""Tool calls and reasoning traces: our chat templates equal mistral_common id for id, with the loss mask.

Every version with a tool format (v3 SentencePiece, v3/v7/v11/v13 tekken; v11/v13 from a tekken.json written
by `mistral_fast.tekken.write_tekken_file`) on >= 1,000 generated conversations (random tools, Unicode and
nested arguments, 1-3 turns, several calls and results, system prompts, v13 reasoning traces), whole
conversations in mistral_common's finetuning mode and prompts (ending on tool results) in its test mode.
The mask reference is mistral_common's own encoding of each normalised message: assistant messages (text,
calls, traces, ``</s>``) are the trained tokens; tool results, ``[AVAILABLE_TOOLS]`` and user turns are not.
"""

from __future__ import annotations

import json
import random

import jinja2
import pytest
from tool_conversations import tool_conversation, tool_conversations

from mistral_fast.errors import TokenizerError
from mistral_fast.tekken import TEKKEN_VERSIONS, tekken_reference, write_tekken_file
from mistral_fast.tokenizer import (
    IGNORE_INDEX,
    _normalize_tool_json,
    load_tokenizer,
    parse_tool_calls,
    preview_example,
    reference_chat_ids,
    reference_tokenizer,
    tokenize_conversation,
    validate_conversation,
)


def _call(call_id: str, name: str = "f", arguments: str = "{}") -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


VERSIONS = ["v3", "v3-tekken", "v7-tekken", "v11-tekken", "v13-tekken"]
N = 1000  # generated conversations per version


@pytest.fixture(scope="module")
def toks():
    return {v: load_tokenizer(v) for v in VERSIONS}


def _openai(messages: list[dict]) -> list[dict]:
    """Messages as mistral_common's from_openai reads them: a ``thinking`` field is its ``reasoning_content``."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("thinking") is not None:
            m["reasoning_content"] = m.pop("thinking")
        out.append(m)
    return out


def reference_ids_and_mask(messages, tools, version: str) -> tuple[list[int], list[int]]:
    """mistral_common's ids and assistant mask, message by message (as its encode_instruct walks them).

    The request is converted (``ChatCompletionRequest.from_openai``) and normalised by mistral_common; each
    normalised message is encoded by its instruct tokenizer; the tokens of assistant messages are marked.
    """
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, ToolMessage, UserMessage
    from mistral_common.protocol.instruct.normalize import get_normalizer
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.base import TokenizerVersion

    request = ChatCompletionRequest.from_openai(_openai(messages), tools)
    instruct = get_normalizer(TokenizerVersion(TEKKEN_VERSIONS.get(version, version))).from_chat_completion_request(
        request
    )
    encoder = reference_tokenizer(version, "finetuning").instruct_tokenizer
    users = [i for i, m in enumerate(instruct.messages) if isinstance(m, UserMessage)] or [-1]
    ids, mask = [encoder.tokenizer.bos_id], [0]
    for i, message in enumerate(instruct.messages):
        if isinstance(message, UserMessage):
            new, _, _ = encoder.encode_user_message(
                message,
                instruct.available_tools,
                i == users[-1],
                i == users[0],
                system_prompt=instruct.system_prompt,
                force_img_first=True,
                settings=instruct.settings,
            )
        elif isinstance(message, ToolMessage):
            new, _, _ = encoder.encode_tool_message(message, i < users[-1])
        elif isinstance(message, SystemMessage):
            new, _ = encoder.encode_system_message(message)
        else:
            new = encoder.encode_assistant_message(message, is_before_last_user_message=i < users[-1])
        ids += new
        mask += [int(isinstance(message, AssistantMessage))] * len(new)
    return ids, mask


@pytest.mark.parametrize("version", VERSIONS)
def test_generated_tool_conversations_equal_mistral_common_with_masks(version, toks):
    """>= 1,000 whole conversations per version (finetuning mode): ids and the trained tokens."""
    tok = toks[version]
    conversations = tool_conversations(N, version, thinking=version == "v13-tekken")
    counts = {"calls": 0, "several_calls": 0, "results": 0, "system": 0, "think": 0}
    wrong = []
    for k, (messages, tools) in enumerate(conversations):
        ids, mask = reference_ids_and_mask(messages, tools, version)
        if k % 10 == 0:  # the message-by-message reference is mistral_common's encode_chat_completion
            assert ids == reference_chat_ids(messages, version, tools=tools)
        if k % 10 == 0:  # the training path: validation, normalisation, labels
            ours = tokenize_conversation(tok, messages, 10**6, version=version, tools=tools)
            got = (ours.input_ids, [int(label != IGNORE_INDEX) for label in ours.labels])
        else:  # what it renders, without the validation
            out = tok.apply_chat_template(
                _normalize_tool_json(messages, version), tools=tools, return_assistant_tokens_mask=True
            )
            got = (list(out["input_ids"]), list(out["assistant_masks"]))
        if got != (ids, mask):
            wrong.append(k)
        calls = [len(m.get("tool_calls") or []) for m in messages]
        counts["calls"] += sum(calls)
        counts["several_calls"] += any(c > 1 for c in calls)
        counts["results"] += sum(m["role"] == "tool" for m in messages)
        counts["system"] += messages[0]["role"] == "system"
        counts["think"] += any(
            m.get("reasoning_content") or m.get("thinking") or isinstance(m["content"], list) for m in messages
        )
    assert wrong == [], f"{len(wrong)} of {N} differ, first: {conversations[wrong[0]] if wrong else None}"
    assert counts["several_calls"] > 200 and counts["results"] > 1000 and counts["system"] > 200
    assert counts["think"] > 300 or version != "v13-tekken"


@pytest.mark.parametrize("version", VERSIONS)
def test_the_hugging_face_call_equals_mistral_common(version, toks):
    """``tok.apply_chat_template(messages, tools=tools, ...)`` as users write it, no preprocessing: arguments
    as objects or JSON text as mistral_common writes it, plain-text results; whole conversations and prompts
    ending on tool results (test mode, add_generation_prompt=True)."""
    tok = toks[version]
    rng = random.Random(version)
    for _ in range(60):
        messages, tools = tool_conversation(
            rng, version, arguments="canonical" if rng.random() < 0.5 else "object", results="text",
            thinking=version == "v13-tekken",
        )  # fmt: skip
        out = tok.apply_chat_template(messages, tools=tools, tokenize=True, return_assistant_tokens_mask=True)
        ids, mask = reference_ids_and_mask(messages, tools, version)
        assert (list(out["input_ids"]), list(out["assistant_masks"])) == (ids, mask), messages
        last_result = max(i for i, m in enumerate(messages) if m["role"] in ("tool", "user"))
        prompt = messages[: last_result + 1]
        got = tok.apply_chat_template(prompt, tools=tools, add_generation_prompt=True, return_dict=False)
        assert got == reference_chat_ids(prompt, version, tools=tools, add_generation_prompt=True), prompt


def test_before_the_fix_none_of_these_came_out(toks):
    """The issue's count: 300 conversations with tools, calls and results (60 per version). Our code gives
    mistral_common's ids for all of them (main gave 0 of 300: tool_calls refused, v11/v13 files not loaded)."""
    exact = 0
    for version in VERSIONS:
        for messages, tools in tool_conversations(60, version, seed=7, arguments="object", results="text"):
            try:
                ours = toks[version].apply_chat_template(messages, tools=tools, return_dict=False)
            except (jinja2.TemplateError, ValueError):
                continue
            exact += ours == reference_chat_ids(messages, version, tools=tools)
    assert exact == 300


@pytest.mark.parametrize("version", ["v11", "v13"])
def test_a_v11_v13_model_directory_loads_and_equals_mistral_common(version, tmp_path):
    """A model directory with a v11/v13 tekken.json (special_tokens table): 1,000 strings and chats with tools
    (and v13 traces) equal mistral_common loading that same file."""
    from test_tokenizer import generated_strings, mismatches

    write_tekken_file(tmp_path, version)
    data = json.loads((tmp_path / "tekken.json").read_text(encoding="utf-8"))
    assert len(data["special_tokens"]) == 1000 and data["config"]["version"] == version
    tok = load_tokenizer(path=tmp_path)
    ours = f"{version}-tekken"
    reference = tekken_reference(ours, "test", str(tmp_path))
    texts = generated_strings(1000, seed=11)
    assert mismatches(tok, reference.instruct_tokenizer.tokenizer, texts) == []
    assert tok.convert_tokens_to_ids(["[ARGS]", "[CALL_ID]", "[THINK]", "[/THINK]"]) == [32, 33, 34, 35]
    finetuning = tekken_reference(ours, "finetuning", str(tmp_path))
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    # (the 1,000 generated conversations per version above use such a file too: the built-in v11/v13 one)
    for messages, tools in tool_conversations(50, ours, seed=3, thinking=version == "v13"):
        request = ChatCompletionRequest.from_openai(_openai(messages), tools)
        expected = finetuning.encode_chat_completion(request).tokens
        assert tokenize_conversation(tok, messages, 10**6, version=ours, tools=tools).input_ids == expected


def test_reasoning_traces_are_trained_and_shown(toks):
    """v13: reasoning_content, a thinking field and a thinking chunk encode as mistral_common's ThinkChunk,
    inside the trained tokens; the mask preview shows [THINK]…[/THINK] between the brackets."""
    tok = toks["v13-tekken"]
    user = {"role": "user", "content": "3 miles in km?"}
    trace = "3 × 1.609 = 4.827 "
    for assistant in (
        {"role": "assistant", "content": "4.83 km", "reasoning_content": trace},
        {"role": "assistant", "content": "4.83 km", "thinking": trace},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": trace}, {"type": "text", "text": "4.83"}]},
    ):  # fmt: skip
        example = tokenize_conversation(tok, [user, assistant], 4096, version="v13-tekken")
        assert example.input_ids == reference_ids_and_mask([user, assistant], None, "v13-tekken")[0]
        preview = preview_example(tok, example.input_ids, example.labels)
        answer = "4.83" if isinstance(assistant["content"], list) else "4.83 km"
        assert preview.endswith(f"⟦[THINK]{trace}[/THINK]{answer}</s>⟧"), preview
    # the formats without thinking tokens refuse a trace, as mistral_common does
    for version in ("v3", "v7-tekken", "v11-tekken"):
        trace = [user, {"role": "assistant", "content": "x", "reasoning_content": "y"}]
        with pytest.raises(TokenizerError, match="reasoning trace"):
            validate_conversation(trace, version)
        with pytest.raises(jinja2.TemplateError, match="reasoning trace"):
            toks[version].apply_chat_template(trace, return_dict=False)


def test_tool_results_and_tools_are_not_trained(toks):
    """The preview of a tool conversation: the calls and the answer between ⟦⟧, tools and results outside."""
    tok = toks["v7-tekken"]
    tools = [{"type": "function", "function": {"name": "to_km", "description": "miles → km", "parameters": {}}}]
    messages = [
        {"role": "user", "content": "3 miles?"},
        {"role": "assistant", "tool_calls": [_call("a1b2c3d4e", "to_km", '{"miles": 3}')]},
        {"role": "tool", "tool_call_id": "a1b2c3d4e", "content": "4.828"},
        {"role": "assistant", "content": "4.83 km"},
    ]  # fmt: skip
    example = tokenize_conversation(tok, messages, 4096, version="v7-tekken", tools=tools)
    preview = preview_example(tok, example.input_ids, example.labels)
    assert preview == (
        '<s>[AVAILABLE_TOOLS][{"type": "function", "function": {"name": "to_km", "description": "miles → km", '
        '"parameters": {}}}][/AVAILABLE_TOOLS][INST]3 miles?[/INST]'
        '⟦[TOOL_CALLS][{"name": "to_km", "arguments": {"miles": 3}, "id": "a1b2c3d4e"}]</s>⟧'
        "[TOOL_RESULTS]a1b2c3d4e[TOOL_CONTENT]4.828[/TOOL_RESULTS]⟦4.83 km</s>⟧"
    )


@pytest.mark.parametrize("version", VERSIONS)
def test_parse_tool_calls_inverts_mistral_common(version, toks):
    """mistral_common's ids for an assistant's calls, decoded as evaluation decodes a generation, parse back."""
    from mistral_common.protocol.instruct.messages import AssistantMessage
    from mistral_common.protocol.instruct.tool_calls import ToolCall

    encoder = reference_tokenizer(version, "finetuning").instruct_tokenizer
    count = 0
    for messages, _ in tool_conversations(100, version, seed=5, arguments="object"):
        for message in messages:
            if not message.get("tool_calls"):
                continue
            calls = [ToolCall.from_openai(c) for c in message["tool_calls"]]
            tokens = encoder.encode_assistant_message(AssistantMessage(tool_calls=calls), False)
            text = toks[version].decode(tokens, skip_special_tokens=False)
            expected = [
                {"name": c["function"]["name"], "arguments": c["function"]["arguments"],
                 "id": None if version == "v13-tekken" else c["id"]}
                for c in message["tool_calls"]
            ]  # fmt: skip
            assert parse_tool_calls(text, version) == expected, text
            count += 1
    assert count > 50
    assert parse_tool_calls("no call here", version) == []


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        (
            [{"role": "user", "content": "q"},
             {"role": "assistant", "tool_calls": [_call("call_1")]},
             {"role": "tool", "tool_call_id": "call_1", "content": "r"}, {"role": "assistant", "content": "a"}],
            r"messages\[1\]\.tool_calls\[0\]: call id 'call_1' is not 9 letters or digits",
        ),
        (
            [{"role": "user", "content": "q"},
             {"role": "assistant", "tool_calls": [_call("abcdefghi")]},
             {"role": "tool", "tool_call_id": "zzzzzzzzz", "content": "r"}, {"role": "assistant", "content": "a"}],
            r"messages\[2\] \(tool\): tool_call_id 'zzzzzzzzz' matches no call",
        ),
        (
            [{"role": "user", "content": "q"}, {"role": "tool", "tool_call_id": "abcdefghi", "content": "r"}],
            r"messages\[1\]",
        ),
    ],
)  # fmt: skip
def test_tool_validation_errors_say_where(messages, match):
    with pytest.raises(TokenizerError):  # v11 checks result ids against the calls
        reference_chat_ids(messages, "v11-tekken")
    with pytest.raises(TokenizerError, match=match):
        validate_conversation(messages, "v11-tekken")


def test_v1_has_no_tool_format():
    messages = [{"role": "user", "content": "q"}, {"role": "tool", "tool_call_id": "abcdefghi", "content": "r"}]
    with pytest.raises(TokenizerError, match="v1 format has no tool messages"):
        validate_conversation(messages, "v1")


def _mutations(messages: list[dict], rng: random.Random) -> list[list[dict]]:
    """Broken variants of a tool conversation: a result dropped, doubled, moved or misaddressed, a bad id,
    text next to calls, a bad function name."""
    import copy

    out = []
    tools_at = [i for i, m in enumerate(messages) if m["role"] == "tool"]
    calls_at = [i for i, m in enumerate(messages) if m.get("tool_calls")]
    if tools_at:
        i = rng.choice(tools_at)
        out.append(messages[:i] + messages[i + 1 :])
        out.append([*messages[: i + 1], copy.deepcopy(messages[i]), *messages[i + 1 :]])
        bad = copy.deepcopy(messages)
        bad[i]["tool_call_id"] = "zzzzzzzzz"
        out.append(bad)
        out.append([*messages[:1], messages[i], *messages[1:i], *messages[i + 1 :]])
    if calls_at:
        i = rng.choice(calls_at)
        for change in ("id", "text", "name"):
            bad = copy.deepcopy(messages)
            if change == "id":
                bad[i]["tool_calls"][0]["id"] = "call_1"
            elif change == "text":
                bad[i]["content"] = "Let me check."
            else:
                bad[i]["tool_calls"][0]["function"]["name"] = "bad name!"
            out.append(bad)
    return out


@pytest.mark.parametrize("version", VERSIONS)
def test_the_validator_agrees_with_mistral_common(version):
    """Generated conversations and broken variants of them: validate_conversation accepts exactly what
    mistral_common accepts (finetuning mode), and names the message when it refuses."""
    rng = random.Random(f"mutate-{version}")
    outcomes = {"accepted": 0, "rejected": 0}
    for messages, tools in tool_conversations(40, version, seed=9):
        for variant in [messages, *_mutations(messages, rng)]:
            try:
                reference_chat_ids(variant, version, tools=tools)
                expected = True
            except TokenizerError:
                expected = False
            try:
                validate_conversation(variant, version, tools)
                valid = True
            except TokenizerError as exc:
                valid = False
                assert "messages[" in str(exc) or "tools" in str(exc), exc
            assert valid == expected, (version, variant)
            outcomes["accepted" if valid else "rejected"] += 1
    assert outcomes["accepted"] >= 40 and outcomes["rejected"] > 100
