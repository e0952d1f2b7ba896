"""Write the project's sample data sets into data/ (deterministic; rerun to regenerate).

The task is deliberately checkable: a unit-conversion assistant that always answers in one fixed
form, "<value> <unit> = <result> <unit>.", rounded to two decimals. A fine-tuned model can be scored by
exact match as well as ROUGE/BLEU, and a tiny model over-fitted on it shows whether it learned to stop.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "data"

# (from, to, factor, offset): result = value * factor + offset
CONVERSIONS = [
    ("km", "mi", 0.621371, 0.0),
    ("mi", "km", 1.609344, 0.0),
    ("m", "ft", 3.28084, 0.0),
    ("ft", "m", 0.3048, 0.0),
    ("kg", "lb", 2.204623, 0.0),
    ("lb", "kg", 0.453592, 0.0),
    ("L", "gal", 0.264172, 0.0),
    ("gal", "L", 3.785412, 0.0),
    ("cm", "in", 0.393701, 0.0),
    ("in", "cm", 2.54, 0.0),
    ("°C", "°F", 1.8, 32.0),
    ("°F", "°C", 0.555556, -17.777778),
]
ASKS = [
    "Convert {v} {a} to {b}.",
    "How many {b} is {v} {a}?",
    "{v} {a} in {b}, please.",
    "What is {v} {a} in {b}?",
    "Could you turn {v} {a} into {b}?",
    "convert {v}{a} -> {b}",
]
FOLLOW_UPS = ["And {v} {a}?", "What about {v} {a}?", "Now {v} {a}, please."]
SYSTEMS = [
    "You are UnitBot. Answer every conversion in the form '<value> <unit> = <result> <unit>.'",
    "Reply with the conversion only, rounded to two decimals.",
]


def answer(value: float, conv: tuple[str, str, float, float]) -> str:
    a, b, factor, offset = conv
    return f"{value:g} {a} = {value * factor + offset:.2f} {b}."


def conversation(rng: random.Random) -> dict:
    conv = rng.choice(CONVERSIONS)
    value = rng.choice([rng.randint(1, 500), round(rng.uniform(0.5, 100), 1)])
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(SYSTEMS)})
    a, b = conv[0], conv[1]
    messages.append({"role": "user", "content": rng.choice(ASKS).format(v=f"{value:g}", a=a, b=b)})
    messages.append({"role": "assistant", "content": answer(value, conv)})
    for _ in range(rng.choice([0, 0, 0, 1, 2])):  # a quarter of them go on for more turns
        value = rng.randint(1, 300)
        messages.append({"role": "user", "content": rng.choice(FOLLOW_UPS).format(v=value, a=a)})
        messages.append({"role": "assistant", "content": answer(value, conv)})
    return {"messages": messages}


def alpaca(rng: random.Random) -> dict:
    conv = rng.choice(CONVERSIONS)
    value = rng.randint(1, 1000)
    return {
        "instruction": f"Convert the quantity to {conv[1]}.",
        "input": f"{value} {conv[0]}",
        "output": answer(value, conv),
    }


def main() -> None:
    rng = random.Random(20261129)
    with (DATA / "sample_chat.jsonl").open("w", encoding="utf-8") as f:
        for _ in range(240):
            f.write(json.dumps(conversation(rng), ensure_ascii=False) + "\n")
    with (DATA / "sample_alpaca.jsonl").open("w", encoding="utf-8") as f:
        for _ in range(60):
            f.write(json.dumps(alpaca(rng), ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
