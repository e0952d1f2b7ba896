"""Fault injection: the bad-input corpus through the CLI, a full disk, and SIGKILLs at chosen points.

Every case of ``tests/bad_inputs/cases.yaml`` runs ``python -m mistral_fast.cli …`` in a subprocess and
must end with exit code 2, one last ``error: …`` line naming what and where and what to do, no traceback,
and nothing written at the output path. The cases run concurrently (one fixture) to keep the suite fast.
Counts and timings are in docs/reliability.md.
"""

from __future__ import annotations

import hashlib
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
import contextlib, io, json, logging, sys, traceback
from mistral_fast.cli import main
results = {}
for name, argv in json.load(sys.stdin).items():
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


@pytest.fixture(scope="module")
def corpus_results(tmp_path_factory):
    """Run every corpus case (two batches in parallel processes); {name: (returncode, stderr, out path)}."""
    root = tmp_path_factory.mktemp("corpus")
    before = _tree_digest(BAD)
    outs = {name: root / name / "out" for name in CASES}
    argvs = {
        name: [a.replace("{bad}", str(BAD)).replace("{out}", str(outs[name])) for a in case["argv"]]
        for name, case in CASES.items()
    }
    names = list(CASES)
    batches = [dict((n, argvs[n]) for n in names[i::2]) for i in range(2)]
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
    return {name: (r["rc"], r["stderr"], outs[name]) for name, r in results.items()}


@pytest.mark.parametrize("name", ["malformed_json", "output_dir_is_a_file"])
def test_cases_also_fail_cleanly_as_separate_processes(name, tmp_path) -> None:
    """A few cases as real `python -m mistral_fast.cli` processes: the batch above is no shortcut."""
    out = tmp_path / "out"
    argv = [a.replace("{bad}", str(BAD)).replace("{out}", str(out)) for a in CASES[name]["argv"]]
    proc = subprocess.run(cli(*argv), capture_output=True, text=True, env=ENV, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and all(text in last for text in CASES[name]["expect"]), last
    assert not out.exists()


def test_the_corpus_is_big_enough() -> None:
    assert len(CASES) >= 25
    files = [p for p in BAD.rglob("*") if p.is_file() and p.name != "cases.yaml"]
    assert len(files) >= 25


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_actionable_line(corpus_results, name) -> None:
    rc, stderr, out = corpus_results[name]
    assert rc == 2, f"exit {rc}\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == [lines[-1]], stderr[-3000:]  # exactly one error line, and it is the last one
    for text in CASES[name]["expect"]:
        assert text in lines[-1], f"{text!r} not in {lines[-1]!r}"
    assert not out.exists(), f"{name} left {sorted(p.name for p in out.rglob('*'))} at the output path"


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


def _start(run: Path, overrides: list[str]) -> subprocess.Popen:
    argv = cli("train", "smoke", *(f"--set={o}" for o in overrides), f"--set=train.output_dir={run}")
    return subprocess.Popen(argv, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _resume(run: Path, overrides: list[str]) -> subprocess.CompletedProcess:
    argv = cli("train", "smoke", *(f"--set={o}" for o in overrides), f"--set=train.output_dir={run}", "--resume")
    proc = subprocess.run(argv, capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_sigkill_during_checkpoint_save_is_detected_and_skipped(reference_run, tmp_path) -> None:
    """Kill the moment checkpoint-4's directory appears (before its COMPLETE marker): resume skips it.

    The poll is tight (1 ms) and the save of a checkpoint takes tens of ms, so the kill lands mid-save;
    if the machine is so slow that the marker was already written, the marker is removed and one
    file truncated, which is exactly what a mid-save kill leaves (then the test says so).
    """
    ref, overrides = reference_run
    run = tmp_path / "run"
    proc = _start(run, overrides)
    target = run / "checkpoints" / "checkpoint-4"
    deadline = time.time() + 300
    while not target.exists():
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if (target / "COMPLETE").exists():  # too late: make it what a mid-save kill leaves
        (target / "COMPLETE").unlink()
        weights = target / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
        print("checkpoint-4 was complete at the kill; simulated the mid-save state")
    assert not (run / "adapter").exists() and not (run / "manifest.json").exists()

    resumed = _resume(run, overrides)
    assert "skipping" in resumed.stderr and "checkpoint-4: incomplete" in resumed.stderr
    result = json.loads((run / "result.json").read_text())
    assert result["train"]["resumed_from"].endswith("checkpoint-2"), "the partial checkpoint was not skipped"
    _assert_same_adapter(ref, run)


@pytest.mark.slow
def test_sigkill_mid_step_before_any_checkpoint_restarts_cleanly(reference_run, tmp_path) -> None:
    """Killed after its first logged step, before the first checkpoint: --resume starts over, same adapter."""
    ref, overrides = reference_run
    run = tmp_path / "run"
    proc = _start(run, overrides)
    deadline = time.time() + 300
    while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text().strip():
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)  # mid-step: step 1 logged, the optimiser is in step 2
    proc.wait()
    assert not (run / "adapter").exists()
    _resume(run, overrides)
    assert json.loads((run / "result.json").read_text())["train"]["resumed_from"] in (
        None,
        str(run / "checkpoints" / "checkpoint-2"),
    )
    _assert_same_adapter(ref, run)


# ------------------------------------------------------------------------------------------------ sweeps


def _sweep_notebook(path: Path) -> Path:
    import nbformat
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

    params = new_code_cell(
        'run_dir = "out"  # where results go\n'
        "index = 0  # which variation\n"
        'block = ""  # a file: variation 1 waits while it exists'
    )
    params.metadata["tags"] = ["parameters"]
    body = (
        "import json, pathlib, time\n"
        "while index == 1 and block and pathlib.Path(block).exists():\n    time.sleep(0.1)\n"
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
    block = tmp_path / "block"
    block.write_text("variation 1 waits while this exists")
    out = tmp_path / "sweep"
    spec = {
        "notebook": str(nb),
        "parameters": {"block": str(block)},
        "grid": {"index": [0, 1]},
        "out": str(out),
        "timeout": 120,
    }
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(spec))
    argv = cli("sweep", str(tmp_path / "sweep.yaml"))
    proc = subprocess.Popen(
        argv, env=ENV, cwd=tmp_path, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    first = out / "00-index=0" / "status.json"
    second_nb = out / "01-index=1" / "notebook.ipynb"
    deadline = time.time() + 120
    while not (first.exists() and second_nb.exists()):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its kernel, mid-way through variation 1
    proc.wait()
    assert json.loads(first.read_text())["status"] == "done"
    assert not (out / "01-index=1" / "status.json").exists() and not (out / "sweep.csv").exists()
    done_at = first.stat().st_mtime_ns

    block.unlink()
    again = subprocess.run(argv, capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=180)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "00-index=0 already finished, skipped" in again.stderr
    assert first.stat().st_mtime_ns == done_at, "the finished variation ran again"
    assert json.loads((out / "01-index=1" / "status.json").read_text())["status"] == "done"
    assert "| 01-index=1 | 1 | done |" in (out / "sweep.md").read_text()


# ------------------------------------------------------------------------------------------------ exports

# An export in a child process, each tensor slowed by 20 ms so that the kill lands mid-file (the tiny model
# otherwise exports in a fraction of a second). Interrupts (Ctrl-C) are covered in tests/test_export_*.py.
_EXPORT = """
import sys, time
from pathlib import Path
kind, source, final, slow = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4] == "slow"
def slowed(module, name):
    real = getattr(module, name, None)
    if slow and real is not None:
        setattr(module, name, lambda *a, **k: (time.sleep(0.02), real(*a, **k))[1])
if kind == "gguf":
    from mistral_fast.export import gguf
    slowed(gguf, "_encode")
    gguf.export_gguf(source, final, "f16")
else:
    from mistral_fast.export import merge
    slowed(merge, "merge_tensor")
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
    proc = subprocess.Popen([*argv, "slow"], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(tmp_path.glob(f".{final.name}*")):  # the temp file/dir beside the final path
        assert proc.poll() is None, "the export ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.005)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not final.exists(), "a killed export left a file at the final path"
    left = list(tmp_path.glob(f".{final.name}*"))
    assert left, "the killed export left no temporary (the test did not kill it mid-write)"
    subprocess.run([*argv, "fast"], check=True, env=ENV, capture_output=True)  # rerunning completes
    assert final.exists()
    assert list(tmp_path.iterdir()) == [final], "the rerun removes what the killed export left beside it"
    if kind == "gguf":
        import gguf

        assert len(gguf.GGUFReader(str(final)).tensors) > 0
    else:
        assert list(final.glob("*.safetensors")) and (final / "config.json").is_file()
