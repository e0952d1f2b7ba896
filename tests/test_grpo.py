"""GRPO (``train.method: grpo``) on the hf backend: rewards, exact prompt ids, the trained run and its figures.

One GRPO run of the `grpo-smoke` preset (shortened) is shared by the tests that read a run directory; the
unsloth backend runs the same preset through the CLI in its own process (tests/test_unsloth_grpo.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mistral_fast.config import load_config
from mistral_fast.errors import ConfigError, DataError
from mistral_fast.rewards import RewardError, resolve_rewards

# the grpo-smoke preset's first 10 of 60 GRPO steps (constant learning rate, deterministic on a CPU: the same first
# 10 steps as the preset's), measured 0.067 -> 0.733 held-out at step 10 (the full preset: 0.067 -> 1.000); the
# 45 warm-up steps, 10 GRPO steps and two greedy evaluations take under a minute on one core
SHARED = ["train.max_steps=10", "eval.num_samples=4"]


# ------------------------------------------------------------------------------------------ rewards, no model


def test_builtin_rewards_score_answers() -> None:
    numeric, exact, fmt = resolve_rewards(["numeric_answer", "exact_answer", "regex_format"], tolerance=0.01)
    where, columns = "x.jsonl:1", {"answer": "7000", "unit": "m"}
    assert numeric("Convert 7 km to m.", "7 km = 7000 m", where, columns) == 1.0  # the last number counts
    assert numeric("q", "7,000", where, columns) == 1.0 and numeric("q", "7050", where, columns) == 1.0  # 1 %
    assert numeric("q", "7100", where, columns) == 0.0 and numeric("q", "no number", where, columns) == 0.0
    assert exact("q", " 7000. ", where, columns) == 1.0 and exact("q", "7000 m", where, columns) == 0.0
    assert fmt("q", "7000", where, columns) == 1.0 and fmt("q", "7000 m", where, columns) == 0.0
    assert [r.columns for r in (numeric, exact, fmt)] == [("answer",), ("answer",), ()]


def test_tool_call_reward_reads_mistral_commons_v3_tool_call() -> None:
    """The completion text is what our tokenizer decodes from mistral_common's own encoding of a tool call."""
    from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.tool_calls import FunctionCall, ToolCall

    from mistral_fast.tokenizer import load_tokenizer, reference_tokenizer

    call = ToolCall(id="abcdefghi", function=FunctionCall(name="get_weather", arguments='{"city": "Paris"}'))
    request = ChatCompletionRequest(
        messages=[UserMessage(content="Weather in Paris?"), AssistantMessage(tool_calls=[call])]
    )
    ids = reference_tokenizer("v3", "finetuning").encode_chat_completion(request).tokens
    answer = ids[ids.index(4) + 1 :]  # after [/INST]: [TOOL_CALLS] [...] </s>
    tokenizer = load_tokenizer("v3")
    (reward,) = resolve_rewards(["tool_call"])
    for text in (
        tokenizer.decode(answer, skip_special_tokens=False),
        tokenizer.decode(answer, skip_special_tokens=True),
    ):
        assert reward("q", text, "t.jsonl:1", {"tool_name": "get_weather"}) == 1.0, text
        assert reward("q", text, "t.jsonl:1", {"tool_name": "get_time"}) == 0.0
    assert (
        reward("q", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city"', "t:1", {"tool_name": "get_weather"})
        == 0
    )


def test_module_function_rewards_and_their_columns(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "my_rewards.py").write_text(
        "def short(prompt, completion, unit, **columns):\n    return float(completion.endswith(unit))\n"
        "def broken(prompt, completion, **columns):\n    return 'yes'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    short, broken = resolve_rewards(["my_rewards:short", "my_rewards:broken"])
    assert (short.name, short.columns, broken.columns) == ("short", ("unit",), ())
    assert short("q", "7000 m", "a.jsonl:3", {"unit": "m", "answer": "7000"}) == 1.0
    with pytest.raises(RewardError, match=r"^a\.jsonl:3: reward 'broken' returned 'yes' \(str\), not a finite number"):
        broken("q", "7000", "a.jsonl:3", {})
    with pytest.raises(ConfigError, match="module 'nope_mod' does not import"):
        resolve_rewards(["nope_mod:f"])
    with pytest.raises(ConfigError, match="neither a built-in"):
        resolve_rewards(["numeric"])


def test_a_reward_that_raises_inside_trls_call_names_the_prompt_and_the_reward() -> None:
    """TRL calls rewards batched with the dataset's columns (`_calculate_rewards`); ours names file:line."""
    from mistral_fast.rewards import rewards_from_callables
    from mistral_fast.train_grpo import trl_reward

    (bad,) = rewards_from_callables({"divide": lambda prompt, completion, answer, **_: 1 / (len(completion) - 4)})
    batched = trl_reward(bad)
    assert batched.__name__ == "divide" and bad.columns == ("answer",)
    kwargs = {"question": ["q1", "q2"], "where": ["p.jsonl:1", "p.jsonl:7"], "columns": ['{"answer": 1}'] * 2}
    with pytest.raises(RewardError, match=r"^p\.jsonl:7: reward 'divide' raised ZeroDivisionError"):
        batched(prompts=["a", "b"], completions=["12345", "1234"], completion_ids=[[1], [2]], **kwargs)


# ------------------------------------------------------------------------------------------ data: exact ids


def test_prompt_ids_are_mistral_commons_generation_prompts(tmp_path: Path) -> None:
    from mistral_fast.grpo import SAMPLE_GRPO, prepare_prompts
    from mistral_fast.tokenizer import reference_chat_ids

    extra = tmp_path / "p.jsonl"
    rows = [
        {
            "prompt": [
                {"role": "system", "content": "Answer with the number only."},
                {"role": "user", "content": "7 km in m?"},
            ],
            "answer": 7000,
        },
        {
            "messages": [
                {"role": "user", "content": "1 km in m?"},
                {"role": "assistant", "content": "1000"},
                {"role": "user", "content": "And  2 km?"},
            ],
            "answer": "2000",
        },
    ]
    extra.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for path in (SAMPLE_GRPO, extra):
        cfg = load_config("grpo-smoke", [f"data.path={path}", "data.eval_fraction=0.2"])
        data = prepare_prompts(cfg, resolve_rewards(cfg.train.rewards))
        for split, prompts in ((data.train, data.train_prompts), (data.eval, data.eval_prompts)):
            for row, prompt in zip(split, prompts, strict=True):
                assert row["prompt_ids"] == reference_chat_ids(prompt.messages, "v3", add_generation_prompt=True)
                assert json.loads(row["columns"]) == prompt.columns and row["where"].startswith(str(path))
    assert data.train_prompts[0].question in {"7 km in m?", "And  2 km?"}


def test_prompt_set_without_the_rewards_column_is_refused_with_file_line(tmp_path: Path) -> None:
    path = tmp_path / "q.jsonl"
    path.write_text('{"prompt": "Convert 7 km to m.", "answer": "7000"}\n{"prompt": "3 kg in g?"}\n')
    from mistral_fast.grpo import prepare_prompts

    cfg = load_config("grpo-smoke", [f"data.path={path}"])
    with pytest.raises(DataError, match=r"q\.jsonl:2: reward 'numeric_answer' needs column\(s\) \['answer'\]"):
        prepare_prompts(cfg, resolve_rewards(cfg.train.rewards))
    with pytest.raises(ConfigError, match=r"train\.max_completion_length=0 is invalid: an empty completion budget"):
        load_config("grpo-smoke", ["train.max_completion_length=0"])
    with pytest.raises(ConfigError, match=r"multiple of train\.num_generations=8"):
        load_config("grpo-smoke", ["train.per_device_batch_size=12"])
    with pytest.raises(DataError, match=r"does not fit model\.max_seq_length=16"):
        prepare_prompts(load_config("grpo-smoke", ["model.max_seq_length=16"]), resolve_rewards(["numeric_answer"]))


# ------------------------------------------------------------------------------------------ the trainer


@pytest.mark.slow
def test_trl_generates_from_our_ids_and_completions_end_at_eos(tmp_path: Path) -> None:
    """TRL's batch (prompt_ids, completion_ids) is built from mistral_common's ids; completions stop at </s>."""
    from mistral_fast.grpo import prepare_prompts
    from mistral_fast.modeling import load_model
    from mistral_fast.tokenizer import reference_chat_ids
    from mistral_fast.train_grpo import build_grpo_config, trainer_class, trl_reward

    cfg = load_config(
        "grpo-smoke",
        [f"train.output_dir={tmp_path}", "train.per_device_batch_size=8", "train.max_completion_length=24"],
    )
    rewards = resolve_rewards(cfg.train.rewards)
    data = prepare_prompts(cfg, rewards)
    loaded = load_model(cfg)
    trainer = trainer_class(loaded)(
        model=loaded.model,
        reward_funcs=[trl_reward(r) for r in rewards],
        args=build_grpo_config(cfg, loaded, tmp_path),
        train_dataset=data.train,
        processing_class=loaded.tokenizer,
    )
    inputs = [data.train[0]] * 4 + [data.train[1]] * 4
    batch = trainer._generate_and_score_completions(inputs)
    eos, pad = loaded.tokenizer.eos_token_id, loaded.tokenizer.pad_token_id
    for i, prompt in enumerate([data.train_prompts[0]] * 4 + [data.train_prompts[1]] * 4):
        ids = batch["prompt_ids"][i][batch["prompt_mask"][i].bool()].tolist()
        assert ids == reference_chat_ids(prompt.messages, "v3", add_generation_prompt=True)
        completion = batch["completion_ids"][i][batch["completion_mask"][i].bool()].tolist()
        assert eos not in completion[:-1] and (completion[-1] == eos or len(completion) == 24)
        assert all(t == pad for t in batch["completion_ids"][i][len(completion) :].tolist())


# ------------------------------------------------------------------------------------------ the shared run


@pytest.fixture(scope="session")
def grpo_run(tmp_path_factory):
    from mistral_fast.pipeline import run

    cfg = load_config("grpo-smoke", [*SHARED, f"train.output_dir={tmp_path_factory.mktemp('grpo') / 'run'}"])
    return cfg, run(cfg)


@pytest.mark.slow
def test_grpo_smoke_raises_the_held_out_reward(grpo_run) -> None:
    cfg, result = grpo_run
    evaluation = json.loads((Path(result.run_dir) / "eval.json").read_text())
    grpo = evaluation["grpo"]
    assert evaluation["split"] == "eval" and evaluation["prompts"] == 30
    assert 0 <= grpo["reward_before"] <= 1 and 0 <= grpo["reward_after"] <= 1
    assert grpo["reward_before"] > 0, "the warm-up must earn some reward, or GRPO has nothing to learn from"
    assert grpo["reward_after"] >= grpo["reward_before"] + 0.3, grpo  # the target; measured +0.67 (README)
    assert evaluation["started_from"].endswith("sft_warmup/adapter")
    assert len(evaluation["samples"]) == 4 and {"before", "after", "prompt"} <= set(evaluation["samples"][0])
    assert result.train["extra"]["method"] == "grpo" and result.train["steps"] == cfg.train.max_steps


@pytest.mark.slow
def test_grpo_run_logs_every_reward_per_step(grpo_run) -> None:
    from mistral_fast.manifest import verify_run
    from mistral_fast.rundir import RunDir

    _, result = grpo_run
    run_dir = Path(result.run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "loss" in r and "reward" in r]
    assert [r["step"] for r in logged] == [1, 5, 10]
    assert all(
        0 <= r["rewards/numeric_answer/mean"] <= 1 and r["reward"] == r["rewards/numeric_answer/mean"] for r in logged
    )
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((run_dir / "tensorboard").glob("events.out.tfevents.*"))))
    events.Reload()
    assert {"train/reward", "train/rewards/numeric_answer/mean"} <= set(events.Tags()["scalars"])
    assert (run_dir / "loss_curve.png").stat().st_size > 1000
    assert not verify_run(run_dir)["changed"]
    RunDir.open(run_dir).load()  # the adapter fits the run's model


def test_prepare_shows_a_grpo_prompt_as_the_model_sees_it(capsys) -> None:
    from mistral_fast.cli import main
    from mistral_fast.tokenizer import load_tokenizer, reference_chat_ids

    assert main(["prepare", "grpo-smoke"]) == 0
    out = capsys.readouterr().out
    assert "GRPO prompts: 170 train / 30 held out" in out and '"answer": "' in out
    shown = out.split("prompt 0:\n")[1].split("⟦completion⟧")[0]
    question = shown.removeprefix("<s>[INST] ").removesuffix("[/INST]")
    reference = reference_chat_ids([{"role": "user", "content": question}], "v3", add_generation_prompt=True)
    assert load_tokenizer("v3").decode(reference, skip_special_tokens=False) == shown
