"""The model-family table: every stage asks it, and what it says matches the references it stands for."""

from __future__ import annotations

import json

import pytest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mistral_fast.config import LoraConfig, ModelConfig
from mistral_fast.errors import ConfigError, ModelError
from mistral_fast.families import (
    DEFAULT,
    FAMILIES,
    family_for_model,
    family_for_tokenizer,
    known_config,
    tokenizer_version,
)
from mistral_fast.tokenizer import load_tokenizer, reference_tokenizer, sentencepiece_path


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_each_row_matches_mistral_common(family) -> None:
    """The vocabulary size a row states is the size of mistral_common's tokenizer of that version."""
    if family.tokenizer_kind == "tekken":  # mistral_common's Nemo file, as MistralTokenizer.from_file loads it
        reference = reference_tokenizer(family.tokenizer)
    else:
        reference = MistralTokenizer.from_file(str(sentencepiece_path(family.tokenizer)))
    assert reference.instruct_tokenizer.tokenizer.n_words == family.vocab_size
    assert len(load_tokenizer(family.tokenizer)) == family.vocab_size


def test_rows_are_found_by_hub_name_and_by_config() -> None:
    assert family_for_model("mistralai/Mistral-7B-Instruct-v0.3").tokenizer == "v3"
    assert family_for_model("MISTRALAI/mistral-7b-v0.1").tokenizer == "v1"  # hub names are case-insensitive
    config = {"architectures": ["MistralForCausalLM"], "vocab_size": 32000}
    assert family_for_model("/models/my-finetune", config).tokenizer == "v1"
    assert family_for_model("tiny") is DEFAULT
    with pytest.raises(ModelError, match=r"LlamaForCausalLM with vocab_size 128256 is not a supported"):
        family_for_model("/models/llama", {"architectures": ["LlamaForCausalLM"], "vocab_size": 128256})


def test_tokenizer_version_is_one_rule(tmp_path) -> None:
    """model.tokenizer names the version; with 'model', the model's own row decides (config.json on disk)."""
    assert tokenizer_version(ModelConfig(tokenizer="v1")) == "v1"
    assert tokenizer_version(ModelConfig(tokenizer="model", name_or_path="tiny")) == "v3"
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MistralForCausalLM"], "vocab_size": 32000}))
    assert tokenizer_version(ModelConfig(tokenizer="model", name_or_path=str(tmp_path))) == "v1"
    with pytest.raises(ModelError, match="tokenizer version 'v9'"):
        family_for_tokenizer("v9")


def test_lora_target_sets_come_from_the_table() -> None:
    assert LoraConfig(targets="attention").target_modules == list(DEFAULT.lora_targets["attention"])
    assert LoraConfig(targets=["q_proj"]).target_modules == ["q_proj"]
    with pytest.raises(ConfigError, match=r"lora\.targets"):
        LoraConfig(targets="everything")


def test_known_configs_are_the_public_7b_shapes() -> None:
    v3, v1 = known_config("mistralai/Mistral-7B-v0.3"), known_config("mistralai/Mistral-7B-v0.1")
    assert v3["vocab_size"] == 32768 and v1["vocab_size"] == 32000
    assert v3["hidden_size"] == 4096 and v3["num_key_value_heads"] == 8 and v3["intermediate_size"] == 14336
    assert known_config("someone/unknown-model") is None


def test_tekken_rows_nemo_and_small() -> None:
    """Nemo and Small 24B: same architecture and vocabulary, told apart by name or by MLP width and RoPE base."""
    nemo = known_config("mistralai/Mistral-Nemo-Instruct-2407")
    small = known_config("mistralai/Mistral-Small-24B-Base-2501")
    assert nemo["head_dim"] == 128 != nemo["hidden_size"] // nemo["num_attention_heads"]  # decoupled head_dim
    assert (nemo["intermediate_size"], nemo["rope_theta"], nemo["vocab_size"]) == (14336, 1e6, 131072)
    assert (small["intermediate_size"], small["rope_theta"], small["num_hidden_layers"]) == (32768, 1e8, 40)
    assert family_for_model("mistralai/Mistral-Nemo-Base-2407").tokenizer == "v3-tekken"
    assert family_for_model("/models/small", small).tokenizer == "v7-tekken"
    assert family_for_model("/models/nemo", nemo).tokenizer == "v3-tekken"
    small_v5 = {k: v for k, v in small.items() if k != "rope_theta"} | {"rope_parameters": {"rope_theta": 1e8}}
    assert family_for_model("/models/small", small_v5).tokenizer == "v7-tekken"  # transformers 5's config.json
    small_model = ModelConfig(tokenizer="model", name_or_path="mistralai/Mistral-Small-24B-Instruct-2501")
    assert tokenizer_version(small_model) == "v7-tekken"


def test_mistral3_vision_models_are_refused_clearly() -> None:
    config = {"architectures": ["Mistral3ForConditionalGeneration"], "text_config": {"vocab_size": 131072}}
    with pytest.raises(ModelError, match=r"Mistral3ForConditionalGeneration .*vision-language.*Mistral-Small-24B"):
        family_for_model("/models/small-3.1", config)
