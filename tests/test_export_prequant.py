"""Merge and GGUF from a pre-quantised bitsandbytes 4-bit base (``*-bnb-4bit``), as Colab users train on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_export_merge import PROMPT, _dequantized_from_4bit_model, _peft_merged, make_adapter_run

import mistral_fast as mf
from mistral_fast.errors import ModelError
from mistral_fast.export import export_gguf, export_merged_gguf, merge_adapter
from mistral_fast.export.merge import checkpoint_files, read_tensor
from mistral_fast.modeling import tiny_model_dir
from mistral_fast.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def bnb_4bit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model as transformers saves a ``load_in_4bit`` model (packed NF4 codes + quant state)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from mistral_fast.modeling import disable_cpu_weight_repacking

    out = tmp_path_factory.mktemp("bnb") / "tiny-bnb-4bit"
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(), quantization_config=quant, dtype=torch.bfloat16)
    disable_cpu_weight_repacking(model)
    model.save_pretrained(out)
    load_tokenizer("v3").save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def prequant_run(bnb_4bit_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, mf.LoadedModel]:
    run_dir = tmp_path_factory.mktemp("prequant-run") / "run"
    loaded = make_adapter_run(run_dir, compute_dtype="bfloat16", extra=(f"model.name_or_path={bnb_4bit_dir}",))
    return run_dir, loaded


def test_checkpoint_is_really_stored_in_4_bit(bnb_4bit_dir: Path) -> None:
    config = json.loads((bnb_4bit_dir / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitsandbytes"
    stored = load_file(bnb_4bit_dir / "model.safetensors")
    assert stored["model.layers.0.self_attn.q_proj.weight"].dtype == torch.uint8
    assert "model.layers.0.self_attn.q_proj.weight.nested_absmax" in stored  # double quantisation


def test_stored_weights_dequantise_as_the_trained_model_computes(bnb_4bit_dir: Path, prequant_run) -> None:
    """What a Linear4bit of the model training used holds, dequantised by bitsandbytes, bit for bit."""
    _, loaded = prequant_run
    reference = _dequantized_from_4bit_model(loaded)
    assert len(reference) == 14
    (file,) = checkpoint_files(bnb_4bit_dir)
    for name, weight in reference.items():
        got = read_tensor(file, name)
        assert got.dtype == weight.dtype == torch.bfloat16 and torch.equal(got, weight), name


def test_merge_from_4bit_base_equals_peft_and_reproduces_adapter_logits(prequant_run, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    run_dir, loaded = prequant_run
    out = merge_adapter(run_dir, tmp_path / "merged")
    ours = load_file(out / "model.safetensors")
    # peft's merge_and_unload on the 16-bit model holding exactly the weights training computed with
    reference = _peft_merged(str(tiny_model_dir()), run_dir / "adapter", _dequantized_from_4bit_model(loaded))
    assert set(ours) == set(reference) and len(ours) == 21
    assert all(torch.equal(ours[k], v) for k, v in reference.items())
    assert "quantization_config" not in json.loads((out / "config.json").read_text())

    ids = loaded.tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        adapter_logits = loaded.model(ids).logits.float()
        merged_logits = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)(ids).logits.float()
        base_logits = AutoModelForCausalLM.from_pretrained(tiny_model_dir(), dtype=torch.bfloat16)(ids).logits.float()
    # as in test_merged_model_reproduces_adapter_logits: bf16 rounding only, far below the LoRA's effect
    diff = (merged_logits - adapter_logits).abs().max()
    assert diff < 0.02 * adapter_logits.abs().max()
    assert (base_logits - adapter_logits).abs().max() > 5 * diff


def test_gguf_from_4bit_base_one_pass_equals_two_step(prequant_run, tmp_path: Path) -> None:
    run_dir, _ = prequant_run
    merged = merge_adapter(run_dir, tmp_path / "merged")
    two_step = export_gguf(merged, tmp_path / "two-step.gguf", "q8_0", name="run")
    one_pass = export_merged_gguf(run_dir, tmp_path / "one-pass.gguf", "q8_0")
    assert one_pass.read_bytes() == two_step.read_bytes()


def test_gguf_of_the_4bit_checkpoint_itself_holds_its_dequantised_weights(bnb_4bit_dir: Path, tmp_path: Path) -> None:
    import gguf
    import numpy as np

    from mistral_fast.export.gguf import permute_qk

    path = export_gguf(bnb_4bit_dir, tmp_path / "base.gguf", "bf16")
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    assert len(tensors) == 21
    (file,) = checkpoint_files(bnb_4bit_dir)
    expected = permute_qk(read_tensor(file, "model.layers.1.self_attn.q_proj.weight"), 4).view(torch.int16).numpy()
    assert np.array_equal(
        np.asarray(tensors["blk.1.attn_q.weight"].data).view(np.int16).reshape(-1), expected.reshape(-1)
    )


def test_original_base_of_a_4bit_checkpoint_needs_the_16bit_one_named(prequant_run, tmp_path: Path) -> None:
    run_dir, _ = prequant_run
    with pytest.raises(ModelError, match=r"pre-quantised.*original_checkpoint="):
        merge_adapter(run_dir, tmp_path / "x", base="original")
    with pytest.raises(ModelError, match="original_checkpoint="):
        export_merged_gguf(run_dir, tmp_path / "x.gguf", "f16", base="original")
    assert not list(tmp_path.iterdir())
    out = merge_adapter(run_dir, tmp_path / "original", base="original", original_checkpoint=tiny_model_dir())
    reference = _peft_merged(str(tiny_model_dir()), run_dir / "adapter", None)
    ours = load_file(out / "model.safetensors")
    assert all(torch.equal(ours[k], v) for k, v in reference.items())


def test_other_prequantised_formats_are_refused_with_the_reason(tmp_path: Path) -> None:
    model = tmp_path / "gptq-model"
    shutil.copytree(tiny_model_dir(), model)
    config = json.loads((model / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=r"pre-quantised \(gptq\).*16-bit original"):
        export_gguf(model, tmp_path / "x.gguf", "f16")
