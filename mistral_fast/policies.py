"""The ``auto`` policies, decided once: the trainer and the memory estimator must agree (torch-free).

The trainer asks them about the machine it runs on; the memory estimator asks them about the GPU a
user names. Both get the same answer because there is one rule.
"""

from __future__ import annotations

BF16_CAPABILITY = (8, 0)
"""CUDA compute capability from which bf16 is native (Ampere); `torch.cuda.is_bf16_supported()` also says
True where bf16 is only emulated (T4), so the capability is what counts."""


def auto_optimizer(*, on_cuda: bool) -> str:
    """``train.optimizer: auto``: paged 8-bit AdamW on CUDA, torch's AdamW elsewhere.

    Paged 8-bit AdamW keeps optimizer state small and spills to CPU on VRAM spikes (QLoRA paper);
    bitsandbytes' paged optimizers need CUDA.
    """
    return "paged_adamw_8bit" if on_cuda else "adamw_torch"


def resolve_optimizer(requested: str, *, on_cuda: bool) -> str:
    """The optimizer a run uses: ``train.optimizer`` as given, or `auto_optimizer`."""
    return auto_optimizer(on_cuda=on_cuda) if requested == "auto" else requested


def auto_compute_dtype(*, cuda_capability: tuple[int, int] | None, cpu_native_bf16: bool = False) -> tuple[str, str]:
    """``model.compute_dtype: auto``, as ``(dtype name, reason)``.

    * CUDA: bf16 on Ampere or newer; fp16 on older GPUs (T4, V100), which have no bf16.
    * CPU: bf16 where the CPU has AVX512-BF16 or AMX, else fp32. Measured with bitsandbytes 0.50 on
      one thread (AVX512-BF16): a 4-bit 1024x3584 layer's forward+backward over 1024 tokens took
      0.036 s in bf16 vs 0.144 s in fp32 (4x); LoRA gradients of the tiny model agreed with fp32
      to cosine 0.99998 (relative error 0.65%). Without native bf16, torch emulates it and fp32 wins.

    Args:
        cuda_capability: the GPU's compute capability, or None on a CPU.
        cpu_native_bf16: (CPU only) whether the processor computes bf16 in hardware.
    """
    if cuda_capability is not None:
        if tuple(cuda_capability) >= BF16_CAPABILITY:
            return "bfloat16", "the GPU supports bf16"
        return "float16", "the GPU predates Ampere (e.g. T4, V100) and has no bf16: float16"
    if cpu_native_bf16:
        return "bfloat16", "CPU has native bf16 (AVX512-BF16/AMX): 4-bit matmuls ~4x faster than fp32"
    return "float32", "CPU has no native bf16 (torch would emulate it), so float32"


CHUNKED_LOSS_MIN_VOCAB = 65536
"""From this vocabulary size the CPU trainer computes its loss in chunks (tekken's 131,072 ids: full fp32
logits are 2 GiB per 4k tokens and dominate the step); below it transformers' plain loss, whose peak the
estimator was validated against on 32k-vocabulary models (tests/test_memory.py)."""


def uses_chunked_loss(*, vocab_size: int, on_cuda: bool) -> bool:
    """Whether training computes the loss without materialising full logits (what the estimator must model).

    On CUDA TRL's fused LM head always does; on a CPU our chunked loss does for large vocabularies.
    """
    return on_cuda or vocab_size >= CHUNKED_LOSS_MIN_VOCAB
