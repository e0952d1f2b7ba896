"""The tekken tokenizers (Mistral Nemo v3, Mistral Small 3 v7) equal mistral_common id for id: text and chats."""

from __future__ import annotations

import itertools
import json
import shutil

import pytest
from test_chat_template import (
    PROMPTS,
    REJECTED,
    TRAINING,
    _a,
    _s,
    _u,
    check_every_role_sequence,
    check_rejected,
    expected_mask,
)
from test_tokenizer import generated_strings, mismatches

from mistral_fast.errors import TokenizerError
from mistral_fast.tekken import CHAT_TEMPLATE_V7, TEKKEN_FILENAME, read_tekken, tekken_file
from mistral_fast.tokenizer import (
    CHAT_TEMPLATE_V3,
    DEFAULT_PROBES,
    check_tokenizer,
    load_tokenizer,
    reference_chat_ids,
    reference_tokenizer,
    validate_conversation,
)

VERSIONS = ["v3-tekken", "v7-tekken"]
# The split regex of hub tokenizer.json files converted before transformers #42299 (Llama 3's): it splits
# combining marks (\p{M}) off letters, so Devanagari words are cut where tekken keeps them whole.
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@pytest.fixture(scope="module")
def toks():
    return {v: load_tokenizer(v) for v in VERSIONS}


@pytest.fixture(scope="module")
def ref():
    return reference_tokenizer("v3-tekken").instruct_tokenizer.tokenizer


def test_generated_strings_equal_mistral_common(toks, ref):
    texts = generated_strings(2500, seed=0) + list(DEFAULT_PROBES)
    texts += [" " * k + tail for k in range(0, 40) for tail in ("", "x", "word", "\n", "😀", "中", "123")]
    texts += ["CamelCaseWord HTTPServer iPhone eBay NaOH 12345678 3.14159 x1y2z3", "日本語のテキスト、中文分词。한국어"]
    assert len(texts) >= 2000
    assert mismatches(toks["v3-tekken"], ref, texts) == []
    # Mistral Small's format uses the same vocabulary: the same text ids, from its own v7 reference
    ref_v7 = reference_tokenizer("v7-tekken").instruct_tokenizer.tokenizer
    assert mismatches(toks["v7-tekken"], ref_v7, texts[:500]) == []


def test_decode_round_trips(toks, ref):
    texts = generated_strings(500, seed=2) + list(DEFAULT_PROBES)
    tok = toks["v3-tekken"]
    decoded = tok.batch_decode(tok(texts)["input_ids"], skip_special_tokens=True)
    assert [t for t, d in zip(texts, decoded, strict=True) if t != d] == []
    ids = ref.encode("héllo 😀 中文", bos=True, eos=False)
    assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids)


@pytest.mark.parametrize("version", VERSIONS)
def test_vocabulary_and_control_tokens(version, toks):
    tok = toks[version]
    assert len(tok) == tok.vocab_size == 131072
    assert reference_tokenizer(version).instruct_tokenizer.tokenizer.n_words == 131072
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token, tok.pad_token_id) == (1, 2, "<pad>", 11)
    names = ["<unk>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "<SPECIAL_20>", "<SPECIAL_999>"]
    assert tok.convert_tokens_to_ids(names) == [0, 3, 4, 17, 18, 20, 999]
    decoder = tok.added_tokens_decoder  # every control id 0-999 is special: never produced from text
    assert sorted(decoder) == list(range(1000)) and all(decoder[i].special for i in range(1000))
    assert tok.decode([1, 3, 22177, 4, 20, 2], skip_special_tokens=True) == "Hello"
    ids = tok("Hello")["input_ids"]
    assert ids[0] == 1 and ids[-1] != 2
    assert tok.chat_template == (CHAT_TEMPLATE_V7 if version == "v7-tekken" else CHAT_TEMPLATE_V3)


def test_control_token_text(toks, ref):
    tok = toks["v3-tekken"]
    text = "a [INST] b </s> c <s>[/INST] [SYSTEM_PROMPT] <SPECIAL_42>"
    assert tok(text, split_special_tokens=True)["input_ids"] == ref.encode(text, bos=True, eos=False)
    assert {3, 4, 17, 42} <= set(tok(text)["input_ids"])


@pytest.mark.parametrize("version", VERSIONS)
def test_save_and_reload(version, toks, tmp_path):
    from transformers import AutoTokenizer

    toks[version].save_pretrained(tmp_path)
    assert not (tmp_path / TEKKEN_FILENAME).exists()  # a plain tokenizer.json: any HF consumer reads it
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path))
    texts = generated_strings(300, seed=3)
    assert reloaded(texts)["input_ids"] == toks[version](texts)["input_ids"]
    assert check_tokenizer(reloaded, version) == []
    assert reloaded.chat_template == toks[version].chat_template and reloaded.pad_token == "<pad>"
    conversation = [_s(0), _u(1), _a(1)]
    assert reloaded.apply_chat_template(conversation, return_dict=False) == reference_chat_ids(conversation, version)


def _tekken_copy(directory, version: str) -> None:
    data = json.loads(tekken_file().read_text(encoding="utf-8"))
    data["config"]["version"] = version
    directory.mkdir(parents=True, exist_ok=True)
    (directory / TEKKEN_FILENAME).write_text(json.dumps(data), encoding="utf-8")


def test_load_a_model_directory_with_tekken_json(tmp_path):
    """Mistral Small's repository: tekken.json with config.version v7 → the v7 format, exact ids."""
    _tekken_copy(tmp_path / "small", "v7")
    shutil.copy(tekken_file(), tmp_path / "nemo.json")
    tok = load_tokenizer(path=tmp_path / "small")
    assert tok.chat_template == CHAT_TEMPLATE_V7
    conversation = [_s(0), _u(0), _a(0), _u(1), _a(1)]
    assert tok.apply_chat_template(conversation, return_dict=False) == reference_chat_ids(conversation, "v7-tekken")
    assert check_tokenizer(tok, "v7-tekken") == []
    _tekken_copy(tmp_path / "nemo", "v3")
    assert load_tokenizer(path=tmp_path / "nemo").chat_template == CHAT_TEMPLATE_V3
    _tekken_copy(tmp_path / "v13", "v13")  # no special_tokens table: mistral_common refuses it too
    with pytest.raises(TokenizerError, match=r"control tokens \['\[ARGS\]'\] are missing.*v13-tekken"):
        load_tokenizer(path=tmp_path / "v13")
    _tekken_copy(tmp_path / "v15", "v15")
    with pytest.raises(TokenizerError, match=r"config.version is 'v15'.*'v11', 'v13'"):
        load_tokenizer(path=tmp_path / "v15")
    with pytest.raises(TokenizerError, match="no tekken file"):
        read_tekken(tmp_path / "missing")


def test_a_tokenizer_json_with_the_wrong_regex_is_named(toks, tmp_path):
    """A model's own tokenizer.json with Llama 3's split regex (the transformers #42299 bug) is caught."""
    toks["v3-tekken"].save_pretrained(tmp_path)
    data = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    split = data["pre_tokenizer"]["pretokenizers"][0]
    assert split["type"] == "Split"
    split["pattern"] = {"Regex": LLAMA3_REGEX}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.warns(UserWarning, match=r"differs from mistral_common's v3-tekken tokenizer .*first: .*#42299") as w:
        load_tokenizer("v3-tekken", path=tmp_path)
    differing = check_tokenizer(load_tokenizer("v3-tekken", path=tmp_path), "v3-tekken")
    assert differing and repr(differing[0]) in str(w[0].message)


# ---------------------------------------------------------------------------------------------- chats


@pytest.mark.parametrize("version", VERSIONS)
def test_chats_match_mistral_common(version, toks):
    tok = toks[version]
    for conversation in TRAINING:
        ours = tok.apply_chat_template(conversation, return_dict=True, return_assistant_tokens_mask=True)
        ref_ids, ref_mask = expected_mask(conversation, version)
        assert ref_ids == reference_chat_ids(conversation, version)
        assert list(ours["input_ids"]) == ref_ids, conversation
        assert list(ours["assistant_masks"]) == ref_mask, conversation
        cont = tok.apply_chat_template(conversation, continue_final_message=True, return_dict=False)
        assert cont == reference_chat_ids(conversation, version, continue_final_message=True), conversation
    for conversation, gen in itertools.product(PROMPTS, (True, False)):
        ours = tok.apply_chat_template(conversation, add_generation_prompt=gen, return_dict=False)
        assert ours == reference_chat_ids(conversation, version, add_generation_prompt=gen), conversation


def test_rendering(toks):
    conversation = [_s(0), _u(0), _a(0), _u(1)]
    v7 = toks["v7-tekken"].apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    system = "[SYSTEM_PROMPT]You are a helpful assistant.[/SYSTEM_PROMPT]"
    assert v7 == f"<s>{system}[INST]Hello![/INST]Hi there.</s>[INST]  What is 2 + 2?  [/INST]"
    v3 = toks["v3-tekken"].apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert v3 == "<s>[INST]Hello![/INST]Hi there.</s>[INST]You are a helpful assistant.\n\n  What is 2 + 2?  [/INST]"


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(("conversation", "kwargs"), REJECTED)
def test_rejected_conversations(version, conversation, kwargs, toks):
    check_rejected(toks[version], version, conversation, kwargs)


@pytest.mark.parametrize("version", VERSIONS)
def test_every_role_sequence_agrees_with_mistral_common(version, toks):
    texts = [
        "Hello!",
        "  What?  ",
        "Sure:\n```py\nx\n```\n",
        "Ça 日本語 😀 ",
        "",
        " ",
        "x  ",
        "\n",
        "\U0001d518",
        "12345",
    ]
    check_every_role_sequence(toks[version], version, texts)


def test_validator_knows_the_tekken_control_strings():
    for text in ("[SYSTEM_PROMPT] x", "a <SPECIAL_42> b", "</s>", "<pad>"):
        with pytest.raises(TokenizerError, match="control-token string"):
            validate_conversation([{"role": "user", "content": text}], "v7-tekken")
    validate_conversation([{"role": "user", "content": "[control_768] is plain text in tekken"}], "v3-tekken")
