"""Write data/sample_tools.jsonl: function calling with three small tools (deterministic; rerun to regenerate).

Each row is OpenAI's fine-tuning format, which is also mistral_fast's: ``messages`` with assistant
``tool_calls`` and ``tool`` results, and the ``tools`` the model may call (JSON schemas):

* ``convert_units(value, from_unit, to_unit)``: length, mass, volume and temperature units;
* ``calculate(operation, a, b)``: add, subtract, multiply, divide;
* ``lookup_capital(country)``: the capital of a country, from a small table.

A conversation is a request, the assistant's call (a numbered 9-character alphanumeric id, as Mistral's
format needs: `call_id`), the tool's result and the assistant's answer quoting it; some requests need two
calls in one turn (parallel calls) and some need none (a greeting: no call is the right answer). The
arguments come from small sets (six numbers, four unit pairs, six countries) placed in varied sentences that
name units and operations as the tools do, so the tiny model (``tiny-copy``) can learn with LoRA on CPU in a
few minutes to pick the tool and copy the arguments (the ``tools-smoke`` preset), while held-out requests
are sentences it has not seen. No request appears twice. A row offers
the tools it calls and sometimes one more, in a random order: rows stay short (the tools' JSON schemas
are most of a prompt's tokens) and the model must read which tools it has.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "data"
ROWS = 360

UNITS = {  # unit: (quantity, factor to the quantity's base unit, offset)
    "km": ("length", 1000.0, 0.0),
    "mi": ("length", 1609.344, 0.0),
    "m": ("length", 1.0, 0.0),
    "ft": ("length", 0.3048, 0.0),
    "kg": ("mass", 1.0, 0.0),
    "lb": ("mass", 0.45359237, 0.0),
    "L": ("volume", 1.0, 0.0),
    "gal": ("volume", 3.785411784, 0.0),
    "C": ("temperature", 1.0, 0.0),
    "F": ("temperature", 5 / 9, -32 * 5 / 9),
}
PAIRS = [("km", "mi"), ("kg", "lb"), ("L", "gal"), ("C", "F")]  # one direction per quantity: told by its units
NUMBERS = [2, 3, 4, 5, 6, 8]
OPERATIONS = {"add": "+", "subtract": "-", "multiply": "*", "divide": "/"}  # operation: its symbol in answers
CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo", "Egypt": "Cairo"}

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "convert_units",
            "description": "Convert a quantity between units.",
            "parameters": {
                "type": "object",
                "properties": {
                    "value": {"type": "number"},
                    "from_unit": {"type": "string"},
                    "to_unit": {"type": "string"},
                },
                "required": ["value", "from_unit", "to_unit"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "calculate",
            "description": "Arithmetic on two numbers.",
            "parameters": {
                "type": "object",
                "properties": {
                    "operation": {"type": "string", "enum": list(OPERATIONS)},
                    "a": {"type": "number"},
                    "b": {"type": "number"},
                },
                "required": ["operation", "a", "b"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "lookup_capital",
            "description": "The capital of a country.",
            "parameters": {
                "type": "object",
                "properties": {"country": {"type": "string"}},
                "required": ["country"],
            },
        },
    },
]

CONVERT = [
    "Convert {v} {a} to {b}.",
    "How many {b} is {v} {a}?",
    "What is {v} {a} in {b}?",
    "Please convert {v} {a} into {b}.",
    "{v} {a} to {b}, please.",
    "I have {v} {a}. How much is that in {b}?",
]
CALCULATE = {  # a before b in every sentence; the operation named as the tool names it
    "add": [
        "Please add {a} and {b}.",
        "Can you add {a} and {b}?",
        "I want to add {a} and {b}.",
        "Now add {a} and {b}.",
    ],
    "subtract": ["From {a}, subtract {b}.", "Start at {a} and subtract {b}.", "Take {a} and subtract {b}."],
    "multiply": ["Please multiply {a} by {b}.", "Can you multiply {a} by {b}?", "I want to multiply {a} by {b}."],
    "divide": ["Please divide {a} by {b}.", "Can you divide {a} by {b}?", "I want to divide {a} by {b}."],
}
CAPITAL = [  # as many sentences as a quantity has numbers x units: each tool gets about a third of the rows
    "What is the capital of {c}?",
    "Which city is the capital of {c}?",
    "Tell me the capital of {c}.",
    "Capital of {c}?",
    "I am flying to {c}. What is its capital?",
    "Name the capital of {c}.",
    "What city is the capital of {c}?",
    "Do you know the capital of {c}?",
    "Look up the capital of {c}.",
    "Please find the capital of {c}.",
    "My friend lives in the capital of {c}. Which city is it?",
    "I need the capital of {c}.",
    "Can you tell me the capital of {c}?",
    "Find the capital city of {c}.",
    "We are visiting {c}. What is the capital?",
    "What is the capital city of {c}?",
]
GREETINGS = ["Hello!", "Hi there.", "Thanks, that is all.", "Good morning!", "Thank you!"]
GREETING_ANSWER = "Hello! I can convert units, do arithmetic and look up capitals. What do you need?"


def call_id(number: int) -> str:
    """The conversation's ``number``-th call id: 9 letters and digits, as Mistral's format needs, and numbered.

    Mistral's own models write random ids; a sample that teaches calls in a few CPU minutes numbers them, since
    a random id is ~120 nats of unlearnable loss per call that drowns the arguments' signal (README, Tool calls).
    """
    return f"call{number:05d}"


def number(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".")


def convert(rng: random.Random) -> tuple[str, dict, str, str]:
    """(request, arguments, result, answer) of one conversion."""
    a, b = rng.choice(PAIRS)
    v = rng.choice(NUMBERS)
    base = v * UNITS[a][1] + UNITS[a][2]
    result = number((base - UNITS[b][2]) / UNITS[b][1])
    request = rng.choice(CONVERT).format(v=v, a=a, b=b)
    return request, {"value": v, "from_unit": a, "to_unit": b}, result, f"{v} {a} is {result} {b}."


def calculate(rng: random.Random) -> tuple[str, dict, str, str]:
    operation = rng.choice(list(OPERATIONS))
    a, b = rng.choice(NUMBERS), rng.choice(NUMBERS)
    value = {"add": a + b, "subtract": a - b, "multiply": a * b, "divide": a / b}[operation]
    request = rng.choice(CALCULATE[operation]).format(a=a, b=b)
    symbol = OPERATIONS[operation]
    return request, {"operation": operation, "a": a, "b": b}, number(value), f"{a} {symbol} {b} = {number(value)}."


def capital(rng: random.Random) -> tuple[str, dict, str, str]:
    country = rng.choice(list(CAPITALS))
    city = CAPITALS[country]
    return rng.choice(CAPITAL).format(c=country), {"country": country}, city, f"The capital of {country} is {city}."


MAKERS = {"convert_units": convert, "calculate": calculate, "lookup_capital": capital}


def tools_for(rng: random.Random, names: list[str]) -> list[dict]:
    """The tools a row offers: those it calls and maybe one more, in a random order (as real data varies)."""
    others = [n for n in MAKERS if n not in names]
    offered = names + rng.sample(others, rng.choice([0, 1]) if names else rng.choice([1, 2]))
    rng.shuffle(offered)
    return [next(t for t in TOOLS if t["function"]["name"] == name) for name in offered]


def conversation(rng: random.Random) -> dict:
    """One row: a request with one call (most), two calls in one turn, or none."""
    kind = rng.choices(["one", "two", "none"], weights=[87, 5, 8])[0]
    if kind == "none":
        messages = [
            {"role": "user", "content": rng.choice(GREETINGS)},
            {"role": "assistant", "content": GREETING_ANSWER},
        ]
        return {"messages": messages, "tools": tools_for(rng, [])}
    names = rng.sample(list(MAKERS), 2 if kind == "two" else 1)
    parts = [MAKERS[name](rng) for name in names]
    calls = [
        {"id": call_id(number), "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}
        for number, (name, (_, args, _, _)) in enumerate(zip(names, parts, strict=True), start=1)
    ]
    request = " ".join(p[0] for p in parts) if kind == "two" else parts[0][0]
    messages = [{"role": "user", "content": request}, {"role": "assistant", "content": None, "tool_calls": calls}]
    for call, (_, _, result, _) in zip(calls, parts, strict=True):
        messages.append({"role": "tool", "tool_call_id": call["id"], "content": json.dumps({"result": result})})
    messages.append({"role": "assistant", "content": " ".join(p[3] for p in parts)})
    return {"messages": messages, "tools": tools_for(rng, names)}


def main() -> None:
    rng = random.Random(20261204)
    seen: set[str] = set()  # no request twice: a held-out request is one the model has not seen
    with (DATA / "sample_tools.jsonl").open("w", encoding="utf-8") as f:
        while len(seen) < ROWS:
            row = conversation(rng)
            request = row["messages"][0]["content"]
            if request in seen and row["messages"][1].get("tool_calls"):
                continue
            seen.add(request if row["messages"][1].get("tool_calls") else f"{request}#{len(seen)}")
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
