"""The vision projector GGUF (``mmproj``) of a Mistral3 checkpoint, as llama.cpp's converter writes it.

llama.cpp and Ollama run a vision-language model as two files: the text model and an ``mmproj`` GGUF holding
the vision tower and the projector (``convert_hf_to_gguf.py --mmproj``: conversion/llava.py
``LlavaVisionModel`` over conversion/base.py ``MmprojModel``). A text fine-tune leaves both untouched (LoRA on
the language model only, `modeling.mistral3`), so exporting this file next to the fine-tuned text GGUF keeps
the model's vision (losing it is Unsloth #3218). Written in F16, llama.cpp's usual mmproj type: the tensors
and keys the converter writes for ``--outtype f16``, byte for byte (tests/test_mistral3.py).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from mistral_fast.atomic import atomic_path
from mistral_fast.errors import ModelError
from mistral_fast.export.checkpoint import checkpoint_files
from mistral_fast.export.kernels import RowMerge

log = logging.getLogger("mistral_fast")

_PREFIXES = ("vision_tower.", "multi_modal_projector.")
# Pixtral's layer_norm_eps: not in config.json, hard-coded in transformers' modeling_pixtral.py (the
# converter's default, conversion/llava.py).
_PIXTRAL_NORM_EPS = 1e-5


def export_mmproj(
    model_dir: str | os.PathLike[str], out_path: str | os.PathLike[str], *, name: str | None = None
) -> Path:
    """Write the F16 ``mmproj`` GGUF of a Mistral3ForConditionalGeneration checkpoint.

    Args:
        model_dir: a Mistral3 checkpoint (merged or base) with ``preprocessor_config.json``.
        out_path: the GGUF to write (atomically), e.g. ``mmproj-F16.gguf`` beside the text GGUF.
        name: ``general.name``; default: the directory name (as the converter).

    Returns:
        ``out_path``.

    Raises:
        ModelError: not a Mistral3 checkpoint, or no image-processor statistics to write.
    """
    import gguf
    import torch

    from mistral_fast.export.gguf import _encode, _nbytes, _np_dtype, _read_spec
    from mistral_fast.export.merge import read_ahead

    model_dir, out_path = Path(model_dir), Path(out_path)
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    vision = config.get("vision_config")
    if config.get("model_type") != "mistral3" or not isinstance(vision, dict):
        raise ModelError(f"{model_dir}: mmproj files are written for Mistral3ForConditionalGeneration checkpoints only")
    plan = _plan(model_dir, vision)
    writer = gguf.GGUFWriter(None, "clip")
    writer.add_type(gguf.GGUFType.MMPROJ)
    writer.add_name(name or model_dir.name)
    _add_clip_metadata(writer, model_dir, config, vision)
    for spec in plan:
        nbytes = _nbytes(spec.shape, spec.qtype)
        writer.add_tensor_info(spec.gguf_name, spec.shape, _np_dtype(spec.qtype), nbytes, spec.qtype)
    total, shared, expert, experts = writer.get_total_parameter_count()
    writer.add_size_label(gguf.size_label(total, shared, expert, experts))
    with atomic_path(out_path) as tmp:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for spec, weight in read_ahead(plan, _read_spec):
            with torch.no_grad():
                writer.write_tensor_data(_encode(RowMerge(weight), spec))
        writer.close()
    log.info("wrote %s (vision projector, F16, %d tensors)", out_path, len(plan))
    return out_path


def _plan(model_dir: Path, vision: dict[str, Any]) -> list[Any]:
    """The vision tensors, named and typed as the converter does: Q/K rows permuted (LlamaModel.permute), the
    patch embedding and patch merger F16, 1-D tensors F32, the other matrices F16."""
    import gguf
    from safetensors import safe_open

    from mistral_fast.export.gguf import _Tensor

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, int(vision["num_hidden_layers"]))
    heads = int(vision["num_attention_heads"])
    kind = gguf.GGMLQuantizationType
    plan = []
    for file in checkpoint_files(model_dir):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                if not name.startswith(_PREFIXES):
                    continue  # the text model (and "model.vision_tower." names, which the converter skips too)
                gguf_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
                if gguf_name is None:
                    raise ModelError(f"{model_dir}: vision tensor {name!r} has no llama.cpp mmproj name")
                shape = tuple(f.get_slice(name).get_shape())
                qtype = kind.F32 if len(shape) == 1 else kind.F16
                permute = heads if name.endswith(("q_proj.weight", "k_proj.weight")) else 0
                plan.append(_Tensor(file, name, gguf_name, shape, qtype, permute))
    if not plan:
        raise ModelError(f"{model_dir}: no vision_tower./multi_modal_projector. tensors to write")
    return plan


def _add_clip_metadata(writer: Any, model_dir: Path, config: dict[str, Any], vision: dict[str, Any]) -> None:
    """The keys ``MmprojModel.set_gguf_parameters`` and ``LlavaVisionModel.set_gguf_parameters`` write."""
    import gguf

    from mistral_fast.families import text_config

    processor = _processor_config(model_dir)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_clip_has_vision_encoder(True)
    writer.add_vision_projection_dim(int(text_config(config)["hidden_size"]))
    writer.add_vision_image_size(int(vision["image_size"]))
    writer.add_vision_patch_size(int(vision["patch_size"]))
    writer.add_vision_embedding_length(int(vision["hidden_size"]))
    writer.add_vision_feed_forward_length(int(vision["intermediate_size"]))
    writer.add_vision_block_count(int(vision["num_hidden_layers"]))
    writer.add_vision_head_count(int(vision["num_attention_heads"]))
    writer.add_vision_image_mean(processor["image_mean"])
    writer.add_vision_image_std(processor["image_std"])
    writer.add_clip_projector_type(gguf.VisionProjectorType.PIXTRAL)
    writer.add_vision_attention_layernorm_eps(vision.get("layer_norm_eps", _PIXTRAL_NORM_EPS))
    act = vision.get("hidden_act", "gelu")
    if act not in ("silu", "gelu"):
        raise ModelError(f"{model_dir}: vision hidden_act {act!r}: llama.cpp's Pixtral supports silu and gelu")
    if act == "silu":
        writer.add_vision_use_silu(True)
    else:
        writer.add_vision_use_gelu(True)
    if "spatial_merge_size" in config:
        writer.add_vision_spatial_merge_size(int(config["spatial_merge_size"]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _processor_config(model_dir: Path) -> dict[str, Any]:
    """``preprocessor_config.json`` merged with ``processor_config.json``'s image_processor, as the converter."""
    merged: dict[str, Any] = {}
    for file in ("preprocessor_config.json", "processor_config.json"):
        path = model_dir / file
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            merged |= {**data, **(data.get("image_processor") or {})}
    if "image_mean" not in merged or "image_std" not in merged:
        raise ModelError(
            f"{model_dir}: no image_mean/image_std in preprocessor_config.json (the vision model's normalisation, "
            "which the mmproj file records): copy that file from the base model's repository into this directory"
        )
    return merged
