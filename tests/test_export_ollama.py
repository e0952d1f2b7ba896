"""The Modelfile's TEMPLATE executed as Ollama executes it (Go's text/template after Ollama's collation),
then tokenised by llama.cpp with BOS: mistral_common's ids, tools included.

No Ollama build is reachable here, so this is not Ollama's own code. ``ollama_template/render.go`` is a small
standard-library Go program written for this test. From Ollama's ``template/template.go``, ``api/types.go`` and
``tools/template.go`` (ollama/ollama at commit fb30760, read, not copied) it re-implements: ``collate`` (every system
message's text gathered into ``.System``, joined by a blank line; consecutive same-role messages but ``tool`` merged
with ``"\\n\\n"``), the value map ``Template.Execute`` passes on the ``.Messages`` path, the shapes a template
sees (``.ToolCalls`` arguments and ``.Tools`` properties as Go maps), the ``json`` function, and the rule by which
Ollama's tool-call parser reads its tag off a template. The rendering itself is Go's own ``text/template`` with
``missingkey=zero`` (what Ollama's ``Parse`` sets). Not re-implemented: its legacy ``.Prompt``/``.Response`` path,
image tags, server-side context truncation. What a Go template cannot do, and so what Ollama prompts differ on
(documented in gguf.py and README), is each shown to differ below.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import require_module, write_minimal_gguf
from tool_conversations import check_gguf_tool_prompts

from mistral_fast.export import export_gguf, write_modelfile
from mistral_fast.export.gguf import OLLAMA_TEMPLATES
from mistral_fast.modeling import tiny_model_dir
from mistral_fast.tokenizer import reference_chat_ids

llama_cpp = require_module("llama_cpp", "pip install 'mistral-fast[gguf]'")

S, U, A = "system", "user", "assistant"
PROMPTS = {  # each ends where Ollama asks the model to answer
    "one-turn": [(U, "Hi")],
    "system": [(S, "Be brief."), (U, "  Two  spaces: 10 °F in °C?")],
    "several-turns": [(S, "You convert units."), (U, "3 miles?"), (A, "4.83 km"), (U, "And 10 kg\nin lb?")],
    "merged-turns": [(U, "First part."), (U, "Second part."), (A, "Merged reply."), (A, "More."), (U, "日本語 🙂")],
    "two-systems": [(S, "Rule one."), (S, "Rule two."), (U, "Q1"), (A, "A1"), (U, "Q2")],
    "system-between-users": [(U, "Q1"), (S, "Late rule."), (U, "Q2")],
    "system-last": [(S, "Rule."), (U, "Q"), (S, "Another rule.")],
}


@pytest.fixture(scope="module")
def render(go_executable: str, tmp_path_factory: pytest.TempPathFactory):
    """Build the renderer once (offline: standard library only), return ``render(template, messages)``."""
    binary = tmp_path_factory.mktemp("go") / "render"
    source = Path(__file__).parent / "ollama_template" / "render.go"
    env = {**os.environ, "GO111MODULE": "off", "GOPROXY": "off", "GOTOOLCHAIN": "local", "GOFLAGS": ""}
    env.setdefault("GOCACHE", str(tmp_path_factory.mktemp("gocache")))
    proc = subprocess.run(
        [go_executable, "build", "-o", str(binary), str(source)], capture_output=True, text=True, env=env, check=False
    )
    assert proc.returncode == 0, proc.stderr

    def run(template: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, **more) -> str:
        data = json.dumps({"template": template, "messages": messages, "tools": tools, **more})
        out = subprocess.run([str(binary)], input=data.encode(), capture_output=True, check=False)
        assert out.returncode == 0, out.stderr.decode()
        return out.stdout.decode()

    return run


@pytest.fixture(scope="module")
def vocab(tmp_path_factory: pytest.TempPathFactory):
    path = export_gguf(tiny_model_dir(), tmp_path_factory.mktemp("gguf") / "tiny-f16.gguf", "f16")
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    yield llm
    llm.close()


def _messages(turns: list[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in turns]


def _template_of_modelfile(tmp_path: Path) -> str:
    text = write_modelfile(write_minimal_gguf(tmp_path / "m.gguf")).read_text()
    return text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]


@pytest.mark.parametrize("case", sorted(PROMPTS))
def test_ollama_renders_our_template_to_mistral_common_ids(render, vocab, tmp_path: Path, case: str) -> None:
    template = _template_of_modelfile(tmp_path)
    assert template == OLLAMA_TEMPLATES["v3"]
    messages = _messages(PROMPTS[case])
    text = render(template, messages)
    got = vocab.tokenize(text.encode(), add_bos=True, special=True)  # Ollama: llama.cpp adds BOS (add_bos_token)
    assert got == reference_chat_ids(messages, "v3", add_generation_prompt=True), text


def test_ollama_continues_a_final_assistant_message_like_mistral_common(render, vocab, tmp_path: Path) -> None:
    messages = _messages([(S, "Be brief."), (U, "Count to three."), (A, "One, two,")])
    text = render(_template_of_modelfile(tmp_path), messages)
    got = vocab.tokenize(text.encode(), add_bos=True, special=True)
    assert got == reference_chat_ids(messages, "v3", continue_final_message=True)


def test_what_go_templates_cannot_do_is_documented(render, vocab) -> None:
    """Assistant history with trailing spaces: mistral_common strips them, a Go template cannot."""
    messages = _messages([(U, "Q1"), (A, "A1  "), (U, "Q2")])
    got = vocab.tokenize(render(OLLAMA_TEMPLATES["v3"], messages).encode(), add_bos=True, special=True)
    assert got != reference_chat_ids(messages, "v3", add_generation_prompt=True)
    stripped = _messages([(U, "Q1"), (A, "A1"), (U, "Q2")])
    assert reference_chat_ids(stripped, "v3", add_generation_prompt=True) == reference_chat_ids(
        messages, "v3", add_generation_prompt=True
    )


# ------------------------------------------------------------------- tools in the GGUF's embedded template


def test_gguf_template_renders_tool_prompts_to_mistral_common_ids(vocab) -> None:
    """v3: [AVAILABLE_TOOLS], [TOOL_CALLS] and [TOOL_RESULTS] JSON written by the template's own JSON writer,
    so plain Jinja2 (whose tojson sorts keys and escapes non-ASCII) renders it as mistral_common writes it."""
    assert check_gguf_tool_prompts(vocab, "v3") == 40


# ------------------------------------------------------------------- tools in the Modelfile's Go template


def _go_writes_like_python(text: str) -> bool:
    """Go's %q escapes these characters as json.dumps(ensure_ascii=False) does (printable ones raw)."""
    return all(c.isprintable() or c in "\n\r\t\b\f" for c in text)


def _representable(value: Any) -> Any:
    """The value as Ollama can hand it to a template: keys sorted (Go maps), whole floats as integers (float64),
    strings Go's %q writes as Python does."""
    if isinstance(value, dict):
        return {k: _representable(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_representable(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and not _go_writes_like_python(value):
        return "x"
    return value


def _ollama_case(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]], version: str = "v3"
) -> tuple[list, list, list]:
    """(OpenAI-style messages and tools within what a Go template can reproduce, the same as Ollama's chat API
    takes them: arguments as objects, `thinking` for a reasoning trace). A v3 result that is a JSON number,
    string, true or null (mistral_common writes it bare; a Go template can't tell it from text) becomes text."""
    tools = json.loads(json.dumps(tools))
    for tool in tools:
        properties = tool["function"]["parameters"]["properties"]
        for name, schema in properties.items():
            if "properties" in schema:  # a nested object schema: Ollama's ordered map, compact JSON in templates
                properties[name] = {"type": "string"}
        tool["function"]["parameters"]["properties"] = dict(sorted(properties.items()))
    ours, ollama = [], []
    for message in messages:
        message = json.loads(json.dumps(message))
        native: dict[str, Any] = {"role": message["role"], "content": message.get("content") or ""}
        if message["role"] == "assistant":
            if isinstance(message["content"], list):  # a thinking chunk then text
                message["reasoning_content"] = message["content"][0]["thinking"]
                message["content"] = message["content"][1]["text"]
            message["content"] = (message.get("content") or "").rstrip(" ") or None  # mistral_common strips
            native["content"] = message["content"] or ""
            trace = message.pop("thinking", None) or message.pop("reasoning_content", None)
            if trace:  # Ollama's Thinking "" is no trace: mistral_common writes an empty one as [THINK][/THINK]
                message["reasoning_content"] = native["thinking"] = trace
        for call in message.get("tool_calls") or []:
            call["function"]["arguments"] = _representable(call["function"]["arguments"])
        if message.get("tool_calls"):
            native["tool_calls"] = [
                {"id": c["id"], "function": {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}}
                for c in message["tool_calls"]
            ]
        if message["role"] == "tool":
            if version == "v3" and _json_scalar(message["content"]):
                message["content"] = "about " + message["content"]
            message["content"] = native["content"] = _representable(message["content"])
            native["tool_call_id"] = message["tool_call_id"]
        ours.append(message)
        ollama.append(native)
    return ours, tools, ollama


def _json_scalar(text: str) -> bool:
    try:
        return not isinstance(json.loads(text), (dict, list))
    except ValueError:
        return False


def _prompts(version: str, count: int, **kwargs: Any):
    """Seeded prompts with tools, calls and results (each ending on a result or a user turn)."""
    from tool_conversations import tool_conversation

    rng = random.Random(f"ollama-{version}")
    for _ in range(count):
        messages, tools = tool_conversation(rng, version, arguments="object", **kwargs)
        cut = max(i for i, m in enumerate(messages) if m["role"] in ("tool", "user"))
        yield _ollama_case(messages[: cut + 1], tools, version)


@pytest.fixture(scope="module")
def vocab_v7(tmp_path_factory: pytest.TempPathFactory):
    from mistral_fast.modeling import resolve_model_path

    path = export_gguf(resolve_model_path("tiny-small"), tmp_path_factory.mktemp("gguf7") / "small.gguf", "f16")
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    yield llm
    llm.close()


@pytest.mark.parametrize("version", ["v3", "v7-tekken"])
def test_ollama_renders_tool_prompts_to_mistral_common_ids(render, vocab, vocab_v7, version: str) -> None:
    """Tools, calls (several per turn) and results, multi-turn, a system prompt, rendered by the Modelfile's
    template as Ollama renders it, tokenised by llama.cpp (what Ollama runs): mistral_common's ids."""
    llm, template = (vocab, OLLAMA_TEMPLATES["v3"]) if version == "v3" else (vocab_v7, OLLAMA_TEMPLATES["v7"])
    compared = calls = 0
    for messages, tools, ollama in _prompts(version, 60, results="any"):
        text = render(template, ollama, tools)
        got = llm.tokenize(text.encode(), add_bos=True, special=True)
        assert got == reference_chat_ids(messages, version, tools=tools, add_generation_prompt=True), text
        compared += 1
        calls += sum(len(m.get("tool_calls") or []) for m in messages)
    assert compared == 60 and calls >= 60


def _text_ids(text: str, version: str) -> list[int]:
    """mistral_common's own ids for a rendered tekken prompt: its control tokens by name, the text between them
    encoded by its Tekkenizer (tekken encodes text as it is: no space prefix to mind), BOS first."""
    from mistral_fast.tokenizer import reference_tokenizer

    tok = reference_tokenizer(version).instruct_tokenizer.tokenizer
    specials = {tok.id_to_piece(i): i for i in range(tok.num_special_tokens)}
    ids = [tok.bos_id]
    for piece in re.split(r"(\[/?[A-Z_]+\]|</s>)", text):
        ids += [specials[piece]] if piece in specials else tok.encode(piece, bos=False, eos=False) if piece else []
    return ids


@pytest.mark.parametrize("version", ["v11-tekken", "v13-tekken"])
def test_ollama_renders_v11_and_v13_tool_prompts_to_mistral_common_ids(render, version: str) -> None:
    """Small 3.2 / Devstral ([CALL_ID], [ARGS]) and Magistral (tools before the first user turn, no call ids,
    [THINK] traces in the history), tokenised by mistral_common's own tekkenizer (no v11/v13 GGUF here)."""
    template = OLLAMA_TEMPLATES[version.split("-")[0]]
    compared = 0
    for messages, tools, ollama in _prompts(version, 40, results="any", thinking=version == "v13-tekken"):
        text = render(template, ollama, tools)
        assert _text_ids(text, version) == reference_chat_ids(
            messages, version, tools=tools, add_generation_prompt=True
        ), text
        compared += 1
    assert compared == 40


def test_ollama_finds_the_tool_call_tag_in_every_template(render) -> None:
    """Ollama parses tool calls out of a model's output from the tag it reads off the template (the first text in
    the `if` on .ToolCalls): "[TOOL_CALLS]" alone, so the v3 output's space before "[{" does not hide it."""
    for version, template in OLLAMA_TEMPLATES.items():
        assert render(template, [], want="tag") == "[TOOL_CALLS]", version
    assert render("{{ range .Messages }}{{ .Content }}{{ end }}", [], want="tag") == "{"  # Ollama's fallback


def _ids_v3(render, vocab, messages, tools) -> tuple[list[int], list[int]]:
    _, tools, ollama = _ollama_case(messages, tools)
    got = vocab.tokenize(render(OLLAMA_TEMPLATES["v3"], ollama, tools).encode(), add_bos=True, special=True)
    return got, reference_chat_ids(messages, "v3", tools=tools, add_generation_prompt=True)


TOOL = {
    "type": "function",
    "function": {
        "name": "f",
        "description": "d",
        "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "string"}}},
    },
}


def _call(arguments: dict[str, Any], result: str = "ok") -> list[dict[str, Any]]:
    call = {"id": "abcDEF123", "type": "function", "function": {"name": "f", "arguments": arguments}}
    return [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "abcDEF123", "content": result},
    ]


@pytest.mark.parametrize(
    ("differs", "same"),
    [  # (what Ollama cannot hand a template as mistral_common writes it, the same conversation as it can)
        (_call({"b": "x", "a": 1}), _call({"a": 1, "b": "x"})),  # argument keys: Go maps, sorted
        (_call({"a": 2.0}), _call({"a": 2})),  # numbers arrive as float64: 2.0 and 2 are one value
        (_call({"b": "zero\u200dwidth"}), _call({"b": "zero width"})),  # Go's %q escapes non-printable U+200D
        (_call({}, '{"a":1}'), _call({}, '{"a": 1}')),  # a JSON result is written as it is, not re-dumped
        (_call({}, "42"), _call({}, "42 km")),  # a result that is JSON but not an object or a list: a string
    ],
    ids=["key-order", "whole-float", "non-printable", "compact-json-result", "number-result"],
)
def test_what_go_templates_cannot_do_with_tools_differs_from_mistral_common(render, vocab, differs, same) -> None:
    got, expected = _ids_v3(render, vocab, same, [TOOL])
    assert got == expected
    got, expected = _ids_v3(render, vocab, differs, [TOOL])
    assert got != expected


def test_the_tool_limits_are_documented_in_the_code_and_the_readme() -> None:
    root = Path(__file__).parents[1]
    for source in (root / "mistral_fast" / "export" / "gguf.py", root / "README.md"):
        text = " ".join(re.sub(r"\n\s*#", " ", source.read_text(encoding="utf-8")).split())  # comments joined
        for words in ("sorted key order", "2.0 from 2", "U+200D", "written as it is"):
            assert words in text, (source.name, words)


def test_unordered_tool_schemas_come_out_in_the_templates_order(render, vocab) -> None:
    """Ollama hands a template each property as a struct and the properties as a Go map: their order is ours."""
    tool = {
        "type": "function",
        "function": {
            "name": "f",
            "parameters": {
                "required": ["b"],
                "properties": {"b": {"description": "B", "type": "string"}, "a": {"type": "number"}},
                "type": "object",
            },
        },
    }
    canonical = {
        "type": "function",
        "function": {
            "name": "f",
            "description": "",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "number"}, "b": {"type": "string", "description": "B"}},
                "required": ["b"],
            },
        },
    }
    messages = [{"role": "user", "content": "Q"}]
    text = render(OLLAMA_TEMPLATES["v3"], messages, [tool])
    assert text == render(OLLAMA_TEMPLATES["v3"], messages, [canonical])
    got = vocab.tokenize(text.encode(), add_bos=True, special=True)
    assert got == reference_chat_ids(messages, "v3", tools=[canonical], add_generation_prompt=True)
    assert got != reference_chat_ids(messages, "v3", tools=[tool], add_generation_prompt=True)
