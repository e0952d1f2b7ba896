"""Peak RSS of the real training step on CPU: `mistral_fast.train.train` (our Trainer, built by
`build_sft_config`, with the optimizer the config picks), not a hand-written step.

A test harness (run by tests/test_memory.py in a fresh process), not part of the package. Usage::

    MALLOC_MMAP_THRESHOLD_=65536 python tests/trainer_step_memory.py MODEL_DIR SIZES_JSON OVERRIDES_JSON BATCH SEQ

It builds a small Mistral at MODEL_DIR, loads it with `load_model`, and trains three steps on random tokens
through `train`, with one extra callback that measures the second step: the RSS at its start (optimizer
state and one-off allocations exist by then), the peak RSS during it (forward, backward, gradient clipping,
optimizer step, zero_grad). With ``MALLOC_MMAP_THRESHOLD_=65536`` glibc maps every large block on its own
and returns it on free, so RSS follows the tensors. Prints ``RESULT {json}`` (bytes; Linux only).
"""

from __future__ import annotations

import gc
import json
import sys
import tempfile
from typing import Any

from rss_harness import proc_status, reset_peak_rss  # this file's folder is sys.path[0] when run as a script


def measure(path: str, sizes: dict[str, int], overrides: dict[str, Any], batch: int, seq: int) -> dict[str, Any]:
    """Train 3 steps through `mistral_fast.train.train`; the figures of the second step (see module doc)."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    import mistral_fast.train as train_module
    from mistral_fast.config import RunConfig
    from mistral_fast.dataset import PreparedData
    from mistral_fast.modeling import build_tiny_model, load_model

    build_tiny_model(path, **sizes)
    run_dir = tempfile.mkdtemp(prefix="trainer_step_memory.")
    cfg = RunConfig().with_overrides(
        {
            "model.name_or_path": path,
            "model.backend": "hf",
            "model.max_seq_length": seq,
            "train.per_device_batch_size": batch,
            "train.gradient_accumulation_steps": 1,
            "train.max_steps": 3,
            "train.logging_steps": 1,
            "train.load_best_model_at_end": False,
            "train.output_dir": run_dir,
            **overrides,
        }
    )
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, 32000, (seq,), generator=gen).tolist() for _ in range(3 * batch)]
    data = PreparedData(
        train=Dataset.from_list([{"input_ids": r, "labels": r} for r in rows]),
        eval=None, train_examples=[], eval_examples=[], format="tokens", stats={},
    )  # fmt: skip
    figures: dict[str, Any] = {}

    class SecondStep(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            figures["optim"] = args.optim
            figures["max_grad_norm"] = args.max_grad_norm

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1:
                gc.collect()
                figures["before_step"] = proc_status("VmRSS")
                reset_peak_rss()

        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            if state.global_step == 2:
                figures["step_peak"] = proc_status("VmHWM") - figures["before_step"]
                inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
                figures["optimizer_class"] = f"{type(inner).__module__}.{type(inner).__qualname__}"
                figures["optimizer_state_tensors"] = sum(
                    1 for s in inner.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0
                )

    callbacks = train_module._callbacks
    train_module._callbacks = lambda cfg, run: [*callbacks(cfg, run), SecondStep()]  # the harness's one addition
    loaded = load_model(cfg)
    result = train_module.train(cfg, loaded, data)
    figures["steps"] = result.steps
    figures["trainable_params"] = sum(p.numel() for p in loaded.model.parameters() if p.requires_grad)
    figures["trainable_tensors"] = sum(1 for p in loaded.model.parameters() if p.requires_grad)
    figures["compute_dtype"] = str(loaded.compute_dtype).removeprefix("torch.")
    return figures


if __name__ == "__main__":
    model_dir, sizes_json, overrides_json, batch_arg, seq_arg = sys.argv[1:6]
    out = measure(model_dir, json.loads(sizes_json), json.loads(overrides_json), int(batch_arg), int(seq_arg))
    print("RESULT", json.dumps(out))
