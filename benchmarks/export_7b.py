"""Streamed export at Mistral-7B shape: time and peak memory of merge (NF4-dequantised base) + GGUF q8_0.

Builds a random Mistral-7B-v0.3-shaped bf16 checkpoint on disk tensor by tensor (never the whole model in
memory), a rank-16 all-linear LoRA adapter with non-zero B, and a run directory pointing at them; then runs
each export stage in its own process under ``/usr/bin/time -v`` so every stage reports its own peak RSS.
The claim being measured: peak memory stays near one shard (merge) or one tensor (GGUF), not the model.

Usage:
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/export_7b.py --work /big/disk/dir            # 32 layers
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/export_7b.py --work /tmp/e7 --layers 4        # quick look

Disk: ~14.5 GB checkpoint + 14.5 GB merged + 7.7 GB q8_0 GGUF for 32 layers (scales with --layers).
Prints one JSON line per stage and a summary; figures go to benchmarks/README.md by hand.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

MISTRAL_7B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 32768,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1e6,
    "max_position_embeddings": 32768,
}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _layer_shapes(layer: int) -> dict[str, tuple[int, ...]]:
    h, i = MISTRAL_7B["hidden_size"], MISTRAL_7B["intermediate_size"]
    kv = MISTRAL_7B["num_key_value_heads"] * MISTRAL_7B["head_dim"]
    p = f"model.layers.{layer}"
    return {
        f"{p}.input_layernorm.weight": (h,),
        f"{p}.post_attention_layernorm.weight": (h,),
        f"{p}.self_attn.q_proj.weight": (h, h),
        f"{p}.self_attn.k_proj.weight": (kv, h),
        f"{p}.self_attn.v_proj.weight": (kv, h),
        f"{p}.self_attn.o_proj.weight": (h, h),
        f"{p}.mlp.gate_proj.weight": (i, h),
        f"{p}.mlp.up_proj.weight": (i, h),
        f"{p}.mlp.down_proj.weight": (h, i),
    }


def build_checkpoint(out: Path, layers: int) -> None:
    """One safetensors shard per layer (+ embeddings, + head), each generated and written alone."""
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    h, v = MISTRAL_7B["hidden_size"], MISTRAL_7B["vocab_size"]
    groups = [{"model.embed_tokens.weight": (v, h)}] + [_layer_shapes(n) for n in range(layers)]
    groups.append({"model.norm.weight": (h,), "lm_head.weight": (v, h)})
    weight_map = {}
    for n, shapes in enumerate(groups):
        name = f"model-{n + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {
            k: (torch.ones(s) if len(s) == 1 else torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16)
            for k, s in shapes.items()
        }
        save_file(tensors, out / name, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, name)
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {**MISTRAL_7B, "architectures": ["MistralForCausalLM"], "model_type": "mistral"}
    config |= {"num_hidden_layers": layers, "dtype": "bfloat16", "tie_word_embeddings": False, "hidden_act": "silu"}
    config |= {"bos_token_id": 1, "eos_token_id": 2, "sliding_window": None}
    (out / "config.json").write_text(json.dumps(config, indent=2))


def build_run(run_dir: Path, base: Path, layers: int, rank: int = 16) -> None:
    """A run directory as training leaves it: run_config.yaml, result.json, adapter/ (r16, all linear)."""
    import torch
    from safetensors.torch import save_file

    from mistral_fast.config import load_config
    from mistral_fast.tokenizer import load_tokenizer

    gen = torch.Generator().manual_seed(1)
    lora = {}
    for n in range(layers):
        for name, shape in _layer_shapes(n).items():
            if len(shape) == 2:
                key = "base_model.model." + name.removesuffix(".weight")
                lora[f"{key}.lora_A.weight"] = torch.randn(rank, shape[1], generator=gen) * 0.01
                lora[f"{key}.lora_B.weight"] = torch.randn(shape[0], rank, generator=gen) * 0.01
    adapter = run_dir / "adapter"
    adapter.mkdir(parents=True, exist_ok=True)
    save_file(lora, adapter / "adapter_model.safetensors")
    adapter_cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS)}
    (adapter / "adapter_config.json").write_text(json.dumps(adapter_cfg | {"base_model_name_or_path": str(base)}))
    load_tokenizer("v3").save_pretrained(adapter)
    cfg = load_config(
        None, [f"model.name_or_path={base}", "model.compute_dtype=bfloat16", f"train.output_dir={run_dir}"]
    )
    cfg.save(run_dir / "run_config.yaml")
    (run_dir / "result.json").write_text(json.dumps({"train": {"extra": {"compute_dtype": "bfloat16"}}}))


def timed(stage: str, code: str) -> dict[str, float | str]:
    """Run ``code`` in a fresh Python under /usr/bin/time -v: wall seconds and peak RSS of that stage alone."""
    start = time.perf_counter()
    proc = subprocess.run(
        ["/usr/bin/time", "-v", sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    if proc.returncode:
        raise SystemExit(f"{stage} failed:\n{proc.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)[1])
    row = {"stage": stage, "seconds": round(time.perf_counter() - start, 1), "peak_rss_gb": round(rss_kb / 2**20, 2)}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="scratch directory (needs ~37 GB for 32 layers)")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (32 = Mistral-7B)")
    parser.add_argument("--qtype", default="q8_0", help="GGUF type written from the merged model")
    parser.add_argument("--shard-size", default="2GB", help="merged shard size")
    args = parser.parse_args()
    base, run_dir = args.work / "base", args.work / "run"
    merged, gguf = run_dir / "export" / "merged", run_dir / "export" / f"model-{args.qtype}.gguf"
    here = "from pathlib import Path; from benchmarks.export_7b import build_checkpoint, build_run; "
    export = "from mistral_fast.export import merge_adapter, export_gguf; "
    rows = [timed("build checkpoint", here + f"build_checkpoint(Path({str(base)!r}), {args.layers})")]
    rows.append(timed("build adapter", here + f"build_run(Path({str(run_dir)!r}), Path({str(base)!r}), {args.layers})"))
    merge = f"merge_adapter({str(run_dir)!r}, {str(merged)!r}, shard_size={args.shard_size!r})"
    rows.append(timed("merge (dequantized)", export + merge))
    rows.append(timed(f"gguf {args.qtype}", export + f"export_gguf({str(merged)!r}, {str(gguf)!r}, {args.qtype!r})"))
    sizes = {"checkpoint_gb": sum(f.stat().st_size for f in base.glob("*.safetensors")) / 1e9}
    sizes |= {
        "merged_gb": sum(f.stat().st_size for f in merged.glob("*.safetensors")) / 1e9,
        "gguf_gb": gguf.stat().st_size / 1e9,
    }
    print(json.dumps({"layers": args.layers, "stages": rows, **{k: round(v, 2) for k, v in sizes.items()}}))


if __name__ == "__main__":
    main()
