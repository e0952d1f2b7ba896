"""Scale-out facts read from the launcher's environment (torchrun / `accelerate launch`), torch-free.

mistral_fast has no launcher of its own: accelerate (DDP, FSDP, DeepSpeed) or torchrun start the
processes and set RANK / WORLD_SIZE / LOCAL_RANK; the Trainer sets up the process group. This module
only answers the questions the pipeline asks: which process writes files, how the configured batch is
split, and whether FSDP is on (it needs the 4-bit weights stored in a float dtype).
"""

from __future__ import annotations

import os

from mistral_fast.config import RunConfig
from mistral_fast.errors import ConfigError


def world_size() -> int:
    """Number of training processes (1 when not launched by torchrun/accelerate)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """Global rank of this process (0 when not distributed)."""
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """Only rank 0 writes the run directory, prints summaries and logs results."""
    return rank() == 0


def using_fsdp() -> bool:
    """True under `accelerate launch` with an FSDP config (accelerate exports ACCELERATE_USE_FSDP)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")


def accumulation_for_world(cfg: RunConfig, processes: int | None = None) -> int:
    """Gradient accumulation per process that keeps the effective batch the config asks for.

    The config describes one device: effective batch = per_device_batch_size x gradient_accumulation_steps.
    With N processes each step already sees N per-device batches, so accumulation is divided by N: the
    same config gives the same optimisation on 1 or N GPUs.

    Raises:
        ConfigError: the accumulation is not a multiple of the number of processes.
    """
    n = processes or world_size()
    accum = cfg.train.gradient_accumulation_steps
    if n <= 1:
        return accum
    if accum % n:
        batch = cfg.train.per_device_batch_size
        raise ConfigError(
            f"train.gradient_accumulation_steps={accum} cannot be split over {n} processes: the effective batch "
            f"{batch}x{accum}={batch * accum} would change — use a multiple of {n} (e.g. {n * max(accum // n, 1)})"
        )
    return accum // n
