"""Mixture-of-experts surgery: Mixtral's fused experts stored as real NF4, one `Linear4bit` per matrix.

transformers 5 keeps Mixtral's experts as two fused 3-D parameters per layer
(``mlp.experts.gate_up_proj`` ``[E, 2·I, H]`` and ``mlp.experts.down_proj`` ``[E, H, I]``), and its
bitsandbytes integration quantises only ``nn.Linear`` modules: loaded "in 4-bit", the experts (~45 B of
Mixtral-8x7B's 46.7 B parameters) stay 16-bit. `quantize_experts` replaces each fused module by
``_NF4Experts``: per expert three bitsandbytes ``Linear4bit`` (NF4, double quantisation, block 64), computing
exactly what the fused module computes. They are named as a dense Mistral MLP's (``gate_proj``, ``up_proj``,
``down_proj``; ``w1``, ``w3``, ``w2`` in Mixtral checkpoints), not ``w1``-``w3``: peft 0.21 rewrites those
target names on a transformers-5 Mixtral into LoRA on the fused 16-bit parameters. LoRA then attaches to
them as to any 4-bit linear layer (peft's ``lora.Linear4bit``), each expert has its own adapter, and the
saved adapter's module paths map one to one onto the checkpoint's ``block_sparse_moe.experts.{e}.w{1,2,3}``
tensors (`CHECKPOINT_NAMES`), which the streamed merge and llama.cpp read.

Loading builds that layout directly: `load_nf4_experts` runs transformers' ``from_pretrained`` on
`streamed_mixtral_class`, whose experts are per-expert linears from construction, so bitsandbytes quantises
each expert matrix as the checkpoint is read and no layer's fused 16-bit experts ever exist.
`quantize_experts` converts a model that has them (a checkpoint that stores its experts fused).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from mistral_fast.constants import NF4_BLOCK

if TYPE_CHECKING:
    import torch

# One expert's linear layers in our 4-bit model, and their names in Mixtral checkpoints.
EXPERT_LINEARS: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
CHECKPOINT_NAMES: dict[str, str] = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def _experts_class() -> type:
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    return MixtralExperts


def is_moe_model(model: Any) -> bool:
    """True when the model has fused Mixtral experts or our NF4 replacement of them."""
    kinds = (_experts_class(), _nf4_experts_class())
    return any(isinstance(m, kinds) for m in model.modules())


def _nf4_linear(weight: torch.Tensor, *, compute_dtype: torch.dtype, quant: dict[str, Any]) -> Any:
    """A bias-free `Linear4bit` holding `weight` quantised (on the weight's own device)."""
    import bitsandbytes as bnb

    out_features, in_features = weight.shape
    layer = bnb.nn.Linear4bit(
        in_features,
        out_features,
        bias=False,
        compute_dtype=compute_dtype,
        compress_statistics=quant.get("double_quant", True),
        quant_type=quant.get("quant_type", "nf4"),
        quant_storage=quant.get("quant_storage", _uint8()),
        device="meta",
    )
    layer.weight = bnb.nn.Params4bit(
        weight.detach().contiguous(),
        requires_grad=False,
        blocksize=NF4_BLOCK,
        compress_statistics=quant.get("double_quant", True),
        quant_type=quant.get("quant_type", "nf4"),
        quant_storage=quant.get("quant_storage", _uint8()),
        module=layer,
    )
    return layer.to(weight.device)  # Params4bit quantises on its first move (bitsandbytes' own path)


def _uint8() -> Any:
    import torch

    return torch.uint8


def _expert_module(gate: Any, up: Any, down: Any) -> Any:
    import torch

    expert = torch.nn.Module()
    expert.gate_proj, expert.up_proj, expert.down_proj = gate, up, down
    return expert


_CLASS: list[type] = []


def _nf4_experts_class() -> type:
    if _CLASS:
        return _CLASS[0]
    import torch

    class _NF4Experts(torch.nn.ModuleList):
        """Mixtral's experts as ``[e].gate_proj / up_proj / down_proj`` 4-bit linears; forward = `MixtralExperts`'s.

        A ModuleList, so module paths are ``mlp.experts.{e}.gate_proj``: the checkpoint's
        ``block_sparse_moe.experts.{e}.w1`` with the layer renamed as transformers renames it.

        Attributes:
            num_experts: E.
            act_fn: the activation of the fused module it replaces (SiLU).
        """

        def __init__(self, experts: list[Any], act_fn: Any) -> None:
            super().__init__(experts)
            self.num_experts = len(experts)
            # Not registered as a child: a ModuleList's length and indices must be the experts only.
            object.__setattr__(self, "act_fn", act_fn)

        def forward(
            self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
        ) -> torch.Tensor:
            # Same routing arithmetic as transformers' MixtralExperts (eager path): tokens grouped by
            # expert, each expert's SwiGLU output scaled by its router weight and summed in place.
            final = torch.zeros_like(hidden_states)
            with torch.no_grad():
                mask = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)
                hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
            for row in hit:
                e = int(row[0])
                top_k_pos, token_idx = torch.where(mask[e])
                state = hidden_states[token_idx]
                expert = self[e]
                out = expert.down_proj(self.act_fn(expert.gate_proj(state)) * expert.up_proj(state))
                out = out * top_k_weights[token_idx, top_k_pos, None]
                final.index_add_(0, token_idx, out.to(final.dtype))
            return final

    # Not a subclass of MixtralExperts on purpose: transformers' experts-implementation dispatch and peft's
    # target_parameters both key on that class and would reach for the fused parameters that are gone.
    _CLASS.append(_NF4Experts)
    return _NF4Experts


def quantize_experts(model: Any, *, compute_dtype: torch.dtype, quant: dict[str, Any] | None = None) -> int:
    """Replace every fused `MixtralExperts` of `model` by NF4 per-expert linears, layer by layer.

    Each layer's 16-bit fused tensors are released as soon as its experts are quantised, but the model
    already held every layer's (loading put them there): `load_nf4_experts` avoids that for checkpoints in
    Mixtral's per-expert layout and gives the same model. This remains the path for a model loaded with
    fused experts.

    Args:
        model: a transformers Mixtral (any wrapper; modules are found by class).
        compute_dtype: dtype of the 4-bit matmuls (``bnb_4bit_compute_dtype``).
        quant: ``quant_type`` (``"nf4"``), ``double_quant`` (True), ``quant_storage`` (``torch.uint8``;
            the compute dtype under FSDP, which shards one float dtype).

    Returns:
        The number of expert matrices quantised (layers x experts x 3).
    """
    quant = quant or {}
    fused = _experts_class()
    cls = _nf4_experts_class()
    count = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, fused):
                continue
            inter = child.intermediate_dim
            experts = []
            for e in range(child.num_experts):
                gate_up, down = child.gate_up_proj[e], child.down_proj[e]
                # gate_up_proj's rows are [gate; up]: MixtralExperts chunks its output in two, gate first
                experts.append(
                    _expert_module(
                        _nf4_linear(gate_up[:inter], compute_dtype=compute_dtype, quant=quant),
                        _nf4_linear(gate_up[inter:], compute_dtype=compute_dtype, quant=quant),
                        _nf4_linear(down, compute_dtype=compute_dtype, quant=quant),
                    )
                )
                count += 3
            setattr(parent, child_name, cls(experts, child.act_fn))
            del child  # the fused 16-bit tensors go with the last reference
    return count


_STREAMED: list[type] = []


def _split_fused_experts(model: Any) -> None:
    """Replace every fused `MixtralExperts` by ``_NF4Experts`` of empty per-expert ``nn.Linear`` (same device).

    Called while the model is built, before any weight exists (on the meta device inside ``from_pretrained``):
    transformers' bitsandbytes integration then turns these ``nn.Linear`` into ``Linear4bit`` as it does
    attention's, and its loader quantises each expert matrix as it is read from the checkpoint.
    """
    import torch

    fused = _experts_class()
    cls = _nf4_experts_class()
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, fused):
                continue
            num, hidden, inter = child.num_experts, child.hidden_dim, child.intermediate_dim
            spec = {"bias": False, "device": child.down_proj.device, "dtype": child.down_proj.dtype}
            experts = [
                _expert_module(
                    torch.nn.Linear(hidden, inter, **spec),
                    torch.nn.Linear(hidden, inter, **spec),
                    torch.nn.Linear(inter, hidden, **spec),
                )
                for _ in range(num)
            ]
            setattr(parent, child_name, cls(experts, child.act_fn))


def expert_checkpoint_renamings() -> list[Any]:
    """transformers `WeightRenaming`s from Mixtral's checkpoint names onto ``_NF4Experts``'s module paths.

    ``block_sparse_moe.experts.{e}.w1/w3/w2.weight`` → ``mlp.experts.{e}.gate_proj/up_proj/down_proj.weight``
    (`CHECKPOINT_NAMES`) and the router ``block_sparse_moe.gate`` → ``mlp.gate``, as transformers' own
    Mixtral mapping renames it. One checkpoint tensor per module weight: no fusing converter, so the loader
    reads, quantises and places each expert matrix alone. Reversible, so ``save_pretrained`` writes the
    checkpoint's names back.
    """
    from transformers.core_model_loading import WeightRenaming

    renamings = [WeightRenaming(r"\.block_sparse_moe\.", ".mlp.")]
    for ours, theirs in CHECKPOINT_NAMES.items():
        renamings.append(WeightRenaming(rf"\.experts\.(\d+)\.{theirs}\.", rf".experts.\1.{ours}."))
    return renamings


def streamed_mixtral_class() -> type:
    """`MixtralForCausalLM` built with per-expert linears, for ``from_pretrained(..., quantization_config=4-bit)``.

    transformers 5 loads Mixtral's experts into two fused 16-bit parameters per layer, which bitsandbytes
    does not quantise: loading "in 4-bit" holds every layer's 16-bit experts on the load device (~87 GiB
    for 8x7B) before `quantize_experts` can shrink them. This subclass splits the experts into
    ``_NF4Experts`` of ``nn.Linear`` in ``__init__`` (on the meta device there), and registers
    `expert_checkpoint_renamings` as its checkpoint mapping (transformers looks mappings up by class name
    before ``model_type``). ``from_pretrained`` then goes through transformers' own machinery unchanged:
    ``replace_with_bnb_linear`` makes every expert linear a ``Linear4bit`` with the ``BitsAndBytesConfig``'s
    settings (quant type, double quantisation, ``quant_storage``), and the loader, which reads tensors one by
    one when it quantises on the fly, builds each expert's ``Params4bit`` on the load device straight from its
    checkpoint tensor. Peak memory is the 4-bit model plus one 16-bit matrix; the result equals
    from_pretrained + `quantize_experts` bit for bit.

    Only for checkpoints in Mixtral's per-expert layout (`CHECKPOINT_NAMES`), which every Mixtral on the hub
    uses and transformers' ``save_pretrained`` writes.
    """
    if _STREAMED:
        return _STREAMED[0]
    from transformers import MixtralForCausalLM
    from transformers.conversion_mapping import register_checkpoint_conversion_mapping

    class MixtralNF4ExpertsForCausalLM(MixtralForCausalLM):
        """transformers' Mixtral with its experts as ``_NF4Experts`` (per-expert linears) from construction."""

        def __init__(self, config: Any) -> None:
            super().__init__(config)
            _split_fused_experts(self)

    # The name ends in ForCausalLM: PreTrainedModel derives its loss_type from the class name.
    register_checkpoint_conversion_mapping(
        MixtralNF4ExpertsForCausalLM.__name__, expert_checkpoint_renamings(), overwrite=True
    )
    _STREAMED.append(MixtralNF4ExpertsForCausalLM)
    return MixtralNF4ExpertsForCausalLM


def load_nf4_experts(path: str, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
    """``from_pretrained`` through `streamed_mixtral_class`; the model is then a plain `MixtralForCausalLM`.

    The subclass only matters while the model is built and loaded. Afterwards the instance's class is set
    back to transformers' own, so it is the same object as the former path makes: ``type(model)``,
    ``save_pretrained``'s ``architectures`` and class-name lookups (peft, the Trainer) see
    ``MixtralForCausalLM``. Saving keeps working: transformers reverts the renamings the loader recorded on the
    instance (``_weight_conversions``), not the class's.

    Args:
        path: a Mixtral checkpoint in the per-expert layout (`has_per_expert_checkpoint`).
        **kwargs: ``from_pretrained`` arguments (``quantization_config``, ``dtype``, ``device_map``, …).

    Returns:
        The model and transformers' loading info (``missing_keys``, ``unexpected_keys``, …).
    """
    from transformers import MixtralForCausalLM

    model, info = streamed_mixtral_class().from_pretrained(path, output_loading_info=True, **kwargs)
    model.__class__ = MixtralForCausalLM  # the subclass adds no state: only __init__ differs
    return model, info


def has_per_expert_checkpoint(keys: Any) -> bool:
    """True when checkpoint tensor names are Mixtral's per-expert ones (``…experts.{e}.w1.weight``). Torch-free."""
    return any(_CHECKPOINT_EXPERT.search(key) for key in keys)


def expert_weight_bytes(model: Any) -> dict[str, int]:
    """Bytes held by expert weights: packed 4-bit data, quantisation state, and any 16/32-bit tensors.

    Returns:
        ``{"packed": …, "state": …, "dense": …, "params": …}``; ``params`` is the number of weights
        the experts represent (for bits-per-weight figures).
    """
    fused = _experts_class()
    cls = _nf4_experts_class()
    packed = state = dense = params = 0
    for module in model.modules():
        if isinstance(module, fused):
            for p in (module.gate_up_proj, module.down_proj):
                dense += p.numel() * p.element_size()
                params += p.numel()
        elif isinstance(module, cls):
            for expert in module:
                for name in EXPERT_LINEARS:
                    layer = getattr(expert, name)
                    layer = getattr(layer, "base_layer", layer)  # under a peft LoRA wrapper
                    w = layer.weight
                    packed += w.numel() * w.element_size()
                    params += layer.in_features * layer.out_features
                    qs = w.quant_state
                    state += qs.absmax.numel() * qs.absmax.element_size()
                    if qs.state2 is not None:  # double quantisation: 8-bit absmax + fp32 second-level constants
                        state += qs.state2.absmax.numel() * qs.state2.absmax.element_size()
                        state += qs.state2.code.numel() * qs.state2.code.element_size()
    return {"packed": packed, "state": state, "dense": dense, "params": params}


def checkpoint_weight_name(module_weight: str) -> str:
    """The checkpoint tensor behind one of our module weights (identity for everything but Mixtral experts).

    ``model.layers.3.mlp.experts.5.up_proj.weight`` → ``model.layers.3.block_sparse_moe.experts.5.w3.weight``
    (Mixtral's checkpoint layout, which transformers fuses on load and writes back on save). Torch-free.
    """
    match = _EXPERT_MODULE.search(module_weight)
    if match is None:
        return module_weight
    start, end = match.span()
    name = CHECKPOINT_NAMES[match["proj"]]
    return f"{module_weight[:start]}.block_sparse_moe.experts.{match['e']}.{name}.weight{module_weight[end:]}"


def is_router_weight(checkpoint_name: str) -> bool:
    """Mixtral's router (``block_sparse_moe.gate``): 2-D but never a 4-bit layer (not an ``nn.Linear``)."""
    return checkpoint_name.endswith((".block_sparse_moe.gate.weight", ".mlp.gate.weight"))


_CHECKPOINT_EXPERT = re.compile(r"\.experts\.\d+\.w[123]\.weight$")
_EXPERT_MODULE = re.compile(r"\.mlp\.experts\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")
