"""Data preparation at scale: ours (cached, parallel `prepare_data`) vs TRL's, wall time and peak memory.

Writes N generated conversations (1–2 exchanges of random words, about 100 tokens each with the v3
template) to a JSON-lines file, then runs, each in its own process under ``/usr/bin/time -v``:

* ``ours``: `mistral_fast.dataset.prepare_data` (read, validate, template, tokenise, mask, split, save to
  a fresh ``$MISTRAL_FAST_CACHE``) with ``data.num_proc`` 1 and 2, then the same again (the cache hit);
* ``trl``: TRL's own preparation, `SFTTrainer._prepare_dataset` with ``assistant_only_loss=True`` and
  ``dataset_num_proc`` 1 and 2 on ``datasets.load_dataset("json", ...)`` of the same file (a fresh
  ``HF_DATASETS_CACHE`` each time, so nothing is served from an earlier run), with our tokenizer.

Memory: ``/usr/bin/time``'s "maximum resident set size" is that of the largest single process (with
``num_proc`` 2, the workers are processes of their own), so each run also samples, every 0.2 s, the
proportional resident memory (PSS: a page shared by the forked workers counted once) of itself plus
its children from ``/proc/PID/smaps_rollup``: in all (anonymous + file-backed) and
anonymous only. File-backed pages are the memory-mapped Arrow files: page cache the kernel drops when
memory is short, counted in RSS while mapped. Anonymous memory is what must fit.

Usage (from the repository root; OMP_NUM_THREADS=1 as elsewhere):

    PYTHONPATH=$PWD .venv/bin/python benchmarks/data_prep_scale.py --sizes 100000 1000000 --num-proc 1 2

prints one JSON line per run and a Markdown table at the end; the figures go into benchmarks/README.md.
Also: ``--check 2000`` first verifies on 2,000 conversations that ours and TRL's ids and trained positions
are identical.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

_TEXT = (
    "the of and to in is it you that was for on are with as his they be at one have this from or had by hot word "
    "but what some we can out other were all there when up use your how said an each she which do their time if "
    "will way about many then them write would like so these her long make thing see him two has look more day "
    "could go come did number sound no most people my over know water than call first who may down side been now "
    "find any new work part take get place made live where after back little only round man year came show every "
    "good me give our under name very through just form sentence great think say help low line differ turn cause "
    "much mean before move right boy old too same tell does set three want air well also play small end put home "
    "read hand port large spell add even land here must big high such follow act why ask men change went light"
)
WORDS = _TEXT.split()


def generate(n: int, path: Path, seed: int = 0) -> None:
    """Write ``n`` conversations (about 100 tokens each with the v3 template), a line each."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as handle:
        for _ in range(n):
            messages = []
            for _ in range(rng.choice((1, 1, 2))):
                messages.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(10, 25)))})
                words = rng.randint(25, 75)
                messages.append({"role": "assistant", "content": " ".join(rng.choices(WORDS, k=words)).capitalize()})
            handle.write(json.dumps({"messages": messages}) + "\n")


def _tree_rss() -> tuple[int, int]:
    """(all, anonymous) proportional resident bytes (PSS) of this process and its descendants, from
    /proc/PID/smaps_rollup: pages shared between the forked workers are counted once, not per process."""
    import psutil

    total = anon = 0
    me = psutil.Process()
    for proc in [me, *me.children(recursive=True)]:
        try:
            rollup = Path(f"/proc/{proc.pid}/smaps_rollup").read_text()
        except OSError:
            continue
        fields = dict(re.findall(r"^(\w+):\s+(\d+) kB", rollup, re.M))
        total += int(fields.get("Pss", 0)) * 1024
        anon += int(fields.get("Pss_Anon", 0)) * 1024
    return total, anon


class Sampler(threading.Thread):
    """Peak resident memory of the process tree, sampled every 0.2 s."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_total = self.peak_anon = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.2):
            total, anon = _tree_rss()
            self.peak_total, self.peak_anon = max(self.peak_total, total), max(self.peak_anon, anon)


def run_ours(data: Path, num_proc: int) -> dict:
    """One `prepare_data` call (the process's whole job), as the CLI's `prepare` runs it."""
    from mistral_fast.config import load_config
    from mistral_fast.dataset import prepare_data

    cfg = load_config(
        None, [f"data.path={data}", "data.eval_fraction=0", "model.max_seq_length=1024", f"data.num_proc={num_proc}"]
    )
    start = time.perf_counter()
    prepared = prepare_data(cfg)
    return {
        "seconds": time.perf_counter() - start,
        "examples": len(prepared.train),
        "tokens": prepared.stats["train_tokens"],
        "cache": prepared.cache.split(":")[0].split(" in ")[0],
    }


def _trl_trainer(num_proc: int, out: Path):
    import datasets
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from mistral_fast.modeling import resolve_model_path
    from mistral_fast.tokenizer import load_tokenizer

    tok = load_tokenizer("v3")
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny"))
    sft = SFTConfig(
        output_dir=str(out),
        assistant_only_loss=True,
        max_length=1024,
        report_to="none",
        use_cpu=True,
        dataset_num_proc=num_proc if num_proc > 1 else None,
    )
    tiny = datasets.Dataset.from_list(
        [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}]
    )
    trainer = SFTTrainer(model=model, args=sft, train_dataset=tiny, processing_class=tok)
    return trainer, tok, sft


def run_trl(data: Path, num_proc: int) -> dict:
    """TRL's preparation of the same file: `load_dataset("json")` + `SFTTrainer._prepare_dataset`."""
    import datasets

    trainer, tok, sft = _trl_trainer(num_proc, Path(tempfile.mkdtemp()))
    start = time.perf_counter()
    rows = datasets.load_dataset("json", data_files=str(data), split="train")
    prepared = trainer._prepare_dataset(rows, tok, sft, packing=False, formatting_func=None, dataset_name="bench")
    return {"seconds": time.perf_counter() - start, "examples": len(prepared)}


def check(n: int, work: Path) -> dict:
    """Ours and TRL's give the same ids and trained positions on ``n`` generated conversations."""
    import datasets

    from mistral_fast.config import load_config
    from mistral_fast.dataset import prepare_data

    data = work / f"check-{n}.jsonl"
    generate(n, data, seed=1)
    trainer, tok, sft = _trl_trainer(1, work / "trl")
    rows = datasets.load_dataset("json", data_files=str(data), split="train")
    theirs = trainer._prepare_dataset(rows, tok, sft, packing=False, formatting_func=None, dataset_name="check")
    cfg = load_config(
        None, [f"data.path={data}", "data.eval_fraction=0", "model.max_seq_length=1024", "data.num_proc=2"]
    )
    ours = prepare_data(cfg, tok)
    same = 0
    by_ids = {tuple(r["input_ids"]): r["labels"] for r in ours.train}  # eval_fraction=0: the split only shuffles
    for row in theirs:
        if "labels" in row:
            expected = row["labels"]
        else:  # TRL keeps the mask and applies it in its collator
            expected = [t if m else -100 for t, m in zip(row["input_ids"], row["assistant_masks"], strict=True)]
        same += by_ids.get(tuple(row["input_ids"])) == expected
    return {"check": f"{same}/{n} identical ids and trained positions"}


def child(args: argparse.Namespace) -> None:
    sampler = Sampler()
    sampler.start()
    result = run_ours(args.data, args.num_proc[0]) if args.which == "ours" else run_trl(args.data, args.num_proc[0])
    sampler.stop.set()
    sampler.join()
    total, anon = _tree_rss()
    result |= {
        "tree_peak_rss_mib": max(sampler.peak_total, total) >> 20,
        "tree_peak_anon_mib": max(sampler.peak_anon, anon) >> 20,
    }
    print("RESULT " + json.dumps(result), flush=True)


def timed(which: str, data: Path, num_proc: int, env: dict[str, str]) -> dict:
    """Run one preparation in its own process under /usr/bin/time -v."""
    cmd = ["/usr/bin/time", "-v", sys.executable, __file__, "--child", which, "--data", str(data)]
    cmd += ["--num-proc", str(num_proc)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{which} failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.split("RESULT ", 1)[1].splitlines()[0])
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", done.stderr).group(1)
    seconds = sum(float(part) * 60**i for i, part in enumerate(reversed(wall.split(":"))))
    rss_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    # CPU seconds of the process and its workers: steadier than wall time on a shared machine
    cpu = sum(float(re.search(rf"{kind} time \(seconds\): (\S+)", done.stderr).group(1)) for kind in ("User", "System"))
    return result | {
        "wall_s": round(seconds, 1),
        "time_max_rss_mib": rss_kib >> 10,
        "cpu_s": round(cpu, 1),
        "seconds": round(result["seconds"], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000])
    parser.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--which", nargs="+", default=["ours", "trl"])
    parser.add_argument("--work", type=Path, default=None, help="folder for the data and caches (default: a temp dir)")
    parser.add_argument("--check", type=int, default=0, help="first check ids/labels against TRL on N conversations")
    parser.add_argument("--child", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.which = args.child
        child(args)
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="data-prep-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.check:
        print(json.dumps(check(args.check, work)), flush=True)
    rows = []
    for n in args.sizes:
        data = work / f"chat-{n}.jsonl"
        if not data.exists():
            start = time.perf_counter()
            generate(n, data)
            size = data.stat().st_size >> 20
            print(f"# generated {n} conversations ({size} MiB) in {time.perf_counter() - start:.0f} s", flush=True)
        for num_proc in args.num_proc:
            for which in args.which:
                env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
                env["HF_DATASETS_CACHE"] = tempfile.mkdtemp(dir=work, prefix="hf-")
                env["MISTRAL_FAST_CACHE"] = tempfile.mkdtemp(dir=work, prefix="mf-")
                runs = [which, which] if which == "ours" else [which]  # ours: cold, then the cache hit
                for i, name in enumerate(runs):
                    result = timed(name, data, num_proc, env)
                    label = f"{name} (cached)" if i else name
                    row = {"conversations": n, "num_proc": num_proc, "run": label} | result
                    print(json.dumps(row), flush=True)
                    rows.append(row)
                subprocess.run(["rm", "-rf", env["HF_DATASETS_CACHE"], env["MISTRAL_FAST_CACHE"]], check=False)
    print(
        "\n| conversations | tokens | num_proc | run | wall (process) | CPU (process + workers) | in the call | "
        "peak RSS: /usr/bin/time | "
        "peak PSS, all processes | of it anonymous |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['conversations']:,} | {r.get('tokens', '')} | {r['num_proc']} | {r['run']} | {r['wall_s']} s | "
            f"{r['cpu_s']} s | {r['seconds']} s | {r['time_max_rss_mib']} MiB | {r['tree_peak_rss_mib']} MiB | "
            f"{r['tree_peak_anon_mib']} MiB |"
        )


if __name__ == "__main__":
    main()
