"""GGUF export of tekken models: llama.cpp's converter writes the same tensors and tokenizer, and llama.cpp
tokenises our GGUF (strings and chats) as mistral_common does."""

from __future__ import annotations

import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from conftest import require_optional
from test_tokenizer import generated_strings

from mistral_fast.export import export_gguf
from mistral_fast.modeling import resolve_model_path
from mistral_fast.tokenizer import (
    DEFAULT_PROBES,
    inference_template,
    load_tokenizer,
    reference_chat_ids,
    reference_tokenizer,
)

pytestmark = pytest.mark.slow

_U, _A, _S = "user", "assistant", "system"
CHATS = [
    [{"role": _U, "content": "Hi"}, {"role": _A, "content": "Hello!"}, {"role": _U, "content": "2+2?"}],
    [{"role": _S, "content": "Be brief."}, {"role": _U, "content": "  Two  spaces: 10 °F in °C?\n"}],
    [{"role": _U, "content": "日本語で 😀"}, {"role": _A, "content": "はい  "}, {"role": _U, "content": "x"}],
]


@pytest.fixture(scope="module", params=[("tiny-nemo", "v3-tekken"), ("tiny-small", "v7-tekken")], ids=["3", "7"])
def exported(request, tmp_path_factory):
    name, version = request.param
    directory = Path(resolve_model_path(name))
    return version, directory, export_gguf(directory, tmp_path_factory.mktemp(name) / "ours.gguf", "f16")


def _read(path: Path, gguf_py: Path) -> tuple[dict, dict]:
    code = f"""
import json, sys, hashlib
sys.path.insert(0, {str(gguf_py)!r})
import gguf, numpy as np
r = gguf.GGUFReader({str(path)!r})
kv = {{k: f.contents() for k, f in r.fields.items() if not k.startswith(("GGUF.", "general."))}}
t = {{x.name: [x.tensor_type.name, list(map(int, x.shape)), hashlib.sha256(np.array(x.data).tobytes()).hexdigest()]
     for x in r.tensors}}
print(json.dumps([kv, t]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    import json

    return tuple(json.loads(out.stdout.splitlines()[-1]))


def test_same_as_llama_cpp_converter(exported, llama_cpp_source, tmp_path):
    """The converter of the installed llama-cpp-python's own commit (conftest's `llama_cpp_source`)."""
    _, directory, ours = exported
    source = llama_cpp_source
    reference = tmp_path / "converter.gguf"
    env = {**os.environ, "PYTHONPATH": str(source / "gguf-py"), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(source / "convert_hf_to_gguf.py"), str(directory), "--outtype", "f16"]
    out = subprocess.run([*cmd, "--outfile", str(reference)], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]  # also: the converter recognised the tokenizer as tekken
    our_kv, our_tensors = _read(ours, source / "gguf-py")
    ref_kv, ref_tensors = _read(reference, source / "gguf-py")
    assert our_tensors == ref_tensors  # every tensor, byte for byte (sha256)
    tokenizer_keys = {k for k in ref_kv if k.startswith("tokenizer.")} - {"tokenizer.ggml.add_sep_token"}
    expected = {k: ref_kv[k] for k in tokenizer_keys}
    if "tokenizer.chat_template" in expected:  # ours is the portable one: the converter's without {% generation %}
        expected["tokenizer.chat_template"] = inference_template(expected["tokenizer.chat_template"])
    assert {k: our_kv.get(k) for k in tokenizer_keys} == expected
    assert our_kv["tokenizer.ggml.model"] == "gpt2" and our_kv["tokenizer.ggml.pre"] == "tekken"
    assert {k: our_kv.get(k) for k in ref_kv if k.startswith("llama.")} == {
        k: v for k, v in ref_kv.items() if k.startswith("llama.")
    }


def _has_mark(text: str) -> bool:
    return any(unicodedata.category(c).startswith("M") for c in text)


def test_llama_cpp_tokenises_like_mistral_common(exported):
    require_optional("llama_cpp")
    import llama_cpp

    version, _, ours = exported
    reference = reference_tokenizer(version).instruct_tokenizer.tokenizer
    llm = llama_cpp.Llama(str(ours), vocab_only=True, verbose=False)
    texts = generated_strings(600, seed=7) + list(DEFAULT_PROBES)
    differing = [t for t in texts if llm.tokenize(t.encode(), add_bos=True) != reference.encode(t, True, False)]
    # llama.cpp's own regex engine splits combining marks (\p{M}, e.g. Devanagari vowel signs) off letters in its
    # tekken pre-tokenizer: a llama.cpp limitation, the converter's GGUF has it too (same pre-tokenizer).
    assert differing and all(_has_mark(t) for t in differing)
    plain = [t for t in texts if not _has_mark(t)]
    assert len(plain) > 500
    tok = load_tokenizer(version)
    for chat in CHATS:
        text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        got = llm.tokenize(text.encode(), add_bos=False, special=True)
        assert got == reference_chat_ids(chat, version, add_generation_prompt=True), chat
    assert np.array_equal(llm.tokenize(b"", add_bos=True), [1])


def test_gguf_template_renders_tool_prompts(exported):
    """Tekken GGUFs: prompts with tools, calls and results, from the embedded template (plain Jinja2 and
    llama-cpp-python) through llama.cpp's tokenizer, give mistral_common's ids."""
    require_optional("llama_cpp")
    import llama_cpp
    from tool_conversations import check_gguf_tool_prompts

    version, _, ours = exported
    llm = llama_cpp.Llama(str(ours), vocab_only=True, verbose=False)
    assert check_gguf_tool_prompts(llm, version, count=20) == 20


def test_modelfile_template_follows_the_format(exported):
    from mistral_fast.export import write_modelfile
    from mistral_fast.export.gguf import OLLAMA_TEMPLATES

    version, _, ours = exported
    text = write_modelfile(ours).read_text()
    expected = OLLAMA_TEMPLATES["v7" if version == "v7-tekken" else "v3"]
    assert f'TEMPLATE """{expected}"""' in text
    assert "[INST]" in text and 'PARAMETER stop "</s>"' in text
