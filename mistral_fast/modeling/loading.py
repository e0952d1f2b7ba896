"""Loading: the base in 4-bit NF4 (double quantisation) with LoRA attached, on either backend.

`load_model(cfg)` is the one entry point: it picks a backend (`unsloth` on CUDA when it imports, else
`hf`), validates the request *before* any weights are read, loads the base, attaches LoRA, and returns
a `LoadedModel` that the trainer uses without asking which backend built it.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mistral_fast.config import RunConfig
from mistral_fast.errors import ModelError
from mistral_fast.modeling.checks import lora_target_modules, validate_model_request
from mistral_fast.modeling.policy import resolve_backend, resolve_compute_dtype
from mistral_fast.modeling.surgery import cast_trainable_to_fp32, disable_cpu_weight_repacking, model_info

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerFast

    from mistral_fast.families import Family

log = logging.getLogger("mistral_fast")

@dataclass
class LoadedModel:
    """A base model with LoRA attached, its tokenizer, and how it was loaded.

    Attributes:
        model: a peft ``PeftModel`` with LoRA on the target modules (the trainer's input).
        tokenizer: the exact Mistral tokenizer (ours, also on the unsloth backend).
        backend: ``"unsloth"`` or ``"hf"``.
        compute_dtype: dtype of the 4-bit matmuls and of the 16-bit base weights.
        path: the model directory or hub name that was loaded.
        reasons: why each automatic choice was made (``backend``, ``compute_dtype``).
        info: figures for logs and the run manifest (parameter counts, layer counts, load time).
    """

    model: Any
    tokenizer: PreTrainedTokenizerFast
    backend: str
    compute_dtype: torch.dtype
    path: str
    reasons: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for logs and notebooks."""
        i = self.info
        return (
            f"{self.backend} backend, {i.get('quantized_layers', 0)} 4-bit layers, "
            f"compute {str(self.compute_dtype).removeprefix('torch.')}, LoRA on {i.get('lora_layers', 0)} layers: "
            f"{i.get('trainable_params', 0):,} trainable of {i.get('total_params', 0):,} params "
            f"({i.get('trainable_percent', 0):.3f}%), loaded in {i.get('load_seconds', 0):.1f}s"
        )


def load_model(cfg: RunConfig, *, for_training: bool = True) -> LoadedModel:
    """Load the base model (4-bit NF4 by default), attach LoRA, and return it with our tokenizer.

    Everything that can be checked without weights is checked first, so a typo fails in a second
    rather than after gigabytes have loaded: backend, path, architecture, bitsandbytes, LoRA targets.

    Args:
        cfg: the run config (``model``, ``lora`` and ``train.seed`` / ``train.gradient_checkpointing``).
        for_training: True: training mode, KV cache off, gradient checkpointing as configured, norms
            and other 16-bit parts in fp32 (peft's k-bit preparation). False: the same model with
            LoRA for evaluation or generation (eval mode, cache on, nothing cast).

    Returns:
        A `LoadedModel`.

    Raises:
        ModelError: any of the checks above fails.
    """
    from mistral_fast.tokenizer import tokenizer_for

    start = time.perf_counter()
    if _known_moe(cfg):
        # Decided before resolve_backend, so unsloth (which patches transformers on import) is never imported
        # for a model it will not train.
        if cfg.model.backend == "unsloth":
            raise ModelError(_UNSLOTH_MOE.format(name=cfg.model.name_or_path))
        backend, backend_reason = "hf", "Mixtral (mixture of experts): the hf backend, which stores experts in NF4"
    elif _known_wrapper(cfg):
        if cfg.model.backend == "unsloth":
            raise ModelError(_UNSLOTH_MISTRAL3.format(name=cfg.model.name_or_path))
        backend, backend_reason = "hf", "Mistral3ForConditionalGeneration: the hf backend (Unsloth's loader refuses it)"
    else:
        backend, backend_reason = resolve_backend(cfg.model.backend)  # first: unsloth must precede transformers
    path = validate_model_request(cfg)
    dtype, dtype_reason = resolve_compute_dtype(cfg.model.compute_dtype)
    tokenizer = tokenizer_for(cfg.model, path)
    moe = _is_moe_checkpoint(path)
    if backend == "unsloth" and moe:  # a Mixtral not recognisable before its config.json was fetched
        raise ModelError(_UNSLOTH_MOE.format(name=cfg.model.name_or_path))
    if backend == "unsloth":
        model = _load_unsloth(cfg, path, dtype, tokenizer, for_training=for_training)
    else:
        model = _load_hf(cfg, path, dtype, for_training=for_training)
    _check_vocabulary(model, tokenizer, cfg)
    _align_special_tokens(model, tokenizer)
    info = model_info(model)
    info["load_seconds"] = round(time.perf_counter() - start, 3)
    info["target_modules"] = lora_target_modules(cfg, path)
    if moe:
        from mistral_fast.modeling.moe import expert_weight_bytes

        info["expert_weight_bytes"] = expert_weight_bytes(model)
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        backend=backend,
        compute_dtype=dtype,
        path=path,
        reasons={"backend": backend_reason, "compute_dtype": dtype_reason},
        info=info,
    )
    log.info("model: %s", loaded.summary())
    return loaded


def _wrapper_family(cfg: RunConfig, path: str | None) -> Family | None:
    """The row of a Mistral3 wrapper being loaded (None: a plain text model, or one no row knows)."""
    from mistral_fast.families import family_for_model
    from mistral_fast.modeling.checks import read_model_config

    try:
        family = family_for_model(cfg.model.name_or_path, read_model_config(path) if path else None)
    except ModelError:
        return None
    return family if family.is_wrapper else None


def _bnb_config(cfg: RunConfig, dtype: torch.dtype, wrapper: Family | None = None) -> Any:
    from transformers import BitsAndBytesConfig

    from mistral_fast.distributed import using_fsdp

    extra: dict[str, Any] = {}
    if wrapper is not None:  # the vision tower and projector stay 16-bit (modeling/mistral3.py)
        from mistral_fast.modeling.mistral3 import skip_modules

        extra["llm_int8_skip_modules"] = skip_modules(wrapper)
    if using_fsdp():
        # FSDP flattens each wrapped module's parameters into one tensor of one float dtype: the packed
        # 4-bit weights must be stored as that dtype (not uint8) for FSDP to shard them (FSDP + QLoRA).
        extra["bnb_4bit_quant_storage"] = dtype
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.model.quant_type,
        bnb_4bit_use_double_quant=cfg.model.double_quant,
        bnb_4bit_compute_dtype=dtype,
        **extra,
    )


def _load_hf(cfg: RunConfig, path: str, dtype: torch.dtype, *, for_training: bool) -> Any:
    """transformers + bitsandbytes + peft: the reference backend."""
    import torch
    from peft import prepare_model_for_kbit_training

    from mistral_fast.distributed import using_fsdp
    from mistral_fast.modeling.checks import read_model_config
    from mistral_fast.modeling.mistral3 import auto_model_class, keep_frozen_16bit

    wrapper = _wrapper_family(cfg, path)
    # safetensors only: pickled .bin weights of an untrusted checkpoint could run code when loaded
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": cfg.model.trust_remote_code, "use_safetensors": True}
    if cfg.model.attn_implementation != "auto":
        kwargs["attn_implementation"] = cfg.model.attn_implementation
    if cfg.model.load_in_4bit:
        kwargs["quantization_config"] = _bnb_config(cfg, dtype, wrapper)
    fsdp = using_fsdp()
    if torch.cuda.is_available() and not fsdp:
        # One whole copy per process (DDP); 4-bit weights are quantised straight onto that GPU. Under FSDP
        # the wrapper places the shards itself (cpu_ram_efficient_loading), so no device_map.
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    if cfg.model.load_in_4bit and _streams_experts(path):
        model = _load_moe_streamed(path, cfg, kwargs)
    else:
        model = auto_model_class(read_model_config(path)).from_pretrained(path, **kwargs)
        if cfg.model.load_in_4bit:
            _quantize_moe_experts(model, cfg, dtype)  # a Mixtral with fused experts in its checkpoint
    disable_cpu_weight_repacking(model)
    gc = for_training and cfg.train.gradient_checkpointing
    if for_training and cfg.model.load_in_4bit and not fsdp:
        # Freezes the base and casts every non-4-bit parameter (norms, embeddings, lm_head) to fp32,
        # which keeps the residual stream and the logits in fp32 (QLoRA's recipe). Non-reentrant
        # checkpointing needs no input-grad hook and is what torch recommends.
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gc, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    elif gc:
        # Also the FSDP path: its flat parameters need one dtype, so nothing is cast to fp32 there.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if wrapper is not None:
        keep_frozen_16bit(model, wrapper, dtype)
    return _attach_lora(model, cfg, path, for_training=for_training)


_UNSLOTH_MOE = (
    "model.backend=unsloth: {name} is a mixture-of-experts (Mixtral) model; its experts are stored in NF4 and "
    "trained with per-expert LoRA by this tool's hf backend only (Unsloth 2026.10 loads Mixtral's fused experts "
    "16-bit and puts LoRA on those 16-bit parameters); set model.backend=hf or auto"
)


# Measured with unsloth 2026.10 on tiny-mistral3 (CPU): FastLanguageModel.from_pretrained builds the model through
# AutoModelForCausalLM, which transformers 5.17 does not map mistral3 to.
_UNSLOTH_MISTRAL3 = (
    "model.backend=unsloth: {name} is a Mistral3ForConditionalGeneration (Mistral 3 with a vision tower); Unsloth "
    "2026.10's FastLanguageModel.from_pretrained refuses it (ValueError: Unrecognized configuration class "
    "Mistral3Config for this kind of AutoModel: AutoModelForCausalLM). Set model.backend=hf (or auto), which "
    "trains its language model in NF4 with LoRA and keeps the vision tower 16-bit"
)


def _known_wrapper(cfg: RunConfig) -> bool:
    """True when the model is a Mistral3 wrapper by its name or local config.json (no download, no torch)."""
    from mistral_fast.families import family_for_model

    try:
        return family_for_model(cfg.model.name_or_path).is_wrapper
    except ModelError:
        return False


def _known_moe(cfg: RunConfig) -> bool:
    """True when the model is a Mixtral by its name or local config.json (no download, no torch)."""
    from mistral_fast.families import family_for_model

    try:
        return family_for_model(cfg.model.name_or_path).is_moe
    except ModelError:
        return False  # unknown here: decided again once the path is resolved


def _is_moe_checkpoint(path: str) -> bool:
    from mistral_fast.modeling.checks import read_model_config

    return bool(read_model_config(path).get("num_local_experts"))


def _checkpoint_keys(path: str) -> list[str] | None:
    """Tensor names of a local safetensors checkpoint (index or single-file header); None when not local."""
    import json
    from pathlib import Path

    from safetensors import safe_open

    directory = Path(path)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return list(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}))
    single = directory / "model.safetensors"
    if single.is_file():
        with safe_open(str(single), "pt") as handle:  # reads the header only
            return list(handle.keys())
    return None


def _streams_experts(path: str) -> bool:
    """A Mixtral whose checkpoint has one tensor per expert matrix: loaded by `_load_moe_streamed`.

    A hub name (no local files to read) counts as one: every Mixtral on the hub has that layout, and
    `_load_moe_streamed` refuses a checkpoint whose experts it did not find.
    """
    if not _is_moe_checkpoint(path):
        return False
    from mistral_fast.modeling.moe import has_per_expert_checkpoint

    keys = _checkpoint_keys(path)
    return keys is None or has_per_expert_checkpoint(keys)


def _load_moe_streamed(path: str, cfg: RunConfig, kwargs: dict[str, Any]) -> Any:
    """Mixtral in 4-bit with each expert matrix quantised as it is read (modeling/moe.py's streamed class).

    transformers' `from_pretrained` with its bitsandbytes quantizer, on a Mixtral class whose experts are
    per-expert linears from construction: no layer's fused 16-bit experts ever exist, so the load device
    (and the host) hold the 4-bit model plus one 16-bit matrix at a time instead of every layer's 16-bit
    experts (~87 GiB for 8x7B). Same settings and result as from_pretrained + `quantize_experts`.
    """
    from mistral_fast.modeling.moe import load_nf4_experts

    model, info = load_nf4_experts(path, **kwargs)
    missing = sorted(k for k in info.get("missing_keys", ()) if ".experts." in k)
    if missing:
        raise ModelError(
            f"model.name_or_path={cfg.model.name_or_path!r}: the checkpoint has no tensor for {len(missing)} expert "
            f"weights (first: {missing[0]}); expected Mixtral's per-expert names "
            "(model.layers.N.block_sparse_moe.experts.E.w1/w2/w3.weight). Download it and set model.name_or_path "
            "to the local directory: a local checkpoint with fused experts is recognised and loaded whole, then "
            "quantised (all layers' 16-bit experts on the load device while loading)"
        )
    count = sum(1 for name, _ in model.named_modules() if ".experts." in name and name.endswith(_EXPERT_SUFFIXES))
    log.info(
        "Mixtral: %d expert matrices quantised to %s one at a time while loading", count, cfg.model.quant_type.upper()
    )
    return model


_EXPERT_SUFFIXES = (".gate_proj", ".up_proj", ".down_proj")


def _quantize_moe_experts(model: Any, cfg: RunConfig, dtype: torch.dtype) -> None:
    """A Mixtral loaded with fused experts: store them as per-expert NF4 linears (modeling/moe.py); dense: nothing.

    Reached for a checkpoint that stores the experts fused, so the model has held every layer's 16-bit experts.
    """
    from mistral_fast.distributed import using_fsdp
    from mistral_fast.modeling.moe import is_moe_model, quantize_experts

    if not is_moe_model(model):
        return
    quant: dict[str, Any] = {"quant_type": cfg.model.quant_type, "double_quant": cfg.model.double_quant}
    if using_fsdp():
        quant["quant_storage"] = dtype  # as _bnb_config: FSDP shards one float dtype
    count = quantize_experts(model, compute_dtype=dtype, quant=quant)
    log.info("Mixtral: %d expert matrices stored in %s", count, cfg.model.quant_type.upper())


def _peft_lora_config(cfg: RunConfig, path: str | None = None) -> Any:
    from peft import LoraConfig

    extra: dict[str, Any] = {}
    if cfg.lora.train_router and path is not None and _is_moe_checkpoint(path):
        # The router is small (experts x hidden per layer) and not a LoRA target: trained whole, and saved
        # with the adapter, as peft does for modules_to_save.
        extra["modules_to_save"] = ["gate"]
    targets: list[str] | str = lora_target_modules(cfg, path)
    wrapper = _wrapper_family(cfg, path)
    if wrapper is not None:  # inside the language model only: the vision tower has the same leaf names
        from mistral_fast.modeling.mistral3 import lora_target_pattern

        targets = lora_target_pattern(wrapper, targets)
    return LoraConfig(
        r=cfg.lora.rank,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=targets,
        bias=cfg.lora.bias,
        use_rslora=cfg.lora.use_rslora,
        task_type="CAUSAL_LM",
        **extra,
    )


def _attach_lora(model: Any, cfg: RunConfig, path: str | None = None, *, for_training: bool) -> Any:
    import torch
    from peft import get_peft_model

    # lora_A's Kaiming init draws from the global RNG: seed it so runs repeat.
    torch.manual_seed(cfg.train.seed)
    peft_model = get_peft_model(model, _peft_lora_config(cfg, path))
    cast_trainable_to_fp32(peft_model)
    _set_mode(peft_model, for_training=for_training)
    _set_router_aux_loss(peft_model, cfg, for_training=for_training)
    return peft_model


def _set_router_aux_loss(model: Any, cfg: RunConfig, *, for_training: bool) -> None:
    """Mixtral: the router's load-balancing loss on in training (``train.router_aux_loss``), off otherwise.

    transformers' Mixtral adds ``router_aux_loss_coef x aux_loss`` to the loss only when
    ``output_router_logits`` is set, which checkpoints ship false: without this the load-balancing term is
    silently absent from fine-tuning. The coefficient is read from the model attribute, set at init from
    config.json, so both are set.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not hasattr(base, "router_aux_loss_coef"):
        return  # a dense model
    on = for_training and cfg.train.router_aux_loss
    base.config.output_router_logits = on
    if cfg.train.router_aux_loss_coef is not None:
        base.config.router_aux_loss_coef = cfg.train.router_aux_loss_coef
        base.router_aux_loss_coef = cfg.train.router_aux_loss_coef


def _set_mode(model: Any, *, for_training: bool) -> None:
    # The KV cache only helps generation; in training it is wasted memory (and checkpointing refuses it).
    model.config.use_cache = not for_training
    model.train(for_training)


def _load_unsloth(
    cfg: RunConfig, path: str, dtype: torch.dtype, tokenizer: PreTrainedTokenizerFast, *, for_training: bool
) -> Any:
    """Unsloth's FastLanguageModel: fused kernels on CUDA, its own CPU fallback elsewhere."""
    from unsloth import FastLanguageModel

    if cfg.model.load_in_4bit and (cfg.model.quant_type != "nf4" or not cfg.model.double_quant):
        raise ModelError(
            "model.quant_type / model.double_quant: the unsloth backend always uses NF4 with double "
            "quantisation; keep the defaults or set model.backend=hf"
        )
    model, _ = FastLanguageModel.from_pretrained(  # its tokenizer is discarded: we use the exact one
        model_name=path,
        max_seq_length=cfg.model.max_seq_length,
        dtype=dtype,
        load_in_4bit=cfg.model.load_in_4bit,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    disable_cpu_weight_repacking(model)  # Unsloth's CPU path does this too; on CUDA it finds nothing
    gc = for_training and cfg.train.gradient_checkpointing
    model = FastLanguageModel.get_peft_model(
        model,
        r=cfg.lora.rank,
        target_modules=cfg.lora.target_modules,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        bias=cfg.lora.bias,
        use_gradient_checkpointing="unsloth" if gc else False,
        random_state=cfg.train.seed,
        use_rslora=cfg.lora.use_rslora,
        max_seq_length=cfg.model.max_seq_length,
    )
    _share_tokenizer_with_unsloth(model, tokenizer, for_training=for_training)
    cast_trainable_to_fp32(model)
    if not for_training:
        FastLanguageModel.for_inference(model)  # Unsloth's fast generation path on CUDA; cache on, left padding
    _set_mode(model, for_training=for_training)
    return model


def _share_tokenizer_with_unsloth(model: Any, tokenizer: PreTrainedTokenizerFast, *, for_training: bool) -> None:
    """Point Unsloth at our tokenizer instead of the one it loaded.

    Unsloth's for_training()/for_inference() flip the padding side of the tokenizer it keeps in
    ``_saved_temp_tokenizer``; pointing that at ours makes them act on the tokenizer the trainer
    really uses. Right padding for training, left for generation, as Unsloth does.
    """
    tokenizer.padding_side = "right" if for_training else "left"
    base = getattr(model, "base_model", None)
    for inner in (model, base, getattr(base, "model", None)):
        if inner is not None and hasattr(inner, "_saved_temp_tokenizer"):
            inner._saved_temp_tokenizer = tokenizer


# Checkpoints may pad their embedding to a round number of rows; a tokenizer of another generation is off by
# ~100k rows (tekken 131,072 vs SentencePiece 32,768), which nothing would notice until the outputs are garbage.
_VOCAB_PADDING = 1024


def _check_vocabulary(model: Any, tokenizer: PreTrainedTokenizerFast, cfg: RunConfig) -> None:
    """Refuse a tokenizer that does not belong to the model (``model.tokenizer: v3`` on a tekken model)."""
    rows = model.get_input_embeddings().weight.shape[0]
    if not len(tokenizer) <= rows <= len(tokenizer) + _VOCAB_PADDING:
        raise ModelError(
            f"model.tokenizer={cfg.model.tokenizer!r} has {len(tokenizer)} ids but {cfg.model.name_or_path!r} has "
            f"{rows} embedding rows: the tokenizer is of another Mistral generation. Set model.tokenizer to the "
            "model's (v3/v1: Mistral-7B, v3-tekken: Nemo, v7-tekken: Small 3) or to 'model'"
        )


def _align_special_tokens(model: Any, tokenizer: PreTrainedTokenizerFast) -> None:
    """Make the model's pad/bos/eos ids those of our tokenizer.

    Unsloth (and some checkpoints) set pad = eos when their tokenizer has no pad token; with that,
    padding masks would also hide the real </s> the model must learn to emit.
    """
    for config in (model.config, getattr(model, "generation_config", None)):
        if config is None:
            continue
        config.pad_token_id = tokenizer.pad_token_id
        config.bos_token_id = tokenizer.bos_token_id
        config.eos_token_id = tokenizer.eos_token_id
