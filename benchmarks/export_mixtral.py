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
import sys
from pathlib import Path

from benchmarks.export_7b import python, same_tensor_bytes, timed

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


def _layer_shapes(layer: int) -> dict[str, tuple[int, ...]]:
    c = MIXTRAL_8X7B
    h, i, e = c["hidden_size"], c["intermediate_size"], c["num_local_experts"]
    kv = c["num_key_value_heads"] * c["head_dim"]
    p = f"model.layers.{layer}"
    shapes: dict[str, tuple[int, ...]] = {
        f"{p}.input_layernorm.weight": (h,),
        f"{p}.post_attention_layernorm.weight": (h,),
        f"{p}.self_attn.q_proj.weight": (h, h),
        f"{p}.self_attn.k_proj.weight": (kv, h),
        f"{p}.self_attn.v_proj.weight": (kv, h),
        f"{p}.self_attn.o_proj.weight": (h, h),
        f"{p}.block_sparse_moe.gate.weight": (e, h),
    }
    for x in range(e):
        q = f"{p}.block_sparse_moe.experts.{x}"
        shapes |= {f"{q}.w1.weight": (i, h), f"{q}.w3.weight": (i, h), f"{q}.w2.weight": (h, i)}
    return shapes


def build_checkpoint(out: Path, layers: int) -> None:
    """One safetensors shard per layer (+ embeddings, + head), each generated and written alone."""
    import torch
    from safetensors.torch import save_file

    from mistral_fast.tokenizer import load_tokenizer, sentencepiece_path

    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    h, v = MIXTRAL_8X7B["hidden_size"], MIXTRAL_8X7B["vocab_size"]
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
    config = {**MIXTRAL_8X7B, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral"}
    config |= {"num_hidden_layers": layers, "dtype": "bfloat16", "tie_word_embeddings": False, "hidden_act": "silu"}
    config |= {"bos_token_id": 1, "eos_token_id": 2, "sliding_window": None}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    load_tokenizer("v1").save_pretrained(out)
    shutil.copyfile(sentencepiece_path("v1"), out / "tokenizer.model")


def build_run(run_dir: Path, base: Path, layers: int, rank: int = 16) -> None:
    """Run directory (our adapter layout) and ``adapter-checkpoint-layout/`` (the same tensors, Mixtral's names)."""
    import torch
    from safetensors.torch import save_file

    from mistral_fast.config import load_config
    from mistral_fast.tokenizer import load_tokenizer

    gen = torch.Generator().manual_seed(1)
    ours, theirs = {}, {}
    for n in range(layers):
        for name, shape in _layer_shapes(n).items():
            if len(shape) != 2 or ".gate.weight" in name:
                continue  # norms; the router has no LoRA
            a = torch.randn(rank, shape[1], generator=gen) * 0.01
            b = torch.randn(shape[0], rank, generator=gen) * 0.01
            key = "base_model.model." + name.removesuffix(".weight")
            mine = key
            if ".block_sparse_moe.experts." in key:
                head, w = key.rsplit(".", 1)
                mine = head.replace(".block_sparse_moe.", ".mlp.") + "." + OURS[w]
            for d, k in ((ours, mine), (theirs, key)):
                d[f"{k}.lora_A.weight"], d[f"{k}.lora_B.weight"] = a, b
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "base_model_name_or_path": str(base)}
    for d, folder, targets in (
        (ours, run_dir / "adapter", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
        (theirs, run_dir / "adapter-checkpoint-layout", ["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"]),
    ):
        folder.mkdir(parents=True, exist_ok=True)
        save_file(d, folder / "adapter_model.safetensors")
        (folder / "adapter_config.json").write_text(json.dumps(config | {"target_modules": targets}))
    load_tokenizer("v1").save_pretrained(run_dir / "adapter")
    cfg = load_config(
        None,
        [
            f"model.name_or_path={base}",
            "model.tokenizer=v1",
            "model.compute_dtype=bfloat16",
            f"train.output_dir={run_dir}",
        ],
    )
    cfg.save(run_dir / "run_config.yaml")
    (run_dir / "result.json").write_text(json.dumps({"train": {"extra": {"compute_dtype": "bfloat16"}}}))


PEFT_MERGE = """
import os, shutil, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({base!r}, dtype=torch.bfloat16)
merged = PeftModel.from_pretrained(model, {adapter!r}).merge_and_unload()
merged.save_pretrained({out!r})
for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"):
    if os.path.exists({base!r} + "/" + name):
        shutil.copyfile({base!r} + "/" + name, {out!r} + "/" + name)
"""


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
    theirs, ours = out / "converter-q8_0.gguf", out / "ours-q8_0.gguf"
    converter = [sys.executable, str(args.llama_cpp / "convert_hf_to_gguf.py"), str(peft_merged)]
    env = {"PYTHONPATH": str(args.llama_cpp / "gguf-py"), "NO_LOCAL_GGUF": ""}
    rows.append(
        timed("llama.cpp convert_hf_to_gguf q8_0", [*converter, "--outfile", str(theirs), "--outtype", "q8_0"], env)
    )
    rows.append(timed("ours (b): export_gguf q8_0", python(
        export + f"export_gguf({str(peft_merged)!r}, {str(ours)!r}, 'q8_0')")))  # fmt: skip
    identical = same_tensor_bytes(ours, theirs)
    sizes = {"checkpoint_gb": round(sum(f.stat().st_size for f in base.glob("*.safetensors")) / 1e9, 2)}
    sizes["q8_0_gb"] = round(theirs.stat().st_size / 1e9, 2)
    theirs.unlink()
    ours.unlink()
    shutil.rmtree(peft_merged)
    summary = {"layers": args.layers, "stages": rows, "sizes": sizes, "ours (b) tensors identical": identical}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
