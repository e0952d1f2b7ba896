"""Tekken, the tokenizer of Mistral Nemo 12B and Mistral Small 3.x 24B, as an exact Hugging Face fast tokenizer.

Tekken is a tiktoken-style byte-level BPE. Mistral ships it as ``tekken.json``: a list of byte strings in rank
order (``vocab``), a regex ``pattern`` that splits text before BPE, and a config with the number of control
tokens (1,000: ids 0-999, ``<unk>``, ``<s>``, ``</s>``, ``[INST]``, …, then ``<SPECIAL_20>``…) and the total
vocabulary size (131,072: the first 130,072 ranks, each shifted by 1,000). ``mistral_common`` ships Nemo's
file as ``data/tekken_240718.json`` (config version v3). Two versions are built from it:

* ``"v3-tekken"`` — Mistral Nemo: the v3 instruct format of Mistral-7B v0.3 (system prompt in front of the
  last user message), with tekken text tokens. The chat template is `tokenizer.CHAT_TEMPLATE_V3` unchanged:
  the format is the same, only the text tokeniser differs.
* ``"v7-tekken"`` — Mistral Small 3.x: the same vocabulary, v7 instruct format (`CHAT_TEMPLATE_V7`): every
  system message stays where it is, as ``[SYSTEM_PROMPT]text[/SYSTEM_PROMPT]``. ``mistral_common`` gives
  this format to a copy of Nemo's file whose ``config.version`` is ``v7``, which is what `tekken_reference`
  loads (by ``MistralTokenizer.from_file``, the path real users take).

How the tiktoken ranks become a `tokenizers` BPE (`_build_backend`):

* vocabulary: each byte string in GPT-2's byte-to-unicode alphabet (llama.cpp's ``gpt2`` tokenizer model
  reads the same alphabet), id = rank + 1,000;
* merges: tiktoken merges the adjacent pair whose *concatenation* has the lowest rank. A BPE merge list
  gives each pair a priority; listing every split ``(a, b)`` of every token ``t`` with ``a`` and ``b`` in
  the vocabulary, ordered by the rank of ``t``, gives every pair tiktoken's priority (269,443 merges for
  Nemo). Ties between splits of one token are broken by the parts' ranks; they never meet in one word;
* ``ignore_merges``: tiktoken takes a pre-token that is itself a token whole, without merging;
* pre-tokeniser: mistral_common's split pattern (the ``config.pattern`` of the file, not Llama-3's regex
  that hub conversions carried before transformers #42299), then the byte-to-unicode map;
* control tokens: special added tokens, so a chat template's ``[INST]`` text becomes the control token and
  each text chunk between them is encoded on its own, as ``mistral_common`` encodes each message.

No normaliser, no prefix space: tekken encodes text as it is. BOS is added by the post-processor
(``add_bos_token=True``), EOS is not; the pad token is ``<pad>`` (id 11, a control token never produced
from text nor by the base model), never ``</s>``.

`mistral_fast.tokenizer` dispatches here for tekken versions and for model directories holding a
``tekken.json``; this module does not import it (it is the lower of the two).
"""

from __future__ import annotations

import base64
import functools
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mistral_fast.errors import TokenizerError

if TYPE_CHECKING:
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

__all__ = [
    "BUILTIN_FILE",
    "CHAT_TEMPLATE_V7",
    "INSTRUCT_TURNS",
    "TEKKEN_FILENAME",
    "TEKKEN_VERSIONS",
    "TekkenVocab",
    "chat_template_prelude",
    "is_tekken_version",
    "load_tekken",
    "read_tekken",
    "tekken_file",
    "tekken_reference",
    "tekken_special_strings",
]

BUILTIN_FILE = "tekken_240718.json"
"""Nemo's tekken file inside ``mistral_common/data`` (config version v3, 131,072 ids)."""
TEKKEN_FILENAME = "tekken.json"
"""The name of the tekken file in Mistral's model repositories (what ``MistralTokenizer.from_file`` detects)."""

TEKKEN_VERSIONS: dict[str, str] = {"v3-tekken": "v3", "v7-tekken": "v7"}
"""Our tekken tokenizer versions → the ``mistral_common`` instruct version (``config.version``) they stand for."""

_FROM_INSTRUCT = {instruct: ours for ours, instruct in TEKKEN_VERSIONS.items()}
_PAD = "<pad>"
# Mistral's first 20 control tokens of files without a "special_tokens" list (Nemo's, v3 and v7); the rest
# up to default_num_special_tokens are "<SPECIAL_{id}>" fillers (mistral_common's Tekkenizer does the same).
_DEFAULT_SPECIALS = (
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]", "[PREFIX]", "[MIDDLE]",
    "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]",
)  # fmt: skip


def is_tekken_version(version: str | None) -> bool:
    """Whether `version` names one of the tekken tokenizers (``"v3-tekken"``, ``"v7-tekken"``)."""
    return version in TEKKEN_VERSIONS


def tekken_file() -> Path:
    """Path of Nemo's tekken file inside the installed `mistral_common` package.

    Raises:
        TokenizerError: this `mistral_common` release does not ship it.
    """
    import mistral_common

    path = Path(mistral_common.__file__).parent / "data" / BUILTIN_FILE
    if not path.is_file():
        raise TokenizerError(f"{path} is missing; reinstall mistral-common (pip install 'mistral-common>=1.8')")
    return path


# ------------------------------------------------------------------------------------------ reading


@dataclass(frozen=True)
class TekkenVocab:
    """What a tekken file defines, already cut to its vocabulary size.

    Attributes:
        version: our version (``"v3-tekken"``, ``"v7-tekken"``).
        path: the file it was read from.
        pattern: the regex that splits text into pre-tokens.
        tokens: the byte strings of the ordinary tokens in rank order (id = rank + ``len(specials)``).
        specials: the control-token strings, id = position.
    """

    version: str
    path: Path
    pattern: str
    tokens: tuple[bytes, ...]
    specials: tuple[str, ...]

    @property
    def vocab_size(self) -> int:
        return len(self.specials) + len(self.tokens)


@functools.cache
def _read(path: str, stamp: tuple[int, int]) -> tuple[str, str, tuple[bytes, ...], tuple[str, ...]]:
    """Parse a tekken file once per (path, mtime, size): instruct version, pattern, tokens, specials."""
    del stamp  # part of the cache key only: an edited file is read again
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        config = data["config"]
        pattern, instruct = config["pattern"], str(config["version"])
        num_special = int(config["default_num_special_tokens"])
        size = int(config["default_vocab_size"])
        entries = data["vocab"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TokenizerError(
            f"{path}: not a readable tekken file ({type(exc).__name__}: {exc}); it needs 'config' (pattern, "
            "version, default_vocab_size, default_num_special_tokens) and 'vocab' — use Mistral's own tekken.json"
        ) from exc
    declared = data.get("special_tokens")
    if declared is None:
        specials = list(_DEFAULT_SPECIALS)
    else:
        by_rank = sorted((int(t["rank"]), str(t["token_str"])) for t in declared)
        if [rank for rank, _ in by_rank] != list(range(len(by_rank))):
            raise TokenizerError(f"{path}: special_tokens ranks are not 0..{len(by_rank) - 1}; the file is damaged")
        specials = [s for _, s in by_rank]
    specials += [f"<SPECIAL_{i}>" for i in range(len(specials), num_special)]
    inner = size - num_special
    if len(entries) < inner:
        raise TokenizerError(f"{path}: {len(entries)} ranks, fewer than default_vocab_size - specials = {inner}")
    tokens = tuple(base64.b64decode(entry["token_bytes"]) for entry in entries[:inner])
    return instruct, pattern, tokens, tuple(specials)


def read_tekken(path: str | Path | None = None, version: str | None = None) -> TekkenVocab:
    """Read a tekken file: Nemo's built-in one (``path=None``) or a model's ``tekken.json`` (file or directory).

    Args:
        path: a ``tekken.json`` file or a directory holding one; None for ``mistral_common``'s Nemo file.
        version: force our version (``"v7-tekken"`` on Nemo's file gives Mistral Small's format); None: the
            file's ``config.version``.

    Raises:
        TokenizerError: the file is missing, damaged, or of an instruct version this module does not build.
    """
    file = tekken_file() if path is None else Path(path).expanduser()
    if file.is_dir():
        file = file / TEKKEN_FILENAME
    if not file.is_file():
        raise TokenizerError(f"{file}: no tekken file there; give a model directory holding Mistral's tekken.json")
    stat = file.stat()
    instruct, pattern, tokens, specials = _read(str(file.resolve()), (stat.st_mtime_ns, stat.st_size))
    if version is None:
        if instruct not in _FROM_INSTRUCT:
            raise TokenizerError(
                f"{file}: config.version is {instruct!r}; mistral_fast builds tekken tokenizers of instruct "
                f"version {sorted(_FROM_INSTRUCT)} (Mistral Nemo, Mistral Small 3.x). Later versions (v11, v13) "
                "add tool and thinking tokens whose chat format is not reproduced yet: use a v3/v7 model"
            )
        version = _FROM_INSTRUCT[instruct]
    elif version not in TEKKEN_VERSIONS:
        raise TokenizerError(f"tekken version {version!r} is not known; use one of {sorted(TEKKEN_VERSIONS)}")
    missing = [s for s in ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", _PAD) if s not in specials]
    if version == "v7-tekken":
        missing += [s for s in ("[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]") if s not in specials]
    if missing:
        raise TokenizerError(f"{file}: control tokens {missing} are missing, which the {version} format needs")
    return TekkenVocab(version, file, pattern, tokens, specials)


@functools.cache
def tekken_special_strings(version: str) -> frozenset[str]:
    """The control-token strings of the built-in tekken vocabulary (what a chat message must not contain)."""
    return frozenset(read_tekken(version=version).specials)


# ------------------------------------------------------------------------------------------ building


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map (what byte-level BPE vocabularies are written in)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _merges(tokens: tuple[bytes, ...]) -> list[tuple[bytes, bytes]]:
    """Every split of every token into two tokens, by the merged token's rank (see the module docstring)."""
    rank = {token: i for i, token in enumerate(tokens)}
    merges: list[tuple[bytes, bytes]] = []
    for token in tokens:
        splits = [(token[:k], token[k:]) for k in range(1, len(token))]
        found = sorted((rank[a], rank[b], a, b) for a, b in splits if a in rank and b in rank)
        merges.extend((a, b) for _, _, a, b in found)
    return merges


@functools.cache
def _build_backend(path: str, stamp: tuple[int, int]) -> Tokenizer:
    """The `tokenizers` Tokenizer of one tekken file (cached per file version; copy before use)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    _, pattern, tokens, specials = _read(path, stamp)
    alphabet = _byte_alphabet()

    def text(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    vocab = {text(token): rank + len(specials) for rank, token in enumerate(tokens)}
    vocab.update({special: i for i, special in enumerate(specials)})
    merges = [(text(a), text(b)) for a, b in _merges(tokens)]
    backend = Tokenizer(BPE(vocab=vocab, merges=merges, ignore_merges=True, fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return backend


def load_tekken(version: str | None = None, path: str | Path | None = None) -> tuple[PreTrainedTokenizerFast, str]:
    """The exact tekken tokenizer, as a `transformers` fast tokenizer, and its version.

    The chat template is the caller's to set (`mistral_fast.tokenizer.load_tokenizer` does, by version).

    Args:
        version: ``"v3-tekken"`` or ``"v7-tekken"``; None: the file's own ``config.version``.
        path: a model directory (or file) with Mistral's ``tekken.json``; None for Nemo's file in `mistral_common`.

    Returns:
        A fresh `PreTrainedTokenizerFast` (safe to modify; BOS added, no EOS, pad ``<pad>``) and the version
        (``"v3-tekken"``/``"v7-tekken"``; the file's own when `version` is None).

    Raises:
        TokenizerError: no usable tekken file, or an unsupported version.
    """
    import copy

    from transformers import PreTrainedTokenizerFast

    vocab = read_tekken(path, version)
    stat = vocab.path.stat()
    backend = copy.deepcopy(_build_backend(str(vocab.path.resolve()), (stat.st_mtime_ns, stat.st_size)))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token=_PAD,
        add_bos_token=True,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        model_max_length=131072,
        padding_side="right",
    )
    return tokenizer, vocab.version


# ------------------------------------------------------------------------------------------ reference


@functools.cache
def _reference_file(path: str, version: str) -> str:
    """A ``tekken.json`` whose ``config.version`` is `version`'s instruct version (a temporary copy if needed)."""
    instruct = TEKKEN_VERSIONS[version]
    source = Path(path)
    data = json.loads(source.read_text(encoding="utf-8"))
    if data["config"].get("version") == instruct and source.name == TEKKEN_FILENAME:
        return path
    # MistralTokenizer.from_file picks the instruct version from config.version and detects tekken by a
    # file name containing "tekken": the copy is what a user of Mistral Small's tekken.json loads.
    data["config"]["version"] = instruct
    directory = Path(tempfile.mkdtemp(prefix=f"mistral_fast-{version}-"))
    target = directory / TEKKEN_FILENAME
    target.write_text(json.dumps(data), encoding="utf-8")
    import atexit

    atexit.register(shutil.rmtree, directory, True)
    return str(target)


@functools.cache
def tekken_reference(version: str, mode: str = "test", path: str | None = None) -> MistralTokenizer:
    """The `mistral_common` reference for a tekken version, loaded with ``MistralTokenizer.from_file``.

    Args:
        version: ``"v3-tekken"`` or ``"v7-tekken"``.
        mode: `mistral_common`'s validation mode, ``"test"`` or ``"finetuning"``.
        path: a model's ``tekken.json`` (or its directory); None for Nemo's built-in file.

    Returns:
        A cached `MistralTokenizer` (do not modify).
    """
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    vocab = read_tekken(path, version)
    return MistralTokenizer.from_file(_reference_file(str(vocab.path), version), mode=ValidationMode(mode))


# ------------------------------------------------------------------------------------------ chat template

# transformers appends this to the final message for continue_final_message and cuts the render there
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "

# What every Mistral chat template we build shares (v1 and v3 in mistral_fast.tokenizer, v7 here): mistral_common's
# acceptance rules with their messages, the continue_final_message tag, and the grouping of consecutive user /
# assistant messages into turns (``ns.items``), the last one flushed. Only {{ }} output, all tags
# whitespace-trimmed, so a template renders exactly what its format-specific rendering part emits.
_PRELUDE = """\
{#- Mistral instruct __TITLE__ chat format, token-for-token identical to mistral_common 1.13's
    encode_chat_completion (built by mistral_fast.__BUILDER__; see its module docstring). -#}
{%- set tag = '__TAG__' -%}
{%- set where = 'mistral_fast __LABEL__ chat template: ' -%}
{%- if messages | length == 0 -%}
  {{- raise_exception(where ~ 'the conversation is empty; give at least one user message.') -}}
{%- endif -%}
{%- set ns = namespace(items=[], __SYSTEM_LIST__role=none, parts=[], previous=none, continuing=false) -%}
{%- for message in messages -%}
  {%- set at = where ~ 'message ' ~ loop.index0 -%}
  {%- if message is not mapping or message['role'] is not defined -%}
    {{- raise_exception(at ~ ' is not a {"role": ..., "content": ...} mapping.') -}}
  {%- endif -%}
  {%- set role = message['role'] -%}
  {%- if role not in ['system', 'user', 'assistant'] -%}
    {{- raise_exception(at ~ ' has role ' ~ role ~ '; only system, user and assistant are supported '
        ~ '(tool calls are not). Drop or convert that message.') -}}
  {%- endif -%}
  {%- if message['tool_calls'] is defined and message['tool_calls'] -%}
    {{- raise_exception(at ~ ' has tool_calls, which this template does not support; '
        ~ 'put the call in the content as text or drop the message.') -}}
  {%- endif -%}
  {%- if message['content'] is not defined or message['content'] is not string -%}
    {{- raise_exception(at ~ ' (' ~ role ~ ') has no text content; content must be a string.') -}}
  {%- endif -%}
  {%- set content = message['content'] -%}
  {%- set continues = loop.last and content.endswith(tag) -%}
  {%- if continues and role != 'assistant' -%}
    {{- raise_exception(at ~ ' is the last message and has role ' ~ role ~ '; continue_final_message '
        ~ 'needs a final assistant message to continue. Add one or use add_generation_prompt.') -}}
  {%- endif -%}
  {%- set text = content[:(content | length) - (tag | length)] if continues else content -%}
  {%- if continues -%}{%- set ns.continuing = true -%}{%- endif -%}
  {%- if role == 'system' -%}
    {%- if ns.previous == 'assistant' -%}
      {{- raise_exception(at ~ ' is a system message directly after an assistant message, which Mistral '
          ~ '(mistral_common) rejects; __SYSTEM_ADVICE__') -}}
    {%- endif -%}
__SYSTEM_ASIDE__    {%- if ns.role is not none -%}
      {%- set ns.items = ns.items + [{'role': ns.role, 'content': ns.parts | join('\n\n')}] -%}
    {%- endif -%}
__SYSTEM_IN_PLACE__    {%- set ns.role = none -%}
    {%- set ns.parts = [] -%}
  {%- else -%}
    {%- if role == 'assistant' -%}
      {%- if messages | length == 1 -%}
        {{- raise_exception(at ~ ' is the only message and is an assistant message; a conversation must '
            ~ 'start with a user (or system) message.') -}}
      {%- endif -%}
__EMPTY_ASSISTANT__      {%- if loop.last and add_generation_prompt -%}
        {{- raise_exception(at ~ ' is a final assistant message but add_generation_prompt=True asks for a '
            ~ 'new one; drop the last message, or use continue_final_message=True to continue it.') -}}
      {%- endif -%}
    {%- endif -%}
    {%- if role != ns.role -%}
      {%- if ns.role is not none -%}
        {%- set ns.items = ns.items + [{'role': ns.role, 'content': ns.parts | join('\n\n')}] -%}
      {%- endif -%}
      {%- set ns.role = role -%}
      {%- set ns.parts = [] -%}
    {%- endif -%}
    {%- if text -%}{%- set ns.parts = ns.parts + [text] -%}{%- endif -%}
  {%- endif -%}
  {%- set ns.previous = role -%}
{%- endfor -%}
{%- if ns.role is not none -%}
  {%- set ns.items = ns.items + [{'role': ns.role, 'content': ns.parts | join('\n\n')}] -%}
{%- endif -%}
"""

# The two ways a format treats system messages (the only thing the prelude's rules differ on).
_SYSTEM_FILLS: dict[bool, dict[str, str]] = {
    # v1/v3: system texts are set aside (the rendering part puts them in front of a user message), and every
    # assistant message must have text
    False: {
        "__SYSTEM_LIST__": "system=[], ",
        "__SYSTEM_ADVICE__": "move it to the start of the conversation (it is used as the system '\n"
        "          ~ 'prompt wherever it stands).",
        "__SYSTEM_ASIDE__": "    {%- if text -%}{%- set ns.system = ns.system + [text] -%}{%- endif -%}\n",
        "__SYSTEM_IN_PLACE__": "",
        "__EMPTY_ASSISTANT__": "      {%- if not text -%}\n"
        "        {{- raise_exception(at ~ ' is an assistant message with empty content; "
        "give it text or drop it.') -}}\n"
        "      {%- endif -%}\n",
    },
    # v7: each system message stays a turn where it stands (empty ones too); only a whole assistant turn must
    # have text, which the rendering part checks on ns.items
    True: {
        "__SYSTEM_LIST__": "",
        "__SYSTEM_ADVICE__": "move it before the assistant message or to the start.",
        "__SYSTEM_ASIDE__": "",
        "__SYSTEM_IN_PLACE__": "    {%- set ns.items = ns.items + [{'role': 'system', 'content': text}] -%}\n",
        "__EMPTY_ASSISTANT__": "",
    },
}


def chat_template_prelude(label: str, *, title: str, builder: str, system_in_place: bool) -> str:
    """The first part of a Mistral chat template: validation, normalisation and grouping into turns.

    It defines ``tag`` (transformers' continue_final_message tag), ``where`` (the prefix of every error) and
    ``ns``: ``ns.items`` (the turns, ``{"role", "content"}``, consecutive user or assistant messages joined by
    a blank line, empty ones skipped), ``ns.continuing`` (the last assistant turn is to be continued) and, for
    ``system_in_place=False``, ``ns.system`` (the non-empty system texts, in order). The format's rendering
    part follows it.

    Args:
        label: the version in error messages (``"v3"``, ``"v7-tekken"``).
        title: the version in the template's heading comment (``"v3"``, ``"v7 (tekken)"``).
        builder: the module that assembles the template (``"tokenizer"``, ``"tekken"``).
        system_in_place: True (v7): each system message stays a turn in ``ns.items`` and only whole
            assistant turns must have text (the rendering part checks that); False (v1, v3): system texts go
            to ``ns.system`` and every assistant message must have text.

    Returns:
        The Jinja text, ending at a line break.
    """
    text = _PRELUDE.replace("__TITLE__", title).replace("__BUILDER__", builder).replace("__LABEL__", label)
    text = text.replace("__TAG__", _CONTINUE_TAG)
    for slot, fill in _SYSTEM_FILLS[system_in_place].items():
        text = text.replace(slot, fill)
    return text


INSTRUCT_TURNS = """\
    {{- '[INST]' ~ content ~ '[/INST]' -}}
  {%- elif loop.last and ns.continuing -%}
    {{- content.rstrip(' ') ~ tag -}}
  {%- else -%}
    {%- generation -%}{{- content.rstrip(' ') ~ '</s>' -}}{%- endgeneration -%}
  {%- endif -%}
{%- endfor -%}
"""
"""How v3 and v7 render a user turn and an assistant turn (the end of their chat templates).

It continues the ``if``/``elif item['role'] == 'user'`` line of the loop over ``ns.items``: ``[INST]text[/INST]``
for a user turn; for an assistant turn its text right-stripped of spaces and closed by ``</s>`` (marked as the
assistant's for the loss mask), or by the continue tag when the last turn is continued.
"""


# The v7 format (mistral_common 1.13's InstructTokenizerV7 + InstructRequestNormalizerV7): system messages
# are kept in place (empty ones too, text unchanged) as [SYSTEM_PROMPT]…[/SYSTEM_PROMPT]; runs of user
# messages are joined with "\n\n" (empty ones skipped), likewise assistant runs, and only a whole assistant
# run must have text (v3 refuses every empty assistant message); no empty user message is inserted before a
# leading assistant message; assistant text is right-stripped of spaces and closed by </s>.
CHAT_TEMPLATE_V7 = (
    chat_template_prelude("v7-tekken", title="v7 (tekken)", builder="tekken", system_in_place=True)
    + """\
{%- for item in ns.items if item['role'] == 'assistant' and not item['content'] -%}
  {{- raise_exception(where ~ 'message ' ~ loop.index0 ~ ': an assistant turn (consecutive assistant messages '
      ~ 'joined) has empty content; give it text or drop it.') -}}
{%- endfor -%}
{{- '<s>' -}}
{%- for item in ns.items -%}
  {%- set content = item['content'] -%}
  {%- if item['role'] == 'system' -%}
    {{- '[SYSTEM_PROMPT]' ~ content ~ '[/SYSTEM_PROMPT]' -}}
  {%- elif item['role'] == 'user' -%}
"""
    + INSTRUCT_TURNS
)
"""Jinja chat template of Mistral Small 3.x (v7 instruct, tekken), token-exact with `mistral_common`."""
