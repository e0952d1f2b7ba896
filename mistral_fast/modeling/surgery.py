"""Model surgery the loaders and the trainer share: bitsandbytes' CPU repacking off, fp32 adapters, counts."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("mistral_fast")

def disable_cpu_weight_repacking(model: Any) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel; undo any repack.

    bitsandbytes 0.50 sets ``Linear4bit.support_avx512bf16_for_cpu`` (an attribute of each layer
    module, from ``has_avx512bf16()`` in ``Linear4bit.__init__``). With it, the first forward that
    is on CPU, in eval mode and without grad (``generate``, evaluation) rewrites ``weight.data`` and
    its ``quant_state`` in place into a layout for ``gemv_4bit`` and never changes it back; later
    training forwards then run ``gemv_4bit``, which has no autograd: no gradient reaches earlier
    layers, and dequantise/merge read the new layout as garbage. A layer already repacked is
    converted back (bitsandbytes' own inverse, which re-quantises the absmax for double quant).

    Args:
        model: any model; non-bitsandbytes layers are ignored.

    Returns:
        How many 4-bit layers were switched off (0 on CUDA-only or 16-bit models, too).
    """
    count = 0
    for module in model.modules():
        if not hasattr(module, "support_avx512bf16_for_cpu"):
            continue
        module.support_avx512bf16_for_cpu = False
        count += 1
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
            log.warning("a bitsandbytes 4-bit layer had been repacked for CPU inference; converted it back")
    return count


def cast_trainable_to_fp32(model: Any) -> int:
    """Cast every trainable parameter (the LoRA matrices) to fp32, in place.

    TRL casts LoRA weights to bf16 when the base is 4-bit; in bf16, small updates round away (on
    CPU at lr 2e-4 only about half the lora_A entries moved in 20 steps, all of them in fp32). The
    trainer calls this again after building the TRL trainer.

    Returns:
        How many tensors were cast (0 when all were fp32 already).
    """
    import torch

    cast = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
            cast += 1
    return cast


def model_info(model: Any) -> dict[str, Any]:
    """Parameter and layer counts of a (peft) model; 4-bit weights count their real element number."""
    trainable = total = quantized = lora = 0
    for module in model.modules():
        # peft's LoRA wrapper is also called Linear4bit: count bitsandbytes' own layers only
        if type(module).__name__ == "Linear4bit" and type(module).__module__.startswith("bitsandbytes"):
            quantized += 1
        if hasattr(module, "lora_A") and len(getattr(module, "lora_A", {})):
            lora += 1
    for param in model.parameters():
        state = getattr(param, "quant_state", None)
        n = state.shape.numel() if state is not None else param.numel()  # uint8 storage packs 2 per byte
        total += n
        trainable += n if param.requires_grad else 0
    return {
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": 100.0 * trainable / max(total, 1),
        "quantized_layers": quantized,
        "lora_layers": lora,
    }
