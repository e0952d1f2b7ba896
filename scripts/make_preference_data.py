"""Write the project's sample preference set, data/sample_preference.jsonl (deterministic; rerun to regenerate).

The same unit-conversion assistant as data/sample_chat.jsonl, now as preference pairs: both answers
carry the same (correct) numbers, and what differs is the *style*. The chosen answer is the house form
"<value> <unit> = <result> <unit>."; the rejected one is sloppy (no "=", hedging, units glued on, no full
stop). A tiny random model cannot learn arithmetic, but it can learn a style, so DPO/ORPO on this set
shows a measurable preference shift in a minute on a CPU.

Rejected answers are about as long as the chosen one, sometimes shorter, sometimes longer: an untrained
model, which mostly scores an answer by its number of tokens, ranks the pairs at about chance, and the
tuned model has to learn the style itself to rank them.
Each record is TRL's conversational preference form: ``prompt`` (messages, sometimes with a system
prompt or an earlier exchange), ``chosen`` and ``rejected`` (one assistant message each).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_sample_data import ASKS, CONVERSIONS, FOLLOW_UPS, SYSTEMS, answer

DATA = Path(__file__).resolve().parent.parent / "data"

REJECTED = [  # the same numbers in other styles, about as many tokens as the house form
    "{v} {a} is {r} {b}",
    "{v} {a} -> {r} {b}!",
    "{v}{a} = {r}{b}",
    "{v} {a} is roughly {r} {b}?",
    "{r} {b}, from {v} {a}.",
    "It is {r} {b}.",
    "{v} {a} equals {r}",
    "ok: {r} {b}",
]


def pair(rng: random.Random) -> dict:
    conv = rng.choice(CONVERSIONS)
    a, b, factor, offset = conv
    prompt = []
    if rng.random() < 0.2:
        prompt.append({"role": "system", "content": rng.choice(SYSTEMS)})
    value = rng.choice([rng.randint(1, 500), round(rng.uniform(0.5, 100), 1)])
    prompt.append({"role": "user", "content": rng.choice(ASKS).format(v=f"{value:g}", a=a, b=b)})
    if rng.random() < 0.2:  # an earlier exchange: the pair is about the follow-up's answer
        prompt.append({"role": "assistant", "content": answer(value, conv)})
        value = rng.randint(1, 300)
        prompt.append({"role": "user", "content": rng.choice(FOLLOW_UPS).format(v=value, a=a)})
    result = f"{value * factor + offset:.2f}"
    rejected = rng.choice(REJECTED).format(v=f"{value:g}", a=a, b=b, r=result)
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": answer(value, conv)}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def main() -> None:
    rng = random.Random(20261130)
    with (DATA / "sample_preference.jsonl").open("w", encoding="utf-8") as f:
        for _ in range(240):
            f.write(json.dumps(pair(rng), ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
