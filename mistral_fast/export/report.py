"""Equivalence report: the trained adapter model vs the merged model vs each GGUF, on fixed prompts.

Each side computes its own logits: the adapter model (4-bit base + LoRA, as trained) and the merged
16-bit model through transformers, every GGUF through llama.cpp itself (llama-cpp-python), never
through our own GGUF reader. Reported per pair: max and relative logit difference, top-1 agreement,
whether greedy continuations and EOS stops match; per side the perplexity on (the first
``eval_examples`` of) the run's eval split, over the trained (label != -100) tokens; and per GGUF whether
its own tokenizer gives the ids of mistral_common and of our tokenizer. Written as JSON and Markdown
into ``run_dir/export``.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mistral_fast.constants import IGNORE_INDEX
from mistral_fast.errors import ModelError
from mistral_fast.rundir import RunDir

log = logging.getLogger("mistral_fast")

PROMPTS: tuple[list[dict[str, str]], ...] = (
    [{"role": "user", "content": "How many metres are in 3.5 kilometres?"}],
    [
        {"role": "system", "content": "Answer in one short sentence."},
        {"role": "user", "content": "Convert 10 miles to kilometres."},
    ],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! What should I convert?"},
        {"role": "user", "content": "  Two  spaces,\ttabs and émoji 🙂 — 451 °F in °C?"},
    ],
)
# Plain strings where SentencePiece ports usually disagree: leading/repeated spaces, newlines, bytes.
TOKENIZER_TEXTS = (
    "Hello world",
    " leading space",
    "two  spaces   three",
    "line\n\nbreaks\n",
    "naïve 日本語 🙂",
    "x=1;y  =2",
)


@dataclass
class Side:
    """One model's outputs on the prompts: logits of every prompt position, greedy continuations."""

    name: str
    logits: list[Any] = field(default_factory=list)  # numpy (n_tokens, vocab) float32 per prompt
    continuations: list[list[int]] = field(default_factory=list)
    stopped: list[bool] = field(default_factory=list)  # ended on EOS within the token budget
    nll: float = 0.0  # summed negative log-likelihood of the eval split's trained tokens
    eval_tokens: int = 0

    @property
    def perplexity(self) -> float | None:
        """exp(mean NLL) over the eval tokens; None when no eval data was scored."""
        return math.exp(self.nll / self.eval_tokens) if self.eval_tokens else None


EvalRows = list[tuple[list[int], list[int]]]  # (input_ids, labels) per eval example


def eval_rows(cfg: Any, limit: int | None = 32) -> EvalRows:
    """The run's eval split as ``(input_ids, labels)``, its first ``limit`` examples (None: all).

    Empty when the run has no eval split (``data.eval_fraction=0``) or its data cannot be read here.
    """
    from mistral_fast.dataset import prepare_data
    from mistral_fast.errors import DataError

    try:
        evaluation = prepare_data(cfg).eval
    except (DataError, FileNotFoundError, OSError) as err:
        log.warning("equivalence report without perplexity: the run's data cannot be prepared (%s)", err)
        return []
    if evaluation is None:
        return []
    rows = evaluation.select(range(min(len(evaluation), limit))) if limit else evaluation
    return [(list(r["input_ids"]), list(r["labels"])) for r in rows]


def _nll(logits: Any, labels: list[int]) -> tuple[float, int]:
    """Summed NLL of ``labels[1:]`` under ``logits[:-1]`` (next-token), skipping -100; in float64."""
    import numpy as np

    target = np.asarray(labels[1:])
    keep = target != IGNORE_INDEX
    rows = np.asarray(logits[:-1], dtype=np.float64)[keep]
    if not len(rows):
        return 0.0, 0
    top = rows.max(-1, keepdims=True)
    log_z = top[:, 0] + np.log(np.exp(rows - top).sum(-1))
    return float((log_z - rows[np.arange(len(rows)), target[keep]]).sum()), int(keep.sum())


def _add_nll(side: Side, logits: Any, labels: list[int]) -> None:
    nll, tokens = _nll(logits, labels)
    side.nll += nll
    side.eval_tokens += tokens


def prompt_ids(cfg: Any, prompts: tuple[list[dict[str, str]], ...]) -> tuple[list[list[int]], list[str]]:
    """mistral_common's ids of each prompt (the reference), and each prompt rendered by our template."""
    from mistral_fast.families import tokenizer_version
    from mistral_fast.tokenizer import reference_chat_ids, tokenizer_for

    tok = tokenizer_for(cfg.model)
    version = tokenizer_version(cfg.model)
    ids = [reference_chat_ids(p, version, add_generation_prompt=True) for p in prompts]
    texts = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
    return ids, texts


def _hf_side(
    name: str, model: Any, prompts: list[list[int]], eos: int, max_new_tokens: int, rows: EvalRows = ()
) -> Side:
    import torch

    side = Side(name)
    with torch.no_grad():
        for ids, labels in rows:
            _add_nll(side, model(torch.tensor([ids], device=model.device)).logits[0].float().cpu().numpy(), labels)
        for ids in prompts:
            batch = torch.tensor([ids], device=model.device)
            side.logits.append(model(batch).logits[0].float().cpu().numpy())
            out = model.generate(
                batch, attention_mask=torch.ones_like(batch), do_sample=False, max_new_tokens=max_new_tokens,
                eos_token_id=eos, pad_token_id=eos,
            )  # fmt: skip
            _add_continuation(side, out[0, len(ids) :].cpu().tolist(), eos)
    return side


def _add_continuation(side: Side, tokens: list[int], eos: int) -> None:
    stopped = eos in tokens
    side.continuations.append(tokens[: tokens.index(eos) + 1] if stopped else tokens)
    side.stopped.append(stopped)


def adapter_side(run: RunDir, prompts: list[list[int]], max_new_tokens: int, rows: EvalRows = ()) -> Side:
    """The model as trained: the 4-bit base with the saved LoRA weights (`RunDir.load`)."""
    loaded = run.load()
    side = _hf_side("adapter", loaded.model, prompts, loaded.tokenizer.eos_token_id, max_new_tokens, rows)
    del loaded
    _free_memory()
    return side


def _free_memory() -> None:
    """Drop a model before the next loads: one model in memory at a time (a 7B each)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def merged_side(
    merged_dir: Path,
    prompts: list[list[int]],
    eos: int,
    max_new_tokens: int,
    dtype: str = "float32",
    rows: EvalRows = (),
) -> Side:
    """The merged 16-bit model computed in ``dtype`` (on the GPU if there is one)."""
    import torch

    from mistral_fast.modeling.checks import read_model_config
    from mistral_fast.modeling.mistral3 import auto_model_class

    device = "cuda" if torch.cuda.is_available() else "cpu"
    auto = auto_model_class(read_model_config(str(merged_dir)))  # a Mistral3 wrapper: AutoModelForImageTextToText
    model = auto.from_pretrained(merged_dir, dtype=getattr(torch, dtype), device_map={"": device})
    side = _hf_side("merged", model, prompts, eos, max_new_tokens, rows)
    del model
    _free_memory()
    return side


def merged_compute_dtype(merged_dir: Path) -> str:
    """fp32 (the exact function the 16-bit weights define) when it fits easily, else bf16.

    fp32 doubles the memory of the 16-bit checkpoint: 28 GB for a 7B, more than a Colab machine has.
    """
    import psutil
    import torch

    from mistral_fast.export.merge import checkpoint_files

    fp32_bytes = 2 * sum(f.stat().st_size for f in checkpoint_files(merged_dir))
    free = torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else psutil.virtual_memory().available
    return "float32" if fp32_bytes < free / 2 else "bfloat16"


def open_gguf(path: Path, n_ctx: int = 512) -> Any:
    """A llama.cpp model with logits for every position (``Llama.scores``)."""
    try:
        from llama_cpp import Llama
    except ImportError:
        from mistral_fast.export.gguf import INSTALL_LLAMA_CPP

        raise ModelError(f"the GGUF side of the equivalence report: {INSTALL_LLAMA_CPP}") from None
    threads = int(os.environ.get("OMP_NUM_THREADS") or 0) or None
    return Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=threads, seed=0)


def gguf_side(path: Path, prompts: list[list[int]], eos: int, max_new_tokens: int, rows: EvalRows = ()) -> Side:
    """llama.cpp's own logits and greedy (argmax) continuation for each prompt, and its eval NLL."""
    import numpy as np

    n_ctx = max([len(p) + max_new_tokens for p in prompts] + [len(ids) for ids, _ in rows]) + 8
    llm = open_gguf(path, n_ctx=n_ctx)
    side = Side(path.name)
    try:
        for ids, labels in rows:  # logits_all: llama.cpp's logits at every position
            llm.reset()
            llm.eval(ids)
            _add_nll(side, np.array(llm.scores[: len(ids)], dtype=np.float32), labels)
        for ids in prompts:
            llm.reset()
            llm.eval(ids)
            side.logits.append(np.array(llm.scores[: len(ids)], dtype=np.float32))
            tokens: list[int] = []
            while len(tokens) < max_new_tokens and eos not in tokens:
                tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
                llm.eval([tokens[-1]])
            _add_continuation(side, tokens, eos)
    finally:
        llm.close()
    return side


def compare(reference: Side, other: Side) -> dict[str, Any]:
    """Logit and generation agreement of ``other`` against ``reference``."""
    import numpy as np

    diffs = [float(np.abs(a - b).max()) for a, b in zip(reference.logits, other.logits, strict=True)]
    scale = max(float(np.abs(a).max()) for a in reference.logits)
    top1 = np.concatenate([a.argmax(-1) == b.argmax(-1) for a, b in zip(reference.logits, other.logits, strict=True)])
    return {
        "reference": reference.name,
        "other": other.name,
        "max_abs_logit_diff": max(diffs),
        "relative_logit_diff": max(diffs) / scale,
        "top1_agreement": float(top1.mean()),
        "greedy_match": [a == b for a, b in zip(reference.continuations, other.continuations, strict=True)],
        "eos_stop": {"reference": reference.stopped, "other": other.stopped},
        "eos_stop_match": reference.stopped == other.stopped,
    }


def tokenizer_check(path: Path, chat_ids: list[list[int]], chat_texts: list[str], cfg: Any) -> dict[str, Any]:
    """Does the GGUF's own tokenizer give mistral_common's (and our) ids, for chats and plain text?"""
    from mistral_fast.families import tokenizer_version
    from mistral_fast.tokenizer import reference_tokenizer, tokenizer_for

    ours = tokenizer_for(cfg.model)
    reference = reference_tokenizer(tokenizer_version(cfg.model)).instruct_tokenizer.tokenizer
    llm = open_gguf(path, n_ctx=64)
    try:
        chats = [
            llm.tokenize(t.encode(), add_bos=False, special=True) == ids
            for t, ids in zip(chat_texts, chat_ids, strict=True)
        ]
        texts = {}
        for text in TOKENIZER_TEXTS:
            got = llm.tokenize(text.encode(), add_bos=True, special=False)
            texts[text] = {
                "mistral_common": got == reference.encode(text, bos=True, eos=False),
                "ours": got == ours(text).input_ids,
            }
    finally:
        llm.close()
    ok = all(chats) and all(v["mistral_common"] and v["ours"] for v in texts.values())
    return {"all_match": ok, "chat_prompts": chats, "texts": texts}


def equivalence_report(
    run_dir: str | os.PathLike[str],
    gguf_paths: list[str | os.PathLike[str]] | tuple[str | os.PathLike[str], ...] = (),
    *,
    merged_dir: str | os.PathLike[str] | None = None,
    prompts: tuple[list[dict[str, str]], ...] = PROMPTS,
    max_new_tokens: int = 16,
    out_dir: str | os.PathLike[str] | None = None,
    merged_dtype: str = "auto",
    eval_examples: int | None = 32,
) -> dict[str, Any]:
    """Compare the adapter model, the merged model and each GGUF of a run; write JSON + Markdown.

    Args:
        run_dir: the run directory (``run_config.yaml``, ``adapter/``).
        gguf_paths: GGUF files to check (llama-cpp-python required when any is given).
        merged_dir: the merged model; default ``run_dir/export/merged``, else a temporary
            dequantised-base merge (deleted afterwards).
        prompts: chat conversations, each encoded with a generation prompt.
        max_new_tokens: greedy continuation length per prompt.
        out_dir: where ``equivalence.json`` / ``equivalence.md`` go; default ``run_dir/export``.
        merged_dtype: dtype the merged model computes in: ``float32`` (exact; 4 bytes a parameter, 28 GB
            for a 7B), ``bfloat16`` (half the memory, adds bf16 rounding to its logits) or ``auto``
            (`merged_compute_dtype`: fp32 when it fits easily in free memory).
        eval_examples: perplexity on the first this many examples of the run's eval split (None: all;
            0: no perplexity). Each is one forward pass per side: seconds on a GPU, minutes for a 7B on CPU.

    Returns:
        The report: ``pairs`` (one comparison per pair of sides), ``perplexity`` (per side, with the
        number of eval examples and tokens), ``tokenizer`` (per GGUF), ``prompts``.
    """
    from mistral_fast.export.merge import merge_adapter
    from mistral_fast.tokenizer import tokenizer_for

    run = RunDir.open(run_dir).require_finished()
    run_dir, cfg = run.path, run.config
    ids, texts = prompt_ids(cfg, prompts)
    eos = tokenizer_for(cfg.model).eos_token_id
    rows = eval_rows(cfg, eval_examples) if eval_examples != 0 else []
    adapter = adapter_side(run, ids, max_new_tokens, rows)
    with tempfile.TemporaryDirectory(prefix="merged-", dir=run_dir) as tmp:
        merged_path = Path(merged_dir) if merged_dir else run_dir / "export" / "merged"
        if not (merged_path / "config.json").is_file():
            merged_path = merge_adapter(run_dir, Path(tmp) / "merged")
        if merged_dtype == "auto":
            merged_dtype = merged_compute_dtype(merged_path)
        merged = merged_side(merged_path, ids, eos, max_new_tokens, merged_dtype, rows)
    report: dict[str, Any] = {"run_dir": str(run_dir), "prompts": len(ids), "max_new_tokens": max_new_tokens}
    report["merged_dtype"] = merged_dtype
    report["pairs"] = [compare(adapter, merged)]
    report["tokenizer"] = {}
    sides = [adapter, merged]
    for path in map(Path, gguf_paths):
        side = gguf_side(path, ids, eos, max_new_tokens, rows)
        report["pairs"] += [compare(merged, side), compare(adapter, side)]
        report["tokenizer"][path.name] = tokenizer_check(path, ids, texts, cfg)
        sides.append(side)
    report["perplexity"] = {
        "eval_examples": len(rows),
        "eval_tokens": adapter.eval_tokens,
        "sides": {side.name: side.perplexity for side in sides},
    }
    write_report(report, Path(out_dir) if out_dir else run_dir / "export")
    return report


def write_report(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """``equivalence.json`` and ``equivalence.md`` in ``out_dir``, each written atomically."""
    from mistral_fast.atomic import atomic_path

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = (out_dir / "equivalence.json", out_dir / "equivalence.md")
    for path, text in zip(paths, (json.dumps(report, indent=2) + "\n", to_markdown(report)), strict=True):
        with atomic_path(path) as tmp:
            tmp.write_text(text)
    return paths


def to_markdown(report: dict[str, Any]) -> str:
    """A human summary of the report: one table row per compared pair, then the tokenizer checks."""
    lines = [
        f"# Export equivalence: {report['run_dir']}",
        "",
        f"{report['prompts']} chat prompts, greedy continuations of up to {report['max_new_tokens']} tokens.",
        "",
        "| reference | other | max abs logit diff | relative | top-1 agreement | greedy match | EOS stops match |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p in report["pairs"]:
        greedy = f"{sum(p['greedy_match'])}/{len(p['greedy_match'])}"
        lines.append(
            f"| {p['reference']} | {p['other']} | {p['max_abs_logit_diff']:.4g} | {p['relative_logit_diff']:.3%} "
            f"| {p['top1_agreement']:.1%} | {greedy} | {'yes' if p['eos_stop_match'] else 'no'} |"
        )
    ppl = report.get("perplexity") or {}
    if ppl.get("eval_tokens"):
        lines += [
            "",
            f"Perplexity on the first {ppl['eval_examples']} examples of the run's eval split "
            f"({ppl['eval_tokens']} trained tokens; exp of the mean NLL, label != -100):",
            "",
            "| side | perplexity | vs merged |",
            "| --- | --- | --- |",
        ]
        merged = ppl["sides"].get("merged")
        for name, value in ppl["sides"].items():
            lines.append(
                f"| {name} | {value:.4f} | {value / merged - 1:+.3%} |" if merged else f"| {name} | {value:.4f} | |"
            )
    if report["tokenizer"]:
        lines += ["", "| GGUF | its tokenizer = mistral_common and ours |", "| --- | --- |"]
        lines += [f"| {name} | {'yes' if t['all_match'] else 'NO'} |" for name, t in report["tokenizer"].items()]
    return "\n".join(lines) + "\n"
