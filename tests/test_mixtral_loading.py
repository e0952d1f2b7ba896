"""Mixtral in 4-bit loads one expert matrix at a time: the same model as before, without all 16-bit experts at once.

The reference is the former path, kept for checkpoints whose experts are stored fused: transformers'
``from_pretrained`` (bitsandbytes 4-bit) holding every layer's fused 16-bit experts, then
`mistral_fast.modeling.moe.quantize_experts`. Real transformers, bitsandbytes (NF4 on CPU) and peft.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mistral_fast.config import RunConfig
from mistral_fast.modeling import load_model, loading
from mistral_fast.modeling.tiny import build_tiny_mixtral


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_mixtral(tmp_path_factory.mktemp("models") / "tiny-mixtral")


def make_cfg(path: Path | str, **overrides: object) -> RunConfig:
    return RunConfig().with_overrides({"model.name_or_path": str(path), "model.tokenizer": "v1", **overrides})


def load_both(cfg: RunConfig, monkeypatch: pytest.MonkeyPatch, *, for_training: bool):
    """The model from the streamed loader and from the former path (fused experts, then quantize_experts)."""
    streamed = load_model(cfg, for_training=for_training)
    with monkeypatch.context() as patch:
        patch.setattr(loading, "_streams_experts", lambda path: False)
        reference = load_model(cfg, for_training=for_training)
    return streamed, reference


def quant_state_tensors(param: torch.Tensor) -> dict[str, object]:
    state = getattr(param, "quant_state", None)
    return {} if state is None else state.as_dict(packed=True)  # absmax, nested absmax/code, shape, dtype, …


def assert_same_model(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """Same module tree (names and classes), every parameter and buffer equal byte for byte, same 4-bit states."""
    def tree(model: torch.nn.Module) -> list[tuple[str, str]]:
        return [(n, type(m).__name__) for n, m in model.named_modules()]

    assert tree(a) == tree(b)
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert list(pa) == list(pb)
    for name, x in pa.items():
        y = pb[name]
        assert (type(x), x.dtype, x.shape, x.requires_grad) == (type(y), y.dtype, y.shape, y.requires_grad), name
        assert torch.equal(x.detach().view(torch.uint8), y.detach().view(torch.uint8)), name  # bytes, NaN-safe
        sx, sy = quant_state_tensors(x), quant_state_tensors(y)
        assert sx.keys() == sy.keys(), name
        for key, value in sx.items():
            if isinstance(value, torch.Tensor):
                assert value.dtype == sy[key].dtype and torch.equal(value, sy[key]), (name, key)
            else:
                assert value == sy[key], (name, key)
    ba, bb = dict(a.named_buffers()), dict(b.named_buffers())
    assert list(ba) == list(bb)
    for name, x in ba.items():
        assert x.dtype == bb[name].dtype and torch.equal(x, bb[name]), name


@pytest.mark.parametrize("for_training", [False, True])
def test_streamed_mixtral_equals_fused_then_quantized(mixtral_dir: Path, monkeypatch, for_training: bool) -> None:
    import bitsandbytes as bnb
    from peft.tuners.lora import Linear4bit as LoraLinear4bit
    from transformers import MixtralForCausalLM
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    cfg = make_cfg(mixtral_dir, **{"model.compute_dtype": "bfloat16"})
    streamed, reference = load_both(cfg, monkeypatch, for_training=for_training)
    base_s, base_r = streamed.model.get_base_model(), reference.model.get_base_model()
    assert type(base_s) is type(base_r) is MixtralForCausalLM  # the loading subclass is gone after loading
    # the new path really ran: transformers recorded our per-expert renamings, not its fusing converters
    assert any("gate_proj" in str(t) for t in base_s._weight_conversions)
    assert not any("gate_proj" in str(t) for t in base_r._weight_conversions)
    assert not any(isinstance(m, MixtralExperts) for m in base_s.modules())
    assert_same_model(streamed.model, reference.model)
    experts = {n for n, m in streamed.model.named_modules() if isinstance(m, bnb.nn.Linear4bit) and ".experts." in n}
    assert len(experts) == 2 * 4 * 3  # layers x experts x (gate, up, down), every one 4-bit
    # LoRA on the same modules, the same initial adapters (seeded), and what peft/the Trainer read
    lora = [n for n, m in streamed.model.named_modules() if isinstance(m, LoraLinear4bit)]
    assert lora == [n for n, m in reference.model.named_modules() if isinstance(m, LoraLinear4bit)]
    assert {f"{n}.base_layer" for n in lora if ".experts." in n} == experts  # every expert matrix has LoRA
    for attr in ("is_loaded_in_4bit", "is_4bit_serializable", "is_quantized"):
        assert getattr(base_s, attr) == getattr(base_r, attr), attr
    assert base_s.hf_quantizer.quantization_config.to_dict() == base_r.hf_quantizer.quantization_config.to_dict()
    assert base_s.config.to_dict() == base_r.config.to_dict()
    assert base_s.generation_config.to_dict() == base_r.generation_config.to_dict()
    assert base_s.loss_type == base_r.loss_type == "ForCausalLM"
    assert streamed.info["expert_weight_bytes"] == reference.info["expert_weight_bytes"]
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, 32000, (2, 48), generator=gen)
    with torch.no_grad():
        out_s = streamed.model(input_ids=tokens, labels=tokens)
        out_r = reference.model(input_ids=tokens, labels=tokens)
    assert torch.equal(out_s.logits, out_r.logits)  # bit for bit
    assert torch.equal(out_s.loss, out_r.loss)


def copy_with_layout(src: Path, dst: Path, layout: str) -> Path:
    """The same weights re-saved: ``sharded`` (transformers' save_pretrained, per-expert names, several files)
    or ``fused`` (the transformers-5 module state dict written as is: ``mlp.experts.gate_up_proj`` …)."""
    import shutil

    from safetensors.torch import save_file
    from transformers import MixtralForCausalLM

    model = MixtralForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    if layout == "sharded":
        model.save_pretrained(dst, max_shard_size="2MB")
    else:
        dst.mkdir(parents=True)
        tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(tensors, dst / "model.safetensors", {"format": "pt"})
        shutil.copy(src / "config.json", dst)
        shutil.copy(src / "generation_config.json", dst)
    for name in src.iterdir():
        if name.name.startswith("tokenizer") or name.suffix == ".jinja":
            shutil.copy(name, dst)
    return dst


@pytest.mark.parametrize("layout", ["sharded", "fused"])
def test_other_checkpoint_layouts_load_the_same_model(mixtral_dir: Path, tmp_path: Path, layout: str) -> None:
    """Sharded per-expert checkpoints stream too; a checkpoint with fused experts takes the former path. Both give
    the tiny Mixtral's model exactly."""
    from safetensors import safe_open

    other = copy_with_layout(mixtral_dir, tmp_path / layout, layout)
    if layout == "sharded":
        assert len(list(other.glob("model-*.safetensors"))) > 1
    else:
        with safe_open(str(other / "model.safetensors"), "pt") as handle:
            keys = set(handle.keys())
        assert "model.layers.0.mlp.experts.gate_up_proj" in keys
    assert loading._streams_experts(str(mixtral_dir)) is True
    assert loading._streams_experts(str(other)) is (layout == "sharded")
    cfg = make_cfg(mixtral_dir, **{"model.compute_dtype": "bfloat16"})
    expected = load_model(cfg, for_training=False)
    got = load_model(make_cfg(other, **{"model.compute_dtype": "bfloat16"}), for_training=False)
    assert_same_model(got.model, expected.model)


def test_streamed_loader_refuses_a_checkpoint_without_per_expert_tensors(mixtral_dir: Path, tmp_path: Path) -> None:
    """A hub name is taken to have the per-expert layout (nothing local to read): if it has not, no random experts."""
    from mistral_fast.errors import ModelError

    fused = copy_with_layout(mixtral_dir, tmp_path / "fused", "fused")
    cfg = make_cfg(fused, **{"model.compute_dtype": "bfloat16"})
    bnb_config = loading._bnb_config(cfg, torch.bfloat16)
    kwargs = {"dtype": torch.bfloat16, "use_safetensors": True, "quantization_config": bnb_config}
    with pytest.raises(ModelError, match=r"no tensor for 24 expert weights .*block_sparse_moe\.experts\.E\.w1"):
        loading._load_moe_streamed(str(fused), cfg, kwargs)


def test_streamed_model_saves_with_mixtral_checkpoint_names(mixtral_dir: Path, tmp_path: Path) -> None:
    """save_pretrained of the 4-bit model: transformers reverts the recorded renamings (Mixtral's names, the
    architecture transformers' own), as the load_nf4_experts docstring promises."""
    from safetensors import safe_open

    from mistral_fast.modeling.moe import load_nf4_experts

    cfg = make_cfg(mixtral_dir, **{"model.compute_dtype": "bfloat16"})
    model, info = load_nf4_experts(
        str(mixtral_dir), dtype=torch.bfloat16, quantization_config=loading._bnb_config(cfg, torch.bfloat16)
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    model.save_pretrained(tmp_path / "saved")
    with safe_open(str(tmp_path / "saved" / "model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in keys  # packed NF4 under the checkpoint name
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight.absmax" in keys
    assert "model.layers.1.block_sparse_moe.gate.weight" in keys
    assert not any(".mlp." in k or "gate_proj" in k for k in keys)
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]


def test_fsdp_quant_storage_is_the_compute_dtype_on_both_paths(mixtral_dir: Path, monkeypatch) -> None:
    """Under FSDP every 4-bit weight (experts included) is stored as the compute dtype, as _bnb_config asks."""
    import bitsandbytes as bnb

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    cfg = make_cfg(mixtral_dir, **{"model.compute_dtype": "bfloat16"})
    streamed, reference = load_both(cfg, monkeypatch, for_training=False)
    assert_same_model(streamed.model, reference.model)
    layers = [m for m in streamed.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * (4 * 3 + 4)  # experts and attention
    assert {m.weight.dtype for m in layers} == {torch.bfloat16}


# ------------------------------------------------------------------------------------ memory

_MEASURE_LOAD = """
import json, sys
sys.path.insert(0, sys.argv[3])
from rss_harness import measure_cpu_load
from mistral_fast.config import RunConfig
from mistral_fast.modeling import loading
if sys.argv[2] == "fused":  # the former path: every layer's fused 16-bit experts, then quantize_experts
    loading._streams_experts = lambda path: False
cfg = RunConfig().with_overrides({"model.name_or_path": sys.argv[1], "model.tokenizer": "v1",
                                  "model.compute_dtype": "bfloat16"})
print("RESULT", json.dumps(measure_cpu_load(cfg)))
"""
# Experts dominate: 6 layers x 8 experts x 3 matrices of 256 x 2048 are 144 MiB in bf16 (24 MiB a layer),
# against 31 MiB of embeddings and lm_head and 3 MiB of attention.
_EXPERT_HEAVY = {"hidden_size": 256, "num_layers": 6, "intermediate_size": 2048, "num_experts": 8}


@pytest.mark.slow
def test_streamed_load_peaks_at_one_layers_16_bit_experts_not_all(tmp_path: Path) -> None:
    """Peak RSS of load_model in a fresh process, for each path (tests/rss_harness.py).

    Both paths map the checkpoint and read every tensor from it, so the RSS once loaded (``end``) includes those
    clean file pages on both; the transient over it is what loading held on top of the finished model.
    """
    path = build_tiny_mixtral(tmp_path / "mixtral", **_EXPERT_HEAVY)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    tests = str(Path(__file__).resolve().parent)
    measured = {}
    for mode in ("streamed", "fused"):
        out = subprocess.run(
            [sys.executable, "-c", _MEASURE_LOAD, str(path), mode, tests],
            capture_output=True, text=True, env=env, timeout=600, check=False,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
        measured[mode] = json.loads(line.removeprefix("RESULT "))
    h, i, e, n = (_EXPERT_HEAVY[k] for k in ("hidden_size", "intermediate_size", "num_experts", "num_layers"))
    layer_16bit = e * 3 * h * i * 2
    mib = 2**20
    for mode, m in measured.items():
        print(
            f"\n{mode}: peak {m['peak'] / mib:.1f} MiB, end {m['end'] / mib:.1f} MiB "
            f"(anonymous {m['anon_end'] / mib:.1f}, checkpoint pages {m['file_end'] / mib:.1f}), "
            f"tensors {m['weights_exact'] / mib:.1f} MiB; "
            f"one layer's 16-bit experts {layer_16bit / mib:.1f} MiB, all {n * layer_16bit / mib:.1f} MiB"
        )
    new, old = measured["streamed"], measured["fused"]
    assert new["weights_exact"] == old["weights_exact"]  # the same model (bit for bit: the test above)
    assert new["weights_exact"] < n * layer_16bit  # NF4 experts: the whole model is below its 16-bit experts
    # The streamed path: the finished model plus well under one layer's 16-bit experts.
    assert new["peak"] < new["end"] + 1.5 * layer_16bit, new
    # The former path fails that bound, and held at least every layer's 16-bit experts in anonymous memory at its
    # peak (the checkpoint pages only grow during the load, so peak - file pages once loaded is a lower bound).
    assert old["peak"] > old["end"] + 1.5 * layer_16bit, old
    assert old["peak"] - old["file_end"] > n * layer_16bit, old
