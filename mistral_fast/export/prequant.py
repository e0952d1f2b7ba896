"""Pre-quantised bitsandbytes 4-bit checkpoints (``*-bnb-4bit``) read as 16-bit weights, tensor by tensor.

A checkpoint saved from a ``load_in_4bit`` model (``save_pretrained``; e.g. ``unsloth/mistral-7b-v0.3-bnb-4bit``)
stores each quantised Linear as packed 4-bit codes (``W``: uint8, ``(n/2, 1)``) plus its quantisation state
beside it: ``W.absmax``, ``W.quant_map``, with double quantisation ``W.nested_absmax`` and
``W.nested_quant_map``, and ``W.quant_state.bitsandbytes__nf4`` (JSON: shape, dtype, blocksizes, offset).

Training on such a base computes with ``dequantize_4bit`` of those stored codes: they *are* the
``dequantized`` merge base the adapter was trained against. `read_dequantized` gives them with
bitsandbytes' own ``dequantize_4bit`` (the function a ``Linear4bit`` calls; bit-identical by construction),
one tensor at a time, so merge and GGUF export stream such a checkpoint as they stream a 16-bit one. Its
16-bit original is not in it: ``merge_base: original`` needs that checkpoint named (``original_checkpoint``).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mistral_fast.errors import ModelError
from mistral_fast.export.checkpoint import checkpoint_files

if TYPE_CHECKING:
    import torch

_STATE = ".quant_state.bitsandbytes__"  # + nf4 / fp4: the JSON part of a 4-bit weight's state
_AUX = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", _STATE + "nf4", _STATE + "fp4")


def quantization(model_dir: Path) -> dict[str, Any] | None:
    """The checkpoint's ``quantization_config`` when it is a bitsandbytes 4-bit one, else None (16-bit).

    Raises:
        ModelError: another pre-quantised format (8-bit, GPTQ, AWQ, ...), which the export cannot read.
    """
    config = json.loads((model_dir / "config.json").read_text())
    quant = config.get("quantization_config")
    if not quant:
        return None
    if quant.get("quant_method") == "bitsandbytes" and quant.get("load_in_4bit", quant.get("_load_in_4bit")):
        return quant
    method = quant.get("quant_method")
    mode = "8-bit" if quant.get("load_in_8bit", quant.get("_load_in_8bit")) else method
    raise ModelError(
        f"{model_dir}: the base checkpoint is pre-quantised ({mode}); only bitsandbytes 4-bit checkpoints "
        "(*-bnb-4bit) can be merged from their stored weights. Name its 16-bit original instead "
        "(model.name_or_path, e.g. mistralai/Mistral-7B-v0.3)"
    )


def _names(model_dir: Path) -> dict[str, Path]:
    """Every tensor of the checkpoint and its file (the 4-bit state can sit in another shard)."""
    files = checkpoint_files(model_dir)
    return _names_of(tuple((str(f), f.stat().st_mtime_ns) for f in files))  # a rewritten file: read again


@functools.lru_cache(maxsize=8)
def _names_of(files: tuple[tuple[str, int], ...]) -> dict[str, Path]:
    from safetensors import safe_open

    names: dict[str, Path] = {}
    for file, _ in files:
        with safe_open(file, framework="pt") as f:
            names |= dict.fromkeys(f.keys(), Path(file))
    return names


def is_auxiliary(model_dir: Path, name: str) -> bool:
    """Whether ``name`` is part of a 4-bit weight's quantisation state (not a tensor of the model)."""
    names = _names(model_dir)
    return any(name.endswith(s) and name[: -len(s)] in names for s in _AUX)


def _state_name(model_dir: Path, name: str) -> str | None:
    names = _names(model_dir)
    return next((name + _STATE + kind for kind in ("nf4", "fp4") if name + _STATE + kind in names), None)


def _read(model_dir: Path, name: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(_names(model_dir)[name], framework="pt") as f:
        return f.get_tensor(name)


def stored_shape(model_dir: Path, name: str) -> tuple[int, ...] | None:
    """The shape a 4-bit weight has once dequantised (its stored tensor is packed); None if not 4-bit."""
    state = _state_name(model_dir, name)
    if state is None:
        return None
    return tuple(json.loads(bytes(_read(model_dir, state).numpy()).decode())["shape"])


def compute_dtype(model_dir: Path) -> str:
    """The dtype the 4-bit weights dequantise to (bitsandbytes' quant-state dtype, the training compute dtype)."""
    for name in _names(model_dir):
        if name.endswith(_STATE + "nf4") or name.endswith(_STATE + "fp4"):
            return json.loads(bytes(_read(model_dir, name).numpy()).decode())["dtype"]
    raise ModelError(f"{model_dir}: a bitsandbytes 4-bit config but no 4-bit weight in the checkpoint")


def read_dequantized(model_dir: Path, name: str, stored: torch.Tensor) -> torch.Tensor:
    """``stored`` as the model computes with it: bitsandbytes' ``dequantize_4bit`` of its codes and state.

    Tensors without a 4-bit state (embeddings, norms, ``lm_head``) come back unchanged.
    """
    import bitsandbytes.functional as bnbf

    state_name = _state_name(model_dir, name)
    if state_name is None:
        return stored
    prefix = name + "."
    parts = {k: _read(model_dir, k) for k in _names(model_dir) if k.startswith(prefix) and k[len(prefix) :] in _aux()}
    state = bnbf.QuantState.from_dict({k[len(prefix) :]: v for k, v in parts.items()}, device="cpu")
    return bnbf.dequantize_4bit(stored, state)


def _aux() -> set[str]:
    return {s.lstrip(".") for s in _AUX}
