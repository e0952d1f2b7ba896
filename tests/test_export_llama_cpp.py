"""Our GGUF against llama.cpp itself: its own converter, its tokenizer, its quantiser and its chat formatter.

The reference converter is ``convert_hf_to_gguf.py`` from the llama-cpp-python source package at the
installed version (the ``llama_cpp_source`` fixture in conftest.py: downloaded once, never committed).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import require_module

from mistral_fast.export import export_gguf, merge_adapter, quantize_gguf
from mistral_fast.tokenizer import (
    CHAT_TEMPLATE_V3,
    inference_template,
    load_tokenizer,
    reference_chat_ids,
    reference_tokenizer,
)

llama_cpp = require_module("llama_cpp", "pip install 'mistral-fast[gguf]'")


def run_converter(source: Path, script: str, args: list[str]) -> None:
    """One of llama.cpp's converters, with its own gguf-py first on the path (as its README says)."""
    env = {**os.environ, "PYTHONPATH": str(source / "gguf-py"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(source / script), *args], capture_output=True, text=True, env=env, check=False
    )
    assert proc.returncode == 0, f"{script} {args} failed:\n{proc.stderr[-3000:]}"


def gguf_fields(path: Path) -> dict[str, tuple[Any, list[int]]]:
    """Every metadata key: (value, GGUF value types), the GGUF.* header pseudo-keys left out."""
    import gguf

    reader = gguf.GGUFReader(path)
    return {k: (f.contents(), [int(t) for t in f.types]) for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def gguf_tensors(path: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    import gguf

    return {
        t.name: (t.tensor_type.name, tuple(int(n) for n in t.shape), bytes(np.ascontiguousarray(t.data).data))
        for t in gguf.GGUFReader(path).tensors
    }


@pytest.fixture(scope="module")
def merged_dir(shared_adapter_run, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny merged checkpoint as `merge_adapter` writes it (NF4-dequantised base + non-zero LoRA)."""
    return merge_adapter(shared_adapter_run[0], tmp_path_factory.mktemp("llama-cpp") / "merged")


@pytest.fixture(scope="module")
def ours_f16(merged_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_gguf(merged_dir, tmp_path_factory.mktemp("ours") / "ours-f16.gguf", "f16", name="merged")


# The one key whose value differs by design: the converter embeds the training template as the checkpoint
# has it; ours is that template without {% generation %} marks (what plain Jinja2 can render).
DIFFERS_BY_DESIGN = {"tokenizer.chat_template"}


def assert_equals_converter(source: Path, merged: Path, out_dir: Path, qtype: str) -> tuple[dict, dict, dict]:
    """Convert `merged` with llama.cpp's convert_hf_to_gguf.py and with `export_gguf` at `qtype`: every tensor
    (name, type, shape, bytes) and every metadata key the converter writes, same value and type (but
    DIFFERS_BY_DESIGN). Returns the converter's tensors, its metadata and ours, for the caller's own checks."""
    theirs = out_dir / f"converter-{qtype}.gguf"
    run_converter(
        source,
        "convert_hf_to_gguf.py",
        [str(merged), "--outfile", str(theirs), "--outtype", qtype, "--model-name", "merged"],
    )
    ours = export_gguf(merged, out_dir / f"ours-{qtype}.gguf", qtype, name="merged")

    reference, got = gguf_tensors(theirs), gguf_tensors(ours)
    # Same tensors; the order is ours by design (embeddings, blocks, output: one order whatever the sharding),
    # the converter's follows the checkpoint's storage order. llama.cpp looks tensors up by name.
    assert sorted(got) == sorted(reference)
    for name, (kind, shape, data) in reference.items():
        assert got[name][:2] == (kind, shape), name
        assert got[name][2] == data, f"{name}: tensor bytes differ from llama.cpp's converter"

    reference_kv, got_kv = gguf_fields(theirs), gguf_fields(ours)
    missing = sorted(set(reference_kv) - set(got_kv))
    assert not missing, f"keys llama.cpp's converter writes and we do not: {missing}"
    for key, (value, types) in reference_kv.items():
        if key not in DIFFERS_BY_DESIGN:
            assert got_kv[key] == (value, types), key
    return reference, reference_kv, got_kv


@pytest.mark.slow
@pytest.mark.parametrize("qtype", ["f16", "q8_0", "bf16"])
def test_gguf_equals_llama_cpp_converter(llama_cpp_source: Path, merged_dir: Path, tmp_path: Path, qtype: str) -> None:
    """Every tensor (name, type, shape, bytes) and every metadata key the converter writes, same value and type."""
    reference, reference_kv, got_kv = assert_equals_converter(llama_cpp_source, merged_dir, tmp_path, qtype)
    assert len(reference) == 21 and len(reference_kv) >= 28
    template = reference_kv["tokenizer.chat_template"][0]
    assert "{%- generation -%}" in template  # the checkpoint's training template ...
    assert got_kv["tokenizer.chat_template"][0] == inference_template(template)  # ... without its marks
    # Ours adds only keys that state llama.cpp's defaults explicitly.
    assert set(got_kv) - set(reference_kv) <= {"tokenizer.ggml.add_eos_token", "tokenizer.ggml.add_space_prefix"}
    assert got_kv.get("tokenizer.ggml.add_eos_token", (False,))[0] is False
    assert got_kv.get("tokenizer.ggml.add_space_prefix", (True,))[0] is True


@pytest.mark.slow
def test_large_tensors_read_by_row_ranges_still_equal_the_converter(
    llama_cpp_source: Path, merged_dir: Path, shared_adapter_run, tmp_path: Path, monkeypatch
) -> None:
    """Past `LARGE_TENSOR_BYTES` (a 131k vocabulary's embeddings and lm_head) a tensor is read row range by
    row range as it is encoded; with the limit at 0 every matrix goes that way, and the GGUF of a merged
    checkpoint must still hold the converter's bytes, the one-pass export the bytes it writes otherwise."""
    import mistral_fast.export.merge as merge_module
    from mistral_fast.export import export_merged_gguf

    theirs = tmp_path / "converter-q8_0.gguf"
    run_converter(
        llama_cpp_source, "convert_hf_to_gguf.py", [str(merged_dir), "--outfile", str(theirs), "--outtype", "q8_0"]
    )
    run = shared_adapter_run[0]  # the run merged_dir was merged from (only read here)
    one_pass_whole = export_merged_gguf(run, tmp_path / "one-pass-whole.gguf", "q8_0")
    monkeypatch.setattr(merge_module, "LARGE_TENSOR_BYTES", 0)
    ours = export_gguf(merged_dir, tmp_path / "ours-q8_0.gguf", "q8_0")
    one_pass = export_merged_gguf(run, tmp_path / "one-pass.gguf", "q8_0")
    reference = gguf_tensors(theirs)
    assert gguf_tensors(ours) == reference
    assert gguf_tensors(one_pass) == gguf_tensors(one_pass_whole)


# ------------------------------------------------------------------------------------------ tokenizer

_PIECES = (
    "Hello", "world", "the", "Mistral", "tokenizer", "ÉTÉ", "naïve", "façade", "Straße", "İstanbul", "Ωμέγα",
    "Привет", "日本語", "中文字符", "한국어", "עברית", "العربية", "हिन्दी", "ไทย", "🙂", "👩‍💻", "🇫🇷", "e\u0301",
    "\u200b", "\u00a0", "\u3000", "ｆｕｌｌ", "①②", "½", "™", "x²", "…", "—", "«»", "€", "\\n", "\\t",
    "def f(x):", "return x ** 2", "if (a && b) { c(); }", "<div class=\"a\">", "SELECT * FROM t;", "#include <x>",
    "0", "7", "42", "3.14159", "1e-5", "-273.15", "2026-11-30", "0x1F", "1,000,000", "12345678901234567890",
    "[INST]", "[/INST]", "</s>", "<s>", "<unk>", "[control_8]", "[TOOL_CALLS]", "<0x0A>", "▁", "▁▁x",
    "{{ x }}", "{% if %}", "$HOME", "~/.cache", "C:\\Users", "http://a.b/c?d=e&f=g", "@user", "#tag",
)  # fmt: skip
_GLUE = (" ", "  ", "   ", "\n", "\n\n", "\t", " \n", "\r\n", "", "", "", ".", ", ", "! ", "?", ":", "-", "_", "/")


def generated_strings(n: int, seed: int = 13) -> list[str]:
    """``n`` strings from a seeded generator: words, code, digits, unicode, control-like text, odd whitespace."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        parts = [rng.choice(_PIECES) for _ in range(rng.randint(1, 8))]
        text = "".join(p + rng.choice(_GLUE) for p in parts)
        if i % 5 == 0:  # leading whitespace, where SentencePiece ports most often disagree
            text = rng.choice(_GLUE[:8]) + text
        if i % 7 == 0:
            text = "".join(chr(rng.randint(0x20, 0x2FFF)) for _ in range(rng.randint(1, 12)))  # arbitrary code points
        if i % 11 == 0:
            text = str(rng.randint(0, 10**12)) + rng.choice(_GLUE) + str(rng.random())
        out.append(text)
    return out


def test_llama_cpp_tokenises_1000_generated_strings_like_mistral_common(ours_f16: Path) -> None:
    texts = generated_strings(1200)
    assert len(set(texts)) > 1100
    reference = reference_tokenizer("v3").instruct_tokenizer.tokenizer
    vocab = llama_cpp.Llama(model_path=str(ours_f16), vocab_only=True, verbose=False)
    try:
        differing = [
            text
            for text in texts
            if vocab.tokenize(text.encode(), add_bos=True, special=False) != reference.encode(text, bos=True, eos=False)
        ]
    finally:
        vocab.close()
    assert not differing, f"{len(differing)} of {len(texts)} strings differ, e.g. {differing[:3]!r}"


# ------------------------------------------------------------------------------------- chat template

CONVERSATIONS = [  # (messages, add_generation_prompt)
    ([{"role": "user", "content": "Hi"}], True),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  Two  spaces: 10 °F in °C?"}], True),
    (
        [
            {"role": "system", "content": "You convert units."},
            {"role": "user", "content": "3 miles?"},
            {"role": "assistant", "content": "4.83 km  "},
            {"role": "user", "content": "And 10 kg\nin lb?"},
        ],
        True,
    ),
    (
        [
            {"role": "user", "content": "First part."},
            {"role": "user", "content": "Second part."},
            {"role": "assistant", "content": "Merged reply."},
            {"role": "assistant", "content": "More."},
            {"role": "user", "content": "Third."},
            {"role": "system", "content": "Late system prompt."},
            {"role": "user", "content": "日本語 🙂 ok?"},
        ],
        True,
    ),
    (
        [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "A1"},
            {"role": "user", "content": "Q2"},
            {"role": "assistant", "content": "A2\n"},
        ],
        False,  # a full conversation, as training sees it
    ),
]


def _render_jinja2(template: str, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """Plain sandboxed Jinja2, no transformers extension: what a generic consumer of the GGUF does."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt)


def _render_llama_cpp_python(template: str, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """llama-cpp-python's chat formatter (what ``Llama.create_chat_completion`` uses for a GGUF's template)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    formatter = Jinja2ChatFormatter(template, "</s>", "<s>", add_generation_prompt=add_generation_prompt)
    return formatter(messages=messages).prompt


@pytest.mark.parametrize("renderer", [_render_jinja2, _render_llama_cpp_python], ids=["jinja2", "llama-cpp-python"])
def test_gguf_chat_template_renders_to_mistral_common_ids(ours_f16: Path, renderer) -> None:
    from jinja2 import TemplateSyntaxError

    vocab = llama_cpp.Llama(model_path=str(ours_f16), vocab_only=True, verbose=False)
    try:
        template = vocab.metadata["tokenizer.chat_template"]
        assert "generation -%}" not in template and "generation %}" not in template
        with pytest.raises(TemplateSyntaxError, match="generation"):  # why: the training template fails there
            _render_jinja2(CHAT_TEMPLATE_V3, CONVERSATIONS[0][0], True)
        for messages, prompt in CONVERSATIONS:
            text = renderer(template, messages, prompt)
            got = vocab.tokenize(text.encode(), add_bos=False, special=True)  # the template writes <s> itself
            assert got == reference_chat_ids(messages, "v3", add_generation_prompt=prompt), messages
            assert text == load_tokenizer("v3").apply_chat_template(
                messages, add_generation_prompt=prompt, tokenize=False
            )
    finally:
        vocab.close()


# ---------------------------------------------------------------------------------------- k-quants

# Perplexity of each k-quant on a fixed text, relative to the f16 GGUF's, for a tiny model that has learnt that
# text (measured 2026-11-30, 1 and 2 threads: f16 1.31-1.33; q6_k +0.1/+0.5%, q5_k_m +0.3/+0.5%, q4_k_m +1.4/+2.6%).
# The same model with Gaussian noise of a 3-bit step on every weight lands outside every margin (checked below).
KQUANT_MARGINS = {"q6_k": 0.01, "q5_k_m": 0.015, "q4_k_m": 0.05}
PPL_TEXT = (
    "The quick brown fox jumps over the lazy dog. Convert 3 miles to kilometres: 3 x 1.609 = 4.83 km.\n"
    "def square(x):\n    return x * x\n"
    "Mistral-7B is a decoder-only transformer with grouped-query attention and sliding-window attention. "
    "Temperatures: 10 °F is -12.2 °C; 100 °C is 212 °F. 日本語のテキストも少し。"
)


@pytest.fixture(scope="module")
def kquant_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int]]:
    """A tiny model that has learnt ``PPL_TEXT`` (30 full fine-tuning steps), with rows a multiple of 256 so
    that llama.cpp really uses K blocks. A random model's perplexity (~1e6) is dominated by confidently
    wrong guesses and swings with any change; a model that predicts its text shows what quantisation costs."""
    import torch
    from transformers import AutoModelForCausalLM

    from mistral_fast.modeling import tiny_model_dir

    ids = reference_tokenizer("v3").instruct_tokenizer.tokenizer.encode(PPL_TEXT, bos=True, eos=False)
    source = tiny_model_dir(hidden_size=256, intermediate_size=768, num_heads=4, num_kv_heads=2)
    out = tmp_path_factory.mktemp("kquant") / "model"
    shutil.copytree(source, out)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    batch = torch.tensor([ids])
    for _ in range(30):
        model(batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.to(torch.bfloat16).save_pretrained(out)
    return out, ids


def _perplexity(path: Path, ids: list[int]) -> float:
    from mistral_fast.export.report import gguf_side

    return gguf_side(path, [], eos=2, max_new_tokens=0, rows=[(ids, ids)]).perplexity


@pytest.mark.slow
def test_k_quants_load_in_llama_cpp_with_perplexity_near_f16(
    kquant_model: tuple[Path, list[int]], tmp_path: Path
) -> None:
    import gguf

    model, ids = kquant_model
    assert len(ids) > 100
    f16 = export_gguf(model, tmp_path / "f16.gguf", "f16")
    base = _perplexity(f16, ids)
    assert 1 < base < 2  # the model has learnt the text
    for qtype, margin in KQUANT_MARGINS.items():
        path = quantize_gguf(f16, tmp_path / f"{qtype}.gguf", qtype)
        kinds = {t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
        assert {"Q4_K", "Q5_K", "Q6_K"} & kinds, kinds  # K blocks really used
        ppl = _perplexity(path, ids)
        print(f"{qtype}: perplexity {ppl:.4f} vs f16 {base:.4f} ({ppl / base - 1:+.2%}), types {sorted(kinds)}")
        assert abs(ppl / base - 1) < margin, (qtype, ppl, base)
    # The margins can fail: 3-bit-step noise on every weight is outside all of them.
    noisy = _noisy_copy(model, tmp_path / "noisy")
    ppl = _perplexity(export_gguf(noisy, tmp_path / "noisy.gguf", "f16"), ids)
    print(f"noisy: perplexity {ppl:.4f} ({ppl / base - 1:+.2%})")
    assert abs(ppl / base - 1) > max(KQUANT_MARGINS.values()), ppl


def _noisy_copy(model: Path, out: Path) -> Path:
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(model, out)
    weights = load_file(out / "model.safetensors")
    gen = torch.Generator().manual_seed(3)
    for name, w in weights.items():
        if w.ndim == 2:
            step = w.float().abs().amax(-1, keepdim=True) / 8  # a 3-bit step per row
            weights[name] = (w.float() + torch.randn(w.shape, generator=gen) * step).to(w.dtype)
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out
