"""Export of a dense Mistral (7B or Nemo-12B shape), ours against the references, side by side in one run.

Builds a random bf16 checkpoint of the chosen shape on disk shard by shard (never the whole model in
memory), a rank-16 all-linear LoRA adapter with non-zero B, and a run directory pointing at them; then runs
each stage in its own process under ``/usr/bin/time -v`` (wall seconds, peak RSS of that stage alone):

* ours (a): `export_merged_gguf`: merge onto the NF4-dequantised base + GGUF q8_0 in one pass;
* reference: peft ``merge_and_unload`` + ``save_pretrained`` (the original 16-bit base, as peft merges),
  stopped if its RSS passes ``--peft-limit-gib`` (it holds the whole 16-bit model: 24.5 GB at 12B);
* when peft did not fit: ours `merge_adapter` (merged 16-bit safetensors), the converters' input instead;
* reference: llama.cpp's ``convert_hf_to_gguf.py`` (``--qtypes``, default q8_0 and f16) of the merged
  checkpoint;
* ours (b): `export_gguf` of the same merged checkpoint; its tensor data is compared with the
  converter's, tensor by tensor (name, type, bytes). When the merged checkpoint is ours, (a)'s q8_0 is
  compared with the converter's too (the one-pass export must equal merge-then-convert).

llama.cpp's converter ships (with its ``gguf-py``) in the llama-cpp-python *source* package:
``pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp/lcpp`` and unpack it there;
give its unpacked ``vendor/llama.cpp`` directory as ``--llama-cpp LLAMA_CPP_DIR``. Never commit it.

Usage:
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/export_dense.py --shape mistral-7b --work DIR --llama-cpp DIR
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/export_dense.py --shape nemo-12b --work DIR --llama-cpp DIR \
        --qtypes q8_0 --peft-limit-gib 16
    ... --layers 4        # a quick look (every stage on the same smaller checkpoint)

Disk, at most: the checkpoint + one merged copy (the base is deleted once the merged copy exists) + one
GGUF at a time (each deleted after its tensors are hashed): ~45 GB at 7B, ~62 GB at 12B with f16, ~50 GB
with q8_0 only. Prints one JSON line per stage and a summary with the targets.
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
    timed_with_limit,
    write_adapter,
    write_checkpoint,
    write_run,
)

_COMMON = {"num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-5}
SHAPES: dict[str, dict] = {
    # Mistral-7B v0.3's config.json
    "mistral-7b": _COMMON
    | {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "vocab_size": 32768,
        "rope_theta": 1e6,
        "max_position_embeddings": 32768,
        "layers": 32,
        "tokenizer": "v3",
    },
    # Mistral-Nemo-Base-2407's config.json: head_dim 128 is not hidden / heads (160)
    "nemo-12b": _COMMON
    | {
        "hidden_size": 5120,
        "intermediate_size": 14336,
        "vocab_size": 131072,
        "rope_theta": 1e6,
        "max_position_embeddings": 1024000,
        "layers": 40,
        "tokenizer": "v3-tekken",
    },
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ONE_PASS = "ours (a): one-pass merge (NF4-dequantised base) + GGUF q8_0"
PEFT = "peft merge_and_unload + save_pretrained"


def model_config(shape: str) -> dict:
    config = {k: v for k, v in SHAPES[shape].items() if k not in ("layers", "tokenizer")}
    return config | {"architectures": ["MistralForCausalLM"], "model_type": "mistral"}


def layer_shapes(shape: str, layer: int) -> Shapes:
    config = SHAPES[shape]
    h, i, p = config["hidden_size"], config["intermediate_size"], f"model.layers.{layer}"
    mlp = {f"{p}.mlp.gate_proj.weight": (i, h), f"{p}.mlp.up_proj.weight": (i, h), f"{p}.mlp.down_proj.weight": (h, i)}
    return attention_shapes(p, config) | mlp


def build_checkpoint(shape: str, out: Path, layers: int) -> None:
    write_checkpoint(out, model_config(shape), lambda n: layer_shapes(shape, n), layers)


def build_run(shape: str, run_dir: Path, base: Path, layers: int, rank: int = 16) -> None:
    """A run directory as training leaves it: run_config.yaml, result.json, adapter/ (r16, all linear)."""
    matrices = [(k, s) for n in range(layers) for k, s in layer_shapes(shape, n).items() if len(s) == 2]
    lora = {}
    for key, a, b in lora_pairs(matrices, rank):
        lora[f"{key}.lora_A.weight"], lora[f"{key}.lora_B.weight"] = a, b
    write_adapter(run_dir / "adapter", lora, rank, TARGETS, base)
    write_run(run_dir, base, SHAPES[shape]["tokenizer"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="mistral-7b")
    parser.add_argument("--work", type=Path, required=True, help="scratch directory (see Disk above)")
    parser.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp source (convert_hf_to_gguf.py)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the model's)")
    parser.add_argument("--qtypes", nargs="+", default=["q8_0", "f16"], choices=["q8_0", "f16", "bf16"])
    parser.add_argument("--peft-limit-gib", type=float, default=20.0, help="stop peft's merge past this RSS")
    parser.add_argument("--no-peft", action="store_true", help="leave peft's merge out (known not to fit)")
    args = parser.parse_args()
    layers = args.layers or SHAPES[args.shape]["layers"]
    tokenizer = SHAPES[args.shape]["tokenizer"]
    base, run_dir, out = args.work / "base", args.work / "run", args.work / "out"
    out.mkdir(parents=True, exist_ok=True)
    here = "from pathlib import Path; from benchmarks.export_dense import build_checkpoint, build_run; "
    export = "from mistral_fast.export import export_gguf, export_merged_gguf, merge_adapter; "
    shape = repr(args.shape)
    rows = [timed("build checkpoint", python(here + f"build_checkpoint({shape}, Path({str(base)!r}), {layers})"))]
    rows.append(timed("build adapter", python(
        here + f"build_run({shape}, Path({str(run_dir)!r}), Path({str(base)!r}), {layers})")))  # fmt: skip
    sizes: dict[str, float] = {"checkpoint_gb": sum(f.stat().st_size for f in base.glob("*.safetensors")) / 1e9}
    digests: dict[str, dict[str, str]] = {}

    def gguf_stage(stage: str, argv: list[str], path: Path, env: dict[str, str] | None = None) -> None:
        rows.append(timed(stage, argv, env))
        sizes[stage] = path.stat().st_size / 1e9
        digests[stage] = tensor_digests(path)
        path.unlink()

    one_pass = out / "one-pass-q8_0.gguf"
    gguf_stage(ONE_PASS, python(export + f"export_merged_gguf({str(run_dir)!r}, {str(one_pass)!r}, 'q8_0')"), one_pass)
    merged = args.work / "peft-merged"
    if args.no_peft:
        peft = {"stage": PEFT, "stopped": "left out (--no-peft)"}
    else:
        peft = timed_with_limit(PEFT, python(PEFT_MERGE.format(
            base=str(base), adapter=str(run_dir / "adapter"), out=str(merged))), args.peft_limit_gib)  # fmt: skip
        rows.append(peft)
    merge_stage = peft
    if "stopped" in peft:
        shutil.rmtree(merged, ignore_errors=True)
        merged = args.work / "ours-merged"
        merge_stage = timed("ours: merge_adapter (16-bit safetensors, the converters' input)", python(
            export + f"merge_adapter({str(run_dir)!r}, {str(merged)!r})"))  # fmt: skip
        rows.append(merge_stage)
    else:
        add_tokenizer(merged, tokenizer)
    shutil.rmtree(base)  # every stage left reads the merged checkpoint (and disk is short at 12B)
    identical = {}
    for qtype in args.qtypes:
        theirs, ours = out / f"converter-{qtype}.gguf", out / f"ours-{qtype}.gguf"
        argv, env = converter(args.llama_cpp, merged, theirs, qtype)
        gguf_stage(f"llama.cpp convert_hf_to_gguf {qtype}", argv, theirs, env)
        gguf_stage(f"ours (b): export_gguf {qtype}", python(
            export + f"export_gguf({str(merged)!r}, {str(ours)!r}, {qtype!r})"), ours)  # fmt: skip
        identical[f"ours (b) {qtype}"] = same_tensors(digests[f"ours (b): export_gguf {qtype}"],
                                                      digests[f"llama.cpp convert_hf_to_gguf {qtype}"])  # fmt: skip
        if qtype == "q8_0" and "stopped" in peft:
            identical["ours (a) q8_0"] = same_tensors(digests[ONE_PASS], digests["llama.cpp convert_hf_to_gguf q8_0"])
        print(json.dumps({"tensor data identical to the converter's": identical}), flush=True)
    shutil.rmtree(merged)
    by = {r["stage"]: r for r in rows}
    ours_a = by[ONE_PASS]
    targets: dict[str, object] = {"a_peak_rss_gib (<= 2)": ours_a["peak_rss_gib"]}
    if "q8_0" in args.qtypes:
        reference = merge_stage["seconds"] + by["llama.cpp convert_hf_to_gguf q8_0"]["seconds"]
        label = "peft merge + converter q8_0" if merge_stage is peft else "ours merge_adapter + converter q8_0"
        targets[f"a_time_ratio vs {label} (<= 0.6)"] = round(ours_a["seconds"] / reference, 3)
    for q in args.qtypes:
        conv, ours_b = by[f"llama.cpp convert_hf_to_gguf {q}"], by[f"ours (b): export_gguf {q}"]
        targets[f"b_{q}_time_ratio (<= 1.0)"] = round(ours_b["seconds"] / conv["seconds"], 3)
        targets[f"b_{q}_rss_ratio (<= 1.1)"] = round(ours_b["peak_rss_gib"] / conv["peak_rss_gib"], 3)
    summary = {"shape": args.shape, "layers": layers, "stages": rows}
    summary |= {"sizes_gb": {k: round(v, 2) for k, v in sizes.items()}, "identical tensor data": identical}
    print(json.dumps(summary | {"targets": targets}, indent=1))


if __name__ == "__main__":
    main()
