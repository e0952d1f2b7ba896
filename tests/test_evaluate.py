"""The evaluate stage on the tiny model: perplexity against a plain-torch loop, generation that stops at
</s> (with <pad> != </s>), metric sanity, streaming equal to batch generation, and load_run."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from mistral_fast.config import EvalConfig, load_config
from mistral_fast.data import Example
from mistral_fast.evaluate import (
    GenerationSettings,
    eval_loss,
    evaluate_model,
    generate,
    perplexity,
    split_prompt,
    stream_chat,
    text_metrics,
    write_json_atomic,
)

# fp32 compute: batched and one-at-a-time forwards then agree to float rounding, not bf16 rounding.
TINY = ["model.compute_dtype=float32", "model.max_seq_length=128", "data.max_examples=24", "data.eval_fraction=0.25"]
PROMPTS = [
    [{"role": "user", "content": "Convert 5 km to mi."}],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "How many feet are in 3 m? Be exact."},
    ],
]


@pytest.fixture(scope="module")
def loaded():
    from mistral_fast.modeling import load_model

    return load_model(load_config("smoke", TINY), for_training=False)


@pytest.fixture(scope="module")
def data():
    from mistral_fast.dataset import prepare_data

    return prepare_data(load_config("smoke", TINY))


def reference_loss(model, rows) -> float:
    """Independent plain-torch loop: one example at a time, log-softmax and gather by hand."""
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row["input_ids"]])
            logp = torch.log_softmax(model(input_ids=ids).logits.float()[0], dim=-1)
            for t in range(1, len(row["labels"])):
                if row["labels"][t] != -100:
                    total -= logp[t - 1, row["labels"][t]].item()
                    count += 1
    return total / count


def test_perplexity_is_exp_of_an_independent_loss(loaded, data) -> None:
    model = loaded.model.eval()
    loss, tokens = eval_loss(model, data.eval, pad_token_id=loaded.tokenizer.pad_token_id, batch_size=4)
    ref = reference_loss(model, data.eval)
    assert tokens == sum(sum(t != -100 for t in r["labels"][1:]) for r in data.eval)
    assert loss == pytest.approx(ref, rel=1e-4)
    assert perplexity(loss) == pytest.approx(math.exp(ref), rel=1e-3)
    assert perplexity(None) is None


class ForceEos:
    """Logits processor: row 0 must emit </s> at its 3rd new token; other rows must never emit it."""

    def __init__(self, prompt_width: int, eos: int) -> None:
        self.width, self.eos = prompt_width, eos

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[1:, self.eos] = -math.inf
        if input_ids.shape[1] - self.width == 2:
            scores[0] = -math.inf
            scores[0, self.eos] = 0.0
        return scores


def test_generation_stops_at_eos_and_pads_with_pad(loaded) -> None:
    from transformers import LogitsProcessorList

    from mistral_fast.evaluate import encode_prompt

    tok = loaded.tokenizer
    assert tok.pad_token_id != tok.eos_token_id
    width = max(len(encode_prompt(tok, p)) for p in PROMPTS)
    out = generate(
        loaded.model,
        tok,
        PROMPTS,
        GenerationSettings(max_new_tokens=6),
        logits_processor=LogitsProcessorList([ForceEos(width, tok.eos_token_id)]),
    )
    assert out[0]["stopped"] and len(out[0]["tokens"]) == 3 and out[0]["tokens"][-1] == tok.eos_token_id
    assert "</s>" not in out[0]["text"] and "<pad>" not in out[0]["text"]
    assert not out[1]["stopped"] and len(out[1]["tokens"]) == 6


def test_batched_greedy_equals_one_at_a_time_and_streaming(loaded) -> None:
    """Left padding must not change greedy answers; the streamer yields the same text."""
    settings = GenerationSettings(max_new_tokens=8)
    batched = generate(loaded.model, loaded.tokenizer, PROMPTS, settings)
    for prompt, answer in zip(PROMPTS, batched, strict=True):
        alone = generate(loaded.model, loaded.tokenizer, [prompt], settings)[0]
        assert alone["tokens"] == answer["tokens"]
    streamed = "".join(stream_chat(loaded.model, loaded.tokenizer, PROMPTS[1], settings))
    assert streamed.strip() == batched[1]["text"]


def test_sampling_repeats_with_the_seed(loaded) -> None:
    """Same seed, same answer; and it is sampling: another seed, and greedy decoding, answer otherwise (a
    `generate` that ignored temperature and decoded greedily would pass the first check alone)."""
    settings = GenerationSettings(max_new_tokens=6, temperature=1.0, top_p=0.9, seed=7)
    first = generate(loaded.model, loaded.tokenizer, PROMPTS, settings)
    assert generate(loaded.model, loaded.tokenizer, PROMPTS, settings) == first
    other = generate(loaded.model, loaded.tokenizer, PROMPTS, dataclasses.replace(settings, seed=8))
    greedy = generate(loaded.model, loaded.tokenizer, PROMPTS, GenerationSettings(max_new_tokens=6))
    tokens = lambda out: [o["tokens"] for o in out]  # noqa: E731
    assert tokens(other) != tokens(first) and tokens(greedy) != tokens(first)


def test_text_metrics() -> None:
    same = text_metrics(["5 km = 3.11 mi."], ["5 km = 3.11 mi."])
    assert same == {"rouge_l": pytest.approx(1.0), "bleu": pytest.approx(100.0), "exact_match": 1.0}
    other = text_metrics(["blue whales"], ["5 km = 3.11 mi."])
    assert other["rouge_l"] == 0.0 and other["exact_match"] == 0.0 and other["bleu"] < 1
    assert text_metrics(["a  b "], ["a b"])["exact_match"] == 1.0  # whitespace is normalised
    assert text_metrics([], []) == {"rouge_l": None, "bleu": None, "exact_match": None}


def test_split_prompt_takes_the_last_assistant_turn() -> None:
    msgs = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]
    assert split_prompt(Example(msgs, None, "x:1")) == (msgs[:3], "d")
    assert split_prompt(Example(None, "raw text", "x:2")) is None


def test_evaluate_model_compares_base_and_tuned(loaded, data) -> None:
    """With a non-zero adapter (a fresh one has B = 0, base == tuned by construction): the tuned loss is the
    plain-torch loss of the model with that adapter, the base loss that of the model with every lora_B zeroed."""
    lora_b = [p for name, p in loaded.model.named_parameters() if "lora_B" in name]
    saved = [p.detach().clone() for p in lora_b]
    generator = torch.Generator().manual_seed(0)
    try:
        with torch.no_grad():
            for p in lora_b:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
        loaded.model.eval()
        tuned = reference_loss(loaded.model, data.eval)
        result = evaluate_model(loaded, data.eval, data.eval_examples, EvalConfig(max_new_tokens=4, num_samples=2))
        with torch.no_grad():
            for p in lora_b:
                p.zero_()
        base = reference_loss(loaded.model, data.eval)
    finally:
        with torch.no_grad():
            for p, value in zip(lora_b, saved, strict=True):
                p.copy_(value)
    assert len(result.samples) == 2 and {"prompt", "reference", "tuned", "base"} <= set(result.samples[0])
    assert abs(tuned - base) > 1e-3, "the adapter changes the model"
    assert result.loss == pytest.approx(tuned, rel=1e-4)
    assert result.base["loss"] == pytest.approx(base, rel=1e-4)
    assert "| perplexity |" in result.comparison_table()
    assert result.perplexity == pytest.approx(math.exp(result.loss))


def test_write_json_atomic_leaves_no_temp_file(tmp_path) -> None:
    path = write_json_atomic(tmp_path / "d" / "eval.json", {"x": 1.5})
    assert json.loads(path.read_text()) == {"x": 1.5}
    assert [p.name for p in path.parent.iterdir()] == ["eval.json"]


@pytest.mark.slow
def test_run_writes_eval_json_and_load_run_restores_the_adapter(tmp_path) -> None:
    """pipeline.run evaluates after training; load_run rebuilds a model equal to peft's own loading."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from mistral_fast.modeling import disable_cpu_weight_repacking, resolve_model_path
    from mistral_fast.pipeline import run
    from mistral_fast.rundir import load_run

    cfg = load_config(
        "smoke",
        [
            *TINY,
            f"train.output_dir={tmp_path / 'run'}",
            *("train.max_steps=3", "train.eval_steps=3", "train.save_steps=3", "train.learning_rate=1e-2"),
            *("eval.max_new_tokens=4", "eval.num_samples=2"),
        ],
    )
    result = run(cfg)
    saved = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert saved["perplexity"] == pytest.approx(math.exp(saved["loss"]))
    assert json.loads((tmp_path / "run" / "result.json").read_text())["evaluation"]["loss"] == saved["loss"]
    assert result.evaluation["base"]["loss"] != saved["loss"]  # training changed the model

    loaded = load_run(tmp_path / "run")
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    bnb.bnb_4bit_compute_dtype = torch.float32
    base = AutoModelForCausalLM.from_pretrained(
        resolve_model_path("tiny"), quantization_config=bnb, dtype=torch.float32
    )
    disable_cpu_weight_repacking(base)
    reference = PeftModel.from_pretrained(base, Path(result.train["adapter_dir"])).eval()
    ids = torch.tensor([[1, 3, 16127, 4, 1778]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.eval()(input_ids=ids).logits, reference(input_ids=ids).logits)
