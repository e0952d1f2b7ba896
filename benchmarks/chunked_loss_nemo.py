"""Peak RSS of one training step of a Nemo-shaped model: transformers' plain loss vs our chunked loss (CPU).

The model is Mistral Nemo's shape cut to 2 decoder layers (hidden 5120, 32 heads of 128, 8 KV heads, MLP 14336,
vocabulary 131,072), bf16 random weights, LoRA r16 on every linear layer (peft), one sequence of 4,096 tokens,
every token trained. Each variant runs in its own fresh process (``MALLOC_MMAP_THRESHOLD_`` so RSS follows the
tensors), one after the other, and reports the peak RSS of the step over the RSS before it, the loss and the
norm of the LoRA gradients:

* ``plain``: ``model(input_ids, labels).loss.backward()`` (transformers' ForCausalLMLoss on full fp32 logits);
* ``chunked``: `mistral_fast.modeling.chunked_loss.model_loss` (what the hf backend trains with on CPU).

Usage: ``python benchmarks/chunked_loss_nemo.py [--seq 4096] [--layers 2] [--threads 2]`` (~14 GB free RAM).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _status(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(field)


def run_variant(variant: str, seq: int, layers: int, threads: int) -> dict:
    """One variant, in this process: build the model, take one step, measure."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import MistralConfig, MistralForCausalLM

    from mistral_fast.modeling.chunked_loss import model_loss

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=131072, hidden_size=5120, intermediate_size=14336, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=seq,
        rope_theta=1e6, sliding_window=None, tie_word_embeddings=False, attn_implementation="sdpa",
    )  # fmt: skip
    torch.set_default_dtype(torch.bfloat16)  # build in bf16: an fp32 copy of the 1.9B parameters would not fit
    model = MistralForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets, lora_dropout=0.0))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # LoRA in fp32, as training keeps it
    model.train()
    ids = torch.randint(1000, 131072, (1, seq), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
        handle.write("5")  # reset the peak RSS to the current RSS
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**inputs).loss if variant == "plain" else model_loss(model, inputs)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = _status("VmHWM")
    grads = [p.grad.float().norm() ** 2 for p in model.parameters() if p.grad is not None]
    return {
        "variant": variant,
        "loss": loss.item(),
        "lora_grad_norm": float(torch.stack(grads).sum().sqrt()),
        "rss_before_step_gib": round(before / 2**30, 3),
        "step_peak_gib": round((peak - before) / 2**30, 3),
        "process_peak_gib": round(peak / 2**30, 3),
        "seconds": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variant", choices=["plain", "chunked"], help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.variant:
        print("RESULT " + json.dumps(run_variant(args.variant, args.seq, args.layers, args.threads)), flush=True)
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    results = {}
    for variant in ("chunked", "plain"):
        cmd = [sys.executable, __file__, "--variant", variant, "--seq", str(args.seq), "--layers", str(args.layers)]
        cmd += ["--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"{variant} failed (rc={out.returncode}):\n{out.stderr[-3000:]}")
        results[variant] = json.loads(line.removeprefix("RESULT "))
        print(json.dumps(results[variant]), flush=True)
    plain, chunked = results["plain"], results["chunked"]
    print(
        f"step peak: chunked {chunked['step_peak_gib']} GiB vs plain {plain['step_peak_gib']} GiB "
        f"= {chunked['step_peak_gib'] / plain['step_peak_gib']:.2f}x; "
        f"loss {chunked['loss']:.6f} vs {plain['loss']:.6f}; "
        f"LoRA grad norm {chunked['lora_grad_norm']:.6g} vs {plain['lora_grad_norm']:.6g}"
    )


if __name__ == "__main__":
    main()
