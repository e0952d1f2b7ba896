"""Peak-RSS measurement of real training steps on CPU: validation of the memory estimator (Linux).

Test code, not product code: it loads bitsandbytes and peft, so it lives beside the tests and not in the
torch-free `mistral_fast.memory`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

from mistral_fast.config import RunConfig

STEP_PARTS = ("activations", "gradients", "workspace")
"""The estimate's breakdown keys (prefixes) that a measured step's peak is compared with."""


def measure_in_fresh_process(argv: list[str], *, timeout: int = 600) -> dict[str, Any]:
    """Run ``python *argv`` (a script that prints ``RESULT {json}``) in a fresh process set up for RSS
    measurement, and return its figures.

    glibc maps large blocks on their own and returns them on free (``MALLOC_MMAP_THRESHOLD_=65536``): RSS
    then follows the tensors. One thread, offline.
    """
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def estimate_measured(cfg: RunConfig, measured: Mapping[str, Any], **kwargs: Any) -> Any:
    """The memory estimate of a measured CPU run: `cfg` on its model's own ``config.json``, off the GPU, in
    the compute dtype the loader chose (``measured["compute_dtype"]``); `kwargs`: more `estimate_memory` options."""
    from mistral_fast.memory import estimate_memory
    from mistral_fast.modeling import read_model_config

    return estimate_memory(
        cfg,
        model_config=read_model_config(cfg.model.name_or_path),
        on_gpu=False,
        compute_dtype=measured["compute_dtype"],
        **kwargs,
    )


def step_estimate(breakdown: Mapping[str, int], parts: tuple[str, ...] = STEP_PARTS) -> int:
    """The estimated bytes of one training step: the breakdown entries starting with one of `parts`."""
    return sum(v for k, v in breakdown.items() if k.startswith(parts))


def proc_status(field_name: str) -> int:
    """A memory field of this process's ``/proc/self/status`` in bytes (``VmRSS``: the RSS, ``VmHWM``: its peak)."""
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {field_name}")


def reset_peak_rss() -> None:
    """Reset this process's peak RSS (``VmHWM``) to its current RSS, so the next peak is a step's own."""
    # Linux ≥ 4.0: writing 5 to clear_refs resets VmHWM (the peak RSS) to the current RSS.
    with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
        handle.write("5")


def _tensor_bytes(model: Any) -> int:
    """Bytes of every parameter, buffer and bitsandbytes quant-state tensor, each storage once."""
    storages: dict[int, int] = {}

    def add(t: Any) -> None:
        if t is not None and hasattr(t, "untyped_storage"):
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()

    for t in [*model.parameters(), *model.buffers()]:
        add(t)
        state = getattr(t, "quant_state", None)
        while state is not None:  # the nested state of double quantisation holds the 8-bit absmax's scales
            add(state.absmax)
            add(state.code)
            state = getattr(state, "state2", None)
    return sum(storages.values())


def _training_step(model: Any, batch_size: int, seq_len: int, chunked: bool = False) -> Any:
    """A closure running one forward/backward/AdamW step on fixed random tokens, as the Trainer does.

    ``chunked``: the loss of `mistral_fast.modeling.chunked_loss` (the CPU trainer's), else the model's own.
    """
    import torch

    from mistral_fast.modeling.chunked_loss import model_loss

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(3, 32000, (batch_size, seq_len), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        # The output (and its logits) is dropped before backward, as in Trainer.training_step.
        if chunked:
            model_loss(model, {"input_ids": ids, "labels": ids}).backward()
        else:
            model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # what the Trainer does between steps

    return step


def _load_counted(cfg: RunConfig) -> tuple[Any, int, int]:
    """`load_model(cfg)` and the RSS before and after it, library code imported first so it is not counted.

    Returns:
        The loaded model and the RSS (bytes) before and after loading, each after a garbage collection.
    """
    import gc

    import bitsandbytes  # noqa: F401 - imported before the baseline, like the others
    import peft  # noqa: F401

    from mistral_fast.modeling import load_model, validate_model_request

    validate_model_request(cfg)  # imports transformers' model code and loads the tokenizer machinery
    gc.collect()
    before_load = proc_status("VmRSS")
    loaded = load_model(cfg)
    gc.collect()
    return loaded, before_load, proc_status("VmRSS")


def measure_cpu_training(cfg: RunConfig, *, batch_size: int, seq_len: int, chunked: bool = False) -> dict[str, Any]:
    """Peak RSS of real training steps on CPU, split like the estimate (Linux only).

    Loads the model with `mistral_fast.modeling.load_model` (libraries imported first, so their code
    is not counted), runs one warm-up step (forward, backward, AdamW step) on random tokens so that
    optimizer state and one-off allocations exist, then resets the peak RSS and measures a second
    step. Run it in a fresh process started with ``MALLOC_MMAP_THRESHOLD_=65536``: glibc then maps
    every large block on its own and returns it on free, so RSS follows the tensors (with the default,
    freed memory stays in the heap and the second step reuses it unseen).

    Returns:
        Bytes: ``weights_exact`` (tensor storage after loading), ``weights_rss`` (RSS growth over
        the load), ``optimizer_rss`` (growth over the warm-up step), ``step_peak`` (peak of the
        second step over the RSS before it), ``total_peak`` (peak over the RSS before loading); and
        ``trainable_params`` (a count) and the ``compute_dtype`` the loader chose.
    """
    loaded, before_load, after_load = _load_counted(cfg)
    step = _training_step(loaded.model, batch_size, seq_len, chunked)
    return _measure_steps(step, loaded, before_load, after_load)


def measure_cpu_preference(cfg: RunConfig, *, batch_size: int, prompt_len: int, answer_len: int) -> dict[str, Any]:
    """`measure_cpu_training` for a DPO or ORPO step (``cfg.train.method``), through the real trainers.

    The trainer of `mistral_fast.train_preference` is built on random pairs (prompt and answers of the
    given lengths); a step is its own ``compute_loss`` (for DPO: the policy forward on chosen + rejected,
    then the reference forward with the adapter off, without gradients), backward and an AdamW step.
    """
    import tempfile
    from pathlib import Path

    import torch
    from datasets import Dataset

    from mistral_fast.train_preference import build_preference_config, drop_fresh_reference_adapter, trainer_class

    gen = torch.Generator().manual_seed(0)

    def ids(n: int) -> list[int]:
        return torch.randint(3, 32000, (n,), generator=gen).tolist()

    rows = [
        {"prompt_ids": [1, *ids(prompt_len - 1)], "chosen_ids": ids(answer_len), "rejected_ids": ids(answer_len)}
        for _ in range(batch_size)
    ]
    loaded, before_load, after_load = _load_counted(cfg)
    model = loaded.model
    with tempfile.TemporaryDirectory() as tmp:
        trainer = trainer_class(cfg.train.method, loaded)(
            model=model,
            args=build_preference_config(cfg, loaded, False, Path(tmp)),
            train_dataset=Dataset.from_list(rows),
            processing_class=loaded.tokenizer,
        )
    drop_fresh_reference_adapter(trainer.model)
    from mistral_fast.modeling import cast_trainable_to_fp32

    cast_trainable_to_fp32(trainer.model)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(batch_size)])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step() -> None:
        trainer.compute_loss(trainer.model, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return _measure_steps(step, loaded, before_load, after_load)


def _measure_steps(step: Any, loaded: Any, before_load: int, after_load: int) -> dict[str, Any]:
    """A warm-up step (optimizer state, one-off allocations), then the peak RSS of a second one, split like the
    estimate: what `measure_cpu_training` and `measure_cpu_preference` both report."""
    import gc

    model = loaded.model
    step()
    gc.collect()
    before_step = proc_status("VmRSS")
    reset_peak_rss()
    step()
    peak = proc_status("VmHWM")
    return {
        "weights_exact": _tensor_bytes(model),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "weights_rss": after_load - before_load,
        "optimizer_rss": before_step - after_load,
        "step_peak": peak - before_step,
        "total_peak": peak - before_load,
        "compute_dtype": str(loaded.compute_dtype).removeprefix("torch."),
    }


def measure_cpu_load(cfg: RunConfig, *, for_training: bool = False) -> dict[str, Any]:
    """Peak RSS of `mistral_fast.modeling.load_model` alone (Linux; run as `measure_cpu_training` says).

    RSS counts the checkpoint's pages that safetensors maps and reads (clean file pages, ``RssFile``) as well
    as anonymous memory (the tensors, ``RssAnon``); both are returned after the load.

    Returns:
        Bytes over the RSS before loading: ``peak`` (VmHWM during the load), ``end`` (RSS once loaded),
        ``anon_end`` and ``file_end`` (its anonymous and file-backed parts), ``weights_exact`` (tensor
        storage of the loaded model).
    """
    import gc

    import bitsandbytes  # noqa: F401 - imported before the baseline, like the others
    import peft  # noqa: F401

    from mistral_fast.modeling import load_model, validate_model_request

    validate_model_request(cfg)
    gc.collect()
    before = {k: proc_status(k) for k in ("VmRSS", "RssAnon", "RssFile")}
    reset_peak_rss()
    loaded = load_model(cfg, for_training=for_training)
    gc.collect()
    return {
        "peak": proc_status("VmHWM") - before["VmRSS"],
        "end": proc_status("VmRSS") - before["VmRSS"],
        "anon_end": proc_status("RssAnon") - before["RssAnon"],
        "file_end": proc_status("RssFile") - before["RssFile"],
        "weights_exact": _tensor_bytes(loaded.model),
    }
