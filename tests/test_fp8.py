"""Fine-grained FP8 checkpoints (Ministral 3's format): dequantised as transformers dequantises them, bit for bit,
then trained in NF4 and merged onto those dequantised weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mistral_fast.modeling import resolve_model_path
from mistral_fast.modeling.fp8 import is_fp8_checkpoint

BLOCK = 64  # every tiny width (128, 448, 64) is a whole number of blocks
FP8_MAX = 448.0  # float8_e4m3fn's largest finite value


def _to_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise FP8 as FP8 checkpoints store it: e4m3 values and one fp32 ``weight_scale_inv`` per block."""
    rows, cols = weight.shape
    blocks = weight.float().reshape(rows // BLOCK, BLOCK, cols // BLOCK, BLOCK)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX
    values = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn).reshape(rows, cols)
    return values, scale


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Mistral saved as a fine-grained FP8 checkpoint (decoder linears FP8, the rest bf16)."""
    source = Path(resolve_model_path("tiny"))
    out = tmp_path_factory.mktemp("fp8") / "tiny-fp8"
    shutil.copytree(source, out)
    tensors = {}
    for name, tensor in load_file(source / "model.safetensors").items():
        if tensor.ndim == 2 and "embed_tokens" not in name and "lm_head" not in name:
            tensors[name], tensors[name.removesuffix(".weight") + ".weight_scale_inv"] = _to_fp8(tensor)
        else:
            tensors[name] = tensor
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "weight_block_size": [BLOCK, BLOCK],
        "modules_to_not_convert": ["lm_head"],
    }
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_dequantised_as_transformers_does_bit_for_bit(fp8_dir: Path) -> None:
    """transformers loads the FP8 checkpoint on CPU by dequantising it (its FineGrainedFP8 quantizer); the 16-bit
    copy every stage of ours reads holds exactly those weights."""
    from transformers import AutoModelForCausalLM

    stored = load_file(fp8_dir / "model.safetensors")
    assert sum(t.dtype == torch.float8_e4m3fn for t in stored.values()) == 14
    ours_dir = Path(resolve_model_path(str(fp8_dir)))
    assert ours_dir != fp8_dir and not is_fp8_checkpoint(json.loads((ours_dir / "config.json").read_text()))
    ours = load_file(ours_dir / "model.safetensors")
    reference = AutoModelForCausalLM.from_pretrained(fp8_dir, dtype=torch.bfloat16).state_dict()
    assert set(ours) == set(reference)
    for name, tensor in ours.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, reference[name]), name


def test_trained_in_nf4_and_merged_onto_the_dequantised_weights(fp8_dir: Path, tmp_path: Path) -> None:
    """The run loads the FP8 checkpoint in NF4 (through its 16-bit copy); the ``original`` merge equals peft's
    merge_and_unload on transformers' own dequantised model."""
    from peft import PeftModel
    from test_export_merge import make_adapter_run
    from transformers import AutoModelForCausalLM

    from mistral_fast.export import merge_adapter

    run_dir = tmp_path / "run"
    loaded = make_adapter_run(run_dir, extra=(f"model.name_or_path={fp8_dir}",))
    assert loaded.info["quantized_layers"] == 14
    ours = load_file(merge_adapter(run_dir, tmp_path / "merged", base="original") / "model.safetensors")
    base = AutoModelForCausalLM.from_pretrained(fp8_dir, dtype=torch.bfloat16)
    reference = PeftModel.from_pretrained(base, run_dir / "adapter").merge_and_unload().state_dict()
    assert set(ours) == set(reference)
    for name, tensor in reference.items():
        assert torch.equal(ours[name], tensor), name
