"""Constants more than one stage needs, each defined once (torch-free, instant to import).

A value that two modules must agree on lives here; a module that owns a value alone keeps it.
"""

from __future__ import annotations

IGNORE_INDEX = -100
"""Label value PyTorch's cross-entropy (and TRL) skip: tokens that are not trained or scored."""

NF4_BLOCK = 64
"""bitsandbytes' (and transformers') 4-bit blocksize: one absmax per 64 weights."""

RESULTS_FILE = "results.json"
"""What a notebook run writes into its run directory (read by the runner and sweeps, never scraped)."""

MAX_REASONS = 5
"""How many skip reasons a data summary keeps (the first ones; the rest are only counted)."""

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q5_0")
"""GGUF tensor types written by gguf-py in numpy (no llama.cpp needed)."""

KQUANT_TYPES = ("q4_k_m", "q5_k_m", "q6_k")
"""GGUF k-quants: quantised from an f16 GGUF by llama.cpp (llama-cpp-python's `llama_model_quantize`)."""
