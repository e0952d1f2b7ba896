"""Model loading on the hf backend: real bitsandbytes 4-bit on CPU, real peft, the tiny local Mistral.

This process must never import unsloth (it patches transformers and TRL in place); the unsloth
backend is tested in a subprocess by tests/test_unsloth_backend.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import require_platform
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mistral_fast.config import RunConfig
from mistral_fast.errors import ModelError
from mistral_fast.modeling import (
    build_tiny_model,
    cast_trainable_to_fp32,
    cpu_has_native_bf16,
    disable_cpu_weight_repacking,
    load_model,
    resolve_backend,
    resolve_compute_dtype,
    resolve_model_path,
    tiny_model_dir,
)
from mistral_fast.tokenizer import sentencepiece_path

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default tiny Mistral, built once per session into a temporary directory."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


def make_cfg(path: Path | str, **model: object) -> RunConfig:
    """A config for `path` with optional `model.*` / `lora.*` / `train.*` overrides (dotted keys)."""
    overrides = {"model.name_or_path": str(path)}
    overrides.update({k if "." in k else f"model.{k}": v for k, v in model.items()})
    return RunConfig().with_overrides(overrides)


def bnb_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """bitsandbytes' own Linear4bit layers (peft's LoRA wrapper shares the class name)."""
    import bitsandbytes as bnb

    return {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def lora_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if "lora_A" in n or "lora_B" in n}


def ids(batch: int = 2, length: int = 32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 32768, (batch, length), generator=gen)


def lora_without_gradient(model: torch.nn.Module) -> list[str]:
    """Train `model` two SGD steps in train mode; the LoRA matrices whose gradient is then missing or zero."""
    model.train()
    params = lora_params(model)
    optimizer = torch.optim.SGD(params.values(), lr=1.0)
    for _ in range(2):  # lora_B starts at 0, so lora_A's gradient is 0 until B has moved once
        optimizer.zero_grad()
        model(input_ids=ids(), labels=ids()).loss.backward()
        optimizer.step()
    return [n for n, p in params.items() if p.grad is None or not p.grad.abs().sum()]


# --------------------------------------------------------------------------------- tiny model


def test_tiny_model_has_the_mistral_architecture(tiny_dir: Path) -> None:
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["model_type"] == "mistral" and config["architectures"] == ["MistralForCausalLM"]
    assert config["num_key_value_heads"] < config["num_attention_heads"]  # grouped-query attention
    assert config["sliding_window"] == 4096 and config["rope_parameters"]["rope_theta"] == 1e6
    assert config["hidden_act"] == "silu" and config["tie_word_embeddings"] is False
    assert (config["bos_token_id"], config["eos_token_id"], config["vocab_size"]) == (1, 2, 32768)
    assert config["pad_token_id"] not in (None, 2)
    assert config["hidden_size"] % 64 == 0 and config["intermediate_size"] % 64 == 0
    generation = json.loads((tiny_dir / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)
    assert (tiny_dir / "model.safetensors").is_file() and not list(tiny_dir.glob("*.bin"))
    from mistral_fast.tokenizer import load_tokenizer

    saved = load_tokenizer(path=tiny_dir)
    assert saved("Hello world").input_ids == load_tokenizer("v3")("Hello world").input_ids


def test_tiny_model_is_deterministic(tiny_dir: Path, tmp_path: Path) -> None:
    same = build_tiny_model(tmp_path / "same")
    other = build_tiny_model(tmp_path / "other", seed=1)
    weights = (tiny_dir / "model.safetensors").read_bytes()
    assert (same / "model.safetensors").read_bytes() == weights
    assert (other / "model.safetensors").read_bytes() != weights


def _independent_draw(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """The tiny model's documented weights, drawn here without `build_tiny_model`: N(0, 0.02) matrices in
    sorted-name order from one seeded generator, the final norm 8 and the other norms 1, then bf16. Shapes
    come from transformers' own (meta-device) model of the config."""
    from transformers import MistralConfig, MistralForCausalLM

    with torch.device("meta"):
        shapes = {n: p.shape for n, p in MistralForCausalLM(MistralConfig(**config)).named_parameters()}
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(shapes):
        if name == "model.norm.weight":
            out[name] = torch.full(shapes[name], 8.0)
        elif name.endswith("norm.weight"):
            out[name] = torch.ones(shapes[name])
        else:
            out[name] = torch.randn(shapes[name], generator=gen) * 0.02
    return {n: t.to(torch.bfloat16) for n, t in out.items()}


def test_the_default_tiny_model_is_the_plain_seeded_draw_with_its_old_cache_key(tiny_dir: Path) -> None:
    """Adding the tied/copy-head variant changed nothing of ``tiny``: its tensors are the independent draw
    (no tying, no reshaped attention) and its cache key is the one computed before those arguments existed."""
    from safetensors.torch import load_file

    from mistral_fast.modeling.tiny import TINY_DEFAULTS, _tiny_cache_key

    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    saved = load_file(str(tiny_dir / "model.safetensors"))
    expected = _independent_draw(config)
    assert sorted(saved) == sorted(expected) and "lm_head.weight" in saved
    assert all(torch.equal(saved[n], expected[n]) for n in expected)
    old = {
        k: v
        for k, v in TINY_DEFAULTS.items()
        if k not in ("head_dim", "tie_word_embeddings", "attention_gain", "copy_heads", "word_pairs")
    }
    assert _tiny_cache_key(dict(TINY_DEFAULTS)) == _tiny_cache_key(old)


def test_tiny_copy_ties_its_embeddings_and_makes_every_head_a_copy_head(tmp_path: Path) -> None:
    """``tiny-copy``: transformers loads one matrix for the embeddings and lm_head (none is written for lm_head);
    every head's o_proj block is its kv head's v_proj rows transposed; q/k are the plain draw x4; a request's
    `` km`` (``▁km``) embeds as 0.3 of its own draw and 0.7 of the call's ``km`` (variances), `` Norway`` with the
    call's first piece ``N`` (``"Norway"`` is ``N or way``), other rows as drawn."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mistral_fast.modeling import TINY_VARIANTS

    path = build_tiny_model(tmp_path / "copy", **TINY_VARIANTS["tiny-copy"])
    config = json.loads((path / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    saved = load_file(str(path / "model.safetensors"))
    assert "lm_head.weight" not in saved
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    draw = {n: t for n, t in _independent_draw(config).items() if n != "lm_head.weight"}
    hd, group = config["head_dim"], config["num_attention_heads"] // config["num_key_value_heads"]
    for i in range(config["num_hidden_layers"]):
        pre = f"model.layers.{i}.self_attn."
        for proj in ("q_proj", "k_proj"):
            assert torch.equal(saved[pre + proj + ".weight"], (draw[pre + proj + ".weight"].float() * 4).bfloat16())
        v, o = saved[pre + "v_proj.weight"], saved[pre + "o_proj.weight"]
        for h in range(config["num_attention_heads"]):
            kv = h // group
            assert torch.equal(o[:, h * hd : (h + 1) * hd], v[kv * hd : (kv + 1) * hd].T)
    vocab = AutoTokenizer.from_pretrained(path).get_vocab()
    # the piece a call's JSON starts the word with, as mistral_common encodes '"word"' (▁" first)
    reference = MistralTokenizer.from_file(str(sentencepiece_path("v3"))).instruct_tokenizer.tokenizer
    embed, drawn = saved["model.embed_tokens.weight"].float(), draw["model.embed_tokens.weight"].float()
    for word, pieces in (("km", 1), ("gal", 1), ("add", 1), ("France", 2), ("Norway", 3)):
        quoted = reference.encode(f'"{word}"', bos=False, eos=False)
        assert len(quoted) == pieces + 2  # ▁" ... ": one piece for the units, "Fr ance", "N or way"
        spaced, bare = vocab["▁" + word], quoted[1]
        expected = 0.3**0.5 * drawn[spaced] + 0.7**0.5 * drawn[bare]
        assert torch.allclose(embed[spaced], expected, atol=2e-3, rtol=1e-2)
        assert torch.nn.functional.cosine_similarity(embed[spaced], embed[bare], dim=0) > 0.7
        assert torch.equal(embed[bare], drawn[bare])  # the bare form, as every unpaired row, is the plain draw
    assert torch.equal(embed[vocab["[INST]"]], drawn[vocab["[INST]"]])
    assert resolve_model_path("tiny-copy") != resolve_model_path("tiny")


def test_tiny_model_refuses_sizes_4bit_cannot_use(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="hidden_size=96"):
        build_tiny_model(tmp_path / "bad", hidden_size=96)


def test_tiny_model_dir_builds_once_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MISTRAL_FAST_CACHE", str(tmp_path / "cache"))
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(tiny_model_dir())) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 2 and results[0] == results[1]
    assert results[0].parent == tmp_path / "cache" and results[0].name.startswith("tiny-mistral-v3-")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [results[0].name]  # no temp dirs left
    assert resolve_model_path("tiny") == str(results[0])
    assert tiny_model_dir(hidden_size=64, intermediate_size=192) != results[0]  # the key covers the sizes


# --------------------------------------------------------------------------------- choices


def test_auto_backend_on_cpu_is_hf_and_never_imports_unsloth(caplog: pytest.LogCaptureFixture) -> None:
    require_platform(not torch.cuda.is_available(), "CPU behaviour: there is a CUDA GPU here", ci_allowed="cuda")
    with caplog.at_level("INFO", logger="mistral_fast"):
        backend, reason = resolve_backend("auto")
    assert backend == "hf" and "no CUDA" in reason
    assert reason in caplog.text
    assert "unsloth" not in sys.modules


def test_explicit_unsloth_without_it_installed_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "unsloth" else real(name, *a))
    with pytest.raises(ModelError, match=r"pip install 'mistral-fast\[unsloth\]'"):
        resolve_backend("unsloth")


def test_unknown_backend_names_the_parameter() -> None:
    with pytest.raises(ModelError, match=r"model\.backend"):
        resolve_backend("tpu")


def test_compute_dtype_choices() -> None:
    dtype, reason = resolve_compute_dtype("auto")
    if not torch.cuda.is_available():
        assert dtype == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
        assert "CPU" in reason
    assert resolve_compute_dtype("float32")[0] == torch.float32
    assert resolve_compute_dtype("float16")[0] == torch.float16
    with pytest.raises(ModelError, match=r"model\.compute_dtype"):
        resolve_compute_dtype("int8")


# --------------------------------------------------------------------------------- 4-bit + LoRA


def test_linear_layers_are_nf4_double_quant_and_only_targets_get_lora(tiny_dir: Path) -> None:
    loaded = load_model(make_cfg(tiny_dir, **{"lora.targets": ["q_proj", "v_proj", "down_proj"]}))
    model = loaded.model
    layers = bnb_layers(model)
    assert len(layers) == 7 * 2  # every decoder projection of both layers
    for name, layer in layers.items():
        state = layer.weight.quant_state
        assert (state.quant_type, state.blocksize) == ("nf4", 64), name
        assert state.nested and state.state2 is not None, name  # double quantisation of the absmax
        assert layer.weight.dtype == torch.uint8
        assert layer.support_avx512bf16_for_cpu is False
        has_lora = name.endswith(".base_layer")
        assert has_lora == (name.split(".")[-2] in ("q_proj", "v_proj", "down_proj")), name
    inner = model.get_base_model()
    assert type(inner.lm_head) is torch.nn.Linear and type(inner.model.embed_tokens) is torch.nn.Embedding
    assert loaded.backend == "hf" and loaded.info["quantized_layers"] == 14 and loaded.info["lora_layers"] == 6
    assert loaded.tokenizer.pad_token_id == inner.config.pad_token_id != inner.config.eos_token_id


def test_trainable_params_are_exactly_the_fp32_lora_matrices(tiny_dir: Path) -> None:
    cfg = make_cfg(tiny_dir)
    loaded = load_model(cfg)
    trainable = {n: p for n, p in loaded.model.named_parameters() if p.requires_grad}
    assert trainable.keys() == lora_params(loaded.model).keys()
    assert {p.dtype for p in trainable.values()} == {torch.float32}
    # r·(in + out) per adapted matrix, from config.json alone
    c = json.loads((tiny_dir / "config.json").read_text())
    h, inter, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    shapes = {
        "q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
        "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h),
    }  # fmt: skip
    expected = c["num_hidden_layers"] * sum(cfg.lora.rank * (i + o) for i, o in shapes.values())
    assert sum(p.numel() for p in trainable.values()) == expected == loaded.info["trainable_params"]
    # TRL casts adapters to bf16 on 4-bit bases; the trainer casts them back with this
    for p in trainable.values():
        p.data = p.data.to(torch.bfloat16)
    assert cast_trainable_to_fp32(loaded.model) == len(trainable)
    assert {p.dtype for p in trainable.values()} == {torch.float32}


def test_4bit_logits_stay_close_to_the_unquantised_model(tiny_dir: Path) -> None:
    """NF4 rounds each weight by ~9% (relative RMS); measured on the tiny model, 4 x 128 tokens:
    logits relative error 0.143, top-1 agreement 0.68, KL 0.034 nats/token against the original
    weights; against the dequantised weights (what the 4-bit kernel should compute) 0.0054 in
    bf16 compute and exactly 0 in fp32. Independent random logits would give relative error ~1.4.
    """
    import bitsandbytes.functional as F
    from transformers import AutoModelForCausalLM

    tokens = ids(4, 128, seed=123)
    loaded = load_model(make_cfg(tiny_dir, compute_dtype="bfloat16"), for_training=False)
    reference = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        quantised = loaded.model(input_ids=tokens).logits.float()  # fresh LoRA: B = 0, so the base alone
        original = reference(input_ids=tokens).logits.float()
        modules = dict(reference.named_modules())
        for name, layer in bnb_layers(loaded.model.get_base_model()).items():
            dequantised = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
            modules[name.removesuffix(".base_layer")].weight.copy_(dequantised.float())
        dequant_ref = reference(input_ids=tokens).logits.float()

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a - b).norm() / b.norm()).item()

    kl = (
        torch.nn.functional.kl_div(
            quantised.log_softmax(-1), original.log_softmax(-1), log_target=True, reduction="sum"
        )
        / tokens.numel()
    )
    assert rel(quantised, original) < 0.2
    assert (quantised.argmax(-1) == original.argmax(-1)).float().mean() > 0.55
    assert kl.item() < 0.06  # nats per token (logits are peaked: the tiny model's final norm is 8)
    assert rel(quantised, dequant_ref) < 0.01


def test_training_after_generate_still_gets_gradients(tiny_dir: Path) -> None:
    """bitsandbytes repacks 4-bit weights at the first no-grad CPU forward unless switched off."""
    loaded = load_model(make_cfg(tiny_dir, **{"lora.dropout": 0.0}))
    model = loaded.model
    model.eval()
    prompt = torch.tensor([[1, 1778, 1117, 1032]])
    model.generate(input_ids=prompt, max_new_tokens=4, do_sample=False, pad_token_id=loaded.tokenizer.pad_token_id)
    with torch.no_grad():
        model(input_ids=ids())  # an evaluation pass: the other trigger
    layers = bnb_layers(model)
    assert all(m.support_avx512bf16_for_cpu is False for m in layers.values())
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers.values())

    assert not lora_without_gradient(model)
    for name, layer in layers.items():  # and the input gradient through every 4-bit layer
        x = torch.randn(3, layer.in_features, requires_grad=True)
        layer(x).sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0, name


def test_disable_cpu_weight_repacking_undoes_bitsandbytes_repack_on_any_cpu(tiny_dir: Path) -> None:
    """The repack an AVX512-BF16 CPU does at the first eval/no-grad forward, done here explicitly with
    bitsandbytes' own function (`Linear4bit.forward` calls exactly this), so the guard is proven on any CPU:
    it finds every repacked layer, restores the original 4-bit codes and double-quant state, the layer
    computes what it did before, gradients flow again, and a later eval forward repacks nothing."""
    import bitsandbytes.functional as F

    loaded = load_model(make_cfg(tiny_dir, **{"lora.dropout": 0.0}))
    model = loaded.model
    layers = bnb_layers(model)
    before = {}
    for name, layer in layers.items():
        w = layer.weight
        xi = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            out = layer(xi)
        before[name] = (w.data.clone(), F.dequantize_4bit(w.data, w.quant_state).float(), xi, out)
        # what bitsandbytes sets on an AVX512-BF16 CPU, and what its eval/no-grad forward then does
        layer.support_avx512bf16_for_cpu = True
        w.data, w.quant_state = F._convert_weight_packed_for_cpu(w.data, w.quant_state)
        assert w.quant_state.packing_format_for_cpu and not w.quant_state.nested
        assert w.data.shape != before[name][0].shape or not torch.equal(w.data, before[name][0]), name

    assert disable_cpu_weight_repacking(model) == len(layers) == 14
    for name, layer in layers.items():
        codes, dequant, xi, out = before[name]
        state = layer.weight.quant_state
        assert layer.support_avx512bf16_for_cpu is False and not state.packing_format_for_cpu and state.nested
        assert torch.equal(layer.weight.data, codes), f"{name}: 4-bit codes not restored"
        after = F.dequantize_4bit(layer.weight.data, state).float()
        assert (after - dequant).norm() / dequant.norm() < 0.01, name  # absmax re-quantised (double quant)
        with torch.no_grad():
            torch.testing.assert_close(layer(xi), out, rtol=0.02, atol=0.02, msg=name)
        xg = xi.clone().requires_grad_(True)
        layer(xg).sum().backward()
        assert xg.grad is not None and xg.grad.abs().sum() > 0, name

    model.eval()
    with torch.no_grad():
        model(input_ids=ids())  # the trigger: with the guard off nothing is repacked
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers.values())
    assert not lora_without_gradient(model)


def test_disable_cpu_weight_repacking_repairs_a_real_avx512bf16_repack(tiny_dir: Path) -> None:
    """The trap itself: only a CPU with AVX512-BF16 repacks in a real forward (skipped elsewhere; the test
    above proves the repair on any CPU)."""
    import bitsandbytes.functional as F

    require_platform(F.has_avx512bf16(), "needs a CPU with AVX512-BF16", ci_allowed="avx512bf16")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb_cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, quantization_config=bnb_cfg, dtype=torch.bfloat16)
    layer = model.model.layers[0].self_attn.q_proj
    before = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids())  # the trap: repacked in place
    assert layer.weight.quant_state.packing_format_for_cpu
    assert disable_cpu_weight_repacking(model) == 14
    assert not layer.weight.quant_state.packing_format_for_cpu and layer.weight.quant_state.nested
    after = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    assert ((after - before).norm() / before.norm()) < 0.01  # absmax re-quantised; codes identical
    x = torch.randn(2, layer.in_features, dtype=torch.bfloat16, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_lora_on_a_16bit_base(tiny_dir: Path) -> None:
    loaded = load_model(make_cfg(tiny_dir, load_in_4bit=False, compute_dtype="float32"))
    assert not bnb_layers(loaded.model) and loaded.info["quantized_layers"] == 0
    out = loaded.model(input_ids=ids(), labels=ids())
    out.loss.backward()
    assert all(p.grad is not None for n, p in lora_params(loaded.model).items() if "lora_B" in n)
    assert {p.dtype for p in loaded.model.parameters() if p.requires_grad} == {torch.float32}


def test_for_training_switches_modes(tiny_dir: Path) -> None:
    training = load_model(make_cfg(tiny_dir))
    assert training.model.training and training.model.config.use_cache is False
    assert training.model.get_base_model().is_gradient_checkpointing
    inference = load_model(make_cfg(tiny_dir), for_training=False)
    assert not inference.model.training and inference.model.config.use_cache is True


# --------------------------------------------------------------------------------- errors


@pytest.fixture
def no_weight_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation must fail before any weights are read."""
    from transformers import AutoModelForCausalLM

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("weights were loaded before validation failed")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


@pytest.mark.parametrize("path", ["./no/such/model", "/no/such/model", "~/no-such-model-dir/x/y"])
def test_missing_path(path: str, no_weight_loading: None) -> None:
    with pytest.raises(ModelError, match=r"model\.name_or_path.*no such directory"):
        load_model(make_cfg(path))


def test_directory_without_config(tmp_path: Path, no_weight_loading: None) -> None:
    with pytest.raises(ModelError, match=r"model\.name_or_path.*config\.json"):
        load_model(make_cfg(tmp_path))


def test_uncached_hub_name_offline(no_weight_loading: None) -> None:
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # set by conftest
    with pytest.raises(ModelError, match=r"model\.name_or_path='no-such-org/no-such-model'.*HF_HUB_OFFLINE"):
        load_model(make_cfg("no-such-org/no-such-model"))


@pytest.mark.parametrize("model_type, arch", [("llama", "LlamaForCausalLM"), ("gpt2", "GPT2LMHeadModel")])
def test_non_mistral_architecture(tmp_path: Path, model_type: str, arch: str, no_weight_loading: None) -> None:
    from transformers import AutoConfig

    AutoConfig.for_model(model_type, architectures=[arch]).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match=rf"model\.name_or_path.*Mistral.*'{model_type}' \({arch}\)"):
        load_model(make_cfg(tmp_path))


def test_target_module_not_in_model(tiny_dir: Path, no_weight_loading: None) -> None:
    with pytest.raises(ModelError, match=r"lora\.targets: \['c_attn'\] not in this model.*'down_proj'"):
        load_model(make_cfg(tiny_dir, **{"lora.targets": ["q_proj", "c_attn"]}))


def test_4bit_without_bitsandbytes(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch, no_weight_loading: None) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    with pytest.raises(ModelError, match=r"model\.load_in_4bit.*bitsandbytes"):
        load_model(make_cfg(tiny_dir))


# --------------------------------------------------------------------------------- hygiene


def test_importing_modeling_imports_no_heavy_library() -> None:
    code = "import sys, mistral_fast.modeling; print(sorted({'torch', 'transformers', 'unsloth'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_this_process_never_imported_unsloth() -> None:
    assert "unsloth" not in sys.modules and "unsloth_zoo" not in sys.modules
