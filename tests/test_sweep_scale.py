"""Sweeps beyond one process: ``--jobs N`` on one machine and one Ray task per variation on a Ray cluster.

Ray runs as a local cluster of 2 CPUs started here (no address: nothing outside the machine), once for the
session. A worker is killed mid-variation at a deterministic point (`mistral_fast.pause`: after the training
step 2 log row of the one variation that runs 2 steps), never after a sleep.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import require_optional

from mistral_fast.cli import main
from mistral_fast.errors import ConfigError
from mistral_fast.runner import run_sweep

FAST = {"train.max_steps": 1, "train.eval_steps": 1, "train.save_steps": 1, "data.max_examples": 16}
FAST |= {"eval.num_samples": 1, "eval.max_new_tokens": 4, "train.logging_steps": 1}
TWO_STEPS = {"train.max_steps": 2, "train.save_steps": 2, "train.eval_steps": 2}
KILL_AT = "log:2"  # only the 2-step variation reaches it


def sweep_file(tmp_path: Path, variations: list[dict], *, name: str, overrides: dict | None = None) -> Path:
    spec = {
        "notebook": "01_finetune",
        "parameters": {"smoke": True, "overrides": {**FAST, **(overrides or {})}},
        "variations": variations,
        "out": str(tmp_path / name),
        "timeout": 600,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A local Ray cluster with 2 CPUs; its workers' notebooks pause at KILL_AT, signalling through `marker`."""
    require_optional("ray")
    import ray

    root = tmp_path_factory.mktemp("ray")
    marker = root / "paused"
    env = {"MISTRAL_FAST_TEST_PAUSE_AT": KILL_AT, "MISTRAL_FAST_TEST_PAUSE_MARKER": str(marker)}
    env |= {"MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db"}
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=False)
    yield root, marker
    ray.shutdown()


def wait_for(path: Path, done: threading.Thread, seconds: float = 300) -> int:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert done.is_alive(), "the sweep ended before the variation reached its pause point"
        assert time.monotonic() < deadline, f"no {path} after {seconds} s"
        time.sleep(0.05)
    return int(path.read_text())


def parent_pid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


@pytest.mark.slow
def test_ray_sweep_survives_a_killed_worker_skips_finished_and_retries_failed(ray_cluster, tmp_path, monkeypatch):
    require_optional("mlflow")
    import mlflow

    root, marker = ray_cluster
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")  # the driver's, as the workers'
    monkeypatch.chdir(tmp_path)  # MLflow puts the experiment's artifacts under the creating process's ./mlruns
    variations = [
        {"lora_rank": 4},
        {"lora_rank": 8, "overrides": {**FAST, **TWO_STEPS, "train.report_to": ["mlflow"]}},
        {"lora_rank": 4, "data_path": str(tmp_path / "missing.jsonl")},
    ]
    path = sweep_file(tmp_path, variations, name="ray-sweep", overrides={"train.report_to": ["mlflow"]})
    result: dict = {}

    def run() -> None:
        result["rows"], result["paths"] = run_sweep(path, executor="ray")

    sweep = threading.Thread(target=run)
    sweep.start()
    kernel = wait_for(marker, sweep)
    worker = parent_pid(kernel)  # the Ray worker running the variation started the notebook's kernel
    os.kill(worker, signal.SIGKILL)  # the worker dies mid-variation (its kernel is still paused) ...
    os.kill(kernel, signal.SIGKILL)  # ... and with it what it ran, as when a machine goes away
    marker.unlink()
    retried = wait_for(marker, sweep)  # Ray runs the lost variation again, on a new worker
    assert retried != kernel and parent_pid(retried) != worker
    marker.unlink()  # let the retry finish
    sweep.join(timeout=600)
    rows, paths = result["rows"], result["paths"]
    assert [r["status"] for r in rows] == ["done", "done", "failed"]
    out = Path(tmp_path / "ray-sweep")
    statuses = [json.loads((out / r["name"] / "status.json").read_text()) for r in rows]
    assert [s["attempt"] for s in statuses] == [1, 2, 1], "the killed variation ran twice, the others once"
    for row in rows[:2]:  # the layout of a sequential sweep
        assert row["eval_loss"] and row["perplexity"] and row["tokens_per_second"]
        assert (out / row["name"] / "notebook.ipynb").is_file() and (out / row["name"] / "run" / "adapter").is_dir()
    with paths["csv"].open() as handle:
        assert [t["lora_rank"] for t in csv.DictReader(handle)] == ["4", "8", "4"]
    assert paths["markdown"].read_text().startswith("| name |") and paths["plot"].read_bytes()[:4] == b"\x89PNG"
    assert "missing.jsonl" in statuses[2]["error"]
    # every variation a run of one experiment named after the sweep, named after the variation
    runs = mlflow.search_runs(experiment_names=["ray-sweep"], output_format="list")
    finished = sorted(r.info.run_name for r in runs if r.info.status == "FINISHED")
    assert finished == sorted(r["name"] for r in rows[:2])
    assert "MLFLOW_EXPERIMENT_ID" not in os.environ, "the driver exports no experiment to later processes"
    assert not (out / rows[0]["name"] / "run" / "tensorboard").exists(), "report_to [mlflow] only: no TensorBoard"

    again, _ = run_sweep(path, executor="ray")  # finished ones skipped, the failed one retried
    assert [r["wall_seconds"] for r in again[:2]] == [r["wall_seconds"] for r in rows[:2]]
    assert json.loads((out / rows[2]["name"] / "status.json").read_text())["attempt"] == 2


RENDEZVOUS = """import pathlib, json, time
here = pathlib.Path(meet)
(here / str(x)).touch()
deadline = time.monotonic() + 120
while len(list(here.iterdir())) < 2 and time.monotonic() < deadline:
    time.sleep(0.05)
met = len(list(here.iterdir())) == 2
pathlib.Path(run_dir).mkdir(parents=True, exist_ok=True)
pathlib.Path(run_dir, "results.json").write_text(json.dumps({"met": met}))
assert met, "the other variation never started while this one ran"
"""


@pytest.mark.slow
def test_jobs_runs_variations_at_once(tmp_path, capsys, monkeypatch) -> None:
    """Each variation's notebook waits until the other has started too: only N >= 2 at once gets through."""
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    params = new_code_cell('run_dir = "out"  # where results go\nx = 0  # which variation\nmeet = ""  # a directory')
    params.metadata["tags"] = ["parameters"]
    nb = new_notebook(cells=[params, new_code_cell(RENDEZVOUS)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "meet.ipynb")
    (tmp_path / "meet").mkdir()
    spec = {"notebook": str(tmp_path / "meet.ipynb"), "parameters": {"meet": str(tmp_path / "meet")}}
    spec |= {"variations": [{"x": 1, "run_dir": "a"}, {"x": 2, "run_dir": "b"}], "out": str(tmp_path / "jobs")}
    (tmp_path / "jobs.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", str(tmp_path / "jobs.yaml"), "--jobs", "2"]) == 0
    assert "| name |" in capsys.readouterr().out
    statuses = [json.loads(p.read_text()) for p in sorted((tmp_path / "jobs").glob("*/status.json"))]
    assert [(s["status"], s["results"]) for s in statuses] == [("done", {"met": True})] * 2


def test_bad_executor_and_jobs_are_refused(tmp_path) -> None:
    path = sweep_file(tmp_path, [{"lora_rank": 4}], name="bad")
    with pytest.raises(ConfigError, match="executor='slurm'"):
        run_sweep(path, executor="slurm")
    with pytest.raises(ConfigError, match="jobs=0"):
        run_sweep(path, jobs=0)
    with pytest.raises(ConfigError, match="jobs=2 with executor='ray'"):
        run_sweep(path, executor="ray", jobs=2)
    assert not (tmp_path / "bad").exists()


def test_variation_resources_follow_the_config(tmp_path) -> None:
    from mistral_fast.runner import load_sweep, variation_resources

    path = sweep_file(tmp_path, [{"lora_rank": 4}], name="res")
    spec = load_sweep(path)
    assert variation_resources(spec, 0, spec.variations[0]) == {"num_cpus": 1.0}, "a tiny model: one CPU"
    data = yaml.safe_load(path.read_text())
    data["parameters"] = {"preset": "a100", "model_name_or_path": "mistralai/Mistral-7B-v0.3"}
    path.write_text(yaml.safe_dump(data))
    spec = load_sweep(path)
    assert variation_resources(spec, 0, spec.variations[0]) == {"num_cpus": 1.0, "num_gpus": 1.0}
    data["resources"] = {"num_gpus": 2, "num_cpus": 8}
    path.write_text(yaml.safe_dump(data))
    spec = load_sweep(path)
    assert variation_resources(spec, 0, spec.variations[0]) == {"num_gpus": 2.0, "num_cpus": 8.0}
    data["resources"] = {"gpus": 1}
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="resources must map"):
        load_sweep(path)
