"""mistral_fast: notebook-first QLoRA fine-tuning of Mistral models.

`import mistral_fast` stays light: torch, transformers and friends are imported only when one of the
names below is first used (PEP 562 module `__getattr__`), so the CLI's `--help` and config work start
in well under a second.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from mistral_fast.quiet import silence_library_noise  # stdlib logging only: import stays light

silence_library_noise()  # before torch, torchao and bitsandbytes are imported: they log at import

# public name -> module that defines it
_LAZY = {
    "RunConfig": "config",
    "load_config": "config",
    "ConfigError": "errors",
    "DataError": "errors",
    "MistralFastError": "errors",
    "TokenizerError": "errors",
    "ModelError": "errors",
    "load_tokenizer": "tokenizer",
    "tokenizer_for": "tokenizer",
    "check_tokenizer": "tokenizer",
    "load_messages": "data",
    "preview_example": "tokenizer",
    "prepare_data": "dataset",
    "run": "pipeline",
    "load_model": "modeling",
    "build_tiny_model": "modeling",
    "load_run": "rundir",
    "RunDir": "rundir",
    "evaluate_model": "evaluate",
    "generate": "evaluate",
    "stream_chat": "evaluate",
    "text_metrics": "evaluate",
    "GenerationSettings": "evaluate",
    "notebook_config": "notebook",
    "write_results": "notebook",
    "ensure_run": "notebook",
    "evaluate_run": "notebook",
    "comparison_table": "notebook",
    "samples_frame": "notebook",
    "call_samples_frame": "notebook",
    "preview_data": "notebook",
    "run_notebook": "runner",
    "run_sweep": "runner",
    "NotebookError": "errors",
    "export_run": "export",
    "merge_adapter": "export",
    "export_gguf": "export",
    "equivalence_report": "export",
    "estimate_memory": "memory",
    "memory_report": "memory",
    "prepare_preferences": "preference",
    "preview_pair": "preference",
    "SAMPLE_PREFERENCES": "preference",
    "preference_config": "notebook",
    "preference_table": "notebook",
    "grpo_table": "notebook",
    "prepare_prompts": "grpo",
    "preview_prompt": "grpo",
    "SAMPLE_GRPO": "grpo",
    "rewards_from_callables": "rewards",
    "resolve_rewards": "rewards",
}

__all__ = sorted([*_LAZY, "__version__"])


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mistral_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"mistral_fast.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
