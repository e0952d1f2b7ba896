"""What the notebooks call: parameters → `RunConfig`, a saved run's evaluation, results as JSON.

Notebooks hold no logic (DESIGN.md, Notebooks): each cell calls one function from here or from the
stages, so papermill runs, the CLI and a Python session all share the same code.

Notebook parameters map onto config fields by name: ``section_field`` is ``section.field``
(``lora_rank`` → ``lora.rank``, ``train_max_steps`` → ``train.max_steps``). ``smoke`` switches to the
tiny local model; ``preset`` names the base preset; ``overrides`` (``{"train.max_steps": 4}``) is
applied last, always.
"""

from __future__ import annotations

import functools
import os
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_type_hints

from mistral_fast.config import RunConfig, load_config
from mistral_fast.constants import RESULTS_FILE
from mistral_fast.rundir import RunDir

if TYPE_CHECKING:
    from mistral_fast.dataset import PreparedData
    from mistral_fast.evaluate import EvalResult
    from mistral_fast.modeling import LoadedModel

# With smoke=True these keep the smoke preset's values: a 7B-sized sequence length, batch or schedule
# would turn a one-minute CPU check into hours. LoRA shape, learning rate, data and output dir still apply,
# so a smoke sweep over rank x alpha x lr is meaningful; `overrides` can change anything.
SMOKE_KEEPS = frozenset(
    {
        "model.name_or_path",
        "model.max_seq_length",
        "model.compute_dtype",
        "model.backend",
        "train.epochs",
        "train.max_steps",
        "train.per_device_batch_size",
        "train.gradient_accumulation_steps",
        "train.logging_steps",
        "train.eval_steps",
        "train.save_steps",
        "train.gradient_checkpointing",
        "eval.max_new_tokens",
        "eval.num_samples",
    }
)


# GRPO's smoke run also keeps its preset's sampling and learning settings (a 7B run's 256-token completions and
# 5e-6 rate would not fit or not move the tiny model); the group size and beta still apply, so a sweep over them
# is meaningful.
GRPO_SMOKE_KEEPS = SMOKE_KEEPS | {
    "train.max_completion_length",
    "train.temperature",
    "train.learning_rate",
    "train.sft_warmup_steps",
    "train.rewards",
    "data.path",
}


@functools.cache
def config_fields() -> frozenset[str]:
    """Every dotted field of `RunConfig` (``"lora.rank"``, …)."""
    hints = get_type_hints(RunConfig)
    return frozenset(f"{s.name}.{f.name}" for s in fields(RunConfig) for f in fields(hints[s.name]))


def config_key(name: str) -> str | None:
    """The dotted config field a notebook parameter maps to (``lora_rank`` → ``lora.rank``), or None."""
    section, _, field_name = name.partition("_")
    key = f"{section}.{field_name}"
    return key if key in config_fields() else None


def check_parameter_names(params: dict[str, Any]) -> None:
    """Refuse a notebook parameter that looks like a config field but is none (``lora_rnak = 8``).

    A name whose prefix is a config section (``lora_``, ``train_``, …) must name a field of it: a typo
    would otherwise train silently with the preset's value. Other names (``smoke``, ``gpu``, imports,
    the user's own variables) are not config parameters and are left alone.

    Raises:
        ConfigError: naming the parameter and the closest field (``did you mean lora_rank?``).
    """
    import difflib

    from mistral_fast.errors import ConfigError

    sections = {key.partition(".")[0] for key in config_fields()}
    names = sorted(key.replace(".", "_") for key in config_fields())
    for name in params:
        section = name.partition("_")[0]
        if section in sections and "_" in name and config_key(name) is None:
            close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
            same = [n for n in names if n.startswith(section + "_")]
            hint = f"did you mean {close[0]}?" if close else f"{section} parameters are {same}"
            raise ConfigError(f"notebook parameter {name!r} is not a config field — {hint}")


def notebook_config(params: dict[str, Any]) -> RunConfig:
    """Build the run config from a notebook's parameters (pass ``globals()``).

    Args:
        params: the notebook namespace; only ``smoke``, ``smoke_preset``, ``preset``, ``overrides`` and
            names that map to config fields are read. Empty strings leave the preset's value (e.g. ``data_path = ""``
            keeps the sample data shipped with the package).

    Returns:
        ``smoke_preset`` (default ``smoke``; when ``smoke``) or ``preset``, then the mapped parameters, then
        ``overrides``. A notebook whose task needs its own tiny schedule (``06_tools``: ``tools-smoke``)
        names it in ``smoke_preset``.

    Raises:
        ConfigError: a parameter that looks like a config field but is none (`check_parameter_names`), or
            a bad value.
    """
    check_parameter_names(params)
    smoke = bool(params.get("smoke", False))
    # a notebook whose task needs its own tiny schedule names it (06_tools: tools-smoke); GRPO's smoke run has
    # its own too: whole groups per batch, the sample prompt set, an SFT warm-up
    default_smoke = "grpo-smoke" if params.get("train_method") == "grpo" else "smoke"
    smoke_preset = params.get("smoke_preset") or default_smoke
    cfg = load_config(smoke_preset if smoke else params.get("preset") or None)
    keeps = GRPO_SMOKE_KEEPS if smoke_preset == "grpo-smoke" else SMOKE_KEEPS
    mapped: dict[str, Any] = {}
    for name, value in params.items():
        key = config_key(name) if not name.startswith("_") else None
        if key is None or (isinstance(value, str) and value == "") or (smoke and key in keeps):
            continue
        mapped[key] = value
    mapped.update(params.get("overrides") or {})
    cfg = cfg.with_overrides(mapped) if mapped else cfg
    storage = params.get("storage") or ""
    if storage:  # the run outlives the runtime there, and running the notebook again continues it
        root = storage_root(storage)
        cfg = cfg.with_overrides({"train.output_dir": str(root / cfg.train.output_dir), "train.resume": True})
    return cfg


# Where ``storage`` puts run directories. Colab's runtime disk dies with the runtime (idle limit, session
# cap); Google Drive, mounted by the notebooks' set-up cell, stays. Kaggle keeps /kaggle/working as the
# notebook's output when a version is saved.
STORAGE_ROOTS = {"drive": Path("/content/drive/MyDrive/mistral_fast"), "kaggle": Path("/kaggle/working")}


def storage_root(storage: str) -> Path:
    """The directory a notebook's ``storage`` parameter names: ``"drive"``, ``"kaggle"`` or a directory.

    Raises:
        ConfigError: ``"drive"`` while Google Drive is not mounted (the set-up cell mounts it on Colab), or
            ``"kaggle"`` outside Kaggle.
    """
    from mistral_fast.errors import ConfigError

    root = STORAGE_ROOTS.get(storage)
    if root is None:
        return Path(storage).expanduser()
    if not root.parent.is_dir():
        where = "on Colab, run the set-up cell (it mounts Google Drive)" if storage == "drive" else "only on Kaggle"
        raise ConfigError(
            f"notebook parameter storage={storage!r}: {root.parent} does not exist — {where}, "
            "or give a directory (e.g. storage='/mnt/runs')"
        )
    return root


def preference_config(params: dict[str, Any]) -> RunConfig:
    """`notebook_config` for 04_preference: an empty ``data_path`` is the sample preference set shipped here.

    Everything else maps as in `notebook_config` (the runner finds the run directory the same way).
    """
    from mistral_fast.preference import SAMPLE_PREFERENCES

    params = dict(params)
    if not params.get("data_path"):
        params["data_path"] = str(SAMPLE_PREFERENCES)
    return notebook_config(params)


def preference_table(evaluation: dict[str, Any] | None) -> str:
    """Held-out preference accuracy and mean margin, base vs (start vs) tuned, as a Markdown table."""
    if not evaluation or "tuned" not in evaluation:
        return "no preference evaluation"
    rows = [("base (adapter off)", evaluation["base"])]
    if evaluation.get("started_from"):
        rows.append((f"start ({evaluation['started_from']})", evaluation["start"]))
    rows.append(("tuned", evaluation["tuned"]))
    lines = [
        f"held-out pairs: {evaluation['tuned']['pairs']} ({evaluation['split']})",
        "",
        "| model | preference accuracy | mean margin (nats) |",
        "| --- | ---: | ---: |",
    ]
    lines += [f"| {name} | {r['accuracy']:.3f} | {r['mean_margin']:.2f} |" for name, r in rows]
    return "\n".join(lines)


def grpo_table(evaluation: dict[str, Any] | None) -> str:
    """Held-out mean reward before and after GRPO (each reward and the total), then greedy answers side by side."""
    if not evaluation or "grpo" not in evaluation:
        return "no GRPO evaluation"
    g = evaluation["grpo"]
    lines = [f"held-out prompts: {evaluation['prompts']} ({evaluation['split']}), greedy answers", ""]
    lines += ["| reward | before | after |", "| --- | ---: | ---: |"]
    lines += [f"| {n} | {g['rewards_before'][n]:.3f} | {g['rewards_after'][n]:.3f} |" for n in g["rewards_before"]]
    lines += ["", "| prompt | before | after |", "| --- | --- | --- |"]
    lines += [f"| {s['prompt']} | {s['before']!r} | {s['after']!r} |" for s in evaluation.get("samples", [])]
    return "\n".join(lines)


def preview_data(data: PreparedData, cfg: RunConfig, index: int = 0) -> str:
    """Training example `index` rendered with its trained tokens between ⟦ and ⟧ (what the loss sees)."""
    from mistral_fast.tokenizer import preview_example, tokenizer_for

    row = data.train[index]
    return preview_example(tokenizer_for(cfg.model), row["input_ids"], row["labels"])


def _plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    return value.to_dict() if hasattr(value, "to_dict") else value


def write_results(run_dir: str | os.PathLike[str], **sections: Any) -> Path:
    """Write sections into the run's ``results.json``, atomically: what a notebook run produced, as data.

    The runner and sweeps read this file; nothing is ever scraped from cell outputs. Sections already
    in the file from another notebook (``run`` from 01, ``evaluation`` from 02, ``export`` from 03) are
    kept, so the notebooks of one run add up instead of overwriting each other.

    Args:
        run_dir: the run directory.
        **sections: named results (dataclasses, objects with ``to_dict`` or plain JSON values).
    """
    import json

    from mistral_fast.evaluate import write_json_atomic

    path = Path(run_dir) / RESULTS_FILE
    try:
        existing = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        existing = {}
    return write_json_atomic(path, {**existing, **{k: _plain(v) for k, v in sections.items()}})


def resolve_run_dir(
    run_dir: str | os.PathLike[str], *, smoke: bool = False, preset: str = "", storage: str = ""
) -> Path:
    """A notebook's ``run_dir``; empty means the run 01_finetune writes for the same ``smoke``, ``preset``, ``storage``.

    The default is derived exactly as 01 derives it (`notebook_config`), so 02 and 03 find 01's run for
    whatever preset it used. With ``storage`` (see `storage_root`) a given ``run_dir`` lies there too.
    """
    if str(run_dir):
        return storage_root(storage) / run_dir if storage else Path(run_dir)
    return Path(notebook_config({"smoke": smoke, "preset": preset, "storage": storage}).train.output_dir)


def ensure_run(
    run_dir: str | os.PathLike[str], *, smoke: bool = False, preset: str = "", storage: str = ""
) -> Path:
    """The run directory to evaluate; with ``smoke`` and no finished run there, train a quick tiny one.

    Args:
        run_dir: a run directory; empty for the default one (see `resolve_run_dir`).
        smoke: the tiny local model: a missing run is trained first (seconds on a CPU).
        preset: the preset 01_finetune ran with (for the default run directory).
        storage: where 01_finetune kept its runs (``"drive"``, ``"kaggle"``, a directory; see `storage_root`).

    Raises:
        ModelError: (without smoke) the directory holds no finished run.
    """
    from mistral_fast.errors import ModelError

    run = resolve_run_dir(run_dir, smoke=smoke, preset=preset, storage=storage)
    if RunDir.open(run).is_finished:
        return run
    if not smoke:
        raise ModelError(f"{run}: no finished run (adapter/adapter_model.safetensors); run 01_finetune first")
    from mistral_fast.pipeline import run as run_pipeline

    overrides = {"train.output_dir": str(run), "train.max_steps": 4, "train.eval_steps": 2, "train.save_steps": 2}
    overrides |= {"data.max_examples": 32, "eval.num_samples": 2, "eval.max_new_tokens": 8}
    run_pipeline(load_config("smoke", overrides))
    return run


def evaluate_run(
    loaded: LoadedModel,
    *,
    num_samples: int = 8,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    compare_base: bool = True,
) -> EvalResult:
    """Evaluate a model from `evaluate.load_run` on its run's held-out split; write ``eval.json``.

    The split is rebuilt from the run's config (same data, seed and fraction), tokenised with the
    loaded tokenizer, so the prompts are exactly those held out during training.
    """
    from mistral_fast.config import EvalConfig
    from mistral_fast.dataset import prepare_data
    from mistral_fast.evaluate import evaluate_model, save_eval

    cfg = RunDir.open(loaded.path).config
    data = prepare_data(cfg, loaded.tokenizer)
    settings = EvalConfig(max_new_tokens=max_new_tokens, num_samples=num_samples, temperature=temperature)
    from mistral_fast.families import tokenizer_version

    result = evaluate_model(
        loaded,
        data.eval,
        data.eval_examples,
        settings,
        compare_base=compare_base,
        seed=cfg.train.seed,
        version=tokenizer_version(cfg.model),
    )
    save_eval(result, loaded.path)
    return result


def comparison_table(evaluation: EvalResult | dict[str, Any] | None) -> str:
    """Base vs tuned figures (loss, perplexity, ROUGE-L, BLEU, exact match) as a Markdown table."""
    from mistral_fast.evaluate import EvalResult

    if evaluation is None:
        return "(no evaluation)"
    if isinstance(evaluation, dict):
        evaluation = EvalResult(**evaluation)
    return evaluation.comparison_table()


def call_samples_frame(result: EvalResult | dict[str, Any]) -> Any:
    """The held-out tool-call prompts with the reference calls and the tuned and base model's calls (a
    pandas DataFrame; ``name(arguments)`` per call, ``right`` as scored for the tool-call accuracy)."""
    import json

    import pandas as pd

    samples = result.get("call_samples", []) if isinstance(result, dict) else result.call_samples

    def shown(calls: list[dict[str, Any]]) -> str:
        return "; ".join(f"{c.get('name')}({json.dumps(c.get('arguments'), ensure_ascii=False)})" for c in calls)

    rows = [
        {
            "prompt": s["prompt"][-1]["content"],
            "reference": shown(s["reference"]),
            "tuned": shown(s["tuned_calls"]),
            "tuned right": s["tuned_right"],
            "base": shown(s.get("base_calls", [])),
        }
        for s in samples
    ]
    return pd.DataFrame(rows, columns=["prompt", "reference", "tuned", "tuned right", "base"])


def samples_frame(result: EvalResult | dict[str, Any]) -> Any:
    """The held-out prompts with reference, tuned and base answers side by side (a pandas DataFrame)."""
    import pandas as pd

    samples = result.get("samples", []) if isinstance(result, dict) else result.samples

    rows = [
        {
            "prompt": s["prompt"][-1]["content"],
            "reference": s["reference"],
            "tuned": s["tuned"],
            "base": s.get("base", ""),
        }
        for s in samples
    ]
    return pd.DataFrame(rows, columns=["prompt", "reference", "tuned", "base"])
