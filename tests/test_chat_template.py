"""The chat templates reproduce mistral_common's encode_chat_completion token for token, with exact masks."""

from __future__ import annotations

import itertools
import random
from typing import TYPE_CHECKING

import jinja2
import pytest

from mistral_fast.errors import TokenizerError
from mistral_fast.tekken import TEKKEN_VERSIONS
from mistral_fast.tokenizer import (
    CHAT_TEMPLATE_V1,
    CHAT_TEMPLATE_V3,
    CHAT_TEMPLATE_V7,
    load_tokenizer,
    reference_chat_ids,
    reference_tokenizer,
    validate_conversation,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

# Message texts: plain, leading/trailing whitespace, trailing spaces (right-stripped in v3), newlines,
# unicode and byte-fallback characters, code.
_USER = [
    "Hello!",
    "  What is 2 + 2?  ",
    "Explain this:\n\ndef f(x):\n    return x",
    "Ça va? 日本語で答えて 😀",
    "\tTabbed question\n",
    "   ",
    "one\n\n\ntwo",
]
_ASSISTANT = [
    "Hi there.",
    "4   ",
    "Sure:\n```python\nprint('x')\n```\n",
    "Ça va bien, merci 👍🏽 ",
    " leading space",
    "trailing newline and spaces \n  ",
    "\u200b\U0001d518 rare",
]
_SYSTEM = ["You are a helpful assistant.", "Answer in French.\n", "  Be brief.  ", ""]


def _u(i: int) -> dict[str, str]:
    return {"role": "user", "content": _USER[i % len(_USER)]}


def _a(i: int) -> dict[str, str]:
    return {"role": "assistant", "content": _ASSISTANT[i % len(_ASSISTANT)]}


def _s(i: int) -> dict[str, str]:
    return {"role": "system", "content": _SYSTEM[i % len(_SYSTEM)]}


def training_conversations() -> list[list[dict[str, str]]]:
    """Conversations ending with an assistant message, generated shape by shape."""
    out: list[list[dict[str, str]]] = []
    for i in range(7):  # single turn, every text pair
        out.append([_u(i), _a(i)])
    for turns in (2, 3, 4):  # multi turn
        for i in range(3):
            out.append([m for t in range(turns) for m in (_u(i + t), _a(i + 2 * t))])
    for i in range(4):  # system prompt at the start (v3: moves to the last user message)
        out.append([_s(i), _u(i), _a(i)])
        out.append([_s(i), _u(i), _a(i), _u(i + 1), _a(i + 1)])
    for i in range(3):  # several system messages, system messages in the middle
        out.append([_s(0), _s(i + 1), _u(i), _a(i), _u(i + 2), _a(i + 2)])
        out.append([_u(i), _s(i), _u(i + 1), _a(i)])
        out.append([_u(i), _s(i), _a(i), _u(i + 1), _a(i + 1)])
        out.append([_u(i), _a(i), _u(i + 1), _s(i), _a(i + 1)])  # system prompt late, after a user message
        out.append([_s(i), _u(i), _s(i + 1), _a(i)])
    for i in range(2):  # merged turns, empty user, assistant first, system then assistant
        out.append([_u(i), _u(i + 1), _a(i)])
        out.append([_u(i), _a(i), _a(i + 1)])
        out.append([{"role": "user", "content": ""}, _a(i)])
        out.append([_u(i), {"role": "user", "content": ""}, _a(i)])
        out.append([_a(i), _u(i), _a(i + 1)])
        out.append([_s(i), _a(i), _u(i), _a(i + 1)])
        out.append([{"role": "assistant", "content": "   "}, _u(i), {"role": "assistant", "content": "  "}])
    return out


TRAINING = training_conversations()


def prompt_conversations() -> list[list[dict[str, str]]]:
    """Prompts (ending with a user or system message) derived from the training conversations."""
    prompts = [c[:-1] for c in TRAINING]
    prompts += [[_u(0)], [_s(0)], [_s(0), _s(1)], [_u(1), _s(1)], [_s(2), _u(2), _a(2), _u(3)]]
    return [p for p in prompts if p and p[-1]["role"] != "assistant"]


PROMPTS = prompt_conversations()


@pytest.fixture(scope="module")
def toks():
    return {"v3": load_tokenizer("v3"), "v1": load_tokenizer("v1")}


def test_enough_conversations():
    assert len(TRAINING) >= 50 and len(PROMPTS) >= 40


@pytest.mark.parametrize("version", ["v3", "v1"])
def test_training_conversations_match(version, toks):
    tok = toks[version]
    wrong = []
    for conversation in TRAINING:
        ours = tok.apply_chat_template(conversation, tokenize=True, return_dict=False)
        if ours != reference_chat_ids(conversation, version):
            wrong.append(conversation)
    assert wrong == []


@pytest.mark.parametrize("version", ["v3", "v1"])
def test_prompts_match_with_and_without_generation_prompt(version, toks):
    tok = toks[version]
    for conversation, gen in itertools.product(PROMPTS, (True, False)):
        ours = tok.apply_chat_template(conversation, add_generation_prompt=gen, return_dict=False)
        assert ours == reference_chat_ids(conversation, version, add_generation_prompt=gen), conversation


@pytest.mark.parametrize("version", ["v3", "v1"])
def test_continue_final_message_matches(version, toks):
    tok = toks[version]
    for conversation in TRAINING:
        ours = tok.apply_chat_template(conversation, continue_final_message=True, return_dict=False)
        assert ours == reference_chat_ids(conversation, version, continue_final_message=True), conversation


def test_default_return_type_is_a_dict(toks):
    """transformers 5: tokenize=True returns a BatchEncoding unless return_dict=False."""
    out = toks["v3"].apply_chat_template(TRAINING[0])
    assert list(out["input_ids"]) == reference_chat_ids(TRAINING[0])


def test_v3_rendering_has_no_spaces_around_control_tokens(toks):
    text = toks["v3"].apply_chat_template([_s(0), _u(0), _a(0)], tokenize=False)
    assert text == "<s>[INST]You are a helpful assistant.\n\nHello![/INST]Hi there.</s>"
    text = toks["v1"].apply_chat_template([_s(0), _u(0), _a(0)], tokenize=False)
    assert text == "<s>[INST] You are a helpful assistant.\n\nHello! [/INST] Hi there.</s>"


def expected_mask(conversation: list[dict[str, str]], version: str) -> tuple[list[int], list[int]]:
    """Ids and assistant mask computed from mistral_common alone, message by message.

    The request is normalised by mistral_common, each normalised message is encoded by its instruct
    tokenizer; assistant messages (their text and their `</s>`) are marked. Every version: a tekken one is
    normalised as the instruct version it stands for, and v7 keeps system messages in place.
    """
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.normalize import get_normalizer
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.base import TokenizerVersion

    classes = {"user": UserMessage, "assistant": AssistantMessage, "system": SystemMessage}
    request = ChatCompletionRequest(messages=[classes[m["role"]](content=m["content"]) for m in conversation])
    instruct_version = TokenizerVersion(TEKKEN_VERSIONS.get(version, version))
    instruct = get_normalizer(instruct_version).from_chat_completion_request(request)
    encoder = reference_tokenizer(version, "finetuning").instruct_tokenizer
    users = [i for i, m in enumerate(instruct.messages) if isinstance(m, UserMessage)] or [-1]  # v7: maybe none
    ids, mask = [encoder.tokenizer.bos_id], [0]
    for i, message in enumerate(instruct.messages):
        if isinstance(message, UserMessage):
            new, _, _ = encoder.encode_user_message(
                message, None, i == users[-1], i == users[0], system_prompt=instruct.system_prompt
            )
        elif isinstance(message, SystemMessage):  # only v7 keeps them (v1/v3 fold them into system_prompt)
            new, _ = encoder.encode_system_message(message)
        else:
            new = encoder.encode_assistant_message(message, is_before_last_user_message=i < users[-1])
        ids += new
        mask += [int(isinstance(message, AssistantMessage))] * len(new)
    return ids, mask


@pytest.mark.parametrize("version", ["v3", "v1"])
def test_assistant_mask_is_exactly_the_assistant_tokens(version, toks):
    tok = toks[version]
    for conversation in TRAINING:
        ref_ids, ref_mask = expected_mask(conversation, version)
        assert ref_ids == reference_chat_ids(conversation, version)
        out = tok.apply_chat_template(conversation, return_dict=True, return_assistant_tokens_mask=True)
        assert list(out["input_ids"]) == ref_ids
        assert list(out["assistant_masks"]) == ref_mask, conversation


def test_assistant_mask_by_prefix_encodings(toks):
    """Without system prompts the turns can also be located from mistral_common encodings of prefixes."""
    conversation = [_u(0), _a(1), _u(2), _a(3), _u(4), _a(5)]
    expected = [0] * len(reference_chat_ids(conversation))
    for end in (2, 4, 6):
        start, stop = len(reference_chat_ids(conversation[: end - 1])), len(reference_chat_ids(conversation[:end]))
        expected[start:stop] = [1] * (stop - start)
    out = toks["v3"].apply_chat_template(conversation, return_dict=True, return_assistant_tokens_mask=True)
    assert list(out["assistant_masks"]) == expected
    assert sum(expected) > 6 and expected[-1] == 1


# (conversation, apply_chat_template kwargs): rejected by mistral_common, so by us too
REJECTED = [
    ([_a(0)], {}),
    ([_u(0), _a(0), _s(0), _u(1)], {}),
    ([_u(0), _a(0), _s(0)], {}),
    ([_s(0), _u(0), _a(0), _a(1), _s(1), _u(2)], {}),
    ([_u(0), {"role": "assistant", "content": ""}], {}),
    ([_u(0), {"role": "assistant", "content": ""}, _u(1)], {}),
    ([_u(0), _a(0)], {"add_generation_prompt": True}),
    ([_u(0), _a(0), _u(1)], {"continue_final_message": True}),
    ([_s(0)], {"continue_final_message": True}),
    ([_a(0)], {"continue_final_message": True}),
]


def check_rejected(tok: PreTrainedTokenizerFast, version: str, conversation: list, kwargs: dict) -> None:
    """mistral_common, `tok`'s template and the validator all reject `conversation`, naming the message."""
    with pytest.raises(TokenizerError):
        reference_chat_ids(conversation, version, **kwargs)
    with pytest.raises((jinja2.TemplateError, ValueError), match=r"message \d|empty"):
        tok.apply_chat_template(conversation, return_dict=False, **kwargs)
    with pytest.raises(TokenizerError, match=r"messages\[\d\]|empty conversation"):
        validate_conversation(conversation, version, **kwargs)


@pytest.mark.parametrize("version", ["v3", "v1"])
@pytest.mark.parametrize(("conversation", "kwargs"), REJECTED)
def test_rejected_conversations(version, conversation, kwargs, toks):
    check_rejected(toks[version], version, conversation, kwargs)


@pytest.mark.parametrize(
    ("conversation", "match"),
    [
        ([], "empty"),
        ([{"role": "tool", "content": "42"}], r"messages\[0\]: a tool result with no assistant tool call"),
        ([{"role": "function", "content": "42"}], r"messages\[0\]: unknown role 'function'"),
        ([_u(0), {"role": "assistant", "content": None}], "content must be a string"),
        ([_u(0), {"role": "assistant", "content": "", "tool_calls": [{"name": "f"}]}], "tool_calls"),
        (["hello"], "mapping"),
        ([{"role": "user", "content": "say [INST] please"}], r"control-token string '\[INST\]'"),
        ([_u(0), {"role": "assistant", "content": "done</s>"}], "'</s>'"),
    ],
)
def test_validator_errors_say_what_and_where(conversation, match):
    with pytest.raises(TokenizerError, match=match):
        validate_conversation(conversation)


def test_template_errors_name_the_message(toks):
    with pytest.raises(jinja2.TemplateError, match="message 4 is a system message directly after an assistant"):
        toks["v3"].apply_chat_template([_u(0), _a(0), _u(1), _a(1), _s(0)], return_dict=False)
    with pytest.raises(jinja2.TemplateError, match="message 1 is a tool result that does not follow an assistant"):
        toks["v3"].apply_chat_template([_u(0), {"role": "tool", "content": "x"}], return_dict=False)
    with pytest.raises(jinja2.TemplateError, match="message 1 has role tool"):  # v1 has no tool format
        toks["v1"].apply_chat_template([_u(0), {"role": "tool", "content": "x"}], return_dict=False)


@pytest.mark.parametrize("version", ["v3", "v1"])
def test_validator_accepts_what_mistral_common_accepts(version):
    for conversation in TRAINING:
        validate_conversation(conversation, version)
        validate_conversation(conversation, version, continue_final_message=True)
    for conversation in PROMPTS:
        validate_conversation(conversation, version, add_generation_prompt=True)
    with pytest.raises(TokenizerError, match="cannot both"):
        validate_conversation(TRAINING[0], version, add_generation_prompt=True, continue_final_message=True)


def test_decoding_a_chat(toks):
    ids = toks["v3"].apply_chat_template([_u(1), _a(1)], return_dict=False)
    assert toks["v3"].decode(ids) == "<s>[INST]   What is 2 + 2?  [/INST] 4</s>"
    assert toks["v3"].decode(ids, skip_special_tokens=True) == "  What is 2 + 2?   4"


def check_every_role_sequence(tok: PreTrainedTokenizerFast, version: str, texts: list[str]) -> None:
    """All 363 role sequences of 1-5 messages x {plain, generation prompt, continuation}, texts drawn from
    `texts`: `tok`'s template gives mistral_common's ids (and assistant masks), or mistral_common, the
    template and the validator all reject the conversation."""
    rng = random.Random(version)
    outcomes = {"accepted": 0, "rejected": 0}
    for length in range(1, 6):
        for roles in itertools.product(["system", "user", "assistant"], repeat=length):
            for mode in ("plain", "generation", "continuation"):
                conversation = [{"role": r, "content": rng.choice(texts)} for r in roles]
                kwargs = {
                    "add_generation_prompt": mode == "generation",
                    "continue_final_message": mode == "continuation",
                }
                try:
                    expected = reference_chat_ids(conversation, version, **kwargs)
                except TokenizerError:
                    expected = None
                try:
                    ours = tok.apply_chat_template(conversation, return_dict=False, **kwargs)
                except (jinja2.TemplateError, ValueError):
                    ours = None
                try:
                    validate_conversation(conversation, version, **kwargs)
                    valid = True
                except TokenizerError:
                    valid = False
                assert (ours, valid) == (expected, expected is not None), (mode, conversation)
                if valid and mode == "plain" and roles[-1] == "assistant":
                    out = tok.apply_chat_template(
                        conversation, return_dict=True, return_assistant_tokens_mask=True
                    )
                    assert list(out["assistant_masks"]) == expected_mask(conversation, version)[1], conversation
                outcomes["accepted" if valid else "rejected"] += 1
    assert outcomes["accepted"] > 300 and outcomes["rejected"] > 300


@pytest.mark.parametrize("version", ["v3", "v1"])
def test_every_role_sequence_agrees_with_mistral_common(version, toks):
    texts = [*_USER, *_ASSISTANT, *_SYSTEM, "", " ", "x  ", "\n", "\nnewline first", "😀 emoji first", "\U0001d518"]
    check_every_role_sequence(toks[version], version, texts)


def test_validator_checks_every_control_token_string():
    for text in ("[control_768]", "x[TOOL_RESULTS]y", "<unk>", "[/AVAILABLE_TOOLS]"):
        with pytest.raises(TokenizerError, match="control-token string"):
            validate_conversation([{"role": "user", "content": text}])
    validate_conversation([{"role": "user", "content": "[control_769] [INST x] <s > [TOOL_CALLS] in v1"}], "v1")
    validate_conversation([{"role": "user", "content": "list[int] and <b>bold</b> " * 2000}])


def test_continue_tag_is_the_one_transformers_uses():
    import inspect

    from transformers.utils import chat_template_utils

    from mistral_fast.tekken import _CONTINUE_TAG

    assert f'"{_CONTINUE_TAG}"' in inspect.getsource(chat_template_utils.render_jinja_template)
    for template in (CHAT_TEMPLATE_V1, CHAT_TEMPLATE_V3, CHAT_TEMPLATE_V7):  # each template cuts at that tag
        assert f"{{%- set tag = '{_CONTINUE_TAG}' -%}}" in template
