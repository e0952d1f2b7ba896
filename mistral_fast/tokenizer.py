"""Exact Mistral tokenizers and chat templates, built offline from the files inside `mistral_common`.

Two tokenizers are provided, token-for-token identical to `mistral_common` 1.13 (the reference Mistral
publishes), as `transformers` fast tokenizers with a chat template:

* ``"v3"`` — Mistral-7B v0.3 (32,768 pieces, control tokens ``[INST]``, ``[/INST]``, ``[TOOL_CALLS]``, …,
  ``[control_768]``). The SentencePiece file is ``mistral_common/data/mistral_instruct_tokenizer_240216.model.v2``,
  byte-identical to Mistral-7B-v0.3's ``tokenizer.model.v3``. `mistral_common` infers the *instruct* version
  from the file suffix, so the reference is built explicitly as ``SentencePieceTokenizer(path, v3)`` +
  ``InstructTokenizerV3`` (``MistralTokenizer.v3()`` loads a different file, ``…240323.model.v3``).
* ``"v1"`` — Mistral-7B v0.1/v0.2 (32,000 pieces, ``tokenizer.model.v1``), reference ``InstructTokenizerV1``.

What goes wrong in transformers 5, and how this module fixes it
----------------------------------------------------------------
SentencePiece's BPE encoder does not split words: it starts from single characters and repeatedly merges the
adjacent pair whose concatenation is a piece with the highest *score* (ties: leftmost first), then falls back
to ``<0xNN>`` byte pieces for characters not in the vocabulary. The text is first normalised by replacing
``" "`` with ``"▁"`` and prepending one ``"▁"`` (``add_dummy_prefix``) to every encoded string.

Loading a directory holding only ``tokenizer.model`` with ``AutoTokenizer`` builds a `tokenizers` BPE whose
merges are ordered by piece *id*, a normaliser that replaces spaces but prepends no ``"▁"``, and no BOS
post-processor. In these vocabularies the 15 whitespace-only pieces (``"▁▁"`` … ``"▁"×16``) have the
lowest score (-1e9) but small ids (``"▁▁"`` is id 1027 in v3), so ordered by id they merge *first*: ``"  hi"``
becomes ``["▁▁", "hi"]`` where SentencePiece gives ``["▁▁", "▁hi"]``. Measured on the 2,500 generated strings
of `tests/test_tokenizer.py` (v3): 2,500 differ (no BOS), 2,385 in the text tokens (no dummy prefix), and
686 still differ when the dummy prefix is supplied by hand (the merge order alone). With a
``LlamaTokenizer`` config (``legacy=False``, as hub repositories have) transformers rebuilds the backend with
``Metaspace(prepend_scheme="first", split=False)`` and the same id-ordered merges: 947 of 2,500 differ.
``LlamaTokenizerFast(vocab_file=…)`` silently ignores the file and returns a 3-token tokenizer. The
``"first"`` prepend scheme also contradicts Mistral v3, which prefixes every text chunk between control
tokens, not only the first.

The tokenizer built here (`_build_backend`):

* vocabulary = the SentencePiece pieces with their ids; ``byte_fallback=True``;
* merges = for every normal piece, every split into two normal pieces, ordered by the piece's score
  (descending), so the BPE priority equals SentencePiece's. The whitespace-only merges, all tied at -1e9,
  come last, ordered so that BPE grows runs of ``"▁"`` from the left exactly like SentencePiece's
  leftmost-first tie-break (``"▁"×14 + "▁▁"`` first, then ``"▁"×k + "▁"`` for decreasing k, then ``"▁"+"▁"``;
  there is no ``"▁"×15`` piece, which is why the ``14 + 2`` merge matters);
* normaliser = ``Prepend("▁")`` then ``Replace(" ", "▁")``, applied by `tokenizers` to every text chunk
  between special tokens, which is exactly how `mistral_common` gives each chunk its own dummy prefix;
* pre-tokeniser = split before a ``"▁"`` that follows a non-``"▁"`` character. No piece has a ``"▁"``
  after another character, so no merge can cross such a boundary: the split changes nothing but speed and
  keeps runs of spaces together with the word that follows (``Metaspace(split=True)`` splits every ``"▁"``);
* control pieces (v3: ``<s>``, ``</s>``, ``[INST]`` … ``[control_768]``; v1: ``<s>``, ``</s>``) are special
  added tokens, so the chat template's ``[INST]`` text becomes the control token and splits the text;
* decoder = ``"▁"`` → space, byte fallback, fuse, strip the one leading dummy-prefix space.

It is wrapped as a plain `PreTrainedTokenizerFast` (`TokenizersBackend` in transformers 5), not as
`LlamaTokenizerFast`, because that class rebuilds the backend in ``__init__`` and would undo the above after
``save_pretrained``/``from_pretrained``. ``add_bos_token=True``, ``add_eos_token=False``. The pad token is not
``</s>`` (padding labelled as EOS would teach the model to stop everywhere or never): v3 pads with the unused
control token ``[control_768]`` (id 770, never produced from text nor by the base model); v1 has no unused
control token and pads with ``<unk>`` (id 0, never produced because of byte fallback).

Two transformers 5 behaviours to know: ``apply_chat_template(..., tokenize=True)`` returns a `BatchEncoding`
(``return_dict=True`` is the default; pass ``return_dict=False`` for a list of ids), and after
``save_pretrained``/``from_pretrained`` the ``add_bos_token`` attribute reads False (transformers drops it
from the saved config when a ``tokenizer.json`` exists) while BOS is still added by the saved post-processor.

One difference is inherent to any Hugging Face tokenizer: text that contains a control-token string such as
``"[INST]"`` or ``"</s>"`` becomes that control token, while `mistral_common` encodes it as plain text. Encode
untrusted raw text with ``tokenizer(text, split_special_tokens=True)`` to get `mistral_common`'s ids;
`validate_conversation` rejects chat messages containing such strings, because the template cannot escape them.

Chat format (what `mistral_common`'s ``encode_chat_completion`` does, reproduced by the Jinja templates)
-----------------------------------------------------------------------------------------------------
v3: ``<s>[INST]user[/INST]assistant</s>[INST]user[/INST]…``; every text chunk is SentencePiece-encoded on its
own (its own dummy prefix), no literal spaces around control tokens; assistant text is right-stripped of
spaces (only ``" "``, not newlines). v1: ``<s>`` + sp(``"[INST] user [/INST]"``) + sp(``assistant``) + ``</s>``
…; ``[INST]`` is plain text there, assistant text is *not* stripped. The template emits ``"[INST] u [/INST] a"``
as one chunk, which tokenises identically because no merge crosses the ``"]▁"`` boundary (and a space before
an ``[INST]`` that follows another user block, which mistral_common encodes as a chunk of its own).

Normalisation, the same in both versions except where the system prompt goes:

* all non-empty system messages are joined with ``"\\n\\n"`` and put in front of the **last** user message
  (v3) or the **first** user message (v1), followed by ``"\\n\\n"``;
* consecutive user messages are merged with ``"\\n\\n"`` (empty ones skipped), likewise consecutive
  assistant messages; a system message between two user messages keeps them as two ``[INST]`` blocks;
* if the conversation does not start with a user message (after dropping system messages), an empty user
  message is inserted: ``[assistant, user]`` encodes as ``<s>[INST][/INST]assistant</s>[INST]user[/INST]``;
* ``</s>`` after every assistant turn, none after a continued final message (``continue_final_message``);
  the generation prompt adds nothing (``[/INST]`` is the prompt).

`mistral_common` rejects (and so do the templates and `validate_conversation`): an empty conversation; a
single message that is not user/system; a system message directly after an assistant message (after a user
message it is fine, anywhere in the conversation); an assistant message with empty content; a final
assistant message when a generation prompt is requested, or a continuation whose last message is not an
assistant message. It accepts a conversation starting with an assistant message (if more follow), two user
messages in a row, and one ending with a system message. Its validator has modes: "test" (the default)
rejects a final assistant message, "finetuning" requires one; `reference_chat_ids` picks the mode from the
request.

Tool calls (v3 and every tekken version; not v1) and reasoning traces (v13): see
`mistral_fast.tekken.instruct_turns` for the formats and README "Tool calls and reasoning traces: encoding".
The templates take OpenAI-style messages (assistant ``tool_calls``, ``tool`` messages, content chunks) and
``tools``; `tokenize_conversation` first writes call arguments (and v3 tool results) as mistral_common writes
JSON (`_normalize_tool_json`), which a template cannot do (it cannot parse JSON).

``continue_final_message``: transformers appends ``"CONTINUE_FINAL_MESSAGE_TAG "`` to the last message,
renders, and cuts at the tag — stripping *all* trailing whitespace if the template changed the spacing,
while `mistral_common` strips only spaces (v3) or nothing (v1). The templates therefore strip the text
themselves and re-emit the tag intact, so the cut is exact (``"Hello\n"`` keeps its newline).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mistral_fast.constants import IGNORE_INDEX
from mistral_fast.errors import TokenizerError
from mistral_fast.families import TINY_MODELS, family_for_tokenizer, tokenizer_version
from mistral_fast.tekken import (
    BUILTIN_FILE,
    CHAT_TEMPLATE_V7,
    CHAT_TEMPLATE_V11,
    CHAT_TEMPLATE_V13,
    INSTRUCT_TURNS,
    TEKKEN_FILENAME,
    chat_template_prelude,
    is_tekken_version,
    load_tekken,
    tekken_reference,
    tekken_special_strings,
    tools_setup,
)

if TYPE_CHECKING:
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

    from mistral_fast.config import ModelConfig
    from mistral_fast.example import Example

__all__ = [
    "CHAT_TEMPLATE_V1",
    "CHAT_TEMPLATE_V3",
    "CHAT_TEMPLATE_V7",
    "CHAT_TEMPLATE_V11",
    "CHAT_TEMPLATE_V13",
    "DEFAULT_PROBES",
    "IGNORE_INDEX",
    "TokenizedExample",
    "check_tokenizer",
    "inference_template",
    "load_tokenizer",
    "parse_tool_calls",
    "preview_example",
    "reference_chat_ids",
    "reference_tokenizer",
    "sentencepiece_path",
    "tokenize_conversation",
    "tokenize_example",
    "tokenize_text",
    "tokenizer_for",
    "validate_conversation",
]

logger = logging.getLogger(__name__)

_SPACE = "▁"  # SentencePiece's whitespace symbol (U+2581)
_ROLES = ("system", "user", "assistant")

# ----------------------------------------------------------------------------------------- chat templates

# The v1/v3 rendering: all system texts joined in front of one user message (the first for v1, the last for v3),
# an empty user turn inserted before a leading assistant turn. Follows tekken.chat_template_prelude.
_SYSTEM_PROMPT_HEAD = """\
{%- if ns.items | length == 0 or ns.items[0]['role'] != 'user' -%}
  {%- set ns.items = [{'role': 'user', 'content': ''}] + ns.items -%}
{%- endif -%}
{%- set ns.target = -1 -%}
{%- for item in ns.items -%}
  {%- if item['role'] == 'user' and (ns.target == -1 or __SYSTEM_IN_LAST__) -%}
    {%- set ns.target = loop.index0 -%}
  {%- endif -%}
{%- endfor -%}
__TOOLS_SETUP__{{- '<s>' -}}
{%- for item in ns.items -%}
  {%- set content = item['content'] -%}
  {%- if loop.index0 == ns.target and ns.system -%}
    {%- set content = (ns.system | join('\n\n')) ~ '\n\n' ~ content -%}
  {%- endif -%}
"""

CHAT_TEMPLATE_V3 = (
    chat_template_prelude("v3", title="v3", builder="tokenizer", system_in_place=False)
    + _SYSTEM_PROMPT_HEAD.replace("__SYSTEM_IN_LAST__", "true").replace(
        "__TOOLS_SETUP__", tools_setup(first_user=False)
    )
    + """\
  {%- if item['role'] == 'user' -%}
"""
    + INSTRUCT_TURNS
)
"""Jinja chat template of Mistral-7B-Instruct-v0.3, token-exact with `mistral_common` (v3 instruct)."""

CHAT_TEMPLATE_V1 = (
    chat_template_prelude("v1", title="v1", builder="tokenizer", system_in_place=False, tools=False)
    + _SYSTEM_PROMPT_HEAD.replace("__SYSTEM_IN_LAST__", "false").replace("__TOOLS_SETUP__", "")
    + """\
  {%- if item['role'] == 'user' -%}
    {#- each [INST] block is its own SentencePiece chunk: after a user block it starts with a space -#}
    {%- if not loop.first and loop.previtem['role'] == 'user' -%}{{- ' ' -}}{%- endif -%}
    {{- '[INST] ' ~ content ~ ' [/INST]' -}}
  {%- elif loop.last and ns.continuing -%}
    {{- ' ' ~ content ~ tag -}}
  {%- else -%}
    {%- generation -%}{{- ' ' ~ content ~ '</s>' -}}{%- endgeneration -%}
  {%- endif -%}
{%- endfor -%}
"""
)
"""Jinja chat template of Mistral-7B-Instruct-v0.1/v0.2, token-exact with `mistral_common` (v1 instruct)."""

_GENERATION_TAG = re.compile(r"\{%-?\s*(?:end)?generation\s*-?%\}")


def inference_template(template: str) -> str:
    """A chat template without transformers' ``{% generation %}`` marks: what inference engines render.

    The marks only tell transformers which tokens are the assistant's (the training loss mask); other
    engines either skip them (llama.cpp's own Jinja parser, llama-cpp-python's formatter) or fail on
    them (plain Jinja2: ``Encountered unknown tag 'generation'``). Every mark in our templates sits
    between whitespace-trimming tags, so dropping it leaves the rendered text unchanged.

    Args:
        template: a Jinja chat template (ours or a model's own).

    Returns:
        The template with every ``{% generation %}`` / ``{% endgeneration %}`` tag removed.
    """
    return _GENERATION_TAG.sub("", template)


# ------------------------------------------------------------------------------------------ versions


@dataclass(frozen=True)
class _Spec:
    """How to build one tokenizer version (its vocabulary size is its family row's)."""

    version: str
    filename: str
    pad_token: str
    chat_template: str

    @property
    def vocab_size(self) -> int:
        return family_for_tokenizer(self.version).vocab_size


_SPECS: dict[str, _Spec] = {
    "v3": _Spec("v3", "mistral_instruct_tokenizer_240216.model.v2", "[control_768]", CHAT_TEMPLATE_V3),
    "v1": _Spec("v1", "tokenizer.model.v1", "<unk>", CHAT_TEMPLATE_V1),
    # tekken (mistral_fast.tekken): Nemo's vocabulary; v3 format (Nemo) and v7 format (Mistral Small 3.x)
    "v3-tekken": _Spec("v3-tekken", BUILTIN_FILE, "<pad>", CHAT_TEMPLATE_V3),
    "v7-tekken": _Spec("v7-tekken", BUILTIN_FILE, "<pad>", CHAT_TEMPLATE_V7),
    # Mistral Small 3.2 / Devstral (v11) and Magistral (v13): the same vocabulary with the v11/v13 control-token
    # table (mistral_fast.tekken.write_tekken_file), their tool-call and reasoning formats
    "v11-tekken": _Spec("v11-tekken", BUILTIN_FILE, "<pad>", CHAT_TEMPLATE_V11),
    "v13-tekken": _Spec("v13-tekken", BUILTIN_FILE, "<pad>", CHAT_TEMPLATE_V13),
}


def _spec(version: str) -> _Spec:
    if version not in _SPECS:
        raise TokenizerError(
            f"tokenizer version {version!r} is not known; use 'v3' (Mistral-7B v0.3), 'v1' (v0.1/v0.2), "
            "'v3-tekken' (Mistral Nemo), 'v7-tekken' (Mistral Small 3), 'v11-tekken' (Small 3.2, Devstral) or "
            "'v13-tekken' (Magistral)"
        )
    return _SPECS[version]


def tokenizer_for(model: ModelConfig, path: str | None = None) -> PreTrainedTokenizerFast:
    """The tokenizer a run uses: the exact built-in one, or the model's own (checked against its version).

    The version comes from `mistral_fast.families.tokenizer_version`, the one rule every stage asks.

    Args:
        model: the run's ``model`` config section.
        path: the resolved model directory, when the caller has it (else ``model.name_or_path``).
    """
    if model.tokenizer != "model" or model.name_or_path in TINY_MODELS:  # tiny models carry our own tokenizer
        return load_tokenizer(tokenizer_version(model))
    return load_tokenizer(tokenizer_version(model), path=path or model.name_or_path)


def sentencepiece_path(version: str = "v3") -> Path:
    """Path of the SentencePiece model of a Mistral tokenizer version, inside the `mistral_common` package.

    Args:
        version: ``"v3"`` (Mistral-7B v0.3; the file is byte-identical to its ``tokenizer.model.v3``) or
            ``"v1"`` (Mistral-7B v0.1/v0.2).

    Returns:
        The path of the ``.model`` file.

    Raises:
        TokenizerError: unknown version, or `mistral_common` lacks the file.
    """
    import mistral_common

    if is_tekken_version(version):
        raise TokenizerError(f"{version!r} is a tekken tokenizer, not SentencePiece: see mistral_fast.tekken")
    path = Path(mistral_common.__file__).parent / "data" / _spec(version).filename
    if not path.is_file():
        raise TokenizerError(f"{path} is missing; reinstall mistral-common (pip install 'mistral-common>=1.8')")
    return path


# ------------------------------------------------------------------------------------------ building


def _load_proto(path: Path) -> Any:
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    return proto


def _whitespace_merge_rank(pair: tuple[str, str]) -> tuple[int, int]:
    """Order of the (tied) whitespace-only merges reproducing SentencePiece's leftmost-first growth."""
    left, right = len(pair[0]), len(pair[1])
    if (left, right) == (14, 2):  # "▁"*15 is not a piece: a stuck 14-run absorbs the next "▁▁"
        return (0, 0)
    if right == 1:
        return (1, -left)  # grow the leftmost run one "▁" at a time, longest first, "▁"+"▁" last
    return (2, -left)  # never reached when runs grow from the left; kept for completeness


def _merges(pieces: Sequence[tuple[str, float]]) -> list[tuple[str, str]]:
    """BPE merges in SentencePiece priority order: by merged-piece score, whitespace-only runs last."""
    normal = {piece for piece, _ in pieces}
    scored: list[tuple[float, int, str, str]] = []
    whitespace: list[tuple[str, str]] = []
    for piece_id, (piece, score) in enumerate(pieces):
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece))]
        splits = [(left, right) for left, right in splits if left in normal and right in normal]
        if piece.strip(_SPACE) == "":
            whitespace.extend(splits)
        else:
            scored.extend((-score, piece_id, left, right) for left, right in splits)
    scored.sort()
    whitespace.sort(key=_whitespace_merge_rank)
    return [(left, right) for _, _, left, right in scored] + whitespace


@functools.cache
def _build_backend(version: str) -> Tokenizer:
    """The `tokenizers` Tokenizer equal to SentencePiece on this version's model (cached; copy before use)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    proto = _load_proto(sentencepiece_path(version))
    normal_type, control_type = 1, 3  # sentencepiece_model.proto: NORMAL=1, CONTROL=3 (UNKNOWN=2, BYTE=6)
    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    if len(vocab) != _spec(version).vocab_size:
        raise TokenizerError(
            f"{sentencepiece_path(version)} has {len(vocab)} pieces, expected {_spec(version).vocab_size}: "
            "this mistral-common release ships a different file; pin mistral-common>=1.8 to a known version"
        )
    normal = [(p.piece, p.score) for p in proto.pieces if p.type == normal_type]
    backend = Tokenizer(BPE(vocab=vocab, merges=_merges(normal), unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend(_SPACE), normalizers.Replace(" ", _SPACE)])
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(f"{_SPACE}*[^{_SPACE}]+|{_SPACE}+"), behavior="isolated")
    backend.decoder = decoders.Sequence(
        [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    specials = [p.piece for p in proto.pieces if p.type == control_type]
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in ["<unk>", *specials]])
    return backend


def _wrap(backend: Tokenizer, version: str) -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast

    spec = _spec(version)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token=spec.pad_token,
        add_bos_token=True,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
        padding_side="right",
    )
    tokenizer.chat_template = spec.chat_template
    return tokenizer


def load_tokenizer(version: str = "v3", path: str | Path | None = None) -> PreTrainedTokenizerFast:
    """Load the exact Mistral tokenizer with its chat template, built offline from `mistral_common`'s files.

    Args:
        version: ``"v3"`` (Mistral-7B v0.3, 32,768 tokens), ``"v1"`` (v0.1/v0.2, 32,000 tokens),
            ``"v3-tekken"`` (Mistral Nemo, 131,072) or ``"v7-tekken"`` (Mistral Small 3.x, 131,072). With
            ``path``, the version the model's tokenizer is checked against (and whose template it gets).
        path: a local directory or hub name of a real model. A directory holding Mistral's ``tekken.json``
            gets the exact tekken tokenizer built from that file (its ``config.version`` decides v3/v7);
            otherwise that model's own tokenizer is loaded with ``AutoTokenizer``
            (``trust_remote_code=False``), given our chat template if it has none, and checked against
            `mistral_common` on `DEFAULT_PROBES`: a warning names the first probe that differs.

    Returns:
        A fresh `PreTrainedTokenizerFast` (safe to modify); BOS added, no EOS, pad token not EOS.

    Raises:
        TokenizerError: unknown version, or ``path`` cannot be loaded.
    """
    spec = _spec(version)
    if path is None and is_tekken_version(version):
        tokenizer, _ = load_tekken(version)
        tokenizer.chat_template = spec.chat_template
        return tokenizer
    if path is None:
        return _wrap(_build_backend(version), version)
    local = Path(path).expanduser()
    if (local / TEKKEN_FILENAME).is_file() or (local.is_file() and local.name == TEKKEN_FILENAME):
        tokenizer, found = load_tekken(None, local)  # the file's own config.version decides the format
        tokenizer.chat_template = _spec(found).chat_template
        return tokenizer
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise TokenizerError(
            f"path={str(path)!r}: cannot load a tokenizer from it ({exc}); give a model directory or "
            f"hub name with tokenizer files, or leave path unset to use the built-in {version} tokenizer"
        ) from exc
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = spec.chat_template
    differing = check_tokenizer(tokenizer, version)
    if differing:
        first = differing[0]
        expected = reference_tokenizer(version).instruct_tokenizer.tokenizer.encode(first, bos=True, eos=False)
        got = list(tokenizer(first, split_special_tokens=True)["input_ids"])
        pairs = enumerate(zip(got, expected, strict=False))
        at = next((i for i, (a, b) in pairs if a != b), min(len(got), len(expected)))
        message = (
            f"the tokenizer of {str(path)!r} differs from mistral_common's {version} tokenizer on "
            f"{len(differing)} of {len(DEFAULT_PROBES)} probe strings (first: {first!r}, ids "
            f"{got[at : at + 4]} instead of {expected[at : at + 4]} at token {at}); a hub tokenizer.json of a "
            "tekken model converted before transformers #42299 splits text with the wrong regex. Use "
            f"load_tokenizer({version!r}) without path for the exact one"
        )
        logger.warning(message)
        warnings.warn(message, stacklevel=2)
    return tokenizer


# ------------------------------------------------------------------------------------------ reference


@functools.cache
def reference_tokenizer(version: str = "v3", mode: str = "test") -> MistralTokenizer:
    """The `mistral_common` reference: its instruct tokenizer for the version, on the same SentencePiece file.

    Args:
        version: ``"v3"`` or ``"v1"``.
        mode: `mistral_common`'s validation mode: ``"test"`` (conversations ending with a user message or a
            continued assistant prefix) or ``"finetuning"`` (ending with an assistant message).

    Returns:
        A `MistralTokenizer` (cached, do not modify).
    """
    from mistral_common.protocol.instruct.normalize import get_normalizer
    from mistral_common.protocol.instruct.validator import ValidationMode, get_validator
    from mistral_common.tokens.tokenizers.base import TokenizerVersion
    from mistral_common.tokens.tokenizers.instruct import InstructTokenizerV1, InstructTokenizerV3
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    from mistral_common.tokens.tokenizers.sentencepiece import SentencePieceTokenizer

    _spec(version)
    if is_tekken_version(version):
        return tekken_reference(version, mode)
    tokenizer_version = TokenizerVersion(version)
    # The v3 file is named "*.model.v2"; force the instruct version instead of parsing the suffix.
    text_tokenizer = SentencePieceTokenizer(sentencepiece_path(version), tokenizer_version=tokenizer_version)
    instruct_class = InstructTokenizerV3 if version == "v3" else InstructTokenizerV1
    return MistralTokenizer(
        instruct_class(text_tokenizer),
        validator=get_validator(tokenizer_version, ValidationMode(mode)),
        request_normalizer=get_normalizer(tokenizer_version),
    )


def reference_chat_ids(
    messages: Sequence[Mapping[str, Any]],
    version: str = "v3",
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = False,
    continue_final_message: bool = False,
) -> list[int]:
    """Token ids `mistral_common` gives a conversation (``encode_chat_completion``).

    The OpenAI-style messages and tools are converted by mistral_common's own
    ``ChatCompletionRequest.from_openai`` (tool calls, tool results, ``reasoning_content``; a ``thinking``
    field is passed as ``reasoning_content``). The validation mode follows the request: a conversation ending
    with an assistant message (not continued, no generation prompt) is a training example (``"finetuning"``),
    anything else a prompt (``"test"``); a continued final message is an assistant message with ``prefix=True``.

    Args:
        messages: OpenAI-style message dicts (system, user, assistant with ``tool_calls``, tool).
        version: any version of `load_tokenizer`.
        tools: OpenAI-style tool definitions (``{"type": "function", "function": {...}}``).
        add_generation_prompt: encode as a prompt for a new assistant message.
        continue_final_message: leave the final assistant message open (no ``</s>``).

    Returns:
        The token ids, starting with BOS.

    Raises:
        TokenizerError: `mistral_common` rejects the conversation (its message is included).
    """
    from mistral_common.exceptions import MistralCommonException
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from pydantic import ValidationError

    last_is_assistant = bool(messages) and messages[-1].get("role") == "assistant"
    training = last_is_assistant and not (continue_final_message or add_generation_prompt)
    converted = []
    for i, message in enumerate(messages):
        if message.get("role") not in ("system", "user", "assistant", "tool"):
            raise TokenizerError(f"message {i}: role {message.get('role')!r} is not supported by reference_chat_ids")
        message = dict(message)
        if message.get("thinking") is not None and message.get("reasoning_content") is None:
            message["reasoning_content"] = message.pop("thinking")
        converted.append(message)
    try:
        if continue_final_message and not last_is_assistant:
            raise TokenizerError("continue_final_message=True needs a final assistant message")
        request = ChatCompletionRequest.from_openai(
            converted, list(tools) if tools else None, continue_final_message=continue_final_message
        )
        reference = reference_tokenizer(version, "finetuning" if training else "test")
        return list(reference.encode_chat_completion(request).tokens)
    except (MistralCommonException, ValueError, AssertionError, TypeError, KeyError, ValidationError) as exc:
        if isinstance(exc, TokenizerError):
            raise
        raise TokenizerError(f"mistral_common rejects the conversation: {type(exc).__name__}: {exc}") from exc


# ------------------------------------------------------------------------------------------ checking

DEFAULT_PROBES: tuple[str, ...] = (
    "Hello world",
    " Hello world",
    "  two leading spaces",
    "trailing spaces   ",
    "many     inner      spaces",
    " " * 17 + "seventeen spaces",
    " ",
    "   ",
    "",
    "line one\nline two\n\n\nafter blank lines",
    "\n leading newline",
    "tabs\tand\t\ttabs",
    "\tindented with a tab",
    "Ça va? Élève, naïve, façade, Zürich, São Paulo, Ångström",
    "emoji 😀🎉👍🏽 and flags 🇫🇷",
    "中文分词测试，日本語のテキスト、한국어 문장",
    "Ελληνικά και русский текст",
    "numbers 0 7 42 3.14159 1,000,000 2024-06-01",
    "def f(x):\n    return x ** 2  # square\n",
    "    if (a && b) { return c[i]; }",
    '{"key": [1, 2, 3], "nested": {"a": null}}',
    "rare bytes: \u200b\u00a0\u2028 \x7f \U0001d518 \U0001f9ec",
    "mixed 😀  中文  spaces\t\n end ",
    "URL https://example.com/path?q=1&r=2#frag",
    # tekken's split regex keeps combining marks (\p{M}) inside words; Llama 3's, which hub tokenizer.json
    # conversions of tekken carried before transformers #42299, cuts "हिन्दी" before each vowel sign
    "हिन्दी भाषा, e\u0301te\u0301, CamelCase eBay it's 20240601",
)
"""Strings `check_tokenizer` compares by default: the cases where SentencePiece ports usually go wrong."""


def check_tokenizer(
    tokenizer: PreTrainedTokenizerBase, version: str = "v3", probes: Iterable[str] | None = None
) -> list[str]:
    """Compare a tokenizer with `mistral_common` on probe strings (plain text, with BOS).

    Control-token strings inside a probe are encoded as text on both sides (``split_special_tokens``).

    Args:
        tokenizer: any transformers tokenizer.
        version: the `mistral_common` tokenizer version to compare against.
        probes: strings to compare; `DEFAULT_PROBES` if None.

    Returns:
        The probes whose ids differ (empty: the tokenizer is exact on them).
    """
    reference = reference_tokenizer(version).instruct_tokenizer.tokenizer
    differing = []
    for text in DEFAULT_PROBES if probes is None else probes:
        expected = reference.encode(text, bos=True, eos=False)
        try:
            got = tokenizer(text, add_special_tokens=True, split_special_tokens=True)["input_ids"]
        except TypeError:  # a tokenizer class without split_special_tokens
            got = tokenizer(text, add_special_tokens=True)["input_ids"]
        if list(got) != expected:
            differing.append(text)
    return differing


# ------------------------------------------------------------------------------------------ validation


_CONTROL_LIKE = re.compile(r"<unk>|</?s>|<pad>|<SPECIAL_\d+>|\[/?[A-Za-z0-9_]+\]")


@functools.cache
def _special_strings(version: str) -> frozenset[str]:
    """The strings the fast tokenizer turns into special tokens (SentencePiece unknown + control pieces)."""
    if is_tekken_version(version):
        return tekken_special_strings(version)
    proto = _load_proto(sentencepiece_path(version))
    unknown_type, control_type = 2, 3
    return frozenset(p.piece for p in proto.pieces if p.type in (unknown_type, control_type))


def _find_special_string(text: str, version: str) -> str | None:
    specials = _special_strings(version)
    return next((m.group() for m in _CONTROL_LIKE.finditer(text) if m.group() in specials), None)


def validate_conversation(
    messages: Sequence[Mapping[str, Any]],
    version: str | None = "v3",
    tools: Sequence[Mapping[str, Any]] | None = None,
    *,
    add_generation_prompt: bool = False,
    continue_final_message: bool = False,
    training: bool = False,
) -> None:
    """Check a conversation: the one validator of chat messages, for data files and chat calls alike.

    The base rules are `mistral_common`'s acceptance rules (see the module docstring), plus one: text that
    contains a control-token string (``"[INST]"``, ``"</s>"``, …) is rejected, because the chat template
    would turn it into the control token where `mistral_common` encodes plain text. With ``training`` the
    training-data rules are layered on top: no empty message, user and assistant alternate starting with
    the user, and the last message is the assistant's (there must be an answer to learn). Errors read
    ``messages[i]: what is wrong — what to do``; the data stage puts ``file:line`` in front.

    Tool conversations (OpenAI style: assistant ``tool_calls``, ``{"role": "tool", "tool_call_id", "content"}``,
    ``tools``) and reasoning traces (v13) get mistral_common's rules on them (`_check_tools`: names, call ids
    per version, results after their calls and matching them, calls and text not together in v3), written
    out rather than asked of mistral_common per row (an encode per conversation: ~20 ms).

    Args:
        messages: ``{"role": ..., "content": ...}`` dicts; roles system, user, assistant, tool.
        version: any `load_tokenizer` version (whose control-token strings are checked); None skips that check.
        tools: OpenAI-style tool definitions offered to the model, if any.
        add_generation_prompt: the conversation is a prompt for a new assistant message.
        continue_final_message: the final assistant message is to be continued.
        training: apply the training-data rules too.

    Raises:
        TokenizerError: what is wrong, at which message index, and what to do.
    """
    if add_generation_prompt and continue_final_message:
        raise TokenizerError(
            "add_generation_prompt and continue_final_message cannot both be set: use the first for a new "
            "assistant message, the second to continue the last one"
        )
    if not isinstance(messages, Sequence) or isinstance(messages, str) or len(messages) == 0:
        raise TokenizerError(
            "empty conversation (or not a list) — give at least a user message (and an assistant answer to train on)"
        )
    if version is not None:
        _spec(version)
    uses_tools = bool(tools) or any(_has_tool_parts(m) for m in messages)
    previous = None
    for i, message in enumerate(messages):
        role = _check_message(i, message, version)
        text = _flat_text(message)
        if not (role == "assistant" and message.get("tool_calls")) and not (role == "tool" and not training):
            _check_content(i, role, text, previous, len(messages), version, training=training)
        previous = role
    if version in ("v7-tekken", "v11-tekken", "v13-tekken") and not uses_tools:
        _check_assistant_runs(messages)
    _check_ending(messages, add_generation_prompt, continue_final_message, training=training)
    if uses_tools:
        _check_tools(messages, version, tools)


def _check_content(
    i: int, role: str, content: str, previous: str | None, count: int, version: str | None, *, training: bool
) -> None:
    """The rules about one message given the one before it (`validate_conversation`)."""
    if role == "system" and previous == "assistant":
        raise TokenizerError(
            f"messages[{i}]: a system message directly after an assistant turn, which Mistral's format "
            "(mistral_common) rejects — move it to the start of the conversation (it is used as the "
            "system prompt wherever it stands)"
        )
    if role == "assistant" and count == 1:
        raise TokenizerError(
            "messages[0]: the only message is an assistant message; a conversation must start with a user "
            "(or system) message"
        )
    # mistral_common rejects only an empty assistant text (v7: an empty run of them, `_check_assistant_runs`);
    # training data must have text in every turn
    if (training and not content.strip()) or (role == "assistant" and not content and version != "v7-tekken"):
        raise TokenizerError(f"messages[{i}] ({role}): empty content — remove the turn or fill it in")
    if training and role != "system":
        if previous is None and role != "user":
            raise TokenizerError(f"messages[{i}]: the conversation starts with {role!r}; it must start with 'user'")
        if role == previous and role != "tool":  # several results in a row answer several calls in one turn
            raise TokenizerError(f"messages[{i}]: two {role!r} turns in a row — merge them or add the missing turn")
    found = _find_special_string(content, version) if version is not None else None
    if found:
        raise TokenizerError(
            f"messages[{i}] ({role}): the text contains the control-token string {found!r}, which "
            "the chat template turns into that control token while mistral_common encodes it as text "
            "— remove or alter it (e.g. insert a space)"
        )


def _check_assistant_runs(messages: Sequence[Mapping[str, Any]]) -> None:
    """v7: consecutive assistant messages are joined before mistral_common checks them, so only a run is empty."""
    start = None
    for i, message in enumerate([*messages, {"role": None, "content": ""}]):
        if message["role"] == "assistant" and start is None:
            start = i
        elif message["role"] != "assistant" and start is not None:
            if not any(m["content"] for m in messages[start:i]):
                raise TokenizerError(
                    f"messages[{start}] (assistant): empty content (messages {start}-{i - 1} are all empty) "
                    "— remove the turn or fill it in"
                )
            start = None


def _check_ending(
    messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool, continue_final_message: bool, *, training: bool
) -> None:
    """The rules about the last message (`validate_conversation`)."""
    last, at = messages[-1]["role"], f"messages[{len(messages) - 1}]"
    if training and last != "assistant":
        spoken = [m["role"] for m in messages if m["role"] != "system"]
        raise TokenizerError(
            f"{at}: the conversation ends with {spoken[-1] if spoken else 'system'!r}, not 'assistant' "
            "— training needs an assistant answer to learn"
        )
    if add_generation_prompt and last == "assistant":
        raise TokenizerError(
            f"{at}: a final assistant message with add_generation_prompt=True — drop it to prompt a new "
            "reply, or use continue_final_message=True to continue it"
        )
    if continue_final_message and last != "assistant":
        raise TokenizerError(
            f"{at}: continue_final_message=True but the last message is a {last} message — add the "
            "assistant text to continue, or use add_generation_prompt=True"
        )


def _check_message(index: int, message: Any, version: str | None = None) -> str:
    """Check one message's shape; return its role."""
    if not isinstance(message, Mapping) or "role" not in message:
        raise TokenizerError(f'messages[{index}]: not a {{"role": ..., "content": ...}} mapping: {message!r:.80}')
    role = message["role"]
    tools_ok = version != "v1"
    if role not in (*_ROLES, "tool") or (role == "tool" and not tools_ok):
        raise TokenizerError(
            f"messages[{index}]: unknown role {role!r} — use one of system, user, assistant"
            + (", tool" if tools_ok else " (the v1 format has no tool messages)")
        )
    if message.get("tool_calls") and (role != "assistant" or not tools_ok):
        raise TokenizerError(
            f"messages[{index}]: tool_calls are only possible in assistant messages of v3 and later formats "
            "— put the call in the content as text or drop the message"
        )
    content = message.get("content")
    plain = isinstance(content, str) or (content is None and (message.get("tool_calls") or role == "tool"))
    if not plain and not (tools_ok and isinstance(content, list)):
        raise TokenizerError(f"messages[{index}] ({role}): content must be a string, got {type(content).__name__}")
    if (_think_of(message) is not None) and version is not None and version != "v13-tekken":
        raise TokenizerError(
            f"messages[{index}] ({role}): a reasoning trace (reasoning_content / thinking) needs the v13 format "
            f"(Magistral); {version} has no thinking tokens — drop it or use a v13 tokenizer"
        )
    return role


def _think_of(message: Mapping[str, Any]) -> str | None:
    """The reasoning trace of a message: ``reasoning_content``, ``thinking`` or a leading thinking chunk."""
    for key in ("reasoning_content", "thinking"):
        if message.get(key) is not None:
            return str(message[key])
    content = message.get("content")
    if isinstance(content, list):
        chunks = [c for c in content if isinstance(c, Mapping) and c.get("type") == "thinking"]
        return str(chunks[0].get("thinking", "")) if chunks else None
    return None


def _flat_text(message: Mapping[str, Any]) -> str:
    """A message's text: the string content, or its text chunks joined by a blank line (as mistral_common)."""
    content = message.get("content")
    if isinstance(content, list):
        return "\n\n".join(str(c.get("text")) for c in content if isinstance(c, Mapping) and c.get("text"))
    return content if isinstance(content, str) else ""


def _has_tool_parts(message: Any) -> bool:
    """Whether a message uses what only the tool-capable formats have (tool role, calls, chunks, traces)."""
    if not isinstance(message, Mapping):
        return False
    return (
        message.get("role") == "tool"
        or bool(message.get("tool_calls"))
        or isinstance(message.get("content"), list)
        or _think_of(message) is not None
    )


_CALL_ID = re.compile(r"[A-Za-z0-9]{9}")


_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_AFTER = {"system": ("user", "assistant", "system"), "user": ("assistant", "system", "user"),
          "assistant": ("assistant", "user", "tool"), "tool": ("assistant", "tool", "user")}  # fmt: skip


def _check_tools(
    messages: Sequence[Mapping[str, Any]], version: str | None, tools: Sequence[Mapping[str, Any]] | None
) -> None:
    """mistral_common's tool rules, with the message index: order, names, call ids, results matching calls."""
    for k, tool in enumerate(tools or []):
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(function, Mapping) or not _NAME.fullmatch(str(function.get("name"))):
            raise TokenizerError(
                f'tools[{k}]: not {{"type": "function", "function": {{"name", "description", "parameters"}}}} '
                "with a name of 1-64 letters, digits, _ or - — fix the tool definition"
            )
    pending: list[str] = []
    answered: list[str] = []
    for i, message in enumerate(messages):
        role = message["role"]
        if i == 0 and role == "tool":
            raise TokenizerError(
                "messages[0]: a tool result with no assistant tool call before it — a conversation starts with a "
                "user (or system) message"
            )
        if i and role not in _AFTER[messages[i - 1]["role"]]:
            raise TokenizerError(
                f"messages[{i}]: a {role} message after a {messages[i - 1]['role']} message, which Mistral's "
                "format (mistral_common) rejects — a tool result follows the assistant's call or another result"
            )
        if role == "assistant":
            _check_answered(i, version, pending, answered)
            if message.get("tool_calls"):
                pending, answered = _check_calls(i, message, version, last=i == len(messages) - 1), []
            elif messages[i - 1]["role"] != "assistant":
                pending, answered = [], []
        if role == "tool":
            _check_result(i, message, version, pending, answered)
            answered.append(str(message.get("tool_call_id")))
    if version is not None:
        _check_tool_strings(messages, version, tools)


def _check_calls(i: int, message: Mapping[str, Any], version: str | None, *, last: bool) -> list[str]:
    """One assistant message's calls: shape, function name, id format (v13: any id); returns the ids."""
    if version in ("v3", "v3-tekken") and _flat_text(message):
        raise TokenizerError(
            f"messages[{i}]: text and tool_calls in one assistant message, which the v3 format (mistral_common) "
            "rejects — put the text in a message of its own"
        )
    ids = []
    for k, call in enumerate(message["tool_calls"]):
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not _NAME.fullmatch(str(function.get("name"))):
            raise TokenizerError(
                f'messages[{i}].tool_calls[{k}]: not {{"id", "type": "function", "function": {{"name", '
                '"arguments"}}}} with a name of 1-64 letters, digits, _ or - — give the function name and arguments'
            )
        call_id = call.get("id")
        if version == "v13-tekken":
            bad = not call_id or call_id == "null"
        else:
            bad = not (call_id is None and last) and not _CALL_ID.fullmatch(str(call_id))
        if bad:
            raise TokenizerError(
                f"messages[{i}].tool_calls[{k}]: call id {call_id!r} is not 9 letters or digits, which "
                "Mistral's format requires — rewrite the ids (consistently in the call and its result)"
            )
        if str(call_id) in ids and version in ("v11-tekken", "v13-tekken"):
            raise TokenizerError(f"messages[{i}].tool_calls[{k}]: call id {call_id!r} is used twice in the message")
        ids.append(str(call_id))
    return ids


def _check_result(i: int, message: Mapping[str, Any], version: str | None, pending: list[str], answered: list[str]):
    """A tool result answers a call of the assistant message before it, once (v11+), with an id (v3+)."""
    call_id = message.get("tool_call_id")
    name = message.get("name")
    if name is not None and not _NAME.fullmatch(str(name)):
        raise TokenizerError(f"messages[{i}] (tool): name {name!r} is not 1-64 letters, digits, _ or -")
    if call_id is None or (version != "v13-tekken" and not _CALL_ID.fullmatch(str(call_id))):
        raise TokenizerError(
            f"messages[{i}] (tool): tool_call_id {call_id!r} is not 9 letters or digits — give the id of the call "
            "it answers"
        )
    strict = version in ("v11-tekken", "v13-tekken")  # v3/v7 count results, v11+ match them by id
    if (strict and call_id not in pending) or (not strict and len(answered) >= len(pending)):
        raise TokenizerError(
            f"messages[{i}] (tool): tool_call_id {call_id!r} matches no call of the assistant message before "
            f"it ({pending or 'none'}) — give the id of the call it answers"
        )
    if strict and call_id in answered:
        raise TokenizerError(f"messages[{i}] (tool): a second result for call {call_id!r} — drop one")


def _check_answered(i: int, version: str | None, pending: list[str], answered: list[str]) -> None:
    """Before the next assistant message, every call of the previous one has its result (mistral_common)."""
    if pending and len(answered) != len(pending):
        raise TokenizerError(
            f"messages[{i}]: the assistant speaks again before every call has its result ({len(answered)} of "
            f"{len(pending)} answered) — add the missing tool messages"
        )


def _check_tool_strings(
    messages: Sequence[Mapping[str, Any]], version: str, tools: Sequence[Mapping[str, Any]] | None
) -> None:
    """No control-token string inside tools, calls, results or traces (the template would make it a token)."""
    texts = [json.dumps(tools or [], ensure_ascii=False)]
    texts += [json.dumps(m.get("tool_calls") or [], ensure_ascii=False) for m in messages]
    texts += [_flat_text(m) for m in messages if m["role"] == "tool"] + [_think_of(m) or "" for m in messages]
    for text in texts:
        found = _find_special_string(text, version)
        if found:
            raise TokenizerError(
                f"tools or tool messages contain the control-token string {found!r}, which the chat template "
                "turns into that control token — remove or alter it"
            )


def _normalize_tool_json(messages: Sequence[Mapping[str, Any]], version: str) -> list[dict[str, Any]]:
    """Messages with tool JSON written as mistral_common writes it, for the chat template to copy verbatim.

    A Jinja template cannot parse JSON; mistral_common parses call arguments (and, in v3, tool results) and
    dumps them again (``json.dumps(..., ensure_ascii=False)``). Arguments become that canonical JSON text
    (a non-JSON string: a JSON string of it; missing: ``{}``); in v3 a tool result that is JSON gets
    ``content_json``, its canonical JSON text, which the template writes instead of quoting the result.
    """
    out: list[dict[str, Any]] = []
    for message in messages:
        message = dict(message)
        if message.get("tool_calls"):
            message["tool_calls"] = [_canonical_call(call) for call in message["tool_calls"]]
        if message.get("role") == "tool" and version in ("v3", "v3-tekken") and isinstance(message.get("content"), str):
            with contextlib.suppress(ValueError):
                message["content_json"] = json.dumps(json.loads(message["content"] or "{}"), ensure_ascii=False)
        out.append(message)
    return out


def _canonical_call(call: Any) -> Any:
    if not isinstance(call, Mapping) or not isinstance(call.get("function"), Mapping):
        return call
    arguments = call["function"].get("arguments")
    if arguments is None or arguments == "":
        text = "{}"
    elif isinstance(arguments, str):
        try:
            text = json.dumps(json.loads(arguments), ensure_ascii=False)
        except ValueError:
            text = json.dumps(arguments, ensure_ascii=False)
    else:
        text = json.dumps(json.loads(json.dumps(arguments)), ensure_ascii=False)
    return {**call, "function": {**call["function"], "arguments": text}}


def parse_tool_calls(text: str, version: str) -> list[dict[str, Any]]:
    """The tool calls in what a model generated after (or from) ``[TOOL_CALLS]``: the inverse of the format.

    v3 / v3-tekken / v7-tekken write ``[TOOL_CALLS][{"name", "arguments", "id"}, …]``; v11 writes
    ``[TOOL_CALLS]name[CALL_ID]id[ARGS]{…}`` per call, v13 ``[TOOL_CALLS]name[ARGS]{…}``. Text before the first
    ``[TOOL_CALLS]`` (if any) and after the calls (``</s>``) is ignored.

    Args:
        text: decoded generation, special tokens kept (``skip_special_tokens=False``).
        version: the tokenizer version that wrote it.

    Returns:
        ``[{"name": str, "arguments": parsed JSON, "id": str | None}, …]``; empty when nothing parses.
    """
    if "[TOOL_CALLS]" in text:
        text = text[text.index("[TOOL_CALLS]") :]
    decoder = json.JSONDecoder()
    calls: list[dict[str, Any]] = []
    if version in ("v11-tekken", "v13-tekken"):
        for part in text.split("[TOOL_CALLS]")[1:]:
            head, sep, rest = part.partition("[ARGS]")
            if not sep:
                continue
            name, _, call_id = head.partition("[CALL_ID]")
            try:
                arguments, _ = decoder.raw_decode(rest.strip())
            except ValueError:
                continue
            calls.append({"name": name.strip(), "arguments": arguments, "id": call_id.strip() or None})
        return calls
    body = text.removeprefix("[TOOL_CALLS]").strip()
    try:
        parsed, _ = decoder.raw_decode(body)
    except ValueError:
        return []
    for item in parsed if isinstance(parsed, list) else [parsed]:
        if isinstance(item, Mapping) and isinstance(item.get("name"), str):
            arguments = item.get("arguments", {})
            if isinstance(arguments, str):
                with contextlib.suppress(ValueError):
                    arguments = json.loads(arguments)
            calls.append({"name": item["name"], "arguments": arguments, "id": item.get("id")})
    return calls


# ------------------------------------------------------------------------------ ids + assistant-only labels


@dataclass
class TokenizedExample:
    """Token ids and labels of one example; labels are IGNORE_INDEX outside the trained tokens."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool

    @property
    def trained_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def tokenize_conversation(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    max_length: int,
    *,
    version: str,
    assistant_only: bool = True,
    tools: list[dict[str, Any]] | None = None,
) -> TokenizedExample:
    """Encode a conversation with the chat template; only assistant tokens and their `</s>` are trained.

    The mask comes from the template's ``{% generation %}`` marks, so it is exactly the assistant text
    plus the `</s>` that closes each assistant turn: the model learns to answer *and to stop*.
    ``version`` is the tokenizer's (`mistral_fast.families.tokenizer_version`), whose control-token
    strings the validator refuses in the text. With ``assistant_only=False`` (``train.assistant_only_loss=false``)
    every token is a target, as TRL does without an assistant mask: labels = input_ids (BOS at position 0 is
    never predicted by the causal shift; padding is masked by the collator).

    Tool conversations: ``tools`` (OpenAI-style definitions) go to ``[AVAILABLE_TOOLS]``; assistant tool
    calls (``[TOOL_CALLS]…</s>``) and reasoning traces (``[THINK]…[/THINK]``, v13) are trained, tool results
    and ``[AVAILABLE_TOOLS]`` are not. Call arguments (and v3 tool results) are first written as mistral_common
    writes JSON (`_normalize_tool_json`), which a template cannot do.
    """
    validate_conversation(messages, version, tools)
    encoded = tokenizer.apply_chat_template(
        _normalize_tool_json(messages, version),
        tools=list(tools) if tools else None,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    ids, mask = list(encoded["input_ids"]), list(encoded["assistant_masks"])
    labels = [tok if keep or not assistant_only else IGNORE_INDEX for tok, keep in zip(ids, mask, strict=True)]
    truncated = len(ids) > max_length
    return TokenizedExample(ids[:max_length], labels[:max_length], truncated)


def tokenize_text(tokenizer: PreTrainedTokenizerBase, text: str, max_length: int) -> TokenizedExample:
    """Encode raw text for continued pre-training: BOS + text + EOS, every token after BOS trained."""
    ids = [tokenizer.bos_token_id, *tokenizer.encode(text, add_special_tokens=False), tokenizer.eos_token_id]
    labels = [IGNORE_INDEX, *ids[1:]]
    return TokenizedExample(ids[:max_length], labels[:max_length], len(ids) > max_length)


def preview_example(tokenizer: PreTrainedTokenizerBase, input_ids: list[int], labels: list[int]) -> str:
    """Render an example with the trained part visible: trained tokens between ⟦ and ⟧, the rest plain.

    What the model is asked to learn is exactly what stands between the brackets — a quick check that
    the mask covers the answers and their `</s>`, and nothing of the prompts.
    """
    parts: list[str] = []
    start = 0
    for i in range(1, len(input_ids) + 1):
        if i == len(input_ids) or (labels[i] == IGNORE_INDEX) != (labels[start] == IGNORE_INDEX):
            text = tokenizer.decode(input_ids[start:i], skip_special_tokens=False)
            parts.append(text if labels[start] == IGNORE_INDEX else f"⟦{text}⟧")
            start = i
    return "".join(parts)


def tokenize_example(
    tokenizer: PreTrainedTokenizerBase, example: Example, max_length: int, *, version: str, assistant_only: bool = True
) -> TokenizedExample:
    """Tokenise a normalised `Example`: a conversation with the chat template, or raw text.

    ``assistant_only`` (``train.assistant_only_loss``) applies to conversations; raw text trains every token.
    """
    if example.messages is not None:
        return tokenize_conversation(
            tokenizer,
            example.messages,
            max_length,
            version=version,
            assistant_only=assistant_only,
            tools=getattr(example, "tools", None),
        )
    return tokenize_text(tokenizer, example.text or "", max_length)
