"""Models: backends, 4-bit loading, LoRA, checks, surgery, and the tiny local Mistral.

One concern per module (as peft's ``tuners/lora``):

* `policy`: which backend and compute dtype, and why;
* `checks`: everything about a model request that needs no weights (path, architecture, targets);
* `loading`: `load_model` → `LoadedModel` (4-bit NF4 base + LoRA, ``unsloth`` or ``hf``);
* `surgery`: helpers the loaders and the trainer share (CPU repacking off, fp32 adapters, counts);
* `tiny`: the tiny random Mistral of tests and the offline demo.

torch, transformers, peft, bitsandbytes and unsloth are imported inside the functions that need them:
importing this package stays instant, and unsloth (which patches transformers and TRL in place when
imported) is only ever imported when it is the chosen backend.
"""

from mistral_fast.modeling.checks import (
    check_bitsandbytes,
    check_lora_targets,
    linear_module_names,
    read_model_config,
    resolve_model_path,
    validate_model_request,
)
from mistral_fast.modeling.loading import LoadedModel, load_model
from mistral_fast.modeling.policy import cpu_has_native_bf16, resolve_backend, resolve_compute_dtype
from mistral_fast.modeling.surgery import cast_trainable_to_fp32, disable_cpu_weight_repacking, model_info
from mistral_fast.modeling.tiny import TINY_DEFAULTS, TINY_VARIANTS, build_tiny_model, tiny_model_dir

__all__ = [
    "TINY_DEFAULTS",
    "TINY_VARIANTS",
    "LoadedModel",
    "build_tiny_model",
    "cast_trainable_to_fp32",
    "check_bitsandbytes",
    "check_lora_targets",
    "cpu_has_native_bf16",
    "disable_cpu_weight_repacking",
    "linear_module_names",
    "load_model",
    "model_info",
    "read_model_config",
    "resolve_backend",
    "resolve_compute_dtype",
    "resolve_model_path",
    "tiny_model_dir",
    "validate_model_request",
]
