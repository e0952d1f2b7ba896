"""How much memory a run needs, whether it fits a GPU, and what to change when it does not.

`estimate_memory(cfg, gpu="t4")` adds up, per device: the base weights (16-bit, or NF4 with its
64-element absmax blocks and, with double quantisation, 8-bit absmax in 256-blocks), the LoRA
matrices (r·(in+out) per target, exact), their gradients and optimizer state, the activations the
backward pass needs (per layer and token, with or without gradient checkpointing), the loss's fp32
logits and their gradients, and a workspace constant. `compare_methods` puts full fine-tuning, LoRA
on a 16-bit base and QLoRA side by side; `check_fits` is the pre-flight check that fails a run
before any weight is loaded. docs/memory.md explains every term and how it was measured.

The formulas are for the ``hf`` backend (transformers + bitsandbytes + peft), whose activation
layout was measured tensor by tensor (autograd saved-tensor hooks) and validated against the peak
RSS of real training steps on CPU (tests/test_memory.py). Unsloth's fused kernels and offloaded
checkpointing are built to need less, so the hf figure is meant as the upper bound for both (not
measured on a GPU here). No torch here: the estimate is arithmetic on config.json.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from mistral_fast.config import RunConfig
from mistral_fast.constants import NF4_BLOCK
from mistral_fast.errors import ConfigError
from mistral_fast.families import known_config, text_config
from mistral_fast.policies import BF16_CAPABILITY, auto_compute_dtype, resolve_optimizer, uses_chunked_loss

GiB = 2**30
MiB = 2**20

# Usable device memory as `nvidia-smi` reports it (MiB): a "16 GB" T4 shows 15360 MiB.
GPU_MEMORY_MIB: dict[str, int] = {
    "t4": 15360,
    "l4": 23034,
    "a10": 23028,
    "a100-40gb": 40960,
    "a100-80gb": 81920,
    "h100": 81559,
    "h200": 143771,
}
_GPU_ALIASES = {"a10040": "a100-40gb", "a10080": "a100-80gb", "h10080": "h100", "h200141": "h200", "a10g": "a10"}
# Compute capability of the listed GPUs that predate Ampere (the rest are 8.0 or newer): `compute_dtype: auto`
# follows `policies.auto_compute_dtype` for them as training does on the real card.
_OLD_GPU_CAPABILITY = {"t4": (7, 5)}

# CUDA context, cuBLAS workspaces and the kernels' module images: what `nvidia-smi` shows for a process
# that has only initialised CUDA and run one matmul (~300-500 MiB on recent drivers). Allocator
# fragmentation is covered by the fraction below (torch's caching allocator keeps freed blocks).
CUDA_CONTEXT_BYTES = 512 * MiB
FRAGMENTATION = 0.05

# Optimizer state bytes per trainable parameter (HF `optim` names). AdamW keeps two moments: fp32 (8
# bytes) or bitsandbytes' blockwise 8-bit (2 bytes). Unknown names are assumed to be 32-bit AdamW.
OPTIMIZER_STATE_BYTES: dict[str, float] = {
    "adamw_torch": 8,
    "adamw_torch_fused": 8,
    "adamw_hf": 8,
    "paged_adamw_32bit": 8,
    "adamw_8bit": 2,
    "adamw_bnb_8bit": 2,
    "paged_adamw_8bit": 2,
    "adafactor": 0.1,
    "sgd": 0,
}
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
DQ_BLOCK = 256  # double quantisation: the 8-bit absmax values are scaled in blocks of 256
Method = Literal["full", "lora", "qlora"]
METHODS: tuple[str, ...] = ("full", "lora", "qlora")


@dataclass(frozen=True)
class MistralShapes:
    """The sizes of a Mistral decoder that memory depends on (from config.json)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool = False
    experts: int = 0  # Mixtral: experts per layer (num_local_experts); 0: a dense MLP
    top_k: int = 0  # Mixtral: experts each token is routed to (num_experts_per_tok)
    vision: int = 0  # a Mistral3 wrapper's vision tower + projector parameters (kept 16-bit, frozen); 0: none

    @property
    def mlp_copies(self) -> int:
        """MLPs resident per layer: every expert of a Mixtral (all are in memory), else one."""
        return self.experts or 1

    @property
    def routed(self) -> int:
        """MLPs a token runs through per layer: its top-k experts, else one."""
        return self.top_k or 1

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> MistralShapes:
        """Read the shapes from a config.json dict (a Mistral3 wrapper's: its text_config, plus the vision tower)."""
        vision = vision_parameters(config)
        config = text_config(config)
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        return cls(
            hidden=hidden,
            layers=int(config["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            intermediate=int(config["intermediate_size"]),
            vocab=int(config["vocab_size"]),
            tied=bool(config.get("tie_word_embeddings", False)),
            experts=int(config.get("num_local_experts") or 0),
            top_k=int(config.get("num_experts_per_tok") or 0),
            vision=vision,
        )

    def linear_dims(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear module of one decoder layer."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def copies(self, module: str) -> int:
        """How many of `module` a layer holds: the MLP's once per expert on a Mixtral."""
        return self.mlp_copies if module in _MLP else 1

    @property
    def linear_params(self) -> int:
        """Parameters in the decoder's linear layers (the ones quantised to NF4; Mixtral: every expert's)."""
        return self.layers * sum(a * b * self.copies(n) for n, (a, b) in self.linear_dims().items())

    @property
    def router_params(self) -> int:
        """Mixtral's routers (experts x hidden per layer): not quantised, and not a LoRA target."""
        return self.layers * self.experts * self.hidden

    @property
    def embedding_params(self) -> int:
        """Input embedding plus lm_head (never quantised by bitsandbytes)."""
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def norm_params(self) -> int:
        """RMSNorm weights: two per layer and the final one."""
        return (2 * self.layers + 1) * self.hidden

    @property
    def total_params(self) -> int:
        """All parameters of the base model."""
        return self.linear_params + self.embedding_params + self.norm_params + self.router_params + self.vision


_MLP = ("gate_proj", "up_proj", "down_proj")


def vision_parameters(config: dict[str, Any]) -> int:
    """Parameters of a Mistral3 wrapper's Pixtral vision tower and projector (0 for a text model).

    From the built-in figure (``config["vision"]["parameters"]``) or computed from ``vision_config`` as
    transformers builds the modules: the patch convolution, ``ln_pre``, per layer q/k/v/o (no bias), the
    SwiGLU MLP and two norms; the projector's norm, patch merger (h·m² → h), linear_1 (h → text hidden) and
    linear_2 (text hidden²). For Small 3.1's vision_config this gives 438,958,080, the figure measured on
    the meta device by a third-party estimator (families.py).
    """
    if isinstance(config.get("vision"), Mapping):
        return int(config["vision"]["parameters"])
    vision = config.get("vision_config")
    if not isinstance(vision, Mapping):
        return 0
    h, inter, layers = int(vision["hidden_size"]), int(vision["intermediate_size"]), int(vision["num_hidden_layers"])
    patch, merge = int(vision.get("patch_size", 14)), int(config.get("spatial_merge_size", 2))
    text_hidden = int(text_config(config)["hidden_size"])
    tower = h * int(vision.get("num_channels", 3)) * patch * patch + h + layers * (4 * h * h + 3 * h * inter + 2 * h)
    projector = h + h * h * merge * merge + h * text_hidden + text_hidden * text_hidden
    return tower + projector


@dataclass(frozen=True)
class Plan:
    """What a training step looks like, for one estimate (derived from a RunConfig, then varied)."""

    method: Method
    batch_size: int
    seq_len: int
    accumulation: int
    gradient_checkpointing: bool
    compute_dtype: str
    optimizer: str
    rank: int
    targets: tuple[str, ...]
    dropout: float
    double_quant: bool = True
    on_gpu: bool = True
    world_size: int = 1
    objective: str = "sft"  # sft | dpo | orpo | grpo (train.method)
    answer_len: int = 0  # dpo: longest answer; grpo: max_completion_length (the LM head scores those positions only)
    kl_reference: bool = False  # grpo with beta > 0: a reference forward (adapter off) without gradients
    fsdp: bool = False  # FSDP + QLoRA (FULL_SHARD): weights, adapters, gradients, optimizer state sharded
    # the loss projects and scores a chunk of tokens at a time (TRL's fused head on CUDA, ours on CPU,
    # Unsloth's fused cross-entropy): False for transformers' plain loss over the full logits
    chunked_loss: bool = True

    @property
    def sequences(self) -> int:
        """Sequences in one forward pass: a preference pair is two (prompt + chosen, prompt + rejected)."""
        return self.batch_size * (2 if self.objective in ("dpo", "orpo") else 1)

    @property
    def tokens(self) -> int:
        """Tokens in one forward pass (per device)."""
        return self.sequences * self.seq_len

    @property
    def scored_tokens(self) -> int:
        """Positions whose fp32 logits are built: all of them, except DPO's fused head (answers only)."""
        if self.objective in ("dpo", "grpo"):
            return self.sequences * min(self.answer_len or self.seq_len, self.seq_len)
        return self.tokens

    @property
    def effective_batch(self) -> int:
        """Examples per optimizer step over all devices."""
        return self.batch_size * self.accumulation * self.world_size


CPU_RAM = "CPU RAM (available)"  # MemoryEstimate.device of a CPU run's estimate (compared with MemAvailable)


@dataclass
class MemoryEstimate:
    """Per-device memory of one training configuration, with a verdict and a suggestion.

    Attributes:
        method: ``"full"``, ``"lora"`` (16-bit base) or ``"qlora"`` (4-bit base).
        plan: the batch, sequence length, dtype and optimizer the figures are for.
        breakdown: bytes per component, in the order they are explained in docs/memory.md.
        details: the intermediate figures (parameter counts, bytes per layer per token, …).
        device: the GPU name (or ``"cpu"``) the estimate was compared with, if any.
        capacity: that device's memory in bytes, or None.
        suggestion: what to run instead when it does not fit (or how far it could grow).
        suggested: the plan behind the suggestion (batch, sequence, accumulation, checkpointing).
    """

    method: str
    plan: Plan
    breakdown: dict[str, int]
    details: dict[str, Any] = field(default_factory=dict)
    device: str | None = None
    capacity: int | None = None
    suggestion: str = ""
    suggested: Plan | None = None

    @property
    def total(self) -> int:
        """Peak bytes per device."""
        return sum(self.breakdown.values())

    @property
    def fits(self) -> bool | None:
        """Whether the peak fits the device; None when no device was given."""
        return None if self.capacity is None else self.total <= self.capacity

    def table(self) -> str:
        """The breakdown as a Markdown table (GiB), with the verdict and suggestion under it."""
        p = self.plan
        lines = [
            f"**{self.method}** · batch {p.batch_size} × seq {p.seq_len} · "
            f"checkpointing {'on' if p.gradient_checkpointing else 'off'} · {p.compute_dtype} · {p.optimizer}",
            "",
            "| component | GiB |",
            "| --- | ---: |",
        ]
        lines += [f"| {name} | {value / GiB:.2f} |" for name, value in self.breakdown.items()]
        lines.append(f"| **total** | **{self.total / GiB:.2f}** |")
        if self.capacity is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            if self.device == CPU_RAM:  # a CPU run: say which memory, not a card's name
                lines += ["", f"{verdict} in this machine's CPU RAM ({self.capacity / GiB:.1f} GiB available)"]
            else:
                lines += ["", f"{verdict} on {self.device} ({self.capacity / GiB:.1f} GiB)"]
        if self.suggestion:
            lines += ["", self.suggestion]
        return "\n".join(lines)


def gpu_capacity(gpu: str | float) -> tuple[str, int]:
    """Name and usable bytes of a GPU given by name (``"t4"``, ``"a100-80gb"``) or by GiB (``24``).

    Raises:
        ConfigError: an unknown or ambiguous name, or a non-positive size.
    """
    if isinstance(gpu, str) and gpu.replace(".", "", 1).isdigit():
        gpu = float(gpu)  # "24" from a command line is a size
    if isinstance(gpu, int | float) and not isinstance(gpu, bool):
        if gpu <= 0:
            raise ConfigError(f"gpu={gpu!r}: give the GPU memory in GiB (> 0) or a name from {sorted(GPU_MEMORY_MIB)}")
        return f"{gpu:g} GiB GPU", int(gpu * GiB)
    key = str(gpu).lower().replace(" ", "").replace("_", "-")
    if key in GPU_MEMORY_MIB:
        return key.upper(), GPU_MEMORY_MIB[key] * MiB
    squashed = key.replace("-", "").removesuffix("gb")
    if squashed in _GPU_ALIASES:
        name = _GPU_ALIASES[squashed]
        return name.upper(), GPU_MEMORY_MIB[name] * MiB
    if squashed in GPU_MEMORY_MIB:
        return squashed.upper(), GPU_MEMORY_MIB[squashed] * MiB
    hint = " (say a100-40gb or a100-80gb)" if squashed == "a100" else ""
    raise ConfigError(f"gpu={gpu!r} is unknown{hint}: use one of {sorted(GPU_MEMORY_MIB)} or a size in GiB")


# ---------------------------------------------------------------------------------------------
# The terms
# ---------------------------------------------------------------------------------------------


def lora_parameters(shapes: MistralShapes, targets: tuple[str, ...] | list[str], rank: int) -> int:
    """Exact LoRA parameter count: r·(in + out) for every target module in every layer."""
    dims = shapes.linear_dims()
    unknown = sorted(set(targets) - set(dims))
    if unknown:
        raise ConfigError(f"lora.targets: {unknown} are not Mistral linear modules; use some of {sorted(dims)}")
    return shapes.layers * sum(rank * (dims[t][0] + dims[t][1]) * shapes.copies(t) for t in targets)


def nf4_bytes(params: int, *, double_quant: bool) -> float:
    """Bytes of `params` weights in bitsandbytes NF4: 4 bits each plus the absmax constants.

    Without double quantisation every 64-weight block has an fp32 absmax (0.5 bit/param); with it
    the absmax is stored in 8 bits and each 256 of those share one fp32 scale (~0.127 bit/param).
    """
    blocks = params / NF4_BLOCK
    absmax = blocks * 1 + (blocks / DQ_BLOCK) * 4 if double_quant else blocks * 4
    return params / 2 + absmax


def weight_bytes(shapes: MistralShapes, plan: Plan) -> int:
    """Bytes of the base model's weights as they sit on the device during training.

    * qlora: decoder linears in NF4; embeddings, lm_head and norms in fp32, because peft's
      ``prepare_model_for_kbit_training`` (hf backend) casts every non-4-bit parameter to fp32; a Mistral3
      wrapper's vision tower and projector in the compute dtype (cast back after that preparation).
    * lora: everything in the compute dtype (the base is loaded in it).
    * full: fp32 master weights (mixed precision: 16-bit copies are made per op by autocast).
    """
    if plan.method == "qlora":
        quantised_per_layer = 4 + 3 * shapes.mlp_copies  # Linear4bit modules, each with its own quant state
        per_layer_consts = shapes.layers * quantised_per_layer * (2 * 256 * 4 + 64)  # code tables, scalars
        other = shapes.embedding_params + shapes.norm_params + shapes.router_params
        vision = shapes.vision * _DTYPE_BYTES[plan.compute_dtype]  # 16-bit and frozen (modeling/mistral3.py)
        nf4 = nf4_bytes(shapes.linear_params, double_quant=plan.double_quant)
        return int(nf4 + other * 4 + vision + per_layer_consts)
    width = 4 if plan.method == "full" else _DTYPE_BYTES[plan.compute_dtype]
    return shapes.total_params * width


def trainable_parameters(shapes: MistralShapes, plan: Plan) -> int:
    """Parameters that get gradients and optimizer state."""
    if plan.method == "full":
        return shapes.total_params
    return lora_parameters(shapes, plan.targets, plan.rank)


def optimizer_state_bytes(optimizer: str) -> float:
    """Optimizer state per trainable parameter (unknown names: 8, as for 32-bit AdamW)."""
    return OPTIMIZER_STATE_BYTES.get(optimizer, 8)


def activation_bytes_per_token_layer(shapes: MistralShapes, plan: Plan) -> int:
    """Bytes one decoder layer keeps for the backward pass, per token (no checkpointing).

    Counted from the tensors autograd saves in a transformers 5 / peft / bitsandbytes Mistral layer
    (sdpa attention; saved-tensor hooks on CPU), then checked against peak RSS (docs/memory.md):

    * fp32, whatever the compute dtype: 4·hidden (the two RMSNorms compute in fp32 and keep their
      input and normalised value), one RMSNorm scale per norm (2), the attention log-sum-exp per
      head, and the LoRA path, which peft runs in the adapters' fp32: each target's r-wide
      ``lora_A`` output, ``down_proj``'s input once more when it is a target, and with
      ``lora.dropout > 0`` each target's own dropped-out copy of its input (in_features wide) plus
      one hidden-wide tensor per distinct input (q/k/v share one, gate/up another, o its own).
    * activation dtype (fp32 on the QLoRA path, where the residual is fp32 after k-bit preparation
      and bitsandbytes then computes in fp32; the compute dtype otherwise): q and the attention
      output (2·q_dim), k and v (2·kv_dim, not repeated for GQA), and 3·intermediate (gate, up,
      SiLU(gate)·up).
    """
    dims = shapes.linear_dims()
    q_dim, kv_dim = shapes.heads * shapes.head_dim, shapes.kv_heads * shapes.head_dim
    k = shapes.routed  # Mixtral: a token's MLP work (and MLP LoRA work) happens in each of its top-k experts
    lora = 0
    if plan.method != "full":
        lora = plan.rank * sum(k if t in _MLP else 1 for t in plan.targets)
        lora += shapes.intermediate * k if "down_proj" in plan.targets else 0
        if plan.dropout > 0:
            groups = {_INPUT_GROUP[t] for t in plan.targets} - {"down"}
            lora += sum(dims[t][0] * (k if t in _MLP else 1) for t in plan.targets)
            lora += shapes.hidden * sum(k if g == "mlp" else 1 for g in groups)
    fp32 = 4 * shapes.hidden + 2 + shapes.heads + lora
    act = 2 * q_dim + 2 * kv_dim + 3 * shapes.intermediate * k
    if shapes.experts:
        # Router logits and softmax probabilities (fp32, experts wide; the logits also stay for the aux
        # loss), the top-k weights, and each routed copy of the token's hidden state gathered for its expert
        # and the expert's weighted output (top-k x hidden each).
        fp32 += 2 * shapes.experts + k
        act += 2 * k * shapes.hidden
    return 4 * fp32 + _activation_width(plan) * act


# Targets that read the same tensor (peft applies dropout to it once per target, keeps one more copy per input).
_INPUT_GROUP = {
    "q_proj": "qkv",
    "k_proj": "qkv",
    "v_proj": "qkv",
    "o_proj": "o",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "down",
}


def _activation_width(plan: Plan) -> int:
    # hf QLoRA: prepare_model_for_kbit_training makes the residual stream fp32, and bitsandbytes'
    # Linear4bit then switches its compute dtype to the input's (fp32): every activation is fp32.
    return 4 if plan.method == "qlora" else _DTYPE_BYTES[plan.compute_dtype]


def _residual_width(plan: Plan) -> int:
    # The tensor gradient checkpointing keeps per layer: the layer's input, in the residual dtype.
    return 4 if plan.method in ("qlora", "full") else _DTYPE_BYTES[plan.compute_dtype]


def logits_peak_bytes(shapes: MistralShapes, tokens: int) -> int:
    """The loss's peak: three fp32 batch×seq×vocab tensors at the start of the backward pass.

    transformers computes the loss from fp32 logits (the lm_head is fp32 after k-bit preparation,
    and the loss upcasts otherwise). The Trainer drops the model output before calling backward,
    so the logits themselves are gone by then; log-softmax's saved output, the gradient of the
    log-probabilities and the gradient of the logits are live together (measured: 2.95 copies).
    Code that keeps ``outputs.logits`` alive through backward needs a fourth. With a 32768
    vocabulary that is 384 KiB per token: at 2048 tokens, 0.75 GiB, most of a 7B decoder layer.
    """
    return 3 * tokens * shapes.vocab * 4


def chunked_loss_peak_bytes(shapes: MistralShapes, plan: Plan) -> int:
    """The chunked loss's peak (`mistral_fast.modeling.chunked_loss`): no batch×seq×vocab tensor at all.

    It keeps the gathered hidden states of the trained positions and, in the backward pass, their gradient
    (tokens × hidden each, in the activation width), plus one chunk of `chunk_rows` × vocab fp32 logits,
    recomputed in the backward pass and turned into their gradient in place (measured on CPU: one chunk,
    tests/test_memory.py's tekken case; 64 MiB at any vocabulary).
    """
    from mistral_fast.modeling.chunked_loss import chunk_rows

    hidden = 2 * plan.tokens * shapes.hidden * _activation_width(plan)
    return hidden + min(plan.tokens, chunk_rows(shapes.vocab)) * shapes.vocab * 4


def loss_peak_bytes(shapes: MistralShapes, plan: Plan) -> int:
    """The loss's transient peak for the plan's loss: chunked (the default) or plain (full logits)."""
    return chunked_loss_peak_bytes(shapes, plan) if plan.chunked_loss else logits_peak_bytes(shapes, plan.tokens)


def activation_terms(shapes: MistralShapes, plan: Plan) -> dict[str, int]:
    """Saved activations over all layers, and the transient peak on top of them.

    Without checkpointing every layer keeps its tensors until its backward; the transient is the
    loss's logits. With checkpointing only each layer's input is kept, and one layer's activations
    are recomputed at a time during backward, after the logits are freed: the transient is the
    larger of the two.
    """
    per_layer = activation_bytes_per_token_layer(shapes, plan) * plan.tokens
    final_norm = 3 * 4 * shapes.hidden * plan.tokens  # the final RMSNorm's fp32 input, product, output
    # SFT: our chunked loss (or the plain one); DPO: TRL's fused head on the answers only; ORPO: a plain forward
    sft = plan.objective == "sft"
    logits = loss_peak_bytes(shapes, plan) if sft else logits_peak_bytes(shapes, plan.scored_tokens)
    if plan.gradient_checkpointing:
        saved = shapes.layers * _residual_width(plan) * shapes.hidden * plan.tokens + final_norm
        terms = {"activations (saved)": saved, "activations (transient peak)": max(logits, per_layer)}
    else:
        terms = {"activations (saved)": shapes.layers * per_layer + final_norm, "activations (transient peak)": logits}
    if plan.objective == "dpo" or plan.kl_reference:
        transient = terms["activations (transient peak)"]
        terms["reference pass (no gradients)"] = reference_pass_bytes(shapes, plan, transient)
    if plan.objective == "grpo":
        terms["group generation (above the step)"] = max(0, generation_bytes(shapes, plan) - sum(terms.values()))
    return terms


def generation_bytes(shapes: MistralShapes, plan: Plan) -> int:
    """GRPO's sampling of the group before the step: every completion of a generation batch at once, no gradients.

    ``generate`` keeps a KV cache (keys and values, every layer) for batch x accumulation sequences of up to
    ``seq_len`` tokens, and one step's fp32 logits per sequence. It runs before the training forward, so only
    the part above the step's own activations adds to the peak (`activation_terms`).
    """
    sequences = plan.batch_size * plan.accumulation
    kv = 2 * shapes.layers * shapes.kv_heads * shapes.head_dim * _DTYPE_BYTES[plan.compute_dtype]
    return sequences * (plan.seq_len * kv + shapes.vocab * 4)


def reference_pass_bytes(shapes: MistralShapes, plan: Plan, transient: int) -> int:
    """What DPO's reference forward adds to the peak: the same 2·batch sequences with the adapter off, no grad.

    It runs after the policy's forward, while the policy's saved activations (and the saved fp32
    log-softmax of its scored positions, one logits-sized copy) are alive. Without gradients it keeps
    nothing: one layer's forward working set at a time, then its own logits and log-softmax (two
    copies). Only the part above the step's other transient (the backward's logits peak) is added.
    """
    logits_copy = shapes.vocab * plan.scored_tokens * 4
    one_layer = activation_bytes_per_token_layer(shapes, plan) * plan.tokens
    return max(0, max(one_layer, 2 * logits_copy) + logits_copy - transient)


def workspace_bytes(shapes: MistralShapes, plan: Plan, dynamic: int) -> int:
    """CUDA context, the largest dequantised 4-bit weight, and allocator fragmentation (GPU only).

    bitsandbytes dequantises each 4-bit weight to the compute dtype for its matmul, so one copy of
    the largest linear is live at a time, and torch's caching allocator keeps it reserved. On CPU
    there is no context or caching allocator, and the dequantised weight lives only inside a matmul,
    after the loss's peak has passed (measured: counting it made every CPU estimate high): 0.
    """
    if not plan.on_gpu:
        return 0
    biggest = max(a * b for a, b in shapes.linear_dims().values())
    dequant = biggest * _activation_width(plan) if plan.method == "qlora" else 0
    return CUDA_CONTEXT_BYTES + dequant + int(FRAGMENTATION * dynamic)


def _shard(breakdown: dict[str, int], shapes: MistralShapes, plan: Plan) -> None:
    """FSDP + QLoRA (configs/accelerate/fsdp_qlora*.yaml, FULL_SHARD, one unit per decoder layer).

    Each device holds 1/world_size of the weights (the non-4-bit ones in the compute dtype: under FSDP
    nothing is cast to fp32, flat parameters need one dtype), adapters, gradients and optimizer state, plus
    the unsharded parameters of the units being computed: the current one and the one prefetched
    (BACKWARD_PRE), each the larger of a decoder layer and the root unit (embeddings, lm_head, final norm).
    Activations are left at the single-device figure (an upper bound: without k-bit preparation the
    residual stream is in the compute dtype rather than fp32).
    """
    width = _DTYPE_BYTES[plan.compute_dtype]
    other = shapes.embedding_params + shapes.norm_params + shapes.router_params
    weights = breakdown["weights"] - other * 4 + other * width
    root = (shapes.embedding_params + shapes.hidden) * width
    layer = (weights - root) / shapes.layers
    ws = plan.world_size
    for key in list(breakdown):
        breakdown[key] = int((weights if key == "weights" else breakdown[key]) / ws)
    breakdown["FSDP all-gathered units (2)"] = int(2 * max(layer, root))


def estimate_plan(shapes: MistralShapes, plan: Plan) -> MemoryEstimate:
    """The estimate for one fully specified plan (no device comparison)."""
    trainable = trainable_parameters(shapes, plan)
    weights = weight_bytes(shapes, plan)
    # full fine-tuning has no adapters: 0, so side-by-side tables line up
    breakdown = {"weights": weights, "LoRA weights (fp32)": 0 if plan.method == "full" else trainable * 4}
    breakdown["gradients (fp32)"] = trainable * 4
    breakdown[f"optimizer ({plan.optimizer})"] = int(trainable * optimizer_state_bytes(plan.optimizer))
    if plan.objective == "dpo" and plan.method == "full":  # no adapter to switch off: TRL loads a second model
        breakdown["reference model (a copy)"] = weights
    if plan.fsdp and plan.world_size > 1:
        _shard(breakdown, shapes, plan)
    breakdown.update(activation_terms(shapes, plan))
    dynamic = sum(v for k, v in breakdown.items() if k.startswith(("activations", "reference")))
    breakdown["workspace"] = workspace_bytes(shapes, plan, dynamic)
    details = {
        "total_params": shapes.total_params,
        "trainable_params": trainable,
        "lora_params": lora_parameters(shapes, plan.targets, plan.rank) if plan.method != "full" else 0,
        "activation_bytes_per_token_layer": activation_bytes_per_token_layer(shapes, plan),
        "logits_bytes_per_token": logits_peak_bytes(shapes, 1),
        "loss_peak_bytes": loss_peak_bytes(shapes, plan),
        # weights, adapters, gradients and optimizer state per base parameter: the "16 bytes" of full AdamW
        "bytes_per_param_static": sum(list(breakdown.values())[:4]) / shapes.total_params,
    }
    return MemoryEstimate(method=plan.method, plan=plan, breakdown=breakdown, details=details)


# ---------------------------------------------------------------------------------------------
# From a RunConfig
# ---------------------------------------------------------------------------------------------


def model_config_for(cfg: RunConfig) -> dict[str, Any]:
    """config.json of the run's model: a local directory, ``tiny``, or a known Mistral-7B hub name.

    The known 7B shapes are built in, so an estimate for ``mistralai/Mistral-7B-v0.3`` needs no hub.
    """
    name = cfg.model.name_or_path
    known = known_config(name)
    if known is not None and not os.path.isdir(name):
        return known
    from mistral_fast.modeling import read_model_config, resolve_model_path

    return read_model_config(resolve_model_path(name))


def plan_from_config(
    cfg: RunConfig,
    *,
    method: str | None = None,
    gpu: str | float | None = None,
    on_gpu: bool = True,
    compute_dtype: str | None = None,
    world_size: int = 1,
    chunked_loss: bool | None = None,
) -> Plan:
    """The `Plan` a run config describes; ``auto`` choices resolved as the trainer resolves them.

    ``compute_dtype: auto`` is fp16 on a T4 and bf16 on the other GPUs (give `compute_dtype` for a
    CPU, where it depends on the processor). ``optimizer: auto`` is paged 8-bit AdamW on a GPU and
    torch's AdamW on CPU. The sequence length is ``model.max_seq_length``: the collator pads a batch
    to its longest example, so that is the worst case. DPO and ORPO (``train.method``) run each pair
    as two sequences (chosen and rejected) in one forward; DPO adds its reference pass.
    """
    if method is None:
        method = "qlora" if cfg.model.load_in_4bit else "lora"
    if method not in METHODS:
        raise ConfigError(f"method={method!r}: use one of {list(METHODS)}")
    dtype = compute_dtype or cfg.model.compute_dtype
    if dtype == "auto":
        name = gpu_capacity(gpu)[0].lower() if gpu is not None else ""
        dtype = auto_compute_dtype(cuda_capability=_OLD_GPU_CAPABILITY.get(name, BF16_CAPABILITY))[0]
    optimizer = resolve_optimizer(cfg.train.optimizer, on_cuda=on_gpu)
    t = cfg.train
    return Plan(
        method=method,
        batch_size=cfg.train.per_device_batch_size,
        seq_len=cfg.model.max_seq_length,
        accumulation=cfg.train.gradient_accumulation_steps,
        gradient_checkpointing=cfg.train.gradient_checkpointing,
        compute_dtype=dtype,
        optimizer=optimizer,
        rank=cfg.lora.rank,
        targets=tuple(cfg.lora.target_modules),
        dropout=cfg.lora.dropout,
        double_quant=cfg.model.double_quant,
        on_gpu=on_gpu,
        world_size=world_size,
        objective=cfg.train.method,
        answer_len={"dpo": t.max_answer_length, "grpo": t.max_completion_length}.get(t.method, 0),
        kl_reference=cfg.train.method == "grpo" and cfg.train.beta > 0,
        chunked_loss=on_gpu if chunked_loss is None else chunked_loss,  # estimate_memory resolves it by vocabulary
    )


def estimate_memory(
    cfg: RunConfig,
    *,
    model_config: dict[str, Any] | None = None,
    gpu: str | float | None = None,
    world_size: int = 1,
    method: str | None = None,
    on_gpu: bool = True,
    compute_dtype: str | None = None,
    fsdp: bool = False,
    chunked_loss: bool | None = None,
) -> MemoryEstimate:
    """Estimate the per-device peak memory of training `cfg`, and compare it with a GPU.

    Args:
        cfg: the run config (model, LoRA, batch, sequence length, checkpointing, optimizer).
        model_config: the model's config.json as a dict; read from ``cfg.model.name_or_path`` if None.
        gpu: ``"t4"``, ``"l4"``, ``"a10"``, ``"a100-40gb"``, ``"a100-80gb"``, ``"h100"``, ``"h200"``
            or a size in GiB; None: no verdict.
        world_size: data-parallel processes (each holds a full copy; only the effective batch changes).
        method: ``"full"``, ``"lora"`` or ``"qlora"``; None: from ``model.load_in_4bit``.
        on_gpu: False for a CPU run (no CUDA context; ``optimizer: auto`` is then adamw_torch).
        compute_dtype: overrides ``model.compute_dtype`` (pass the one resolved on a CPU).
        fsdp: FSDP + QLoRA over ``world_size`` devices: the static memory is sharded (`_shard`).
        chunked_loss: the loss is computed in chunks of tokens; False for transformers' plain loss over the full
            fp32 logits; None: what training does (`policies.uses_chunked_loss`: on a GPU, or a large vocabulary).

    Returns:
        A `MemoryEstimate`; with a `gpu`, its ``fits`` and ``suggestion`` are filled in.

    Raises:
        ConfigError: an unknown GPU, method or LoRA target.
    """
    shapes = MistralShapes.from_config(model_config or model_config_for(cfg))
    if chunked_loss is None:
        chunked_loss = uses_chunked_loss(vocab_size=shapes.vocab, on_cuda=on_gpu)
    plan = plan_from_config(
        cfg,
        method=method,
        gpu=gpu,
        on_gpu=on_gpu,
        compute_dtype=compute_dtype,
        world_size=world_size,
        chunked_loss=chunked_loss,
    )
    if fsdp:
        plan = replace(plan, fsdp=True)
    estimate = estimate_plan(shapes, plan)
    if gpu is not None:
        estimate.device, estimate.capacity = gpu_capacity(gpu)
        estimate.suggested, estimate.suggestion = suggest(shapes, plan, estimate.capacity)
    return estimate


def compare_methods(
    cfg: RunConfig,
    *,
    model_config: dict[str, Any] | None = None,
    gpu: str | float | None = None,
    world_size: int = 1,
) -> dict[str, MemoryEstimate]:
    """Full fine-tuning, LoRA on a 16-bit base and QLoRA for the same batch, sequence and optimizer."""
    config = model_config or model_config_for(cfg)
    return {m: estimate_memory(cfg, model_config=config, gpu=gpu, world_size=world_size, method=m) for m in METHODS}


def comparison_table(estimates: dict[str, MemoryEstimate]) -> str:
    """Side-by-side Markdown table (GiB) of `compare_methods`' estimates."""
    names = list(estimates)
    rows = list(dict.fromkeys(k for e in estimates.values() for k in e.breakdown))
    lines = ["| component | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
    for row in rows:
        cells = [f"{e.breakdown[row] / GiB:.2f}" if row in e.breakdown else "—" for e in estimates.values()]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines.append("| **total** | " + " | ".join(f"**{e.total / GiB:.2f}**" for e in estimates.values()) + " |")
    if any(e.capacity is not None for e in estimates.values()):
        lines.append("| fits | " + " | ".join("yes" if e.fits else "no" for e in estimates.values()) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# What fits
# ---------------------------------------------------------------------------------------------

_MAX_BATCH = 1024


def _largest(fits: Callable[[int], bool], low: int, high: int, step: int = 1) -> int:
    """Largest multiple of `step` in [low, high] for which the monotone predicate `fits` holds, else 0."""
    lo, hi = low // step, high // step
    if lo > hi or not fits(lo * step):
        return 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid * step) else (lo, mid - 1)
    return lo * step


def largest_batch(shapes: MistralShapes, plan: Plan, capacity: int, *, at_most: int = _MAX_BATCH) -> int:
    """The largest per-device batch (≤ `at_most`) at the plan's sequence length that fits; 0 if none."""
    return _largest(lambda b: estimate_plan(shapes, replace(plan, batch_size=b)).total <= capacity, 1, at_most)


def _split(fit_batch: int, examples: int) -> tuple[int, int]:
    """A per-device batch ≤ `fit_batch` and an accumulation that keep `examples` per optimizer step.

    A divisor of `examples` no smaller than half the fitting batch keeps the effective batch exact;
    otherwise the fitting batch with the accumulation rounded up (the effective batch grows a little).
    """
    cap = min(fit_batch, examples)
    divisor = next(b for b in range(cap, 0, -1) if examples % b == 0)
    batch = divisor if 2 * divisor >= cap else cap
    return batch, math.ceil(examples / batch)


def suggest_plan(shapes: MistralShapes, plan: Plan, capacity: int) -> Plan | None:
    """The largest plan that fits, keeping the effective batch: batch, then checkpointing, then sequence.

    Keeps the sequence length and shrinks the per-device batch (accumulation grows so the effective
    batch stays); if batch 1 does not fit, turns gradient checkpointing on; if that is not enough,
    shortens the sequence (multiples of 64) at batch 1. When the plan already fits, the largest batch
    at its sequence length that keeps the effective batch. None when not even one 64-token sequence
    fits (the weights are too big).
    """
    examples = plan.batch_size * plan.accumulation
    if estimate_plan(shapes, plan).total <= capacity:
        batch, accumulation = _split(largest_batch(shapes, plan, capacity), examples)
        return replace(plan, batch_size=max(batch, plan.batch_size), accumulation=accumulation)
    for checkpointing in dict.fromkeys((plan.gradient_checkpointing, True)):
        base = replace(plan, gradient_checkpointing=checkpointing)
        fit = largest_batch(shapes, base, capacity, at_most=plan.batch_size)
        if fit:
            batch, accumulation = _split(fit, examples)
            return replace(base, batch_size=batch, accumulation=accumulation)
    base = replace(plan, gradient_checkpointing=True, batch_size=1, accumulation=examples)
    seq = _largest(lambda s: estimate_plan(shapes, replace(base, seq_len=s)).total <= capacity, 64, plan.seq_len, 64)
    return replace(base, seq_len=seq) if seq else None


def suggest(shapes: MistralShapes, plan: Plan, capacity: int) -> tuple[Plan | None, str]:
    """`suggest_plan` and a sentence saying what to set."""
    best = suggest_plan(shapes, plan, capacity)
    if best is None:
        static = estimate_plan(shapes, replace(plan, batch_size=1, seq_len=64, gradient_checkpointing=True))
        hint = "use QLoRA (model.load_in_4bit=true)" if plan.method != "qlora" else "use a larger GPU"
        return None, (
            f"even one 64-token sequence needs {static.total / GiB:.1f} GiB (weights, adapters and optimizer "
            f"state alone): {hint}"
        )
    settings = f"train.per_device_batch_size={best.batch_size} train.gradient_accumulation_steps={best.accumulation}"
    if best.seq_len != plan.seq_len:
        settings += f" model.max_seq_length={best.seq_len}"
    if best.gradient_checkpointing != plan.gradient_checkpointing:
        settings += " train.gradient_checkpointing=true"
    used = f"{estimate_plan(shapes, best).total / GiB:.1f} GiB of {capacity / GiB:.1f}"
    kept = f"effective batch {best.effective_batch}, was {plan.effective_batch}"
    if estimate_plan(shapes, plan).total > capacity:
        return best, f"suggested: {settings} ({used}; {kept})"
    most = largest_batch(shapes, plan, capacity)
    return best, (
        f"fits; the largest per-device batch at model.max_seq_length={plan.seq_len} is {most}; "
        f"keeping the effective batch: {settings} ({used}; {kept})"
    )


def check_fits(
    cfg: RunConfig,
    gpu: str | float,
    *,
    model_config: dict[str, Any] | None = None,
    world_size: int = 1,
    device_name: str | None = None,
) -> MemoryEstimate:
    """Raise before any weight loads when the run will not fit `gpu`; return the estimate when it does.

    Args:
        cfg: the run config.
        gpu: a GPU name or size in GiB (see `gpu_capacity`).
        model_config: config.json as a dict; read from ``cfg.model.name_or_path`` if None.
        world_size: data-parallel processes.
        device_name: how to name the device in messages (e.g. torch's name for the CUDA device).

    Raises:
        ConfigError: the estimate exceeds the GPU; the message has the breakdown and the suggestion.
    """
    estimate = estimate_memory(cfg, model_config=model_config, gpu=gpu, world_size=world_size)
    estimate.device = device_name or estimate.device
    if not estimate.fits:
        parts = ", ".join(f"{k} {v / GiB:.2f}" for k, v in estimate.breakdown.items())
        raise ConfigError(
            f"this run needs about {estimate.total / GiB:.1f} GiB per device but {estimate.device} has "
            f"{estimate.capacity / GiB:.1f} GiB (GiB: {parts}); {estimate.suggestion}"
        )
    return estimate


def preflight(cfg: RunConfig, *, gpu: str | float | None = None) -> MemoryEstimate:
    """The memory check at the start of training, before any weight is loaded.

    * A GPU given, or CUDA present (its total memory, this process's device): `check_fits`, which
      raises with the numbers and a suggestion when the run will not fit.
    * CPU only: the estimate (compute dtype as resolved on this CPU) is compared with the RAM the
      kernel reports available; a shortfall is logged as a warning, not raised — the kernel may
      reclaim caches or swap, and CPU runs are tests and demos, not jobs worth refusing.

    Returns:
        The estimate (its ``device`` says what it was compared with).

    Raises:
        ConfigError: on a GPU, when the estimate exceeds its memory.
    """
    import logging

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if gpu is not None:
        return check_fits(cfg, gpu, world_size=world_size)
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", "0")))
        return check_fits(cfg, props.total_memory / GiB, world_size=world_size, device_name=props.name)
    estimate = cpu_estimate(cfg, world_size=world_size)
    if estimate.fits is False:
        logging.getLogger("mistral_fast").warning(
            "this run needs about %.1f GiB of RAM but %.1f GiB is available: it may be killed (OOM)",
            estimate.total / GiB,
            estimate.capacity / GiB,
        )
    return estimate


def cpu_estimate(
    cfg: RunConfig, *, world_size: int = 1, model_config: dict[str, Any] | None = None
) -> MemoryEstimate:
    """The estimate of training `cfg` on this machine's CPU, compared with the RAM the kernel reports available.

    The compute dtype is the one training resolves on this CPU (bf16 where it is native, else fp32) and the
    optimizer a CPU run's, so the figure is that of the run that would start here.
    """
    from mistral_fast.modeling import resolve_compute_dtype

    dtype = str(resolve_compute_dtype(cfg.model.compute_dtype)[0]).removeprefix("torch.")
    estimate = estimate_memory(cfg, model_config=model_config, on_gpu=False, compute_dtype=dtype, world_size=world_size)
    available = available_ram()
    if available is not None:
        estimate.device, estimate.capacity = CPU_RAM, available
    return estimate


def available_ram() -> int | None:
    """``MemAvailable`` from /proc/meminfo in bytes (None where there is no such file)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def memory_report(
    cfg: RunConfig,
    *,
    gpu: str | float | None = None,
    world_size: int = 1,
    model_config: dict[str, Any] | None = None,
    here: bool = False,
) -> str:
    """Markdown for the CLI and notebooks: the run's own breakdown, then the three methods side by side.

    Args:
        cfg: the run config.
        gpu: the card to check against (a name or GiB, see `gpu_capacity`); None: no verdict.
        world_size: data-parallel processes.
        model_config: the model's config.json as a dict; read from ``cfg.model.name_or_path`` if None.
        here: the notebooks' pre-flight, about a run on this machine. Without CUDA here a run trains on the
            CPU, so its estimate is the CPU run's against this machine's RAM, and the report says that `gpu`
            was not checked (a verdict "fits on A100-80GB" on a laptop answered a question nobody asked).
            With CUDA, or ``here=False`` (`mistral-fast memory`: planning for a card), `gpu` is the check.
    """
    config = model_config or model_config_for(cfg)
    if here and not _cuda_available():
        own = cpu_estimate(cfg, world_size=world_size, model_config=config)
        note = "No GPU on this machine, so a run here trains on the CPU: the estimate above is for that run."
        if gpu is not None:
            note += f" gpu={gpu!r} was not checked: run this on that card, or `mistral-fast memory CONFIG --gpu {gpu}`."
        methods = compare_methods(cfg, model_config=config, world_size=world_size)  # no card: no verdict
        head = [own.table(), "", note]
    else:
        own = estimate_memory(cfg, model_config=config, gpu=gpu, world_size=world_size)
        methods = compare_methods(cfg, model_config=config, gpu=gpu, world_size=world_size)
        head = [own.table()]
    return "\n".join(
        [*head, "", "Full fine-tuning, LoRA (16-bit base) and QLoRA, same batch:", "", comparison_table(methods)]
    )


def _cuda_available() -> bool:
    """Whether this process sees a CUDA GPU (imports torch: only the `here` report, which precedes a run, asks)."""
    import torch

    return torch.cuda.is_available()
