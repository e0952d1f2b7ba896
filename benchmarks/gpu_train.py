"""QLoRA training throughput and memory on a CUDA GPU: unsloth backend vs hf backend, side by side.

Builds a Mistral-7B-v0.3-shaped model with random bf16 weights on disk (no download), then, for each
backend in its own process (importing unsloth patches transformers, so the hf run must never see it),
loads it through `mistral_fast.modeling.load_model` in 4-bit NF4 + LoRA (r 16, all-linear, seq 2048)
and times SFT steps on random token sequences. Prints one JSON line per backend:

    {"backend", "tokens_per_s", "peak_vram_gib", "mfu", "step_s", "steps", "seq_len", "batch"}

MFU = 4·N·tokens/s / peak bf16 FLOP/s (N = parameter count; 4 = forward 2 + backward ~2 with frozen
base weights; the classic 6·N counts weight gradients the frozen base never gets).
Targets: unsloth ≥ 2.2× hf tokens/s and ≤ 0.38× hf peak VRAM.

``--objective dpo`` times DPO steps instead, through `mistral_fast.train_preference`'s trainer (TRL's
DPOTrainer with our exact ids; the reference is the same model with its adapter off): each step is the
policy forward on chosen + rejected, the reference forward without gradients, backward and AdamW, on
random pairs whose prompt and answers fill ``--seq-len``. It prints ``dpo_steps_per_s``, ``pairs_per_s``
and ``peak_vram_gib`` per backend.

Usage (on the device): python benchmarks/gpu_train.py [--steps 6] [--out /tmp/m7b] [--objective sft|dpo]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mistral_fast.config import RunConfig

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0, "T4": 65.0}
# Mistral-7B v0.3's shape (no sliding window in v0.3); vocab 32768 and RoPE θ 1e6 are build_tiny_model's defaults.
MISTRAL_7B = dict(
    hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, intermediate_size=14336, sliding_window=None
)


def build(out: Path) -> None:
    """Write the 7B-shaped random checkpoint once (about 14.5 GB of bf16 safetensors)."""
    from mistral_fast.modeling import build_tiny_model

    if not (out / "config.json").exists():
        build_tiny_model(out, **MISTRAL_7B, dtype="bfloat16")  # ~29 GB of host RAM while it builds


def _config(backend: str, model_dir: Path, seq_len: int, overrides: dict | None = None) -> RunConfig:
    """The run config both objectives load the checkpoint with: 4-bit NF4 + LoRA (r 16, α 32, all-linear,
    no dropout) on `backend`; `overrides`: the objective's own keys."""
    from mistral_fast.config import RunConfig

    base = {
        "model.name_or_path": str(model_dir),
        "model.backend": backend,
        "model.max_seq_length": seq_len,
        "lora.rank": 16,
        "lora.alpha": 32,
        "lora.dropout": 0.0,
        "lora.targets": "all-linear",
    }
    return RunConfig().with_overrides({**base, **(overrides or {})})


def _seconds_per_step(step: Callable[[], None], steps: int) -> float:
    """Mean wall time of `steps` calls of `step`, after one untimed warm-up (kernels compile, allocator settles)."""
    import torch

    step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def _figures(seconds: float, steps: int, seq_len: int, batch: int) -> dict:
    """The figures both objectives report after their own: peak VRAM, step time and the run's shape."""
    import torch

    return {
        "peak_vram_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "step_s": round(seconds, 3),
        "steps": steps,
        "seq_len": seq_len,
        "batch": batch,
    }


def measure(backend: str, model_dir: Path, steps: int, seq_len: int, batch: int) -> dict:
    """One backend: load, warm up one step, time `steps` steps."""
    import torch

    from mistral_fast.modeling import load_model

    loaded = load_model(_config(backend, model_dir, seq_len))
    model = loaded.model
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)
    ids = torch.randint(3, 32000, (batch, seq_len), device="cuda")
    torch.cuda.reset_peak_memory_stats()

    def step() -> None:
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds = _seconds_per_step(step, steps)
    tokens_per_s = batch * seq_len / seconds
    n_params = 7.25e9  # Mistral-7B v0.3 (4-bit parameters count packed in numel(), so not counted here)
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    return {
        "backend": loaded.backend,
        "device": name,
        "tokens_per_s": round(tokens_per_s, 1),
        "mfu": round(4 * n_params * tokens_per_s / (peak * 1e12), 4) if peak else None,
        **_figures(seconds, steps, seq_len, batch),
    }


def measure_dpo(backend: str, model_dir: Path, steps: int, seq_len: int, batch: int) -> dict:
    """One backend, DPO: `steps` timed trainer steps on `batch` random pairs per step (after one warm-up)."""
    import tempfile

    import torch
    from datasets import Dataset

    from mistral_fast.modeling import cast_trainable_to_fp32, load_model
    from mistral_fast.train_preference import build_preference_config, drop_fresh_reference_adapter, trainer_class

    dpo = {"train.method": "dpo", "train.per_device_batch_size": batch, "train.max_answer_length": seq_len // 4}
    cfg = _config(backend, model_dir, seq_len, dpo)
    loaded = load_model(cfg)
    prompt, answer = seq_len - seq_len // 4, seq_len // 4

    def ids(n: int) -> list[int]:
        return torch.randint(3, 32000, (n,)).tolist()

    rows = [{"prompt_ids": [1, *ids(prompt - 1)], "chosen_ids": ids(answer), "rejected_ids": ids(answer)}] * batch
    with tempfile.TemporaryDirectory() as tmp:
        trainer = trainer_class("dpo", loaded)(
            model=loaded.model,
            args=build_preference_config(cfg, loaded, False, Path(tmp)),
            train_dataset=Dataset.from_list(rows),
            processing_class=loaded.tokenizer,
        )
    drop_fresh_reference_adapter(trainer.model)
    cast_trainable_to_fp32(trainer.model)
    model = trainer.model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    batch_tensors = {k: v.to("cuda") for k, v in trainer.data_collator(rows).items()}
    model.train()
    torch.cuda.reset_peak_memory_stats()

    def step() -> None:
        with torch.autocast("cuda", dtype=loaded.compute_dtype):
            loss = trainer.compute_loss(model, batch_tensors)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds = _seconds_per_step(step, steps)
    return {
        "backend": loaded.backend,
        "objective": "dpo",
        "device": torch.cuda.get_device_name(),
        "dpo_steps_per_s": round(1 / seconds, 3),
        "pairs_per_s": round(batch / seconds, 2),
        **_figures(seconds, steps, seq_len, batch),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("/tmp/mistral-7b-random"))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--objective", choices=("sft", "dpo"), default="sft")
    parser.add_argument("--backend", help="internal: measure one backend in this process")
    args = parser.parse_args()
    if args.backend:
        fn = measure_dpo if args.objective == "dpo" else measure
        print(json.dumps(fn(args.backend, args.out, args.steps, args.seq_len, args.batch)), flush=True)
        return
    build(args.out)
    results = {}
    for backend in ("hf", "unsloth"):
        cmd = [
            sys.executable,
            __file__,
            "--backend",
            backend,
            "--out",
            str(args.out),
            "--steps",
            str(args.steps),
            "--seq-len",
            str(args.seq_len),
            "--batch",
            str(args.batch),
            "--objective",
            args.objective,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        line = [x for x in proc.stdout.splitlines() if x.startswith("{")]
        if proc.returncode or not line:
            print(json.dumps({"backend": backend, "error": proc.stderr[-2000:]}))
            continue
        results[backend] = json.loads(line[-1])
        print(line[-1], flush=True)
    if len(results) == 2 and args.objective == "dpo":
        hf, us = results["hf"], results["unsloth"]
        ratio = {"speedup": round(hf["step_s"] / us["step_s"], 2)}
        print(json.dumps({**ratio, "memory_ratio": round(us["peak_vram_gib"] / hf["peak_vram_gib"], 3)}))
    elif len(results) == 2:
        hf, us = results["hf"], results["unsloth"]
        print(
            json.dumps(
                {
                    "speedup": round(us["tokens_per_s"] / hf["tokens_per_s"], 2),
                    "memory_ratio": round(us["peak_vram_gib"] / hf["peak_vram_gib"], 3),
                    "targets": {"speedup": ">= 2.2", "memory_ratio": "<= 0.38"},
                }
            )
        )


if __name__ == "__main__":
    main()
