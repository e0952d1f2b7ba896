"""Write the project's sample GRPO prompt set, data/sample_grpo.jsonl (deterministic; rerun to regenerate).

Metric unit conversions whose factor is a power of ten ("Convert 7 km to m." → ``7000``): a checker
function scores an answer exactly (`mistral_fast.rewards.numeric_answer` against the ``answer`` column),
and the answer is the question's digits followed by the unit pair's zeros, something a tiny random-weight
Mistral can learn to produce by copying, after a short supervised warm-up has taught it the answer's form.
Each record is a ``prompt`` (the user's question), the ``answer`` a checker compares with (a string, as
users' data sets have it) and the target ``unit``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "data"

# (from, to, factor): the answer is value * factor, an integer for integer values
CONVERSIONS = [
    ("km", "m", 1000),
    ("m", "cm", 100),
    ("kg", "g", 1000),
    ("L", "mL", 1000),
    ("cm", "mm", 10),
    ("m", "mm", 1000),
]
ASKS = [
    "Convert {v} {a} to {b}.",
    "How many {b} is {v} {a}?",
    "{v} {a} in {b}?",
    "What is {v} {a} in {b}?",
]


def record(rng: random.Random) -> dict:
    a, b, factor = rng.choice(CONVERSIONS)
    value = rng.randint(1, 9)
    return {"prompt": rng.choice(ASKS).format(v=value, a=a, b=b), "answer": str(value * factor), "unit": b}


def main() -> None:
    rng = random.Random(24)
    rows, seen = [], set()
    while len(rows) < 200:
        row = record(rng)
        if row["prompt"] not in seen:  # no question twice: held-out prompts are new ones
            seen.add(row["prompt"])
            rows.append(row)
    path = DATA / "sample_grpo.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} prompts to {path}")


if __name__ == "__main__":
    main()
