"""The run manifest: written at the end of a run, extended by exports, re-checked by `mistral-fast verify`."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mistral_fast.atomic import is_temp_name
from mistral_fast.config import load_config
from mistral_fast.manifest import ManifestError, read_manifest, update_manifest, verify_run, write_manifest

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def fake_run(tmp_path: Path):
    """A run directory as a finished run leaves it, without training (the manifest needs no model)."""
    run = tmp_path / "run"
    cfg = load_config("smoke", [f"train.output_dir={run}", "train.seed=7"])
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"\x00" * 1000)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "result.json").write_text('{"ok": true}')
    (run / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (run / "checkpoints" / "checkpoint-2" / "optimizer.pt").write_bytes(b"x" * 100)
    (run / "half.tmp").write_text("a temp file of an atomic write in progress")
    cfg.save(run / "run_config.yaml")
    return cfg, run


def verify_cli(run: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mistral_fast.cli", "verify", str(run)], capture_output=True, text=True, env=ENV
    )


def test_manifest_records_config_versions_seed_data_and_files(tmp_path) -> None:
    cfg, run = fake_run(tmp_path)
    manifest = json.loads(write_manifest(cfg).read_text())
    assert manifest["seed"] == 7 and manifest["config"] == cfg.to_dict()
    for name in ("torch", "transformers", "trl", "peft", "bitsandbytes", "datasets", "accelerate", "mistral_common"):
        assert manifest["packages"][name], name
    assert "mistral_fast" in manifest["packages"] and manifest["python"] == sys.version.split()[0]
    data = Path(cfg.data.path)
    assert manifest["data"]["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert sorted(manifest["files"]) == [
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "result.json",
        "run_config.yaml",
    ]  # checkpoints/, temp files and the manifest itself are left out
    entry = manifest["files"]["adapter/adapter_model.safetensors"]
    assert entry == {"sha256": hashlib.sha256(b"\x00" * 1000).hexdigest(), "size": 1000}
    leftovers = [p.name for p in run.iterdir() if p.name not in ("half.tmp",) and is_temp_name(p.name)]
    assert not leftovers and not list(run.glob("tmp*"))  # the atomic write left nothing


def test_verify_reports_missing_changed_and_untracked(tmp_path) -> None:
    cfg, run = fake_run(tmp_path)
    write_manifest(cfg)
    assert verify_run(run)["ok"] and not verify_run(run)["changed"]
    assert verify_run(run)["data"] == [f"{Path(cfg.data.path).resolve()}: unchanged"]
    ok = verify_cli(run)
    assert ok.returncode == 0 and "all 4 files match" in ok.stdout, ok.stderr

    weights = run / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(b"\x00" * 999 + b"\x01")  # same size, one byte flipped
    (run / "result.json").unlink()
    (run / "extra.txt").write_text("not from the run")
    report = verify_run(run)
    assert report["changed"] == ["adapter/adapter_model.safetensors"] and report["missing"] == ["result.json"]
    assert report["untracked"] == ["extra.txt"]
    bad = verify_cli(run)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert (
        bad.stderr.strip().splitlines()[-1]
        == f"error: {run}: 1 missing, 1 changed of 4 files in manifest.json — restore them or re-run"
    )
    assert "changed: adapter/adapter_model.safetensors" in bad.stdout and "missing: result.json" in bad.stdout


def test_update_manifest_adds_files_written_later(tmp_path) -> None:
    cfg, run = fake_run(tmp_path)
    write_manifest(cfg)
    (run / "export").mkdir()
    (run / "export" / "model-f16.gguf").write_bytes(b"GGUF" + b"\x00" * 60)
    (run / "export" / "Modelfile").write_text("FROM ./model-f16.gguf\n")
    update_manifest(run, [run / "export"])
    files = read_manifest(run)["files"]
    assert {"export/model-f16.gguf", "export/Modelfile", "result.json"} <= set(files)
    assert verify_cli(run).returncode == 0
    (tmp_path / "elsewhere.txt").write_text("not the run's")
    with pytest.raises(ManifestError, match="outside the run directory"):
        update_manifest(run, [tmp_path / "elsewhere.txt"])
    with pytest.raises(ManifestError, match="outside the run directory"):
        update_manifest(run, [run / ".." / "elsewhere.txt"])
    with pytest.raises(ManifestError, match="no such file"):
        update_manifest(run, ["export/never-written.gguf"])
    update_manifest(run, ["export/Modelfile"])  # relative to the run directory works too


def test_no_or_broken_manifest_is_an_actionable_error(tmp_path) -> None:
    with pytest.raises(ManifestError, match="no manifest"):
        verify_run(tmp_path)
    (tmp_path / "manifest.json").write_text("{ half a manifest")
    with pytest.raises(ManifestError, match="unreadable manifest"):
        verify_run(tmp_path)


@pytest.mark.slow
def test_a_real_run_writes_a_manifest_that_verifies(tmp_path) -> None:
    from mistral_fast.pipeline import run

    overrides = ["data.max_examples=8", "model.max_seq_length=128", "train.max_steps=2", "train.eval_steps=2"]
    overrides += [
        "train.save_steps=2",
        f"train.output_dir={tmp_path / 'run'}",
        "eval.num_samples=1",
        "eval.max_new_tokens=4",
    ]
    cfg = load_config("smoke", overrides)
    run(cfg)
    manifest = read_manifest(tmp_path / "run")
    assert manifest["config"]["train"]["output_dir"] == str(tmp_path / "run")
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "result.json", "run_config.yaml",
                 "metrics.jsonl", "eval.json"):  # fmt: skip
        assert name in manifest["files"], (name, sorted(manifest["files"]))
    assert any(name.startswith("tensorboard/") for name in manifest["files"])
    assert not any(name.startswith("checkpoints/") for name in manifest["files"])
    assert verify_cli(tmp_path / "run").returncode == 0


def test_atomic_write_removes_only_what_killed_writers_left(tmp_path) -> None:
    """Leftovers of a dead process on this host go; a live process's and another host's stay."""
    import socket
    import subprocess
    import sys

    from mistral_fast.atomic import temp_sibling, write_text_atomic

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid, host = int(dead.stdout), socket.gethostname()
    final = tmp_path / "model.gguf"
    stale_file = tmp_path / f".model.gguf.tmp-{host}-{dead_pid}"
    stale_file.write_bytes(b"x" * 1000)
    stale_dir = tmp_path / f".model.gguf.old-{host}-{dead_pid}"
    (stale_dir / "sub").mkdir(parents=True)
    live = tmp_path / f".model.gguf.tmp-{host}-1"  # pid 1 is alive
    other_host = tmp_path / f".model.gguf.tmp-elsewhere-{dead_pid}"
    unrelated = tmp_path / f".model.gguf2.tmp-{host}-{dead_pid}"
    for path in (live, other_host, unrelated):
        path.write_text("keep")
    write_text_atomic(final, "new")
    assert final.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (final, live, other_host, unrelated))
    assert temp_sibling(final).name == f".model.gguf.tmp-{host}-{os.getpid()}"
