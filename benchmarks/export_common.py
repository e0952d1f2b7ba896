"""What the export benchmarks share: random checkpoints written shard by shard, LoRA adapters and run
directories, stages timed in their own processes, and GGUF tensor comparisons.

Each stage runs in a process of its own under ``/usr/bin/time -v`` so that its peak RSS is its own;
`timed_with_limit` also stops a stage that grows past a memory limit (a reference that cannot fit
this machine is recorded as such instead of taking the machine down).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

Shapes = dict[str, tuple[int, ...]]
PEFT_MERGE = """
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({base!r}, dtype=torch.bfloat16)
merged = PeftModel.from_pretrained(model, {adapter!r}).merge_and_unload()
merged.save_pretrained({out!r})
"""


def attention_shapes(prefix: str, config: dict) -> Shapes:
    """A decoder layer's norms and attention projections (head_dim may differ from hidden / heads, as in Nemo)."""
    h, q = config["hidden_size"], config["num_attention_heads"] * config["head_dim"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    return {
        f"{prefix}.input_layernorm.weight": (h,),
        f"{prefix}.post_attention_layernorm.weight": (h,),
        f"{prefix}.self_attn.q_proj.weight": (q, h),
        f"{prefix}.self_attn.k_proj.weight": (kv, h),
        f"{prefix}.self_attn.v_proj.weight": (kv, h),
        f"{prefix}.self_attn.o_proj.weight": (h, q),
    }


def write_checkpoint(out: Path, config: dict, layer_shapes: Callable[[int], Shapes], layers: int) -> None:
    """A random bf16 checkpoint: one safetensors shard per layer (+ embeddings, + head), each generated and
    written alone, so that building it never holds more than one layer; ``config.json`` from ``config``."""
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    h, v = config["hidden_size"], config["vocab_size"]
    groups = [{"model.embed_tokens.weight": (v, h)}] + [layer_shapes(n) for n in range(layers)]
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
    config = config | {"num_hidden_layers": layers, "dtype": "bfloat16", "tie_word_embeddings": False}
    config |= {"hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "sliding_window": None}
    (out / "config.json").write_text(json.dumps(config, indent=2))


def lora_pairs(shapes: Iterable[tuple[str, tuple[int, ...]]], rank: int, seed: int = 1):
    """(module key, A, B) for each weight matrix: random A and non-zero B, so every merge changes every weight."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    for name, shape in shapes:
        a = torch.randn(rank, shape[1], generator=gen) * 0.01
        b = torch.randn(shape[0], rank, generator=gen) * 0.01
        yield "base_model.model." + name.removesuffix(".weight"), a, b


def write_adapter(folder: Path, tensors: dict, rank: int, targets: list[str], base: Path) -> None:
    """A peft LoRA adapter folder (alpha = 2 x rank)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": targets}
    (folder / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": str(base)}))


def write_run(run_dir: Path, base: Path, tokenizer: str) -> None:
    """What training leaves beside ``adapter/``: run_config.yaml, result.json, the tokenizer."""
    from mistral_fast.config import load_config
    from mistral_fast.tokenizer import load_tokenizer

    load_tokenizer(tokenizer).save_pretrained(run_dir / "adapter")
    overrides = [f"model.name_or_path={base}", f"model.tokenizer={tokenizer}", "model.compute_dtype=bfloat16"]
    load_config(None, [*overrides, f"train.output_dir={run_dir}"]).save(run_dir / "run_config.yaml")
    (run_dir / "result.json").write_text(json.dumps({"train": {"extra": {"compute_dtype": "bfloat16"}}}))


def add_tokenizer(model_dir: Path, tokenizer: str) -> None:
    """The tokenizer files both GGUF writers read (SentencePiece versions also need ``tokenizer.model``)."""
    from mistral_fast.tokenizer import load_tokenizer, sentencepiece_path

    load_tokenizer(tokenizer).save_pretrained(model_dir)
    if "tekken" not in tokenizer:
        shutil.copyfile(sentencepiece_path(tokenizer), model_dir / "tokenizer.model")


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


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


def timed_with_limit(stage: str, argv: list[str], limit_gib: float) -> dict[str, float | str]:
    """`timed`, but the stage is stopped once its RSS passes ``limit_gib``: recorded as not fitting.

    Polled every 0.2 s from /proc (the stage's own RSS: anonymous + mapped file pages it touched). Its
    stderr goes to a file, not a pipe: a pipe nobody reads while polling would block a chatty stage.
    """
    start = time.perf_counter()
    peak, stopped = 0, False
    with tempfile.TemporaryFile("w+") as errors:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=errors, text=True)
        while proc.poll() is None and not stopped:
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text()
                peak = max(peak, int(re.search(r"VmRSS:\s+(\d+) kB", status)[1]) << 10)
            except (OSError, TypeError):
                pass
            stopped = peak > limit_gib * 2**30
            if stopped:
                proc.kill()
            time.sleep(0.2)
        proc.wait()
        if proc.returncode and not stopped:
            errors.seek(0)
            raise SystemExit(f"{stage} failed:\n{errors.read()[-3000:]}")
    row = {"stage": stage, "seconds": round(time.perf_counter() - start, 1), "peak_rss_gib": round(peak / 2**30, 2)}
    if stopped:
        row["stopped"] = f"RSS passed {limit_gib} GiB before the stage finished: does not fit this machine"
    print(json.dumps(row), flush=True)
    return row


def tensor_digests(path: Path) -> dict[str, str]:
    """Name -> "type:sha256 of the bytes" of every tensor of a GGUF (read memory-mapped, a tensor at a time),
    so that a large GGUF can be compared after it has been deleted."""
    import gguf

    return {
        t.name: f"{t.tensor_type.name}:{hashlib.sha256(t.data.tobytes()).hexdigest()}"
        for t in gguf.GGUFReader(path).tensors
    }


def same_tensors(ours: dict[str, str], theirs: dict[str, str]) -> str:
    """How many of the reference's tensors ours holds with the same name, type and bytes ("n/n").

    The metadata differs by design (our chat template, general.name); the weights llama.cpp computes
    with must not.
    """
    same = sum(ours.get(name) == digest for name, digest in theirs.items())
    for name in sorted(n for n, d in theirs.items() if ours.get(n) != d)[:10]:
        print(f"differs: {name}", file=sys.stderr)
    return f"{same}/{len(theirs)}" + ("" if len(ours) == len(theirs) else f" (ours has {len(ours)} tensors)")


def converter(llama_cpp: Path, model_dir: Path, out: Path, qtype: str) -> tuple[list[str], dict[str, str]]:
    """llama.cpp's ``convert_hf_to_gguf.py`` command line and environment (its own gguf-py, not ours)."""
    argv = [sys.executable, str(llama_cpp / "convert_hf_to_gguf.py"), str(model_dir), "--outfile", str(out)]
    return [*argv, "--outtype", qtype], {"PYTHONPATH": str(llama_cpp / "gguf-py"), "NO_LOCAL_GGUF": ""}
