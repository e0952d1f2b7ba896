"""The model-family table: one row per Mistral generation, asked by every stage (torch-free).

Which tokenizer and chat template a model needs, which module names LoRA can target, what llama.cpp
calls its architecture, and the shapes the memory estimator uses without a hub: these are facts of a
model *generation*, not of a stage. They live here once, and config validation, the tokenizer loader,
modeling, memory and export all ask this table. Adding a generation is adding a row (plus its tests),
not ``if`` branches spread over the stages.

A model is matched to its row by its hub name (``mistralai/Mistral-7B-v0.3``) when it is a known one,
else by its ``config.json``: architecture and vocabulary size.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

from mistral_fast.errors import ModelError


class ModelRef(Protocol):
    """What the table reads of a run's model: `config.ModelConfig` satisfies it.

    A structural type here, not ``config.ModelConfig`` itself: `config` validates LoRA targets against this
    table, so the table naming config's class would tie the two modules in an import cycle.
    """

    name_or_path: str
    tokenizer: str

# LoRA target sets of the dense Mistral decoder (same module names in every dense generation).
DENSE_TARGETS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        # LoRA on attention only: the original QLoRA-paper-era default, fewest parameters.
        "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
        # All linear layers: what the QLoRA paper found needed to match full fine-tuning quality.
        "all-linear": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    }
)

# Mixtral's LoRA target sets are the dense ones: its per-expert NF4 linears (modeling/moe.py) are named as a
# dense Mistral MLP's (gate_proj / up_proj / down_proj; w1 / w3 / w2 in Mixtral checkpoints). Not "w1"..."w3":
# peft 0.21 rewrites those names on a transformers-5 Mixtral into LoRA on the fused 16-bit parameters. The
# router (``gate``) is never a LoRA target: frozen, or trained whole with lora.train_router.
# Mixtral-8x7B v0.1's config.json (mistralai/Mixtral-8x7B-v0.1; the same in -Instruct-v0.1).
_MIXTRAL_8X7B_SHAPES: Mapping[str, Any] = MappingProxyType(
    {
        "model_type": "mixtral",
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "intermediate_size": 14336,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "router_aux_loss_coef": 0.02,
        "max_position_embeddings": 32768,
        "rope_theta": 1e6,
        "tie_word_embeddings": False,
    }
)

# Mixtral-8x22B v0.1's config.json (mistralai/Mixtral-8x22B-v0.1 and -Instruct-v0.1, vocabulary 32768).
_MIXTRAL_8X22B_SHAPES: Mapping[str, Any] = MappingProxyType(
    {
        "model_type": "mixtral",
        "hidden_size": 6144,
        "num_hidden_layers": 56,
        "num_attention_heads": 48,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "intermediate_size": 16384,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "router_aux_loss_coef": 0.001,
        "max_position_embeddings": 65536,
        "rope_theta": 1e6,
        "tie_word_embeddings": False,
    }
)

# The public Mistral-7B checkpoints' shapes (config.json), so a memory estimate needs no hub access.
_MISTRAL_7B_SHAPES: Mapping[str, Any] = MappingProxyType(
    {
        "model_type": "mistral",
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "intermediate_size": 14336,
        "tie_word_embeddings": False,
    }
)

# Mistral Nemo 12B (2407): head_dim 128 is not hidden/heads (5120/32 = 160), the tekken vocabulary.
_NEMO_SHAPES: Mapping[str, Any] = MappingProxyType(
    {
        "model_type": "mistral",
        "hidden_size": 5120,
        "num_hidden_layers": 40,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "intermediate_size": 14336,
        "rope_theta": 1e6,
        "max_position_embeddings": 1024000,
        "sliding_window": None,
        "tie_word_embeddings": False,
    }
)
# Mistral Small 3 24B (2501): Nemo's attention shapes, a 32768-wide MLP and RoPE base 1e8, 32k context.
_SMALL_24B_SHAPES: Mapping[str, Any] = MappingProxyType(
    {**_NEMO_SHAPES, "intermediate_size": 32768, "rope_theta": 1e8, "max_position_embeddings": 32768}
)


@dataclass(frozen=True)
class Family:
    """One Mistral generation: what every stage needs to know about its models.

    Attributes:
        name: the row's name (``"mistral-7b-v0.3"``).
        hub_names: known hub repositories of this generation (matched case-insensitively).
        architecture: ``config.json``'s ``architectures[0]`` (the transformers class).
        tokenizer_kind: ``"sentencepiece"`` (7B) or ``"tekken"`` (Nemo and later).
        tokenizer: our exact built-in tokenizer's version, ``"v3"``, ``"v1"``, ``"v3-tekken"`` or ``"v7-tekken"``
            (`mistral_fast.tokenizer.load_tokenizer`), which is
            also the chat-template version and the `mistral_common` reference version.
        vocab_size: the tokenizer's (and embedding's) number of ids.
        lora_targets: LoRA target sets by name (``"attention"``, ``"all-linear"``) → module names.
        gguf_arch: llama.cpp's architecture name for the GGUF export.
        shapes: ``config.json`` figures of the public checkpoints (for the memory estimator).
        model_type: ``config.json``'s ``model_type`` (``"mistral"``, ``"mixtral"``).
        num_experts: experts per layer of a mixture-of-experts generation (0: dense).
        experts_per_token: experts each token is routed to (top-k; 0: dense).
        expert_targets: the module names of one expert's linear layers in our 4-bit model (LoRA targets).
    """

    name: str
    hub_names: tuple[str, ...]
    architecture: str
    tokenizer_kind: str
    tokenizer: str
    vocab_size: int
    lora_targets: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: DENSE_TARGETS)
    gguf_arch: str = "llama"
    shapes: Mapping[str, Any] = field(default_factory=dict)
    model_type: str = "mistral"
    num_experts: int = 0
    experts_per_token: int = 0
    expert_targets: tuple[str, ...] = ()

    @property
    def is_moe(self) -> bool:
        """True for a mixture-of-experts generation (Mixtral)."""
        return self.num_experts > 0

    def config_for(self, hub_name: str) -> dict[str, Any] | None:
        """The built-in ``config.json`` figures of one of this row's hub models (None if unknown)."""
        if self.shapes and hub_name.lower() in {n.lower() for n in self.hub_names}:
            return {**self.shapes, "vocab_size": self.vocab_size, "architectures": [self.architecture]}
        return None


FAMILIES: tuple[Family, ...] = (
    Family(
        name="mistral-7b-v0.3",
        hub_names=(
            "mistralai/Mistral-7B-v0.3",
            "mistralai/Mistral-7B-Instruct-v0.3",
            "unsloth/mistral-7b-v0.3-bnb-4bit",
        ),
        architecture="MistralForCausalLM",
        tokenizer_kind="sentencepiece",
        tokenizer="v3",
        vocab_size=32768,
        shapes=_MISTRAL_7B_SHAPES,
    ),
    Family(
        name="mistral-7b-v0.1",
        hub_names=(
            "mistralai/Mistral-7B-v0.1",
            "mistralai/Mistral-7B-Instruct-v0.1",
            "mistralai/Mistral-7B-Instruct-v0.2",
        ),
        architecture="MistralForCausalLM",
        tokenizer_kind="sentencepiece",
        tokenizer="v1",
        vocab_size=32000,
        shapes=_MISTRAL_7B_SHAPES,
    ),
    Family(
        name="mixtral-8x7b-v0.1",
        hub_names=(
            "mistralai/Mixtral-8x7B-v0.1",
            "mistralai/Mixtral-8x7B-Instruct-v0.1",
            "unsloth/mixtral-8x7b-v0.1-bnb-4bit",
            "unsloth/Mixtral-8x7B-Instruct-v0.1-bnb-4bit",
        ),
        architecture="MixtralForCausalLM",
        tokenizer_kind="sentencepiece",
        tokenizer="v1",
        vocab_size=32000,
        gguf_arch="llama",  # llama.cpp converts Mixtral as "llama" with stacked ffn_*_exps tensors
        shapes=_MIXTRAL_8X7B_SHAPES,
        model_type="mixtral",
        num_experts=8,
        experts_per_token=2,
        expert_targets=("gate_proj", "up_proj", "down_proj"),
    ),
    Family(
        name="mixtral-8x22b-v0.1",
        hub_names=("mistralai/Mixtral-8x22B-v0.1", "mistralai/Mixtral-8x22B-Instruct-v0.1"),
        architecture="MixtralForCausalLM",
        tokenizer_kind="sentencepiece",
        tokenizer="v3",
        vocab_size=32768,
        gguf_arch="llama",
        shapes=_MIXTRAL_8X22B_SHAPES,
        model_type="mixtral",
        num_experts=8,
        experts_per_token=2,
        expert_targets=("gate_proj", "up_proj", "down_proj"),
    ),
    Family(
        name="mistral-nemo",
        hub_names=(
            "mistralai/Mistral-Nemo-Base-2407",
            "mistralai/Mistral-Nemo-Instruct-2407",
            "unsloth/Mistral-Nemo-Base-2407-bnb-4bit",
            "unsloth/Mistral-Nemo-Instruct-2407-bnb-4bit",
        ),
        architecture="MistralForCausalLM",
        tokenizer_kind="tekken",
        tokenizer="v3-tekken",
        vocab_size=131072,
        shapes=_NEMO_SHAPES,
    ),
    Family(
        name="mistral-small-24b",
        hub_names=(
            "mistralai/Mistral-Small-24B-Base-2501",
            "mistralai/Mistral-Small-24B-Instruct-2501",
            "unsloth/Mistral-Small-24B-Base-2501-bnb-4bit",
            "unsloth/Mistral-Small-24B-Instruct-2501-bnb-4bit",
        ),
        architecture="MistralForCausalLM",
        tokenizer_kind="tekken",
        tokenizer="v7-tekken",
        vocab_size=131072,
        shapes=_SMALL_24B_SHAPES,
    ),
)
"""Every generation mistral_fast supports; the first is the default (and the tiny model's)."""

DEFAULT = FAMILIES[0]
TINY_MODELS: Mapping[str, str] = MappingProxyType(
    {
        "tiny": "mistral-7b-v0.3",
        "tiny-nemo": "mistral-nemo",
        "tiny-small": "mistral-small-24b",
        "tiny-mixtral": "mixtral-8x7b-v0.1",
    }
)
"""``model.name_or_path`` values of the tiny local models (`mistral_fast.modeling.tiny`) → their row's name."""
TOKENIZER_VERSIONS: tuple[str, ...] = tuple(dict.fromkeys(f.tokenizer for f in FAMILIES))


def family_named(name: str) -> Family:
    """The row called `name`.

    Raises:
        ModelError: no such row, listing the known ones.
    """
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ModelError(f"model family {name!r} is not known; known: {[f.name for f in FAMILIES]}")


def family_for_tokenizer(version: str) -> Family:
    """The first row whose built-in tokenizer is `version` (``"v3"``, ``"v1"``)."""
    for family in FAMILIES:
        if family.tokenizer == version:
            return family
    raise ModelError(f"tokenizer version {version!r} is not known; use one of {list(TOKENIZER_VERSIONS)}")


def family_for_model(name_or_path: str, config: Mapping[str, Any] | None = None) -> Family:
    """The row of a model: by known hub name first, else by its ``config.json`` (architecture + vocab size).

    Args:
        name_or_path: ``model.name_or_path`` (``"tiny"`` is the default row).
        config: the model's ``config.json`` as a dict, when it is at hand (a local directory's is read
            when not given).

    Raises:
        ModelError: neither the name nor the config matches a row, naming what was found.
    """
    if name_or_path in TINY_MODELS:
        return family_named(TINY_MODELS[name_or_path])
    for family in FAMILIES:
        if name_or_path.lower() in {n.lower() for n in family.hub_names}:
            return family
    local = Path(name_or_path).expanduser() / "config.json"
    if config is None and local.is_file():
        config = json.loads(local.read_text(encoding="utf-8"))
    if config is not None:
        architecture = (config.get("architectures") or [""])[0]
        if architecture in _VISION_ARCHITECTURES:
            raise ModelError(
                f"model.name_or_path={name_or_path!r}: {architecture} (Mistral Small 3.1/3.2) is a vision-language "
                "model; mistral_fast trains text-only MistralForCausalLM checkpoints and refuses it rather than "
                "train a wrapper it cannot export. Use mistralai/Mistral-Small-24B-Instruct-2501 (same language "
                "model, text only), or extract the language model into a MistralForCausalLM checkpoint first"
            )
        candidates = [
            f for f in FAMILIES if f.architecture == architecture and f.vocab_size == config.get("vocab_size")
        ]
        if candidates:
            return _closest(candidates, config)
        raise ModelError(
            f"model.name_or_path={name_or_path!r}: {architecture or 'no architecture'} with vocab_size "
            f"{config.get('vocab_size')} is not a supported Mistral generation; supported: "
            + ", ".join(f"{f.name} ({f.architecture}, {f.vocab_size} ids)" for f in FAMILIES)
        )
    raise ModelError(f"model.name_or_path={name_or_path!r}: not a known model and no config.json to identify it")


_VISION_ARCHITECTURES = ("Mistral3ForConditionalGeneration", "LlavaForConditionalGeneration")


def _closest(candidates: list[Family], config: Mapping[str, Any]) -> Family:
    """Among rows of one architecture and vocabulary (Nemo, Small 24B), the one whose shapes the config has.

    Compared on the MLP width and the RoPE base (what tells Nemo from Small 24B); a config matching
    neither (a tiny test model) gets the first row.
    """
    rope = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta")  # transformers 5
    for family in candidates:
        if family.shapes and (config.get("intermediate_size"), rope) == (
            family.shapes.get("intermediate_size"),
            family.shapes.get("rope_theta"),
        ):
            return family
    return candidates[0]


def known_config(name: str) -> dict[str, Any] | None:
    """Built-in ``config.json`` figures of a known hub model (no hub access), or None."""
    for family in FAMILIES:
        found = family.config_for(name)
        if found is not None:
            return found
    return None


def tokenizer_version(model: ModelRef, config: Mapping[str, Any] | None = None) -> str:
    """The tokenizer / chat-template version a run uses: the one rule every stage asks.

    ``model.tokenizer`` names it (``"v3"``, ``"v1"``); with ``"model"`` (the model's own tokenizer files)
    the version is the model's row's, from its name or ``config.json``.
    """
    if model.tokenizer != "model":
        return model.tokenizer
    local = Path(model.name_or_path).expanduser() / "config.json"
    if config is None and local.is_file():
        config = json.loads(local.read_text(encoding="utf-8"))
    return family_for_model(model.name_or_path, config).tokenizer


def lora_target_sets() -> tuple[str, ...]:
    """Names of the LoRA target sets any row defines (what ``lora.targets`` accepts as a string)."""
    return tuple(dict.fromkeys(name for f in FAMILIES for name in f.lora_targets))


def model_types() -> tuple[str, ...]:
    """``config.json`` model types of the supported generations (``mistral``, ``mixtral``)."""
    return tuple(dict.fromkeys(f.model_type for f in FAMILIES))


def family_of(model: ModelRef, config: Mapping[str, Any] | None = None) -> Family:
    """The row of a run's model (`family_for_model` on ``model.name_or_path``)."""
    return family_for_model(model.name_or_path, config)


def resolve_targets(targets: str | list[str], family: Family = DEFAULT) -> list[str]:
    """Module names of ``lora.targets``: a set name of the family's, or an explicit list kept as it is."""
    if isinstance(targets, str):
        return list(family.lora_targets[targets])
    return list(targets)
