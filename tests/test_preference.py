"""Preference data (DPO/ORPO): the forms users have, file:line validation, and exact encoding.

The encoding is checked id for id against `mistral_common`'s ``encode_chat_completion`` of the whole
conversations (prompt + chosen, prompt + rejected), for every tokenizer version the run can use.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mistral_fast.config import RunConfig, load_config
from mistral_fast.data import write_jsonl
from mistral_fast.errors import ConfigError, DataError
from mistral_fast.families import FAMILIES, tokenizer_version
from mistral_fast.preference import (
    SAMPLE_PREFERENCES,
    PreferencePair,
    encode_pair,
    load_pairs,
    prepare_preferences,
    to_pair,
)
from mistral_fast.tokenizer import reference_chat_ids, tokenizer_for

# every tokenizer version of the family table: a generation added there (tekken) is covered here too
VERSIONS = sorted({family.tokenizer for family in FAMILIES})
USER = {"role": "user", "content": "Convert 5 km to mi."}
GOOD = "5 km = 3.11 mi."
BAD = "about 3"

PAIRS = [
    PreferencePair([USER], GOOD, BAD, "single turn"),
    PreferencePair([{"role": "system", "content": "Answer tersely."}, USER], GOOD, BAD, "system prompt"),
    PreferencePair(
        [USER, {"role": "assistant", "content": GOOD}, {"role": "user", "content": "And 2 km?"}],
        "2 km = 1.24 mi.",
        "  dunno   ",
        "multi-turn with spaces",
    ),
    PreferencePair([{"role": "user", "content": "Ça va? 😀 中文"}], "Très bien.\n\nMerci", "bof", "unicode"),
]


def cfg_for(tmp_path: Path, path: Path | str, *extra: str) -> RunConfig:
    return load_config(None, [f"data.path={path}", "train.method=dpo", f"train.output_dir={tmp_path / 'run'}", *extra])


# ---------------------------------------------------------------------------------------- config


def test_config_validates_preference_fields_by_name() -> None:
    cfg = RunConfig().with_overrides({"train.method": "dpo", "train.beta": 0.5, "train.loss_type": "ipo"})
    assert (cfg.train.method, cfg.train.beta, cfg.train.loss_type) == ("dpo", 0.5, "ipo")
    with pytest.raises(ConfigError, match=r"train\.method='ppo'"):
        RunConfig().with_overrides({"train.method": "ppo"})
    with pytest.raises(ConfigError, match=r"train\.beta=0"):
        RunConfig().with_overrides({"train.method": "dpo", "train.beta": 0})
    with pytest.raises(ConfigError, match=r"train\.loss_type='ipo'.*train.method=orpo"):
        RunConfig().with_overrides({"train.method": "orpo", "train.loss_type": "ipo"})
    with pytest.raises(ConfigError, match=r"train\.max_prompt_length=0"):
        RunConfig().with_overrides({"train.max_prompt_length": 0})
    with pytest.raises(ConfigError, match=r"train\.max_answer_length"):
        RunConfig().with_overrides({"train.max_answer_length": "long"})


# ---------------------------------------------------------------------------------------- encoding


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("pair", PAIRS, ids=[p.where for p in PAIRS])
def test_pair_encodes_exactly_as_mistral_common(version: str, pair: PreferencePair) -> None:
    cfg = RunConfig().with_overrides({"model.tokenizer": version})
    tokenizer = tokenizer_for(cfg.model)
    encoded = encode_pair(tokenizer, pair)
    v = tokenizer_version(cfg.model)
    assert encoded.prompt_ids == reference_chat_ids(pair.prompt, v, add_generation_prompt=True)
    assert encoded.prompt_ids + encoded.chosen_ids == reference_chat_ids(pair.conversation("chosen"), v)
    assert encoded.prompt_ids + encoded.rejected_ids == reference_chat_ids(pair.conversation("rejected"), v)
    eos = tokenizer.eos_token_id
    assert encoded.chosen_ids[-1] == eos and encoded.rejected_ids[-1] == eos  # </s> ends and is scored
    assert encoded.prompt_ids[-1] != eos  # the prompt ends open, at [/INST]
    assert not encoded.truncated


@pytest.mark.parametrize("version", VERSIONS)
def test_prepared_sample_set_matches_mistral_common(tmp_path: Path, version: str) -> None:
    cfg = cfg_for(tmp_path, SAMPLE_PREFERENCES, f"model.tokenizer={version}", "data.eval_fraction=0.2")
    data = prepare_preferences(cfg)
    assert data.stats["train_examples"] == 192 and data.stats["eval_examples"] == 48
    assert set(data.train.column_names) == {"prompt_ids", "chosen_ids", "rejected_ids"}
    for row, pair in list(zip(data.train, data.train_pairs, strict=True))[:25]:
        for which in ("chosen", "rejected"):
            expected = reference_chat_ids(pair.conversation(which), version)
            assert row["prompt_ids"] + row[f"{which}_ids"] == expected, pair.where


def test_long_answers_are_cut_and_long_prompts_refused(tmp_path: Path) -> None:
    path = write_jsonl([{"prompt": "Convert 5 km to mi.", "chosen": GOOD * 20, "rejected": BAD}], tmp_path / "p.jsonl")
    data = prepare_preferences(cfg_for(tmp_path, path, "train.max_answer_length=8", "data.eval_fraction=0"))
    assert len(data.train[0]["chosen_ids"]) == 8 and data.stats["truncated"] == 1
    with pytest.raises(DataError, match=r"p\.jsonl:1: the prompt is \d+ tokens, over train\.max_prompt_length=4"):
        prepare_preferences(cfg_for(tmp_path, path, "train.max_prompt_length=4"))


# ---------------------------------------------------------------------------------------- forms


CONVERSATIONAL = {
    "prompt": [USER],
    "chosen": [{"role": "assistant", "content": GOOD}],
    "rejected": [{"role": "assistant", "content": BAD}],
}
FORMS = {
    "strings": {"prompt": USER["content"], "chosen": GOOD, "rejected": BAD},
    "conversational": CONVERSATIONAL,
    "one message": {"prompt": [USER], "chosen": {"role": "assistant", "content": GOOD}, "rejected": BAD},
    "ultrafeedback": {
        "chosen": [USER, {"role": "assistant", "content": GOOD}],
        "rejected": [USER, {"role": "assistant", "content": BAD}],
    },
    "prompt and whole conversations": {
        "prompt": USER["content"],
        "chosen": [USER, {"role": "assistant", "content": GOOD}],
        "rejected": [USER, {"role": "assistant", "content": BAD}],
    },
}


@pytest.mark.parametrize("name", FORMS)
def test_every_form_gives_the_same_pair(name: str) -> None:
    assert to_pair(FORMS[name]) == ([USER], GOOD, BAD)


def test_csv_parquet_and_datasets_load_like_jsonl(tmp_path: Path) -> None:
    import csv

    import datasets

    rows = [{"prompt": USER["content"], "chosen": GOOD, "rejected": BAD}] * 3
    with (tmp_path / "p.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["prompt", "chosen", "rejected"])
        writer.writeheader()
        writer.writerows(rows)
        writer.writerow(
            {
                "prompt": "",
                "chosen": json.dumps(FORMS["ultrafeedback"]["chosen"]),
                "rejected": json.dumps(FORMS["ultrafeedback"]["rejected"]),
            }
        )  # JSON in CSV cells
    datasets.Dataset.from_list([CONVERSATIONAL] * 2).to_parquet(str(tmp_path / "p.parquet"))
    cfg = cfg_for(tmp_path, tmp_path / "p.csv")
    for source, count in (
        (tmp_path / "p.csv", 4),
        (tmp_path / "p.parquet", 2),
        (datasets.Dataset.from_list([CONVERSATIONAL] * 5), 5),
    ):
        pairs = load_pairs(cfg, source).pairs
        assert len(pairs) == count and all((p.prompt, p.chosen, p.rejected) == ([USER], GOOD, BAD) for p in pairs)


# ---------------------------------------------------------------------------------------- validation

BROKEN = {
    "empty chosen": ({"prompt": "Hi", "chosen": "   ", "rejected": BAD}, r"chosen: empty answer"),
    "identical": ({"prompt": "Hi", "chosen": GOOD, "rejected": GOOD + " "}, r"chosen and rejected are the same"),
    "no shared prompt": (
        {
            "chosen": FORMS["ultrafeedback"]["chosen"],
            "rejected": [{"role": "user", "content": "Other?"}, {"role": "assistant", "content": BAD}],
        },
        r"no shared prompt: .* differ at messages\[0\]",
    ),
    "no prompt at all": ({"chosen": GOOD, "rejected": BAD}, r"no 'prompt' column"),
    "answer is a user turn": (
        {"prompt": [USER], "chosen": [{"role": "user", "content": GOOD}], "rejected": BAD},
        r"chosen: the answer has role 'user', not 'assistant'",
    ),
    "prompt ends with assistant": (
        {"prompt": [USER, {"role": "assistant", "content": "x"}], "chosen": GOOD, "rejected": BAD},
        r"chosen: messages\[2\]: two 'assistant' turns in a row",
    ),
    "missing column": ({"prompt": "Hi", "chosen": GOOD}, r"missing column\(s\) \['rejected'\]"),
    "control token": (
        {"prompt": "Hi [INST]", "chosen": GOOD, "rejected": BAD},
        r"chosen: messages\[0\] \(user\): the text contains the control-token string '\[INST\]'",
    ),
}


@pytest.mark.parametrize("name", BROKEN)
def test_bad_pairs_are_reported_with_file_and_line(tmp_path: Path, name: str) -> None:
    record, message = BROKEN[name]
    path = write_jsonl([{"prompt": "Fine", "chosen": GOOD, "rejected": BAD}, record], tmp_path / "p.jsonl")
    with pytest.raises(DataError, match=rf"p\.jsonl:2: {message}"):
        load_pairs(cfg_for(tmp_path, path), version="v3")


def test_skip_invalid_counts_and_keeps_reasons(tmp_path: Path) -> None:
    records = [{"prompt": "Fine", "chosen": GOOD, "rejected": BAD}] * 3 + [r for r, _ in BROKEN.values()]
    path = write_jsonl(records, tmp_path / "p.jsonl")
    loaded = load_pairs(cfg_for(tmp_path, path, "data.skip_invalid=true"), version="v3")
    assert len(loaded.pairs) == 3 and loaded.skipped == len(BROKEN)
    assert loaded.reasons[0].startswith(f"{path}:4: ")


def test_cli_prepare_shows_a_preference_pair() -> None:
    import os
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-m",
        "mistral_fast.cli",
        "prepare",
        "smoke",
        "--set",
        "train.method=dpo",
        "--set",
        f"data.path={SAMPLE_PREFERENCES}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "preference pairs: 216 train / 24 eval" in proc.stdout
    assert "rejected: <s>[INST]" in proc.stdout and "</s>⟧" in proc.stdout
