"""Streamed 16-bit merge of a LoRA adapter into its base model.

The merge never loads the whole model: it walks the base checkpoint's safetensors tensor by tensor,
and for each LoRA target weight computes ``W' = base(W) + (alpha/r)·B·A`` in fp32 and rounds once to
16 bits. Peak memory is one output shard plus one tensor, so a 7B model merges in a few GB of RAM.

``base(W)`` is either the NF4 round trip of ``W`` (``"dequantized"``: the weights the adapter was
trained against, reproducing the trained model) or ``W`` itself (``"original"``). The result is never
re-quantised to 4 bits: merging into a 4-bit layer and re-quantising (what peft's
``merge_and_unload`` does on a bitsandbytes model, peft #2321) rounds the LoRA update away.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from mistral_fast.atomic import remove_stale_temps, temp_sibling
from mistral_fast.errors import ModelError
from mistral_fast.export import prequant
from mistral_fast.export.checkpoint import checkpoint_files
from mistral_fast.export.kernels import RowMerge
from mistral_fast.families import MISTRAL3_CHECKPOINT_PREFIXES, MISTRAL3_FROZEN_16BIT
from mistral_fast.modeling.moe import checkpoint_weight_name, is_router_weight

if TYPE_CHECKING:
    import torch

log = logging.getLogger("mistral_fast")
T = TypeVar("T")

MERGE_BASES = ("dequantized", "original")
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
_SIZE = re.compile(r"^\s*(?P<num>\d+(\.\d+)?)\s*(?P<unit>[KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
# Tokenizer files our tokenizer writes (plus the SentencePiece model, for GGUF and other loaders).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
# A Mistral3 checkpoint's image-processor settings: copied so the merged model still loads with its processor
# and llama.cpp's converter (which reads them for the mmproj file) finds them.
_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
_FROZEN_16BIT = tuple(f"{prefix}." for prefix in MISTRAL3_FROZEN_16BIT)


@dataclass
class MergeSource:
    """Everything the merge needs to know about a trained run, resolved from its files.

    Attributes:
        adapter_dir: the peft adapter directory.
        base_path: the base model directory (its safetensors are streamed).
        quant: NF4 settings the base was trained with (``None``: trained on 16-bit weights).
        tokenizer_version: ``"v3"``/``"v1"`` (our built-in tokenizer) or ``"model"``.
        prequantized: the base checkpoint itself is bitsandbytes 4-bit (``*-bnb-4bit``): its stored
            weights, dequantised, are the ``dequantized`` merge base (`prequant`).
    """

    adapter_dir: Path
    base_path: Path
    quant: dict[str, Any] | None
    tokenizer_version: str
    prequantized: bool = False


def parse_size(size: str | int) -> int:
    """Bytes in ``"2GB"``, ``"500MiB"`` or an int.

    Raises:
        ModelError: an unreadable size.
    """
    if isinstance(size, int):
        return size
    match = _SIZE.match(str(size))
    if not match:
        raise ModelError(f"shard_size={size!r}: use e.g. '2GB', '500MB' or a number of bytes")
    return int(float(match["num"]) * _UNITS[(match["unit"] or "").lower()])


def resolve_source(run_or_adapter_dir: str | os.PathLike[str]) -> MergeSource:
    """Find the adapter, the base model and the quantisation of a run directory or adapter directory.

    Raises:
        ModelError: no adapter there, or the base model cannot be found.
    """
    from mistral_fast.families import TINY_MODELS, tokenizer_version
    from mistral_fast.modeling import resolve_model_path
    from mistral_fast.rundir import RunDir

    run = RunDir.open(run_or_adapter_dir)
    run.adapter_config  # noqa: B018 - refuses a directory without an adapter, before anything else
    model = run.config.model
    quant = None
    if model.load_in_4bit:
        dtype = run.trained_compute_dtype()
        quant = {"quant_type": model.quant_type, "double_quant": model.double_quant, "dtype": dtype}
    base_path = _local_checkpoint(resolve_model_path(model.name_or_path))
    own = model.tokenizer == "model" and model.name_or_path not in TINY_MODELS
    version = "model" if own else tokenizer_version(model)
    prequantized = prequant.quantization(base_path) is not None
    return MergeSource(run.adapter_dir, base_path, quant, version, prequantized)


def merge_base(
    source: MergeSource, base: str, original_checkpoint: str | os.PathLike[str] | None = None
) -> tuple[Path, dict[str, Any] | None]:
    """The checkpoint to stream and the NF4 round trip to apply to it (None: none) for ``base``.

    ``dequantized`` on a 16-bit base: its weights through the NF4 round trip training applied;
    on a pre-quantised 4-bit base: its stored weights, dequantised as they are read (no second round
    trip). ``original``: the 16-bit weights, from ``original_checkpoint`` when given (required for a
    pre-quantised base, which holds none).

    Raises:
        ModelError: a bad ``base``, or ``original`` on a pre-quantised base without ``original_checkpoint``.
    """
    from mistral_fast.modeling import resolve_model_path

    if base not in MERGE_BASES:
        raise ModelError(f"export.merge_base={base!r}: use one of {list(MERGE_BASES)}")
    if base == "dequantized":
        return source.base_path, None if source.prequantized else source.quant
    if original_checkpoint is not None:
        original = _local_checkpoint(resolve_model_path(str(original_checkpoint)))
        if prequant.quantization(original) is not None:
            raise ModelError(f"original_checkpoint={str(original_checkpoint)!r} is pre-quantised too: name 16-bit one")
        return original, None
    if source.prequantized:
        raise ModelError(
            f"export.merge_base='original': the base {source.base_path} is pre-quantised (bitsandbytes 4-bit), "
            "so its 16-bit weights are not in it. Name the 16-bit checkpoint it was quantised from: "
            "merge_adapter(..., original_checkpoint='mistralai/Mistral-7B-v0.3') or export_run(..., "
            "original_checkpoint=...) (a hub name or a local directory); or use merge_base: dequantized, the "
            "stored 4-bit weights the adapter was trained against"
        )
    return source.base_path, None


def _local_checkpoint(path_or_repo: str) -> Path:
    """A local directory with the base's safetensors (a hub model: its cached snapshot).

    Raises:
        ModelError: the checkpoint is pre-quantised in a format other than bitsandbytes 4-bit
            (`prequant.quantization`), whose stored weights the merge cannot read.
    """
    path = Path(path_or_repo)
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "tokenizer.model"]  # the weights training already cached
        path = Path(snapshot_download(path_or_repo, allow_patterns=patterns))
    prequant.quantization(path)  # raises for formats we cannot dequantise
    return path


def load_lora(adapter_dir: Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """The adapter as ``{base weight name: (A, B)}`` (fp32) and its scaling ``alpha/r``.

    Raises:
        ModelError: an adapter this merge does not reproduce exactly (DoRA, per-module ranks,
            fan-in/fan-out, trained extra modules).
    """
    from safetensors.torch import load_file

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    unsupported = [
        k for k in ("use_dora", "fan_in_fan_out", "rank_pattern", "alpha_pattern", "modules_to_save") if cfg.get(k)
    ]
    if cfg.get("peft_type", "LORA") != "LORA" or unsupported:
        raise ModelError(f"{adapter_dir}: the streamed merge supports plain LoRA only; this adapter sets {unsupported}")
    scaling = cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg.get("use_rslora") else cfg["r"])
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(adapter_dir / "adapter_model.safetensors").items():
        match = _LORA_KEY.match(key)
        if not match:
            raise ModelError(f"{adapter_dir}: unexpected adapter tensor {key!r}: only lora_A/lora_B are merged")
        # Mixtral experts: our per-expert module → the checkpoint's block_sparse_moe.experts.{e}.w1/w2/w3
        pairs.setdefault(checkpoint_weight_name(match["module"] + ".weight"), {})[match["ab"]] = tensor.float()
    return {name: (ab["A"], ab["B"]) for name, ab in pairs.items()}, scaling


def model_weight_name(name: str) -> str:
    """A checkpoint tensor's name as the loaded model (and so its LoRA adapter) names it.

    The same for a Mistral/Mixtral; a Mistral3 checkpoint in the older layout (``language_model.model.…``,
    what transformers 5.17 still saves and the hub's Small 3.1 files use) maps to transformers 5's module
    names (``model.language_model.…``, `families.MISTRAL3_CHECKPOINT_PREFIXES`).
    """
    for old, new in MISTRAL3_CHECKPOINT_PREFIXES.items():
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def is_quantized_linear(name: str, weight: torch.Tensor) -> bool:
    """Whether 4-bit loading quantised this weight: every decoder Linear, LoRA target or not.

    transformers keeps the embeddings, the norms and ``lm_head`` in 16 bits (``lm_head`` is in
    bitsandbytes' modules-not-to-convert); every other 2-D ``.weight`` of a Mistral is a Linear, and of a
    Mixtral too except its router (``block_sparse_moe.gate``, 16-bit in training); Mixtral's experts are
    4-bit (modeling/moe.py). A Mistral3 wrapper's vision tower and projector stay 16-bit (modeling/mistral3.py):
    their bytes are written back unchanged.
    """
    if is_router_weight(name) or model_weight_name(name).startswith(_FROZEN_16BIT):
        return False
    return weight.ndim == 2 and name.endswith(".weight") and "embed_tokens" not in name and "lm_head" not in name


def merge_tensor(
    weight: torch.Tensor,
    lora: tuple[torch.Tensor, torch.Tensor] | None,
    scaling: float,
    quant: dict[str, Any] | None,
    out_dtype: torch.dtype,
    name: str = "",
) -> torch.Tensor:
    """One merged weight: ``base(W) + scaling·B·A`` in fp32, rounded once to ``out_dtype``.

    The order of operations is peft's (``(B @ A) * scaling`` in fp32, added to the base weight), so
    the result equals ``merge_and_unload`` on a 16-bit model holding the same base weights; computed
    by cache-sized row ranges on all threads (`kernels.RowMerge`).
    """
    return RowMerge(weight, lora, scaling, quant, out_dtype, name).full()


def _shard_plan(files: list[Path], out_dtype: torch.dtype, max_bytes: int) -> list[list[tuple[Path, str]]]:
    """Group tensors (in checkpoint order) into shards of at most ``max_bytes`` output bytes."""
    from safetensors import safe_open

    shards: list[list[tuple[Path, str]]] = [[]]
    size = 0
    for file in files:
        quantized = prequant.quantization(file.parent) is not None
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                if quantized and prequant.is_auxiliary(file.parent, name):
                    continue  # a 4-bit weight's state: read with the weight
                shape = (quantized and prequant.stored_shape(file.parent, name)) or f.get_slice(name).get_shape()
                nbytes = math.prod(shape) * out_dtype.itemsize
                if shards[-1] and size + nbytes > max_bytes:
                    shards.append([])
                    size = 0
                shards[-1].append((file, name))
                size += nbytes
    return shards


def read_tensor(file: Path, name: str) -> torch.Tensor:
    """One tensor of a safetensors file, read into memory; a bitsandbytes 4-bit weight comes dequantised."""
    from safetensors import safe_open

    with safe_open(file, framework="pt") as f:
        tensor = f.get_tensor(name)
    if tensor.dtype.is_floating_point or prequant.quantization(file.parent) is None:
        return tensor
    return prequant.read_dequantized(file.parent, name, tensor)


# Tensors above this size (the 131k-row embeddings and lm_head of tekken models: 1.3 GB each at 12B) are
# read by row ranges as they are encoded (`FileRows`) instead of whole and ahead of time.
LARGE_TENSOR_BYTES = 256 * 2**20
_FLOAT_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


def _header_entry(file: Path, name: str) -> tuple[int, dict[str, Any]]:
    """(where a safetensors file's data starts, the header's entry for ``name``: dtype, shape, offsets)."""
    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return 8 + size, json.loads(f.read(size))[name]


class FileRows:
    """A float tensor of a safetensors file, read by row ranges (``rows[start:end]``) with plain reads.

    Why: a 131k-vocabulary model's embeddings and lm_head are 1.3 GB each at 12B. Read whole (as
    `read_ahead` reads every tensor), next to their encoded output and the tensor read ahead, they took
    the one-pass export of a Nemo-12B shape past 2 GiB. Row ranges read with ``readinto`` (no memory
    map, whose touched pages would stay in the process) hold only the range being encoded. Has the
    ``shape``/``ndim``/``dtype`` and row slicing that `RowMerge` uses on a weight it does not quantise.
    """

    def __init__(self, file: Path, name: str, entry: tuple[int, dict[str, Any]] | None = None) -> None:
        import torch

        data_start, info = entry or _header_entry(file, name)
        self.file, self.name = file, name
        self.shape = torch.Size(info["shape"])
        self.ndim = len(self.shape)
        self.dtype = getattr(torch, _FLOAT_DTYPES[info["dtype"]])
        self._offset = data_start + info["data_offsets"][0]
        self._row_bytes = math.prod(self.shape[1:]) * self.dtype.itemsize

    @classmethod
    def open_large(cls, file: Path, name: str) -> FileRows | None:
        """The tensor as `FileRows` if it is large, 2-D or more and a plain float (not a 4-bit weight);
        None when it is better read whole (`read_tensor`). Reads the file's header once."""
        entry = _header_entry(file, name)
        info = entry[1]
        if info["dtype"] not in _FLOAT_DTYPES or len(info["shape"]) < 2:
            return None
        large = info["data_offsets"][1] - info["data_offsets"][0] > LARGE_TENSOR_BYTES
        return cls(file, name, entry) if large else None

    def __getitem__(self, index: slice) -> torch.Tensor:
        import torch

        start, stop, step = index.indices(self.shape[0])
        if step != 1:
            raise ValueError(f"{self.name}: FileRows reads contiguous row ranges only")
        out = torch.empty((max(stop - start, 0), *self.shape[1:]), dtype=self.dtype)
        view = memoryview(out.view(torch.uint8).numpy().reshape(-1))
        with open(self.file, "rb", buffering=0) as f:
            f.seek(self._offset + start * self._row_bytes)
            done = 0
            while done < len(view):  # one read() may return less than asked
                got = f.readinto(view[done:])
                if not got:
                    raise ModelError(f"{self.file}: {self.name} is truncated (the file ends inside it)")
                done += got
        return out

    def read(self) -> torch.Tensor:
        """The whole tensor (for the merges that need it whole: the NF4 round trip)."""
        return self[:]


def read_ahead(items: Sequence[T], read: Callable[[T], Any]) -> Iterator[tuple[T, Any]]:
    """``(item, read(item))`` in order, while a thread already reads the next item.

    The checkpoint's disk reads (14.5 GB for a 7B) then overlap the merge and conversion instead of
    adding to them; one item is read ahead, so memory holds at most one more tensor.
    """
    with ThreadPoolExecutor(1) as reader:
        pending = reader.submit(read, items[0]) if items else None
        for i, item in enumerate(items):
            value = pending.result()
            pending = reader.submit(read, items[i + 1]) if i + 1 < len(items) else None
            yield item, value


def checkpoint_dtype(model_dir: Path) -> torch.dtype:
    """The dtype of the first floating tensor of a checkpoint (the dtype it ships in)."""
    from safetensors import safe_open

    with safe_open(checkpoint_files(model_dir)[0], framework="pt") as f:
        for name in f.keys():  # noqa: SIM118
            tensor = f.get_slice(name)
            dtype = tensor.get_dtype()
            if dtype.startswith(("BF", "F")):
                import torch

                return {"BF16": torch.bfloat16, "F16": torch.float16}.get(dtype, torch.float32)
    raise ModelError(f"{model_dir}: no floating-point tensor in the checkpoint")


def merge_adapter(
    run_or_adapter_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    base: str = "dequantized",
    shard_size: str | int = "2GB",
    dtype: str | None = None,
    original_checkpoint: str | os.PathLike[str] | None = None,
) -> Path:
    """Merge a run's LoRA adapter into its base model and save 16-bit sharded safetensors, streamed.

    The output directory loads with ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer``:
    shards (+ index when more than one), ``config.json`` without any quantisation config,
    ``generation_config.json``, our exact tokenizer and the SentencePiece ``tokenizer.model``.

    Args:
        run_or_adapter_dir: a run directory (with ``adapter/`` and ``run_config.yaml``) or an adapter directory.
        out_dir: where to write; built in a temporary sibling and renamed into place, so an
            interrupted merge never leaves a partial model at this path.
        base: ``"dequantized"``: the NF4 round trip of the base weights, which the adapter was
            trained against (reproduces the trained model); ``"original"``: the 16-bit weights.
        shard_size: largest shard (``"2GB"``, ``"500MB"`` or bytes).
        dtype: ``"bfloat16"`` or ``"float16"``; default: the base checkpoint's 16-bit dtype, else bf16.
        original_checkpoint: the 16-bit checkpoint (hub name or directory) that ``base="original"``
            merges into; needed when the run's base is pre-quantised (``*-bnb-4bit``), which holds none.

    Returns:
        ``out_dir``.

    Raises:
        ModelError: bad ``base``/``dtype``, no adapter, an unsupported adapter, or adapter weights
            that match no base tensor.
    """
    import torch

    if base not in MERGE_BASES:
        raise ModelError(f"export.merge_base={base!r}: use one of {list(MERGE_BASES)}")
    source = resolve_source(run_or_adapter_dir)
    base_path, quant = merge_base(source, base, original_checkpoint)
    out_dtype = _output_dtype(base_path, dtype)
    lora, scaling = load_lora(source.adapter_dir)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)  # what a killed merge left: up to a model's size
    tmp = temp_sibling(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with torch.no_grad():
            _write_shards(base_path, tmp, lora, scaling, quant, out_dtype, parse_size(shard_size))
        _write_side_files(source, tmp, out_dtype)
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("merged %s (%s base, %d LoRA weights) into %s", source.adapter_dir, base, len(lora), out)
    return out


def _output_dtype(base_path: Path, dtype: str | None) -> torch.dtype:
    import torch

    if dtype is None:
        if prequant.quantization(base_path) is not None:  # the dtype its 4-bit weights dequantise to
            found = getattr(torch, prequant.compute_dtype(base_path))
        else:
            found = checkpoint_dtype(base_path)
        return found if found in (torch.bfloat16, torch.float16) else torch.bfloat16
    if dtype not in ("bfloat16", "float16"):
        raise ModelError(f"dtype={dtype!r}: the merged model is saved in 16 bits: bfloat16 or float16")
    return getattr(torch, dtype)


def _write_shards(
    base_path: Path,
    out: Path,
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]],
    scaling: float,
    quant: dict[str, Any] | None,
    out_dtype: torch.dtype,
    max_bytes: int,
) -> None:
    """Stream the base tensor by tensor into shards; only one shard is ever held in memory."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    plan = _shard_plan(checkpoint_files(base_path), out_dtype, max_bytes)
    progress = tqdm(total=sum(map(len, plan)), desc="merge", unit="tensor")
    names = (
        ["model.safetensors"]
        if len(plan) == 1
        else [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
    )
    weight_map: dict[str, str] = {}
    used: set[str] = set()
    total = 0
    items = [(i, file, name) for i, shard in enumerate(plan) for file, name in shard]
    tensors: dict[str, torch.Tensor] = {}
    for (i, file, name), weight in read_ahead(items, lambda item: read_tensor(item[1], item[2])):
        nf4 = quant if is_quantized_linear(name, weight) else None
        key = model_weight_name(name)
        tensors[name] = merge_tensor(weight, lora.get(key), scaling, nf4, out_dtype, f"{file.name}: {name}")
        del weight
        weight_map[name] = names[i]
        total += tensors[name].nbytes
        if key in lora:
            used.add(key)
        progress.update()
        if len(tensors) == len(plan[i]):  # the shard is complete
            save_file(tensors, out / names[i], metadata={"format": "pt"})
            tensors = {}
    progress.close()
    missing = sorted(set(lora) - used)
    if missing:
        raise ModelError(f"adapter weights match no tensor of the base model {base_path}: {missing[:3]}")
    if len(plan) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _write_side_files(source: MergeSource, out: Path, out_dtype: torch.dtype) -> None:
    """config.json (16-bit, no quantisation config), generation config, tokenizer files."""
    config = json.loads((source.base_path / "config.json").read_text())
    config.pop("quantization_config", None)
    dtype_name = str(out_dtype).removeprefix("torch.")
    config["dtype"] = dtype_name
    if "torch_dtype" in config:  # transformers 4 name; keep both consistent
        config["torch_dtype"] = dtype_name
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = source.base_path / "generation_config.json"
    if gen.is_file():
        shutil.copyfile(gen, out / "generation_config.json")
    tok_dir = source.adapter_dir if (source.adapter_dir / "tokenizer.json").is_file() else source.base_path
    for name in _TOKENIZER_FILES:
        if (tok_dir / name).is_file():
            shutil.copyfile(tok_dir / name, out / name)
    for name in _PROCESSOR_FILES:
        if (source.base_path / name).is_file():
            shutil.copyfile(source.base_path / name, out / name)
    sp_model = _sentencepiece_model(source)
    if sp_model is not None:
        shutil.copyfile(sp_model, out / "tokenizer.model")


def _sentencepiece_model(source: MergeSource) -> Path | None:
    """The SentencePiece file behind the run's tokenizer (GGUF export reads its pieces and scores)."""
    from mistral_fast.tokenizer import sentencepiece_path

    if source.tokenizer_version in ("v3", "v1"):
        return sentencepiece_path(source.tokenizer_version)
    own = source.base_path / "tokenizer.model"
    return own if own.is_file() else None


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished directory into place; an older one at ``final`` is removed only afterwards."""
    old = None
    if final.exists():
        old = temp_sibling(final, "old")
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
