"""Untrained embedding rows (Nemo base's control tokens) stop a run before training, naming the tokens."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mistral_fast.config import load_config
from mistral_fast.errors import ModelError
from mistral_fast.modeling import resolve_model_path
from mistral_fast.modeling.embeddings import check_untrained_tokens, untrained_rows
from mistral_fast.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def zeroed_nemo(tmp_path_factory) -> Path:
    """The tiny Nemo with its 1,000 control-token rows zeroed in embed_tokens and lm_head, like Nemo base."""
    directory = tmp_path_factory.mktemp("zeroed") / "tiny-nemo-base"
    shutil.copytree(resolve_model_path("tiny-nemo"), directory)
    weights = load_file(str(directory / "model.safetensors"))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        weights[name][:1000] = 0
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def test_untrained_rows_are_near_zero_against_the_rest():
    weight = torch.randn(64, 16) * 0.02
    weight[[3, 7]] = 0
    weight[9] = 1e-6  # near zero, not zero (a few optimizer steps of weight decay on an unused row)
    weight[11] *= 0.3  # small but trained
    assert untrained_rows(weight).nonzero().flatten().tolist() == [3, 7, 9]
    assert untrained_rows(weight.bfloat16()).nonzero().flatten().tolist() == [3, 7, 9]


def test_check_names_the_tokens(zeroed_nemo):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(zeroed_nemo))
    tok = load_tokenizer("v3-tekken")
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}])
    with pytest.raises(ModelError, match=r"4 token\(s\).*'<s>' \(id 1: embed_tokens\+lm_head\).*'\[INST\]' \(id 3"):
        check_untrained_tokens(model, ids["input_ids"], tok)
    check_untrained_tokens(model, tok("Hi there", add_special_tokens=False)["input_ids"], tok)  # text rows: fine


@pytest.mark.slow
def test_a_run_on_a_base_with_untrained_control_tokens_stops_before_training(zeroed_nemo, tmp_path):
    from mistral_fast.pipeline import run

    overrides = [f"model.name_or_path={zeroed_nemo}", "data.max_examples=8", "model.max_seq_length=64"]
    cfg = load_config("smoke-nemo", [*overrides, f"train.output_dir={tmp_path / 'run'}", "train.max_steps=1"])
    with pytest.raises(ModelError, match=r"untrained.*'\[/INST\]'.*instruct checkpoint"):
        run(cfg)
    assert not (tmp_path / "run" / "adapter").exists()
