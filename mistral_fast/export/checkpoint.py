"""A model directory's safetensors files: what merge, GGUF and the pre-quantised reader all stream."""

from __future__ import annotations

import json
from pathlib import Path

from mistral_fast.errors import ModelError


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model directory, in index order.

    Raises:
        ModelError: no safetensors there (``.bin`` checkpoints cannot be streamed safely).
    """
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = dict.fromkeys(json.loads(index.read_text())["weight_map"].values())
        return [model_dir / n for n in names]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise ModelError(f"{model_dir}: no model.safetensors(.index.json); convert the checkpoint to safetensors first")
