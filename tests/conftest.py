"""Test set-up: offline, one thread per process, tiny models built locally (nothing is downloaded)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

# Set before transformers / huggingface_hub are imported by any test module.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Prepared data is cached per test session (and its subprocesses and kernels), never in the user's ~/.cache.
if "MISTRAL_FAST_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["MISTRAL_FAST_CACHE"] = tempfile.mkdtemp(prefix="mistral-fast-cache-")
    atexit.register(shutil.rmtree, os.environ["MISTRAL_FAST_CACHE"], ignore_errors=True)


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def torch_threads(request: pytest.FixtureRequest) -> Iterator[int]:
    """Run a test with torch on 1 and on 2 threads (CI sets OMP_NUM_THREADS=1, which would hide the
    threaded paths, e.g. the export kernels' one-range-per-thread loop)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    try:
        yield request.param
    finally:
        torch.set_num_threads(before)
