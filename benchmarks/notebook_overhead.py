"""What running through a notebook costs: `notebook run 01_finetune` vs `train` of the same config.

The notebook run (papermill, a fresh kernel, the notebook's cells) is timed first; the CLI then trains
the exact config the notebook resolved (its run_config.yaml), into another directory. The pair is run
`--repeat` times alternately, so that the machine's noise falls on both; the best of each is compared.
Target: notebook ≤ 1.1 × CLI + 1 s.

Usage: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/notebook_overhead.py [--repeat 2] [--steps 30]
Prints one JSON line; the figures are written down in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLI = [sys.executable, "-m", "mistral_fast.cli"]


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="nb-overhead-"))
    notebook_s, cli_s = [], []
    for i in range(args.repeat):
        nb_dir = work / f"nb{i}"
        overrides = json.dumps({"train.max_steps": args.steps})
        notebook_s.append(
            timed(
                [
                    *CLI,
                    "notebook",
                    "run",
                    "01_finetune",
                    "-p",
                    "smoke",
                    "true",
                    "-p",
                    "overrides",
                    overrides,
                    "-p",
                    "train_output_dir",
                    str(nb_dir / "run"),
                    "--out",
                    str(nb_dir),
                ]
            )
        )
        config = nb_dir / "run" / "run_config.yaml"
        cli_s.append(timed([*CLI, "train", str(config), "--set", f"train.output_dir={work / f'cli{i}'}"]))
    best_nb, best_cli = min(notebook_s), min(cli_s)
    print(
        json.dumps(
            {
                "steps": args.steps,
                "notebook_s": [round(x, 1) for x in notebook_s],
                "cli_s": [round(x, 1) for x in cli_s],
                "ratio": round(best_nb / best_cli, 3),
                "overhead_s": round(best_nb - best_cli, 1),
                "target_s": round(1.1 * best_cli + 1, 1),
                "meets_target": best_nb <= 1.1 * best_cli + 1,
            }
        )
    )


if __name__ == "__main__":
    main()
