"""GRPO on the unsloth backend through `mistral-fast train grpo-smoke`, in its own process (importing unsloth patches
transformers and TRL in place). On a GPU, importing unsloth replaces ``trl.GRPOTrainer`` by its patched trainer
(PatchFastRL), which ours subclasses; Unsloth's CPU fallback, tested here, keeps TRL's trainer and routes TRL's
fused LM head to unsloth_zoo's CPU kernel (at the sampling temperature)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require_optional

pytestmark = [pytest.mark.unsloth, pytest.mark.slow]
require_optional("unsloth", module_level=True)


def test_unsloth_grpo_run_through_the_cli(tmp_path: Path) -> None:
    out = tmp_path / "run"
    overrides = ["model.backend=unsloth", f"train.output_dir={out}", "train.sft_warmup_steps=4", "train.max_steps=2"]
    overrides += ["train.logging_steps=1", "train.per_device_batch_size=16", "data.max_examples=60"]
    cmd = [sys.executable, "-m", "mistral_fast.cli", "train", "grpo-smoke", *(f"--set={o}" for o in overrides)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "no GPU found, training on CPU" in proc.stdout + proc.stderr  # Unsloth's own CPU backend
    assert "Unsloth (CPU): MistralForCausalLM" in proc.stdout + proc.stderr  # its model loader, not ours
    result = json.loads((out / "result.json").read_text())
    assert result["train"]["backend"] == "unsloth" and result["train"]["steps"] == 2
    assert result["train"]["extra"]["method"] == "grpo"
    grpo = json.loads((out / "eval.json").read_text())["grpo"]
    assert 0 <= grpo["reward_before"] <= 1 and 0 <= grpo["reward_after"] <= 1
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "rewards/numeric_answer/mean" in r] == [1, 2]
    assert "held-out mean reward" in proc.stdout
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
