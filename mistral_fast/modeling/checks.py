"""Checks of a model request that need no weights: path, architecture, bitsandbytes, LoRA targets.

Cheap enough to run before data preparation, so a typo fails in a second rather than after gigabytes
of weights have loaded.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mistral_fast.errors import ModelError
from mistral_fast.modeling.fp8 import resolve_fp8
from mistral_fast.modeling.tiny import TINY_VARIANTS, tiny_mistral3_dir, tiny_mixtral_dir, tiny_model_dir

if TYPE_CHECKING:
    from mistral_fast.config import RunConfig

log = logging.getLogger("mistral_fast")

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
    if name_or_path == "tiny-mixtral":
        return str(tiny_mixtral_dir())
    if name_or_path == "tiny-mistral3":
        return str(tiny_mistral3_dir())
    if name_or_path in TINY_VARIANTS:
        return str(tiny_model_dir(**TINY_VARIANTS[name_or_path]))
    local = Path(name_or_path).expanduser()
    if local.exists():
        if not (local / "config.json").is_file() and (local / "params.json").is_file():
            raise ModelError(
                f"model.name_or_path={name_or_path!r}: {local.resolve()} is in Mistral's own format (params.json + "
                "consolidated safetensors), which llama.cpp converts only with convert_hf_to_gguf.py "
                "--mistral-format and which this tool does not read: use the model's transformers-format "
                "repository (config.json + model-*.safetensors), or convert it with transformers' "
                "convert_mistral_weights_to_hf script first"
            )
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
        return resolve_fp8(str(local))  # an FP8 checkpoint (Ministral 3 Instruct): its 16-bit copy
    if not _HUB_ID.match(name_or_path) or name_or_path.startswith((".", "~")) or name_or_path.count("/") > 1:
        raise ModelError(
            f"model.name_or_path={name_or_path!r}: no such directory ({local.resolve()}); "
            "check the path, or give a hub name such as mistralai/Mistral-7B-v0.3, or 'tiny'"
        )
    _fetch_hub_config(name_or_path)
    return resolve_fp8(name_or_path)


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
    """The model's config.json as a dict, refusing architectures other than Mistral's (dense and Mixtral).

    Raises:
        ModelError: config.json is unreadable or its ``model_type`` is not ``mistral`` / ``mixtral``.
    """
    from mistral_fast.families import model_types

    file = Path(path) / "config.json" if Path(path).is_dir() else _fetch_hub_config(path)
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ModelError(f"model.name_or_path={path!r}: cannot read {file}: {err}") from err
    model_type = config.get("model_type")
    if model_type not in model_types():
        arch = ", ".join(config.get("architectures") or []) or "unknown"
        raise ModelError(
            f"model.name_or_path={path!r}: this tool fine-tunes Mistral models (model_type {list(model_types())}); "
            f"architecture found: model_type {model_type!r} ({arch}). Choose a Mistral checkpoint"
        )
    return config


def linear_module_names(path: str, *, trust_remote_code: bool = False) -> list[str]:
    """Leaf names of the decoder's linear layers (``q_proj``, …), read without loading weights.

    The model is instantiated on the meta device, so this costs no memory even for a 7B model.
    ``lm_head`` is left out: it is never quantised, and LoRA on it is not what this tool trains.
    """
    import torch
    from transformers import AutoConfig

    from mistral_fast.modeling.mistral3 import auto_model_class

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = auto_model_class(config.to_dict()).from_config(config, trust_remote_code=trust_remote_code)
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    if getattr(config, "num_local_experts", 0):
        # Mixtral's experts are fused 3-D parameters here; on a 4-bit load each becomes per-expert
        # w1/w2/w3 linears (modeling/moe.py), which is what LoRA targets.
        from mistral_fast.modeling.moe import EXPERT_LINEARS

        names |= set(EXPERT_LINEARS)
    return sorted(names - {"lm_head"})


def lora_target_modules(cfg: RunConfig, path: str | None = None) -> list[str]:
    """``lora.targets`` as module names for this run's model (a set name is resolved by the model's row).

    Args:
        cfg: the run config.
        path: the resolved model directory, when at hand (its config.json identifies the row).
    """
    from mistral_fast.families import family_for_model, resolve_targets

    if not isinstance(cfg.lora.targets, str):
        return list(cfg.lora.targets)
    config = None
    if path is not None and (Path(path) / "config.json").is_file():
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    try:
        family = family_for_model(cfg.model.name_or_path, config)
    except ModelError:
        return cfg.lora.target_modules  # an unlisted Mistral-shaped model: the dense names
    if cfg.lora.targets not in family.lora_targets:
        raise ModelError(f"lora.targets={cfg.lora.targets!r}: {family.name} has the sets {sorted(family.lora_targets)}")
    return resolve_targets(cfg.lora.targets, family)


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
    check_lora_targets(lora_target_modules(cfg, path), available)
    return path
