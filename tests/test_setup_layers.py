"""scripts/setup.sh installs in layers (issue 26): the demo's packages by default, the test suite's with --test.

The script runs for real, in a copy of the repository whose ``.venv/bin/python`` is a stand-in that records
each command instead of running pip (the real install takes minutes; its timing is in benchmarks/README.md).
What each layer may install is read from pyproject.toml's extras, not from the script.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
EXTRAS = PYPROJECT["project"]["optional-dependencies"]
# the stand-in: `-c CODE` fails (torch is not installed yet, as in a fresh .venv), anything else is logged
FAKE_PYTHON = '#!/bin/sh\nif [ "$1" = -c ]; then exit 1; fi\necho "$*" >> "$SETUP_LOG"\n'


def _names(requirements: list[str]) -> set[str]:
    """Distribution names of requirement strings (``llama-cpp-python>=0.3`` → ``llama-cpp-python``)."""
    import re

    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A copy of what setup.sh reads, with a recording .venv/bin/python and apt-get."""
    for name in ("scripts/setup.sh", "pyproject.toml", "requirements-ci.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    for tool in (".venv/bin/python", "bin/apt-get"):
        (tmp_path / tool).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / tool).write_text(FAKE_PYTHON)
        (tmp_path / tool).chmod(stat.S_IRWXU)
    return tmp_path


def _setup(repo: Path, *args: str) -> list[str]:
    """Run setup.sh; the pip commands it ran since the last call (one line each; apt-get's are left out)."""
    log = repo / "commands.log"
    before = log.read_text().splitlines() if log.exists() else []
    env = {**os.environ, "SETUP_LOG": str(log), "PATH": f"{repo / 'bin'}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", "scripts/setup.sh", *args], cwd=repo, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    commands = (log.read_text().splitlines() if log.exists() else [])[len(before) :]
    return [c for c in commands if c.startswith("-m pip ")]


def _installs(commands: list[str]) -> set[str]:
    """Every word of the pip commands, lower-cased with `_` as `-` (package names and extras among them)."""
    return {w.lower().replace("_", "-") for c in commands for w in c.replace("[", " ").replace(",", " ").split()}


def test_the_demo_layer_installs_no_optional_extra_and_nothing_twice(repo: Path) -> None:
    demo = _setup(repo)
    assert demo[0].endswith(" torch==2.13.0") and "install" in demo[0], "CPU torch first"
    assert all("-c requirements-ci.txt" in c for c in demo[1:]), "exact versions as constraints"
    heavy = _names(EXTRAS["gguf"] + EXTRAS["unsloth"] + EXTRAS["dev"]) | {"gguf", "unsloth", "dev"}
    assert not heavy & _installs(demo), demo  # llama-cpp-python (a compile) and the rest: the test layer's
    assert _setup(repo) == [], "a second demo installs nothing"


def _split_build(commands: list[str]) -> tuple[list[str], list[str]]:
    """(the installs in order, the `pip wheel` builds): the llama-cpp-python build runs in the background, so
    where its line falls among the installs depends on timing."""
    builds = [c for c in commands if c.startswith("-m pip wheel")]
    return [c for c in commands if c not in builds], builds


def test_the_test_layer_adds_the_extras_once_whichever_command_ran_first(repo: Path) -> None:
    demo = _setup(repo)
    tests, builds = _split_build(_setup(repo, "--test"))
    assert tests and not set(tests) & set(demo), "--test after the demo: only the test layer"
    editable = [c.split(" -e ")[1].split()[0] for c in tests if " -e " in c]
    extras = {extra for e in editable for extra in e.strip("'\".[]").split(",")}
    assert {"dev", "gguf"} <= extras, tests  # pyproject's extras
    # llama.cpp is compiled once, as a wheel that the gguf extra's install then finds (--find-links)
    assert len(builds) == 1 and "llama-cpp-python" in builds[0].split() and "-c requirements-ci.txt" in builds[0]
    gguf = next(c for c in tests if " -e " in c and "gguf" in c)
    assert "--find-links" in gguf and builds[0].split("-w ")[1].split()[0] in gguf
    assert tests[-1].split()[-3:] == ["--no-deps", "unsloth", "unsloth_zoo"], "Unsloth last, without its deps"
    assert _setup(repo, "--test") == [] and _setup(repo) == []

    fresh = repo / "fresh"
    shutil.copytree(repo, fresh, ignore=shutil.ignore_patterns(".mistral_fast_*", "commands.log", "fresh"))
    both, fresh_builds = _split_build(_setup(fresh, "--test"))
    assert both == demo + tests and fresh_builds == builds
    assert _setup(fresh) == [], "the demo after the tests installs nothing"


def test_an_unknown_argument_is_refused(repo: Path) -> None:
    done = subprocess.run(["bash", "scripts/setup.sh", "--tests"], cwd=repo, capture_output=True, text=True)
    assert done.returncode == 2 and "usage: bash scripts/setup.sh [--test]" in done.stderr
