"""Tool-call evaluation and the tools-smoke demo: call accuracy, the pipeline on tool data, notebook 06.

The accuracy that eval.json reports is re-derived here from the raw generations it keeps, with a parser
written for this test from mistral_common's v3 layout (``[TOOL_CALLS]`` then a JSON list of calls), not
with the package's `parse_tool_calls`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require_optional

from mistral_fast.config import DATA_DIR, load_config
from mistral_fast.data import Example
from mistral_fast.evaluate import EvalResult, calls_match, split_call_prompt, split_prompt

ROWS = [json.loads(line) for line in (DATA_DIR / "sample_tools.jsonl").read_text(encoding="utf-8").splitlines()]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
ADD = {"name": "calculate", "arguments": {"operation": "add", "a": 2, "b": 3}}
CAPITAL = {"name": "lookup_capital", "arguments": {"country": "Peru"}}


@pytest.mark.parametrize(
    ("predicted", "right"),
    [
        ([{**ADD, "id": "whatever1"}], True),  # ids are not compared
        ([{"name": "calculate", "arguments": {"b": 3.0, "a": 2, "operation": "add"}}], True),  # 3 == 3.0, any order
        ([{"name": "calculate", "arguments": '{"operation": "add", "a": 2, "b": 3}'}], True),  # JSON text
        ([{"name": "Calculate", "arguments": ADD["arguments"]}], False),  # names exact
        ([{"name": "calculate", "arguments": {"operation": "add", "a": 2, "b": "3"}}], False),  # "3" is not 3
        ([{"name": "calculate", "arguments": {"operation": "add", "a": 2, "b": 3, "c": 0}}], False),
        ([{"name": "calculate", "arguments": {"operation": "add", "a": True, "b": 3}}], False),  # true is not 1
        ([{"name": "calculate", "arguments": "{not json"}], False),
        ([ADD, ADD], False),  # one call too many
        ([], False),
    ],
)
def test_calls_match_is_names_exact_and_arguments_equal_as_json(predicted, right) -> None:
    assert calls_match(predicted, [ADD]) is right
    assert calls_match([CAPITAL, ADD], [ADD, CAPITAL])  # parallel calls in any order
    assert not calls_match([CAPITAL], [ADD, CAPITAL])


def test_call_prompts_end_before_the_call_and_text_prompts_skip_call_turns() -> None:
    row = next(r for r in ROWS if len(r["messages"]) == 4 and r["messages"][1].get("tool_calls"))
    example = Example(row["messages"], None, "x", row["tools"])
    prompt, calls = split_call_prompt(example)
    assert prompt == row["messages"][:1]
    expected = [
        {"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}
        for c in row["messages"][1]["tool_calls"]
    ]
    assert calls == expected
    text_prompt, answer = split_prompt(example)  # the final answer, after the result
    assert text_prompt == row["messages"][:3] and answer == row["messages"][3]["content"]
    cut = Example(row["messages"][:2], None, "x", row["tools"])  # a conversation that ends on its call
    assert split_prompt(cut) is None and split_call_prompt(cut) is not None
    assert (
        split_call_prompt(
            Example([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], None, "x")
        )
        is None
    )


def test_the_comparison_table_has_a_call_accuracy_row_only_for_tool_data() -> None:
    figures = {"loss": 1.0, "perplexity": 2.7, "eval_tokens": 9, "rouge_l": 0.5, "bleu": 1.0, "exact_match": 0.0}
    plain = EvalResult(**figures, base=dict(figures))
    assert "tool-call" not in plain.comparison_table()
    tools = EvalResult(**figures, base={**figures, "call_accuracy": 0.0}, call_accuracy=0.875, call_prompts=8)
    assert "| tool-call accuracy (8 prompts) | 0.0000 | 0.8750 |" in tools.comparison_table()


def test_the_tools_smoke_preset_reads_the_shipped_sample_from_anywhere(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_config("tools-smoke")
    assert Path(cfg.data.path) == DATA_DIR / "sample_tools.jsonl" and Path(cfg.data.path).is_file()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "sample_tools.jsonl").write_text("{}\n")
    assert load_config("tools-smoke").data.path == "data/sample_tools.jsonl"  # a file of the user's own wins


def _calls_after_tool_calls_token(raw: str) -> list[dict] | None:
    """mistral_common's v3 layout, parsed independently: ``[TOOL_CALLS]`` then a JSON list of calls."""
    if "[TOOL_CALLS]" not in raw:
        return None
    try:  # the calls' JSON, whatever follows it (a generation cut by max_new_tokens)
        calls, _ = json.JSONDecoder().raw_decode(raw.split("[TOOL_CALLS]", 1)[1].strip())
    except json.JSONDecodeError:
        return None
    return calls if isinstance(calls, list) else None


def _right(raw: str, reference: list[dict]) -> bool:
    calls = _calls_after_tool_calls_token(raw)
    if calls is None or len(calls) != len(reference):
        return False
    key = lambda c: c.get("name", "")  # noqa: E731
    return all(
        c.get("name") == r["name"] and c.get("arguments") == r["arguments"]
        for c, r in zip(sorted(calls, key=key), sorted(reference, key=key), strict=True)
    )


# ------------------------------------------------------------------------- the demo, through notebook 06


@pytest.fixture(scope="module")
def tools_notebook(tmp_path_factory):
    """06_tools with smoke=True (the tools-smoke preset, hf backend) and the merged + GGUF exports: one
    trained run that every test below reads."""
    from mistral_fast.runner import run_notebook

    tmp = tmp_path_factory.mktemp("tools")
    params = {"smoke": True, "train_output_dir": "run", "overrides": {"export.merged": True, "export.gguf": ["f16"]}}
    done = run_notebook("06_tools", params, output=tmp / "06.ipynb", cwd=tmp, timeout=1500)
    return tmp / "run", done


@pytest.mark.slow
def test_tools_smoke_learns_the_call_format_and_scores_it(tools_notebook) -> None:
    """The issue's bar: the tiny model goes from ~0 to >= 0.8 held-out call accuracy. Measured on 2026-12-05
    through this notebook (600 steps): 0.81 (26 of 32) with 64 new tokens, which cut two-call turns short."""
    from mistral_fast.tokenizer import parse_tool_calls

    run, done = tools_notebook
    evaluation = json.loads((run / "eval.json").read_text(encoding="utf-8"))
    samples = evaluation["call_samples"]
    assert evaluation["call_prompts"] == len(samples) >= 25
    assert evaluation["base"]["call_accuracy"] <= 0.1 and not any(s["base_calls"] for s in samples)
    assert evaluation["call_accuracy"] >= 0.8
    assert sum(_calls_after_tool_calls_token(s["tuned_raw"]) is not None for s in samples) >= 0.9 * len(samples)
    assert all(s["tuned_calls"] == parse_tool_calls(s["tuned_raw"], "v3") for s in samples)
    rederived = [_right(s["tuned_raw"], s["reference"]) for s in samples]
    assert [s["tuned_right"] for s in samples] == rederived
    assert evaluation["call_accuracy"] == sum(rederived) / len(samples)
    assert done.results["run"]["evaluation"]["call_accuracy"] == evaluation["call_accuracy"]


@pytest.mark.slow
def test_tools_smoke_run_merges_and_writes_a_gguf_llama_cpp_loads(tools_notebook) -> None:
    run, _ = tools_notebook
    require_optional("llama_cpp")
    import llama_cpp

    assert (run / "export" / "merged" / "model.safetensors").is_file()
    gguf = run / "export" / "model-f16.gguf"
    model = llama_cpp.Llama(model_path=str(gguf), n_ctx=512, verbose=False)
    assert model.n_vocab() == 32768
    assert "[TOOL_CALLS]" in model.metadata["tokenizer.chat_template"]  # the exported template handles calls
    modelfile = (run / "export" / "model-f16.Modelfile").read_text(encoding="utf-8")  # Ollama's, with tools too
    assert "[AVAILABLE_TOOLS]" in modelfile and "{{- if .ToolCalls }}[TOOL_CALLS]" in modelfile


@pytest.mark.slow
@pytest.mark.unsloth
def test_unsloth_cpu_fallback_runs_the_pipeline_on_tool_data(tmp_path) -> None:
    require_optional("unsloth")
    run = tmp_path / "run"
    overrides = {
        "model.backend": "unsloth",
        "train.max_steps": 2,
        "train.eval_steps": 2,
        "train.save_steps": 2,
        "data.max_examples": 40,
        "eval.num_samples": 2,
        "eval.max_new_tokens": 8,
        "export.merged": "true",
        "export.gguf": "[f16]",
        "train.output_dir": str(run),
    }
    argv = [sys.executable, "-m", "mistral_fast.cli", "train", "tools-smoke"]
    for key, value in overrides.items():
        argv += ["--set", f"{key}={value}"]
    proc = subprocess.run(argv, capture_output=True, text=True, env=ENV, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((run / "result.json").read_text())
    assert result["train"]["backend"] == "unsloth" and result["train"]["steps"] == 2
    evaluation = json.loads((run / "eval.json").read_text())
    assert evaluation["call_prompts"] == 2 and len(evaluation["call_samples"]) == 2
    assert (run / "export" / "model-f16.gguf").is_file() and (run / "export" / "merged" / "model.safetensors").is_file()
