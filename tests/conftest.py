"""Test set-up: offline, one thread per process, tiny models built locally (nothing is downloaded)."""

from __future__ import annotations

import os

# Set before transformers / huggingface_hub are imported by any test module.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
