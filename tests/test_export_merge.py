"""Streamed 16-bit merge: equals peft's merge_and_unload and reproduces the adapter model's logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mistral_fast as mf
from mistral_fast.errors import ModelError
from mistral_fast.export import merge_adapter
from mistral_fast.export.merge import checkpoint_files, is_quantized_linear, parse_size

PROMPT = "Convert 3 miles to kilometres, please. The answer is"


def make_adapter_run(
    run_dir: Path,
    targets: str = "all-linear",
    compute_dtype: str = "auto",
    extra: tuple[str, ...] = (),
    preset: str = "smoke",
) -> mf.LoadedModel:
    """A run directory as training leaves it: 4-bit base + LoRA with non-zero B, adapter saved.

    Random B instead of training keeps this fast; every LoRA matrix is non-zero (each Mixtral expert's
    different), so a merge that skipped, swapped or mis-scaled any of them would show. ``extra``: more config
    overrides (e.g. the base model); ``preset``: the config preset (``mixtral-smoke`` for the tiny Mixtral).
    """
    from mistral_fast.modeling import load_model

    overrides = [f"train.output_dir={run_dir}", f"lora.targets={targets}", f"model.compute_dtype={compute_dtype}"]
    overrides += list(extra)
    cfg = mf.load_config(preset, overrides)
    loaded = load_model(cfg, for_training=False)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in loaded.model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    loaded.model.save_pretrained(run_dir / "adapter")
    loaded.tokenizer.save_pretrained(run_dir / "adapter")
    cfg.save(run_dir / "run_config.yaml")
    extra = {"compute_dtype": str(loaded.compute_dtype).removeprefix("torch.")}
    (run_dir / "result.json").write_text(json.dumps({"train": {"extra": extra}}))
    return loaded


@pytest.fixture(scope="module")
def adapter_run(shared_adapter_run: tuple[Path, mf.LoadedModel]) -> tuple[Path, mf.LoadedModel]:
    return shared_adapter_run  # built once per session (conftest), shared with the GGUF export tests


def _peft_merged(
    base_path: str, adapter_dir: Path, replace: dict[str, torch.Tensor] | None, dtype: torch.dtype = torch.bfloat16
) -> dict[str, torch.Tensor]:
    """peft's own merge_and_unload on a base in ``dtype`` (optionally with some weights replaced)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
    if replace:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in replace.items():
                params[name].copy_(value)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    return {k: v.detach() for k, v in merged.state_dict().items()}


def _dequantized_from_4bit_model(loaded: mf.LoadedModel) -> dict[str, torch.Tensor]:
    """What each bitsandbytes layer of the loaded (training) model holds, dequantised."""
    import bitsandbytes.functional as bnbf

    out = {}
    for name, module in loaded.model.named_modules():
        if type(module).__name__ == "Linear4bit" and type(module).__module__.startswith("bitsandbytes"):
            key = name.removeprefix("base_model.model.").removesuffix(".base_layer") + ".weight"
            out[key] = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state)
    return out


@pytest.mark.parametrize("base", ["dequantized", "original"])
def test_streamed_merge_equals_peft_merge_and_unload(adapter_run, tmp_path: Path, base: str) -> None:
    run_dir, loaded = adapter_run
    out = merge_adapter(run_dir, tmp_path / "merged", base=base)
    ours = load_file(out / "model.safetensors")
    replace = _dequantized_from_4bit_model(loaded) if base == "dequantized" else None
    assert replace is None or len(replace) == 14  # 2 layers x 7 Linear, all quantised in training
    reference = _peft_merged(loaded.path, run_dir / "adapter", replace)
    assert set(ours) == set(reference)
    for name, tensor in reference.items():
        assert ours[name].dtype == torch.bfloat16
        assert torch.equal(ours[name], tensor), name


def test_fp32_compute_and_attention_only_lora(tmp_path: Path) -> None:
    """CPUs without bf16 train with fp32 compute: bitsandbytes then quantises fp32 copies of the weights.

    LoRA on attention only: the MLP weights were NF4 in training too, so they take the round trip as well.
    """
    run_dir = tmp_path / "run"
    loaded = make_adapter_run(run_dir, targets="attention", compute_dtype="float32")
    dequantized = _dequantized_from_4bit_model(loaded)
    assert len(dequantized) == 14 and all(t.dtype == torch.float32 for t in dequantized.values())
    ours = load_file(merge_adapter(run_dir, tmp_path / "merged") / "model.safetensors")
    # peft in fp32, rounded once to the checkpoint's bf16: what the streamed merge computes
    reference = _peft_merged(loaded.path, run_dir / "adapter", dequantized, torch.float32)
    assert all(torch.equal(ours[k], v.to(torch.bfloat16)) for k, v in reference.items())


def test_merged_model_reproduces_adapter_logits(adapter_run, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, loaded = adapter_run
    out = merge_adapter(run_dir, tmp_path / "merged")
    ids = loaded.tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        reference = loaded.model(ids).logits.float()
        merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
        got = merged(ids).logits.float()
    # The adapter model adds x·Aᵀ·Bᵀ in a separate bf16 matmul; the merged one rounds W + BA to bf16
    # once: the two differ by bf16 rounding only (measured ~1% of the logit range), while a missing
    # or mis-scaled LoRA update moves logits by far more (checked below).
    scale = reference.abs().max()
    assert (got - reference).abs().max() < 0.02 * scale
    assert (got.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.75  # a random model has near-ties
    original = merge_adapter(run_dir, tmp_path / "original", base="original")
    with torch.no_grad():
        unmerged_base = AutoModelForCausalLM.from_pretrained(loaded.path, dtype=torch.bfloat16)(ids).logits.float()
    assert (unmerged_base - reference).abs().max() > 5 * (got - reference).abs().max()
    tok = AutoTokenizer.from_pretrained(out)
    assert tok(PROMPT).input_ids == loaded.tokenizer(PROMPT).input_ids
    assert (original / "tokenizer.model").is_file()
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def test_sharded_merge_loads_and_matches_single_file(adapter_run, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    run_dir, _ = adapter_run
    single = load_file(merge_adapter(run_dir, tmp_path / "one") / "model.safetensors")
    sharded = merge_adapter(run_dir, tmp_path / "many", shard_size="10MB")
    files = checkpoint_files(sharded)
    assert len(files) >= 2 and all(f.stat().st_size <= 10_000_000 + 100_000 for f in files)
    merged: dict[str, torch.Tensor] = {}
    for file in files:
        merged |= load_file(file)
    assert merged.keys() == single.keys() and all(torch.equal(merged[k], single[k]) for k in single)
    model = AutoModelForCausalLM.from_pretrained(sharded)
    assert model.model.layers[1].mlp.down_proj.weight.dtype == torch.bfloat16


def test_merge_replaces_existing_output_atomically(adapter_run, tmp_path: Path) -> None:
    run_dir, _ = adapter_run
    out = tmp_path / "merged"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    merge_adapter(run_dir / "adapter", out, base="original")  # the adapter dir works too
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no temporary directory left behind


def test_merge_refuses_bad_requests(adapter_run, tmp_path: Path) -> None:
    run_dir, _ = adapter_run
    with pytest.raises(ModelError, match="merge_base"):
        merge_adapter(run_dir, tmp_path / "x", base="nf4")
    with pytest.raises(ModelError, match=r"adapter_config\.json"):
        merge_adapter(tmp_path, tmp_path / "x")
    with pytest.raises(ModelError, match="16 bits"):
        merge_adapter(run_dir, tmp_path / "x", dtype="float32")
    assert not (tmp_path / "x").exists()


def test_helpers() -> None:
    assert parse_size("2GB") == 2 * 10**9 and parse_size("1MiB") == 2**20 and parse_size(5) == 5
    with pytest.raises(ModelError, match="shard_size"):
        parse_size("lots")
    assert is_quantized_linear("model.layers.0.mlp.up_proj.weight", torch.zeros(2, 2))
    assert not is_quantized_linear("lm_head.weight", torch.zeros(2, 2))
    assert not is_quantized_linear("model.embed_tokens.weight", torch.zeros(2, 2))
    assert not is_quantized_linear("model.norm.weight", torch.zeros(2))


def test_interrupted_merge_leaves_nothing_at_the_final_path(adapter_run, tmp_path: Path, monkeypatch) -> None:
    from mistral_fast.export import merge as merge_module

    calls = []
    real = merge_module.merge_tensor

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 10:
            raise KeyboardInterrupt  # Ctrl-C half-way through the shard
        return real(*args, **kwargs)

    monkeypatch.setattr(merge_module, "merge_tensor", failing)
    with pytest.raises(KeyboardInterrupt):
        merge_adapter(adapter_run[0], tmp_path / "merged")
    assert list(tmp_path.iterdir()) == []


def _awkward_weights() -> list[torch.Tensor]:
    """bf16 checkpoint tensors (and an fp32 one) over several row ranges, with the NF4 edge cases."""
    from mistral_fast.export.kernels import CHUNK_VALUES

    gen = torch.Generator().manual_seed(3)
    rows = CHUNK_VALUES // 512 * 2 + 37  # more than two row ranges, the last one partial
    heavy = torch.randn(rows, 512, generator=gen) * 0.02
    heavy[0, :64] = 0  # an all-zero block (absmax 0)
    heavy[1, 5] = 3.0  # an outlier: the rest of its block rounds to the middle levels
    heavy[2, :64] = torch.linspace(-1, 1, 64)  # values on and near the level midpoints
    tensors = [heavy, torch.randn(96, 64, generator=gen), torch.rand(8, 4096, generator=gen) - 0.5]
    return [t.to(torch.bfloat16) for t in tensors] + [tensors[1]]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_lookup_kernel_is_bitsandbytes_bit_for_bit(dtype: str, double_quant: bool, torch_threads: int) -> None:
    """Our NF4 round trip (table lookup, by row ranges) against bitsandbytes' quantize_4bit/dequantize_4bit."""
    from mistral_fast.export.kernels import RowMerge, nf4_roundtrip_bnb

    quant = {"quant_type": "nf4", "double_quant": double_quant, "dtype": dtype}
    for weight in _awkward_weights():
        before = weight.clone()
        expected = nf4_roundtrip_bnb(weight, quant)
        got = RowMerge(weight, quant=quant).full()
        assert got.dtype == expected.dtype == getattr(torch, dtype)
        assert torch.equal(got, expected)
        assert torch.equal(weight, before)  # the checkpoint tensor is not scaled in place


def test_nf4_lookup_covers_every_level_boundary() -> None:
    """Every NF4 midpoint and its fp32 neighbours: the lookup picks bitsandbytes' level at each."""
    import bitsandbytes.functional as bnbf

    from mistral_fast.export.kernels import RowMerge, nf4_roundtrip_bnb

    levels = bnbf.get_4bit_type("nf4", device="cpu")
    mids = (levels[:-1] + levels[1:]) / 2
    near = torch.cat([mids, torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(-2.0))])
    values = torch.cat([near, levels, torch.tensor([1.0, -1.0])])  # 1.0 in each block: absmax 1, scale exact
    blocks = torch.ones(len(values), 64)
    blocks[:, 1] = values
    quant = {"quant_type": "nf4", "double_quant": False, "dtype": "float32"}
    got = RowMerge(blocks, quant=quant).full()
    assert torch.equal(got, nf4_roundtrip_bnb(blocks, quant))
    assert len(set(got[:, 1].tolist())) == 16  # all levels reached


@pytest.mark.parametrize("quant", [None, {"quant_type": "nf4", "double_quant": True, "dtype": "bfloat16"}])
def test_row_range_merge_equals_peft_arithmetic_on_the_whole_tensor(quant, torch_threads: int) -> None:
    """RowMerge by row ranges (several) against the whole-tensor computation peft does."""
    from mistral_fast.export.kernels import RowMerge, nf4_roundtrip_bnb

    gen = torch.Generator().manual_seed(4)
    for weight in _awkward_weights()[:2]:
        a = torch.randn(8, weight.shape[1], generator=gen) * 0.01
        b = torch.randn(weight.shape[0], 8, generator=gen) * 0.01
        base = weight if quant is None else nf4_roundtrip_bnb(weight, quant)
        expected = base + (b @ a) * 2.0  # peft: delta in fp32, in-place add into the 16-bit weight
        got = RowMerge(weight, (a, b), 2.0, quant, torch.bfloat16).full()
        assert torch.equal(got, expected.to(torch.bfloat16))


def test_nan_in_a_quantised_weight_is_named() -> None:
    """NaN has no NF4 level: a clear error naming the tensor, not an index error deep in a kernel."""
    from mistral_fast.export.kernels import RowMerge

    weight = torch.zeros(4, 128, dtype=torch.bfloat16)
    weight[2, 7] = float("nan")
    quant = {"quant_type": "nf4", "double_quant": True, "dtype": "bfloat16"}
    with pytest.raises(ModelError, match=r"model-00002\.safetensors: q_proj\.weight holds NaN or inf"):
        RowMerge(weight, quant=quant, name="model-00002.safetensors: q_proj.weight")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_file_rows_reads_the_row_ranges_safetensors_holds(tmp_path: Path, dtype: torch.dtype) -> None:
    """`FileRows` (large tensors read by row ranges) against safetensors' own reader, tensor after tensor."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from mistral_fast.export.merge import FileRows

    gen = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(7, 5, generator=gen), "b.weight": torch.randn(300, 64, generator=gen)}
    tensors |= {"c.weight": torch.randn(3, 4, 8, generator=gen)}
    save_file({k: v.to(dtype) for k, v in tensors.items()}, tmp_path / "m.safetensors")
    with safe_open(tmp_path / "m.safetensors", framework="pt") as f:
        for name in tensors:
            expected = f.get_tensor(name)
            rows = FileRows(tmp_path / "m.safetensors", name)
            assert (rows.shape, rows.ndim, rows.dtype) == (expected.shape, expected.ndim, expected.dtype)
            for start, end in ((0, 1), (2, 3), (1, expected.shape[0]), (0, expected.shape[0]), (2, 2)):
                assert torch.equal(rows[start:end], expected[start:end]), (name, start, end)
            assert torch.equal(rows.read(), expected)
