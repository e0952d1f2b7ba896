"""A run's LoRA adapter as a llama.cpp LoRA GGUF, and the base GGUF it applies to.

llama.cpp (``--lora``, llama-cpp-python ``lora_path``, Ollama's ``ADAPTER``) adds ``scale·B·A`` to a
base GGUF's weights at load time, with ``scale = alpha / rank``. `export_adapter_gguf` writes what
llama.cpp's ``convert_lora_to_gguf.py`` writes for the same adapter, tensor for tensor (tested byte for
byte): ``general.type=adapter``, ``adapter.type=lora``, ``adapter.lora.alpha``, and per target weight
``<gguf name>.lora_a`` (A, rank × in) and ``.lora_b`` (B, out × rank; Q/K rows permuted like the base's
Q/K weights). It refuses, with the reason, adapters that llama.cpp cannot apply as they were trained.

`export_base_gguf` writes the base the adapter belongs on: for ``base="dequantized"`` the NF4 round trip
of the 16-bit weights (or a ``*-bnb-4bit`` checkpoint's stored weights), the weights training computed with.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mistral_fast.atomic import atomic_path
from mistral_fast.errors import ModelError
from mistral_fast.export import gguf as g
from mistral_fast.export import kernels
from mistral_fast.export import merge as m

if TYPE_CHECKING:
    import numpy as np
    import torch

log = logging.getLogger("mistral_fast")

ADAPTER_GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")  # what llama.cpp's convert_lora_to_gguf.py writes


def check_llama_cpp_can_apply(adapter_dir: Path) -> dict[str, Any]:
    """The adapter's config, if llama.cpp can apply the adapter exactly as it was trained.

    Raises:
        ModelError: what llama.cpp cannot apply, why, and what to export instead.
    """
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    merge_instead = "export the merged model instead (export.merged / export.gguf), which holds the exact result"
    if cfg.get("peft_type", "LORA") != "LORA":
        kind = cfg.get("peft_type")
        raise ModelError(f"{adapter_dir}: a {kind} adapter; llama.cpp applies LoRA adapters only; {merge_instead}")
    if cfg.get("use_dora"):
        raise ModelError(
            f"{adapter_dir}: a DoRA adapter (use_dora): llama.cpp adds scale·B·A and has no place for DoRA's "
            f"per-column magnitude rescaling, so the result would differ from the trained model; {merge_instead}"
        )
    trained = cfg.get("modules_to_save") or cfg.get("trainable_token_indices")
    if trained:
        raise ModelError(
            f"{adapter_dir}: the adapter trains {trained} in full (e.g. the embeddings or lm_head): a llama.cpp "
            f"LoRA GGUF holds only LoRA A/B pairs, so those trained weights would be lost; {merge_instead}"
        )
    unsupported = [k for k in ("fan_in_fan_out", "rank_pattern", "alpha_pattern", "lora_bias") if cfg.get(k)]
    if unsupported:
        raise ModelError(
            f"{adapter_dir}: the adapter sets {unsupported}: a llama.cpp LoRA GGUF has one alpha and plain "
            f"A/B pairs; {merge_instead}"
        )
    return cfg


def _check_tensors(adapter_dir: Path, names: list[str]) -> None:
    embedded = [n for n in names if "embed_tokens" in n or "lm_head" in n or "lora_embedding" in n]
    if embedded:
        raise ModelError(
            f"{adapter_dir}: LoRA on the token embeddings or lm_head ({embedded[0]}): llama.cpp's LoRA "
            "support is for the linear layers of the blocks (its converter rejects trained embeddings); train "
            "with lora.targets on attention/MLP only, or export the merged model instead"
        )


def _encode(tensor: torch.Tensor, qtype: Any) -> np.ndarray:
    """The bytes llama.cpp's converter writes: 16/32-bit casts, q8_0 by gguf-py's arithmetic."""
    import gguf
    import torch

    kind = gguf.GGMLQuantizationType
    if qtype == kind.Q8_0:
        return kernels.q8_0_rows(tensor.reshape(-1, tensor.shape[-1])).reshape(*tensor.shape[:-1], -1).numpy()
    if qtype == kind.BF16:
        return tensor.to(torch.bfloat16).view(torch.int16).numpy()
    return tensor.to(torch.float16 if qtype == kind.F16 else torch.float32).numpy()


def _lora_type(shape: tuple[int, ...], qtype: str) -> Any:
    """As the converter: q8_0 where a row holds whole blocks, else F16 (e.g. lora_b rows of rank 8)."""
    import gguf

    wanted = gguf.GGMLQuantizationType[qtype.upper()]
    if wanted == gguf.GGMLQuantizationType.Q8_0 and shape[-1] % kernels.Q8_BLOCK:
        return gguf.GGMLQuantizationType.F16
    return wanted


def export_adapter_gguf(
    run_or_adapter_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    qtype: str = "f16",
    *,
    name: str | None = None,
) -> Path:
    """Write a run's PEFT LoRA adapter as a llama.cpp LoRA GGUF (``llama-cli -m base.gguf --lora this``).

    Args:
        run_or_adapter_dir: a run directory (``adapter/``, ``run_config.yaml``) or an adapter directory.
        out_path: the ``.gguf`` to write (atomically).
        qtype: ``f32``, ``f16``, ``bf16`` or ``q8_0`` (rows that are not whole q8_0 blocks stay F16).
        name: ``general.name``; default: the run directory's name.

    Returns:
        ``out_path``.

    Raises:
        ModelError: an adapter llama.cpp cannot apply as trained (DoRA, trained embeddings or lm_head,
            per-module ranks or alphas), or a bad ``qtype``.
    """
    import gguf

    if qtype not in ADAPTER_GGUF_TYPES:
        raise ModelError(f"adapter GGUF type {qtype!r}: use one of {list(ADAPTER_GGUF_TYPES)}")
    source = m.resolve_source(run_or_adapter_dir)
    cfg = check_llama_cpp_can_apply(source.adapter_dir)
    from safetensors import safe_open

    with safe_open(source.adapter_dir / "adapter_model.safetensors", framework="pt") as f:
        _check_tensors(source.adapter_dir, list(f.keys()))
    lora, _ = m.load_lora(source.adapter_dir)
    config = g._read_config(source.base_path)
    if config.get("gguf_arch") == "mistral3":
        raise ModelError(
            f"{source.adapter_dir}: a LoRA adapter GGUF of a Mistral3ForConditionalGeneration (Mistral 3 with a vision "
            "tower) is not written yet; set export.gguf (the merged text GGUF plus its mmproj-F16.gguf) instead of "
            "export.gguf_adapter"
        )
    n_head = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads", n_head)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    # llama.cpp scales by alpha / rank (the rank read from each lora_a): rsLoRA's alpha/sqrt(r) is that
    # with alpha·sqrt(r) written as alpha.
    alpha = float(cfg["lora_alpha"]) * (math.sqrt(cfg["r"]) if cfg.get("use_rslora") else 1.0)

    writer = gguf.GGUFWriter(None, "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    tensors = []
    for hf_name, (a, b) in lora.items():
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight",))
        if gguf_name is None:
            raise ModelError(f"{source.adapter_dir}: LoRA on {hf_name!r}, which llama.cpp has no tensor for")
        heads = n_head if hf_name.endswith("q_proj.weight") else n_kv if hf_name.endswith("k_proj.weight") else 0
        tensors.append((gguf_name, a, g.permute_qk(b, heads) if heads else b))
    for gguf_name, a, b in sorted(tensors, key=lambda t: _order(t[0])):
        for suffix, tensor in ((".lora_a", a), (".lora_b", b)):
            kind = _lora_type(tuple(tensor.shape), qtype)
            writer.add_tensor(gguf_name + suffix, _encode(tensor, kind), raw_dtype=kind)
    total = writer.get_total_parameter_count()[0]  # negative for an adapter: no size label, as the converter
    meta = gguf.Metadata.load(None, source.adapter_dir, name or source.adapter_dir.parent.name, total)
    meta.set_gguf_meta_model(writer)
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    log.info("wrote LoRA adapter GGUF %s (%s, %d weights, alpha %g)", out_path, qtype, len(tensors), alpha)
    return out_path


def _order(gguf_name: str) -> tuple[int, int, str]:
    parts = gguf_name.split(".")
    return (1, int(parts[1]), gguf_name) if parts[0] == "blk" else (2, 0, gguf_name)


def export_base_gguf(
    run_or_adapter_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    qtype: str = "f16",
    *,
    base: str = "dequantized",
    name: str | None = None,
    original_checkpoint: str | os.PathLike[str] | None = None,
) -> Path:
    """The base GGUF a run's adapter GGUF applies to: the merge base without the LoRA.

    ``base="dequantized"``: the weights training computed with (the NF4 round trip of the 16-bit base,
    or a ``*-bnb-4bit`` checkpoint's stored weights), rounded to the checkpoint's 16-bit dtype; so base
    GGUF + adapter GGUF in llama.cpp gives the model that `export_merged_gguf` writes merged.
    ``base="original"``: the 16-bit weights (as `export_gguf` of the base checkpoint).

    Returns:
        ``out_path``.
    """
    # export_merged_gguf's one pass with no LoRA: the same base tensors, rounding and tokenizer
    return g._run_gguf(
        run_or_adapter_dir,
        out_path,
        qtype,
        base=base,
        dtype=None,
        name=name,
        original_checkpoint=original_checkpoint,
        with_lora=False,
    )
