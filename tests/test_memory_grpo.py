"""The memory estimate of a GRPO run: the group's generation (a KV cache for every completion at once, checked
against the cache transformers really builds), completion-only scoring, and a reference pass only with beta > 0."""

from __future__ import annotations

import dataclasses

import pytest

from mistral_fast.config import load_config
from mistral_fast.memory import MistralShapes, estimate_memory, generation_bytes, plan_from_config


def test_generation_kv_cache_matches_the_cache_transformers_builds() -> None:
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=256,
        dtype="bfloat16",
    )
    model = MistralForCausalLM(config).to(torch.bfloat16).eval()
    cfg = load_config(
        "grpo-smoke",
        ["model.max_seq_length=48", "train.per_device_batch_size=8", "train.gradient_accumulation_steps=2"],
    )
    plan = dataclasses.replace(plan_from_config(cfg, compute_dtype="bfloat16", on_gpu=False), seq_len=48)
    shapes = MistralShapes.from_config(config.to_dict())
    sequences = plan.batch_size * plan.accumulation  # one generation batch: every completion of the step
    with torch.no_grad():
        out = model(input_ids=torch.randint(0, 512, (sequences, 48)), use_cache=True)
    cache = out.past_key_values
    measured = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    logits = sequences * shapes.vocab * 4  # one decoding step's fp32 logits per sequence
    assert generation_bytes(shapes, plan) - logits == measured


@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_grpo_estimate_scores_completions_and_adds_a_reference_only_with_beta(beta: float) -> None:
    over = ["train.max_completion_length=256", f"train.beta={beta}", "model.max_seq_length=2048"]
    grpo = estimate_memory(load_config("grpo-smoke", over).with_overrides({"model.name_or_path": "tiny"}), gpu="t4")
    assert "group generation (above the step)" in grpo.breakdown
    assert ("reference pass (no gradients)" in grpo.breakdown) == (beta > 0)
    assert grpo.plan.scored_tokens == grpo.plan.sequences * 256  # the LM head scores completion positions only
