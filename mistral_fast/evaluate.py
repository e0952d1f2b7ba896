"""Evaluation: loss/perplexity, generation, ROUGE-L/BLEU/exact match, base vs tuned, streaming chat.

Everything here works on the `LoadedModel` the trainer used (called by `pipeline.run` right after
training) or on one rebuilt from a finished run directory by `mistral_fast.rundir.load_run`. Prompts go
through the exact Mistral chat template (`tokenizer.apply_chat_template(..., add_generation_prompt=True)`), so what is
measured is what a user of the tuned model will send.

Definitions (so the numbers can be checked by hand):

* loss: mean cross-entropy over every trained token (labels != -100) of the eval split, each token
  weighted equally (not a mean of batch means); perplexity = exp(loss).
* ROUGE-L: mean F-measure of `rouge_score`'s rougeL (longest common subsequence), 0..1.
* BLEU: sacrebleu's corpus BLEU, 0..100.
* exact match: share of answers equal to the reference after stripping and collapsing whitespace.
* tool-call accuracy (conversations with ``tools``): for each held-out conversation with a tool call, the
  prompt is the conversation up to its last assistant turn with calls (with its tools); the generated
  ``[TOOL_CALLS]`` are parsed by `mistral_fast.tokenizer.parse_tool_calls` and the prompt counts as right
  when the calls are those of the data: the same tool names and arguments equal as JSON (``1`` equals
  ``1.0``, ``true`` is not ``1``; keys in any order; several calls in any order). Call ids are not
  compared: they are random by design. A generation that does not parse is a miss.

torch and transformers are imported inside the functions: `write_json_atomic` and the metric helpers
stay usable from the runner without loading them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mistral_fast.atomic import write_text_atomic
from mistral_fast.constants import IGNORE_INDEX
from mistral_fast.errors import ModelError

if TYPE_CHECKING:
    from mistral_fast.config import EvalConfig
    from mistral_fast.example import Example
    from mistral_fast.modeling import LoadedModel

log = logging.getLogger("mistral_fast")

EVAL_FILE = "eval.json"


@dataclass
class GenerationSettings:
    """Sampling parameters of `generate`; temperature 0 means greedy decoding."""

    max_new_tokens: int = 128  # stop after this many new tokens if no </s> came
    temperature: float = 0.0  # 0 = greedy (argmax); > 0 samples from softmax(logits / T)
    top_p: float = 1.0  # nucleus sampling: keep the smallest set of tokens with this much mass
    top_k: int = 0  # keep only the k most likely tokens (0 = off)
    seed: int = 42  # sampling seed, so a sampled evaluation repeats
    batch_size: int = 8  # prompts per generate() call


@dataclass
class EvalResult:
    """What `evaluate_model` measured (also written to ``eval.json`` in the run directory)."""

    loss: float | None
    perplexity: float | None
    eval_tokens: int
    rouge_l: float | None
    bleu: float | None
    exact_match: float | None
    base: dict[str, Any] | None  # the same figures for the base model (adapter disabled)
    samples: list[dict[str, Any]] = field(default_factory=list)  # prompt, reference, tuned, base answers
    generation: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    call_accuracy: float | None = None  # share of held-out tool-call prompts answered with the right calls
    call_prompts: int = 0  # how many prompts that accuracy is over
    call_samples: list[dict[str, Any]] = field(default_factory=list)  # prompt, reference and generated calls

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON."""
        return asdict(self)

    def comparison_table(self) -> str:
        """Base vs tuned figures as a Markdown table."""
        rows = [("loss", "loss"), ("perplexity", "perplexity"), ("ROUGE-L", "rouge_l"), ("BLEU", "bleu")]
        rows.append(("exact match", "exact_match"))
        if self.call_prompts:
            rows.append((f"tool-call accuracy ({self.call_prompts} prompts)", "call_accuracy"))
        base = self.base or {}
        lines = ["| metric | base | tuned |", "| --- | --- | --- |"]
        for label, key in rows:
            lines.append(f"| {label} | {_fmt(base.get(key))} | {_fmt(getattr(self, key))} |")
        return "\n".join(lines)

    def summary(self) -> str:
        """A few lines for logs, the CLI and notebooks."""
        return self.comparison_table() + f"\n({len(self.samples)} prompts, {self.seconds:.1f} s)"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> Path:
    """Write `data` as indented JSON through a temp file + rename: readers never see half a file."""
    return write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, default=str))


# ---------------------------------------------------------------------------------------------
# Loss and perplexity
# ---------------------------------------------------------------------------------------------


def _batches(rows: list[dict[str, list[int]]], batch_size: int, pad_id: int) -> Iterator[tuple[Any, Any, Any]]:
    """Right-padded (input_ids, attention_mask, labels) tensors; padding carries no loss."""
    import torch

    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(r["input_ids"]) for r in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
        for i, row in enumerate(chunk):
            n = len(row["input_ids"])
            ids[i, :n] = torch.tensor(row["input_ids"])
            mask[i, :n] = 1
            labels[i, :n] = torch.tensor(row["labels"])
        yield ids, mask, labels


def eval_loss(model: Any, rows: Any, *, pad_token_id: int, batch_size: int = 4) -> tuple[float | None, int]:
    """Token-weighted mean cross-entropy of `model` over the trained tokens of `rows`.

    Args:
        model: a causal LM (peft or plain).
        rows: a `datasets.Dataset` or list of dicts with ``input_ids`` and ``labels`` (-100 = not scored).
        pad_token_id: id used for padding (never EOS, so the scored ``</s>`` is never mistaken for padding).
        batch_size: rows per forward pass.

    Returns:
        ``(loss, scored_tokens)``; loss is None when there is no scored token.
    """
    import torch
    import torch.nn.functional as F

    rows = [{"input_ids": list(r["input_ids"]), "labels": list(r["labels"])} for r in rows]
    device = _device(model)
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, mask, labels in _batches(rows, batch_size, pad_token_id):
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            # position t predicts token t+1: drop the last logit and the first label
            shifted = labels[:, 1:].to(device)
            total += F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]),
                shifted.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            ).item()
            count += int((shifted != IGNORE_INDEX).sum())
    return (total / count if count else None), count


def perplexity(loss: float | None) -> float | None:
    """exp(loss); None for no loss, inf where exp overflows."""
    if loss is None:
        return None
    return math.exp(loss) if loss < 700 else math.inf


def _device(model: Any) -> Any:
    return next(model.parameters()).device


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------


def split_prompt(example: Example) -> tuple[list[dict[str, str]], str] | None:
    """(prompt messages, reference answer) of a conversation: everything before its last assistant turn.

    Returns:
        None for raw-text examples, conversations without an assistant turn, or whose last assistant
        turn is a tool call (scored by `split_call_prompt` instead).
    """
    messages = example.messages or []
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None or last == 0 or messages[last].get("tool_calls"):
        return None
    return messages[:last], messages[last]["content"]


def split_call_prompt(example: Example) -> tuple[list[dict[str, Any]], list[dict[str, Any]]] | None:
    """(prompt messages, reference calls) of a conversation: everything before its last assistant turn
    with tool calls, and those calls as ``{"name", "arguments"}`` (arguments parsed from JSON text).

    Returns:
        None for examples without a tool call.
    """
    messages = example.messages or []
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("tool_calls")), default=None)
    if last is None or last == 0:
        return None
    calls = []
    for call in messages[last]["tool_calls"]:
        arguments = call["function"].get("arguments", {})
        calls.append({"name": call["function"]["name"], "arguments": _json(arguments)})
    return messages[:last], calls


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def _canonical(value: Any) -> Any:
    """A JSON value as a comparable key: numbers by value (1 == 1.0), booleans apart from numbers."""
    if isinstance(value, dict):
        return ("object", tuple(sorted((str(k), _canonical(v)) for k, v in value.items())))
    if isinstance(value, list):
        return ("array", tuple(_canonical(v) for v in value))
    if isinstance(value, bool) or value is None:
        return ("literal", repr(value))
    if isinstance(value, int | float):
        return ("number", float(value))
    return ("string", str(value))


def calls_match(predicted: Sequence[dict[str, Any]], reference: Sequence[dict[str, Any]]) -> bool:
    """Whether generated calls are the reference calls: names exact, arguments equal as JSON, any order."""

    def key(calls: Sequence[dict[str, Any]]) -> list[Any]:
        return sorted((str(c.get("name")), _canonical(_json(c.get("arguments", {})))) for c in calls)

    try:
        return bool(reference) and key(predicted) == key(reference)
    except (json.JSONDecodeError, TypeError):  # arguments that are not JSON text: not the reference's
        return False


def _generate_kwargs(tokenizer: Any, settings: GenerationSettings) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "max_new_tokens": settings.max_new_tokens,
        "eos_token_id": tokenizer.eos_token_id,  # stop on </s>
        "pad_token_id": tokenizer.pad_token_id,  # <pad>, not </s>: finished rows are padded with it
        "do_sample": settings.temperature > 0,
    }
    if settings.temperature > 0:
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k or None)
    else:  # greedy: leave sampling knobs unset, or transformers warns about ignored flags
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return kwargs


def _left_pad(prompts: list[list[int]], pad_id: int) -> tuple[Any, Any]:
    """Left padding: every prompt ends at the same column, so new tokens line up after it."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt) :] = torch.tensor(prompt)
        mask[i, width - len(prompt) :] = 1
    return ids, mask


def encode_prompt(
    tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
) -> list[int]:
    """Token ids of a conversation up to the point where the assistant answers (exact chat template);
    with ``tools``, the functions the model may call (``[AVAILABLE_TOOLS]``)."""
    extra = {"tools": tools} if tools else {}
    encoded = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, **extra
    )
    return list(encoded["input_ids"])


def generate(
    model: Any,
    tokenizer: Any,
    conversations: list[list[dict[str, str]]],
    settings: GenerationSettings | None = None,
    *,
    tools: Sequence[list[dict[str, Any]] | None] | None = None,
    **generate_kwargs: Any,
) -> list[dict[str, Any]]:
    """Answer each conversation; stops at ``</s>`` or after ``max_new_tokens``.

    Args:
        model: a causal LM (the tuned peft model, or a base one).
        tokenizer: the exact Mistral tokenizer with its chat template.
        conversations: message lists ending with a user turn.
        settings: sampling parameters (greedy by default).
        tools: the tools of each conversation (None: none), put in the prompt as the template does.
        **generate_kwargs: passed on to ``model.generate`` (e.g. ``logits_processor``).

    Returns:
        One dict per conversation: ``text`` (special tokens removed), ``raw`` (with them, before
        ``</s>``: what `parse_tool_calls` reads), ``tokens`` (new ids up to and including ``</s>``) and
        ``stopped`` (whether ``</s>`` ended it).
    """
    import torch

    settings = settings or GenerationSettings()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    torch.manual_seed(settings.seed)
    was_training = model.training
    model.eval()
    outputs: list[dict[str, Any]] = []
    try:
        for start in range(0, len(conversations), settings.batch_size):
            stop = start + settings.batch_size
            prompts = [
                encode_prompt(tokenizer, c, t)
                for c, t in zip(
                    conversations[start:stop], (tools or [None] * len(conversations))[start:stop], strict=True
                )
            ]
            ids, mask = _left_pad(prompts, pad)
            device = _device(model)
            with torch.no_grad():
                out = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    use_cache=True,
                    **_generate_kwargs(tokenizer, settings),
                    **generate_kwargs,
                )
            for row in out[:, ids.shape[1] :].tolist():
                stopped = eos in row
                tokens = row[: row.index(eos) + 1] if stopped else row
                text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
                raw = tokenizer.decode(tokens[:-1] if stopped else tokens, skip_special_tokens=False)
                outputs.append({"text": text, "raw": raw, "tokens": tokens, "stopped": stopped})
    finally:
        model.train(was_training)
    return outputs


def stream_chat(
    model: Any, tokenizer: Any, messages: list[dict[str, str]], settings: GenerationSettings | None = None
) -> Iterator[str]:
    """Yield the answer to `messages` piece by piece as it is generated (``TextIteratorStreamer``).

    The prompt is built with the exact chat template; generation runs in a background thread and the
    pieces arrive as soon as they decode to text. Stops at ``</s>``.
    """
    import threading

    import torch
    from transformers import TextIteratorStreamer

    settings = settings or GenerationSettings()
    torch.manual_seed(settings.seed)
    ids, mask = _left_pad([encode_prompt(tokenizer, messages)], tokenizer.pad_token_id)
    device = _device(model)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "streamer": streamer, "use_cache": True}
    kwargs.update(_generate_kwargs(tokenizer, settings))
    model.eval()
    errors: list[BaseException] = []

    def work() -> None:  # a thread target; errors are re-raised in the caller below
        try:
            with torch.no_grad():
                model.generate(**kwargs)
        except BaseException as err:
            errors.append(err)
            streamer.end()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    yield from streamer
    thread.join()
    if errors:
        raise errors[0]


# ---------------------------------------------------------------------------------------------
# Text metrics
# ---------------------------------------------------------------------------------------------


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def text_metrics(predictions: list[str], references: list[str]) -> dict[str, float | None]:
    """ROUGE-L F-measure (mean, 0..1), corpus BLEU (0..100) and exact-match rate (0..1).

    Returns:
        ``{"rouge_l", "bleu", "exact_match"}``; all None for empty lists.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return {"rouge_l": None, "bleu": None, "exact_match": None}
    import sacrebleu
    from rouge_score import rouge_scorer, tokenizers

    # the tokenizer RougeScorer picks by default, passed explicitly: otherwise it logs "Using default tokenizer."
    # through absl on every call (twice per evaluation: tuned and base)
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=tokenizers.DefaultTokenizer(use_stemmer=False))
    rouge = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references, strict=True)]
    bleu = sacrebleu.corpus_bleu(predictions, [references]).score
    exact = [_normalise(p) == _normalise(r) for p, r in zip(predictions, references, strict=True)]
    return {"rouge_l": sum(rouge) / len(rouge), "bleu": float(bleu), "exact_match": sum(exact) / len(exact)}


# ---------------------------------------------------------------------------------------------
# The evaluate stage
# ---------------------------------------------------------------------------------------------


@dataclass
class _Prompts:
    """What `_measure` generates from: text prompts with their references, and tool-call prompts."""

    text: list[list[dict[str, Any]]]
    references: list[str]
    text_tools: list[list[dict[str, Any]] | None]
    calls: list[list[dict[str, Any]]]  # prompts that end before an assistant turn with tool calls
    call_references: list[list[dict[str, Any]]]
    call_tools: list[list[dict[str, Any]] | None]
    version: str | None


def _prompts(eval_examples: Sequence[Example], count: int, version: str | None) -> _Prompts:
    """The first ``count`` text prompts and the first ``count`` tool-call prompts of the held-out split
    (only those: a large eval split, read from Arrow on demand, is not decoded whole)."""
    text = list(islice(((e, p) for e in eval_examples if (p := split_prompt(e)) is not None), count))
    calls = list(islice(((e, c) for e in eval_examples if (c := split_call_prompt(e)) is not None), count))
    if calls and version is None:
        raise ModelError("the held-out data has tool calls: pass version= (the tokenizer version) to parse them")
    return _Prompts(
        [p for _, (p, _) in text],
        [r for _, (_, r) in text],
        [e.tools for e, _ in text],
        [p for _, (p, _) in calls],
        [r for _, (_, r) in calls],
        [e.tools for e, _ in calls],
        version,
    )


def _measure(loaded: LoadedModel, rows: Any, prompts: _Prompts, settings, batch_size) -> dict:
    """Loss, perplexity, generations, text metrics and tool-call accuracy of the model as it is now
    (adapter on or off)."""
    from mistral_fast.tokenizer import parse_tool_calls

    tok = loaded.tokenizer
    loss, tokens = (
        eval_loss(loaded.model, rows, pad_token_id=tok.pad_token_id, batch_size=batch_size) if rows else (None, 0)
    )
    answers = generate(loaded.model, tok, prompts.text, settings, tools=prompts.text_tools) if prompts.text else []
    metrics = text_metrics([a["text"] for a in answers], prompts.references)
    figures = {"loss": loss, "perplexity": perplexity(loss), "eval_tokens": tokens, "answers": answers, **metrics}
    if prompts.calls:
        generated = generate(loaded.model, tok, prompts.calls, settings, tools=prompts.call_tools)
        parsed = [parse_tool_calls(g["raw"], prompts.version or "v3") for g in generated]  # [] if it does not parse
        hits = [calls_match(p, r) for p, r in zip(parsed, prompts.call_references, strict=True)]
        figures["call_accuracy"] = sum(hits) / len(hits)
        figures["call_answers"] = [
            {"raw": g["raw"], "calls": p, "right": h} for g, p, h in zip(generated, parsed, hits, strict=True)
        ]
    return figures


@contextmanager
def _inference_mode(loaded: LoadedModel) -> Iterator[None]:
    """KV cache on (training turned it off) and, on the unsloth backend, Unsloth's inference mode.

    Unsloth's docs ask for ``FastLanguageModel.for_inference`` before generating with a model it
    prepared for training; ``for_training`` puts it back, so a caller can keep training afterwards.
    """
    model = loaded.model
    use_cache = getattr(model.config, "use_cache", True)
    was_training = model.training
    model.config.use_cache = True
    unsloth = None
    if loaded.backend == "unsloth":
        from unsloth import FastLanguageModel as unsloth  # already imported: the backend chose it

        unsloth.for_inference(model)
    try:
        yield
    finally:
        if unsloth is not None and was_training:
            unsloth.for_training(model)
        model.config.use_cache = use_cache
        model.train(was_training)


def evaluate_model(
    loaded: LoadedModel,
    eval_rows: Any,
    eval_examples: Sequence[Example],
    cfg: EvalConfig,
    *,
    compare_base: bool = True,
    batch_size: int = 4,
    seed: int = 42,
    version: str | None = None,
) -> EvalResult:
    """Measure the tuned model (and the base, with the adapter switched off) on the held-out split.

    Args:
        loaded: the model (a peft model) and its tokenizer.
        eval_rows: tokenised eval split (``input_ids``, ``labels``) for loss/perplexity; None to skip.
        eval_examples: the held-out conversations; the first ``cfg.num_samples`` with an assistant turn
            are answered and scored against their last assistant turn.
        cfg: ``eval`` section of the run config (max_new_tokens, num_samples, temperature).
        compare_base: also measure the base model under ``model.disable_adapter()``.
        batch_size: rows per forward pass for the loss.
        seed: sampling seed.
        version: the tokenizer version (`mistral_fast.families.tokenizer_version`), whose ``[TOOL_CALLS]``
            format the generated calls are parsed in; needed when the held-out data has tool calls, whose
            first ``cfg.num_samples`` are scored for tool-call accuracy (see the module docstring).
    """
    start = time.perf_counter()
    prompts = _prompts(eval_examples, cfg.num_samples, version)
    settings = GenerationSettings(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=seed)
    if compare_base and not callable(getattr(loaded.model, "disable_adapter", None)):
        raise ModelError("compare_base needs a peft model (model.disable_adapter()); pass compare_base=False")
    with _inference_mode(loaded):
        tuned = _measure(loaded, eval_rows, prompts, settings, batch_size)
        base = None
        if compare_base:
            with loaded.model.disable_adapter():
                base = _measure(loaded, eval_rows, prompts, settings, batch_size)
    samples = [
        {
            "prompt": p,
            "reference": r,
            "tuned": tuned["answers"][i]["text"],
            "tuned_stopped": tuned["answers"][i]["stopped"],
            **({"base": base["answers"][i]["text"]} if base else {}),
        }
        for i, (p, r) in enumerate(zip(prompts.text, prompts.references, strict=True))
    ]
    call_samples = [
        {
            "prompt": p,
            "reference": r,
            **{f"tuned_{k}": v for k, v in tuned["call_answers"][i].items()},
            **({f"base_{k}": v for k, v in base["call_answers"][i].items()} if base else {}),
        }
        for i, (p, r) in enumerate(zip(prompts.calls, prompts.call_references, strict=True))
    ]
    base_figures = {k: v for k, v in base.items() if k not in ("answers", "call_answers")} if base else None
    return EvalResult(
        loss=tuned["loss"],
        perplexity=tuned["perplexity"],
        eval_tokens=tuned["eval_tokens"],
        rouge_l=tuned["rouge_l"],
        bleu=tuned["bleu"],
        exact_match=tuned["exact_match"],
        base=base_figures,
        samples=samples,
        generation=asdict(settings),
        seconds=round(time.perf_counter() - start, 2),
        call_accuracy=tuned.get("call_accuracy"),
        call_prompts=len(prompts.calls),
        call_samples=call_samples,
    )


def save_eval(result: EvalResult, run_dir: str | os.PathLike[str]) -> Path:
    """Write ``eval.json`` into the run directory, atomically."""
    return write_json_atomic(Path(run_dir) / EVAL_FILE, result.to_dict())
