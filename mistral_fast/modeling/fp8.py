"""Fine-grained FP8 checkpoints (Ministral 3's official Instruct weights), dequantised to 16 bits as they are read.

Such a checkpoint stores each linear weight as ``float8_e4m3fn`` with a ``weight_scale_inv`` grid (one fp32
scale per block of rows x columns) and says so in ``config.json`` (``quantization_config.quant_method: fp8``).
bitsandbytes' NF4 and our merge need the 16-bit weights, and transformers cannot apply its FP8 quantizer and
bitsandbytes in one load. So the checkpoint is rewritten once, tensor by tensor (one tensor in memory), into a
16-bit copy in the cache with the FP8 config removed; every stage (4-bit loading, the merge, the GGUF export,
the memory estimate) then reads that copy, so the export merges onto exactly the weights training quantised.

The arithmetic is transformers' own (`Fp8Dequantize._dequantize_one` in integrations/finegrained_fp8.py):
the FP8 values and the scales in fp32, multiplied block by block, rounded once to the 16-bit dtype; tested bit
for bit against transformers loading the same checkpoint (tests/test_fp8.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mistral_fast.errors import ModelError

if TYPE_CHECKING:
    import torch

log = logging.getLogger("mistral_fast")

_SCALE = ".weight_scale_inv"
_DROPPED = (_SCALE, ".activation_scale", ".input_scale")  # FP8 state with no 16-bit counterpart
_FORMAT = 1


def is_fp8_checkpoint(config: dict[str, Any]) -> bool:
    """Whether a config.json declares a fine-grained FP8 checkpoint (``quantization_config.quant_method: fp8``)."""
    quant = config.get("quantization_config") or {}
    return quant.get("quant_method") == "fp8"


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One FP8 weight in 16 bits: ``weight x scale_inv`` per block, in fp32, rounded once to `dtype`.

    The scale grid's shape gives the block size (rows / grid rows, columns / grid columns), as transformers
    derives it; a single scale (per-tensor FP8) is a 1 x 1 grid.

    Raises:
        ModelError: the weight's shape is not a whole number of blocks of the grid.
    """
    import torch

    values = weight.to(torch.float32)
    rows, cols = values.shape[-2:]
    grid = scale_inv.reshape(1, 1) if scale_inv.numel() == 1 and scale_inv.dim() < 2 else scale_inv
    grid_rows, grid_cols = grid.shape[-2:]
    if rows % grid_rows or cols % grid_cols:
        raise ModelError(f"FP8 weight of shape {(rows, cols)} is not divisible into the scale grid {tuple(grid.shape)}")
    blocks = values.reshape(-1, grid_rows, rows // grid_rows, grid_cols, cols // grid_cols)
    scales = grid.to(torch.float32).reshape(-1, grid_rows, grid_cols).unsqueeze(-1).unsqueeze(2)
    return (blocks * scales).to(dtype).reshape(values.shape)


def dequantized_checkpoint(path: Path, dtype: str = "bfloat16") -> Path:
    """The 16-bit copy of an FP8 checkpoint directory, written on first use into ``$MISTRAL_FAST_CACHE``.

    Named by a hash of the source files' names, sizes and modification times (a changed checkpoint gets a
    fresh copy). Non-weight files (tokenizer, processor, generation config) are copied; config.json loses its
    ``quantization_config`` and states `dtype`.
    """
    from mistral_fast.modeling.tiny import _cached_build

    files = sorted(p for p in path.iterdir() if p.is_file())
    digest = hashlib.sha256(f"fp8={_FORMAT};{dtype}".encode())
    for file in files:
        stat = file.stat()
        digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    name = f"fp8-dequantized-{path.name}-{digest.hexdigest()[:12]}"
    return _cached_build(name, lambda tmp: _write_dequantized(path, tmp, dtype), f"16-bit copy of FP8 {path}")


def _write_dequantized(source: Path, out: Path, dtype: str) -> None:
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    target = getattr(torch, dtype)
    weight_map: dict[str, str] = {}
    files = sorted(source.glob("*.safetensors"))  # every shard (the index, if any, is rewritten below)
    if not files:
        raise ModelError(f"{source}: an FP8 checkpoint with no .safetensors files")
    for file in files:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(file, framework="pt") as f:
            names = set(f.keys())
            for name in sorted(names):
                if name.endswith(_DROPPED):
                    continue
                tensor = f.get_tensor(name)
                scale = name.removesuffix(".weight") + _SCALE
                if tensor.dtype == torch.float8_e4m3fn:
                    if scale not in names:
                        raise ModelError(f"{file}: FP8 tensor {name!r} has no {scale!r} in the same file")
                    tensor = dequantize_fp8(tensor, f.get_tensor(scale), target)
                elif tensor.dtype.is_floating_point:
                    tensor = tensor.to(target)
                tensors[name] = tensor
                weight_map[name] = file.name
        save_file(tensors, out / file.name, metadata={"format": "pt"})
    for other in source.iterdir():
        if other.is_file() and other.suffix != ".safetensors" and other.name not in ("config.json",):
            shutil.copyfile(other, out / other.name)
    if (source / "model.safetensors.index.json").is_file():
        index = {"metadata": {}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    config.pop("quantization_config", None)
    config["dtype"] = dtype
    for sub in ("text_config", "vision_config"):
        if isinstance(config.get(sub), dict):
            config[sub].pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    log.info("FP8 checkpoint %s dequantised to %s in %s", source, dtype, out)


def resolve_fp8(path: str) -> str:
    """`path` itself, or for an FP8 checkpoint (a local directory, or a hub model once downloaded) its 16-bit copy."""
    local = Path(path)
    if local.is_dir():
        config = json.loads((local / "config.json").read_text(encoding="utf-8"))
        return str(dequantized_checkpoint(local)) if is_fp8_checkpoint(config) else path
    from huggingface_hub import hf_hub_download, snapshot_download

    config = json.loads(Path(hf_hub_download(path, "config.json")).read_text(encoding="utf-8"))
    if not is_fp8_checkpoint(config):
        return path
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        log.info("FP8 hub checkpoint %s: using the cached snapshot (HF_HUB_OFFLINE)", path)
    snapshot = Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "tekken.json"]))
    return str(dequantized_checkpoint(snapshot))
