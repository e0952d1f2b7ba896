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

# The current generation ships as transformers' Mistral3ForConditionalGeneration (model_type "mistral3"): a
# Mistral language model (``model.language_model``), a Pixtral vision tower (``model.vision_tower``) and a
# patch-merging projector (``model.multi_modal_projector``). Its config.json nests the language model's figures
# under "text_config"; the shapes below are that text_config, plus the vision tower's figures under "vision".
# Sources (stored public copies, found with the search tool; the hub itself is out of reach from here):
# - Mistral Small 3.1 / 3.2 (24B, 2503 / 2506): config.json as reproduced in diffusers' FLUX.2 tests and docs
#   (its text encoder is Mistral-Small-3.1-24B-Instruct-2503): text hidden 5120, 40 layers, 32 heads, 8 KV
#   heads, head_dim 128, MLP 32768, rope_theta 1e9, max_position_embeddings 131072, vocab 131072; vision
#   (pixtral) hidden 1024, 24 layers, 16 heads, MLP 4096, image 1540, patch 14, spatial_merge_size 2. Small 3.2's
#   shapes are Small 3.1's (a third-party shape table, "Mistral-Small-3.2-24B-Instruct-2506": same figures).
# - The vision tower + projector's parameter count, 438,958,080, is the figure a third-party memory estimator
#   measured on the meta device for Small 3.2 and Ministral 3 14B (same Pixtral tower in both).
# - Ministral 3 (2512): text model_type "ministral3" (transformers 5's Ministral3Config: YaRN RoPE with
#   llama_4_scaling_beta), Megatron-Bridge's docs/models/vlm/ministral3.md: 3B = 26 layers x 3072, 8B = 34 x 4096,
#   14B = 40 x 5120, 32 heads, 8 KV heads; MLP widths 9216 (3B) and 16384 (14B) from third-party shape tables
#   of the published config.json; 14336 for 8B is NOT verified here (Mistral-7B's 3.5x ratio; check the hub).
#   3B ties its embeddings (third-party shape table); max_position_embeddings 262144 (the 256k context the
#   model cards state).
_PIXTRAL_VISION: Mapping[str, Any] = MappingProxyType(
    {
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
        "image_size": 1540,
        "patch_size": 14,
        "parameters": 438_958_080,  # vision tower + projector
    }
)
_SMALL_31_SHAPES: Mapping[str, Any] = MappingProxyType(
    {
        **_SMALL_24B_SHAPES,
        "model_type": "mistral3",
        "text_model_type": "mistral",
        "rope_theta": 1e9,
        "max_position_embeddings": 131072,
        "vision": _PIXTRAL_VISION,
    }
)
# Magistral Small 2506 / 2507 and Devstral Small 2505 / 2507 are Small 3.1's language model fine-tuned, shipped
# as text-only MistralForCausalLM checkpoints (no vision tower); their rope_theta / context figures are Small
# 3.1's (128k), NOT verified against each hub config here.
_SMALL_31_TEXT_SHAPES: Mapping[str, Any] = MappingProxyType(
    {k: v for k, v in _SMALL_31_SHAPES.items() if k not in ("vision", "text_model_type")} | {"model_type": "mistral"}
)


def _ministral3(hidden: int, layers: int, mlp: int, *, tied: bool) -> Mapping[str, Any]:
    return MappingProxyType(
        {
            "model_type": "mistral3",
            "text_model_type": "ministral3",
            "hidden_size": hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "intermediate_size": mlp,
            "max_position_embeddings": 262144,
            "sliding_window": None,
            "tie_word_embeddings": tied,
            "vision": _PIXTRAL_VISION,
        }
    )


_MINISTRAL3_3B = _ministral3(3072, 26, 9216, tied=True)
_MINISTRAL3_8B = _ministral3(4096, 34, 14336, tied=False)
_MINISTRAL3_14B = _ministral3(5120, 40, 16384, tied=False)

# Where the wrapper keeps its parts (transformers 5 module names), and how checkpoints written in the older
# layout (``language_model.model.…``, what transformers 5.17's save_pretrained still writes for Mistral3 and
# what the hub's Small 3.1 files use) name the same tensors: the merge and GGUF export match adapter weights
# to checkpoint tensors through this.
MISTRAL3_LANGUAGE_MODEL = "model.language_model"
MISTRAL3_FROZEN_16BIT = ("model.vision_tower", "model.multi_modal_projector")
MISTRAL3_CHECKPOINT_PREFIXES: Mapping[str, str] = MappingProxyType(
    {
        "language_model.model.": "model.language_model.",
        "language_model.lm_head.": "lm_head.",
        "vision_tower.": "model.vision_tower.",
        "multi_modal_projector.": "model.multi_modal_projector.",
    }
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
        language_model: the module holding the decoder inside a wrapper (``model.language_model`` of
            Mistral3ForConditionalGeneration): LoRA targets are matched inside it only ("" : the whole model).
        frozen_16bit: modules kept in 16 bits and frozen (a wrapper's vision tower and projector): never
            quantised, never given LoRA, written back byte for byte by the merge.
        text_model_type: ``text_config.model_type`` of a wrapper (``"mistral"``, ``"ministral3"``).
        refused: why this tool refuses the generation ("" : supported).
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
    language_model: str = ""
    frozen_16bit: tuple[str, ...] = ()
    text_model_type: str = ""
    refused: str = ""

    @property
    def is_moe(self) -> bool:
        """True for a mixture-of-experts generation (Mixtral)."""
        return self.num_experts > 0

    @property
    def is_wrapper(self) -> bool:
        """True for a vision-language wrapper whose language model alone is trained (Mistral3)."""
        return bool(self.language_model)

    def config_for(self, hub_name: str) -> dict[str, Any] | None:
        """The built-in ``config.json`` figures of one of this row's hub models (None if unknown).

        A wrapper's figures are its language model's, flat (as every stage reads them), with the vision
        tower's under ``"vision"``.
        """
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
    # Mistral Small 3.1 (2503): the first Mistral3ForConditionalGeneration; tekken v7 (the chat format of Small 3,
    # mistral_common's MistralTokenizer.v7 for "mistral-small-2503"). llama.cpp: text model as "mistral3", the
    # vision tower as an mmproj file (convert_hf_to_gguf.py --mmproj; conversion/mistral3.py and llava.py).
    Family(
        name="mistral-small-3.1",
        hub_names=(
            "mistralai/Mistral-Small-3.1-24B-Base-2503",
            "mistralai/Mistral-Small-3.1-24B-Instruct-2503",
            "unsloth/Mistral-Small-3.1-24B-Instruct-2503-bnb-4bit",
        ),
        architecture="Mistral3ForConditionalGeneration",
        tokenizer_kind="tekken",
        tokenizer="v7-tekken",
        vocab_size=131072,
        gguf_arch="mistral3",
        shapes=_SMALL_31_SHAPES,
        model_type="mistral3",
        language_model=MISTRAL3_LANGUAGE_MODEL,
        frozen_16bit=MISTRAL3_FROZEN_16BIT,
        text_model_type="mistral",
    ),
    # Mistral Small 3.2 (2506): Small 3.1's architecture and shapes; tekken v11 (llama.cpp's converter maps
    # TokenizerVersion.v11 to the template "Mistral-Small-3.2-24B-Instruct-2506.jinja": conversion/mistral.py).
    Family(
        name="mistral-small-3.2",
        hub_names=("mistralai/Mistral-Small-3.2-24B-Instruct-2506", "unsloth/Mistral-Small-3.2-24B-Instruct-2506"),
        architecture="Mistral3ForConditionalGeneration",
        tokenizer_kind="tekken",
        tokenizer="v11-tekken",
        vocab_size=131072,
        gguf_arch="mistral3",
        shapes=_SMALL_31_SHAPES,
        model_type="mistral3",
        language_model=MISTRAL3_LANGUAGE_MODEL,
        frozen_16bit=MISTRAL3_FROZEN_16BIT,
        text_model_type="mistral",
    ),
    # Magistral Small 2509 (1.2): reasoning ([THINK]…[/THINK]) with the vision tower back, tekken v13. The
    # architecture (Mistral3ForConditionalGeneration) is what third-party loaders record for its GGUF (text +
    # image input); the tokenizer version is NOT verified against its tekken.json here.
    Family(
        name="magistral-small-2509",
        hub_names=("mistralai/Magistral-Small-2509", "unsloth/Magistral-Small-2509"),
        architecture="Mistral3ForConditionalGeneration",
        tokenizer_kind="tekken",
        tokenizer="v13-tekken",
        vocab_size=131072,
        gguf_arch="mistral3",
        shapes=_SMALL_31_SHAPES,
        model_type="mistral3",
        language_model=MISTRAL3_LANGUAGE_MODEL,
        frozen_16bit=MISTRAL3_FROZEN_16BIT,
        text_model_type="mistral",
    ),
    # Magistral Small 2506 / 2507 and Devstral Small 2505 / 2507: Small 3.1's language model alone
    # (MistralForCausalLM, no vision tower). Tokenizers: the 2507 releases are v13 (llama.cpp's converter maps
    # TokenizerVersion.v13 to the template "unsloth-mistral-Devstral-Small-2507.jinja", conversion/mistral.py; v13
    # has [THINK]/[/THINK], Magistral 1.1's reasoning format); v11 for the 2505/2506 releases is NOT verified here
    # against their tekken.json. Matched by hub name; a local copy's config.json looks like Small 3's.
    *(
        Family(
            name=name,
            hub_names=(hub,),
            architecture="MistralForCausalLM",
            tokenizer_kind="tekken",
            tokenizer=version,
            vocab_size=131072,
            shapes=_SMALL_31_TEXT_SHAPES,
        )
        for name, hub, version in (
            ("magistral-small-2506", "mistralai/Magistral-Small-2506", "v11-tekken"),
            ("magistral-small-2507", "mistralai/Magistral-Small-2507", "v13-tekken"),
            ("devstral-small-2505", "mistralai/Devstral-Small-2505", "v11-tekken"),
            ("devstral-small-2507", "mistralai/Devstral-Small-2507", "v13-tekken"),
        )
    ),
    # Ministral 3 (2512): Mistral3ForConditionalGeneration with a "ministral3" language model (YaRN RoPE, llama 4
    # attention scaling); llama.cpp converts it as "mistral3" (conversion/mistral3.py Ministral3Model). Official
    # Instruct weights are fine-grained FP8 (dequantised as read: modeling/fp8.py). Tokenizer v13 NOT verified.
    *(
        Family(
            name=f"ministral-3-{size.lower()}",
            hub_names=tuple(f"mistralai/Ministral-3-{size}-{kind}-2512" for kind in ("Base", "Instruct", "Reasoning")),
            architecture="Mistral3ForConditionalGeneration",
            tokenizer_kind="tekken",
            tokenizer="v13-tekken",
            vocab_size=131072,
            gguf_arch="mistral3",
            shapes=shapes,
            model_type="mistral3",
            language_model=MISTRAL3_LANGUAGE_MODEL,
            frozen_16bit=MISTRAL3_FROZEN_16BIT,
            text_model_type="ministral3",
        )
        for size, shapes in (("3B", _MINISTRAL3_3B), ("8B", _MINISTRAL3_8B), ("14B", _MINISTRAL3_14B))
    ),
)
"""Every generation mistral_fast supports; the first is the default (and the tiny model's)."""

# Generations refused with the reason, by hub name (`family_for_model`). Mistral Large 3 (2512) is a 675B
# mixture of experts with DeepSeek-V3-style attention, published in Mistral's own format (params.json with a
# "moe" section, consolidated safetensors in FP8): llama.cpp converts it only from that format
# (convert_hf_to_gguf.py --mistral-format → conversion/mistral.py MistralMoeModel), and nothing here (transformers
# loading, our merge, our GGUF writer) reads that format or that architecture.
REFUSED: Mapping[str, str] = MappingProxyType(
    {
        "mistralai/Mistral-Large-3-675B-Instruct-2512": (
            "Mistral Large 3 is a 675B mixture-of-experts model (DeepSeek-V3-style attention and experts) published "
            "in Mistral's own format (params.json + consolidated safetensors), which llama.cpp converts only with "
            "convert_hf_to_gguf.py --mistral-format and which this tool's loaders, merge and GGUF export do not read"
        ),
        "mistralai/Mistral-Large-3-675B-Base-2512": (
            "Mistral Large 3 is a 675B mixture-of-experts model published in Mistral's own format (params.json), "
            "which llama.cpp converts only with --mistral-format and which this tool does not read"
        ),
    }
)

DEFAULT = FAMILIES[0]
TINY_MODELS: Mapping[str, str] = MappingProxyType(
    {
        "tiny": "mistral-7b-v0.3",
        "tiny-nemo": "mistral-nemo",
        "tiny-small": "mistral-small-24b",
        "tiny-copy": "mistral-7b-v0.3",
        "tiny-mixtral": "mixtral-8x7b-v0.1",
        "tiny-mistral3": "mistral-small-3.1",
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
    _refuse(name_or_path)
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
                f"model.name_or_path={name_or_path!r}: {architecture} (Pixtral 12B) is a vision-language model of a "
                "layout this tool does not train (only Mistral3ForConditionalGeneration wrappers are); choose a "
                "Mistral text model or a Mistral 3 checkpoint"
            )
        text = text_config(config)
        candidates = [
            f
            for f in FAMILIES
            if f.architecture == architecture
            and f.vocab_size == text.get("vocab_size")
            and (not f.text_model_type or f.text_model_type == text.get("model_type", f.text_model_type))
        ]
        if candidates:
            return _closest(candidates, text)
        raise ModelError(
            f"model.name_or_path={name_or_path!r}: {architecture or 'no architecture'} with vocab_size "
            f"{text.get('vocab_size')} is not a supported Mistral generation; supported: "
            + ", ".join(sorted({f"{f.architecture} ({f.vocab_size} ids)" for f in FAMILIES}))
        )
    raise ModelError(f"model.name_or_path={name_or_path!r}: not a known model and no config.json to identify it")


def _refuse(name_or_path: str) -> None:
    for hub_name, reason in REFUSED.items():
        if name_or_path.lower() == hub_name.lower():
            raise ModelError(f"model.name_or_path={name_or_path!r}: not supported: {reason}")


def text_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A config.json's language-model figures: its ``text_config`` (a Mistral3 wrapper), else itself.

    Why: every stage reads widths, layers and vocabulary from the flat dict a MistralForCausalLM has; a
    wrapper nests them under ``text_config``, so this is the one place that flattening happens.
    """
    nested = config.get("text_config")
    if isinstance(nested, Mapping):
        return {**{k: v for k, v in config.items() if k != "text_config"}, **nested}
    return dict(config)


_VISION_ARCHITECTURES = ("LlavaForConditionalGeneration",)


def _closest(candidates: list[Family], config: Mapping[str, Any]) -> Family:
    """Among rows of one architecture and vocabulary (Nemo, Small 24B), the one whose shapes the config has.

    Compared on the MLP width and the RoPE base (what tells Nemo from Small 24B); a config matching
    neither (a tiny test model) gets the first row.
    """
    rope = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta")  # transformers 5
    for family in candidates:  # Ministral 3's sizes: told apart by width and depth
        shape = (family.shapes.get("hidden_size"), family.shapes.get("num_hidden_layers"))
        if family.shapes.get("text_model_type") == "ministral3" and shape == (
            config.get("hidden_size"),
            config.get("num_hidden_layers"),
        ):
            return family
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
