"""The built tokenizers equal mistral_common id for id on plain text, round-trip, save and reload."""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mistral_fast.errors import TokenizerError
from mistral_fast.tokenizer import (
    CHAT_TEMPLATE_V1,
    CHAT_TEMPLATE_V3,
    DEFAULT_PROBES,
    check_tokenizer,
    load_tokenizer,
    reference_tokenizer,
    sentencepiece_path,
)

# Fragments the generator mixes: the cases SentencePiece ports get wrong (space runs, leading spaces,
# newlines, tabs), scripts with and without pieces, characters only byte fallback can encode, code.
_WORDS = ["hello", "world", "the", "Mistral", "tokenizer", "naïve", "über", "x", "I", "a", "don't", "e.g."]
_SPACES = [" ", "  ", "   ", "    ", " " * 8, " " * 15, " " * 16, " " * 17, " " * 33, "\u00a0", "\u3000"]
_BREAKS = ["\n", "\n\n", "\r\n", "\t", "\t\t", " \n", "\n ", "\n    ", "\v", "\f"]
_ACCENTS = ["é", "è", "ñ", "ç", "Å", "ø", "ß", "œ", "Ž", "ı", "ǅ", "e\u0301", "ﬁ", "Ω", "µ"]
_EMOJI = ["😀", "🎉", "👍🏽", "👩‍💻", "🇫🇷", "❤️", "🦜", "🧬", "☕"]
_CJK = ["中文", "分词", "日本語", "ひらがな", "カタカナ", "한국어", "漢字テスト", "。", "，"]
_OTHER_SCRIPTS = ["Ελληνικά", "русский", "עברית", "العربية", "हिन्दी", "ไทย", "ქართული", "Հայերեն"]
_BYTE_FALLBACK = [
    "\x00",
    "\x01",
    "\x1b",
    "\x7f",
    "\u200b",
    "\u2028",
    "\ue000",
    "\U0001d518",
    "\U00010330",
    "\U000e0041",
]
_DIGITS = ["0", "7", "42", "3.14159", "1,000,000", "2024-06-01", "0x1F", "1e-9", "١٢٣", "½"]
_CODE = [
    "def f(x):\n    return x ** 2\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
    '{"key": [1, 2, 3], "n": null}',
    "SELECT * FROM t WHERE a = 'b';",
    "    if x:  # comment\n        pass",
    '<div class="a">&amp;</div>',
    "$ ls -la | grep .py",
    "λx. x + 1",
]
_PUNCT = list(".,;:!?'\"()[]{}<>=+-*/#_@%&|\\^~`")
_POOLS = [_WORDS, _SPACES, _BREAKS, _ACCENTS, _EMOJI, _CJK, _OTHER_SCRIPTS, _BYTE_FALLBACK, _DIGITS, _CODE, _PUNCT]


def generated_strings(n: int, seed: int) -> list[str]:
    """``n`` seeded random strings built from the fragment pools, with leading/trailing space variants."""
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < n:
        parts = []
        for _ in range(rng.randint(0, 12)):
            pool = rng.choice(_POOLS)
            parts.append(rng.choice(pool))
            if rng.random() < 0.5:
                parts.append(" ")
        text = "".join(parts)
        shape = rng.random()
        if shape < 0.15:
            text = " " * rng.randint(1, 20) + text
        elif shape < 0.25:
            text = text + " " * rng.randint(1, 20)
        elif shape < 0.3:
            text = rng.choice(_BREAKS) + text + rng.choice(_BREAKS)
        out.append(text)
    return out


def mismatches(tokenizer, reference, texts: list[str], drop_bos: bool = False) -> list[str]:
    """The texts whose ids differ; ``drop_bos`` compares the text tokens only."""
    got = tokenizer(texts, add_special_tokens=not drop_bos)["input_ids"]
    return [
        t for t, ids in zip(texts, got, strict=True) if list(ids) != reference.encode(t, bos=not drop_bos, eos=False)
    ]


@pytest.fixture(scope="module")
def tok_v3():
    return load_tokenizer("v3")


@pytest.fixture(scope="module")
def tok_v1():
    return load_tokenizer("v1")


@pytest.fixture(scope="module")
def ref_v3():
    return reference_tokenizer("v3").instruct_tokenizer.tokenizer


@pytest.fixture(scope="module")
def ref_v1():
    return reference_tokenizer("v1").instruct_tokenizer.tokenizer


@pytest.fixture(scope="module")
def transformers_converted(tmp_path_factory):
    """The tokenizer transformers itself builds from the SentencePiece file (an independent, wrong port)."""
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("spm_only")
    shutil.copy(sentencepiece_path("v3"), directory / "tokenizer.model")
    return AutoTokenizer.from_pretrained(str(directory))


def test_generated_strings_are_free_of_control_token_text():
    specials = ["<s>", "</s>", "<unk>", "[INST]", "[/INST]", "[control_"]
    assert not [t for t in generated_strings(2500, seed=0) if any(s in t for s in specials)]


def test_v3_equals_mistral_common_on_generated_strings(tok_v3, ref_v3):
    texts = generated_strings(2500, seed=0) + list(DEFAULT_PROBES)
    assert mismatches(tok_v3, ref_v3, texts) == []


def test_v1_equals_mistral_common_on_generated_strings(tok_v1, ref_v1):
    texts = generated_strings(600, seed=1) + list(DEFAULT_PROBES)
    assert mismatches(tok_v1, ref_v1, texts) == []


@pytest.mark.parametrize("version", ["v3", "v1"])
def test_space_runs_of_every_length(version, request):
    tok = request.getfixturevalue(f"tok_{version}")
    ref = request.getfixturevalue(f"ref_{version}")
    texts = [" " * k + tail for k in range(0, 70) for tail in ("", "x", "word", "\n", "😀", "中")]
    texts += ["a" + " " * k + "b" for k in range(70)] + ["a" + "\t" * k + " " * k for k in range(20)]
    assert mismatches(tok, ref, texts) == []


def test_decode_round_trips(tok_v3, ref_v3, tok_v1):
    texts = generated_strings(500, seed=2) + list(DEFAULT_PROBES)
    for tok in (tok_v3, tok_v1):
        ids = tok(texts)["input_ids"]
        decoded = tok.batch_decode(ids, skip_special_tokens=True)
        assert [t for t, d in zip(texts, decoded, strict=True) if t != d] == []
    assert all(ref_v3.decode(ref_v3.encode(t, bos=True, eos=False)) == t for t in texts[:100])


def test_control_token_text(tok_v3, ref_v3):
    text = "a [INST] b </s> c <s>[/INST]"
    plain = tok_v3(text, split_special_tokens=True)["input_ids"]
    assert plain == ref_v3.encode(text, bos=True, eos=False)  # as text, like mistral_common
    assert {1, 2, 3, 4} <= set(tok_v3(text)["input_ids"][1:])  # as control tokens, for the chat template
    assert tok_v3.convert_tokens_to_ids(["[INST]", "[/INST]", "[TOOL_CALLS]"]) == [3, 4, 5]


@pytest.mark.parametrize(("version", "size", "pad"), [("v3", 32768, "[control_768]"), ("v1", 32000, "<unk>")])
def test_vocabulary_and_special_tokens(version, size, pad, request):
    tok = request.getfixturevalue(f"tok_{version}")
    assert len(tok) == size and tok.vocab_size == size
    assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == ("<s>", "</s>", "<unk>", pad)
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    assert tok.pad_token_id not in (tok.eos_token_id, tok.bos_token_id)
    assert tok.add_bos_token and not tok.add_eos_token
    ids = tok("Hello")["input_ids"]
    assert ids[0] == 1 and ids[-1] != 2
    assert tok.chat_template == (CHAT_TEMPLATE_V3 if version == "v3" else CHAT_TEMPLATE_V1)
    assert reference_tokenizer(version).instruct_tokenizer.tokenizer.n_words == size


def test_load_returns_independent_copies():
    a, b = load_tokenizer("v3"), load_tokenizer("v3")
    a.add_tokens(["<extra_token>"])
    assert len(b) == 32768


def test_unknown_version_is_refused():
    with pytest.raises(TokenizerError, match="'v3'"):
        load_tokenizer("v2")


def test_save_and_reload(tok_v3, ref_v3, tmp_path):
    from transformers import AutoTokenizer

    tok_v3.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path))
    texts = generated_strings(300, seed=3)
    assert reloaded(texts)["input_ids"] == tok_v3(texts)["input_ids"]
    assert mismatches(reloaded, ref_v3, texts) == []
    assert reloaded.chat_template == CHAT_TEMPLATE_V3
    assert reloaded.pad_token == "[control_768]"
    conversation = [{"role": "user", "content": " hi  "}, {"role": "assistant", "content": "yo  "}]
    assert reloaded.apply_chat_template(conversation, return_dict=False) == tok_v3.apply_chat_template(
        conversation, return_dict=False
    )
    assert check_tokenizer(reloaded) == []


def test_check_tokenizer_accepts_ours(tok_v3, tok_v1):
    assert check_tokenizer(tok_v3, "v3") == []
    assert check_tokenizer(tok_v1, "v1") == []
    assert check_tokenizer(tok_v3, "v1") != []  # the other version is a different tokenizer


def test_transformers_conversion_differs(transformers_converted, ref_v3):
    """transformers' own port of the .model file: merges by id, no dummy prefix, no BOS."""
    assert check_tokenizer(transformers_converted, "v3") != []
    texts = generated_strings(2500, seed=0)
    with_bos = mismatches(transformers_converted, ref_v3, texts)
    text_only = mismatches(transformers_converted, ref_v3, texts, drop_bos=True)
    # supply the dummy prefix by hand: what is left is the merge order (whitespace pieces merged first)
    prefixed = transformers_converted([" " + t for t in texts], add_special_tokens=False)["input_ids"]
    merge_order = [t for t, ids in zip(texts, prefixed, strict=True) if ids != ref_v3.encode(t, bos=False, eos=False)]
    print(
        f"transformers' conversion: {len(with_bos)}/{len(texts)} differ, {len(text_only)} in the text tokens, "
        f"{len(merge_order)} with the dummy prefix supplied"
    )
    assert len(text_only) > 1000 and len(merge_order) > 100
    assert transformers_converted(" hi  there", add_special_tokens=False)["input_ids"] != ref_v3.encode(
        "hi  there", bos=False, eos=False
    )


def test_transformers_llama_class_differs(ref_v3, tmp_path):
    """A directory with tokenizer.model and a LlamaTokenizer config (legacy=False), as in hub repos."""
    from transformers import AutoTokenizer

    shutil.copy(sentencepiece_path("v3"), tmp_path / "tokenizer.model")
    config = '{"tokenizer_class": "LlamaTokenizer", "legacy": false, "add_bos_token": true}'
    (tmp_path / "tokenizer_config.json").write_text(config)
    llama = AutoTokenizer.from_pretrained(str(tmp_path))
    texts = generated_strings(2500, seed=0)
    differing = mismatches(llama, ref_v3, texts)
    print(f"transformers' LlamaTokenizer from the .model file: {len(differing)}/{len(texts)} differ")
    assert len(differing) > 100


def test_load_with_path_warns_on_a_differing_tokenizer(transformers_converted, tmp_path):
    directory = Path(transformers_converted.name_or_path)
    with pytest.warns(UserWarning, match="differs from mistral_common"):
        tok = load_tokenizer("v3", path=directory)
    assert tok.chat_template == CHAT_TEMPLATE_V3


def test_load_with_path_of_a_saved_tokenizer(tok_v3, tmp_path, recwarn):
    tok_v3.save_pretrained(tmp_path)
    tok = load_tokenizer(path=tmp_path)
    assert not [w for w in recwarn if "differs" in str(w.message)]
    assert tok("  hi")["input_ids"] == tok_v3("  hi")["input_ids"]


def test_load_with_a_bad_path(tmp_path):
    with pytest.raises(TokenizerError, match="path="):
        load_tokenizer(path=tmp_path / "missing")


def test_module_import_is_light():
    code = (
        "import sys, mistral_fast.tokenizer, mistral_fast; mistral_fast.check_tokenizer;"
        "print(sorted(m for m in ('torch', 'transformers', 'mistral_common') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
