"""The demo visibly learns: held-out reviews the base never labels right, the tuned model mostly does."""

from __future__ import annotations

import json
import os
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
