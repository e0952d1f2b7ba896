"""`mistral-fast train` writes the exports its config asks for (`export.gguf`, `export.merged`), in the manifest."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.mark.slow
def test_train_with_export_gguf_writes_the_gguf_and_records_it(tmp_path) -> None:
    from gguf import GGUFReader

    from mistral_fast.manifest import read_manifest, verify_run

    run = tmp_path / "run"
    sets = ["data.max_examples=8", "model.max_seq_length=128", "train.max_steps=2", "train.eval_steps=2"]
    sets += ["train.save_steps=2", "eval.num_samples=1", "eval.max_new_tokens=4", f"train.output_dir={run}"]
    sets += ["export.gguf=[q8_0]", "export.merged=true"]
    argv = [sys.executable, "-m", "mistral_fast.cli", "train", "smoke", *(f"--set={s}" for s in sets)]
    done = subprocess.run(argv, capture_output=True, text=True, env=ENV, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]

    gguf = run / "export" / "model-q8_0.gguf"
    reader = GGUFReader(gguf)  # a real GGUF, the type the config asked for
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == "llama"
    assert any(t.tensor_type.name == "Q8_0" for t in reader.tensors)
    assert (run / "export" / "merged" / "model.safetensors").is_file()
    exported = json.loads((run / "export" / "export.json").read_text())
    assert set(exported["gguf"]) == {"q8_0"} and exported["merged"] == str(run / "export" / "merged")

    files = read_manifest(run)["files"]
    assert {"export/model-q8_0.gguf", "export/model-q8_0.Modelfile", "export/export.json"} <= set(files)
    assert "export/merged/model.safetensors" in files
    report = verify_run(run)
    assert not report["missing"] and not report["changed"] and not report["untracked"], report
