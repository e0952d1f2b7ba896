"""Backends, 4-bit loading, LoRA, and the tiny local Mistral used by tests and the offline demo.

`load_model(cfg)` is the one entry point: it picks a backend (`unsloth` on CUDA when it imports,
else `hf`), validates the request *before* any weights are read (path, architecture, bitsandbytes,
LoRA targets), loads the base in 4-bit NF4 with double quantisation, attaches LoRA, and returns a
`LoadedModel` that the trainer uses without asking which backend built it.

torch, transformers, peft, bitsandbytes and unsloth are imported inside the functions that need
them: importing this module stays instant, and unsloth (which patches transformers and TRL in place
when imported) is only ever imported when it is the chosen backend.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mistral_fast.config import RunConfig
from mistral_fast.errors import ModelError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

log = logging.getLogger("mistral_fast")

# The tiny model behind `model.name_or_path: tiny`. Every size is a multiple of 64 (bitsandbytes'
# 4-bit blocksize) and head_dim is 32; vocab and special ids are the real Mistral v0.3 ones, so the
# real tokenizer, chat template and GGUF export all run unchanged. The 32768 x 128 embedding and
# lm_head dominate the cost; 128/2 layers trains a step of 4 x 256 tokens in well under a second on
# one CPU thread while still having GQA, several heads and a real MLP.
TINY_DEFAULTS: dict[str, Any] = {
    "hidden_size": 128,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "intermediate_size": 448,  # 3.5 x hidden, Mistral-7B's ratio (14336 / 4096)
    "vocab_size": 32768,
    "sliding_window": 4096,  # Mistral-7B v0.1's window: the sliding-window code path, a no-op below 4k tokens
    "rope_theta": 1e6,  # v0.2/v0.3's RoPE base
    "max_position_embeddings": 32768,
    "seed": 0,
    "dtype": "bfloat16",  # what Mistral checkpoints ship in
    "tokenizer": "v3",
}
# Bump when build_tiny_model changes what it writes: the cache key includes it.
_TINY_FORMAT = 2
_TINY_FINAL_NORM = 8.0
_BNB_BLOCKSIZE = 64
_BACKENDS = ("auto", "unsloth", "hf")
_INSTALL_UNSLOTH = "pip install 'mistral-fast[unsloth]'"


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


# ---------------------------------------------------------------------------------------------
# The tiny local model
# ---------------------------------------------------------------------------------------------


def build_tiny_model(
    path: str | os.PathLike[str],
    *,
    hidden_size: int = TINY_DEFAULTS["hidden_size"],
    num_layers: int = TINY_DEFAULTS["num_layers"],
    num_heads: int = TINY_DEFAULTS["num_heads"],
    num_kv_heads: int = TINY_DEFAULTS["num_kv_heads"],
    intermediate_size: int = TINY_DEFAULTS["intermediate_size"],
    vocab_size: int = TINY_DEFAULTS["vocab_size"],
    sliding_window: int | None = TINY_DEFAULTS["sliding_window"],
    rope_theta: float = TINY_DEFAULTS["rope_theta"],
    max_position_embeddings: int = TINY_DEFAULTS["max_position_embeddings"],
    seed: int = TINY_DEFAULTS["seed"],
    dtype: str = TINY_DEFAULTS["dtype"],
    tokenizer: str = TINY_DEFAULTS["tokenizer"],
) -> Path:
    """Write a small random `MistralForCausalLM` with the real tokenizer to `path`.

    The architecture is Mistral's own (GQA, sliding window, RoPE base, SiLU MLP, RMSNorm, untied
    embeddings, BOS 1 / EOS 2); only the sizes are small. Weights are drawn from a seeded generator
    in a fixed order, so the same arguments give byte-identical safetensors.

    Args:
        path: directory to write (created; existing files are overwritten).
        hidden_size: model width; a multiple of 64 so 4-bit blocks never straddle rows.
        num_layers: decoder layers.
        num_heads: attention heads; ``hidden_size / num_heads`` is the head dim.
        num_kv_heads: key/value heads (grouped-query attention); divides ``num_heads``.
        intermediate_size: MLP width; a multiple of 64.
        vocab_size: must cover the tokenizer (32768 for Mistral v3).
        sliding_window: attention window in tokens, or None for full attention.
        rope_theta: RoPE base frequency.
        max_position_embeddings: longest supported context.
        seed: weight seed.
        dtype: storage dtype of the weights (``"bfloat16"``, ``"float16"`` or ``"float32"``).
        tokenizer: tokenizer version passed to `mistral_fast.tokenizer.load_tokenizer`.

    Returns:
        The directory: ``config.json``, ``generation_config.json``, ``model.safetensors`` and the
        tokenizer files.

    Raises:
        ModelError: a size is not usable with 4-bit quantisation or does not fit the tokenizer.
    """
    import torch
    from transformers import GenerationConfig, MistralConfig, MistralForCausalLM

    from mistral_fast.tokenizer import load_tokenizer

    _check_tiny_sizes(hidden_size, intermediate_size, num_heads, num_kv_heads)
    tok = load_tokenizer(tokenizer)
    if len(tok) > vocab_size:
        raise ModelError(f"vocab_size={vocab_size} is smaller than the {tokenizer} tokenizer ({len(tok)} tokens)")
    config = MistralConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        hidden_act="silu",
        max_position_embeddings=max_position_embeddings,
        rope_theta=rope_theta,
        sliding_window=sliding_window,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        initializer_range=0.02,
    )
    model = MistralForCausalLM(config)
    _init_tiny_weights(model, seed=seed, std=config.initializer_range)
    model = model.to(getattr(torch, dtype))
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)  # safetensors (transformers 5 writes nothing else)
    tok.save_pretrained(out)
    return out


def _check_tiny_sizes(hidden_size: int, intermediate_size: int, num_heads: int, num_kv_heads: int) -> None:
    for name, value in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size)):
        if value <= 0 or value % _BNB_BLOCKSIZE:
            raise ModelError(f"{name}={value}: use a positive multiple of 64 (bitsandbytes' 4-bit blocksize)")
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ModelError(
            f"num_heads={num_heads}, num_kv_heads={num_kv_heads}: num_heads must divide hidden_size={hidden_size} "
            "and num_kv_heads must divide num_heads"
        )


def _init_tiny_weights(model: PreTrainedModel, *, seed: int, std: float) -> None:
    """Seeded N(0, std) matrices and unit norms, drawn in sorted-name order.

    Our own draw rather than transformers' `_init_weights`: its order and defaults change between
    releases, and the cache key promises the same weights for the same arguments.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name == "model.norm.weight":
                # A unit final norm with N(0, 0.02) lm_head rows caps logits near ±2.5: every next-token
                # distribution is almost uniform, no fine-tune can make it confident (LoRA does not touch the
                # norm or the head), and greedy comparisons hinge on near-ties. Trained Mistral models have a
                # final norm of several units; this scale gives the random model peaked distributions too.
                param.fill_(_TINY_FINAL_NORM)
            elif name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def tiny_model_dir(**overrides: Any) -> Path:
    """The cached tiny model for ``model.name_or_path: tiny``, built on first use.

    The cache lives in ``$MISTRAL_FAST_CACHE`` (default ``~/.cache/mistral_fast``) under a name that
    hashes the build arguments, the build format and the tokenizer source, so a change to any of them
    builds a fresh copy instead of reusing a stale one. The build goes to a temporary directory that
    is renamed into place: concurrent processes (pytest workers, notebooks) never see a half-written
    model, and the loser of a race simply uses the winner's copy.

    Args:
        **overrides: any `build_tiny_model` keyword, e.g. ``hidden_size=256``.

    Returns:
        The model directory.
    """
    params = {**TINY_DEFAULTS, **overrides}
    unknown = sorted(set(overrides) - set(TINY_DEFAULTS))
    if unknown:
        raise ModelError(f"tiny_model_dir: unknown argument(s) {unknown}; known: {sorted(TINY_DEFAULTS)}")
    root = Path(os.environ.get("MISTRAL_FAST_CACHE") or Path.home() / ".cache" / "mistral_fast")
    final = root / f"tiny-mistral-{params['tokenizer']}-{_tiny_cache_key(params)}"
    if (final / "config.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        build_tiny_model(tmp, **params)
        with contextlib.suppress(OSError):  # another process won the race: its copy is identical
            tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not (final / "config.json").is_file():
        raise ModelError(f"could not build the tiny model into {final}: check that the directory is writable")
    log.info("built the tiny Mistral model in %s", final)
    return final


def _tiny_cache_key(params: dict[str, Any]) -> str:
    import transformers

    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    digest.update(f"format={_TINY_FORMAT};transformers={transformers.__version__}".encode())
    tokenizer_src = Path(__file__).with_name("tokenizer.py")
    if tokenizer_src.is_file():  # a tokenizer fix must not leave a stale copy in the cache
        digest.update(tokenizer_src.read_bytes())
    return digest.hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# Backend and dtype choice
# ---------------------------------------------------------------------------------------------


def resolve_backend(requested: str) -> tuple[str, str]:
    """Choose the backend: ``"unsloth"`` or ``"hf"``, and say why.

    ``auto`` picks unsloth only with a CUDA GPU *and* an unsloth that imports. CUDA and the package's
    presence are checked first, so unsloth is imported (which patches transformers and TRL in place)
    only when it will be used. An explicit ``unsloth`` is honoured without CUDA too: Unsloth then
    runs its CPU fallback, which is how CI tests this backend.

    Args:
        requested: ``model.backend``: ``"auto"``, ``"unsloth"`` or ``"hf"``.

    Returns:
        ``(backend, reason)``; the reason is also logged.

    Raises:
        ModelError: unknown backend, or unsloth requested but not installed or not importable.
    """
    import torch

    if requested not in _BACKENDS:
        raise ModelError(f"model.backend={requested!r} is unknown: use one of {list(_BACKENDS)}")
    if requested == "hf":
        backend, reason = "hf", "model.backend=hf requested"
    elif requested == "unsloth":
        _import_unsloth(required=True)
        where = "on CUDA" if torch.cuda.is_available() else "without CUDA: Unsloth's CPU fallback (slow; for tests)"
        backend, reason = "unsloth", f"model.backend=unsloth requested, running {where}"
    elif not torch.cuda.is_available():
        backend, reason = "hf", "auto: no CUDA GPU (torch.cuda.is_available() is False), so the hf backend"
    elif importlib.util.find_spec("unsloth") is None:
        backend = "hf"
        reason = f"auto: CUDA is available but unsloth is not installed ({_INSTALL_UNSLOTH} for ~2x faster training)"
    else:
        error = _import_unsloth(required=False)
        if error:
            backend, reason = "hf", f"auto: unsloth is installed but failed to import ({error}), so the hf backend"
        else:
            backend, reason = "unsloth", f"auto: CUDA GPU {torch.cuda.get_device_name(0)!r} and unsloth imports"
    log.info("backend: %s (%s)", backend, reason)
    return backend, reason


def _import_unsloth(*, required: bool) -> str:
    """Import unsloth; return "" on success or the error text (raising ModelError when required)."""
    if importlib.util.find_spec("unsloth") is None:
        if required:
            raise ModelError(f"model.backend=unsloth but unsloth is not installed: {_INSTALL_UNSLOTH}, or use hf")
        return "not installed"
    # Unsloth patches these in place at import; ones already imported keep their unpatched code.
    early = sorted({"transformers", "trl", "peft"} & set(sys.modules))
    if early and "unsloth" not in sys.modules:
        log.warning(
            "unsloth is being imported after %s, so some of its patches may not apply: call "
            "mistral_fast.modeling.resolve_backend() before anything imports them",
            ", ".join(early),
        )
    try:
        importlib.import_module("unsloth")
    except Exception as err:  # unsloth raises many kinds on unsupported set-ups; all mean "not usable"
        if required:
            raise ModelError(
                f"model.backend=unsloth but `import unsloth` failed: {type(err).__name__}: {err}; "
                f"reinstall with {_INSTALL_UNSLOTH}, or set model.backend=hf"
            ) from err
        return f"{type(err).__name__}: {err}"
    return ""


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX); else torch emulates it."""
    import torch

    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def resolve_compute_dtype(requested: str) -> tuple[torch.dtype, str]:
    """Choose the compute dtype of the 4-bit matmuls (and the 16-bit parts of the base), and say why.

    * CUDA: bf16 on Ampere or newer; fp16 on older GPUs (T4, V100), which have no bf16.
    * CPU: bf16 where the CPU has AVX512-BF16 or AMX, else fp32. Measured with bitsandbytes 0.50 on
      one thread (AVX512-BF16): a 4-bit 1024x3584 layer's forward+backward over 1024 tokens took
      0.036 s in bf16 vs 0.144 s in fp32 (4x); LoRA gradients of the tiny model agreed with fp32
      to cosine 0.99998 (relative error 0.65%). Without native bf16, torch emulates it and fp32 wins.

    Args:
        requested: ``model.compute_dtype``: ``"auto"``, ``"bfloat16"``, ``"float16"`` or ``"float32"``.

    Returns:
        ``(dtype, reason)``; the reason is also logged.

    Raises:
        ModelError: unknown dtype, or bf16 requested on a GPU without bf16.
    """
    import torch

    names = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    if requested != "auto" and requested not in names:
        raise ModelError(f"model.compute_dtype={requested!r} is unknown: use auto or one of {sorted(names)}")
    on_cuda = torch.cuda.is_available()
    # `torch.cuda.is_bf16_supported()` also says True where bf16 is only emulated (T4): ask for sm_80+.
    cuda_bf16 = on_cuda and torch.cuda.get_device_capability(0) >= (8, 0)
    if requested != "auto":
        if requested == "bfloat16" and on_cuda and not cuda_bf16:
            raise ModelError(
                f"model.compute_dtype=bfloat16 but GPU {torch.cuda.get_device_name(0)!r} has no bf16 "
                "(it predates Ampere): use float16 or auto"
            )
        dtype, reason = names[requested], f"model.compute_dtype={requested} requested"
    elif on_cuda and cuda_bf16:
        dtype, reason = torch.bfloat16, f"auto: GPU {torch.cuda.get_device_name(0)!r} supports bf16"
    elif on_cuda:
        gpu = torch.cuda.get_device_name(0)
        dtype, reason = torch.float16, f"auto: GPU {gpu!r} predates Ampere (e.g. T4, V100) and has no bf16: float16"
    elif cpu_has_native_bf16():
        dtype, reason = (
            torch.bfloat16,
            "auto: CPU has native bf16 (AVX512-BF16/AMX): 4-bit matmuls ~4x faster than fp32",
        )
    else:
        dtype, reason = torch.float32, "auto: CPU has no native bf16 (torch would emulate it), so float32"
    log.info("compute dtype: %s (%s)", str(dtype).removeprefix("torch."), reason)
    return dtype, reason


# ---------------------------------------------------------------------------------------------
# Validation before any weights load
# ---------------------------------------------------------------------------------------------


_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_model_path(name_or_path: str) -> str:
    """Turn ``model.name_or_path`` into what `from_pretrained` takes, checking it exists.

    Args:
        name_or_path: ``"tiny"``, a local directory, or a hub name such as ``mistralai/Mistral-7B-v0.3``.

    Returns:
        A local directory, or the hub name once its ``config.json`` is reachable (cached or online).

    Raises:
        ModelError: a local-looking path that does not exist or has no config.json, or a hub name
            that cannot be reached (not cached while ``HF_HUB_OFFLINE=1``, unknown repository, …).
    """
    if name_or_path == "tiny":
        return str(tiny_model_dir())
    local = Path(name_or_path).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ModelError(
                f"model.name_or_path={name_or_path!r}: {local.resolve()} has no config.json; "
                "give a directory written by save_pretrained (config.json + safetensors)"
            )
        pickled = sorted(p.name for p in local.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickled and not any(local.glob("*.safetensors")):
            # .bin/.pt/.pth are pickles: loading one can run arbitrary code. Only safetensors are read.
            raise ModelError(
                f"model.name_or_path={name_or_path!r}: {local.resolve()} has only pickled weights {pickled[:3]}, "
                "which are never loaded (they can run code); convert them to safetensors on a trusted machine "
                "(transformers: from_pretrained + save_pretrained) and point here again"
            )
        return str(local)
    if not _HUB_ID.match(name_or_path) or name_or_path.startswith((".", "~")) or name_or_path.count("/") > 1:
        raise ModelError(
            f"model.name_or_path={name_or_path!r}: no such directory ({local.resolve()}); "
            "check the path, or give a hub name such as mistralai/Mistral-7B-v0.3, or 'tiny'"
        )
    _fetch_hub_config(name_or_path)
    return name_or_path


def _fetch_hub_config(repo_id: str) -> Path:
    """config.json of a hub model: from the cache, or downloaded when the hub is reachable."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, "config.json"))
    except Exception as err:  # offline, unknown repo, gated repo, network: all end the same way
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        hint = (
            "HF_HUB_OFFLINE=1 and it is not in the local cache: download it on a connected machine "
            f"(`hf download {repo_id}`) or give a local directory"
            if offline
            else "check the name, your network and, for gated models, `hf auth login`; or give a local directory"
        )
        raise ModelError(
            f"model.name_or_path={repo_id!r}: not a local directory and the hub model could not be "
            f"reached ({type(err).__name__}): {hint}"
        ) from err


def read_model_config(path: str) -> dict[str, Any]:
    """The model's config.json as a dict, refusing architectures other than Mistral.

    Raises:
        ModelError: config.json is unreadable or its ``model_type`` is not ``mistral``.
    """
    file = Path(path) / "config.json" if Path(path).is_dir() else _fetch_hub_config(path)
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ModelError(f"model.name_or_path={path!r}: cannot read {file}: {err}") from err
    model_type = config.get("model_type")
    if model_type != "mistral":
        arch = ", ".join(config.get("architectures") or []) or "unknown"
        raise ModelError(
            f"model.name_or_path={path!r}: this tool fine-tunes Mistral models (model_type 'mistral'); "
            f"architecture found: model_type {model_type!r} ({arch}). Choose a Mistral checkpoint"
        )
    return config


def linear_module_names(path: str, *, trust_remote_code: bool = False) -> list[str]:
    """Leaf names of the decoder's linear layers (``q_proj``, …), read without loading weights.

    The model is instantiated on the meta device, so this costs no memory even for a 7B model.
    ``lm_head`` is left out: it is never quantised, and LoRA on it is not what this tool trains.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return sorted(names - {"lm_head"})


def check_lora_targets(targets: list[str], available: list[str]) -> None:
    """Refuse LoRA target modules the model does not have.

    Raises:
        ModelError: naming ``lora.targets`` and listing the model's linear module names.
    """
    missing = [t for t in targets if t not in available]
    if missing:
        raise ModelError(
            f"lora.targets: {missing} not in this model; its linear modules are {available} "
            "(or use the sets 'attention' / 'all-linear')"
        )


def check_bitsandbytes(load_in_4bit: bool) -> None:
    """Make sure bitsandbytes imports when a 4-bit base is asked for.

    Raises:
        ModelError: naming ``model.load_in_4bit`` and what to install or change.
    """
    if not load_in_4bit:
        return
    try:
        importlib.import_module("bitsandbytes")
    except Exception as err:  # ImportError, or a broken native library (OSError/RuntimeError)
        raise ModelError(
            f"model.load_in_4bit=true needs bitsandbytes, which failed to import ({type(err).__name__}: {err}): "
            "pip install 'bitsandbytes>=0.49', or set model.load_in_4bit=false for LoRA on a 16-bit base"
        ) from err


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


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
    start = time.perf_counter()
    backend, backend_reason = resolve_backend(cfg.model.backend)  # first: unsloth must precede transformers
    path = validate_model_request(cfg)
    dtype, dtype_reason = resolve_compute_dtype(cfg.model.compute_dtype)
    tokenizer = _load_our_tokenizer(cfg, path)
    if backend == "unsloth":
        model = _load_unsloth(cfg, path, dtype, tokenizer, for_training=for_training)
    else:
        model = _load_hf(cfg, path, dtype, for_training=for_training)
    _align_special_tokens(model, tokenizer)
    info = model_info(model)
    info["load_seconds"] = round(time.perf_counter() - start, 3)
    info["target_modules"] = cfg.lora.target_modules
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


def validate_model_request(cfg: RunConfig) -> str:
    """Check everything about the model request that needs no weights; return the path to load.

    Path or hub name, architecture, bitsandbytes for 4-bit, and the LoRA targets (from a meta-device
    instance). Cheap enough to call before data preparation, so a bad config fails in seconds.

    Raises:
        ModelError: naming the parameter at fault (``model.name_or_path``, ``model.load_in_4bit``, ``lora.targets``).
    """
    path = resolve_model_path(cfg.model.name_or_path)
    config = read_model_config(path)
    if cfg.model.max_seq_length > config.get("max_position_embeddings", cfg.model.max_seq_length):
        log.warning(
            "model.max_seq_length=%d exceeds the model's max_position_embeddings=%d: quality past it is untested",
            cfg.model.max_seq_length,
            config["max_position_embeddings"],
        )
    check_bitsandbytes(cfg.model.load_in_4bit)
    available = linear_module_names(path, trust_remote_code=cfg.model.trust_remote_code)
    check_lora_targets(cfg.lora.target_modules, available)
    return path


def _load_our_tokenizer(cfg: RunConfig, path: str) -> PreTrainedTokenizerFast:
    from mistral_fast.tokenizer import load_tokenizer

    if cfg.model.tokenizer == "model":
        return load_tokenizer(path=path)
    return load_tokenizer(cfg.model.tokenizer)


def _bnb_config(cfg: RunConfig, dtype: torch.dtype) -> Any:
    from transformers import BitsAndBytesConfig

    from mistral_fast.distributed import using_fsdp

    extra = {}
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
    from transformers import AutoModelForCausalLM

    from mistral_fast.distributed import using_fsdp

    # safetensors only: pickled .bin weights of an untrusted checkpoint could run code when loaded
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": cfg.model.trust_remote_code, "use_safetensors": True}
    if cfg.model.attn_implementation != "auto":
        kwargs["attn_implementation"] = cfg.model.attn_implementation
    if cfg.model.load_in_4bit:
        kwargs["quantization_config"] = _bnb_config(cfg, dtype)
    fsdp = using_fsdp()
    if torch.cuda.is_available() and not fsdp:
        # One whole copy per process (DDP); 4-bit weights are quantised straight onto that GPU. Under FSDP
        # the wrapper places the shards itself (cpu_ram_efficient_loading), so no device_map.
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
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
    return _attach_lora(model, cfg, for_training=for_training)


def _peft_lora_config(cfg: RunConfig) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora.rank,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        bias=cfg.lora.bias,
        use_rslora=cfg.lora.use_rslora,
        task_type="CAUSAL_LM",
    )


def _attach_lora(model: Any, cfg: RunConfig, *, for_training: bool) -> Any:
    import torch
    from peft import get_peft_model

    # lora_A's Kaiming init draws from the global RNG: seed it so runs repeat.
    torch.manual_seed(cfg.train.seed)
    peft_model = get_peft_model(model, _peft_lora_config(cfg))
    cast_trainable_to_fp32(peft_model)
    _set_mode(peft_model, for_training=for_training)
    return peft_model


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


# ---------------------------------------------------------------------------------------------
# Model surgery helpers (also used by the trainer)
# ---------------------------------------------------------------------------------------------


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
