"""Row-range kernels of the export: NF4 round trip, LoRA merge and GGUF q8_0, each bit-identical to its reference.

The export streams a 7B model through these once per tensor, so their cost is the export's cost. Each
works on a cache-sized range of rows in one thread (`run_chunks` hands one range to each thread) and
matches, bit for bit, what users compare us with:

* `nf4_rows`: bitsandbytes' ``quantize_4bit`` → ``dequantize_4bit`` (what a ``Linear4bit`` holds);
* `RowMerge`: peft's ``merge_and_unload`` (``(B @ A) * scaling`` in fp32 added to the base, one rounding)
  onto that round trip or onto the 16-bit weight;
* `q8_0_rows`: gguf-py's ``Q8_0.quantize_blocks``, which is llama.cpp's converter and ``ggml-quants.c``.

Working in row ranges lets a whole merge → permute → quantise pipeline stay in cache, instead of a
pass over the full tensor (hundreds of MB) per elementwise op; that and a table lookup in place of
bitsandbytes' binary search per value are where the speed comes from (figures: benchmarks/README.md).
Tests: tests/test_export_merge.py and tests/test_export_gguf.py hold each kernel to its reference.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from mistral_fast.constants import NF4_BLOCK
from mistral_fast.errors import ModelError

if TYPE_CHECKING:
    import torch

Q8_BLOCK = 32  # ggml's q8_0 block
CHUNK_VALUES = 1 << 17  # values a row range holds: 512 KiB of fp32 per temporary, within a core's L2


def run_chunks(total: int, step: int, fn: Callable[[int], None]) -> None:
    """``fn(start)`` for each chunk of ``range(0, total, step)``, one chunk per thread, ops single-threaded.

    For loops of small ops on cache-sized chunks: torch's intra-op threads would synchronise at every
    op (and stall whenever another process holds a core); Python threads each take whole chunks.
    """
    import torch

    def no_grad_fn(start: int) -> None:
        with torch.no_grad():  # grad mode is per thread: workers start with it on
            fn(start)

    threads = max(1, torch.get_num_threads())
    if threads == 1 or total <= step:
        with single_threaded_ops():
            for start in range(0, total, step):
                no_grad_fn(start)
        return
    with single_threaded_ops(), ThreadPoolExecutor(threads) as pool:
        list(pool.map(no_grad_fn, range(0, total, step)))


@contextlib.contextmanager
def single_threaded_ops() -> Iterator[None]:
    """torch ops on one thread inside the block (torch's thread count is process-wide)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def rows_per_chunk(cols: int) -> int:
    """Rows in a `CHUNK_VALUES`-sized range (at least one)."""
    return max(1, CHUNK_VALUES // max(cols, 1))


@functools.lru_cache(maxsize=1)
def _nf4_table() -> tuple[float, Any, Any]:
    """NF4 quantise→dequantise as two table lookups: exactly bitsandbytes' ``bucketize``, no binary search.

    bitsandbytes picks the level ``i = #{midpoints m : m < s}`` for a scaled value ``s`` in [-1, 1].
    Here ``bin(s) = int(s·H + H)`` splits [-1, 1] into ``2H`` bins (H = 256: no two of the 15
    midpoints share a bin). ``bin`` is monotone (each fp32 op is), so every midpoint whose bin is
    below ``bin(s)`` is below ``s``, every one whose bin is above is above; only the midpoint in
    ``s``'s own bin, if any, needs a comparison: ``i = below[bin] + (s > inbin[bin])``, with
    ``inbin = +inf`` for bins without one. The table holds ``level[i]`` for both outcomes.

    Returns:
        (H, the in-bin midpoint per bin, the two level values per bin interleaved).
    """
    import bitsandbytes.functional as bnbf
    import torch

    levels = bnbf.get_4bit_type("nf4", device="cpu")  # sorted ascending: NF4 needs no reordering
    midpoints = (levels[:-1] + levels[1:]) / 2  # bitsandbytes' bucketize bounds, fp32
    half = 256.0
    bins = midpoints.mul(half).add_(half).to(torch.int64)  # the same fp32 ops as the lookup below
    if len(set(bins.tolist())) != len(bins):
        raise AssertionError("NF4 lookup: two midpoints share a bin")  # a changed NF4 table; never seen
    n_bins = int(2 * half) + 1  # s = 1 maps to the last one
    below = torch.zeros(n_bins, dtype=torch.int64)
    inbin = torch.full((n_bins,), float("inf"))
    for i, b in enumerate(bins.tolist()):
        below[b + 1 :] += 1
        inbin[b] = midpoints[i]
    values = torch.stack([levels[below], levels[(below + 1).clamp(max=len(levels) - 1)]], 1).flatten()
    return half, inbin, values


def nf4_absmax(blocks: torch.Tensor, double_quant: bool, name: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Per block of 64: ``1/absmax`` (to scale by) and the absmax bitsandbytes stores (double quant applied).

    ``blocks`` is the weight in the compute dtype, shaped (n_blocks, 64). The absmax is exact in any
    order; its mean (the double-quant offset) is computed as bitsandbytes computes it, with torch's
    threads (the reduction order follows the thread count, as it does in bitsandbytes).

    Raises:
        ModelError: NaN or inf in the weight (``name``), which has no NF4 level.
    """
    import bitsandbytes.functional as bnbf
    import torch

    absmax = torch.empty(len(blocks), dtype=torch.float32)
    step = max(1, CHUNK_VALUES // NF4_BLOCK)

    def run(start: int) -> None:
        end = min(start + step, len(blocks))
        absmax[start:end] = blocks[start:end].abs().amax(-1)  # the max of 16-bit values: exact in fp32

    run_chunks(len(blocks), step, run)
    if not bool(absmax.isfinite().all()):
        raise ModelError(f"{name or 'a weight'} holds NaN or inf values: the checkpoint is damaged; re-download it")
    scale = 1.0 / absmax.clamp(min=1e-38)
    if double_quant:
        offset = absmax.mean()
        packed, state = bnbf.quantize_blockwise(absmax - offset, blocksize=256)
        absmax = bnbf.dequantize_blockwise(packed, state)
        absmax += offset
    return scale, absmax


def nf4_rows(blocks: torch.Tensor, scale: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """The NF4 round trip of some blocks (n, 64), in fp32, not yet rounded to the compute dtype.

    bitsandbytes' arithmetic (``backends/default/ops.py`` quantize_4bit and its dequantiser) on the
    weight as transformers hands it over, cast to the compute dtype: ``s = clamp(x · (1/absmax), -1, 1)``,
    level by `_nf4_table`, then ``level · absmax`` in fp32. Packing to 4 bits and back is skipped:
    it changes nothing.
    """
    import torch

    half, inbin, values = _nf4_table()
    scaled = blocks.to(torch.float32, copy=True).mul_(scale[:, None]).clamp_(-1, 1)
    index = scaled.mul(half).add_(half).to(torch.int64)
    upper = torch.gt(scaled, torch.take(inbin, index))
    index.mul_(2).add_(upper)
    return torch.take(values, index).mul_(absmax[:, None])


def nf4_roundtrip_bnb(weight: torch.Tensor, quant: dict[str, Any]) -> torch.Tensor:
    """The round trip through bitsandbytes' own ``quantize_4bit`` / ``dequantize_4bit`` (the reference)."""
    import bitsandbytes.functional as bnbf
    import torch

    x = weight.to(getattr(torch, quant["dtype"]))
    packed, state = bnbf.quantize_4bit(
        x, blocksize=NF4_BLOCK, compress_statistics=quant["double_quant"], quant_type=quant["quant_type"]
    )
    return bnbf.dequantize_4bit(packed, state)


class RowMerge:
    """One merged weight, ``base(W) + scaling·B·A`` in fp32 rounded once to ``out_dtype``, by row range.

    ``base(W)`` is the NF4 round trip of ``W`` in the compute dtype (``quant`` given) or ``W``. The order
    of operations is peft's: ``(B @ A) * scaling`` in fp32 added to the base, so a merged range equals
    the same rows of ``merge_and_unload`` (a row range of ``B @ A`` is those rows of the full product:
    each value is one length-r dot product either way). With neither LoRA nor quant nor ``out_dtype``,
    rows come back as stored. ``name`` (the checkpoint tensor's) is for error messages.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        lora: tuple[torch.Tensor, torch.Tensor] | None = None,
        scaling: float = 1.0,
        quant: dict[str, Any] | None = None,
        out_dtype: torch.dtype | None = None,
        name: str = "",
    ) -> None:
        import torch

        self.weight = weight
        self.shape = tuple(weight.shape)
        self.rows_total = weight.shape[0]
        self.lora, self.scaling, self.out_dtype = lora, scaling, out_dtype
        self._base: torch.Tensor | None = None  # the whole round trip, when it cannot go by rows
        self._nf4: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.dtype] | None = None
        if quant is None:
            return
        if quant["quant_type"] != "nf4" or weight.ndim < 2 or weight[0].numel() % NF4_BLOCK:
            self._base = nf4_roundtrip_bnb(weight, quant)  # blocks straddle rows, or FP4: bitsandbytes
            return
        dtype = getattr(torch, quant["dtype"])
        blocks = weight.to(dtype).reshape(-1, NF4_BLOCK)
        scale, absmax = nf4_absmax(blocks, quant["double_quant"], name)
        self._nf4 = (blocks, scale, absmax, dtype)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype `rows` returns."""
        import torch

        if self.out_dtype is not None:
            return self.out_dtype
        if self.lora is not None:
            return torch.float32
        return self._nf4[3] if self._nf4 is not None else (self._base if self._base is not None else self.weight).dtype

    def rows(self, start: int, end: int) -> torch.Tensor:
        """Rows ``start:end`` of the merged weight (ops run in the calling thread)."""
        base = self._base_rows(start, end)
        if self.lora is not None:
            a, b = self.lora
            delta = b[start:end] @ a
            base = delta.mul_(self.scaling).add_(base)  # in place: fp32 add, as base.float() + delta
        return base if self.out_dtype is None else base.to(self.out_dtype)

    def _base_rows(self, start: int, end: int) -> torch.Tensor:
        if self._base is not None:
            return self._base[start:end]
        if self._nf4 is None:
            return self.weight[start:end]
        blocks, scale, absmax, dtype = self._nf4
        per_row = self.weight[0].numel() // NF4_BLOCK
        lo, hi = start * per_row, end * per_row
        values = nf4_rows(blocks[lo:hi], scale[lo:hi], absmax[lo:hi]).to(dtype)  # bitsandbytes' output dtype
        return values.view(end - start, *self.shape[1:])

    def full(self) -> torch.Tensor:
        """The whole merged weight, computed by row ranges on all threads."""
        import torch

        if len(self.shape) < 2:
            return self.rows(0, self.rows_total)
        out = torch.empty(self.shape, dtype=self.dtype)
        step = rows_per_chunk(math.prod(self.shape[1:]))

        def run(start: int) -> None:
            end = min(start + step, self.rows_total)
            out[start:end] = self.rows(start, end)

        run_chunks(self.rows_total, step, run)
        return out


def q8_0_rows(rows: torch.Tensor) -> torch.Tensor:
    """ggml q8_0 of a (rows, cols) range: per 32 values, fp16 ``d = absmax/127`` then 32 int8 ``round(x/d)``.

    gguf-py's ``Q8_0.quantize_blocks`` (llama.cpp's converter; "bit-exact with ggml-quants.c") in torch:
    fp32 throughout, ``id = 1/d`` (0 where ``d`` is 0), ``x·id`` rounded half away from zero (the
    fraction is exact in fp32, so comparing it with 0.5 is the exact rule), ``d`` rounded to fp16.

    Returns:
        uint8 (rows, cols/32 · 34): each block's two bytes of ``d``, then its 32 quants.
    """
    import torch

    n_rows, cols = rows.shape
    x = rows.to(torch.float32).reshape(-1, Q8_BLOCK)
    d = torch.amax(x.abs(), -1, keepdim=True).div_(127)
    inv = torch.where(d == 0, 0.0, torch.reciprocal(d))
    x = x.mul(inv)
    whole = x.trunc()
    frac = x.sub_(whole)
    quants = whole.to(torch.int8)
    quants += (frac >= 0.5).view(torch.int8)
    quants -= (frac <= -0.5).view(torch.int8)
    out = torch.empty(len(quants), 2 + Q8_BLOCK, dtype=torch.uint8)
    out[:, :2] = d.to(torch.float16).view(torch.uint8)
    out[:, 2:] = quants.view(torch.uint8)
    return out.view(n_rows, cols // Q8_BLOCK * (2 + Q8_BLOCK))
