"""Write the project's sample data sets into data/ (deterministic; rerun to regenerate).

sample_chat.jsonl / sample_alpaca.jsonl: a unit-conversion assistant that always answers in one fixed
form, "<value> <unit> = <result> <unit>.", rounded to two decimals; multi-turn, with system prompts (the
chat-format and multi-turn tests use it). A fine-tuned model can be scored by exact match as well as
ROUGE/BLEU, and a tiny model over-fitted on it shows whether it learned to stop.

sample_sentiment.jsonl: short product and place reviews labelled ``positive`` or ``negative`` (the
demo). The label follows from the opinion word, which comes from a small fixed list, while the thing
reviewed and the sentence around it vary: a tiny random-weight Mistral learns it with LoRA in about a
minute on 2 CPU cores and answers held-out reviews (new sentences, same opinion words) by exact match,
which the untrained base never does. Both labels are equally frequent.
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


THINGS = [
    "the food", "the service", "this phone", "the movie", "the hotel room", "the battery", "the staff",
    "the plot", "the delivery", "this laptop", "the coffee", "the concert", "the app", "the seats",
    "the camera", "the book", "the pizza", "the hike", "the headphones", "the museum",
]
POSITIVE = ["wonderful", "excellent", "great", "fantastic", "superb", "delightful", "amazing", "lovely"]
NEGATIVE = ["terrible", "awful", "horrible", "dreadful", "disappointing", "poor", "useless", "bad"]
REVIEWS = [
    "{T} was {w}.",
    "Honestly, {t} was {w}.",
    "I found {t} {w}.",
    "{T} is {w}, nothing more to say.",
    "We tried {t} yesterday: {w}.",
    "My verdict on {t}: {w}.",
]
CLASSIFY = "Is this review positive or negative? Answer with one word.\n\n{review}"


def sentiment(rng: random.Random, label: str) -> dict:
    """One review with its label as a two-message chat: the answer is the bare label."""
    word = rng.choice(POSITIVE if label == "positive" else NEGATIVE)
    thing = rng.choice(THINGS)
    review = rng.choice(REVIEWS).format(t=thing, T=thing[0].upper() + thing[1:], w=word)
    return {
        "messages": [
            {"role": "user", "content": CLASSIFY.format(review=review)},
            {"role": "assistant", "content": label},
        ]
    }


def main() -> None:
    rng = random.Random(20261129)
    with (DATA / "sample_chat.jsonl").open("w", encoding="utf-8") as f:
        for _ in range(240):
            f.write(json.dumps(conversation(rng), ensure_ascii=False) + "\n")
    with (DATA / "sample_alpaca.jsonl").open("w", encoding="utf-8") as f:
        for _ in range(60):
            f.write(json.dumps(alpaca(rng), ensure_ascii=False) + "\n")
    rng = random.Random(20261130)  # its own seed: the sets above stay byte-identical
    labels = ["positive", "negative"] * 150
    rng.shuffle(labels)
    seen: set[str] = set()  # no review twice: a held-out review must be new to the model, not a copy
    with (DATA / "sample_sentiment.jsonl").open("w", encoding="utf-8") as f:
        for label in labels:
            line = json.dumps(sentiment(rng, label), ensure_ascii=False)
            while line in seen:
                line = json.dumps(sentiment(rng, label), ensure_ascii=False)
            seen.add(line)
            f.write(line + "\n")


if __name__ == "__main__":
    main()
