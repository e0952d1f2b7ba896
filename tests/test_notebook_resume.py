"""A runtime reset mid-training: 01_finetune run again with the same `storage` resumes and reaches the same adapter.

Colab and Kaggle kill runtimes; with ``storage`` the run directory lives on persistent storage and a
re-run of the notebook continues from the last complete checkpoint. Here the papermill kernel is killed
(SIGKILL, as a runtime reset does) at a deterministic pause point after checkpoint-3 is complete, the notebook
is run again with the same parameters, and the adapter is compared tensor by tensor with an uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import require_platform

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
OVERRIDES = {
    "train.max_steps": 12,
    "train.save_steps": 3,
    "train.eval_steps": 3,
    "train.save_total_limit": 10,
    "data.max_examples": 48,
    "eval.num_samples": 1,
    "eval.max_new_tokens": 4,
}


def _notebook(storage: Path, out: Path) -> list[str]:
    params = ["-p", "smoke", "true", "-p", "storage", str(storage), "-p", "train_output_dir", "runs/r"]
    params += ["-p", "overrides", json.dumps(OVERRIDES)]
    return [sys.executable, "-m", "mistral_fast.cli", "notebook", "run", "01_finetune", *params, "--out", str(out)]


def _adapter(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "adapter" / "adapter_model.safetensors")


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the CLI and every process under it: the papermill kernel runs in its own session."""
    for child in psutil.Process(proc.pid).children(recursive=True):
        child.send_signal(signal.SIGKILL)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


@pytest.mark.slow
def test_killed_notebook_rerun_with_storage_resumes_to_the_uninterrupted_adapter(tmp_path) -> None:
    whole = subprocess.run(_notebook(tmp_path / "a", tmp_path / "nb_a"), capture_output=True, text=True, env=ENV)
    assert whole.returncode == 0, whole.stderr[-4000:]
    reference = _adapter(tmp_path / "a" / "runs" / "r")

    run = tmp_path / "b" / "runs" / "r"
    argv = _notebook(tmp_path / "b", tmp_path / "nb_b")
    # A deterministic kill point (mistral_fast.pause): the kernel's trainer stops just after step 5's log row
    # (logging every 5 steps, checkpoints every 3), with checkpoint-3 complete and the adapter not yet written.
    marker = tmp_path / "paused"
    pause = {"MISTRAL_FAST_TEST_PAUSE_AT": "log:5", "MISTRAL_FAST_TEST_PAUSE_MARKER": str(marker)}
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env={**ENV, **pause})
        while not marker.exists():  # no deadline: the run either pauses or ends (then the assert below fails)
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-4000:]
            time.sleep(0.05)
        kernel = int(marker.read_text())
        assert kernel in {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}, "paused in the kernel"
        assert (run / "checkpoints" / "checkpoint-3" / "COMPLETE").exists()
        assert not (run / "checkpoints" / "checkpoint-6").exists() and not (run / "adapter").exists()
        _kill_tree(proc)

    again = subprocess.run(argv, capture_output=True, text=True, env=ENV)
    assert again.returncode == 0, again.stderr[-4000:]
    train = json.loads((run / "result.json").read_text())["train"]
    assert train["resumed_from"] and Path(train["resumed_from"]).name.startswith("checkpoint-")
    assert train["steps"] == OVERRIDES["train.max_steps"]
    resumed = _adapter(run)
    assert resumed.keys() == reference.keys()
    for name, tensor in reference.items():
        assert (resumed[name] == tensor).all(), name


def test_storage_puts_the_run_under_it_and_resumes(tmp_path) -> None:
    from mistral_fast.notebook import notebook_config, resolve_run_dir

    cfg = notebook_config({"smoke": True, "storage": str(tmp_path), "train_output_dir": "runs/r"})
    assert cfg.train.output_dir == str(tmp_path / "runs" / "r") and cfg.train.resume is True
    assert notebook_config({"smoke": True, "storage": ""}).train.resume is False, "without storage: no resume"
    assert resolve_run_dir("runs/r", storage=str(tmp_path)) == tmp_path / "runs" / "r"  # where 02/03 look


def test_storage_drive_without_the_mount_says_to_run_the_set_up_cell() -> None:
    require_platform(not Path("/content/drive").exists(), "Google Drive is mounted here (a Colab runtime)")
    from mistral_fast.errors import ConfigError
    from mistral_fast.runner import check_parameters, resolve_notebook

    with pytest.raises(ConfigError, match=r"storage='drive'.*run the set-up cell"):
        check_parameters(resolve_notebook("01_finetune"), {"smoke": True, "storage": "drive"})
