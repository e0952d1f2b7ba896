"""Exports of a trained run: streamed 16-bit merge, GGUF, Ollama Modelfile, equivalence report.

``export_run(cfg)`` does what ``cfg.export`` asks and writes everything into ``run_dir/export/``:

* ``merged/``: the LoRA merged into 16-bit weights (`merge_adapter`; never re-quantised to 4-bit),
* ``model-<type>.gguf`` + ``model-<type>.Modelfile`` per GGUF type (`export_gguf` from ``merged/``, or
  `export_merged_gguf` straight from base + adapter when ``merged/`` is not kept; `quantize_gguf`,
  `write_modelfile`),
* ``equivalence.json`` / ``equivalence.md``: adapter vs merged vs each GGUF (`equivalence_report`,
  when llama-cpp-python is installed),
* ``export.json``: what was written, with sizes.

Heavy libraries (torch, bitsandbytes, gguf, llama_cpp) are imported inside the functions.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

from mistral_fast.atomic import atomic_path
from mistral_fast.config import RunConfig
from mistral_fast.export.gguf import (
    GGUF_TYPES,
    INSTALL_LLAMA_CPP,
    KQUANT_TYPES,
    export_gguf,
    export_merged_gguf,
    quantize_gguf,
    require_gguf,
    write_modelfile,
)
from mistral_fast.export.lora_gguf import export_adapter_gguf, export_base_gguf
from mistral_fast.export.merge import merge_adapter, resolve_source
from mistral_fast.export.mmproj import export_mmproj
from mistral_fast.export.report import equivalence_report
from mistral_fast.rundir import RunDir

__all__ = [
    "GGUF_TYPES",
    "KQUANT_TYPES",
    "equivalence_report",
    "export_adapter_gguf",
    "export_base_gguf",
    "export_gguf",
    "export_merged_gguf",
    "export_mmproj",
    "export_run",
    "merge_adapter",
    "quantize_gguf",
    "write_modelfile",
]

log = logging.getLogger("mistral_fast")


def _load_run(cfg_or_run_dir: RunConfig | str | os.PathLike[str]) -> tuple[RunConfig, Path]:
    if isinstance(cfg_or_run_dir, RunConfig):
        return cfg_or_run_dir, Path(cfg_or_run_dir.train.output_dir)
    run = RunDir.open(cfg_or_run_dir)
    return run.config, run.path


def export_run(
    cfg_or_run_dir: RunConfig | str | os.PathLike[str],
    *,
    merged: bool | None = None,
    gguf: list[str] | None = None,
    merge_base: str | None = None,
    report: bool = True,
    original_checkpoint: str | os.PathLike[str] | None = None,
    adapter_gguf: str | None = None,
) -> dict[str, Any]:
    """Write the exports ``cfg.export`` asks for into ``run_dir/export/``.

    Args:
        cfg_or_run_dir: the run's config (its ``train.output_dir`` is the run directory) or a run
            directory with ``run_config.yaml``.
        merged: keep the merged 16-bit model (default ``export.merged``); when it is not kept, each GGUF
            is merged on the fly from base + adapter (`export_merged_gguf`): no merged checkpoint is
            written (the report, if asked for, still merges one into a temporary directory).
        gguf: GGUF types (default ``export.gguf``), e.g. ``["f16", "q8_0", "q4_k_m"]``.
        merge_base: ``"dequantized"`` or ``"original"`` (default ``export.merge_base``).
        report: also write the equivalence report when GGUFs were written and llama-cpp-python is
            installed (it loads every model: minutes for a 7B).
        original_checkpoint: the 16-bit checkpoint that ``merge_base="original"`` merges into; needed
            when the run's base is pre-quantised (``*-bnb-4bit``), which holds no 16-bit weights
            (default ``export.original_checkpoint``).
        adapter_gguf: also write the LoRA adapter as a llama.cpp LoRA GGUF of this type (``f16``, ``f32``,
            ``bf16``, ``q8_0``; default ``export.gguf_adapter``), the f16 base GGUF it applies to and an
            Ollama Modelfile with ``ADAPTER`` (`export_adapter_gguf`, `export_base_gguf`).

    Returns:
        ``{"merged": path or None, "gguf": {type: path}, "modelfiles": {...}, "report": path or None}``.

    Raises:
        ModelError: a k-quant was asked for without llama-cpp-python (the message says how to get it).
    """
    cfg, run_dir = _load_run(cfg_or_run_dir)
    keep_merged = cfg.export.merged if merged is None else merged
    types = list(cfg.export.gguf if gguf is None else gguf)
    base = merge_base or cfg.export.merge_base
    original_checkpoint = original_checkpoint or getattr(cfg.export, "original_checkpoint", None)
    adapter_type = adapter_gguf or getattr(cfg.export, "gguf_adapter", None)
    if any(t in KQUANT_TYPES for t in types) and importlib.util.find_spec("llama_cpp") is None:
        from mistral_fast.errors import ModelError

        raise ModelError(f"export.gguf={types}: {INSTALL_LLAMA_CPP}")  # before minutes of merging
    if types or adapter_type:
        require_gguf(f"export.gguf={types}" if types else f"export.gguf_adapter={adapter_type!r}")
    out = run_dir / "export"
    result: dict[str, Any] = {"merged": None, "merge_base": base, "gguf": {}, "modelfiles": {}, "report": None}
    if adapter_type:  # first: it refuses adapters llama.cpp cannot apply before minutes of merging
        result["adapter_gguf"] = _write_adapter_gguf(run_dir, out, adapter_type, base, original_checkpoint)
    if not keep_merged and not types:
        if adapter_type:
            _write_manifest(result, out)
        return result
    with tempfile.TemporaryDirectory(prefix=".merge-", dir=run_dir) as tmp:
        original = original_checkpoint
        merged_dir = (
            merge_adapter(run_dir, out / "merged", base=base, original_checkpoint=original) if keep_merged else None
        )
        result["merged"] = str(merged_dir) if merged_dir else None
        source = merged_dir or _OnePass(run_dir, base, original)
        result["gguf"] = _write_ggufs(source, out, types, Path(tmp), name=run_dir.name)
        result["modelfiles"] = {t: str(write_modelfile(p)) for t, p in result["gguf"].items()}
        if types:  # a Mistral3 wrapper: its vision projector file beside the text GGUFs (vision kept)
            result["mmproj"] = _write_mmproj(merged_dir or resolve_source(run_dir).base_path, out, run_dir.name)
        if report and types and importlib.util.find_spec("llama_cpp") is not None:
            if merged_dir is None:  # the report's merged side: the same merge, in the temporary directory
                merged_dir = merge_adapter(run_dir, Path(tmp) / "merged", base=base, original_checkpoint=original)
            equivalence_report(run_dir, list(result["gguf"].values()), merged_dir=merged_dir, out_dir=out)
            result["report"] = str(out / "equivalence.md")
    _write_manifest(result, out)
    if (run_dir / "manifest.json").exists():  # the run's manifest (`mistral-fast verify`) covers exports too
        from mistral_fast.manifest import update_manifest

        update_manifest(run_dir, [out])
    return result


class _OnePass(NamedTuple):
    """GGUFs merged on the fly from the base and the adapter of a run (no merged checkpoint)."""

    run_dir: Path
    base: str
    original: str | os.PathLike[str] | None = None


def _gguf(source: Path | _OnePass, path: Path, qtype: str, name: str) -> Path:
    if isinstance(source, _OnePass):
        return export_merged_gguf(
            source.run_dir, path, qtype, base=source.base, name=name, original_checkpoint=source.original
        )
    return export_gguf(source, path, qtype, name=name)


def _write_ggufs(source: Path | _OnePass, out: Path, types: list[str], tmp: Path, *, name: str) -> dict[str, str]:
    """Each requested type; k-quants are made by llama.cpp from an f16 GGUF (kept only if requested)."""
    written: dict[str, str] = {}
    f16 = None
    for qtype in [t for t in types if t in GGUF_TYPES]:
        written[qtype] = str(_gguf(source, out / f"model-{qtype}.gguf", qtype, name))
    for qtype in [t for t in types if t in KQUANT_TYPES]:
        f16 = written.get("f16") or f16 or str(_gguf(source, tmp / "model-f16.gguf", "f16", name))
        written[qtype] = str(quantize_gguf(f16, out / f"model-{qtype}.gguf", qtype))
    return written


def _write_mmproj(model_dir: Path, out: Path, name: str) -> str | None:
    """``mmproj-F16.gguf`` of a Mistral3 checkpoint (`export_mmproj`); None for a text-only model.

    The vision tower and projector a text fine-tune leaves untouched, as llama.cpp's converter writes them, so
    llama.cpp (``--mmproj``) and Ollama keep the fine-tune's vision.
    """
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type") != "mistral3":
        return None
    return str(export_mmproj(model_dir, out / "mmproj-F16.gguf", name=name))


def _write_adapter_gguf(
    run_dir: Path, out: Path, qtype: str, base: str, original: str | os.PathLike[str] | None
) -> dict[str, str]:
    """The adapter GGUF, the f16 base GGUF it applies to, and a Modelfile with FROM base + ADAPTER."""
    adapter = export_adapter_gguf(run_dir, out / f"adapter-{qtype}.gguf", qtype, name=run_dir.name)
    base_gguf = export_base_gguf(run_dir, out / "base-f16.gguf", "f16", base=base, original_checkpoint=original)
    modelfile = write_modelfile(base_gguf, out / f"adapter-{qtype}.Modelfile", adapter=adapter)
    return {"adapter": str(adapter), "base": str(base_gguf), "modelfile": str(modelfile)}


def _write_manifest(result: dict[str, Any], out: Path) -> None:
    files = [Path(p) for p in result["gguf"].values()] + [Path(p) for p in result["modelfiles"].values()]
    files += [Path(p) for p in result.get("adapter_gguf", {}).values()]
    files += [Path(result["mmproj"])] if result.get("mmproj") else []
    if result["merged"]:
        files += sorted(Path(result["merged"]).iterdir())
    result["files"] = {str(f.relative_to(out)): f.stat().st_size for f in files}
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "export.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    log.info("exports of %s: %s", out.parent, ", ".join(result["files"]) or "none")
