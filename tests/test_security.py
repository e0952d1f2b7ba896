"""Secrets and trust: no token in any file a run writes, no remote code, safetensors only, no path traversal."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import yaml
from conftest import require_optional

from mistral_fast.config import CONFIGS_DIR, RunConfig, load_config
from mistral_fast.errors import ConfigError
from mistral_fast.runner import variation_name

TOKEN = "hf_FakeTokenForLeakScan" + "Q7z" * 6  # looks like a real one (hf_ + 30+ alphanumerics)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def cli(*argv: str) -> list[str]:
    return [sys.executable, "-m", "mistral_fast.cli", *argv]


@pytest.fixture(scope="module")
def run_with_token(tmp_path_factory):
    """A training run and a notebook run over it, both with HF_TOKEN (and a W&B key) in the environment."""
    root = tmp_path_factory.mktemp("secret")
    run = root / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_TOKEN": TOKEN, "HUGGING_FACE_HUB_TOKEN": TOKEN}
    env["WANDB_API_KEY"] = "0123456789abcdef" * 2
    env["MLFLOW_TRACKING_PASSWORD"] = "mlflow-Pa55word-" + "x7" * 8
    # the trackers in their local modes: MLflow's sqlite store (and its artifacts) and W&B's offline run files
    env |= {"MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    env |= {"WANDB_CACHE_DIR": str(root / "wandb-cache"), "WANDB_DATA_DIR": str(root / "wandb-data")}
    for module in ("mlflow", "wandb"):
        require_optional(module)
    overrides = ["data.max_examples=8", "model.max_seq_length=128", "train.max_steps=2", "train.eval_steps=2"]
    overrides += ["train.save_steps=2", "train.logging_steps=1", "eval.num_samples=1", "eval.max_new_tokens=4"]
    overrides += ["train.report_to=[tensorboard,mlflow,wandb]"]
    train = subprocess.run(
        cli("--debug", "train", "smoke", *(f"--set={o}" for o in overrides), f"--set=train.output_dir={run}"),
        capture_output=True, text=True, env=env, cwd=root,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    params = ["-p", "run_dir", str(run), "-p", "num_samples", "1", "-p", "max_new_tokens", "4", "-p", "smoke", "true"]
    notebook = subprocess.run(
        cli("notebook", "run", "02_evaluate", *params, "--out", str(run / "notebooks"), "--timeout", "300"),
        capture_output=True, text=True, env=env, cwd=root,
    )  # fmt: skip
    assert notebook.returncode == 0, notebook.stderr[-3000:]
    logs = {"train stdout": train.stdout, "train stderr": train.stderr}
    logs |= {"notebook stdout": notebook.stdout, "notebook stderr": notebook.stderr}
    return run, logs, env


@pytest.mark.slow
def test_token_from_the_environment_is_in_no_file_or_log(run_with_token) -> None:
    run, logs, env = run_with_token
    # the run directory (with W&B's offline run inside it) and MLflow's store: database and artifacts
    files = [p for p in run.parent.rglob("*") if p.is_file()]
    kinds = {p.suffix for p in files} | {"tfevents" for p in files if ".tfevents." in p.name}
    # the scan covers every kind the issue names: notebook, manifest, metrics/logs, TensorBoard events, trackers
    assert {".ipynb", ".json", ".jsonl", ".yaml", "tfevents", ".wandb", ".db"} <= kinds, kinds
    assert (run / "manifest.json").is_file() and list(run.parent.glob("mlruns/*/*/artifacts/manifest.json"))
    for secret in (TOKEN, env["WANDB_API_KEY"], env["MLFLOW_TRACKING_PASSWORD"]):
        for needle in (secret.encode(), secret.encode("utf-16-le"), secret[3:].encode()):
            leaked = [str(p.relative_to(run.parent)) for p in files if needle in p.read_bytes()]
            assert not leaked, f"secret found in {leaked}"
        for name, text in logs.items():
            assert secret not in text, f"secret found in {name}"


def test_trust_remote_code_is_off_unless_asked_for() -> None:
    assert RunConfig().model.trust_remote_code is False
    for preset in sorted(CONFIGS_DIR.glob("*.yaml")):
        assert load_config(preset).model.trust_remote_code is False, preset.name
    assert load_config("smoke", ["model.trust_remote_code=true"]).model.trust_remote_code is True
    with pytest.raises(ConfigError, match=r"model\.trust_remote_code"):
        load_config("smoke", ["model.trust_remote_code=yes please"])


def test_weights_load_as_safetensors_only_and_without_remote_code(monkeypatch) -> None:
    """The real tiny model loads through transformers with use_safetensors=True, trust_remote_code=False."""
    from transformers import AutoModelForCausalLM

    from mistral_fast.modeling import load_model

    seen: list[dict] = []
    real = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, path, *args, **kwargs):  # records the arguments, then loads for real
        seen.append(kwargs)
        return real(cls, path, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    load_model(load_config("smoke", ["model.backend=hf"]), for_training=False)
    assert seen and seen[0]["use_safetensors"] is True and seen[0]["trust_remote_code"] is False


def test_a_pickle_only_model_directory_is_refused(tmp_path) -> None:
    from mistral_fast.errors import ModelError
    from mistral_fast.modeling import resolve_model_path

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "mistral"}')
    (model / "pytorch_model.bin").write_bytes(b"a pickle could run code here")
    with pytest.raises(ModelError, match=r"model.name_or_path=.*only pickled weights.*safetensors"):
        resolve_model_path(str(model))
    (model / "model.safetensors").write_bytes(b"")  # with safetensors beside it the .bin is simply ignored
    assert resolve_model_path(str(model)) == str(model)


@pytest.mark.slow
def test_runs_write_safetensors_not_pickles(run_with_token) -> None:
    run, _, _ = run_with_token
    adapter = run / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    outside_checkpoints = [p for p in run.rglob("*") if p.is_file() and "checkpoints" not in p.relative_to(run).parts]
    assert not [p for p in outside_checkpoints if p.suffix in PICKLE_SUFFIXES]
    # checkpoints hold the Trainer's own optimizer/RNG state (torch files written by this run, read back only
    # by a resume of the same run); their weights are safetensors too
    for ckpt in (run / "checkpoints").glob("checkpoint-*"):
        assert (ckpt / "adapter_model.safetensors").is_file() and not list(ckpt.glob("*model*.bin"))


@pytest.mark.parametrize(
    "value",
    ["../../etc", "../../../tmp/evil", "/etc/passwd", "..", "a/../../b", "~/x", "C:\\Windows\\x", "name\x00nul"],
)
def test_sweep_variation_names_stay_inside_the_sweep_directory(tmp_path, value) -> None:
    """Variation values (a data set or model name among them) become one directory name, never a path."""
    name = variation_name(3, {"data_path": value, "model_name_or_path": value})
    assert "/" not in name and "\\" not in name and "\x00" not in name and name not in (".", "..")
    target = (tmp_path / name).resolve()
    assert target.parent == tmp_path.resolve()


@pytest.mark.parametrize(
    "override", ["model.name_or_path=../../../../mf-evil-model", "data.path=../../../../mf-evil-data.jsonl"]
)
def test_model_and_data_names_never_become_write_paths(tmp_path, override) -> None:
    """A traversal-shaped model or data name is refused, and nothing is written anywhere but the run dir."""
    work = tmp_path / "a" / "b" / "c" / "d"
    work.mkdir(parents=True)
    before = {p for p in tmp_path.rglob("*")}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(cli("train", "smoke", f"--set={override}", "--set=train.output_dir=run"),
                          capture_output=True, text=True, env=env, cwd=work)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {override.split('=')[0]}=")
    assert {p for p in tmp_path.rglob("*")} == before, "something was written"


def test_export_file_names_come_from_an_allow_list() -> None:
    """GGUF file names are built from the quantisation type, which must be one of a fixed set."""
    for bad in ("../evil", "q4_k_m/../../x", "f16; rm -rf"):
        with pytest.raises(ConfigError, match=r"export\.gguf"):
            load_config("smoke", {"export.gguf": [bad]})


def test_sweep_out_from_a_file_is_the_users_choice_but_names_are_not(tmp_path) -> None:
    from mistral_fast.runner import load_sweep

    spec = {"notebook": "01_finetune", "parameters": {"smoke": True}, "grid": {"data_path": ["../../x.jsonl"]}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    loaded = load_sweep(tmp_path / "s.yaml", out=str(tmp_path / "out"))
    name = variation_name(0, loaded.variations[0])
    assert (tmp_path / "out" / name).resolve().parent == (tmp_path / "out").resolve()


# ------------------------------------------------------------------ the token printed by a cell (streamed, killed)


def _leaky_notebook(path, *extra_cells: str):
    """A notebook whose cell prints HF_TOKEN to stdout and to stderr (what a careless debugging cell does)."""
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    params = new_code_cell('run_dir = "out"  # where results go')
    params.metadata["tags"] = ["parameters"]
    leak = (
        "import os, sys\n"
        "print('token:', os.environ['HF_TOKEN'])\n"
        "print('err:', os.environ['HF_TOKEN'], file=sys.stderr)"
    )
    nb = new_notebook(cells=[params, new_code_cell(leak), *(new_code_cell(c) for c in extra_cells)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def _files_with_token(root) -> list[str]:
    from pathlib import Path

    return [str(p) for p in Path(root).rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]


def test_token_printed_by_a_cell_reaches_neither_terminal_nor_disk(tmp_path) -> None:
    """`notebook run` streams cell output to the terminal: the token a cell prints must arrive as ***."""
    nb = _leaky_notebook(tmp_path / "leak.ipynb")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_TOKEN": TOKEN}
    proc = subprocess.run(
        cli("notebook", "run", str(nb), "--out", str(tmp_path / "out"), "--timeout", "120"),
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    terminal = proc.stdout + proc.stderr
    assert TOKEN not in terminal, "the streamed cell output printed the token"
    # the cell's output was streamed (scrubbed), from stdout and from stderr: the check above saw it
    assert "token: ***" in terminal and "err: ***" in terminal, terminal[-3000:]
    assert _files_with_token(tmp_path) == []


def test_token_is_on_no_intermediate_save_of_a_killed_notebook_run(tmp_path) -> None:
    """Killed in the cell after the one that printed the token: papermill's saves so far hold no token."""
    import signal
    import time

    nb = _leaky_notebook(tmp_path / "leak.ipynb", "from mistral_fast.pause import pause_point\npause_point('cell')")
    marker = tmp_path / "paused"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_TOKEN": TOKEN}
    env |= {"MISTRAL_FAST_TEST_PAUSE_AT": "cell", "MISTRAL_FAST_TEST_PAUSE_MARKER": str(marker)}
    out, err = tmp_path / "terminal.out", tmp_path / "terminal.err"
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen(
            cli("notebook", "run", str(nb), "--out", str(tmp_path / "out"), "--timeout", "120"),
            stdout=stdout, stderr=stderr, env=env, cwd=tmp_path, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while not marker.exists():  # the kernel waits in the pause cell: the leak cell is done and saved
            assert proc.poll() is None, err.read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # the CLI mid-run (no final scrub), and the kernel (jupyter_client starts it in a session of its own)
        os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):  # gone already if it shared the group
            os.kill(int(marker.read_text()), signal.SIGKILL)
        proc.wait()
    assert _files_with_token(tmp_path) == [], "a file left by the killed run holds the token"
    terminal = out.read_text() + err.read_text()
    assert TOKEN not in terminal and "token: ***" in terminal and "err: ***" in terminal, terminal[-3000:]
    saved = (tmp_path / "out" / "leak.ipynb").read_text(encoding="utf-8")
    assert "token: ***" in saved and "err: ***" in saved, "the intermediate save did not have the cell's output"
    assert "pause_point('cell')" in saved
