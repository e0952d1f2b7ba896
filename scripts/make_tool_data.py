"""Write data/sample_tools.jsonl: function calling with three small tools (deterministic; rerun to regenerate).

Each row is OpenAI's fine-tuning format, which is also mistral_fast's: ``messages`` with assistant
``tool_calls`` and ``tool`` results, and the ``tools`` the model may call (JSON schemas):

* ``convert_units(value, from_unit, to_unit)``: length, mass, volume and temperature units;
* ``calculate(operation, a, b)``: add, subtract, multiply, divide;
* ``lookup_capital(country)``: the capital of a country, from a small table.

A conversation is a request, the assistant's call (9-character alphanumeric id, as Mistral's format
needs), the tool's result and the assistant's answer quoting it; some requests need two calls in one turn
(parallel calls) and some need none (a greeting: no call is the right answer). The arguments come from
small sets (a dozen numbers, eight countries) placed in varied sentences, so a tiny random-weight model
can learn with LoRA on CPU in a few minutes to pick the tool and fill the arguments (the ``tools-smoke``
preset), while held-out requests are sentences it has not seen. No request appears twice. A row offers
the tools it calls and sometimes one more, in a random order: rows stay short (the tools' JSON schemas
are most of a prompt's tokens) and the model must read which tools it has.
"""

from __future__ import annotations

import json
import random
import string
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
OPERATIONS = {"add": ("+", "plus"), "subtract": ("-", "minus"), "multiply": ("*", "times"), "divide": ("/", "over")}
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
CALCULATE = {  # a before b in every sentence
    "add": ["What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}.", "Sum {a} and {b}, please."],
    "subtract": ["What is {a} minus {b}?", "From {a}, subtract {b}.", "Compute {a} - {b}."],
    "multiply": ["What is {a} times {b}?", "Multiply {a} by {b}.", "Compute {a} * {b}."],
    "divide": ["What is {a} divided by {b}?", "Divide {a} by {b}.", "Compute {a} / {b}."],
}
CAPITAL = [
    "What is the capital of {c}?",
    "Which city is the capital of {c}?",
    "Tell me the capital of {c}.",
    "Capital of {c}?",
    "I am flying to {c}. What is its capital?",
]
GREETINGS = ["Hello!", "Hi there.", "Thanks, that is all.", "Good morning!", "Thank you!"]
GREETING_ANSWER = "Hello! I can convert units, do arithmetic and look up capitals. What do you need?"


def call_id(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(9))


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
    symbol = OPERATIONS[operation][0]
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
        {"id": call_id(rng), "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}
        for name, (_, args, _, _) in zip(names, parts, strict=True)
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
