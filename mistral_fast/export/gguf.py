"""GGUF export with gguf-py (no llama.cpp build), k-quants through llama.cpp's own quantiser, Modelfile.

`export_gguf` writes llama.cpp's ``llama`` architecture (what llama.cpp's own converter uses for
Mistral): its tensor names, Q/K rows permuted into the rotary layout llama.cpp expects, the exact
SentencePiece vocabulary (pieces, scores, token types, BOS/EOS/UNK, add_bos, add_space_prefix) and
our chat template. It streams: a first pass reads only the safetensors headers to write the GGUF
header and tensor table, a second converts and writes one tensor at a time. Files are written to a
temporary name and renamed, so an interrupted export never leaves a truncated GGUF at the final path.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mistral_fast.atomic import atomic_path
from mistral_fast.constants import GGUF_TYPES, KQUANT_TYPES
from mistral_fast.errors import ModelError
from mistral_fast.export import kernels, prequant
from mistral_fast.export.kernels import RowMerge
from mistral_fast.export.merge import FileRows, checkpoint_files, read_ahead, read_tensor

if TYPE_CHECKING:
    import numpy as np
    import torch

log = logging.getLogger("mistral_fast")

# Written by gguf-py in numpy; k-quants need llama.cpp's quantiser (importance-aware mixes per tensor).
# Neither is in scripts/setup.sh's demo layer (the demo writes no GGUF; llama-cpp-python compiles for minutes),
# so a GGUF export without them stops before any work, saying what to install and what it costs.
INSTALL_LLAMA_CPP = (
    "k-quants (and the equivalence report) need llama.cpp's Python bindings, which are not installed: "
    "pip install 'mistral-fast[gguf]' (in a checkout: bash scripts/setup.sh --test) compiles llama.cpp once, "
    "about 3 min on 2 cores, and pip reuses the built wheel after that "
    '(CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF '
    '-DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_CURL=OFF -DLLAVA_BUILD=OFF" keeps it short); '
    f"{', '.join(GGUF_TYPES)} need only the gguf package"
)
INSTALL_GGUF = (
    "GGUF files are written with the gguf package (llama.cpp's gguf-py, pure Python), which is not installed: "
    "pip install 'gguf>=0.17' (seconds), or pip install 'mistral-fast[gguf]', which also builds llama-cpp-python "
    "for the k-quants (compiles llama.cpp once, about 3 min on 2 cores)"
)


def require_gguf(what: str) -> None:
    """Stop before any work when the gguf package is missing, naming `what` asked for a GGUF.

    Raises:
        ModelError: gguf is not installed (the message says how to install it).
    """
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise ModelError(f"{what}: {INSTALL_GGUF}")


_ARCH = "llama"
# A Mistral3 wrapper's parts that are not the text model: llama.cpp's converter leaves them out of the text GGUF
# (TextModel.filter_tensors skips "vision_" and "projector." names) and writes them to the mmproj file instead.
_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


@dataclass
class _Tensor:
    """One output tensor: where it comes from and how it is written."""

    source: Path
    hf_name: str
    gguf_name: str
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType
    permute_heads: int  # 0: no Q/K permutation; else the number of heads to permute by
    parts: tuple[tuple[Path, str], ...] = ()  # Mixtral: one expert's (file, tensor) per slice of a stacked tensor


class _Stacked:
    """Mixtral's experts stacked as llama.cpp's ``ffn_*_exps`` ``[E, rows, cols]``, read as E·rows rows.

    Each expert is merged on its own (its own LoRA delta, its own NF4 round trip) by its `RowMerge`;
    this only maps a global row range onto the experts' rows, as ``torch.stack`` then reshape would.
    """

    def __init__(self, experts: list[RowMerge]) -> None:
        self.experts = experts
        self.per_expert = experts[0].rows_total
        self.rows_total = self.per_expert * len(experts)

    def rows(self, start: int, end: int) -> torch.Tensor:
        import torch

        chunks = []
        while start < end:
            e, local = divmod(start, self.per_expert)
            stop = min(end - start, self.per_expert - local) + local
            chunks.append(self.experts[e].rows(local, stop))
            start += stop - local
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)


def _ggml_type(qtype: str) -> Any:
    import gguf

    return gguf.GGMLQuantizationType[qtype.upper()]


def _file_type(qtype: str) -> int:
    import gguf

    names = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}
    names |= {"q4_0": "MOSTLY_Q4_0", "q5_0": "MOSTLY_Q5_0"}
    return int(gguf.LlamaFileType[names[qtype]])


def permute_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's rotary layout (halves) to llama.cpp's (interleaved pairs), as llama.cpp's converter does.

    HF checkpoints were permuted from Meta's layout when converted; llama.cpp's ``llama`` rope works
    on Meta's interleaved layout, so each head's rows go back: (2, d/2) -> (d/2, 2).
    """
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _read_config(model_dir: Path) -> dict[str, Any]:
    """config.json, flat: a Mistral3 wrapper's text_config lifted to the top, as llama.cpp's converter does
    (``TextModel.__init__``), with ``gguf_arch`` set to the llama.cpp architecture the text model is written as:
    ``mistral3`` for Mistral3ForConditionalGeneration (conversion/mistral3.py), ``llama`` for the rest."""
    from mistral_fast.families import text_config

    raw = json.loads((model_dir / "config.json").read_text())
    archs = raw.get("architectures") or []
    known = raw.get("model_type") in ("mistral", "mixtral", "llama", "mistral3")
    if not known and not any("Mistral" in a for a in archs):
        raise ModelError(f"{model_dir}: GGUF export supports Mistral (llama-architecture) models, not {archs}")
    config = text_config(raw)
    config["gguf_arch"] = "mistral3" if raw.get("model_type") == "mistral3" else _ARCH
    if config["gguf_arch"] == "mistral3" and config.get("model_type") == "ministral3":
        raise ModelError(
            f"{model_dir}: a Ministral 3 language model (text model_type ministral3: YaRN RoPE with llama 4 "
            "attention scaling) is not written by this GGUF exporter yet; convert the merged checkpoint with "
            "llama.cpp's convert_hf_to_gguf.py (and --mmproj for the vision projector)"
        )
    return config


def _plan(model_dir: Path, config: dict[str, Any], qtype: str) -> list[_Tensor]:
    """Map every checkpoint tensor to its GGUF name and type (headers only, no data read)."""
    import gguf
    from safetensors import safe_open

    arch = gguf.MODEL_ARCH.MISTRAL3 if config.get("gguf_arch") == "mistral3" else gguf.MODEL_ARCH.LLAMA
    name_map = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    n_head, n_kv = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    plan = []
    experts: dict[tuple[int, str], dict[int, tuple[Path, str, tuple[int, ...]]]] = {}
    quantized = prequant.quantization(model_dir) is not None  # a *-bnb-4bit checkpoint: read dequantised
    for file in checkpoint_files(model_dir):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                if name.endswith("rotary_emb.inv_freq") or (quantized and prequant.is_auxiliary(model_dir, name)):
                    continue  # recomputed by llama.cpp from rope_theta; a 4-bit weight's state
                if name.startswith(_VISION_PREFIXES):
                    continue  # a Mistral3 wrapper's vision part: the mmproj file (`export_mmproj`)
                shape = tuple((quantized and prequant.stored_shape(model_dir, name)) or f.get_slice(name).get_shape())
                expert = _EXPERT.match(name)
                if expert:  # gathered below into llama.cpp's stacked tensor
                    experts.setdefault((int(expert["layer"]), expert["w"]), {})[int(expert["e"])] = (file, name, shape)
                    continue
                # the converter's ModelBase.filter_tensors: "language_model." dropped from wrapper names
                gguf_name = name_map.get_name(name.replace("language_model.", ""), try_suffixes=(".weight", ".bias"))
                if gguf_name is None:
                    raise ModelError(f"{model_dir}: tensor {name!r} has no llama.cpp name; not a Mistral checkpoint?")
                heads = n_head if name.endswith("q_proj.weight") else n_kv if name.endswith("k_proj.weight") else 0
                # the router stays F32, as llama.cpp's converter and quantiser keep ffn_gate_inp
                router = gguf_name.endswith("ffn_gate_inp.weight")
                kind = gguf.GGMLQuantizationType.F32 if router else _tensor_type(shape, qtype)
                plan.append(_Tensor(file, name, gguf_name, shape, kind, heads))
    plan += _stacked_experts(experts, config, name_map, qtype, model_dir)
    # One order whatever the sharding (a merged checkpoint's shards differ from its base's): llama.cpp's
    # converter order (embeddings, blocks 0..n-1, output), so one-pass and two-step exports are identical.
    return sorted(plan, key=_tensor_order)


_EXPERT = re.compile(
    r"^model\.layers\.(?P<layer>\d+)\.block_sparse_moe\.experts\.(?P<e>\d+)\.(?P<w>w[123])\.weight$"
)


def _stacked_experts(
    experts: dict[tuple[int, str], dict[int, tuple[Path, str, tuple[int, ...]]]],
    config: dict[str, Any],
    name_map: Any,
    qtype: str,
    model_dir: Path,
) -> list[_Tensor]:
    """Mixtral's per-expert w1/w2/w3 as llama.cpp's ``ffn_gate_exps`` / ``ffn_down_exps`` / ``ffn_up_exps``.

    As llama.cpp's converter does (``torch.stack`` of experts 0..E-1 of a layer into ``[E, rows, cols]``,
    named through ``layers.{bid}.feed_forward.experts.{w}``), but without holding a layer's experts at once.
    """
    n = config.get("num_local_experts", 0)
    out = []
    for (layer, w), found in sorted(experts.items()):
        if sorted(found) != list(range(n)):
            raise ModelError(f"{model_dir}: layer {layer} {w}: experts {sorted(found)} of num_local_experts={n}")
        parts = tuple((found[e][0], found[e][1]) for e in range(n))
        shape = (n, *found[0][2])
        gguf_name = name_map.get_name(f"layers.{layer}.feed_forward.experts.{w}.weight", try_suffixes=(".weight",))
        out.append(_Tensor(parts[0][0], parts[0][1], gguf_name, shape, _tensor_type(shape, qtype), 0, parts))
    return out


def _tensor_order(spec: _Tensor) -> tuple[int, int, str]:
    parts = spec.gguf_name.split(".")
    if parts[0] == "token_embd":
        return (0, 0, spec.gguf_name)
    if parts[0] == "blk":
        return (1, int(parts[1]), spec.gguf_name)
    return (2, 0, spec.gguf_name)


def _tensor_type(shape: tuple[int, ...], qtype: str) -> Any:
    """Norms (1-D) stay F32 as in llama.cpp's converter; rows not divisible by the block stay F16."""
    import gguf

    wanted = _ggml_type(qtype)
    if len(shape) == 1:
        return gguf.GGMLQuantizationType.F32
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    if shape[-1] % block:
        log.warning("row size %d is not a multiple of %s's block %d: stored as F16", shape[-1], qtype, block)
        return gguf.GGMLQuantizationType.F16
    return wanted


def _nbytes(shape: tuple[int, ...], qtype: Any) -> int:
    import gguf

    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block * type_size


def _encode(source: RowMerge, spec: _Tensor) -> np.ndarray:
    """The bytes llama.cpp reads for one tensor, computed by cache-sized row ranges on all threads.

    16-bit and f32 casts in torch (exact); q8_0 by `kernels.q8_0_rows` (gguf-py's arithmetic, tested
    byte for byte); q4_0/q5_0 by gguf-py on each row range (its quantisers work row by row). Q/K rows
    go to the rows llama.cpp's converter permutes them to (`permute_qk`).
    """
    import gguf
    import torch

    kind = gguf.GGMLQuantizationType
    if len(spec.shape) < 2:
        return source.rows(0, source.rows_total).to(torch.float32).contiguous().numpy()
    n_rows, cols = spec.shape[0], math.prod(spec.shape[1:])
    if spec.parts:  # stacked experts [E, rows, cols]: E·rows rows (the same bytes: quant blocks stay in a row)
        n_rows, cols = math.prod(spec.shape[:-1]), spec.shape[-1]
    if spec.qtype in (kind.F32, kind.F16, kind.BF16):
        dtype = {kind.F32: torch.float32, kind.F16: torch.float16, kind.BF16: torch.bfloat16}[spec.qtype]
        out = torch.empty(n_rows, cols, dtype=dtype)
    else:
        out = torch.empty(n_rows, _nbytes((cols,), spec.qtype), dtype=torch.uint8)
    dest = None
    if spec.permute_heads:
        dest = torch.empty(n_rows, dtype=torch.int64)
        dest[permute_qk(torch.arange(n_rows), spec.permute_heads)] = torch.arange(n_rows)  # source row -> row
    step = kernels.rows_per_chunk(cols)

    def run(start: int) -> None:
        end = min(start + step, n_rows)
        rows = source.rows(start, end).reshape(end - start, cols)
        if spec.qtype == kind.Q8_0:
            encoded = kernels.q8_0_rows(rows)
        elif out.dtype == torch.uint8:
            encoded = torch.from_numpy(gguf.quants.quantize(rows.to(torch.float32).numpy(), spec.qtype))
        else:
            encoded = rows.to(out.dtype)
        if dest is None:
            out[start:end] = encoded
        else:
            out[dest[start:end]] = encoded

    kernels.run_chunks(n_rows, step, run)
    return out.view(torch.int16).numpy() if out.dtype == torch.bfloat16 else out.numpy()


def _vocab(sp_model: Path, vocab_size: int) -> tuple[list[bytes], list[float], list[int], Any]:
    """Pieces, scores and token types from the SentencePiece protobuf, padded to ``vocab_size``.

    SentencePiece's piece types (NORMAL=1, UNKNOWN=2, CONTROL=3, USER_DEFINED=4, UNUSED=5, BYTE=6)
    have the same numbers as gguf's ``TokenType``, so they are written unchanged.
    """
    import gguf
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sp_model.read_bytes())
    tokens = [p.piece.encode("utf-8") for p in proto.pieces]
    scores = [float(p.score) for p in proto.pieces]
    types = [int(p.type) for p in proto.pieces]
    if len(tokens) > vocab_size:
        raise ModelError(f"{sp_model}: {len(tokens)} pieces but the model's vocab_size is {vocab_size}")
    for i in range(len(tokens), vocab_size):  # embedding rows past the tokenizer: never produced
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(int(gguf.TokenType.UNUSED))
    return tokens, scores, types, proto


def _chat_template(model_dir: Path) -> str | None:
    """The model's chat template as inference engines must see it: without ``{% generation %}`` marks."""
    from mistral_fast.tokenizer import inference_template

    jinja = model_dir / "chat_template.jinja"
    template = None
    if jinja.is_file():
        template = jinja.read_text()
    elif (model_dir / "tokenizer_config.json").is_file():
        template = json.loads((model_dir / "tokenizer_config.json").read_text()).get("chat_template")
    return inference_template(template) if isinstance(template, str) and template else None


def _add_metadata(writer: Any, config: dict[str, Any], qtype: str, name: str) -> None:
    import gguf

    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config.get("num_key_value_heads", config["num_attention_heads"]))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(config.get("rope_theta") or config.get("rope_parameters", {}).get("rope_theta")))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    if config.get("num_local_experts"):  # Mixtral, as llama.cpp's converter writes them
        writer.add_expert_count(config["num_local_experts"])
        writer.add_expert_used_count(config["num_experts_per_tok"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(_file_type(qtype))
    # llama.cpp's converter writes it for every file type (16-bit ones too)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_size_label(writer: Any) -> None:
    """``general.size_label`` ("7.2B", "8.8M") from the tensor table, as llama.cpp's converter computes it."""
    import gguf

    total, shared, expert, experts = writer.get_total_parameter_count()
    if total > 0:
        writer.add_size_label(gguf.size_label(total, shared, expert, experts))


def _special_tokens(
    tok_dir: Path, config: dict[str, Any], proto: Any, vocab_size: int
) -> tuple[dict[str, int], dict[str, bool]]:
    """Special token ids and ``add_*_token`` flags as llama.cpp's converter finds them.

    gguf-py's ``SpecialVocab`` (the converter's own reader) on the tokenizer files, then ``*_token_id``
    from the model's config.json for types still unset; BOS/EOS/UNK fall back to the SentencePiece
    model's. The converter's ``add_bos``/``add_sep`` come from the tokenizer's post-processor; our
    Mistral prompts always start with one BOS and never get EOS appended.
    """
    import gguf

    # gguf-py warns that our pair template (`<s> A <s> B`) has an "unknown separator": sentence-pair encoding,
    # which no Mistral prompt uses and which changes nothing it writes. Quiet, so notebooks show only our output.
    vocab_log = logging.getLogger("gguf.vocab")
    level, vocab_log.level = vocab_log.level, logging.ERROR
    try:
        special = gguf.SpecialVocab(tok_dir, load_merges=False, n_vocab=vocab_size)
    finally:
        vocab_log.setLevel(level)
    ids = dict(special.special_token_ids)
    for typ in special.special_token_types:  # what the converter reads from the model's config.json
        value = config.get(f"{typ}_token_id")
        if isinstance(value, int) and 0 <= value < vocab_size:
            ids.setdefault(typ, value)
    spec = proto.trainer_spec
    for typ, value in (("bos", spec.bos_id), ("eos", spec.eos_id), ("unk", spec.unk_id)):
        if value >= 0:
            ids.setdefault(typ, value)
    flags = dict(special.add_special_token)
    flags["bos"] = True  # Mistral prompts start with one BOS
    flags.setdefault("eos", False)
    flags.setdefault("sep", False)
    return ids, flags


def _tekken_json(tok_dir: Path) -> dict[str, Any] | None:
    """The ``tokenizer.json`` of a tekken (byte-level BPE) tokenizer in `tok_dir`, else None (SentencePiece)."""
    path = tok_dir / "tokenizer.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    decoder = data.get("decoder") or {}
    return data if data.get("model", {}).get("type") == "BPE" and decoder.get("type") == "ByteLevel" else None


def _add_tekken_tokenizer(writer: Any, tok_dir: Path, data: dict[str, Any], vocab_size: int) -> None:
    """Tekken (Nemo, Small 3) as llama.cpp's ``gpt2`` BPE with its ``tekken`` pre-tokenizer, like its converter.

    Tokens in id order in the byte-to-unicode alphabet of ``tokenizer.json``, the merges in priority order,
    control tokens (ids 0-999) as CONTROL, the rest NORMAL, rows past the tokenizer UNUSED ``[PAD{i}]``.
    llama.cpp applies the tekken split regex itself for pre-tokenizer ``tekken``.
    """
    import gguf

    by_id = {i: s for s, i in data["model"]["vocab"].items()}
    control = {t["id"]: t["content"] for t in data.get("added_tokens", []) if t.get("special")}
    by_id.update(control)
    if len(by_id) > vocab_size:
        raise ModelError(f"{tok_dir}/tokenizer.json: {len(by_id)} tokens but the model's vocab_size is {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(int(gguf.TokenType.CONTROL if i in control else gguf.TokenType.NORMAL))
        else:  # embedding rows past the tokenizer: never produced
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    ids = {content: i for i, content in control.items()}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("tekken")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(ids["<s>"])
    writer.add_eos_token_id(ids["</s>"])
    writer.add_unk_token_id(ids["<unk>"])
    if "<pad>" in ids:
        writer.add_pad_token_id(ids["<pad>"])
    writer.add_add_bos_token(True)  # Mistral prompts start with one BOS
    writer.add_add_eos_token(False)
    template = _chat_template(tok_dir)
    if template:
        writer.add_chat_template(template)


def _add_tokenizer(writer: Any, tok_dir: Path, sp_model: Path, config: dict[str, Any]) -> None:
    tekken = _tekken_json(tok_dir)
    if tekken is not None:  # Nemo / Small 3: byte-level BPE, no SentencePiece model
        _add_tekken_tokenizer(writer, tok_dir, tekken, config["vocab_size"])
        return
    tokens, scores, types, proto = _vocab(sp_model, config["vocab_size"])
    writer.add_tokenizer_model("llama")  # llama.cpp's SentencePiece (SPM) tokenizer
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    ids, flags = _special_tokens(tok_dir, config, proto, len(tokens))
    for typ, value in ids.items():
        getattr(writer, f"add_{typ}_token_id")(value)
    for typ, value in flags.items():
        getattr(writer, f"add_add_{typ}_token")(value)
    writer.add_add_space_prefix(bool(proto.normalizer_spec.add_dummy_prefix))
    template = _chat_template(tok_dir)
    if template:
        writer.add_chat_template(template)


def export_gguf(
    model_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    qtype: str = "f16",
    *,
    sp_model: str | os.PathLike[str] | None = None,
    name: str | None = None,
) -> Path:
    """Write a 16-bit (merged or base) Mistral checkpoint as a GGUF file for llama.cpp / Ollama.

    Args:
        model_dir: a transformers model directory (safetensors, config.json, tokenizer files), e.g.
            the output of `merge_adapter`.
        out_path: the ``.gguf`` file to write (atomically).
        qtype: ``f32``, ``f16``, ``bf16``, ``q8_0``, ``q4_0`` or ``q5_0``; k-quants go through
            `quantize_gguf` from an f16/bf16 GGUF.
        sp_model: the SentencePiece ``.model`` whose pieces and scores form the vocabulary; default:
            ``model_dir/tokenizer.model`` (which `merge_adapter` writes), else our v3 file.
        name: ``general.name`` in the GGUF (shown by llama.cpp and Ollama); default: the directory name.

    Returns:
        ``out_path``.

    Raises:
        ModelError: an unsupported type or architecture, or a tensor llama.cpp has no name for.
    """

    _check_qtype(qtype)
    model_dir, out_path = Path(model_dir), Path(out_path)
    config = _read_config(model_dir)

    sp = _resolve_sp_model(model_dir, sp_model)
    plan = _plan(model_dir, config, qtype)
    _write_gguf(out_path, config, plan, qtype, name or model_dir.name, model_dir, sp, lambda _spec, w: RowMerge(w))
    return out_path


def export_merged_gguf(
    run_or_adapter_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    qtype: str = "f16",
    *,
    base: str = "dequantized",
    dtype: str | None = None,
    name: str | None = None,
    original_checkpoint: str | os.PathLike[str] | None = None,
) -> Path:
    """Merge a run's LoRA adapter into its base and write the GGUF in one pass, no merged checkpoint on disk.

    Each base tensor is read, merged exactly as `merge_adapter` merges it (NF4 round trip of the base
    for ``base="dequantized"``, ``+ (alpha/r)·B·A`` in fp32, one rounding to 16 bits) and converted
    straight into the GGUF: the file is byte for byte what ``export_gguf(merge_adapter(...))`` writes,
    with a few tensors in memory (1.1 GiB peak for a 7B) and no 14 GB of merged safetensors written and
    read back.

    Args:
        run_or_adapter_dir: a run directory (``adapter/``, ``run_config.yaml``) or an adapter directory.
        out_path: the ``.gguf`` file to write (atomically).
        qtype: as for `export_gguf`.
        base: ``"dequantized"`` or ``"original"``, as for `merge_adapter`.
        dtype: the 16-bit dtype the merge rounds to, as for `merge_adapter` (default: the base's).
        name: ``general.name``; default: the run directory's name.
        original_checkpoint: the 16-bit checkpoint ``base="original"`` merges into, as for `merge_adapter`.

    Returns:
        ``out_path``.

    Raises:
        ModelError: as `merge_adapter` and `export_gguf` do.
    """

    return _run_gguf(
        run_or_adapter_dir,
        out_path,
        qtype,
        base=base,
        dtype=dtype,
        name=name,
        original_checkpoint=original_checkpoint,
        with_lora=True,
    )


def _run_gguf(
    run_or_adapter_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    qtype: str,
    *,
    base: str,
    dtype: str | None,
    name: str | None,
    original_checkpoint: str | os.PathLike[str] | None,
    with_lora: bool,
) -> Path:
    """The GGUF of a run's merge base, with its LoRA merged in (`export_merged_gguf`) or without it
    (`lora_gguf.export_base_gguf`, the base an adapter GGUF applies to).

    Both stream the same base tensors through the same NF4 round trip and rounding and take the tokenizer
    from the same place, so base GGUF + adapter GGUF and the merged GGUF differ only by the LoRA delta.
    Arguments as for `export_merged_gguf`; ``name`` defaults to the run directory's name with the LoRA, the
    base checkpoint's without.
    """
    from mistral_fast.export import merge as m

    _check_qtype(qtype)
    if base not in m.MERGE_BASES:
        raise ModelError(f"export.merge_base={base!r}: use one of {list(m.MERGE_BASES)}")
    source = m.resolve_source(run_or_adapter_dir)
    base_path, quant = m.merge_base(source, base, original_checkpoint)
    out_dtype = m._output_dtype(base_path, dtype)
    lora, scaling = m.load_lora(source.adapter_dir) if with_lora else ({}, 1.0)
    config = _read_config(base_path)
    plan = _plan(base_path, config, qtype)
    planned = {m.model_weight_name(name) for spec in plan for _, name in (spec.parts or ((spec.source, spec.hf_name),))}
    missing = sorted(set(lora) - planned)
    if missing:
        raise ModelError(f"adapter weights match no tensor of the base model {base_path}: {missing[:3]}")

    def merged(spec: _Tensor, weight: torch.Tensor) -> RowMerge:
        nf4 = quant if m.is_quantized_linear(spec.hf_name, weight) else None
        if nf4 is not None and isinstance(weight, FileRows):
            weight = weight.read()  # the NF4 round trip works on the whole tensor
        delta = lora.get(m.model_weight_name(spec.hf_name))
        return RowMerge(weight, delta, scaling, nf4, out_dtype, f"{spec.source.name}: {spec.hf_name}")

    tok_dir = source.adapter_dir if (source.adapter_dir / "tokenizer.json").is_file() else source.base_path
    sp_model = m._sentencepiece_model(source) or _resolve_sp_model(source.base_path, None)
    out_path = Path(out_path)
    default_name = source.adapter_dir.parent.name if with_lora else base_path.name
    _write_gguf(out_path, config, plan, qtype, name or default_name, tok_dir, sp_model, merged)
    if with_lora:
        log.info("merged %s (%s base) straight into %s", source.adapter_dir, base, out_path)
    return out_path


def _check_qtype(qtype: str) -> None:
    if qtype in KQUANT_TYPES:
        raise ModelError(
            f"qtype={qtype!r} is a k-quant: export f16 first, then quantize_gguf(f16_path, out, {qtype!r})"
        )
    if qtype not in GGUF_TYPES:
        raise ModelError(f"qtype={qtype!r}: use one of {list(GGUF_TYPES)} (or {list(KQUANT_TYPES)} via quantize_gguf)")
    require_gguf(f"qtype={qtype!r}")


def _write_gguf(
    out_path: Path,
    config: dict[str, Any],
    plan: list[_Tensor],
    qtype: str,
    name: str,
    tok_dir: Path,
    sp_model: Path,
    prepare: Callable[[_Tensor, torch.Tensor], RowMerge],
) -> None:
    """Header, tensor table, then each tensor as ``prepare`` makes it from the checkpoint's.

    Three stages overlap: a reader thread reads the next checkpoint tensor, the compute threads
    merge and encode this one by row ranges (`_encode`), a writer thread writes the previous one.
    At most three tensors are in memory (a 7B exports in ~1 GiB).
    """
    import gguf
    import torch
    from tqdm.auto import tqdm

    writer = gguf.GGUFWriter(None, config.get("gguf_arch", _ARCH))
    _add_metadata(writer, config, qtype, name)
    _add_tokenizer(writer, tok_dir, sp_model, config)
    for spec in plan:
        writer.add_tensor_info(
            spec.gguf_name, spec.shape, _np_dtype(spec.qtype), _nbytes(spec.shape, spec.qtype), spec.qtype
        )
    _add_size_label(writer)
    with atomic_path(out_path) as tmp:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        tensors = read_ahead(plan, _read_spec)
        with ThreadPoolExecutor(1) as write:
            written = None
            for spec, weight in tqdm(tensors, total=len(plan), desc=f"GGUF {qtype}", unit="tensor"):
                with torch.no_grad():
                    array = _encode(_prepare_spec(prepare, spec, weight), spec)  # in the order of add_tensor_info
                del weight
                if written is not None:
                    written.result()
                written = write.submit(writer.write_tensor_data, array)
                del array
            if written is not None:
                written.result()
        writer.close()
    log.info("wrote %s (%s, %d tensors)", out_path, qtype, len(plan))


def _read_spec(spec: _Tensor) -> Any:
    """A tensor's checkpoint data: one tensor, a stacked tensor's experts in order, or for a large tensor
    (the embeddings and lm_head of a 131k vocabulary) a `FileRows` read as it is encoded."""
    if spec.parts:
        return [read_tensor(file, name) for file, name in spec.parts]
    rows = FileRows.open_large(spec.source, spec.hf_name)
    return rows if rows is not None else read_tensor(spec.source, spec.hf_name)


def _prepare_spec(prepare: Callable[[_Tensor, torch.Tensor], RowMerge], spec: _Tensor, weight: Any) -> Any:
    """`prepare` per tensor; for stacked experts per expert (each its own checkpoint name, hence its own LoRA)."""
    if not spec.parts:
        return prepare(spec, weight)
    return _Stacked(
        [
            prepare(_Tensor(file, name, spec.gguf_name, tuple(w.shape), spec.qtype, 0), w)
            for (file, name), w in zip(spec.parts, weight, strict=True)
        ]
    )


def _np_dtype(qtype: Any) -> Any:
    """The numpy dtype `add_tensor_info` expects: the float type, else raw bytes (shape given in elements)."""
    import gguf
    import numpy as np

    kind = gguf.GGMLQuantizationType
    return {kind.F32: np.float32, kind.F16: np.float16, kind.BF16: np.int16}.get(qtype, np.int8)


def _resolve_sp_model(model_dir: Path, sp_model: str | os.PathLike[str] | None) -> Path:
    from mistral_fast.tokenizer import sentencepiece_path

    if sp_model is not None:
        return Path(sp_model)
    own = model_dir / "tokenizer.model"
    return own if own.is_file() else sentencepiece_path("v3")


def quantize_gguf(src: str | os.PathLike[str], dst: str | os.PathLike[str], qtype: str, *, threads: int = 0) -> Path:
    """Quantise a GGUF with llama.cpp's own quantiser (``llama_model_quantize`` from llama-cpp-python).

    This is how k-quants are made: llama.cpp picks per-tensor types for ``*_k_m`` mixes (e.g. Q6_K
    for parts of attn_v and ffn_down in Q4_K_M) and falls back to legacy quants for rows that are
    not a multiple of 256. Start from an f16/bf16/f32 GGUF; re-quantising a quantised one is refused.

    Args:
        src: the 16-bit GGUF from `export_gguf`.
        dst: the GGUF to write (atomically).
        qtype: ``q4_k_m``, ``q5_k_m``, ``q6_k`` (or any llama.cpp ``LLAMA_FTYPE_MOSTLY_*`` name).
        threads: quantisation threads; 0: all cores.

    Returns:
        ``dst``.

    Raises:
        ModelError: llama-cpp-python is not installed (with how to get it), or llama.cpp failed.
    """
    import ctypes

    try:
        import llama_cpp
    except ImportError:
        raise ModelError(f"quantize_gguf({qtype!r}): {INSTALL_LLAMA_CPP}") from None
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}", None)
    if ftype is None:
        raise ModelError(f"qtype={qtype!r}: llama.cpp has no such type; use one of {list(KQUANT_TYPES)}")
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise ModelError(f"{src}: no such GGUF file; write it with export_gguf(model_dir, path, 'f16') first")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads or os.cpu_count() or 1
    with atomic_path(dst) as tmp:
        code = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if code != 0:
            raise ModelError(f"llama.cpp could not quantise {src} to {qtype} (return code {code}); see its log above")
    log.info("quantised %s -> %s (%s)", src, dst, qtype)
    return dst


# --------------------------------------------------------------------------------- Ollama Modelfile templates
#
# Mistral's chat formats in Ollama's Go template language (text/template), token for token like mistral_common for
# Ollama's prompts, tools included. What Ollama hands a template (its template/template.go, commit fb30760 of
# August 2026): .System (every system message's text, joined by a blank line), .Messages (consecutive same-role
# messages but tool results merged with "\n\n"; each with .Role, .Content, .Thinking, .ToolCalls, .ToolCallID),
# .Tools. llama.cpp adds the one BOS (add_bos_token) and gives each text chunk after a control token its own
# SentencePiece space prefix, as mistral_common does, so no spaces around [INST]/[/INST].
#
# JSON (the tool list, call arguments, v3 results) is written by the templates below ("value", "args", "tool"),
# as Python's json.dumps(ensure_ascii=False) writes it: ", " and ": " separators, strings quoted by Go's %q
# (Ollama's `json` function writes compact JSON and escapes < > &). What a Go template in Ollama cannot do:
# - keep key order: Ollama hands properties and arguments over as Go maps, which templates range in sorted key
#   order; mistral_common keeps the order they were written in. A parameter schema's keys come out as "type",
#   "properties", "required"; a property's as "type", "description", "enum", "items", "properties", "required",
#   "anyOf"; a nested object's "properties" (Ollama's ordered map, opaque to templates) in compact JSON;
# - tell 2.0 from 2 (Ollama decodes numbers as float64; the templates write them as Python writes an int or a
#   float); escape the rarer characters as Python does (control
#   characters but \n \r \t \b \f, U+007F and non-printable Unicode such as U+200D: Go's %q escapes differ);
# - parse a v3 tool result: one that starts with "{" or "[" is written as it is (mistral_common re-dumps parsed
#   JSON, so it must already read as json.dumps(..., ensure_ascii=False) writes it), anything else as a string;
# - right-strip assistant text (mistral_common strips trailing spaces), skip empty messages in a merge, put
#   v13 results in the order of their calls, or raise an error on a conversation mistral_common rejects.
_OLLAMA_JSON = """\
{{- define "value" }}{{ $t := printf "%T" . }}
{{- if eq $t "string" }}{{ printf "%q" . }}
{{- else if eq $t "map[string]interface {}" }}{{ "{" }}{{ $s := "" }}{{ range $k, $v := . }}{{ $s }}\
{{ printf "%q" $k }}: {{ template "value" $v }}{{ $s = ", " }}{{ end }}{{ "}" }}
{{- else if or (eq $t "[]interface {}") (eq $t "[]string") }}[{{ range $i, $v := . }}{{ if $i }}, {{ end }}\
{{ template "value" $v }}{{ end }}]
{{- else if and (eq $t "float64") (lt . 1e-4) (gt . -1e-4) (ne . 0.0) }}{{ printf "%v" . }}
{{- else }}{{ json . }}
{{- end }}
{{- end }}
{{- define "args" }}{{ "{" }}{{ $s := "" }}{{ range $k, $v := . }}{{ $s }}{{ printf "%q" $k }}: \
{{ template "value" $v }}{{ $s = ", " }}{{ end }}{{ "}" }}
{{- end }}
{{- define "property" }}{{ "{" }}{{ $s := "" }}
{{- if .Type }}{{ $s }}"type": {{ if eq (len .Type) 1 }}{{ printf "%q" (index .Type 0) }}{{ else }}[\
{{ range $i, $x := .Type }}{{ if $i }}, {{ end }}{{ printf "%q" $x }}{{ end }}]{{ end }}{{ $s = ", " }}{{ end }}
{{- if .Description }}{{ $s }}"description": {{ printf "%q" .Description }}{{ $s = ", " }}{{ end }}
{{- if .Enum }}{{ $s }}"enum": {{ template "value" .Enum }}{{ $s = ", " }}{{ end }}
{{- if .Items }}{{ $s }}"items": {{ template "value" .Items }}{{ $s = ", " }}{{ end }}
{{- if .Properties }}{{ $s }}"properties": {{ json .Properties }}{{ $s = ", " }}{{ end }}
{{- if .Required }}{{ $s }}"required": {{ template "value" .Required }}{{ $s = ", " }}{{ end }}
{{- if .AnyOf }}{{ $s }}"anyOf": [{{ range $i, $x := .AnyOf }}{{ if $i }}, {{ end }}{{ template "property" $x }}\
{{ end }}]{{ end }}
{{- "}" }}
{{- end }}
{{- define "tool" }}{"type": "function", "function": {"name": {{ printf "%q" .Function.Name }}, "description": \
{{ printf "%q" .Function.Description }}, "parameters": {{ with .Function.Parameters }}{{ "{" }}{{ $s := "" }}
{{- if .Type }}{{ $s }}"type": {{ printf "%q" .Type }}{{ $s = ", " }}{{ end }}
{{- if or .Properties (eq .Type "object") }}{{ $s }}"properties": {{ "{" }}{{ $p := "" }}\
{{ range $k, $v := .Properties }}{{ $p }}{{ printf "%q" $k }}: {{ template "property" $v }}{{ $p = ", " }}{{ end }}\
{{ "}" }}{{ $s = ", " }}{{ end }}
{{- if .Required }}{{ $s }}"required": {{ template "value" .Required }}{{ $s = ", " }}{{ end }}
{{- if .Items }}{{ $s }}"items": {{ template "value" .Items }}{{ $s = ", " }}{{ end }}
{{- if .Defs }}{{ $s }}"$defs": {{ template "value" .Defs }}{{ end }}
{{- "}" }}{{ end }}}}
{{- end }}
{{- define "tools" }}[AVAILABLE_TOOLS][{{ range $i, $t := . }}{{ if $i }}, {{ end }}{{ template "tool" $t }}{{ end }}]\
[/AVAILABLE_TOOLS]
{{- end }}
{{- define "result" }}{{ if not . }}{{ "{}" }}{{ else if or (eq (slice . 0 1) "{") (eq (slice . 0 1) "[") }}{{ . }}\
{{ else }}{{ printf "%q" . }}{{ end }}
{{- end }}
"""

# How each format writes an assistant turn's tool calls. The first text inside `if .ToolCalls` is exactly
# "[TOOL_CALLS]": Ollama takes it as the tag that starts a tool call in the model's output (tools/template.go).
_OLLAMA_CALLS = {
    "json": """\
{{- if .ToolCalls }}[TOOL_CALLS]{{ "[" }}{{ range $i, $c := .ToolCalls }}{{ if $i }}, {{ end }}\
{"name": {{ printf "%q" $c.Function.Name }}, "arguments": {{ template "args" $c.Function.Arguments }}\
{{ if $c.ID }}, "id": {{ printf "%q" $c.ID }}{{ end }}{{ "}" }}{{ end }}]{{ end }}""",
    "v11": """\
{{- if .ToolCalls }}[TOOL_CALLS]{{ range $i, $c := .ToolCalls }}{{ if $i }}[TOOL_CALLS]{{ end }}{{ $c.Function.Name }}\
{{ if $c.ID }}[CALL_ID]{{ $c.ID }}{{ end }}[ARGS]{{ template "args" $c.Function.Arguments }}{{ end }}{{ end }}""",
    "v13": """\
{{- if .ToolCalls }}[TOOL_CALLS]{{ range $i, $c := .ToolCalls }}{{ if $i }}[TOOL_CALLS]{{ end }}{{ $c.Function.Name }}\
[ARGS]{{ template "args" $c.Function.Arguments }}{{ end }}{{ end }}""",
}
_OLLAMA_RESULTS = {
    "json": """[TOOL_RESULTS]{"content": {{ template "result" .Content }}, "call_id": {{ printf "%q" .ToolCallID }}}\
[/TOOL_RESULTS]""",
    "v7": "[TOOL_RESULTS]{{ .ToolCallID }}[TOOL_CONTENT]{{ .Content }}[/TOOL_RESULTS]",
    "v13": "[TOOL_RESULTS]{{ .Content }}[/TOOL_RESULTS]",
}

# v3 (7B v0.3, Nemo): the system prompt in the *last* user message, joined by a blank line, the tools before it;
# an assistant turn has text or calls, closed by </s> but a final one (Ollama continues a final assistant
# message, as mistral_common's continue_final_message does).
_OLLAMA_TEMPLATE_V3 = (
    _OLLAMA_JSON
    + """\
{{- $last := -1 }}{{ range $i, $m := .Messages }}{{ if eq $m.Role "user" }}{{ $last = $i }}{{ end }}{{ end }}
{{- range $i, $_ := .Messages }}
{{- if eq .Role "user" }}{{ if and $.Tools (eq $i $last) }}{{ template "tools" $.Tools }}{{ end }}\
[INST]{{ if and $.System (eq $i $last) }}{{ $.System }}

{{ end }}{{ .Content }}[/INST]
{{- else if eq .Role "assistant" }}
"""
    + _OLLAMA_CALLS["json"]
    + """
{{- if not .ToolCalls }}{{ .Content }}{{ end }}{{ if or .ToolCalls (ne (len (slice $.Messages $i)) 1) }}</s>{{ end }}
{{- else if eq .Role "tool" }}"""
    + _OLLAMA_RESULTS["json"]
    + """
{{- end }}
{{- end }}"""
)


def _ollama_template_in_place(calls: str, results: str, *, tools_first: bool = False, thinking: bool = False) -> str:
    """The Go template of the formats that write system prompts in place as [SYSTEM_PROMPT] (v7, v11, v13): from
    .Messages, where Ollama keeps them (consecutive ones merged), empty ones too; each assistant turn closed by
    </s>."""
    at = "first" if tools_first else "last"
    return (
        _OLLAMA_JSON
        + """\
{{- $first := -1 }}{{ $last := -1 }}{{ range $i, $m := .Messages }}{{ if eq $m.Role "user" }}{{ $last = $i }}\
{{ if lt $first 0 }}{{ $first = $i }}{{ end }}{{ end }}{{ end }}
{{- range $i, $_ := .Messages }}
{{- if eq .Role "system" }}[SYSTEM_PROMPT]{{ .Content }}[/SYSTEM_PROMPT]
{{- else if eq .Role "user" }}{{ if and $.Tools (eq $i $__AT__) }}{{ template "tools" $.Tools }}{{ end }}\
[INST]{{ .Content }}[/INST]
{{- else if eq .Role "assistant" }}"""
        + ("{{ if .Thinking }}[THINK]{{ .Thinking }}[/THINK]{{ end }}" if thinking else "")
        + "{{ .Content }}\n"
        + _OLLAMA_CALLS[calls]
        + """</s>
{{- else if eq .Role "tool" }}"""
        + _OLLAMA_RESULTS[results]
        + """
{{- end }}
{{- end }}"""
    ).replace("__AT__", at)


OLLAMA_TEMPLATES: dict[str, str] = {
    "v3": _OLLAMA_TEMPLATE_V3,
    "v7": _ollama_template_in_place("json", "v7"),
    "v11": _ollama_template_in_place("v11", "v7"),
    "v13": _ollama_template_in_place("v13", "v13", tools_first=True, thinking=True),
}
"""The Modelfile TEMPLATE of each chat format, by the version our GGUF's embedded template names."""

_TEMPLATE_HEADING = re.compile(r"Mistral instruct (v\d+)\b")


def _gguf_chat_format(gguf_path: Path) -> str:
    """The chat format (``"v3"``, ``"v7"``, ``"v11"``, ``"v13"``) of a GGUF's embedded template, named in our
    templates' heading; a template of some other origin: ``"v7"`` when it has [SYSTEM_PROMPT], else ``"v3"``."""
    import gguf

    try:
        field = gguf.GGUFReader(gguf_path).fields.get("tokenizer.chat_template")
    except (ValueError, OSError) as err:  # empty, truncated or not a GGUF at all
        raise ModelError(f"{gguf_path}: not a readable GGUF file ({err}); give the .gguf that export wrote") from None
    template = str(field.contents()) if field is not None else ""
    heading = _TEMPLATE_HEADING.search(template[:200])
    if heading and heading.group(1) in OLLAMA_TEMPLATES:
        return heading.group(1)
    return "v7" if "[SYSTEM_PROMPT]" in template else "v3"


def write_modelfile(
    gguf_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str] | None = None,
    *,
    system: str = "",
    parameters: dict[str, Any] | None = None,
    adapter: str | os.PathLike[str] | None = None,
) -> Path:
    """Write an Ollama ``Modelfile`` for a GGUF: ``ollama create NAME -f <this file>``.

    Args:
        gguf_path: the GGUF; referenced by a relative path, so the two can move together.
        out_path: default ``<gguf stem>.Modelfile`` beside the GGUF (one per GGUF type).
        system: a default system prompt (Ollama's ``SYSTEM``), empty for none.
        parameters: extra ``PARAMETER`` lines, e.g. ``{"temperature": 0.2}``.
        adapter: a LoRA adapter GGUF (`export_adapter_gguf`) that Ollama applies on ``gguf_path``
            (``ADAPTER``); ``gguf_path`` is then the base the adapter was trained on (`export_base_gguf`).

    Returns:
        The Modelfile path.
    """
    gguf_path = Path(gguf_path)
    out = Path(out_path) if out_path else gguf_path.with_suffix(".Modelfile")
    template = OLLAMA_TEMPLATES[_gguf_chat_format(gguf_path)]
    lines = [f"FROM ./{os.path.relpath(gguf_path, out.parent)}"]
    if adapter is not None:
        lines.append(f"ADAPTER ./{os.path.relpath(adapter, out.parent)}")
    lines.append(f'TEMPLATE """{template}"""')
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += ['PARAMETER stop "</s>"', 'PARAMETER stop "[INST]"']  # EOS, and a runaway next user turn
    lines += [f"PARAMETER {key} {value}" for key, value in (parameters or {}).items()]
    with atomic_path(out) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return out
