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
* ``"v11-tekken"`` / ``"v13-tekken"`` — Mistral Small 3.2 and Devstral (v11), Magistral (v13): the v7 format
  with other tool formats (``[TOOL_CALLS]name[CALL_ID]id[ARGS]{…}``; v13: no call ids, tools before the first
  user turn, ``[THINK]…[/THINK]`` reasoning traces). Their files carry a ``special_tokens`` table (``[ARGS]``,
  ``[CALL_ID]``, ``[THINK]``, ``[/THINK]`` at ranks 32-35); `write_tekken_file` writes one from Nemo's
  vocabulary, which is also what the built-in v11/v13 tokenizers are read from.

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
    "CHAT_TEMPLATE_V11",
    "CHAT_TEMPLATE_V13",
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
    "write_tekken_file",
]

BUILTIN_FILE = "tekken_240718.json"
"""Nemo's tekken file inside ``mistral_common/data`` (config version v3, 131,072 ids)."""
TEKKEN_FILENAME = "tekken.json"
"""The name of the tekken file in Mistral's model repositories (what ``MistralTokenizer.from_file`` detects)."""

TEKKEN_VERSIONS: dict[str, str] = {"v3-tekken": "v3", "v7-tekken": "v7", "v11-tekken": "v11", "v13-tekken": "v13"}
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
# Control tokens v11/v13 files add (by rank) after the first 20; the ranks follow the tables of Mistral Small
# 3.2's and Magistral's tekken.json (ranks 20-31 hold audio/other markers there: fillers here).
_V11_SPECIALS = {32: "[ARGS]", 33: "[CALL_ID]", 34: "[THINK]", 35: "[/THINK]"}
# what each format needs beyond <unk>, <s>, </s>, [INST], [/INST], <pad>
_NEEDED = {
    "v3-tekken": (),
    "v7-tekken": ("[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"),
    "v11-tekken": ("[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[ARGS]", "[CALL_ID]"),
    "v13-tekken": ("[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[ARGS]"),
}


def is_tekken_version(version: str | None) -> bool:
    """Whether `version` names one of the tekken tokenizers (``"v3-tekken"`` … ``"v13-tekken"``)."""
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
    if path is None and version in ("v11-tekken", "v13-tekken"):
        path = _builtin_table_file(TEKKEN_VERSIONS[version])
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
                f"version {sorted(_FROM_INSTRUCT)} (Mistral Nemo, Small 3.x, Magistral, Devstral); use a model "
                "whose tekken.json has one of these"
            )
        version = _FROM_INSTRUCT[instruct]
    elif version not in TEKKEN_VERSIONS:
        raise TokenizerError(f"tekken version {version!r} is not known; use one of {sorted(TEKKEN_VERSIONS)}")
    needed = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", _PAD, *_NEEDED[version])
    missing = [s for s in needed if s not in specials]
    if missing:
        raise TokenizerError(f"{file}: control tokens {missing} are missing, which the {version} format needs")
    return TekkenVocab(version, file, pattern, tokens, specials)


def write_tekken_file(directory: str | Path, version: str = "v13") -> Path:
    """Write a ``tekken.json`` of instruct version `version` with a 1,000-entry ``special_tokens`` table.

    What Mistral Small 3.2 / Magistral / Devstral repositories ship: Nemo's vocabulary (``tekken_240718.json``
    from `mistral_common`) with ``config.version`` set and the control tokens listed as
    ``{"rank", "token_str", "is_control"}``: the first 20 as in Nemo's file, ``[ARGS]``, ``[CALL_ID]``,
    ``[THINK]``, ``[/THINK]`` at ranks 32-35, ``<SPECIAL_{rank}>`` elsewhere. mistral_common refuses a v11/v13
    file without that table. Tests build one and compare with mistral_common loading the same file.

    Args:
        directory: created if missing; the file is ``directory/tekken.json``.
        version: the instruct version, ``"v3"``, ``"v7"``, ``"v11"`` or ``"v13"``.

    Returns:
        The path of the written file.
    """
    if version not in _FROM_INSTRUCT:
        raise TokenizerError(f"version={version!r}: write_tekken_file writes one of {sorted(_FROM_INSTRUCT)}")
    data = json.loads(tekken_file().read_text(encoding="utf-8"))
    data["config"]["version"] = version
    count = int(data["config"]["default_num_special_tokens"])
    names = {**dict(enumerate(_DEFAULT_SPECIALS)), **_V11_SPECIALS}
    data["special_tokens"] = [
        {"rank": i, "token_str": names.get(i, f"<SPECIAL_{i}>"), "is_control": True} for i in range(count)
    ]
    target = Path(directory).expanduser() / TEKKEN_FILENAME
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(data), encoding="utf-8")
    return target


@functools.cache
def _builtin_table_file(instruct: str) -> str:
    """A v11/v13 ``tekken.json`` built once per process (`write_tekken_file`) for the built-in v11/v13 tokenizers."""
    import atexit

    directory = Path(tempfile.mkdtemp(prefix=f"mistral_fast-tekken-{instruct}-"))
    atexit.register(shutil.rmtree, directory, True)
    return str(write_tekken_file(directory, instruct))


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
    _, pattern, tokens, specials = _read(path, stamp)
    return _backend_of(pattern, tokens, specials)


@functools.cache
def _backend_of(pattern: str, tokens: tuple[bytes, ...], specials: tuple[str, ...]) -> Tokenizer:
    """The Tokenizer of a vocabulary, cached by content: the v3/v7/v11/v13 files of one vocabulary share it."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

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
{%- set ns = namespace(items=[], __SYSTEM_LIST__role=none, parts=[], previous=none, continuing=false, calls=[],
    think=none, count=0, call_ids=[], tool_id=none, raw=none) -%}
{%- for message in messages -%}
  {%- set at = where ~ 'message ' ~ loop.index0 -%}
  {%- if message is not mapping or message['role'] is not defined -%}
    {{- raise_exception(at ~ ' is not a {"role": ..., "content": ...} mapping.') -}}
  {%- endif -%}
  {%- set role = message['role'] -%}
__MESSAGE_SHAPE__  {%- set continues = loop.last and content.endswith(tag) -%}
  {%- if continues and role != 'assistant' -%}
    {{- raise_exception(at ~ ' is the last message and has role ' ~ role ~ '; continue_final_message '
        ~ 'needs a final assistant message to continue. Add one or use add_generation_prompt.') -}}
  {%- endif -%}
  {%- set text = content[:(content | length) - (tag | length)] if continues else content -%}
  {%- if continues -%}{%- set ns.continuing = true -%}{%- endif -%}
  {%- if role == 'system' -%}
    {%- if ns.previous in ['assistant', 'tool'] -%}
      {{- raise_exception(at ~ ' is a system message directly after an assistant message, which Mistral '
          ~ '(mistral_common) rejects; __SYSTEM_ADVICE__') -}}
    {%- endif -%}
__SYSTEM_ASIDE__    {%- if ns.role is not none -%}
      {%- set ns.items = ns.items + [{'role': ns.role, 'content': ns.parts | join('\n\n')__RUN_FIELDS__}] -%}
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
    {%- if role != ns.role or role == 'tool' -%}
      {%- if ns.role is not none -%}
        {%- set ns.items = ns.items + [{'role': ns.role, 'content': ns.parts | join('\n\n')__RUN_FIELDS__}] -%}
      {%- endif -%}
      {%- set ns.role = role -%}
      {%- set ns.parts = [] -%}
__RUN_START__    {%- endif -%}
__RUN_ADD__    {%- if text -%}{%- set ns.parts = ns.parts + [text] -%}{%- endif -%}
  {%- endif -%}
  {%- set ns.previous = role -%}
{%- endfor -%}
{%- if ns.role is not none -%}
  {%- set ns.items = ns.items + [{'role': ns.role, 'content': ns.parts | join('\n\n')__RUN_FIELDS__}] -%}
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


def chat_template_prelude(
    label: str, *, title: str, builder: str, system_in_place: bool, tools: bool = True, thinking: bool = False
) -> str:
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
        tools: accept tool messages, ``tool_calls`` and content chunks (every version but v1): items then
            also carry ``calls``, ``think``, ``id`` (a tool result's call id) and ``key`` (its call's position).
        thinking: accept a reasoning trace (``reasoning_content`` / ``thinking`` / a thinking chunk; v13).

    Returns:
        The Jinja text, ending at a line break.
    """
    text = _PRELUDE.replace("__TITLE__", title).replace("__BUILDER__", builder).replace("__LABEL__", label)
    text = text.replace("__TAG__", _CONTINUE_TAG)
    for slot, fill in _SYSTEM_FILLS[system_in_place].items():
        if tools and slot == "__EMPTY_ASSISTANT__" and fill:
            fill = _V3_ASSISTANT_CHECK
        text = text.replace(slot, fill)
    for slot, fill in (_TOOL_FILLS if tools else _PLAIN_FILLS).items():
        text = text.replace(slot, fill)
    if not thinking:
        text = text.replace("__NO_THINKING__", _NO_THINKING.replace("__LABEL__", label))
    return text.replace("__NO_THINKING__", "")


# v1: the message shape of the original template (no tools, text content only)
_PLAIN_FILLS: dict[str, str] = {
    "__MESSAGE_SHAPE__": """\
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
""",
    "__RUN_FIELDS__": "",
    "__RUN_START__": "",
    "__RUN_ADD__": "",
}

# v3 and later: tool messages (each its own item), tool_calls (concatenated over a run of assistant messages),
# content as a string or a list of text chunks (joined by a blank line, as mistral_common joins chunks) with
# one leading thinking chunk in an assistant message; `reasoning_content` / `thinking` fields.
_TOOL_FILLS: dict[str, str] = {
    "__MESSAGE_SHAPE__": """\
  {%- if role not in ['system', 'user', 'assistant', 'tool'] -%}
    {{- raise_exception(at ~ ' has role ' ~ role ~ '; use system, user, assistant or tool.') -}}
  {%- endif -%}
  {%- set calls = message['tool_calls'] if message['tool_calls'] is defined and message['tool_calls'] else [] -%}
  {%- if calls and role != 'assistant' -%}
    {{- raise_exception(at ~ ' (' ~ role ~ ') has tool_calls; only assistant messages make tool calls.') -}}
  {%- endif -%}
  {%- set think = none -%}
  {%- if role == 'assistant' and message['reasoning_content'] is defined
      and message['reasoning_content'] is not none -%}
    {%- set think = message['reasoning_content'] -%}
  {%- elif role == 'assistant' and message['thinking'] is defined and message['thinking'] is not none -%}
    {%- set think = message['thinking'] -%}
  {%- endif -%}
  {%- set content = message['content'] if message['content'] is defined and message['content'] is not none else '' -%}
  {%- if content is not string -%}
    {%- if content is mapping or content is not iterable -%}
      {{- raise_exception(at ~ ' (' ~ role ~ '): content must be a string or a list of chunks.') -}}
    {%- endif -%}
    {%- set cn = namespace(texts=[], think=none) -%}
    {%- for chunk in content -%}
      {%- if chunk is mapping and chunk['type'] == 'text' -%}
        {%- if chunk['text'] -%}{%- set cn.texts = cn.texts + [chunk['text']] -%}{%- endif -%}
      {%- elif chunk is mapping and chunk['type'] == 'thinking' and role == 'assistant' and not cn.texts
          and cn.think is none -%}
        {%- set cn.think = chunk['thinking'] -%}
      {%- else -%}
        {{- raise_exception(at ~ ' (' ~ role ~ '): content chunk ' ~ loop.index0 ~ ' is not supported; use '
            ~ 'text chunks (and one thinking chunk first in an assistant message).') -}}
      {%- endif -%}
    {%- endfor -%}
    {%- if cn.think is not none and think is not none -%}
      {{- raise_exception(at ~ ': both a thinking chunk and a reasoning_content/thinking field; keep one.') -}}
    {%- endif -%}
    {%- if cn.think is not none -%}{%- set think = cn.think -%}{%- endif -%}
    {%- set content = cn.texts | join('\\n\\n') -%}
  {%- endif -%}
__NO_THINKING__  {%- if role == 'tool' and ns.previous not in ['assistant', 'tool'] -%}
    {{- raise_exception(at ~ ' is a tool result that does not follow an assistant message with tool calls '
        ~ '(or another tool result); put it right after the call.') -}}
  {%- endif -%}
""",
    "__RUN_FIELDS__": ", 'calls': ns.calls, 'think': ns.think, 'id': ns.tool_id, "
    "'key': (ns.call_ids.index(ns.tool_id) if ns.tool_id in ns.call_ids else 1000000), 'raw': ns.raw",
    "__RUN_START__": """\
      {%- set ns.calls = [] -%}
      {%- set ns.think = none -%}
      {%- set ns.count = 0 -%}
      {%- set ns.tool_id = none -%}
      {%- set ns.raw = none -%}
      {%- if role != 'tool' and ns.previous == 'tool' -%}{%- set ns.call_ids = [] -%}{%- endif -%}
""",
    "__RUN_ADD__": """\
    {%- set ns.count = ns.count + 1 -%}
    {%- if role == 'tool' -%}
      {%- set ns.tool_id = message['tool_call_id'] if message['tool_call_id'] is defined else none -%}
      {%- set ns.raw = message['content_json'] if message['content_json'] is defined else none -%}
    {%- endif -%}
    {%- if calls -%}
      {%- if loop.last and continues -%}
        {{- raise_exception(at ~ ': continue_final_message on a message with tool_calls; continue a text '
            ~ 'message instead.') -}}
      {%- endif -%}
      {%- set ns.calls = ns.calls + calls -%}
      {%- for call in calls -%}
        {%- set ns.call_ids = ns.call_ids + [call['id'] if call['id'] is defined and call['id'] else 'null'] -%}
      {%- endfor -%}
    {%- endif -%}
    {%- if think is not none -%}{%- set ns.think = think -%}{%- endif -%}
    {%- if ns.think is not none and ns.count > 1 -%}
      {{- raise_exception(at ~ ': an assistant message with a reasoning trace next to another assistant '
          ~ 'message; merge them into one message.') -}}
    {%- endif -%}
""",
}

_NO_THINKING = """\
  {%- if think is not none -%}
    {{- raise_exception(at ~ ' has a reasoning trace (reasoning_content / thinking); the __LABEL__ format has no '
        ~ 'thinking tokens (mistral_common encodes them from v13 on): drop it or use a v13 tokenizer.') -}}
  {%- endif -%}
"""

# v3: each assistant message has text or tool calls, not both (mistral_common's v3 validator and normaliser)
_V3_ASSISTANT_CHECK = """\
      {%- if not text and not calls -%}
        {{- raise_exception(at ~ ' is an assistant message with empty content and no tool calls; give it text '
            ~ 'or drop it.') -}}
      {%- endif -%}
      {%- if text and calls -%}
        {{- raise_exception(at ~ ' has both text and tool_calls, which the v3 format (mistral_common) '
            ~ 'rejects; put the text in a message of its own.') -}}
      {%- endif -%}
"""


def _jinja_literal(text: str) -> str:
    """A Jinja string literal of `text` (Jinja unescapes literals like Python's unicode-escape)."""
    return "'" + text.encode("unicode_escape").decode("ascii").replace("'", "\\'") + "'"


# json.dumps(ensure_ascii=False)'s escapes: backslash first, then the quote, then every control character
_JSON_ESCAPES = "".join(
    f" | replace({_jinja_literal(c)}, {_jinja_literal(json.dumps(c)[1:-1])})" for c in ["\\", '"', *map(chr, range(32))]
)

# A JSON writer in Jinja, equal to Python's json.dumps(value, ensure_ascii=False) on JSON data. `tojson` only
# where it is that (transformers' and llama-cpp-python's filter: json.dumps; probed once, `mf_native`, as it is
# 4x faster): plain Jinja2's sorts keys and escapes non-ASCII and <>&', and other engines differ again.
_JSON_MACRO = (
    """\
{%- set mf_native = ({'b': 'é<', 'a': [1, none, true]} | tojson) == '{"b": "é<", "a": [1, null, true]}' -%}
{%- macro mf_json(v) -%}
  {%- if mf_native -%}{{- v | tojson -}}
  {%- elif v is none -%}{{- 'null' -}}
  {%- elif v is sameas true -%}{{- 'true' -}}
  {%- elif v is sameas false -%}{{- 'false' -}}
  {%- elif v is string -%}{{- '"' ~ (v"""
    + _JSON_ESCAPES
    + """) ~ '"' -}}
  {%- elif v is number -%}{{- v | string -}}
  {%- elif v is mapping -%}
    {{- '{' -}}
    {%- for k, x in v.items() -%}
      {{- mf_json(k | string) ~ ': ' ~ mf_json(x) -}}{%- if not loop.last -%}{{- ', ' -}}{%- endif -%}
    {%- endfor -%}
    {{- '}' -}}
  {%- else -%}
    {{- '[' -}}
    {%- for x in v -%}{{- mf_json(x) -}}{%- if not loop.last -%}{{- ', ' -}}{%- endif -%}{%- endfor -%}
    {{- ']' -}}
  {%- endif -%}
{%- endmacro -%}
{%- macro mf_args(a) -%}
  {%- if a is none or a is undefined or a == '' -%}{{- '{}' -}}
  {%- elif a is string -%}{{- a -}}
  {%- else -%}{{- mf_json(a) -}}
  {%- endif -%}
{%- endmacro -%}
"""
)


def tools_setup(first_user: bool) -> str:
    """Jinja that puts the tool list (``tn.tools``) and the index of the user turn it precedes (``tn.at``).

    mistral_common dumps ``Tool.model_dump()`` without ``strict``: ``{"type": "function", "function":
    {"name", "description" ("" if absent), "parameters" ({} if absent)}}``, before the last user message
    (v3, v7, v11) or the first (v13), only when the list is not empty.
    """
    return (
        _JSON_MACRO
        + """\
{%- set tn = namespace(tools=[], at=-1) -%}
{%- if tools is defined and tools -%}
  {%- for t in tools -%}
    {%- set f = t['function'] if t['function'] is defined else t -%}
    {%- set tn.tools = tn.tools + [{'type': 'function', 'function': {'name': f['name'],
        'description': f['description'] if f['description'] is defined and f['description'] is not none else '',
        'parameters': f['parameters'] if f['parameters'] is defined and f['parameters'] is not none else {}}}] -%}
  {%- endfor -%}
{%- endif -%}
{%- for item in ns.items -%}
  {%- if item['role'] == 'user' and (tn.at == -1 or not __FIRST__) -%}{%- set tn.at = loop.index0 -%}{%- endif -%}
{%- endfor -%}
""".replace("__FIRST__", "true" if first_user else "false")
    )


_CALLS = {
    # v3 / v7: [TOOL_CALLS] then a JSON list of {"name", "arguments", "id"} (no id when it is absent/"null")
    "json": """\
{{- '[TOOL_CALLS][' -}}
{%- for call in item['calls'] -%}
  {%- set a = call['function']['arguments'] if call['function']['arguments'] is defined else none -%}
  {{- '{"name": ' ~ mf_json(call['function']['name']) ~ ', "arguments": ' ~ mf_args(a) -}}
  {%- if call['id'] is defined and call['id'] and call['id'] != 'null' -%}
    {{- ', "id": ' ~ mf_json(call['id']) -}}
  {%- endif -%}
  {{- '}' -}}{%- if not loop.last -%}{{- ', ' -}}{%- endif -%}
{%- endfor -%}
{{- ']' -}}""",
    # v11: [TOOL_CALLS]name[CALL_ID]id[ARGS]{json} per call
    "v11": """\
{%- for call in item['calls'] -%}
  {%- set a = call['function']['arguments'] if call['function']['arguments'] is defined else none -%}
  {{- '[TOOL_CALLS]' ~ call['function']['name'] -}}
  {%- if call['id'] is defined and call['id'] and call['id'] != 'null' -%}
    {{- '[CALL_ID]' ~ call['id'] -}}
  {%- endif -%}
  {{- '[ARGS]' ~ mf_args(a) -}}
{%- endfor -%}""",
    # v13: [TOOL_CALLS]name[ARGS]{json} per call (no call id)
    "v13": """\
{%- for call in item['calls'] -%}
  {%- set a = call['function']['arguments'] if call['function']['arguments'] is defined else none -%}
  {{- '[TOOL_CALLS]' ~ call['function']['name'] ~ '[ARGS]' ~ mf_args(a) -}}
{%- endfor -%}""",
}

_RESULTS = {
    # v3: {"content": <the result parsed as JSON when it is JSON>, "call_id": id}; a template cannot parse
    # JSON, so a string is written as a JSON string unless the message carries `content_json`, the canonical
    # JSON text of a JSON result (what tokenize_conversation adds)
    "json": """\
    {%- set c = item['raw'] if item['raw'] is not none
        else ('{}' if item['content'] == '' else mf_json(item['content'])) -%}
    {{- '[TOOL_RESULTS]{"content": ' ~ c ~ ', "call_id": ' ~ mf_json(item['id']) ~ '}[/TOOL_RESULTS]' -}}""",
    "v7": """\
    {{- '[TOOL_RESULTS]' ~ item['id'] ~ '[TOOL_CONTENT]' ~ content ~ '[/TOOL_RESULTS]' -}}""",
    "v13": """\
    {{- '[TOOL_RESULTS]' ~ content ~ '[/TOOL_RESULTS]' -}}""",
}


def instruct_turns(calls: str = "json", results: str = "json") -> str:
    """How a format renders user, tool and assistant turns (the end of the v3/v7/v11/v13 chat templates).

    It continues the ``if``/``elif item['role'] == 'user'`` line of the loop over ``ns.items``:
    ``[AVAILABLE_TOOLS]…[/AVAILABLE_TOOLS]`` before the user turn ``tn.at``, ``[INST]text[/INST]``; a tool
    result in the format's way; an assistant turn as ``[THINK]trace[/THINK]`` (v13), its text (right-stripped
    of spaces unless a trace precedes it: mistral_common strips only plain-string content), its tool calls and
    ``</s>``, all marked as the assistant's for the loss mask, or cut at the continue tag.

    Args:
        calls: ``"json"`` (v3, v7), ``"v11"`` or ``"v13"``.
        results: ``"json"`` (v3), ``"v7"`` (v7, v11) or ``"v13"``.
    """
    body = (
        "{{- ('[THINK]' ~ item['think'] ~ '[/THINK]' ~ content) if item['think'] is not none "
        "else content.rstrip(' ') -}}"
    )
    return (
        """\
    {%- if tn.tools and loop.index0 == tn.at -%}
      {{- '[AVAILABLE_TOOLS]' ~ mf_json(tn.tools) ~ '[/AVAILABLE_TOOLS]' -}}
    {%- endif -%}
    {{- '[INST]' ~ content ~ '[/INST]' -}}
  {%- elif item['role'] == 'tool' -%}
"""
        + _RESULTS[results]
        + """
  {%- elif loop.last and ns.continuing -%}
    """
        + body
        + """{{- tag -}}
  {%- else -%}
    {%- generation -%}"""
        + body
        + "{%- if item['calls'] -%}"
        + _CALLS[calls]
        + """{%- endif -%}{{- '</s>' -}}{%- endgeneration -%}
  {%- endif -%}
{%- endfor -%}
"""
    )


INSTRUCT_TURNS = instruct_turns()
"""The v3 rendering of user, tool and assistant turns (`instruct_turns`)."""


# The v7 format (mistral_common 1.13's InstructTokenizerV7 + InstructRequestNormalizerV7): system messages
# are kept in place (empty ones too, text unchanged) as [SYSTEM_PROMPT]…[/SYSTEM_PROMPT]; runs of user
# messages are joined with "\n\n" (empty ones skipped), likewise assistant runs, and only a whole assistant
# run must have text (v3 refuses every empty assistant message); no empty user message is inserted before a
# leading assistant message; assistant text is right-stripped of spaces and closed by </s>.
# v13 (InstructRequestNormalizerV13): the results of one run of tool messages are put in the order of the calls
# they answer (stable; results of unknown ids last); mistral_common then writes them without call ids.
_SORT_RESULTS = """\
{%- set sn = namespace(items=[], run=[]) -%}
{%- for item in ns.items -%}
  {%- if item['role'] == 'tool' -%}{%- set sn.run = sn.run + [item] -%}
  {%- else -%}{%- set sn.items = sn.items + (sn.run | sort(attribute='key')) + [item] -%}{%- set sn.run = [] -%}
  {%- endif -%}
{%- endfor -%}
{%- set ns.items = sn.items + (sn.run | sort(attribute='key')) -%}
"""


def _system_in_place_template(version: str, title: str) -> str:
    """The chat template of the formats that keep system messages in place (v7, v11, v13; see CHAT_TEMPLATE_V7)."""
    calls, results = {"v7-tekken": ("json", "v7"), "v11-tekken": ("v11", "v7"), "v13-tekken": ("v13", "v13")}[version]
    v13 = version == "v13-tekken"
    return (
        chat_template_prelude(version, title=title, builder="tekken", system_in_place=True, thinking=v13)
        + (_SORT_RESULTS if v13 else "")
        + """\
{%- for item in ns.items if item['role'] == 'assistant' and not item['content'] and not item['calls']
    and item['think'] is none -%}
  {{- raise_exception(where ~ 'message ' ~ loop.index0 ~ ': an assistant turn (consecutive assistant messages '
      ~ 'joined) has empty content and no tool calls; give it text or drop it.') -}}
{%- endfor -%}
"""
        + tools_setup(first_user=v13)
        + """\
{{- '<s>' -}}
{%- for item in ns.items -%}
  {%- set content = item['content'] -%}
  {%- if item['role'] == 'system' -%}
    {{- '[SYSTEM_PROMPT]' ~ content ~ '[/SYSTEM_PROMPT]' -}}
  {%- elif item['role'] == 'user' -%}
"""
        + instruct_turns(calls, results)
    )


CHAT_TEMPLATE_V7 = _system_in_place_template("v7-tekken", "v7 (tekken)")
"""Jinja chat template of Mistral Small 3.x (v7 instruct, tekken), token-exact with `mistral_common`."""
CHAT_TEMPLATE_V11 = _system_in_place_template("v11-tekken", "v11 (tekken)")
"""Jinja chat template of Mistral Small 3.2 / Devstral (v11 instruct: ``[TOOL_CALLS]name[CALL_ID]id[ARGS]…``)."""
CHAT_TEMPLATE_V13 = _system_in_place_template("v13-tekken", "v13 (tekken)")
"""Jinja chat template of Magistral (v13: tools before the first user turn, no call ids, ``[THINK]…[/THINK]``)."""
