"""Silence library messages that say nothing about the user's run (they buried notebook cell outputs).

Each entry is one named logger of another library set to ERROR, with the reason it is noise for us; its
errors still show, and nothing of the library is patched. Called when `mistral_fast` is imported, before
torch and friends are (the messages are logged at their import), so the CLI, notebooks and papermill
kernels are all quiet. Warnings about the user's data, config or model are never silenced here.
"""

from __future__ import annotations

import logging

NOISY_LOGGERS: dict[str, str] = {
    # "Failed to load …/torchao/_C_mxfp8….so" at import (peft imports torchao): CUDA-only kernels that a CPU
    # or another CUDA build cannot load; we use none of torchao's kernels.
    "torchao": "CUDA kernels we never call",
    # "<enum …> is an Enum subclass … register_constant() … deprecated": torchao's import registering its
    # enums with torch's pytree, a deprecation addressed to torchao's authors.
    "torch.utils._pytree": "a deprecation addressed to torchao",
    # "Failed to load CPU gemm_4bit_forward from kernels-community": bitsandbytes' AVX512-BF16 CPU kernel,
    # which we switch off per layer after loading anyway (DESIGN.md: it breaks backward and merges).
    "bitsandbytes.backends.cpu.ops": "an AVX512-BF16 kernel we switch off",
    # "mtime may not be reliable on this filesystem": the Trainer sorting checkpoints written within a second
    # of each other (tiny models); it falls back to the step numbers, which is what we rely on.
    "transformers.trainer_utils": "checkpoint-sorting detail",
}


def silence_library_noise() -> None:
    """Set each logger of `NOISY_LOGGERS` to ERROR (idempotent, no handlers added)."""
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
