"""The demo visibly learns: held-out reviews the base never labels right, the tuned model mostly does."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def test_sentiment_sample_data_is_balanced_and_unique() -> None:
    lines = (ROOT / "data" / "sample_sentiment.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(set(lines)) == len(lines) == 300, "no review twice: held-out reviews are new to the model"
    labels = Counter(r["messages"][-1]["content"] for r in rows)
    assert labels == {"positive": 150, "negative": 150}
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in rows)


@pytest.mark.slow
def test_demo_tuned_model_labels_held_out_reviews_the_base_gets_wrong(tmp_path) -> None:
    argv = [sys.executable, "-m", "mistral_fast.cli", "demo", "--out", "runs/demo"]
    done = subprocess.run(argv, capture_output=True, text=True, env=ENV, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "held-out exact match over 30 prompts: base 0.00 -> tuned" in done.stdout
    evaluation = json.loads((tmp_path / "runs" / "demo" / "eval.json").read_text())
    assert len(evaluation["samples"]) == 30  # every held-out review
    assert evaluation["base"]["exact_match"] <= 0.05
    assert evaluation["exact_match"] >= 0.8, evaluation["exact_match"]
    tuned = Counter(s["tuned"] for s in evaluation["samples"])
    assert set(tuned) <= {"positive", "negative"} and len(tuned) == 2, "both labels, and nothing else"
    # the same run's terminal (papermill streams the kernel's output to stderr): only what matters
    terminal = done.stdout + done.stderr
    assert terminal_noise(terminal) == [], terminal[-6000:]
    finished = [line for line in _lines(terminal) if line.startswith("Loading weights:")]
    assert len(finished) == 1 and re.search(r"100%\|█+\| (\d+)/\1 ", finished[0]), finished  # one line, at the end
    assert "in this machine's CPU RAM" in terminal, "the CPU pre-flight says what it checked against"


# A progress frame `desc:  40%|████      | 4/10 [...]`: in a stream that is not a terminal only the last belongs.
_FRAME = re.compile(r"(\d+)%\|[^|]*\| *(\d+)/(\d+)\b")
# What Python prints for an object with no text form of its own: `<IPython.core.display.HTML object>`.
_BARE_REPR = re.compile(r"<[\w.]+ object( at 0x[0-9a-fA-F]+)?>")
# A verdict naming a GPU card ("fits on A100-80GB (80.0 GiB)", "does NOT fit on T4 (…)").
_CARD_VERDICT = re.compile(r"\bfits? on [A-Z][A-Z0-9]")


def _lines(text: str) -> list[str]:
    """Every line as a terminal stream carries it: carriage returns (progress redraws) split lines too."""
    return [part.strip() for line in text.splitlines() for part in line.split("\r") if part.strip()]


def terminal_noise(text: str, *, on_gpu: bool = False) -> list[str]:
    """The lines of a headless run's terminal output that tell the user nothing (issue 26), each with why."""
    noise = []
    for line in _lines(text):
        if "without encryption" in line:
            noise.append(f"kernel transport warning: {line[:100]}")
        if _BARE_REPR.fullmatch(line):
            noise.append(f"a rich output's bare repr: {line}")
        frame = _FRAME.search(line)
        if frame and frame.group(2) != frame.group(3):
            noise.append(f"an unfinished progress frame: {line[:100]}")
        if not on_gpu and _CARD_VERDICT.search(line):
            noise.append(f"a GPU card's verdict on a machine without one: {line[:100]}")
    return noise


def test_terminal_noise_finds_each_kind() -> None:
    """The scanner itself, on the lines issue 26 quoted from a demo run (so a clean scan means something)."""
    quoted = (
        "[IPKernelApp] WARNING | Kernel is running over TCP without encryption. All communication ...\n"
        "<IPython.core.display.HTML object>\n"
        "Writing model shards:   0%|          | 0/1 [00:00<?, ?it/s]\n"
        "fits on A100-80GB (80.0 GiB)\n"
        "Loading weights: 100%|██████████| 21/21 [00:00<00:00, 455.04it/s]\n"
        "train loss: 11.7518 -> 0.0011\n"
    )
    assert len(terminal_noise(quoted)) == 4
    assert terminal_noise("a:  50%|█████     | 1/2 [00:01<00:01]\ra: 100%|██████████| 2/2 [00:02<00:00]") == [
        "an unfinished progress frame: a:  50%|█████     | 1/2 [00:01<00:01]"
    ]
