"""DPO and ORPO on the unsloth backend (Unsloth's CPU fallback), through `mistral-fast train` with a
preference config, each in its own process: importing unsloth patches transformers and TRL in place."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import require_optional

from mistral_fast.preference import SAMPLE_PREFERENCES

pytestmark = [
    pytest.mark.unsloth,
    pytest.mark.slow,
]
require_optional("unsloth", module_level=True)


def preference_yaml(path: Path, method: str, out: Path) -> Path:
    """The preference config a user writes for `mistral-fast train` (same settings as the hf tests)."""
    config = {
        "model": {"name_or_path": "tiny", "backend": "unsloth", "max_seq_length": 128},
        "lora": {"rank": 8, "alpha": 16, "dropout": 0.0},
        "data": {"path": str(SAMPLE_PREFERENCES), "eval_fraction": 0.2, "max_examples": 120},
        "train": {
            "method": method,
            "beta": 0.1,
            "output_dir": str(out),
            "max_steps": 30,
            "learning_rate": 3.0e-3,
            "warmup_ratio": 0.0,
            "lr_scheduler": "constant",
            "max_grad_norm": 1.0,
            "per_device_batch_size": 4,
            "gradient_accumulation_steps": 1,
            "logging_steps": 5,
            "eval_steps": 15,
            "save_steps": 15,
            "gradient_checkpointing": False,
        },
    }
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_unsloth_preference_run_through_the_cli(tmp_path: Path, method: str) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "mistral_fast.cli", "train", str(preference_yaml(tmp_path / "c.yaml", method, out))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "no GPU found, training on CPU" in proc.stdout + proc.stderr  # Unsloth's own CPU backend
    result = json.loads((out / "result.json").read_text())
    assert result["train"]["backend"] == "unsloth" and result["train"]["steps"] == 30
    assert result["train"]["extra"]["method"] == method
    evaluation = json.loads((out / "eval.json").read_text())
    assert evaluation["base"]["accuracy"] < 0.9 <= evaluation["tuned"]["accuracy"], evaluation
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("rewards/margins" in r for r in logged if "loss" in r)
    assert "held-out preference accuracy" in proc.stdout
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
