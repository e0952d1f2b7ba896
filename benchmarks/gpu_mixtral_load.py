"""Peak GPU memory while loading a Mixtral in 4-bit: expert-by-expert loading vs the former path.

Builds a Mixtral-8x7B-width checkpoint (hidden 4096, 8 experts of 14336, v1 vocabulary) cut to
``--layers`` decoder layers, with random bf16 weights in Mixtral's per-expert layout (no download), then
loads it in its own process per path through `mistral_fast.modeling.load_model` (4-bit NF4, double
quantisation, LoRA all-linear) on ``cuda:0``:

* ``streamed``: today's loader (`moe.streamed_mixtral_class`): each expert matrix quantised as it is read;
* ``fused``: the former path (transformers' fused 16-bit experts, then `moe.quantize_experts`), forced
  by turning `loading._streams_experts` off.

Prints one JSON line per path: ``torch.cuda.max_memory_allocated`` during the load and the memory held
once loaded, in GiB, and the per-layer figures that extrapolate to Mixtral-8x7B's 32 layers. The
claim it checks (README, "Mixtral"): streamed peaks near the 4-bit model (~24 GiB for 8x7B) where the
fused path needs every layer's 16-bit experts (~87 GiB), so an A100-80GB can load 8x7B.

Usage (on the device; 3.4 GB of disk per layer): python benchmarks/gpu_mixtral_load.py --layers 4
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = """
import json, sys, torch
from mistral_fast.config import load_config
from mistral_fast.modeling import load_model, loading
if sys.argv[2] == "fused":
    loading._streams_experts = lambda path: False
overrides = ["model.tokenizer=v1", "model.backend=hf", "lora.targets=all-linear"]
cfg = load_config(None, [f"model.name_or_path={sys.argv[1]}", *overrides])
torch.cuda.reset_peak_memory_stats()
loaded = load_model(cfg, for_training=True)
torch.cuda.synchronize()
gib = 2**30
print("RESULT " + json.dumps({"path": sys.argv[2], "peak_gib": round(torch.cuda.max_memory_allocated() / gib, 2),
                              "held_gib": round(torch.cuda.memory_allocated() / gib, 2)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--work", type=Path, default=Path("/tmp/mixtral-load"))
    args = parser.parse_args()
    base = args.work / f"base-{args.layers}"
    if not (base / "config.json").exists():
        from benchmarks.export_mixtral import build_checkpoint

        build_checkpoint(base, args.layers)
    rows = []
    for path in ("streamed", "fused"):
        done = subprocess.run(
            [sys.executable, "-c", CHILD, str(base), path], capture_output=True, text=True, check=False
        )
        if done.returncode:
            rows.append({"path": path, "failed": done.stderr[-1500:]})
        else:
            rows.append(json.loads(done.stdout.split("RESULT ", 1)[1].splitlines()[0]))
        print(json.dumps(rows[-1]), flush=True)
    per_layer = {r["path"]: r["peak_gib"] / args.layers for r in rows if "peak_gib" in r}
    print(
        json.dumps(
            {
                "layers": args.layers,
                "peak_gib_per_layer (embeddings and head counted in: an overestimate)": per_layer,
                "extrapolated_to_32_layers_gib": {k: round(v * 32, 1) for k, v in per_layer.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
