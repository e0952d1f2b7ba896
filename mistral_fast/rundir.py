"""`RunDir`: a finished run's directory, read one way by evaluation, export, the report and the notebooks.

A run directory holds ``run_config.yaml`` (the resolved config), ``adapter/`` (the peft adapter),
``result.json`` (figures, among them the compute dtype training really used) and more. Everything that
reads one goes through this type, so the rules (which config, which dtype, how the adapter is put back
onto the 4-bit base) are written once.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mistral_fast.config import ModelConfig, RunConfig, load_config
from mistral_fast.errors import ModelError

if TYPE_CHECKING:
    from mistral_fast.modeling import LoadedModel

CONFIG_FILE = "run_config.yaml"
RESULT_FILE = "result.json"
ADAPTER_DIR = "adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class RunDir:
    """A run directory written by `mistral_fast.pipeline.run` (or a bare peft adapter directory).

    Attributes:
        path: the run directory (for a bare adapter directory: its parent).
        adapter_dir: the peft adapter directory (``path/adapter`` for a run).
    """

    path: Path
    adapter_dir: Path

    @classmethod
    def open(cls, run_or_adapter_dir: str | os.PathLike[str]) -> RunDir:
        """A run directory, or a peft adapter directory (``adapter_config.json`` in it) on its own.

        Nothing is read yet: what is missing is reported by the first use that needs it.
        """
        path = Path(run_or_adapter_dir)
        if (path / "adapter_config.json").is_file() and not (path / CONFIG_FILE).is_file():
            return cls(path.parent, path)
        return cls(path, path / ADAPTER_DIR)

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def adapter_weights(self) -> Path:
        return self.adapter_dir / ADAPTER_WEIGHTS

    @property
    def is_finished(self) -> bool:
        """Whether training got as far as saving the adapter next to the config."""
        return self.config_path.is_file() and self.adapter_weights.is_file()

    @cached_property
    def config(self) -> RunConfig:
        """The run's resolved config; for a bare adapter, the defaults with the adapter's base model.

        Raises:
            ModelError: neither a ``run_config.yaml`` nor a base model named in ``adapter_config.json``.
        """
        if self.config_path.is_file():
            return load_config(self.config_path)
        base = self.adapter_config.get("base_model_name_or_path")
        if not base:
            raise ModelError(
                f"{self.adapter_dir}: cannot tell the base model (no {CONFIG_FILE}, no base_model_name_or_path)"
            )
        return RunConfig(model=ModelConfig(name_or_path=base))

    @cached_property
    def adapter_config(self) -> dict[str, Any]:
        """The adapter's ``adapter_config.json`` (peft's LoRA settings).

        Raises:
            ModelError: the run has no adapter.
        """
        path = self.adapter_dir / "adapter_config.json"
        if not path.is_file():
            raise ModelError(
                f"{self.path}: no adapter_config.json here or in {self.adapter_dir}: give a run or adapter directory"
            )
        return json.loads(path.read_text(encoding="utf-8"))

    @property
    def result(self) -> dict[str, Any]:
        """``result.json`` (empty when the run has not finished)."""
        path = self.path / RESULT_FILE
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    def trained_compute_dtype(self) -> str:
        """The compute dtype training really used (``"bfloat16"``, …): bitsandbytes quantised the weights in it.

        ``result.json`` records it; an ``auto`` resolved again here could differ on another machine.
        """
        recorded = self.result.get("train", {}).get("extra", {}).get("compute_dtype")
        if recorded:
            return recorded
        from mistral_fast.modeling import resolve_compute_dtype

        return str(resolve_compute_dtype(self.config.model.compute_dtype)[0]).removeprefix("torch.")

    def require_finished(self) -> RunDir:
        """This run directory, if it holds a finished run.

        Raises:
            ModelError: no config or no adapter weights, with what to do.
        """
        if not self.is_finished:
            raise ModelError(
                f"{self.path}: not a finished run (needs {CONFIG_FILE} and {ADAPTER_DIR}/{ADAPTER_WEIGHTS}); "
                "train one with `mistral-fast train` or give the right directory"
            )
        return self

    def load(self, *, backend: str | None = None) -> LoadedModel:
        """The model as trained, ready to generate: its base in 4-bit with the saved adapter on it.

        `load_model(cfg, for_training=False)` loads the base exactly as training did (and switches off
        bitsandbytes' CPU weight repacking); the saved weights then replace the fresh adapter. Every saved
        tensor must land on a LoRA parameter of the model and every LoRA parameter must be saved, or the
        run does not match its config.

        Args:
            backend: override ``model.backend`` (e.g. ``"hf"`` to evaluate an unsloth run on a CPU).

        Raises:
            ModelError: not a finished run, or the adapter does not fit the model.
        """
        from mistral_fast.modeling import disable_cpu_weight_repacking, load_model

        self.require_finished()
        cfg = self.config.with_overrides({"model.backend": backend}) if backend else self.config
        loaded = load_model(cfg, for_training=False)
        disable_cpu_weight_repacking(loaded.model)  # generate() is a no-grad eval forward: keep bnb from repacking
        self.apply_adapter(loaded.model, what=f"the model of {self.config_path}")
        loaded.path = str(self.path)
        loaded.info["adapter"] = str(self.adapter_dir)
        return loaded


    def apply_adapter(self, model: Any, *, what: str = "the model") -> None:
        """Put this run's saved LoRA weights onto `model`'s adapter (a peft model of the same LoRA shape).

        Every saved tensor must land on a LoRA parameter of the model and every LoRA parameter must be
        saved. Used by `load` and to start a new run from this one's adapter (``model.adapter``).

        Raises:
            ModelError: no adapter weights, or they do not fit `model` (with the first bad tensor).
        """
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        if not self.adapter_weights.is_file():
            raise ModelError(f"{self.adapter_weights}: no adapter weights — give a finished run or adapter directory")
        result = set_peft_model_state_dict(model, load_file(str(self.adapter_weights)))
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        missing = [k for k in getattr(result, "missing_keys", []) or [] if "lora_" in k]
        if unexpected or missing:
            first = (unexpected or missing)[0]
            raise ModelError(
                f"{self.adapter_weights}: the adapter does not fit {what} "
                f"({len(unexpected)} unexpected, {len(missing)} missing LoRA tensors; first: {first})"
            )


def load_run(run_dir: str | os.PathLike[str], *, backend: str | None = None) -> LoadedModel:
    """Rebuild a finished run's model (`RunDir.load`): its base in 4-bit with the saved adapter, ready to generate.

    Args:
        run_dir: a run directory written by `pipeline.run`.
        backend: override ``model.backend`` (e.g. ``"hf"`` to evaluate an unsloth run on a CPU).

    Raises:
        ModelError: no run config or adapter in `run_dir`, or the adapter does not fit the model.
    """
    return RunDir.open(run_dir).load(backend=backend)
