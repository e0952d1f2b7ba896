"""The LoRA adapter as a llama.cpp LoRA GGUF: the converter's bytes, and llama.cpp applies it as the merge does."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import require_module, write_minimal_gguf
from test_export_llama_cpp import gguf_fields, gguf_tensors, run_converter

from mistral_fast.errors import ModelError
from mistral_fast.export import export_merged_gguf, write_modelfile
from mistral_fast.export.lora_gguf import export_adapter_gguf, export_base_gguf
from mistral_fast.modeling import tiny_model_dir
from mistral_fast.tokenizer import load_tokenizer

llama_cpp = require_module("llama_cpp", "pip install 'mistral-fast[gguf]'")

TEXT = "Convert 3 miles to kilometres, please. The answer is"


@pytest.fixture(scope="module")
def run_dir(shared_adapter_run) -> Path:
    return shared_adapter_run[0]  # built once per session (conftest)


@pytest.mark.slow
@pytest.mark.parametrize("qtype", ["f16", "q8_0", "f32", "bf16"])
def test_adapter_gguf_equals_llama_cpp_convert_lora_to_gguf(
    llama_cpp_source: Path, run_dir: Path, tmp_path: Path, qtype: str
) -> None:
    theirs = tmp_path / "converter.gguf"
    adapter = run_dir / "adapter"
    args = [str(adapter), "--base", str(tiny_model_dir()), "--outfile", str(theirs), "--outtype", qtype]
    run_converter(llama_cpp_source, "convert_lora_to_gguf.py", args)
    # general.name: the converter derives "Adapter" from the directory name and has no flag to set it
    ours = export_adapter_gguf(run_dir, tmp_path / "ours.gguf", qtype, name="Adapter")

    reference, got = gguf_tensors(theirs), gguf_tensors(ours)
    assert len(reference) == 2 * 14 and sorted(got) == sorted(reference)  # 7 targets x 2 layers, A and B each
    for name, (kind, shape, data) in reference.items():
        assert got[name][:2] == (kind, shape), name
        assert got[name][2] == data, f"{name}: tensor bytes differ from convert_lora_to_gguf.py's"
    if qtype == "q8_0":  # rows of rank 8 are not whole q8_0 blocks: F16, as the converter falls back
        assert got["blk.0.attn_q.weight.lora_a"][0] == "Q8_0" and got["blk.0.attn_q.weight.lora_b"][0] == "F16"
    assert gguf_fields(ours) == gguf_fields(theirs)  # every key, value and type
    fields = gguf_fields(ours)
    assert fields["general.type"][0] == "adapter" and fields["adapter.type"][0] == "lora"
    assert fields["adapter.lora.alpha"][0] == json.loads((adapter / "adapter_config.json").read_text())["lora_alpha"]


def _logits(model: Path, ids: list[int], lora: Path | None = None) -> np.ndarray:
    llm = llama_cpp.Llama(
        model_path=str(model), lora_path=str(lora) if lora else None, n_ctx=64, logits_all=True, verbose=False
    )
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


@pytest.mark.slow
def test_llama_cpp_base_plus_adapter_gives_the_merged_gguf_logits(run_dir: Path, tmp_path: Path) -> None:
    ids = load_tokenizer("v3")(TEXT).input_ids
    base = export_base_gguf(run_dir, tmp_path / "base-f16.gguf", "f16")
    adapter = export_adapter_gguf(run_dir, tmp_path / "adapter-f32.gguf", "f32")
    merged = export_merged_gguf(run_dir, tmp_path / "merged-f16.gguf", "f16", dtype="float16")
    reference = _logits(merged, ids)
    got = _logits(base, ids, adapter)
    scale = np.abs(reference).max()
    diff = np.abs(got - reference).max()
    print(f"base+adapter vs merged: max |diff| {diff:.5f} of logit range {scale:.3f}")
    assert diff < 0.003 * scale  # fp16 rounding of the merged weights and llama.cpp's kernels
    assert np.abs(_logits(base, ids) - reference).max() > 10 * diff  # the adapter does something
    f16_adapter = export_adapter_gguf(run_dir, tmp_path / "adapter-f16.gguf", "f16")
    assert np.abs(_logits(base, ids, f16_adapter) - reference).max() < 0.003 * scale


def test_modelfile_with_adapter(run_dir: Path, tmp_path: Path) -> None:
    base = write_minimal_gguf(tmp_path / "base-f16.gguf")
    adapter = write_minimal_gguf(tmp_path / "adapter-f16.gguf")
    text = write_modelfile(base, tmp_path / "adapter.Modelfile", adapter=adapter).read_text()
    assert text.splitlines()[:2] == ["FROM ./base-f16.gguf", "ADAPTER ./adapter-f16.gguf"]
    assert "TEMPLATE" in text


def _edited_run(run_dir: Path, tmp_path: Path, config: dict | None = None, extra_tensor: str | None = None) -> Path:
    import torch
    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    cfg_path = run / "adapter" / "adapter_config.json"
    cfg_path.write_text(json.dumps(json.loads(cfg_path.read_text()) | (config or {})))
    if extra_tensor:
        weights = load_file(run / "adapter" / "adapter_model.safetensors")
        weights[extra_tensor] = torch.zeros(8, 128)
        save_file(weights, run / "adapter" / "adapter_model.safetensors")
    return run


@pytest.mark.parametrize(
    ("config", "extra_tensor", "reason"),
    [
        ({"use_dora": True}, None, r"DoRA.*magnitude"),
        ({"modules_to_save": ["lm_head"]}, None, r"trains \['lm_head'\] in full"),
        (None, "base_model.model.lm_head.lora_A.weight", r"embeddings or lm_head"),
        (None, "base_model.model.model.embed_tokens.lora_embedding_A", r"embeddings or lm_head"),
        ({"alpha_pattern": {"q_proj": 32}}, None, r"one alpha"),
    ],
    ids=["dora", "modules-to-save", "lora-on-lm-head", "lora-on-embeddings", "alpha-pattern"],
)
def test_adapters_llama_cpp_cannot_apply_are_refused_with_the_reason(
    run_dir: Path, tmp_path: Path, config: dict | None, extra_tensor: str | None, reason: str
) -> None:
    run = _edited_run(run_dir, tmp_path, config, extra_tensor)
    with pytest.raises(ModelError, match=reason):
        export_adapter_gguf(run, tmp_path / "a.gguf", "f16")
    assert not (tmp_path / "a.gguf").exists()


def test_rslora_alpha_is_written_so_llama_cpp_scales_by_alpha_over_sqrt_r(run_dir: Path, tmp_path: Path) -> None:
    import math

    run = _edited_run(run_dir, tmp_path, {"use_rslora": True})
    fields = gguf_fields(export_adapter_gguf(run, tmp_path / "a.gguf", "f16"))
    cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    # llama.cpp: scale = alpha / r; rsLoRA trained with alpha / sqrt(r)
    assert fields["adapter.lora.alpha"][0] / cfg["r"] == pytest.approx(cfg["lora_alpha"] / math.sqrt(cfg["r"]))


def test_cli_export_adapter_gguf_writes_adapter_base_and_modelfile(run_dir: Path, tmp_path: Path) -> None:
    from mistral_fast.cli import main

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    assert main(["export", str(run), "--adapter-gguf", "q8_0", "--no-report"]) == 0
    out = run / "export"
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter-q8_0.Modelfile",
        "adapter-q8_0.gguf",
        "base-f16.gguf",
        "export.json",
    ]
    modelfile = (out / "adapter-q8_0.Modelfile").read_text().splitlines()
    assert modelfile[:2] == ["FROM ./base-f16.gguf", "ADAPTER ./adapter-q8_0.gguf"]
    assert gguf_fields(out / "adapter-q8_0.gguf")["general.type"][0] == "adapter"
    assert set(json.loads((out / "export.json").read_text())["files"]) >= {"adapter-q8_0.gguf", "base-f16.gguf"}


def test_config_gguf_adapter_is_validated() -> None:
    from mistral_fast.config import RunConfig
    from mistral_fast.errors import ConfigError

    assert RunConfig.from_dict({"export": {"gguf_adapter": "f16"}}).export.gguf_adapter == "f16"
    with pytest.raises(ConfigError, match=r"export\.gguf_adapter"):
        RunConfig.from_dict({"export": {"gguf_adapter": "q4_k_m"}})
