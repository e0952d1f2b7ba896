"""Export at Mistral-7B shape, ours against the references, side by side in one run: time and peak RSS.

Builds a random Mistral-7B-v0.3-shaped bf16 checkpoint on disk tensor by tensor (never the whole model in
memory), a rank-16 all-linear LoRA adapter with non-zero B, and a run directory pointing at them; then runs
each stage in its own process under ``/usr/bin/time -v`` (wall seconds, peak RSS of that stage alone):

* ours (a): `export_merged_gguf`: merge onto the NF4-dequantised base + GGUF q8_0 in one pass;
* reference: peft ``merge_and_unload`` + ``save_pretrained`` (the original 16-bit base, as peft merges);
* reference: llama.cpp's ``convert_hf_to_gguf.py`` q8_0 and f16 of that peft-merged checkpoint;
* ours (b): `export_gguf` q8_0 and f16 of the same peft-merged checkpoint, whose tensor data is then
  compared with the converter's, tensor by tensor (same name, type and bytes).

llama.cpp's converter ships (with its ``gguf-py``) in the llama-cpp-python *source* package:
``pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp/lcpp`` and unpack it there;
give its unpacked ``vendor/llama.cpp`` directory as ``--llama-cpp LLAMA_CPP_DIR``. Never commit it.

Usage:
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/export_7b.py --work /big/dir --llama-cpp LLAMA_CPP_DIR
    ... --layers 4        # a quick look (every stage on the same smaller checkpoint)

Disk: ~14.5 GB checkpoint + 14.5 GB peft-merged + one GGUF at a time (7.7 GB q8_0, 14.5 GB f16) for 32 layers;
each output is deleted after its stage. Prints one JSON line per stage and a summary with the targets.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
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


def timed(stage: str, argv: list[str], env: dict[str, str] | None = None) -> dict[str, float | str]:
    """Run ``argv`` under /usr/bin/time -v: wall seconds and peak RSS of that stage alone."""
    start = time.perf_counter()
    proc = subprocess.run(
        ["/usr/bin/time", "-v", *argv], capture_output=True, text=True, check=False, env={**os.environ, **(env or {})}
    )
    if proc.returncode:
        raise SystemExit(f"{stage} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)[1])
    row = {"stage": stage, "seconds": round(time.perf_counter() - start, 1), "peak_rss_gib": round(rss_kb / 2**20, 2)}
    print(json.dumps(row), flush=True)
    return row


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


PEFT_MERGE = """
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({base!r}, dtype=torch.bfloat16)
merged = PeftModel.from_pretrained(model, {adapter!r}).merge_and_unload()
merged.save_pretrained({out!r})
"""


def add_tokenizer(model_dir: Path) -> None:
    """The SentencePiece model and tokenizer files, which both GGUF writers read (copied, not timed)."""
    from mistral_fast.tokenizer import load_tokenizer, sentencepiece_path

    load_tokenizer("v3").save_pretrained(model_dir)
    shutil.copyfile(sentencepiece_path("v3"), model_dir / "tokenizer.model")


def same_tensor_bytes(ours: Path, theirs: Path) -> str:
    """How many of llama.cpp's converter's tensors ours holds with the same name, type and bytes ("n/n").

    The metadata differs by design (our chat template, general.name); the weights llama.cpp computes
    with must not.
    """
    import gguf
    import numpy as np

    mine = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    reference = gguf.GGUFReader(theirs).tensors
    same = 0
    for t in reference:
        other = mine.get(t.name)
        if other is not None and other.tensor_type == t.tensor_type and np.array_equal(other.data, t.data):
            same += 1
        else:
            print(f"differs: {t.name} ({t.tensor_type.name})", file=sys.stderr)
    return f"{same}/{len(reference)}" + ("" if len(mine) == len(reference) else f" (ours has {len(mine)} tensors)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="scratch directory (needs ~45 GB for 32 layers)")
    parser.add_argument(
        "--llama-cpp", type=Path, required=True, help="llama.cpp source (convert_hf_to_gguf.py, gguf-py)"
    )
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (32 = Mistral-7B)")
    args = parser.parse_args()
    base, run_dir, out = args.work / "base", args.work / "run", args.work / "out"
    peft_merged = args.work / "peft-merged"
    out.mkdir(parents=True, exist_ok=True)
    here = "from pathlib import Path; from benchmarks.export_7b import build_checkpoint, build_run; "
    export = "from mistral_fast.export import export_gguf, export_merged_gguf; "
    rows = [timed("build checkpoint", python(here + f"build_checkpoint(Path({str(base)!r}), {args.layers})"))]
    rows.append(
        timed("build adapter", python(here + f"build_run(Path({str(run_dir)!r}), Path({str(base)!r}), {args.layers})"))
    )
    sizes: dict[str, float] = {"checkpoint_gb": sum(f.stat().st_size for f in base.glob("*.safetensors")) / 1e9}

    def gguf_stage(stage: str, argv: list[str], path: Path, env: dict[str, str] | None = None, keep: bool = False):
        rows.append(timed(stage, argv, env))
        sizes[stage] = path.stat().st_size / 1e9
        if not keep:
            path.unlink()

    one_pass = out / "one-pass-q8_0.gguf"
    gguf_stage("ours (a): one-pass merge (NF4-dequantised base) + GGUF q8_0", python(
        export + f"export_merged_gguf({str(run_dir)!r}, {str(one_pass)!r}, 'q8_0')"), one_pass)  # fmt: skip
    adapter = str(run_dir / "adapter")
    rows.append(timed("peft merge_and_unload + save_pretrained", python(
        PEFT_MERGE.format(base=str(base), adapter=adapter, out=str(peft_merged)))))  # fmt: skip
    add_tokenizer(peft_merged)
    converter = [sys.executable, str(args.llama_cpp / "convert_hf_to_gguf.py"), str(peft_merged)]
    env = {"PYTHONPATH": str(args.llama_cpp / "gguf-py"), "NO_LOCAL_GGUF": ""}
    identical = {}
    for qtype in ("q8_0", "f16"):
        theirs = out / f"converter-{qtype}.gguf"
        gguf_stage(f"llama.cpp convert_hf_to_gguf {qtype}",
                   [*converter, "--outfile", str(theirs), "--outtype", qtype], theirs, env, keep=True)  # fmt: skip
        ours = out / f"ours-{qtype}.gguf"
        gguf_stage(f"ours (b): export_gguf {qtype}", python(
            export + f"export_gguf({str(peft_merged)!r}, {str(ours)!r}, {qtype!r})"), ours, keep=True)  # fmt: skip
        identical[qtype] = same_tensor_bytes(ours, theirs)
        print(json.dumps({"tensor data identical to the converter's": {qtype: identical[qtype]}}), flush=True)
        theirs.unlink()
        ours.unlink()
    shutil.rmtree(peft_merged)
    by = {r["stage"]: r for r in rows}
    ours_a = by["ours (a): one-pass merge (NF4-dequantised base) + GGUF q8_0"]
    peft = by["peft merge_and_unload + save_pretrained"]
    conv = {q: by[f"llama.cpp convert_hf_to_gguf {q}"] for q in ("q8_0", "f16")}
    ours_b = {q: by[f"ours (b): export_gguf {q}"] for q in ("q8_0", "f16")}
    reference_a = peft["seconds"] + conv["q8_0"]["seconds"]
    targets = {
        "a_time_ratio (<= 0.6)": round(ours_a["seconds"] / reference_a, 3),
        "a_peak_rss_gib (<= 2)": ours_a["peak_rss_gib"],
    }
    for q in ("q8_0", "f16"):
        targets[f"b_{q}_time_ratio (<= 1.0)"] = round(ours_b[q]["seconds"] / conv[q]["seconds"], 3)
        targets[f"b_{q}_rss_ratio (<= 1.1)"] = round(ours_b[q]["peak_rss_gib"] / conv[q]["peak_rss_gib"], 3)
    summary = {"layers": args.layers, "stages": rows, "sizes_gb": {k: round(v, 2) for k, v in sizes.items()}}
    summary["tensor data identical to the converter's (ours (b))"] = identical
    print(json.dumps(summary | {"targets": targets}, indent=1))


if __name__ == "__main__":
    main()
