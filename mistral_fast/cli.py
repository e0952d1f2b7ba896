"""`mistral-fast …`: a table of subcommands, each a thin wrapper over the package.

Errors a user can act on (`MistralFastError`) print as one line on stderr with exit code 2; the
traceback only comes with `--debug`. Heavy libraries are imported inside the handlers, so `--help`
starts without torch.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence

from mistral_fast.errors import MistralFastError


def _config(args: argparse.Namespace):
    from mistral_fast.config import load_config

    return load_config(args.config, args.set or None)


def cmd_config(args: argparse.Namespace) -> int:
    """Print the resolved config as YAML, or the list of presets."""
    import yaml

    from mistral_fast.config import list_presets

    if args.list:
        print("\n".join(list_presets()))
        return 0
    print(yaml.safe_dump(_config(args).to_dict(), sort_keys=False, allow_unicode=True), end="")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    """Load, validate, split and tokenise the data; print a summary and one example with its mask."""
    from mistral_fast.dataset import prepare_data
    from mistral_fast.tokenizer import preview_example, tokenizer_for

    cfg = _config(args)
    tokenizer = tokenizer_for(cfg.model)
    if cfg.train.method == "grpo":  # prompts and the columns their rewards read
        from mistral_fast.grpo import prepare_prompts, preview_prompt
        from mistral_fast.rewards import resolve_rewards

        t = cfg.train
        rewards = resolve_rewards(t.rewards, tolerance=t.reward_tolerance, pattern=t.reward_pattern)
        prompts = prepare_prompts(cfg, rewards, tokenizer)
        print(prompts.summary() + "\n\nprompt 0:\n" + preview_prompt(tokenizer, prompts.train[0]))
        if args.json:
            print(json.dumps(prompts.stats))
        return 0
    if cfg.train.method != "sft":  # dpo/orpo: preference pairs
        from mistral_fast.preference import prepare_preferences, preview_pair

        pairs = prepare_preferences(cfg, tokenizer)
        print(pairs.summary() + "\n\npair 0 (scored tokens between ⟦ ⟧):\n" + preview_pair(tokenizer, pairs.train[0]))
        if args.json:
            print(json.dumps(pairs.stats))
        return 0
    prepared = prepare_data(cfg, tokenizer)
    print(prepared.summary())
    row = prepared.train[0]
    print("\nexample 0 (trained tokens between ⟦ ⟧):")
    print(preview_example(tokenizer, row["input_ids"], row["labels"]))
    if args.json:
        print(json.dumps(prepared.stats))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Fine-tune: the whole pipeline for a config file or preset, with overrides."""
    from mistral_fast.distributed import is_main_process
    from mistral_fast.pipeline import run

    cfg = _config(args)
    if args.resume:
        cfg = cfg.with_overrides({"train.resume": True})
    args.writing = f"train.output_dir={cfg.train.output_dir}"  # named if the disk fills up
    result = run(cfg)
    if is_main_process():  # one summary, not one per rank
        print(result.summary())
    return 0


# The demo: short reviews labelled positive/negative (data/sample_sentiment.jsonl), a task the tiny
# random-weight Mistral learns with LoRA in about a minute on 2 cores and whose held-out answers the base
# never gets right (README, "Figures"). A learning rate far above the 7B recipe's 2e-4 suits a random
# 128-wide model; every held-out review is answered (eval_fraction 0.1 of 300), greedy, a few tokens.
# --set overrides win.
DEMO_DATA = "sample_sentiment.jsonl"  # in the shipped data/ (a checkout's, or the installed copy)
DEMO_OVERRIDES: dict[str, object] = {
    "lora.rank": 8,
    "lora.alpha": 16,
    "train.learning_rate": 3e-3,
    "train.max_steps": 150,
    "eval.num_samples": 30,
    "eval.max_new_tokens": 8,
}


def cmd_demo(args: argparse.Namespace) -> int:
    """The README demo: notebooks/01_finetune.ipynb headless with smoke=True on the sentiment sample data."""
    from mistral_fast.resources import resource_path
    from mistral_fast.runner import run_notebook

    overrides = {**DEMO_OVERRIDES, "data.path": str(resource_path("data", DEMO_DATA))}
    overrides.update(_split_set(item) for item in args.set or [])
    params = {"smoke": True, "train_output_dir": args.out, "overrides": overrides}
    done = run_notebook("01_finetune", params, output=f"{args.out}/01_finetune.ipynb", timeout=args.timeout)
    print(_notebook_summary(done))
    if done.results:
        print(demo_report(done.results["run"]["evaluation"]))
    print(f"loss curve: {args.out}/loss_curve.png; metrics: {args.out}/metrics.jsonl")
    return 0


def demo_report(evaluation: dict, rows: int = 8) -> str:
    """Base vs tuned on held-out prompts: exact match of each, then a few answers side by side."""
    samples = evaluation.get("samples", [])
    base = (evaluation.get("base") or {}).get("exact_match")
    lines = [
        f"held-out exact match over {len(samples)} prompts: base {base or 0:.2f} -> tuned "
        f"{evaluation.get('exact_match') or 0:.2f}",
        f"{'prompt (last line)':<44} {'reference':<10} {'base':<24} tuned",
    ]
    for sample in samples[:rows]:
        prompt = sample["prompt"][-1]["content"].splitlines()[-1][:43]
        base_answer = repr(sample.get("base", ""))[:23]
        lines.append(f"{prompt:<44} {sample['reference']:<10} {base_answer:<24} {sample['tuned']!r}")
    return "\n".join(lines)


def _split_set(item: str) -> tuple[str, object]:
    import yaml

    from mistral_fast.errors import ConfigError

    key, sep, raw = item.partition("=")
    if not sep:
        raise ConfigError(f"--set {item!r} is not key=value (e.g. --set train.max_steps=10)")
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def _notebook_summary(done) -> str:
    lines = [f"output notebook: {done.output_notebook} ({done.seconds:.0f} s)"]
    lines.append(f"results: {done.results_path}" if done.results_path else "results: none written")
    return "\n".join(lines)


def _read_params(args: argparse.Namespace) -> dict[str, object]:
    """Parameters from -f params.yaml, then -p key value pairs (values parsed as YAML scalars)."""
    import yaml

    from mistral_fast.errors import ConfigError

    params: dict[str, object] = {}
    if args.file:
        try:
            with open(args.file, encoding="utf-8") as handle:
                loaded = yaml.safe_load(handle) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"-f {args.file}: cannot read parameters ({err})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"-f {args.file}: must be a mapping of parameter names to values")
        params.update(loaded)
    for key, raw in args.param or []:
        params[key] = yaml.safe_load(raw) if raw.strip() else ""
    return params


def cmd_notebook(args: argparse.Namespace) -> int:
    """Execute a notebook headless with papermill (parameters checked first), or copy them all out for editing."""
    from pathlib import Path

    from mistral_fast.runner import copy_notebooks, resolve_notebook, run_notebook

    if args.action == "copy":
        written = copy_notebooks(args.notebook, overwrite=args.force)
        print("\n".join(str(p) for p in written))
        print(f"run one with: mistral-fast notebook run {Path(args.notebook) / '01_finetune.ipynb'} -p smoke true")
        return 0
    path = resolve_notebook(args.notebook)
    output = Path(args.out) / path.name if args.out else None
    done = run_notebook(path, _read_params(args), output=output, cwd=args.cwd, timeout=args.timeout)
    print(_notebook_summary(done))
    if args.json and done.results is not None:
        print(json.dumps(done.results))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """Run a notebook once per variation of a sweep file; write the results table and plot."""
    from mistral_fast.runner import run_sweep

    executor = "ray" if args.ray is not None else "local"
    rows, paths = run_sweep(args.sweep, out=args.out, executor=executor, jobs=args.jobs, address=args.ray or None)
    failed = [r["name"] for r in rows if r["status"] != "done"]
    print(paths["markdown"].read_text(encoding="utf-8"), end="")
    print("\n".join(f"{kind}: {path}" for kind, path in paths.items()))
    if failed:
        print(f"{len(failed)} of {len(rows)} variations failed (re-run to retry them): {', '.join(failed)}")
    return 1 if failed else 0


def cmd_memory(args: argparse.Namespace) -> int:
    """Estimate memory for a config: breakdown, fit, suggestion; full FT vs LoRA vs QLoRA side by side."""
    from mistral_fast.memory import memory_report

    print(memory_report(_config(args), gpu=args.gpu, world_size=args.world_size))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export a finished run: merged 16-bit safetensors, GGUF files + Modelfiles, equivalence report."""
    import json

    from mistral_fast.export import export_run

    gguf = [t for group in args.gguf for t in group.split(",")] if args.gguf else None
    written = export_run(
        args.run_dir,
        merged=args.merged or None,
        gguf=gguf,
        merge_base=args.base,
        report=not args.no_report,
        original_checkpoint=args.original_checkpoint,
        adapter_gguf=args.adapter_gguf,
    )
    print(json.dumps(written, indent=2, default=str))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Re-check a run directory against its manifest.json: every listed file present with its sha256."""
    from mistral_fast.manifest import ManifestError, verify_run

    report = verify_run(args.run_dir)
    for kind in ("missing", "changed"):
        for rel in report[kind]:
            print(f"{kind}: {rel}")
    if args.verbose:
        print("\n".join(f"ok: {rel}" for rel in report["ok"]))
    for rel in report["untracked"]:
        print(f"untracked (not in the manifest): {rel}")
    print(f"training data: {report['data'][0]}")
    bad = len(report["missing"]) + len(report["changed"])
    if bad:
        raise ManifestError(
            f"{args.run_dir}: {len(report['missing'])} missing, {len(report['changed'])} changed of "
            f"{bad + len(report['ok'])} files in manifest.json — restore them or re-run"
        )
    print(f"{args.run_dir}: all {len(report['ok'])} files match manifest.json")
    return 0


def _with_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML file or preset name (see `mistral-fast config --list`)")
    parser.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a field, e.g. --set lora.rank=32 (repeatable)",
    )


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str, Callable[[argparse.ArgumentParser], None]]] = {
    "config": (
        cmd_config,
        "show the resolved run config (or --list presets)",
        lambda p: (_with_config(p), p.add_argument("--list", action="store_true", help="list presets")),
    ),
    "prepare": (
        cmd_prepare,
        "validate and tokenise the data; show a summary and a masked example",
        lambda p: (_with_config(p), p.add_argument("--json", action="store_true", help="also print stats")),
    ),
    "train": (
        cmd_train,
        "fine-tune with QLoRA: data, 4-bit model + LoRA, SFTTrainer, run directory",
        lambda p: (
            _with_config(p),
            p.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint"),
        ),
    ),
    "demo": (
        cmd_demo,
        "run notebooks/01_finetune.ipynb headless: the tiny local Mistral learns review sentiment (offline, CPU)",
        lambda p: (
            p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field"),
            p.add_argument("--out", default="runs/demo", help="run directory (also holds the output notebook)"),
            p.add_argument("--timeout", type=int, default=600, help="seconds any one cell may run"),
        ),
    ),
    "notebook": (
        cmd_notebook,
        "notebook run NOTEBOOK [-p key value …] [-f params.yaml]: execute a notebook headless with papermill; "
        "notebook copy DIR: copy the shipped notebooks into DIR for editing",
        lambda p: (
            p.add_argument("action", choices=["run", "copy"], help="run a notebook, or copy them all out"),
            p.add_argument(
                "notebook", help="run: a notebook path or a name from notebooks/ (e.g. 01_finetune); copy: a directory"
            ),
            p.add_argument("--force", action="store_true", help="copy: replace notebooks already in DIR"),
            p.add_argument("-p", "--param", nargs=2, action="append", metavar=("KEY", "VALUE"), help="set a parameter"),
            p.add_argument("-f", "--file", help="YAML file of parameters (-p wins)"),
            p.add_argument("--out", help="directory for the output notebook (default runs/notebooks)"),
            p.add_argument("--cwd", help="working directory of the kernel (default: the current one)"),
            p.add_argument("--timeout", type=int, default=24 * 3600, help="seconds any one cell may run"),
            p.add_argument("--json", action="store_true", help="also print the notebook's results as JSON"),
        ),
    ),
    "memory": (
        cmd_memory,
        "estimate GPU memory for a config (breakdown, fits?, suggestion; full FT vs LoRA vs QLoRA)",
        lambda p: (
            _with_config(p),
            p.add_argument("--gpu", help="t4, l4, a10, a100-40gb, a100-80gb, h100, h200 or a size in GiB"),
            p.add_argument("--world-size", type=int, default=1, help="data-parallel processes"),
        ),
    ),
    "export": (
        cmd_export,
        "export a run: merged 16-bit safetensors, GGUF (f16, bf16, q8_0, q4_k_m, …) + Ollama Modelfile, report",
        lambda p: (
            p.add_argument("run_dir", help="a run directory (holds run_config.yaml and adapter/)"),
            p.add_argument("--merged", action="store_true", help="keep the merged 16-bit model"),
            p.add_argument("--gguf", action="append", help="GGUF type(s), e.g. --gguf f16,q8_0 (repeatable)"),
            p.add_argument("--base", choices=["dequantized", "original"], help="merge base (default: config)"),
            p.add_argument("--no-report", action="store_true", help="skip the equivalence report"),
            p.add_argument(
                "--adapter-gguf",
                choices=["f16", "f32", "bf16", "q8_0"],
                help="also the LoRA adapter as a llama.cpp GGUF + its f16 base GGUF + a Modelfile with ADAPTER",
            ),
            p.add_argument(
                "--original-checkpoint",
                help="the 16-bit checkpoint for --base original when the run's base is pre-quantised (*-bnb-4bit)",
            ),
        ),
    ),
    "sweep": (
        cmd_sweep,
        "run a notebook per variation of SWEEP.yaml (grid/list); write a CSV/Markdown table and a plot",
        lambda p: (
            p.add_argument("sweep", help="sweep YAML: notebook, parameters, grid and/or variations"),
            p.add_argument("--out", help="sweep directory (default: the file's `out`, else runs/sweeps/NAME)"),
            p.add_argument("--jobs", type=int, default=1, metavar="N", help="run N variations at once on this machine"),
            p.add_argument(
                "--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                help="one Ray task per variation: on the cluster at ADDRESS (auto, ray://host:10001), or on a "
                "local one started for the command when ADDRESS is left out",
            ),
        ),
    ),
    "verify": (
        cmd_verify,
        "re-check a run directory against its manifest.json (sha256 of every file it wrote)",
        lambda p: (
            p.add_argument("run_dir", help="a run directory (holds manifest.json)"),
            p.add_argument("-v", "--verbose", action="store_true", help="also list the files that match"),
        ),
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one sub-parser per entry of `COMMANDS`."""
    parser = argparse.ArgumentParser(prog="mistral-fast", description="QLoRA fine-tuning of Mistral models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (handler, help_text, configure) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        configure(p)
        p.set_defaults(handler=handler)
    return parser


_NO_SPACE = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
_NO_SPACE_TEXT = re.compile(r"No space left on device|File too large|Disk quota exceeded|os error (28|27|122)\b")


def _no_space(err: BaseException) -> str | None:
    """The reason when `err` (or an exception it was raised from) is a full disk or a size limit, else None."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _NO_SPACE:
            return err.strerror or str(err)
        match = _NO_SPACE_TEXT.search(str(err))
        if match:
            return os.strerror(int(match.group(1))) if match.group(1) else match.group(0)
        err = err.__cause__ or err.__context__
    return None


def _close_progress_bars() -> None:
    """Close progress bars a failed step left open, so the error line stays the last line of the output.

    (Otherwise tqdm redraws them at interpreter exit, after our message.)
    """
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or []):
        with contextlib.suppress(Exception):
            bar.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `mistral-fast` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.debug:  # our debug logs only; other libraries' DEBUG output (fonts, HTTP) is noise here
        logging.getLogger("mistral_fast").setLevel(logging.DEBUG)
    try:
        return args.handler(args)
    except MistralFastError as err:
        if args.debug:
            raise
        _close_progress_bars()
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        reason = None if args.debug else _no_space(err)
        if reason is None:
            raise
        # a full disk (ENOSPC), a quota (EDQUOT) or a file-size limit (EFBIG): the user can act on it. Libraries
        # wrap it (tokenizers: "File too large (os error 27)", torch: RuntimeError), so the chain is searched.
        _close_progress_bars()
        where = getattr(err, "filename", None) or getattr(args, "writing", None) or "the output directory"
        print(f"error: writing {where}: {reason} — free space there (or raise the limit) and rerun", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
