"""`mistral-fast …`: a table of subcommands, each a thin wrapper over the package.

Errors a user can act on (`MistralFastError`) print as one line on stderr with exit code 2; the
traceback only comes with `--debug`. Heavy libraries are imported inside the handlers, so `--help`
starts without torch.
"""

from __future__ import annotations

import argparse
import json
import logging
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
    from mistral_fast.pipeline import prepare_data, tokenizer_for
    from mistral_fast.tokenizer import preview_example

    cfg = _config(args)
    tokenizer = tokenizer_for(cfg)
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
    from mistral_fast.pipeline import run

    cfg = _config(args)
    if args.resume:
        cfg = cfg.with_overrides({"train.resume": True})
    print(run(cfg).summary())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The README demo: the smoke preset (tiny local Mistral, sample data), showing the loss fall."""
    from mistral_fast.pipeline import run

    cfg = _config(argparse.Namespace(config="smoke", set=args.set))
    result = run(cfg)
    print(result.summary())
    print(f"loss curve: {cfg.train.output_dir}/loss_curve.png; metrics: {cfg.train.output_dir}/metrics.jsonl")
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
        "train the tiny local Mistral on the sample data (offline, a few minutes on a CPU)",
        lambda p: p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a field"),
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
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
