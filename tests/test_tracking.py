"""`train.report_to`: MLflow, Weights & Biases and Trackio in their local modes, read back with their own APIs.

One tiny training run reports to all of them at once (MLflow into a ``sqlite:///`` store, W&B offline,
Trackio's local store); each tracker's record is then read back with that tracker's own reader and compared
with what the run directory holds (run_config.yaml, metrics.jsonl, eval.json, manifest.json).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import require_optional

from mistral_fast.config import load_config
from mistral_fast.errors import ConfigError

TINY = ["data.max_examples=16", "model.max_seq_length=128", "train.max_steps=3", "train.eval_steps=3"]
TINY += ["train.save_steps=3", "train.logging_steps=1", "eval.num_samples=1", "eval.max_new_tokens=4"]
EXPERIMENT = "i25-tracking"


def tracker_env(root: Path) -> dict[str, str]:
    """Each tracker's local mode, everything under `root`; nothing leaves the machine."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db"}
    env |= {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(root)}
    env |= {"TRACKIO_DIR": str(root / "trackio")}
    env |= {"WANDB_CACHE_DIR": str(root / "wandb-cache"), "WANDB_DATA_DIR": str(root / "wandb-data")}
    env |= {"WANDB_CONFIG_DIR": str(root / "wandb-config")}
    return env


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """`mistral-fast train` reporting to TensorBoard, MLflow, W&B and Trackio at once."""
    for module in ("mlflow", "wandb", "trackio"):
        require_optional(module, "mistral-fast[tracking]")
    root = tmp_path_factory.mktemp("tracked")
    run = root / "run"
    sets = [*TINY, "train.report_to=[tensorboard,mlflow,wandb,trackio]", f"train.experiment={EXPERIMENT}"]
    sets += [f"train.output_dir={run}"]
    proc = subprocess.run(
        [sys.executable, "-m", "mistral_fast.cli", "train", "smoke", *(f"--set={s}" for s in sets)],
        capture_output=True, text=True, env=tracker_env(root), cwd=root, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, run


def flat(run: Path) -> dict[str, str]:
    """run_config.yaml as ``section.field`` → text, as MLflow stores params (lists and None as JSON)."""
    config = yaml.safe_load((run / "run_config.yaml").read_text())
    out = {}
    for section, values in config.items():
        for name, value in values.items():
            out[f"{section}.{name}"] = str(value) if isinstance(value, str | int | float | bool) else json.dumps(value)
    return out


def logged_losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def test_report_to_is_a_validated_list() -> None:
    assert load_config("smoke").train.report_to == ["tensorboard"], "today's behaviour stays the default"
    assert load_config("smoke", ["train.report_to=mlflow"]).train.report_to == ["mlflow"]
    assert load_config("smoke", ["train.report_to=mlflow,wandb"]).train.report_to == ["mlflow", "wandb"]
    assert load_config("smoke", ["train.report_to=none"]).train.report_to == []
    with pytest.raises(ConfigError, match=r"train\.report_to='comet'.*'tensorboard', 'mlflow', 'wandb', 'trackio'"):
        load_config("smoke", ["train.report_to=comet"])
    with pytest.raises(ConfigError, match=r"none.* alone"):
        load_config("smoke", ["train.report_to=[none,mlflow]"])


def test_importing_the_package_imports_no_tracker() -> None:
    code = "import sys, mistral_fast; print([m for m in ('mlflow', 'wandb', 'trackio', 'ray') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.slow
def test_mlflow_run_has_config_metrics_artifacts_and_tag(tracked_run, monkeypatch) -> None:
    import mlflow

    root, run = tracked_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=[EXPERIMENT], output_format="list")
    assert len(runs) == 1
    found = runs[0]
    assert found.info.status == "FINISHED" and found.info.run_name == "run"
    assert found.data.tags["mistral_fast.run_dir"] == str(run.resolve())
    params = found.data.params
    expected = flat(run)
    assert {k: params[k] for k in expected} == expected, "the resolved config, every field"
    client = mlflow.MlflowClient()
    history = {m.step: m.value for m in client.get_metric_history(found.info.run_id, "loss")}
    assert history == pytest.approx(logged_losses(run)), "transformers' MLflowCallback logged each loss"
    evaluation = json.loads((run / "eval.json").read_text())
    assert found.data.metrics["final/loss"] == pytest.approx(evaluation["loss"])
    assert found.data.metrics["final/base/loss"] == pytest.approx(evaluation["base"]["loss"])
    assert sorted(a.path for a in client.list_artifacts(found.info.run_id)) == ["eval.json", "manifest.json"]
    local = Path(client.download_artifacts(found.info.run_id, "manifest.json", str(root / "dl")))
    assert local.read_bytes() == (run / "manifest.json").read_bytes()


def wandb_records(run_file: Path) -> list:
    """The records of a W&B offline run file, parsed with W&B's own protobuf schema.

    The file is ``:W&B`` + magic + version (7 bytes), then LevelDB log framing: 32 KiB blocks of chunks,
    each ``crc32c (4) | length (2, LE) | type (1: full, 2: first, 3: middle, 4: last)`` + data.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            break
        pending += chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


@pytest.mark.slow
def test_wandb_offline_run_has_config_history_summary_and_artifact(tracked_run) -> None:
    require_optional("wandb", "mistral-fast[tracking]")
    _, run = tracked_run
    files = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, "the W&B run lives inside the run directory"
    records = wandb_records(files[0])
    kinds = [r.WhichOneof("record_type") for r in records]
    first = records[kinds.index("run")].run
    assert (first.project, first.display_name) == (EXPERIMENT, "run")
    updates = [*first.config.update, *(item for r in records if r.HasField("config") for item in r.config.update)]
    config = {item.key: json.loads(item.value_json) for item in updates}
    expected = yaml.safe_load((run / "run_config.yaml").read_text())
    assert config["lora.rank"] == expected["lora"]["rank"] and config["train.report_to"] == json.dumps(
        expected["train"]["report_to"]
    )
    assert config["mistral_fast.run_dir"] == str(run.resolve())
    losses = {}
    for r in records:
        if r.HasField("history"):
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            if "train/loss" in row:
                losses[row["train/global_step"]] = row["train/loss"]
    assert losses == pytest.approx(logged_losses(run)), "transformers' WandbCallback logged each loss"
    summary = {
        item.key or "/".join(item.nested_key): json.loads(item.value_json)
        for r in records
        if r.HasField("summary")
        for item in r.summary.update
    }
    assert summary["final/loss"] == pytest.approx(json.loads((run / "eval.json").read_text())["loss"])
    artifacts = [r.artifact for r in records if r.HasField("artifact")]
    assert [sorted(Path(e.path).name for e in a.manifest.contents) for a in artifacts] == [
        ["eval.json", "manifest.json"]
    ]
    assert records[-1].HasField("exit") and records[-1].exit.exit_code == 0, "the run was finished"


@pytest.mark.slow
def test_trackio_local_store_has_config_metrics_and_results(tracked_run) -> None:
    root, run = tracked_run
    read = (
        "import json, trackio\nfrom trackio.sqlite_storage import SQLiteStorage as S\n"
        f"runs = list(trackio.Api().runs({EXPERIMENT!r}))\n"
        f"print(json.dumps({{'runs': [[r.name, r.config] for r in runs], 'logs': S.get_logs({EXPERIMENT!r}, 'run')}}))"
    )
    proc = subprocess.run([sys.executable, "-c", read], capture_output=True, text=True, env=tracker_env(root))
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [name for name, _ in got["runs"]] == ["run"]
    config = got["runs"][0][1]
    assert config["lora.rank"] == yaml.safe_load((run / "run_config.yaml").read_text())["lora"]["rank"]
    assert config["mistral_fast.run_dir"] == str(run.resolve())
    losses = {row["train/global_step"]: row["train/loss"] for row in got["logs"] if "train/loss" in row}
    assert losses == pytest.approx(logged_losses(run)), "transformers' TrackioCallback logged each loss"
    final = [row["final/loss"] for row in got["logs"] if "final/loss" in row]
    assert final == pytest.approx([json.loads((run / "eval.json").read_text())["loss"]])
    assert (run / "tensorboard").is_dir(), "tensorboard, listed too, still writes into the run directory"


@pytest.mark.slow
def test_a_tracked_run_still_verifies(tracked_run) -> None:
    """W&B's files in the run directory change after the manifest (until its run ends): they are not in it."""
    _, run = tracked_run
    verify = [sys.executable, "-m", "mistral_fast.cli", "verify", str(run)]
    proc = subprocess.run(verify, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
