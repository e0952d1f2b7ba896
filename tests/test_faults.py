"""Fault injection: the bad-input corpus through the CLI, a full disk, and SIGKILLs at chosen points.

Every case of ``tests/bad_inputs/cases.yaml`` runs ``python -m mistral_fast.cli …`` in a subprocess and
must end with exit code 2, one last ``error: …`` line naming what and where and what to do, no traceback,
and nothing written: not in its own working directory, not at any path it names. Kills land at
deterministic pause points (`mistral_fast.pause`), never after a sleep. The cases run concurrently (one
fixture) to keep the suite fast.
Counts and timings are in docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

BAD = Path(__file__).parent / "bad_inputs"
CASES = yaml.safe_load((BAD / "cases.yaml").read_text(encoding="utf-8"))
ROOT = Path(__file__).parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
# a tiny, quick training run: the fault tests are about what survives, not about what is learnt
QUICK = [
    "data.max_examples=16",
    "model.max_seq_length=128",
    "train.per_device_batch_size=4",
    "train.logging_steps=1",
    "train.eval_steps=2",
    "train.save_steps=2",
    "train.save_total_limit=20",
    "train.learning_rate=1e-3",
    "eval.num_samples=1",
    "eval.max_new_tokens=4",
]


def cli(*argv: str, **kwargs) -> list[str]:
    return [sys.executable, "-m", "mistral_fast.cli", *argv]


def _tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        h.update(p.relative_to(path).as_posix().encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


# Runs cases through `mistral_fast.cli.main` one after another in one process: the CLI's own argv parsing,
# exit code and stderr, without paying ~3 s of Python + torch start-up per case. A fresh logging handler
# per case sends its logs to that case's captured stderr; an exception that escapes `main` is a failure
# (its traceback is recorded as the case's stderr). The kill and full-disk tests use real subprocesses.
_BATCH = """
import contextlib, io, json, logging, os, sys, traceback
from mistral_fast.cli import main
results = {}
for name, (cwd, argv) in json.load(sys.stdin).items():
    os.chdir(cwd)  # each case in an empty directory of its own: anything it writes there is seen
    logging.root.handlers.clear()
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(argv)
        except SystemExit as exc:
            rc = exc.code
        except BaseException:
            rc, _ = 1, traceback.print_exc(file=err)
    results[name] = {"rc": rc, "stderr": err.getvalue()}
print(json.dumps(results))
"""


_PATH_FIELDS = ("train.output_dir", "data.path", "model.name_or_path")
_CONFIG_COMMANDS = ("train", "prepare", "config")  # the commands that take a config (preset) argument


def named_paths(argv: list[str], cwd: Path) -> list[Path]:
    """Every path a case names, resolved as the CLI resolves it (relative to its working directory).

    The path fields given with ``--set`` (``train.output_dir``, ``data.path``, ``model.name_or_path``),
    ``--out``, and the ``train.output_dir`` the run would write to without an override: its preset's,
    or the default (for a case whose config does not load, the default's).
    """
    from mistral_fast.config import load_config
    from mistral_fast.errors import ConfigError

    found = []
    for flag, value in itertools.pairwise(argv):
        key, _, path = value.partition("=")
        if flag == "--set" and key in _PATH_FIELDS and path:
            found.append(path)
        if flag == "--out":
            found.append(value)
    preset = argv[1] if len(argv) > 1 and argv[0] in _CONFIG_COMMANDS and not argv[1].startswith("-") else None
    try:
        found.append(load_config(preset).train.output_dir)
    except ConfigError:
        found.append(load_config(None).train.output_dir)
    return [Path(p) if Path(p).is_absolute() else cwd / p for p in found]


@pytest.fixture(scope="module")
def corpus_results(tmp_path_factory):
    """Run every corpus case (two batches in parallel processes); {name: (returncode, stderr, out path)}.

    Each case runs in an empty working directory of its own, which must still be empty afterwards, and
    no path the case names that did not exist before (output dirs, ``--out``, the preset's default
    ``train.output_dir``, missing data or model paths) may exist afterwards.
    """
    root = tmp_path_factory.mktemp("corpus")
    before = _tree_digest(BAD)
    outs = {name: root / name / "out" for name in CASES}
    cwds = {name: root / name / "cwd" for name in CASES}
    argvs = {
        name: [a.replace("{bad}", str(BAD)).replace("{out}", str(outs[name])) for a in case["argv"]]
        for name, case in CASES.items()
    }
    for cwd in cwds.values():
        cwd.mkdir(parents=True)
    absent = {name: [p for p in named_paths(argvs[name], cwds[name]) if not p.exists()] for name in CASES}
    names = list(CASES)
    batches = [dict((n, [str(cwds[n]), argvs[n]]) for n in names[i::2]) for i in range(2)]
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _BATCH],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
            cwd=root,
        )
        for _ in batches
    ]
    results = {}
    for proc, batch in zip(procs, batches, strict=True):
        stdout, stderr = proc.communicate(json.dumps(batch), timeout=600)
        assert proc.returncode == 0, stderr[-3000:]
        results |= json.loads(stdout.strip().splitlines()[-1])
    print(f"\ncorpus: {len(CASES)} cases in {time.perf_counter() - start:.1f} s wall")
    assert _tree_digest(BAD) == before, "a corpus case wrote into tests/bad_inputs (e.g. over output_is_a_file)"
    written = {name: sorted(str(p.relative_to(root)) for p in cwds[name].rglob("*")) for name in CASES}
    written |= {name: [*written[name], *(str(p) for p in absent[name] if p.exists())] for name in CASES}
    return {name: (r["rc"], r["stderr"], outs[name], written[name]) for name, r in results.items()}


@pytest.mark.parametrize("name", ["malformed_json", "output_dir_is_a_file"])
def test_cases_also_fail_cleanly_as_separate_processes(name, tmp_path) -> None:
    """A few cases as real `python -m mistral_fast.cli` processes: the batch above is no shortcut."""
    out = tmp_path / "out"
    argv = [a.replace("{bad}", str(BAD)).replace("{out}", str(out)) for a in CASES[name]["argv"]]
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    absent = [p for p in named_paths(argv, cwd) if not p.exists()]
    proc = subprocess.run(cli(*argv), capture_output=True, text=True, env=ENV, cwd=cwd)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and all(text in last for text in CASES[name]["expect"]), last
    assert not out.exists() and list(cwd.iterdir()) == [] and not [p for p in absent if p.exists()]


def test_the_corpus_is_big_enough() -> None:
    assert len(CASES) >= 25
    files = [p for p in BAD.rglob("*") if p.is_file() and p.name != "cases.yaml"]
    assert len(files) >= 25


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_actionable_line(corpus_results, name) -> None:
    rc, stderr, out, written = corpus_results[name]
    assert rc == 2, f"exit {rc}\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == [lines[-1]], stderr[-3000:]  # exactly one error line, and it is the last one
    for text in CASES[name]["expect"]:
        assert text in lines[-1], f"{text!r} not in {lines[-1]!r}"
    assert not out.exists(), f"{name} left {sorted(p.name for p in out.rglob('*'))} at the output path"
    assert written == [], f"{name} wrote {written} (its working directory or a path its config names)"


def test_every_case_names_the_paths_that_are_checked(tmp_path) -> None:
    """The 'nothing written' check is not vacuous: each case has its own directory and at least one path."""
    for name, case in CASES.items():
        argv = [a.replace("{bad}", str(BAD)).replace("{out}", str(tmp_path / "out")) for a in case["argv"]]
        paths = named_paths(argv, tmp_path / "cwd")
        assert paths and any(not p.exists() for p in paths), name
    train = named_paths(["train", "smoke", "--set", "data.path=x.jsonl"], tmp_path)
    assert tmp_path / "runs" / "smoke" in train and tmp_path / "x.jsonl" in train


def test_debug_gives_the_traceback_for_a_data_error() -> None:
    argv = cli("--debug", "prepare", "--set", f"data.path={BAD / 'unknown_role.jsonl'}")
    proc = subprocess.run(argv, capture_output=True, text=True, env=ENV)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "DataError" in proc.stderr


def _limit_file_size(limit: int):
    def preexec() -> None:  # writes past `limit` bytes fail with EFBIG (Python ignores SIGXFSZ)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec


@pytest.mark.slow
def test_full_disk_is_one_line_and_leaves_no_final_artefact(tmp_path) -> None:
    """'No disk space': a 200 kB file-size limit breaks the first checkpoint (its tokenizer.json) mid-save."""
    run = tmp_path / "run"
    argv = cli(
        "train", "smoke", *(f"--set={o}" for o in QUICK), "--set=train.max_steps=4", f"--set=train.output_dir={run}"
    )
    proc = subprocess.run(argv, capture_output=True, text=True, env=ENV, preexec_fn=_limit_file_size(200_000))
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert re.search(r"^error: writing train\.output_dir=.*run: File too large — free space .* and rerun$", last), last
    assert "Traceback" not in proc.stderr
    # the final artefacts are never half there; the checkpoint caught mid-save has no COMPLETE marker
    for final in ("adapter", "result.json", "manifest.json", "eval.json"):
        assert not (run / final).exists(), final
    assert all(not (c / "COMPLETE").exists() for c in (run / "checkpoints").glob("checkpoint-*"))
    # rerunning with space completes, skipping the partial checkpoint
    again = subprocess.run([*argv, "--resume"], capture_output=True, text=True, env=ENV)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "skipping" in again.stderr and "incomplete" in again.stderr
    assert subprocess.run(cli("verify", str(run)), capture_output=True, env=ENV).returncode == 0


# ------------------------------------------------------------------------------------------------ SIGKILL


def _adapter(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _assert_same_adapter(a: Path, b: Path) -> None:
    import torch

    wa, wb = _adapter(a), _adapter(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> tuple[Path, list[str]]:
    """An uninterrupted 8-step run: what every killed-and-resumed run must reach."""
    run = tmp_path_factory.mktemp("reference") / "run"
    overrides = [*QUICK, "train.max_steps=8"]
    argv = cli("train", "smoke", *(f"--set={o}" for o in overrides), f"--set=train.output_dir={run}")
    subprocess.run(argv, check=True, capture_output=True, env=ENV)
    return run, overrides


def _start(run: Path, overrides: list[str], pause_at: str, marker: Path) -> subprocess.Popen:
    """Start a training run that pauses at `pause_at` (see mistral_fast.pause) and says so in `marker`."""
    argv = cli("train", "smoke", *(f"--set={o}" for o in overrides), f"--set=train.output_dir={run}")
    env = {**ENV, "MISTRAL_FAST_TEST_PAUSE_AT": pause_at, "MISTRAL_FAST_TEST_PAUSE_MARKER": str(marker)}
    return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _kill_when_paused(proc: subprocess.Popen, marker: Path) -> None:
    """Wait until the process sits at its pause point, then SIGKILL it: the kill lands at that point, always."""
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert proc.poll() is None, "the process ended without reaching its pause point"
        assert time.monotonic() < deadline, "the pause point was not reached in 300 s"
        time.sleep(0.05)
    assert int(marker.read_text()) == proc.pid
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _resume(run: Path, overrides: list[str]) -> subprocess.CompletedProcess:
    argv = cli("train", "smoke", *(f"--set={o}" for o in overrides), f"--set=train.output_dir={run}", "--resume")
    proc = subprocess.run(argv, capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _logged_steps(run: Path, skip: int = 0) -> list[int]:
    """Steps of the training-loss rows of metrics.jsonl, after its first `skip` lines."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()[skip:] if line.strip()]
    return [row["step"] for row in rows if "loss" in row]


@pytest.mark.slow
def test_sigkill_during_checkpoint_save_is_detected_and_skipped(reference_run, tmp_path) -> None:
    """Killed while checkpoint-4 is on disk but not marked complete: resume skips it and goes on from checkpoint-2.

    The run pauses after the Trainer wrote checkpoint-4 and before its COMPLETE marker, and is killed
    there; one of its files is then cut short, as a kill mid-write leaves it. The resumed run must start
    at step 2, run the 6 steps left (no more), and end with the uninterrupted run's adapter.
    """
    ref, overrides = reference_run
    run, marker = tmp_path / "run", tmp_path / "paused"
    _kill_when_paused(_start(run, overrides, "save:4", marker), marker)
    target = run / "checkpoints" / "checkpoint-4"
    assert target.is_dir() and not (target / "COMPLETE").exists()
    assert (run / "checkpoints" / "checkpoint-2" / "COMPLETE").exists()
    weights = target / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert not (run / "adapter").exists() and not (run / "manifest.json").exists()
    assert _logged_steps(run) == [1, 2, 3, 4]
    logged_before = len((run / "metrics.jsonl").read_text().splitlines())

    resumed = _resume(run, overrides)
    assert "skipping" in resumed.stderr and "checkpoint-4: incomplete" in resumed.stderr
    train = json.loads((run / "result.json").read_text())["train"]
    assert train["resumed_from"] == str(run / "checkpoints" / "checkpoint-2"), "the partial checkpoint was not skipped"
    assert (train["extra"]["start_step"], train["extra"]["steps_run"], train["steps"]) == (2, 6, 8)
    assert _logged_steps(run, logged_before) == [3, 4, 5, 6, 7, 8], "the resumed run did not go on from step 2"
    _assert_same_adapter(ref, run)


@pytest.mark.slow
def test_sigkill_mid_step_before_any_checkpoint_restarts_cleanly(reference_run, tmp_path) -> None:
    """Killed after its first logged step, before the first checkpoint: --resume starts over, same adapter."""
    ref, overrides = reference_run
    run, marker = tmp_path / "run", tmp_path / "paused"
    _kill_when_paused(_start(run, overrides, "log:1", marker), marker)
    assert not (run / "adapter").exists() and not list((run / "checkpoints").glob("checkpoint-*"))
    assert _logged_steps(run) == [1]
    _resume(run, overrides)
    train = json.loads((run / "result.json").read_text())["train"]
    assert train["resumed_from"] is None  # no checkpoint existed: the only right answer is to start over
    assert (train["extra"]["start_step"], train["extra"]["steps_run"], train["steps"]) == (0, 8, 8)
    assert _logged_steps(run) == list(range(1, 9)), "a fresh start keeps no history of the killed run"
    _assert_same_adapter(ref, run)


# ------------------------------------------------------------------------------------------------ sweeps


def _sweep_notebook(path: Path) -> Path:
    import nbformat
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

    params = new_code_cell('run_dir = "out"  # where results go\nindex = 0  # which variation')
    params.metadata["tags"] = ["parameters"]
    body = (
        "import json, pathlib, time\n"
        "from mistral_fast.pause import pause_point\n"
        "pause_point(f'variation-{index}')  # the test pauses variation 1 here and kills the sweep\n"
        "pathlib.Path(run_dir).mkdir(parents=True, exist_ok=True)\n"
        "pathlib.Path(run_dir, 'results.json').write_text(json.dumps({'index': index, 'time': time.time()}))"
    )
    nb = new_notebook(cells=[new_markdown_cell("# sweep fault test"), params, new_code_cell(body)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


@pytest.mark.slow
def test_sweep_killed_mid_way_resumes_where_it_stopped(tmp_path) -> None:
    nb = _sweep_notebook(tmp_path / "wait.ipynb")
    out = tmp_path / "sweep"
    spec = {"notebook": str(nb), "grid": {"index": [0, 1]}, "out": str(out), "timeout": 120}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(spec))
    argv = cli("sweep", str(tmp_path / "sweep.yaml"))
    marker = tmp_path / "paused"
    env = {**ENV, "MISTRAL_FAST_TEST_PAUSE_AT": "variation-1", "MISTRAL_FAST_TEST_PAUSE_MARKER": str(marker)}
    proc = subprocess.Popen(
        argv, env=env, cwd=tmp_path, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    first = out / "00-index=0" / "status.json"
    deadline = time.monotonic() + 120
    while not marker.exists():  # variation 1's kernel waits in its cell: variation 0 is finished
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    # the sweep mid-way through variation 1, and its kernel (jupyter_client gives it a session of its own)
    os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):  # gone already if it shared the group
        os.kill(int(marker.read_text()), signal.SIGKILL)
    proc.wait()
    assert json.loads(first.read_text())["status"] == "done"
    # the killed variation is left as it was while running (never "done"), and no table was written
    killed = out / "01-index=1" / "status.json"
    assert json.loads(killed.read_text())["status"] == "running" and not (out / "sweep.csv").exists()
    done_at = first.stat().st_mtime_ns

    again = subprocess.run(argv, capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=180)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "00-index=0 already finished, skipped" in again.stderr
    assert first.stat().st_mtime_ns == done_at, "the finished variation ran again"
    assert json.loads((out / "01-index=1" / "status.json").read_text())["status"] == "done"
    assert "| 01-index=1 | 1 | done |" in (out / "sweep.md").read_text()


# ------------------------------------------------------------------------------------------------ exports

# An export in a child process that pauses (mistral_fast.pause) in the middle of writing: after its third
# tensor when run as "pause", so the kill lands mid-file every time. Interrupts (Ctrl-C) are covered in
# tests/test_export_*.py.
_EXPORT = """
import sys
from pathlib import Path
from mistral_fast.pause import pause_point
kind, source, final = sys.argv[1], sys.argv[2], Path(sys.argv[3])
def counted(module, name):
    real, calls = getattr(module, name), []
    def wrapper(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            pause_point("export")  # three tensors written, the fourth not
        return real(*a, **k)
    setattr(module, name, wrapper)
if kind == "gguf":
    from mistral_fast.export import gguf
    counted(gguf, "_encode")
    gguf.export_gguf(source, final, "f16")
else:
    from mistral_fast.export import merge
    counted(merge, "merge_tensor")
    merge.merge_adapter(source, final)
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gguf", "merge"])
def test_sigkill_during_export_leaves_no_file_at_the_final_path(kind, reference_run, tmp_path) -> None:
    from mistral_fast.modeling import tiny_model_dir

    ref, _ = reference_run
    source = str(tiny_model_dir()) if kind == "gguf" else str(ref)
    final = tmp_path / ("tiny-f16.gguf" if kind == "gguf" else "merged")
    argv = [sys.executable, "-c", _EXPORT, kind, source, str(final)]
    marker = tmp_path.parent / f"{tmp_path.name}.paused"  # beside tmp_path: the test lists tmp_path below
    env = {**ENV, "MISTRAL_FAST_TEST_PAUSE_AT": "export", "MISTRAL_FAST_TEST_PAUSE_MARKER": str(marker)}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _kill_when_paused(proc, marker)
    finally:
        marker.unlink(missing_ok=True)
    assert not final.exists(), "a killed export left a file at the final path"
    left = list(tmp_path.glob(f".{final.name}*"))
    assert left, "the killed export left no temporary (the test did not kill it mid-write)"
    subprocess.run(argv, check=True, env=ENV, capture_output=True)  # rerunning completes
    assert final.exists()
    assert list(tmp_path.iterdir()) == [final], "the rerun removes what the killed export left beside it"
    if kind == "gguf":
        import gguf

        assert len(gguf.GGUFReader(str(final)).tensors) > 0
    else:
        assert list(final.glob("*.safetensors")) and (final / "config.json").is_file()
