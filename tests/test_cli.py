"""The CLI: light start (no torch), one-line errors with exit code 2, tracebacks only with --debug."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mistral_fast.cli import main


def run_py(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout


@pytest.mark.parametrize(
    "statement",
    [
        "import mistral_fast",
        "from mistral_fast.cli import build_parser; build_parser().format_help()",
        "import mistral_fast.config",
    ],
)
def test_light_imports_do_not_import_torch(statement) -> None:
    heavy = {"torch", "transformers", "trl", "peft", "bitsandbytes", "datasets", "unsloth"}
    out = run_py(f"import sys, json; {statement}; print(json.dumps(sorted(set(sys.modules) & {heavy!r})))")
    assert json.loads(out) == []


def test_help_lists_the_subcommands() -> None:
    proc = subprocess.run([sys.executable, "-m", "mistral_fast.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "train" in proc.stdout and "prepare" in proc.stdout


def test_config_prints_resolved_yaml(capsys) -> None:
    assert main(["config", "smoke", "--set", "lora.rank=32"]) == 0
    out = capsys.readouterr().out
    assert "rank: 32" in out and "name_or_path: tiny" in out
    assert main(["config", "--list"]) == 0
    assert "smoke" in capsys.readouterr().out.split()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["config", "smoke", "--set", "lora.rank=0"], "lora.rank=0 is invalid"),
        (["config", "nope.yaml"], "config 'nope.yaml' not found"),
        (["prepare", "--set", "data.path=/no/such.jsonl"], "no such file"),
        (["train", "--set", "model.name_or_path=/no/such/model", "--set", "data.max_examples=4"], "model.name_or_path"),
    ],
)
def test_user_errors_are_one_line_with_exit_code_2(argv, message) -> None:
    proc = subprocess.run([sys.executable, "-m", "mistral_fast.cli", *argv], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()  # progress logs may come first; the error is one last line
    assert [x for x in lines if x.startswith("error: ")] == [lines[-1]] and message in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr


def test_debug_shows_the_traceback() -> None:
    argv = ["--debug", "config", "smoke", "--set", "lora.rank=0"]
    proc = subprocess.run([sys.executable, "-m", "mistral_fast.cli", *argv], capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr
