"""Mixtral (mixture of experts): family rows, experts really NF4, per-expert LoRA, router and its aux loss.

On the tiny local Mixtral (4 experts, top-2, real v1 tokenizer), real bitsandbytes 4-bit on CPU and real
peft. References are transformers' own fused `MixtralExperts` and `MixtralForCausalLM` loss, not our code.
This process never imports unsloth (the refusal is decided before any backend import).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import free_port, require_optional

from mistral_fast.config import RunConfig
from mistral_fast.errors import ModelError
from mistral_fast.families import family_for_model, family_named, known_config, tokenizer_version
from mistral_fast.modeling import load_model
from mistral_fast.modeling.moe import EXPERT_LINEARS, expert_weight_bytes
from mistral_fast.modeling.tiny import TINY_MIXTRAL_DEFAULTS, build_tiny_mixtral

E = TINY_MIXTRAL_DEFAULTS["num_experts"]
LAYERS = TINY_MIXTRAL_DEFAULTS["num_layers"]


@pytest.fixture(scope="session")
def mixtral_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_mixtral(tmp_path_factory.mktemp("models") / "tiny-mixtral")


def make_cfg(path: Path | str, **overrides: object) -> RunConfig:
    return RunConfig().with_overrides({"model.name_or_path": str(path), "model.tokenizer": "v1", **overrides})


def ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 32000, (batch, length), generator=gen)


def routed_counts(model: torch.nn.Module, tokens: torch.Tensor) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Per layer, how many tokens the router sent to each expert (from transformers' router itself), and a loss
    every position contributes to."""
    counts: dict[int, torch.Tensor] = {}
    hooks = []
    for name, module in model.named_modules():
        if type(module).__name__ == "MixtralTopKRouter":
            layer = int(name.split("layers.")[1].split(".")[0])

            def hook(_m, _inp, out, layer=layer):  # out = (logits, scores, indices)
                counts[layer] = torch.bincount(out[2].flatten(), minlength=E)

            hooks.append(module.register_forward_hook(hook))
    try:
        # logsumexp of every position's logits: every token (also the last) reaches the loss
        loss = model(input_ids=tokens).logits.float().logsumexp(-1).mean()
    finally:
        for h in hooks:
            h.remove()
    return counts, loss


# ------------------------------------------------------------------------------------ family rows


def test_family_rows_for_mixtral_8x7b_and_8x22b() -> None:
    small, large = family_named("mixtral-8x7b-v0.1"), family_named("mixtral-8x22b-v0.1")
    assert (small.architecture, small.tokenizer, small.vocab_size) == ("MixtralForCausalLM", "v1", 32000)
    assert (large.architecture, large.tokenizer, large.vocab_size) == ("MixtralForCausalLM", "v3", 32768)
    for row in (small, large):
        assert row.is_moe and (row.num_experts, row.experts_per_token) == (8, 2)
        assert row.gguf_arch == "llama" and row.model_type == "mixtral"
        assert set(row.expert_targets) == set(EXPERT_LINEARS) <= set(row.lora_targets["all-linear"])
        assert "gate" not in row.lora_targets["all-linear"]  # the router is never a LoRA target
    assert family_for_model("mistralai/Mixtral-8x7B-Instruct-v0.1") is small
    assert family_for_model("mistralai/Mixtral-8x22B-v0.1") is large
    # identified by config.json when the name is not a known one: architecture + vocabulary size
    assert family_for_model("/x", {"architectures": ["MixtralForCausalLM"], "vocab_size": 32768}) is large
    cfg = known_config("mistralai/Mixtral-8x7B-v0.1")
    assert cfg is not None and cfg["num_local_experts"] == 8 and cfg["intermediate_size"] == 14336
    assert family_named("mistral-7b-v0.3").is_moe is False


def test_tiny_mixtral_is_a_mixtral_8x7b_shape(mixtral_dir: Path) -> None:
    config = json.loads((mixtral_dir / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and config["model_type"] == "mixtral"
    assert config["num_local_experts"] == E and config["num_experts_per_tok"] == 2
    assert config["hidden_size"] % 64 == 0 and config["intermediate_size"] % 64 == 0
    assert family_for_model(str(mixtral_dir)) is family_named("mixtral-8x7b-v0.1")
    assert tokenizer_version(make_cfg(mixtral_dir, **{"model.tokenizer": "model"}).model) == "v1"
    from safetensors import safe_open

    with safe_open(str(mixtral_dir / "model.safetensors"), "pt") as f:  # Mixtral's own checkpoint layout
        keys = set(f.keys())
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in keys
    assert "model.layers.0.block_sparse_moe.gate.weight" in keys


# ------------------------------------------------------------------------------------ experts in NF4


@pytest.fixture(scope="module")
def loaded_eval(mixtral_dir: Path):
    return load_model(make_cfg(mixtral_dir, **{"model.compute_dtype": "bfloat16"}), for_training=False)


def test_every_expert_weight_is_nf4_double_quant_block_64(loaded_eval, mixtral_dir: Path) -> None:
    import bitsandbytes as bnb
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    model = loaded_eval.model
    assert not any(isinstance(m, MixtralExperts) for m in model.modules()), "a fused 16-bit expert is left"
    experts = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit) and ".experts." in n}
    assert len(experts) == LAYERS * E * 3
    for name, layer in experts.items():
        w = layer.weight
        assert w.dtype == torch.uint8 and w.quant_state.quant_type == "nf4", name
        assert w.quant_state.blocksize == 64 and w.quant_state.nested, name  # double quantisation
    size = expert_weight_bytes(model)
    h, i = TINY_MIXTRAL_DEFAULTS["hidden_size"], TINY_MIXTRAL_DEFAULTS["intermediate_size"]
    assert size["params"] == LAYERS * E * 3 * h * i
    assert size["dense"] == 0 and size["packed"] == size["params"] // 2  # 4 bits per weight
    # constants: 8-bit absmax per 64 weights + fp32 per 256 of those (double quant) ≈ 0.127 bit/weight
    bits = 8 * (size["packed"] + size["state"]) / size["params"]
    assert 4.0 < bits < 4.6, bits
    bf16_bytes = (mixtral_dir / "model.safetensors").stat().st_size
    assert size["packed"] + size["state"] < 0.3 * 2 * size["params"] < bf16_bytes


def test_nf4_experts_compute_what_the_fused_module_computes(loaded_eval, mixtral_dir: Path) -> None:
    """Against transformers' own fused experts: close to the bf16 original (NF4 rounding), and equal to
    within bf16 compute noise once the fused reference holds the dequantised weights."""
    import bitsandbytes.functional as F
    from transformers import AutoModelForCausalLM

    tokens = ids(4, 128, seed=123)
    reference = AutoModelForCausalLM.from_pretrained(mixtral_dir, dtype=torch.float32).eval()
    reference.set_experts_implementation("eager")
    with torch.no_grad():
        quantised = loaded_eval.model(input_ids=tokens).logits.float()
        original = reference(input_ids=tokens).logits.float()
        modules = dict(reference.named_modules())
        for name, module in loaded_eval.model.get_base_model().named_modules():
            if not hasattr(module, "weight") or not hasattr(module.weight, "quant_state"):
                continue
            deq = F.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
            name = name.removesuffix(".base_layer")
            if ".experts." in name:
                prefix, e, proj = name.rsplit(".", 2)
                fused, inter = modules[prefix], reference.config.intermediate_size
                if proj == "down_proj":
                    fused.down_proj[int(e)].copy_(deq)
                else:
                    rows = slice(0, inter) if proj == "gate_proj" else slice(inter, 2 * inter)
                    fused.gate_up_proj[int(e), rows].copy_(deq)
            else:
                modules[name].weight.copy_(deq)
        dequant_ref = reference(input_ids=tokens).logits.float()

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a - b).norm() / b.norm()).item()

    # measured: 0.137 and top-1 0.744 against bf16; 0.0142 against the dequantised fused reference (bf16 compute
    # vs fp32, plus the odd routing flip a near tie of router scores gives)
    assert rel(quantised, original) < 0.2  # NF4 rounding (random logits would be ~1.4)
    assert (quantised.argmax(-1) == original.argmax(-1)).float().mean() > 0.5
    assert rel(quantised, dequant_ref) < 0.03  # the same function


# ------------------------------------------------------------------------------------ LoRA on experts


@pytest.fixture(scope="module")
def loaded_train(mixtral_dir: Path):
    return load_model(make_cfg(mixtral_dir, **{"model.compute_dtype": "float32"}), for_training=True)


def _expert_lora(model: torch.nn.Module) -> dict[tuple[int, int, str], tuple[torch.nn.Parameter, torch.nn.Parameter]]:
    out = {}
    for name, module in model.named_modules():
        if ".experts." in name and hasattr(module, "lora_A") and name.rsplit(".", 1)[-1] in EXPERT_LINEARS:
            layer = int(name.split("layers.")[1].split(".")[0])
            e = int(name.rsplit(".", 2)[-2])
            pair = (module.lora_A["default"].weight, module.lora_B["default"].weight)
            out[(layer, e, name.rsplit(".", 1)[-1])] = pair
    return out


def test_every_routed_expert_gets_lora_gradient_and_unrouted_ones_none(loaded_train) -> None:
    model = loaded_train.model
    lora = _expert_lora(model)
    assert len(lora) == LAYERS * E * 3
    # Many tokens: every expert of every layer is routed some of them, so each one's LoRA must learn.
    model.zero_grad()
    counts, loss = routed_counts(model, ids(2, 64, seed=1))
    loss.backward()
    assert all((c > 0).all() for c in counts.values()), counts
    for (layer, e, proj), (_a, b) in lora.items():
        assert b.grad is not None and b.grad.abs().sum() > 0, f"layer {layer} expert {e} {proj}: no gradient"
    # One token: only its top-2 experts per layer see it; the others must get no gradient at all.
    model.zero_grad()
    counts, loss = routed_counts(model, ids(1, 1, seed=2))
    loss.backward()
    for (layer, e, proj), (_a, b) in lora.items():
        got = b.grad is not None and b.grad.abs().sum() > 0
        assert got == bool(counts[layer][e] > 0), f"layer {layer} expert {e} {proj}: routed {int(counts[layer][e])}"
    model.zero_grad()


def test_router_frozen_by_default_and_trainable_on_request(loaded_train, mixtral_dir: Path) -> None:
    routers = [p for n, p in loaded_train.model.named_parameters() if ".mlp.gate." in n]
    assert routers and not any(p.requires_grad for p in routers)
    trained = load_model(make_cfg(mixtral_dir, **{"lora.train_router": True}), for_training=True).model
    trainable = {n: p for n, p in trained.named_parameters() if p.requires_grad and ".mlp.gate." in n}
    assert len(trainable) == LAYERS, sorted(trainable)
    trained.zero_grad()
    trained(input_ids=ids(1, 32), labels=ids(1, 32)).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())


# ------------------------------------------------------------------------------------ router aux loss


def test_router_aux_loss_reaches_the_loss(loaded_train, mixtral_dir: Path) -> None:
    """transformers adds coef x load-balancing loss only with output_router_logits; training turns it on."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    model = loaded_train.model
    base = model.get_base_model()
    assert base.config.output_router_logits is True  # set for training (checkpoints ship it false)
    coef = json.loads((mixtral_dir / "config.json").read_text())["router_aux_loss_coef"]
    assert base.router_aux_loss_coef == coef == 0.02
    tokens = ids(2, 32, seed=3)
    with torch.no_grad():
        on = model(input_ids=tokens, labels=tokens)
        off = model(input_ids=tokens, labels=tokens, output_router_logits=False)
        aux = load_balancing_loss_func(on.router_logits, E, 2, None)  # transformers' own function, recomputed
    assert on.aux_loss is not None and off.aux_loss is None
    assert torch.isclose(on.aux_loss, aux)
    assert torch.isclose(on.loss, off.loss + coef * aux, rtol=0, atol=1e-6)
    assert (on.loss - off.loss).abs() > 1e-4  # not a vacuous equality


def test_router_aux_loss_off_by_config(mixtral_dir: Path) -> None:
    model = load_model(make_cfg(mixtral_dir, **{"train.router_aux_loss": False}), for_training=True).model
    assert model.get_base_model().config.output_router_logits is False
    evaluation = load_model(make_cfg(mixtral_dir), for_training=False).model
    assert evaluation.get_base_model().config.output_router_logits is False  # evaluation: plain loss


def test_unsloth_backend_is_refused_for_mixtral_before_importing_it(mixtral_dir: Path) -> None:
    import sys

    with pytest.raises(ModelError, match=r"model\.backend=unsloth: .*mixture-of-experts.*model\.backend=hf"):
        load_model(make_cfg(mixtral_dir, **{"model.backend": "unsloth"}))
    assert "unsloth" not in sys.modules


# ------------------------------------------------------------------------------------ exports keep every expert


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory: pytest.TempPathFactory, mixtral_dir: Path):
    """A Mixtral run directory as training leaves it, with a random non-zero B on every LoRA matrix (each
    expert's different), so a merge that dropped, swapped or mis-scaled any expert's update would show."""
    from test_export_merge import make_adapter_run

    run_dir = tmp_path_factory.mktemp("mixtral-run")
    loaded = make_adapter_run(run_dir, preset="mixtral-smoke", extra=(f"model.name_or_path={mixtral_dir}",))
    return run_dir, loaded


def test_merge_applies_each_experts_own_delta(adapter_run, mixtral_dir: Path, tmp_path: Path) -> None:
    import bitsandbytes.functional as bnbf
    from safetensors.torch import load_file

    from mistral_fast.export import merge_adapter
    from mistral_fast.modeling.moe import CHECKPOINT_NAMES

    run_dir, loaded = adapter_run
    merged = load_file(merge_adapter(run_dir, tmp_path / "merged") / "model.safetensors")
    base = load_file(mixtral_dir / "model.safetensors")
    assert set(merged) == set(base)
    scaling = loaded.model.peft_config["default"].lora_alpha / loaded.model.peft_config["default"].r
    lora = _expert_lora(loaded.model)
    modules = dict(loaded.model.named_modules())
    deltas = {}
    for (layer, e, proj), (a, b) in lora.items():
        module = modules[f"base_model.model.model.layers.{layer}.mlp.experts.{e}.{proj}"].base_layer
        dequantised = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
        key = f"model.layers.{layer}.block_sparse_moe.experts.{e}.{CHECKPOINT_NAMES[proj]}.weight"
        delta = (b.float() @ a.float()) * scaling
        deltas[key] = delta
        # what the trained model computes, rounded once to the checkpoint's bf16
        assert torch.equal(merged[key], (dequantised + delta).to(torch.bfloat16)), key
        assert not torch.equal(merged[key], base[key]), key
    # each expert got its own update and not a neighbour's: the merged weight's difference from its NF4 base
    # is closest to its own delta
    for layer in range(LAYERS):
        key = f"model.layers.{layer}.block_sparse_moe.experts.{{}}.w1.weight"
        for e in range(E):
            module = modules[f"base_model.model.model.layers.{layer}.mlp.experts.{e}.gate_proj"].base_layer
            diff = merged[key.format(e)].float() - bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state)
            errors = [(diff - deltas[key.format(other)]).norm().item() for other in range(E)]
            assert min(range(E), key=errors.__getitem__) == e, errors
        # the router is 16-bit in training and has no LoRA: copied bit for bit, no NF4 round trip
        gate = f"model.layers.{layer}.block_sparse_moe.gate.weight"
        assert torch.equal(merged[gate], base[gate])


def test_merged_mixtral_reproduces_adapter_logits(adapter_run, mixtral_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from mistral_fast.export import merge_adapter

    run_dir, loaded = adapter_run
    out = merge_adapter(run_dir, tmp_path / "merged")
    tokens = ids(2, 48, seed=4)
    with torch.no_grad():
        reference = loaded.model(input_ids=tokens).logits.float()
        got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)(input_ids=tokens).logits.float()
        base = AutoModelForCausalLM.from_pretrained(mixtral_dir, dtype=torch.bfloat16)(input_ids=tokens).logits.float()
    scale = reference.abs().max()
    # bf16 rounding of W + BA vs a separate LoRA matmul. Top-k routing is discontinuous: where a token's
    # 2nd and 3rd router scores nearly tie, that rounding can switch its expert, so a few positions differ
    # more; per position the logits agree to bf16 noise, and a dropped expert delta moves them far more.
    per_position = (got - reference).abs().amax(-1)
    agree = (per_position < 0.03 * scale).float().mean().item()
    rel = ((got - reference).norm() / reference.norm()).item()
    rel_base = ((base - reference).norm() / reference.norm()).item()
    assert agree >= 0.9 and rel < 0.06, (agree, rel)  # measured 97.9 %, 0.029
    assert rel_base > 5 * rel, (rel_base, rel)
    print(f"merged vs adapter logits: {agree:.1%} of positions within 3% of the range, relative error {rel:.4f}; "
          f"base vs adapter {rel_base:.4f}")


# ------------------------------------------------------------------------------------ GGUF: stacked experts


@pytest.fixture(scope="module")
def merged_mixtral(adapter_run, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mistral_fast.export import merge_adapter

    run_dir, _ = adapter_run
    return merge_adapter(run_dir, tmp_path_factory.mktemp("mixtral-merged") / "merged")


@pytest.mark.slow
@pytest.mark.parametrize("qtype", ["f16", "q8_0"])
def test_mixtral_gguf_equals_llama_cpp_converter(
    llama_cpp_source: Path, merged_mixtral: Path, tmp_path: Path, qtype: str
) -> None:
    """Stacked ffn_{gate,up,down}_exps + ffn_gate_inp, every tensor's bytes and every metadata key, as the converter."""
    require_optional("llama_cpp")
    from test_export_llama_cpp import assert_equals_converter

    reference, reference_kv, _ = assert_equals_converter(llama_cpp_source, merged_mixtral, tmp_path, qtype)
    h, i = TINY_MIXTRAL_DEFAULTS["hidden_size"], TINY_MIXTRAL_DEFAULTS["intermediate_size"]
    for layer in range(LAYERS):  # llama.cpp's stacked layout (GGUF shapes are innermost first)
        assert reference[f"blk.{layer}.ffn_gate_exps.weight"][1] == (h, i, E)
        assert reference[f"blk.{layer}.ffn_down_exps.weight"][1] == (i, h, E)
        assert reference[f"blk.{layer}.ffn_gate_inp.weight"][:2] == ("F32", (h, E))
    assert reference_kv["llama.expert_count"][0] == E and reference_kv["llama.expert_used_count"][0] == 2


@pytest.mark.slow
def test_llama_cpp_logits_equal_the_merged_mixtral(merged_mixtral: Path, tmp_path: Path) -> None:
    """llama.cpp runs our GGUF (f16) with its own MoE kernels: its logits equal transformers' on the merged model."""
    require_optional("llama_cpp")
    import numpy as np
    from transformers import AutoModelForCausalLM

    from mistral_fast.export import export_gguf
    from mistral_fast.export.report import gguf_side
    from mistral_fast.tokenizer import load_tokenizer

    gguf_path = export_gguf(merged_mixtral, tmp_path / "mixtral-f16.gguf", "f16")
    ids = load_tokenizer("v1")("Convert 3 miles to kilometres, please. The answer is").input_ids
    side = gguf_side(gguf_path, [ids], eos=2, max_new_tokens=4)
    model = AutoModelForCausalLM.from_pretrained(merged_mixtral, dtype=torch.float32).eval()
    with torch.no_grad():
        reference = model(torch.tensor([ids])).logits[0].numpy()
    error = np.abs(side.logits[0] - reference).max() / np.abs(reference).max()
    print(f"llama.cpp vs transformers logits on the merged Mixtral: max error {error:.5f} of the range")
    assert error < 0.003  # fp16 weights (exact from bf16) and llama.cpp's fp16/fp32 kernels
    assert (side.logits[0].argmax(-1) == reference.argmax(-1)).mean() >= 0.9


def test_one_pass_merge_to_gguf_equals_merge_then_convert(adapter_run, merged_mixtral: Path, tmp_path: Path) -> None:
    """export_merged_gguf merges each expert as it stacks it: the same bytes as merging first, then converting."""
    from mistral_fast.export import export_gguf
    from mistral_fast.export.gguf import export_merged_gguf

    run_dir, _ = adapter_run
    one_pass = export_merged_gguf(run_dir, tmp_path / "one-pass.gguf", "q8_0", name="merged")
    two_step = export_gguf(merged_mixtral, tmp_path / "two-step.gguf", "q8_0", name="merged")
    assert one_pass.read_bytes() == two_step.read_bytes()


# ------------------------------------------------------------------------------------ end to end


def _smoke(out: Path, *extra: str) -> RunConfig:
    from mistral_fast.config import load_config

    base = ["data.max_examples=24", "model.max_seq_length=128", "train.max_steps=4", "train.logging_steps=1"]
    return load_config("mixtral-smoke", [*base, f"train.output_dir={out}", *extra])


@pytest.mark.slow
def test_tiny_mixtral_trains_evaluates_and_exports_end_to_end(tmp_path: Path) -> None:
    from mistral_fast.pipeline import run

    exports = ("export.merged=true", "export.gguf=[q8_0]")
    cfg = _smoke(tmp_path / "run", "train.eval_steps=2", "train.save_steps=2", *exports)
    result = run(cfg)
    run_dir = Path(result.run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert len(train_rows) == 4 and all(r["aux_loss"] > 0 for r in train_rows)  # logged on its own, every step
    assert all("eval_aux_loss" in r for r in rows if "eval_loss" in r)
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]
    # the adapter holds every expert's LoRA, and the router has none
    from safetensors import safe_open

    with safe_open(str(run_dir / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert sum(".experts." in k for k in keys) == LAYERS * E * 3 * 2 and not any(".gate." in k for k in keys)
    report = json.loads((run_dir / "export" / "equivalence.json").read_text())
    merged = next(p for p in report["pairs"] if (p["reference"], p["other"]) == ("adapter", "merged"))
    assert merged["top1_agreement"] >= 0.9, merged  # measured 100 % (3 prompts x 16 tokens)
    assert (run_dir / "export" / "model-q8_0.gguf").is_file()


@pytest.mark.slow
def test_router_aux_loss_off_leaves_it_out_of_loss_and_metrics(tmp_path: Path) -> None:
    from mistral_fast.pipeline import run

    cfg = _smoke(tmp_path / "run", "train.router_aux_loss=false", "train.max_steps=2", "data.eval_fraction=0")
    rows = [json.loads(line) for line in (Path(run(cfg).run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert rows and not any("aux_loss" in r for r in rows)


# ------------------------------------------------------------------------------------ memory estimator


_MEASURE_MOE = """
import json, sys
sys.path.insert(0, sys.argv[6])
from rss_harness import measure_cpu_training
from mistral_fast.config import RunConfig
from mistral_fast.modeling.tiny import build_tiny_mixtral
path, sizes, overrides = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
batch, seq = map(int, sys.argv[4:6])
build_tiny_mixtral(path, **sizes)
cfg = RunConfig().with_overrides({"model.name_or_path": path, "model.tokenizer": "v1", **overrides})
print("RESULT", json.dumps(measure_cpu_training(cfg, batch_size=batch, seq_len=seq)))
"""
_SMALL_MOE = {"hidden_size": 512, "num_layers": 4, "intermediate_size": 1024, "num_heads": 8, "num_kv_heads": 2}
MOE_CASES = {
    "moe-512x4-e4-top2": (_SMALL_MOE, {"train.gradient_checkpointing": False}, 2, 256),
    "moe-512x4-e8-top2-checkpointing": (
        {**_SMALL_MOE, "num_experts": 8},
        {"train.gradient_checkpointing": True},
        2,
        256,
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(MOE_CASES))
def test_moe_estimate_matches_measured_cpu_peak(tmp_path: Path, case: str) -> None:
    """All experts resident in NF4, activations of the top-k experts per token, router logits: against peak RSS
    of real steps (tests/rss_harness.py, as tests/test_memory.py does for dense models; same tolerances)."""
    from rss_harness import estimate_measured, measure_in_fresh_process, step_estimate


    sizes, overrides, batch, seq = MOE_CASES[case]
    tests = Path(__file__).resolve().parent
    args = [str(tmp_path / "model"), json.dumps(sizes), json.dumps(overrides), str(batch), str(seq), str(tests)]
    measured = measure_in_fresh_process(["-c", _MEASURE_MOE, *args])
    cfg = RunConfig().with_overrides(
        {"model.name_or_path": str(tmp_path / "model"), "model.tokenizer": "v1", **overrides}
    )
    cfg = cfg.with_overrides({"model.max_seq_length": seq, "train.per_device_batch_size": batch})
    est = estimate_measured(cfg, measured)
    b = est.breakdown
    step = step_estimate(b)
    weights = b["weights"] + b["LoRA weights (fp32)"]
    mib = 2**20
    print(
        f"\n{case}: weights {measured['weights_exact'] / mib:.1f} MiB (est {weights / mib:.1f}), "
        f"step {measured['step_peak'] / mib:.1f} MiB (est {step / mib:.1f}, {measured['step_peak'] / step:.3f}), "
        f"total {measured['total_peak'] / mib:.1f} MiB (est {est.total / mib:.1f})"
    )
    assert measured["trainable_params"] == est.details["trainable_params"]  # every expert's LoRA, exactly
    assert measured["weights_exact"] == pytest.approx(weights, rel=0.01)  # all experts resident, NF4
    assert measured["step_peak"] == pytest.approx(step, rel=0.10), (measured, b)  # measured 1.013, 1.021
    assert step > 100 * 2**20
    # Not asserted: the total over the RSS before loading (measured 1.17 and 1.36 of the estimate). On CPU a
    # Mixtral's RSS grows ~24 MiB per step (dense: 0): each step routes a different number of tokens to each
    # expert, and oneDNN caches a primitive per matmul shape (ONEDNN_PRIMITIVE_CACHE_CAPACITY=0 cuts it to
    # ~7 MiB per step; the rest is not yet explained). A CPU artefact the GPU estimate does not model.


# ------------------------------------------------------------------------------------ scale-out


def test_fsdp_qlora_mixtral_config_wraps_mixtral_decoder_layers(monkeypatch, mixtral_dir: Path) -> None:
    """accelerate's own launcher and plugin read the config; its auto-wrap policy picks exactly the decoder layers."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from test_distributed import launch_env
    from transformers import AutoConfig, AutoModelForCausalLM

    _, env = launch_env("fsdp_qlora_mixtral", monkeypatch)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")  # as test_distributed: no GPU to ask here
    monkeypatch.setenv("FSDP_SYNC_MODULE_STATES", "false")
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.transformer_cls_names_to_wrap == ["MixtralDecoderLayer"]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(mixtral_dir))
    plugin.set_auto_wrap_policy(model)
    policy = plugin.auto_wrap_policy
    wrapped = [n for n, m in model.named_modules() if policy(module=m, recurse=False, nonwrapped_numel=0)]
    assert wrapped == [f"model.layers.{i}" for i in range(LAYERS)]


@pytest.mark.slow
def test_ddp_tiny_mixtral_two_cpu_processes_identical_adapters(tmp_path: Path) -> None:
    """Two torchrun ranks (gloo) train the tiny Mixtral; experts a rank's tokens never reach get no local
    gradient, DDP still all-reduces them, and both ranks end with the same adapter, every expert's included."""
    import os
    import re
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    sets = ["train.max_steps=2", "data.max_examples=16", "data.eval_fraction=0", "model.max_seq_length=128"]
    sets += ["train.gradient_accumulation_steps=2", "train.logging_steps=1", f"train.output_dir={run_dir}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "mistral_fast.cli"]
    cmd += ["train", "mixtral-smoke", *[x for s in sets for x in ("--set", s)]]
    port = str(free_port())  # from the OS: torchrun reads PET_MASTER_PORT (its --master-port), others MASTER_PORT
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": port, "PET_MASTER_PORT": port}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    digests = dict(re.findall(r"rank (\d)/2 adapter sha256 ([0-9a-f]{64})", proc.stderr))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"], proc.stderr[-3000:]
    result = json.loads((run_dir / "result.json").read_text())["train"]["extra"]
    assert result["world_size"] == 2 and result["adapter_sha256"] == digests["0"]
    from safetensors.torch import load_file

    adapter = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    moved = [k for k, v in adapter.items() if ".experts." in k and "lora_B" in k and v.abs().sum() > 0]
    assert len(moved) == LAYERS * E * 3  # every expert's B left zero: each was trained


def test_mixtral_8x7b_estimates_on_a100_80gb_and_two_24gb_with_fsdp() -> None:
    from mistral_fast.config import load_config
    from mistral_fast.memory import GiB, MistralShapes, estimate_memory, lora_parameters

    config = known_config("mistralai/Mixtral-8x7B-v0.1")
    shapes = MistralShapes.from_config(config)
    assert shapes.total_params == 46_702_792_704  # Mixtral-8x7B's published 46.7 B: all 8 experts resident
    attention = 4096 + 4096 + 4096 + 1024 + 4096 + 1024 + 4096 + 4096
    mlp = 3 * (4096 + 14336)
    assert lora_parameters(shapes, [*EXPERT_LINEARS, "q_proj", "k_proj", "v_proj", "o_proj"], 16) == (
        32 * 16 * (attention + 8 * mlp)
    )
    cfg = load_config(
        None,
        [
            "model.name_or_path=mistralai/Mixtral-8x7B-v0.1",
            "model.tokenizer=v1",
            "model.max_seq_length=2048",
            "train.per_device_batch_size=1",
            "train.gradient_checkpointing=true",
        ],
    )
    a100 = estimate_memory(cfg, model_config=config, gpu="a100-80gb")
    assert a100.fits and 22 * GiB < a100.breakdown["weights"] < 25 * GiB  # NF4 experts: not ~87 GiB of bf16
    one_24 = estimate_memory(cfg, model_config=config, gpu=24, world_size=2)
    assert not one_24.fits  # plain DDP: a whole copy on each 24 GB card
    fsdp = estimate_memory(cfg, model_config=config, gpu=24, world_size=2, fsdp=True)
    assert fsdp.fits and fsdp.breakdown["weights"] < a100.breakdown["weights"] / 2
    assert fsdp.breakdown["FSDP all-gathered units (2)"] > 0
    print(f"\n8x7B QLoRA seq 2048: A100-80GB {a100.total / GiB:.2f} GiB; 2 x 24 GB FSDP {fsdp.total / GiB:.2f} GiB/GPU")


def test_merge_equals_peft_merge_of_the_adapter_in_mixtrals_checkpoint_layout(
    adapter_run, mixtral_dir: Path, tmp_path: Path
) -> None:
    """An independent reference: the same LoRA tensors keyed as Mixtral checkpoints name experts
    (``block_sparse_moe.experts.{e}.w1``), which peft 0.21 maps onto transformers 5's fused experts, merged by
    peft's merge_and_unload on the 16-bit base: equal to our merge onto the original base within bf16 rounding
    (peft rounds the delta and the sum in bf16, ours adds in fp32 and rounds once), while every expert's
    weights moved by far more."""
    import re

    from peft import PeftModel
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from mistral_fast.export import merge_adapter
    from mistral_fast.modeling.moe import CHECKPOINT_NAMES

    run_dir, _ = adapter_run
    v4 = tmp_path / "adapter-checkpoint-layout"
    v4.mkdir()
    renamed = {}
    for key, tensor in load_file(str(run_dir / "adapter" / "adapter_model.safetensors")).items():
        m = re.search(r"\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.", key)
        if m:
            key = f"{key[: m.start()]}.block_sparse_moe.experts.{m[1]}.{CHECKPOINT_NAMES[m[2]]}.{key[m.end() :]}"
        renamed[key] = tensor
    save_file(renamed, str(v4 / "adapter_model.safetensors"))
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"]
    (v4 / "adapter_config.json").write_text(json.dumps(config))
    base = AutoModelForCausalLM.from_pretrained(mixtral_dir, dtype=torch.bfloat16)
    PeftModel.from_pretrained(base, str(v4)).merge_and_unload().save_pretrained(tmp_path / "peft")
    theirs = load_file(str(tmp_path / "peft" / "model.safetensors"))
    ours = load_file(str(merge_adapter(run_dir, tmp_path / "ours", base="original") / "model.safetensors"))
    original = load_file(str(mixtral_dir / "model.safetensors"))
    assert set(theirs) == set(ours)
    experts = [k for k in ours if ".experts." in k]
    assert len(experts) == LAYERS * E * 3
    worst = 0.0
    for key, tensor in ours.items():
        a, b, w = tensor.float(), theirs[key].float(), original[key].float()
        # a bf16 step of the operands (peft's bf16 sum W + delta rounds at W's and delta's scale)
        step = torch.finfo(torch.bfloat16).eps * (w.abs() + (a - w).abs()).clamp(min=2**-126)
        worst = max(worst, ((a - b).abs() / step).max().item())
    assert worst <= 2.0, worst  # in units of one bf16 step (2^-7 of the magnitude)
    for key in experts:
        moved = (ours[key].float() - original[key].float()).abs().max()
        assert moved > 20 * (ours[key].float() - theirs[key].float()).abs().max(), key
