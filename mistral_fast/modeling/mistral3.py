"""Mistral 3 wrappers (`Mistral3ForConditionalGeneration`): the language model trained, the vision kept as it is.

Ministral 3, Mistral Small 3.1/3.2 and Magistral Small 2509 ship as a Mistral language model
(``model.language_model``) inside a wrapper with a Pixtral vision tower and a projector. This tool fine-tunes
the language model on text: it is loaded in 4-bit NF4 and gets LoRA; the vision tower and projector stay in
16 bits, frozen, with no LoRA (so the merge writes their original bytes back and llama.cpp's ``mmproj`` file
of the fine-tune is the base model's). Everything a stage needs to treat the wrapper so is here; what is a
fact of the generation (module names) is in `mistral_fast.families`.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

from mistral_fast.errors import ModelError
from mistral_fast.families import Family

if TYPE_CHECKING:
    import torch

log = logging.getLogger("mistral_fast")


def auto_model_class(config: dict[str, Any]) -> Any:
    """The transformers Auto class that builds this config.json's model.

    Why: transformers maps ``mistral3`` to ``AutoModelForImageTextToText`` only (``AutoModelForCausalLM``
    refuses the config), while every text Mistral is a causal LM.
    """
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if config.get("model_type") == "mistral3" else AutoModelForCausalLM


def skip_modules(family: Family) -> list[str]:
    """bitsandbytes' ``llm_int8_skip_modules`` for a wrapper: lm_head and the frozen 16-bit parts.

    transformers 5.17 matches these as prefixes of the full module name (``re.match``), so they are the
    full names (``model.vision_tower``), not leaf names; and a list given replaces its default (lm_head), so
    lm_head is named too.
    """
    return ["lm_head", *family.frozen_16bit]


def lora_target_pattern(family: Family, names: list[str]) -> str:
    """peft ``target_modules`` as one regular expression: the named linears inside the language model only.

    Why: the Pixtral tower has ``q_proj``…``down_proj`` of the same leaf names as the decoder; a plain list
    would put LoRA on the vision tower too (which the merge would then have to change, and the ``mmproj``
    file would no longer be the base model's).
    """
    alternatives = "|".join(re.escape(n) for n in names)
    return rf"{re.escape(family.language_model)}\.layers\.\d+\.(?:self_attn|mlp)\.(?:{alternatives})"


def keep_frozen_16bit(model: Any, family: Family, dtype: torch.dtype) -> int:
    """Put the wrapper's vision tower and projector back to 16 bits and frozen, after peft's k-bit preparation.

    `peft.prepare_model_for_kbit_training` casts every 16-bit parameter to fp32 (right for the norms and
    embeddings the language model trains through, 4x the memory for a 0.44B-parameter vision tower that text
    fine-tuning never runs). Returns how many parameters were cast back.
    """
    count = 0
    for prefix in family.frozen_16bit:
        module = _submodule(model, prefix)
        for param in module.parameters():
            param.requires_grad_(False)
            if param.dtype != dtype and param.dtype.is_floating_point:
                param.data = param.data.to(dtype)
                count += 1
    return count


def _submodule(model: Any, dotted: str) -> Any:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return base.get_submodule(dotted)
    except AttributeError as err:
        raise ModelError(f"{type(base).__name__} has no module {dotted!r}: not a Mistral3 wrapper?") from err
