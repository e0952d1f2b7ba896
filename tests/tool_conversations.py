"""Seeded generator of OpenAI-style tool conversations (tools, calls, results, reasoning traces) for the tests.

Deterministic (``random.Random(seed)``), tokenizer-free: the tests compare what our chat templates give these
conversations with what mistral_common gives them. Importable by any test (``from tool_conversations import …``).
"""

from __future__ import annotations

import json
import random
import string
from typing import Any

# Texts with the usual hard cases: Unicode, emoji, trailing spaces, newlines, quotes and backslashes for JSON.
_TEXTS = [
    "What's 3 miles in km?",
    "  Convert 10 °F to °C, please.  ",
    "日本語で答えて: 2 + 2 は?",
    'Look up "Zürich" population\n',
    "Ça coûte combien ? 😀",
    "path C:\\temp\\x and a tab\there",
    "plain",
]
_ANSWERS = ["That is 4.83 km.", "It's -12.2 °C.  ", "答えは 4 です。", "About 421,878 people 👍🏽", "Done.\n"]
_SYSTEM = ["You are a careful assistant with tools.", "Réponds en français.\n", ""]
_THINK = ["Let me convert: 3 × 1.609 = 4.827.", "The user wants °C; use (F − 32) × 5/9.\n", "簡単。", ""]
_WORDS = ["convert", "units", "lookup", "city", "add", "multiply", "weather", "stock", "temp", "x"]


def _name(rng: random.Random) -> str:
    return "_".join(rng.sample(_WORDS, rng.randint(1, 3))) + rng.choice(["", "2", "-v1"])


def _value(rng: random.Random, depth: int = 0) -> Any:
    """A random JSON value: Unicode strings, numbers, booleans, null, nested lists and objects."""
    kind = rng.randrange(7 if depth < 2 else 5)
    if kind == 0:
        return rng.choice([*_TEXTS, "", "é", '"quoted"', "back\\slash", "line\nbreak", "\x01ctl", "🦜"])
    if kind == 1:
        return rng.choice([0, 7, -3, 42, 10**12, 3.5, -0.25, 1e-7, 2.0])
    if kind == 2:
        return rng.choice([True, False])
    if kind == 3:
        return None
    if kind == 4:
        return rng.choice(string.ascii_letters) * rng.randint(1, 4)
    if kind == 5:
        return [_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {
        rng.choice(["a", "b", "ville", "数", "n_2"]) + str(i): _value(rng, depth + 1) for i in range(rng.randint(0, 3))
    }


def random_tools(rng: random.Random) -> list[dict[str, Any]]:
    """1-4 OpenAI-style function tools with nested JSON-schema parameters (some without description)."""
    tools = []
    for _ in range(rng.randint(1, 4)):
        properties = {
            f"p{i}": rng.choice(
                [
                    {"type": "string", "description": rng.choice(_TEXTS)},
                    {"type": "number"},
                    {"type": "array", "items": {"type": "integer"}},
                    {"type": "object", "properties": {"inner": {"type": "string", "enum": ["a", "é"]}}},
                ]
            )
            for i in range(rng.randint(0, 3))
        }
        function: dict[str, Any] = {"name": _name(rng), "parameters": {"type": "object", "properties": properties}}
        if properties and rng.random() < 0.5:
            function["parameters"]["required"] = sorted(properties)[:1]
        if rng.random() < 0.8:
            function["description"] = rng.choice(_TEXTS)
        tools.append({"type": "function", "function": function})
    return tools


def call_id(rng: random.Random) -> str:
    """A 9-character alphanumeric call id, as Mistral's format requires."""
    return "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(9))


def _arguments(rng: random.Random, as_string: str) -> Any:
    args = {rng.choice(["city", "value", "unit", "query", "x"]) + str(i): _value(rng) for i in range(rng.randint(0, 3))}
    if as_string == "object":
        return args
    if as_string == "canonical":  # what mistral_common itself writes
        return json.dumps(args, ensure_ascii=False)
    return json.dumps(args, ensure_ascii=rng.random() < 0.5, separators=rng.choice([(",", ":"), (", ", ": ")]))


def tool_conversation(
    rng: random.Random, version: str, *, arguments: str = "any", results: str = "any", thinking: bool = False
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One conversation ending with an assistant answer, and its tools.

    Args:
        rng: the seeded generator.
        version: tokenizer version (v13 calls need ids only in the request; v3-style results are JSON).
        arguments: ``"object"``, ``"canonical"`` (JSON text as mistral_common writes it) or ``"any"`` (also
            compact or ASCII-escaped JSON text, which only the normalising `tokenize_conversation` path matches).
        results: ``"text"`` (plain, non-JSON results) or ``"any"`` (also JSON results).
        thinking: add reasoning traces to some assistant messages (v13).
    """
    tools = random_tools(rng)
    messages: list[dict[str, Any]] = []
    if rng.random() < 0.4:
        messages.append({"role": "system", "content": rng.choice(_SYSTEM)})
    for _ in range(rng.randint(1, 3)):
        messages.append({"role": "user", "content": rng.choice(_TEXTS)})
        for _ in range(rng.choice([0, 1, 1, 2])):  # rounds of calls and results before the answer
            mode = rng.choice(["object", "canonical"] if arguments == "any" and rng.random() < 0.5 else [arguments])
            if mode == "any":
                mode = rng.choice(["object", "canonical", "other"])
            calls = [
                {
                    "id": call_id(rng),
                    "type": "function",
                    "function": {"name": rng.choice(tools)["function"]["name"], "arguments": _arguments(rng, mode)},
                }
                for _ in range(rng.randint(1, 3))
            ]
            assistant: dict[str, Any] = {"role": "assistant", "content": None, "tool_calls": calls}
            if thinking and rng.random() < 0.5:
                assistant["reasoning_content"] = rng.choice(_THINK)
            messages.append(assistant)
            for call in calls:
                result = rng.choice(_ANSWERS)
                if results == "any" and rng.random() < 0.5:
                    result = json.dumps(_value(rng), ensure_ascii=False)
                tool = {"role": "tool", "tool_call_id": call["id"], "content": result}
                if rng.random() < 0.5:
                    tool["name"] = call["function"]["name"]
                messages.append(tool)
        messages.append(_answer(rng, thinking))
    return messages, tools


def _answer(rng: random.Random, thinking: bool) -> dict[str, Any]:
    text = rng.choice(_ANSWERS)
    if not thinking or rng.random() < 0.4:
        return {"role": "assistant", "content": text}
    trace = rng.choice(_THINK)
    shape = rng.randrange(3)
    if shape == 0:
        return {"role": "assistant", "content": text, "reasoning_content": trace}
    if shape == 1:
        return {"role": "assistant", "content": text, "thinking": trace}
    return {
        "role": "assistant",
        "content": [{"type": "thinking", "thinking": trace}, {"type": "text", "text": text}],
    }


def tool_conversations(
    n: int, version: str, seed: int = 0, **kwargs: Any
) -> list[tuple[list[dict[str, Any]], list[dict[str, Any]]]]:
    """`n` seeded conversations (`tool_conversation`)."""
    rng = random.Random(f"{version}-{seed}")
    return [tool_conversation(rng, version, **kwargs) for _ in range(n)]


def gguf_template_renderers(template: str) -> dict[str, Any]:
    """``engine -> render(messages, tools)``: plain sandboxed Jinja2 and llama-cpp-python's formatter, as a
    consumer of the GGUF's embedded template renders a prompt (each template compiled once)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    plain = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template)
    formatter = Jinja2ChatFormatter(template, "</s>", "<s>")
    return {
        "jinja2": lambda messages, tools: plain.render(messages=messages, tools=tools, add_generation_prompt=True),
        "llama-cpp-python": lambda messages, tools: formatter(messages=messages, tools=tools).prompt,
    }


def check_gguf_tool_prompts(llm, version: str, count: int = 40) -> int:
    """Prompts with tools, calls and results (ending on the results), rendered from the GGUF's embedded
    template by both engines and tokenised by llama.cpp: mistral_common's ids. Returns how many were compared."""
    from mistral_fast.tokenizer import reference_chat_ids

    renderers = gguf_template_renderers(llm.metadata["tokenizer.chat_template"])
    rng = random.Random(f"gguf-{version}")
    compared = 0
    for k in range(count):
        messages, tools = tool_conversation(rng, version, arguments="object", results="text")
        cut = max(i for i, m in enumerate(messages) if m["role"] in ("tool", "user"))
        prompt = messages[: cut + 1]
        expected = reference_chat_ids(prompt, version, tools=tools, add_generation_prompt=True)
        text = renderers["jinja2" if k % 2 else "llama-cpp-python"](prompt, tools)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == expected, text
        compared += 1
    return compared
