"""Export of a Mixtral-8x7B-shaped checkpoint cut to a few layers (full width, 8 experts): ours vs the references.

Builds a random bf16 checkpoint in Mixtral's own layout (``block_sparse_moe.experts.{e}.w1/w2/w3``, router
``block_sparse_moe.gate``) at Mixtral-8x7B v0.1's width, one shard per layer written alone; an r16 LoRA on
attention and every expert (non-zero B) in two layouts with the same tensors: ours
(``mlp.experts.{e}.gate_proj``) and Mixtral's checkpoint names (``block_sparse_moe.experts.{e}.w1``, which
peft 0.21 maps onto transformers 5's fused experts). Each stage runs in its own process under
``/usr/bin/time -v`` (wall seconds, peak RSS of that stage alone):

* ours (a): `export_merged_gguf` q8_0: each expert merged onto its NF4-dequantised base, stacked, one pass;
* reference: peft ``merge_and_unload`` + ``save_pretrained`` (16-bit base, fused experts in memory);
* reference: llama.cpp's ``convert_hf_to_gguf.py`` q8_0 of the peft-merged checkpoint;
* ours (b): `export_gguf` q8_0 of the same peft-merged checkpoint, tensor data compared with the converter's.

Run it with 1 and 2 layers: the difference is the cost of one layer (x 32 for Mixtral-8x7B).

Usage:
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/export_mixtral.py --work DIR --llama-cpp LLAMA_CPP_DIR --layers 1
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from benchmarks.export_common import (
    PEFT_MERGE,
    Shapes,
    add_tokenizer,
    attention_shapes,
    converter,
    lora_pairs,
    python,
    same_tensors,
    tensor_digests,
    timed,
    write_adapter,
    write_checkpoint,
    write_run,
)

MIXTRAL_8X7B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 32000,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1e6,
    "max_position_embeddings": 32768,
    "router_aux_loss_coef": 0.02,
}
OURS = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def _layer_shapes(layer: int) -> Shapes:
    c = MIXTRAL_8X7B
    h, i, e = c["hidden_size"], c["intermediate_size"], c["num_local_experts"]
    p = f"model.layers.{layer}"
    shapes = attention_shapes(p, c) | {f"{p}.block_sparse_moe.gate.weight": (e, h)}
    for x in range(e):
        q = f"{p}.block_sparse_moe.experts.{x}"
        shapes |= {f"{q}.w1.weight": (i, h), f"{q}.w3.weight": (i, h), f"{q}.w2.weight": (h, i)}
    return shapes


def build_checkpoint(out: Path, layers: int) -> None:
    """Mixtral's checkpoint layout, one shard per layer written alone, with the v1 tokenizer."""
    config = MIXTRAL_8X7B | {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral"}
    write_checkpoint(out, config, _layer_shapes, layers)
    add_tokenizer(out, "v1")


def build_run(run_dir: Path, base: Path, layers: int, rank: int = 16) -> None:
    """Run directory (our adapter layout) and ``adapter-checkpoint-layout/`` (the same tensors, Mixtral's names)."""
    matrices = [
        (name, shape)
        for n in range(layers)
        for name, shape in _layer_shapes(n).items()
        if len(shape) == 2 and ".gate.weight" not in name  # norms; the router has no LoRA
    ]
    ours, theirs = {}, {}
    for key, a, b in lora_pairs(matrices, rank):
        mine = key
        if ".block_sparse_moe.experts." in key:
            head, w = key.rsplit(".", 1)
            mine = head.replace(".block_sparse_moe.", ".mlp.") + "." + OURS[w]
        for d, k in ((ours, mine), (theirs, key)):
            d[f"{k}.lora_A.weight"], d[f"{k}.lora_B.weight"] = a, b
    attention = ["q_proj", "k_proj", "v_proj", "o_proj"]
    write_adapter(run_dir / "adapter", ours, rank, [*attention, "gate_proj", "up_proj", "down_proj"], base)
    write_adapter(run_dir / "adapter-checkpoint-layout", theirs, rank, [*attention, "w1", "w2", "w3"], base)
    write_run(run_dir, base, "v1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="scratch directory (~3.4 GB per layer, x3)")
    parser.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp source (convert_hf_to_gguf.py)")
    parser.add_argument("--layers", type=int, default=1, help="decoder layers (Mixtral-8x7B has 32)")
    args = parser.parse_args()
    base, run_dir, out = args.work / "base", args.work / "run", args.work / "out"
    peft_merged = args.work / "peft-merged"
    out.mkdir(parents=True, exist_ok=True)
    here = "from pathlib import Path; from benchmarks.export_mixtral import build_checkpoint, build_run; "
    export = "from mistral_fast.export import export_gguf, export_merged_gguf; "
    rows = [timed("build checkpoint", python(here + f"build_checkpoint(Path({str(base)!r}), {args.layers})"))]
    rows.append(
        timed("build adapter", python(here + f"build_run(Path({str(run_dir)!r}), Path({str(base)!r}), {args.layers})"))
    )
    one_pass = out / "one-pass-q8_0.gguf"
    rows.append(timed("ours (a): one-pass merge (NF4-dequantised base) + GGUF q8_0", python(
        export + f"export_merged_gguf({str(run_dir)!r}, {str(one_pass)!r}, 'q8_0')")))  # fmt: skip
    one_pass.unlink()
    adapter = str(run_dir / "adapter-checkpoint-layout")
    rows.append(timed("peft merge_and_unload + save_pretrained", python(
        PEFT_MERGE.format(base=str(base), adapter=adapter, out=str(peft_merged)))))  # fmt: skip
    add_tokenizer(peft_merged, "v1")
    theirs, ours = out / "converter-q8_0.gguf", out / "ours-q8_0.gguf"
    argv, env = converter(args.llama_cpp, peft_merged, theirs, "q8_0")
    rows.append(timed("llama.cpp convert_hf_to_gguf q8_0", argv, env))
    rows.append(timed("ours (b): export_gguf q8_0", python(
        export + f"export_gguf({str(peft_merged)!r}, {str(ours)!r}, 'q8_0')")))  # fmt: skip
    identical = same_tensors(tensor_digests(ours), tensor_digests(theirs))
    sizes = {"checkpoint_gb": round(sum(f.stat().st_size for f in base.glob("*.safetensors")) / 1e9, 2)}
    sizes["q8_0_gb"] = round(theirs.stat().st_size / 1e9, 2)
    theirs.unlink()
    ours.unlink()
    shutil.rmtree(peft_merged)
    summary = {"layers": args.layers, "stages": rows, "sizes": sizes, "ours (b) tensors identical": identical}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
