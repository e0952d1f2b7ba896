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


def test_mistral3_wrappers_are_rows_found_by_config_and_name() -> None:
    """A Mistral3ForConditionalGeneration config.json (the language model's figures under text_config) finds its row;
    Ministral 3 (text model_type ministral3) is told apart by its size; Pixtral 12B (Llava layout) is still refused."""
    small31 = {
        "architectures": ["Mistral3ForConditionalGeneration"],
        "model_type": "mistral3",
        "text_config": {"model_type": "mistral", "vocab_size": 131072, "intermediate_size": 32768, "rope_theta": 1e9},
    }
    found = family_for_model("/models/small-3.1", small31)
    assert (found.name, found.tokenizer, found.gguf_arch) == ("mistral-small-3.1", "v7-tekken", "mistral3")
    assert found.is_wrapper and found.frozen_16bit == ("model.vision_tower", "model.multi_modal_projector")
    ministral = {**small31, "text_config": {"model_type": "ministral3", "vocab_size": 131072, "hidden_size": 4096,
                                            "num_hidden_layers": 34}}
    assert family_for_model("/models/ministral", ministral).name == "ministral-3-8b"
    assert family_for_model("mistralai/Mistral-Small-3.2-24B-Instruct-2506").tokenizer == "v11-tekken"
    assert family_for_model("mistralai/Magistral-Small-2507").architecture == "MistralForCausalLM"
    assert family_for_model("tiny-mistral3").language_model == "model.language_model"
    with pytest.raises(ModelError, match=r"LlavaForConditionalGeneration \(Pixtral 12B\)"):
        family_for_model("/models/pixtral", {"architectures": ["LlavaForConditionalGeneration"], "vocab_size": 131072})


def test_models_llama_cpp_converts_only_from_mistral_format_are_refused(tmp_path) -> None:
    from mistral_fast.modeling import resolve_model_path

    with pytest.raises(ModelError, match=r"Mistral Large 3 is a 675B mixture-of-experts.*--mistral-format"):
        family_for_model("mistralai/Mistral-Large-3-675B-Instruct-2512")
    (tmp_path / "params.json").write_text(json.dumps({"dim": 5120, "n_layers": 40}))
    (tmp_path / "consolidated.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match=r"Mistral's own format \(params.json.*--mistral-format"):
        resolve_model_path(str(tmp_path))
