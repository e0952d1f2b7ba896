"""The papermill runner: parameters refused before a kernel starts, failures reported with the cell,
output notebooks kept and scrubbed of secrets, and sweeps with a results table, skip and retry."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import nbformat
import pytest
import yaml
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from mistral_fast.cli import main
from mistral_fast.errors import ConfigError, NotebookError
from mistral_fast.runner import NOTEBOOKS_DIR, check_parameters, looks_secret, read_parameters, run_notebook, run_sweep

FINETUNE = "01_finetune"
FAST = {"train.max_steps": 3, "train.eval_steps": 3, "train.save_steps": 3, "data.max_examples": 24}
FAST |= {"eval.num_samples": 1, "eval.max_new_tokens": 4}


def small_notebook(path: Path, *cells: str) -> Path:
    params = new_code_cell('run_dir = "out"  # where results go\nx = 1  # a number')
    params.metadata["tags"] = ["parameters"]
    nb = new_notebook(cells=[new_markdown_cell("# test"), params, *(new_code_cell(c) for c in cells)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"lora_rnak": 8}, "has no parameter 'lora_rnak'"),
        ({"lora_rank": "eight"}, "lora.rank='eight' is invalid: expected int"),
        ({"lora_rank": 8.5}, "lora.rank=8.5 is invalid: expected int"),
        ({"eval_num_samples": True}, "eval.num_samples=True is invalid"),
        ({"smoke": "yes"}, "smoke='yes': expected bool"),
        ({"lora_targets": "everything"}, "lora.targets"),
        ({"overrides": {"train.max_steps": "many"}}, "train.max_steps='many'"),
        ({"overrides": {"train.nope": 1}}, "not a config field"),
        ({"hf_token": "abc"}, "looks like a secret"),
        ({"model_name_or_path": "hf_" + "a" * 30}, "looks like a secret"),
    ],
)
def test_bad_parameters_fail_before_a_kernel_starts(params, message, tmp_path) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        run_notebook(FINETUNE, params, output=tmp_path / "out.ipynb")
    # no wall-clock bound (2 busy cores): the runner keeps the output notebook of every kernel it starts, so no
    # output notebook means no kernel was started
    assert not (tmp_path / "out.ipynb").exists(), "no kernel was started"


def test_good_parameters_are_coerced() -> None:
    values = {"train_learning_rate": "1e-3", "train_epochs": 2, "lora_targets": ["q_proj", "v_proj"]}
    checked = check_parameters("notebooks/01_finetune.ipynb", values)
    assert checked == {"train_learning_rate": 0.001, "train_epochs": 2.0, "lora_targets": ["q_proj", "v_proj"]}


def test_secret_detection() -> None:
    assert looks_secret("hf_token", "x") and looks_secret("api_key", 1) and looks_secret("db_password", "")
    assert looks_secret("anything", "hf_abcdefghijklmnopqrstuvwxyz")
    assert not looks_secret("eval_max_new_tokens", 128) and not looks_secret("keyboard", "x")


def test_parameters_cell_must_be_commented_literals(tmp_path) -> None:
    nb = small_notebook(tmp_path / "a.ipynb")
    assert set(read_parameters(nb)) == {"run_dir", "x"}
    bad = nbformat.read(nb, as_version=4)
    bad.cells[1].source = "x = 1 + 1  # derived"
    nbformat.write(bad, tmp_path / "b.ipynb")
    with pytest.raises(NotebookError, match="plain literal"):
        read_parameters(tmp_path / "b.ipynb")
    bad.cells[1].source = "x = 1"
    nbformat.write(bad, tmp_path / "c.ipynb")
    with pytest.raises(NotebookError, match="help"):
        read_parameters(tmp_path / "c.ipynb")


def test_cli_reports_a_bad_parameter_in_one_line(capsys) -> None:
    assert main(["notebook", "run", FINETUNE, "-p", "lora_rank", "eight"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "lora_rank" in err and "expected int" in err


@pytest.mark.slow
def test_failing_cell_is_reported_and_the_output_kept(tmp_path) -> None:
    nb = small_notebook(tmp_path / "fail.ipynb", "y = x + 1", "raise ValueError(f'boom {y}')", "z = 3")
    expected = r"fail.ipynb: cell 3 \(`raise ValueError.*\) failed: ValueError: boom 2; output notebook kept"
    with pytest.raises(NotebookError, match=expected) as info:
        run_notebook(nb, {"x": 1}, output=tmp_path / "out" / "fail.ipynb", cwd=tmp_path, timeout=60)
    out = nbformat.read(tmp_path / "out" / "fail.ipynb", as_version=4)
    failed = next(c for c in out.cells if c.source.startswith("raise"))
    assert [o.get("ename") for o in failed.outputs] == ["ValueError"]
    assert str(tmp_path / "out" / "fail.ipynb") in str(info.value)


@pytest.mark.slow
def test_kernel_is_this_environment_and_secrets_are_scrubbed(tmp_path, monkeypatch) -> None:
    token = "hf_" + "Xy9" * 12
    monkeypatch.setenv("HF_TOKEN", token)
    cells = (
        "import os, sys, json, pathlib\nprint(os.environ['HF_TOKEN'])",
        "pathlib.Path(run_dir).mkdir(exist_ok=True)\n"
        "pathlib.Path(run_dir, 'results.json').write_text(json.dumps({'exe': sys.executable, 'cwd': os.getcwd()}))",
    )
    nb = small_notebook(tmp_path / "s.ipynb", *cells)
    done = run_notebook(nb, {}, output=tmp_path / "s-out.ipynb", cwd=tmp_path, timeout=60)
    assert done.results == {"exe": sys.executable, "cwd": str(tmp_path)}
    text = (tmp_path / "s-out.ipynb").read_text()
    assert token not in text and "***" in text
    meta = nbformat.reads(text, as_version=4).metadata
    assert meta.kernelspec.name == "python3", "the output keeps the source's kernelspec (the pinned one was temporary)"
    assert meta.mistral_fast.python == sys.executable


@pytest.mark.slow
def test_sweep_writes_a_table_skips_finished_and_survives_a_failure(tmp_path, monkeypatch) -> None:
    spec = {
        "notebook": FINETUNE,
        "parameters": {"smoke": True, "overrides": FAST},
        "grid": {"lora_rank": [4, 8]},
        "variations": [{"lora_rank": 4, "data_path": str(tmp_path / "missing.jsonl")}],
        "out": str(tmp_path / "sweep"),
        "timeout": 300,
    }
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump(spec))
    monkeypatch.chdir(tmp_path)  # restored after the test
    rows, paths = run_sweep(sweep)
    first = {r["name"]: r for r in rows}
    again, _ = run_sweep(sweep)  # finished variations are skipped; the failed one is retried
    assert [r["status"] for r in rows] == ["done", "done", "failed"]
    assert all(r["eval_loss"] and r["perplexity"] and r["tokens_per_second"] for r in rows[:2])
    with paths["csv"].open() as handle:
        table = list(csv.DictReader(handle))
    assert [t["lora_rank"] for t in table] == ["4", "8", "4"]
    # what each run *used*, read from its own run directory: our resolved config and peft's adapter_config.json
    assert_runs_used(Path(spec["out"]), rows[:2], [{"lora.rank": 4}, {"lora.rank": 8}])
    assert [adapter_rank(Path(spec["out"]) / r["name"]) for r in rows[:2]] == [4, 8]
    assert {"train_loss", "eval_loss", "perplexity", "tokens_per_second", "peak_memory_mb", "wall_seconds"} <= set(
        table[0]
    )
    assert paths["markdown"].read_text().startswith("| name |")
    assert paths["plot"].read_bytes()[:4] == b"\x89PNG"
    for row in again[:2]:
        assert row["wall_seconds"] == first[row["name"]]["wall_seconds"], "finished variations are not re-run"
    status = json.loads((Path(spec["out"]) / rows[2]["name"] / "status.json").read_text())
    assert status["status"] == "failed" and "missing.jsonl" in status["error"]
    assert Path(status["output_notebook"]).is_file(), "the failed notebook is kept"


def assert_runs_used(out: Path, rows: list[dict], expected: list[dict[str, object]]) -> None:
    """Each finished variation's run used the values it was given: read from the run's own ``run_config.yaml``
    (the config `pipeline.run` resolved and trained with), never from the sweep row, which `runner._row` copies
    from the sweep spec itself (it would pass with a notebook that ignores the parameter)."""
    assert len(rows) == len(expected)
    for row, want in zip(rows, expected, strict=True):
        used = yaml.safe_load((out / row["name"] / "run" / "run_config.yaml").read_text())
        for dotted, value in want.items():
            section, name = dotted.split(".")
            assert used[section][name] == value, f"{row['name']}: the run used {dotted}={used[section][name]}"


def adapter_rank(variation_dir: Path) -> int:
    """The LoRA rank peft saved with the variation's adapter (its own ``adapter_config.json``)."""
    return json.loads((variation_dir / "run" / "adapter" / "adapter_config.json").read_text())["r"]


# 01_finetune up to its config cell, then the run config saved and results written: no training. With IGNORE the
# config cell drops the notebook's lora_rank (a notebook that ignores a parameter; the sweep must not pass it).
IGNORE = 'cfg = mf.notebook_config({**globals(), "lora_rank": 16})'


def _config_only_notebook(path: Path, *, ignore: bool) -> Path:
    nb = nbformat.read(NOTEBOOKS_DIR / "01_finetune.ipynb", as_version=4)
    keep = next(i for i, c in enumerate(nb.cells) if "mf.notebook_config(globals())" in c.source)
    nb.cells = nb.cells[: keep + 1]
    if ignore:
        nb.cells[keep].source = "import mistral_fast as mf\n" + IGNORE
    save = "from pathlib import Path\nPath(cfg.train.output_dir).mkdir(parents=True, exist_ok=True)\n"
    save += 'cfg.save(Path(cfg.train.output_dir) / "run_config.yaml")\n'
    save += "mf.write_results(cfg.train.output_dir, config=cfg)"
    nb.cells.append(new_code_cell(save))
    nbformat.write(nb, path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("ignore", [False, True], ids=["honest", "ignores-lora_rank"])
def test_the_sweep_check_fails_for_a_notebook_that_ignores_its_parameter(tmp_path, ignore) -> None:
    notebook = _config_only_notebook(tmp_path / "nb.ipynb", ignore=ignore)
    spec = {"notebook": str(notebook), "parameters": {"smoke": True}, "grid": {"lora_rank": [4, 8]}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(spec))
    rows, _ = run_sweep(tmp_path / "sweep.yaml", out=str(tmp_path / "out"))
    assert [r["status"] for r in rows] == ["done", "done"] and [r["lora_rank"] for r in rows] == [4, 8]
    if ignore:  # the row still says 4 and 8 (copied from the spec); the runs say 16
        with pytest.raises(AssertionError, match=r"the run used lora\.rank=16"):
            assert_runs_used(tmp_path / "out", rows, [{"lora.rank": 4}, {"lora.rank": 8}])
    else:
        assert_runs_used(tmp_path / "out", rows, [{"lora.rank": 4}, {"lora.rank": 8}])


def test_sweep_checks_every_variation_before_running(tmp_path, capsys) -> None:
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({"parameters": {"smoke": True}, "grid": {"lora_rank": [4, "big"]}}))
    assert main(["sweep", str(sweep), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "lora_rank" in err and "'big'" in err
    assert not (tmp_path / "out").exists(), "nothing ran"
    sweep.write_text(yaml.safe_dump({"grid": {"lora_rank": 4}}))
    assert main(["sweep", str(sweep)]) == 2
    assert "non-empty list" in capsys.readouterr().err


def test_the_example_sweep_is_valid() -> None:
    from mistral_fast.runner import NOTEBOOKS_DIR, load_sweep

    spec = load_sweep(NOTEBOOKS_DIR / "sweep_smoke.yaml")  # every variation checked, nothing run
    assert len(spec.variations) == 8 and spec.parameters["smoke"] is True
