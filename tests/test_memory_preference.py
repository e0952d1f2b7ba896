"""The memory estimator for DPO and ORPO (two sequences per pair; DPO's reference pass without gradients),
checked against the peak RSS of real preference-trainer steps on CPU, as tests/test_memory.py does for SFT."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import require_platform
from rss_harness import STEP_PARTS, estimate_measured, measure_in_fresh_process, step_estimate

from mistral_fast.config import RunConfig
from mistral_fast.memory import estimate_memory

TESTS = Path(__file__).resolve().parent
MISTRAL_7B = {
    "architectures": ["MistralForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 32768,
    "head_dim": 128,
}


def test_a_pair_costs_two_sequences_and_dpo_adds_no_second_model() -> None:
    cfg = RunConfig().with_overrides(
        {"model.max_seq_length": 1024, "train.per_device_batch_size": 2, "train.gradient_checkpointing": False}
    )
    sft = estimate_memory(cfg, model_config=MISTRAL_7B, gpu="a100-80gb")
    dpo = estimate_memory(
        cfg.with_overrides({"train.method": "dpo", "train.max_answer_length": 256}),
        model_config=MISTRAL_7B,
        gpu="a100-80gb",
    )
    orpo = estimate_memory(cfg.with_overrides({"train.method": "orpo"}), model_config=MISTRAL_7B, gpu="a100-80gb")
    assert dpo.plan.tokens == orpo.plan.tokens == 2 * sft.plan.tokens
    for est in (dpo, orpo):  # the reference is the same weights with the adapter off: no second copy
        assert est.breakdown["weights"] == sft.breakdown["weights"]
        assert est.breakdown["activations (saved)"] == 2 * sft.breakdown["activations (saved)"]
    assert "reference pass (no gradients)" in dpo.breakdown and "reference pass (no gradients)" not in orpo.breakdown
    # DPO's fused LM head builds logits for the answers only; ORPO's plain forward for every position
    assert dpo.breakdown["activations (transient peak)"] < orpo.breakdown["activations (transient peak)"]


_MEASURE = """
import json, sys
sys.path.insert(0, sys.argv[5])
from rss_harness import measure_cpu_preference
from mistral_fast.config import RunConfig
from mistral_fast.modeling import build_tiny_model
path, sizes, overrides = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
batch, prompt, answer = map(int, sys.argv[4].split(","))
build_tiny_model(path, **sizes)
cfg = RunConfig().with_overrides({"model.name_or_path": path, "model.backend": "hf", **overrides})
print("RESULT", json.dumps(measure_cpu_preference(cfg, batch_size=batch, prompt_len=prompt, answer_len=answer)))
"""

STEP_TOLERANCE = 0.15
TOTAL_TOLERANCE = 0.15
_SMALL = {"hidden_size": 512, "num_layers": 4, "intermediate_size": 1792, "num_heads": 8, "num_kv_heads": 2}
CASES = {
    "dpo-512x4": ({"train.method": "dpo", "train.gradient_checkpointing": False}, (2, 192, 64)),
    "orpo-512x4": ({"train.method": "orpo", "train.gradient_checkpointing": False}, (2, 192, 64)),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_preference_estimate_matches_measured_cpu_peak(tmp_path: Path, case: str) -> None:
    require_platform(sys.platform.startswith("linux"), "reads /proc for the peak RSS")

    overrides, (batch, prompt, answer) = CASES[case]
    args = [
        str(tmp_path / "model"),
        json.dumps(_SMALL),
        json.dumps(overrides),
        f"{batch},{prompt},{answer}",
        str(TESTS),
    ]
    measured = measure_in_fresh_process(["-c", _MEASURE, *args])
    cfg = RunConfig().with_overrides(
        {
            "model.name_or_path": str(tmp_path / "model"),
            **overrides,
            "model.max_seq_length": prompt + answer,
            "train.per_device_batch_size": batch,
            "train.max_answer_length": answer,
        }
    )
    est = estimate_measured(cfg, measured)
    b = est.breakdown
    assert measured["trainable_params"] == est.details["trainable_params"]
    step = step_estimate(b, (*STEP_PARTS, "reference"))  # and DPO's reference pass
    print(
        case,
        {k: round(v / 2**20, 1) for k, v in b.items()},
        "measured MiB",
        {k: round(v / 2**20, 1) for k, v in measured.items() if k.endswith(("rss", "peak"))},
    )
    assert measured["step_peak"] == pytest.approx(step, rel=STEP_TOLERANCE), (measured, b)
    assert measured["total_peak"] == pytest.approx(est.total, rel=TOTAL_TOLERANCE), (measured, b)
