"""Experiment trackers: MLflow, Weights & Biases and Trackio, through transformers' own integrations.

``train.report_to`` names them. transformers' callbacks (`MLflowCallback`, `WandbCallback`,
`TrackioCallback`, chosen by ``TrainingArguments.report_to``) log the training metrics as they do for any
Trainer; this module adds what they cannot know: the experiment (``train.experiment``; a sweep's name) and
the run's name, the resolved config as params, the run directory's path as a tag, and once the run is
written, ``eval.json`` (as metrics / summary) and ``manifest.json`` (as artifacts).

Each tracker reads its own settings and credentials from the environment (``MLFLOW_TRACKING_URI``,
``MLFLOW_TRACKING_PASSWORD``, ``WANDB_MODE``, ``WANDB_API_KEY``, ``TRACKIO_DIR``, …); nothing here writes
them anywhere. The packages are the optional extra ``mistral-fast[tracking]`` and are imported only when
a run asks for them.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from mistral_fast.config import RunConfig
from mistral_fast.errors import ConfigError

log = logging.getLogger("mistral_fast")

EXTERNAL = ("mlflow", "wandb", "trackio")  # what transformers' integrations log; tensorboard is our own callback
DEFAULT_PROJECT = "mistral_fast"  # W&B / Trackio project when neither train.experiment nor their variable says
RUN_DIR_TAG = "mistral_fast.run_dir"
_ENV_PROJECT = {"mlflow": "MLFLOW_EXPERIMENT_NAME", "wandb": "WANDB_PROJECT", "trackio": "TRACKIO_PROJECT"}
_INSTALL = "pip install 'mistral-fast[tracking]'"


def external_trackers(cfg: RunConfig) -> list[str]:
    """The trackers of ``train.report_to`` that transformers' integrations serve (all but tensorboard)."""
    return [name for name in cfg.train.report_to if name in EXTERNAL]


def check_trackers(cfg: RunConfig) -> None:
    """Fail before any weight loads when ``train.report_to`` names a tracker that is not installed.

    Raises:
        ConfigError: naming the tracker and the extra to install.
    """
    missing = [name for name in external_trackers(cfg) if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(
            f"train.report_to={cfg.train.report_to}: {', '.join(missing)} not installed — {_INSTALL}, "
            "or remove it from train.report_to"
        )


def run_name(cfg: RunConfig) -> str:
    """The run's name in the trackers: ``train.run_name``, else the run directory's name."""
    return cfg.train.run_name or Path(cfg.train.output_dir).resolve().name


def project_name(cfg: RunConfig, tracker: str) -> str | None:
    """``train.experiment``, else the tracker's own variable (``MLFLOW_EXPERIMENT_NAME``, ``WANDB_PROJECT``, …).

    None for MLflow without either (its ``Default`` experiment); ``mistral_fast`` for W&B and Trackio.
    """
    name = cfg.train.experiment or os.environ.get(_ENV_PROJECT[tracker], "")
    return name or (None if tracker == "mlflow" else DEFAULT_PROJECT)


def trainer_arguments(cfg: RunConfig) -> dict[str, Any]:
    """``report_to``, ``run_name`` and ``project`` for TRL's / transformers' training arguments."""
    trackers = external_trackers(cfg)
    return {
        "report_to": trackers or "none",
        "run_name": run_name(cfg),
        "project": project_name(cfg, "trackio") if "trackio" in trackers else DEFAULT_PROJECT,
    }


def flat_config(cfg: RunConfig) -> dict[str, Any]:
    """The resolved config as ``{"lora.rank": 16, …}``: scalars as they are, lists and None as JSON text."""
    flat: dict[str, Any] = {}
    for section, values in cfg.to_dict().items():
        for name, value in values.items():
            plain = isinstance(value, str | int | float | bool)
            flat[f"{section}.{name}"] = value if plain else json.dumps(value)
    return flat


def _numbers(tree: Any, prefix: str) -> dict[str, float]:
    """Every number of a JSON tree, by slash-joined path (``final/base/rouge_l``); booleans and text left out."""
    if isinstance(tree, dict):
        out: dict[str, float] = {}
        for key, value in tree.items():
            out |= _numbers(value, f"{prefix}/{key}")
        return out
    if isinstance(tree, int | float) and not isinstance(tree, bool):
        return {prefix: float(tree)}
    return {}


@dataclass
class TrackedRun:
    """The tracker runs this process opened for one training run, kept open until `finish_run`."""

    cfg: RunConfig
    run_dir: Path
    ids: dict[str, str] = field(default_factory=dict)
    wandb_run: Any = None


_ACTIVE: TrackedRun | None = None  # one training run per process at a time, as the trackers' own fluent APIs


def start_run(cfg: RunConfig, run_dir: Path) -> TrackedRun:
    """Open this run in MLflow and W&B before transformers' callbacks would open one of their own.

    MLflow's callback logs into an active run and leaves ending it to whoever started it, and W&B's reuses
    ``wandb.run``: so the experiment, run name, tags, config and the W&B directory (inside the run
    directory) are ours, and the run stays open for `finish_run` to add the evaluation and the manifest.
    Trackio's callback opens its run itself (``project`` and ``run_name`` of the training arguments).
    """
    global _ACTIVE
    abort_run()  # a run left open by a failure earlier in this process (a notebook kernel) is closed first
    tracked = TrackedRun(cfg, run_dir.resolve())
    trackers, params = external_trackers(cfg), flat_config(cfg)
    tags = {RUN_DIR_TAG: str(tracked.run_dir)}
    if "mlflow" in trackers:
        import mlflow

        experiment = project_name(cfg, "mlflow")
        experiment_id = mlflow_experiment(experiment) if experiment else None
        run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name(cfg), tags=tags)
        mlflow.log_params(params)
        tracked.ids["mlflow"] = run.info.run_id
    if "wandb" in trackers:
        import wandb

        tracked.wandb_run = wandb.init(
            project=project_name(cfg, "wandb"), name=run_name(cfg), dir=str(tracked.run_dir),
            config={**params, **tags}, tags=["mistral_fast"],
        )  # fmt: skip
        tracked.ids["wandb"] = tracked.wandb_run.id
    if "trackio" in trackers:
        tracked.ids["trackio"] = run_name(cfg)
    _ACTIVE = tracked
    return tracked


def mlflow_experiment(name: str) -> str:
    """The id of MLflow experiment `name`, created if missing (several processes may race to create it).

    Not `mlflow.set_experiment`: it also sets ``MLFLOW_EXPERIMENT_ID`` in this process's environment, which
    every process started later (a notebook kernel, another run against another store) would inherit.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:  # another variation created it in the meantime
        return client.get_experiment_by_name(name).experiment_id


def finish_run(run_dir: str | os.PathLike[str]) -> dict[str, str]:
    """Log ``eval.json`` and ``manifest.json`` of the finished run directory, then close its tracker runs.

    Numbers of ``eval.json`` go in as ``final/…`` (MLflow metrics, the W&B summary, a last Trackio log
    row); both files as artifacts. Called by the pipeline once the run directory (and its exports) is
    written; a run this process did not open is left alone.

    Returns:
        The tracker run ids (``{"mlflow": "…", "wandb": "…", "trackio": "<run name>"}``), empty if none.
    """
    global _ACTIVE
    tracked, _ACTIVE = _ACTIVE, None
    if tracked is None or tracked.run_dir != Path(run_dir).resolve():
        _ACTIVE = tracked
        return {}
    files = [p for p in (tracked.run_dir / "eval.json", tracked.run_dir / "manifest.json") if p.is_file()]
    evaluation = json.loads(files[0].read_text(encoding="utf-8")) if files and files[0].name == "eval.json" else {}
    final = _numbers(evaluation, "final")
    if "mlflow" in tracked.ids:
        _finish_mlflow(tracked.ids["mlflow"], final, files)
    if tracked.wandb_run is not None:
        _finish_wandb(tracked.wandb_run, final, files)
    if "trackio" in tracked.ids:
        _finish_trackio(tracked, final, files)
    log.info("trackers: logged %s to %s", ", ".join(p.name for p in files), ", ".join(tracked.ids) or "none")
    return tracked.ids


def _finish_mlflow(run_id: str, final: dict[str, float], files: list[Path]) -> None:
    import mlflow

    client = mlflow.MlflowClient()
    if final:
        client.log_batch(run_id, metrics=[mlflow.entities.Metric(k, v, _now_ms(), 0) for k, v in final.items()])
    for path in files:
        client.log_artifact(run_id, str(path))
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        mlflow.end_run()
    else:
        client.set_terminated(run_id)


def _finish_wandb(run: Any, final: dict[str, float], files: list[Path]) -> None:
    import wandb

    run.summary.update(final)
    if files:
        artifact = wandb.Artifact(f"run-{run.id}-files", type="run-files")
        for path in files:
            artifact.add_file(str(path))
        run.log_artifact(artifact)
    run.finish()


def _finish_trackio(tracked: TrackedRun, final: dict[str, float], files: list[Path]) -> None:
    import trackio

    # transformers' callback finished the run at the end of training; reopened by name to add the results
    config = {**flat_config(tracked.cfg), RUN_DIR_TAG: str(tracked.run_dir)}
    trackio.init(project=project_name(tracked.cfg, "trackio"), name=tracked.ids["trackio"], resume="must",
                 config=config)  # fmt: skip
    try:
        if final:
            trackio.log(final)
        for path in files:
            trackio.log_artifact(str(path), name=f"{tracked.ids['trackio']}-{path.stem}", type="run-files")
    finally:
        trackio.finish()


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


def abort_run() -> None:
    """Close the tracker runs of a run that failed (training raised): MLflow ``FAILED``, W&B exit code 1."""
    global _ACTIVE
    tracked, _ACTIVE = _ACTIVE, None
    if tracked is None:
        return
    if "mlflow" in tracked.ids:
        import mlflow

        if mlflow.active_run() is not None and mlflow.active_run().info.run_id == tracked.ids["mlflow"]:
            mlflow.end_run(status="FAILED")
    if tracked.wandb_run is not None:
        tracked.wandb_run.finish(exit_code=1)


class TrackerCallback(TrainerCallback):
    """Opens the tracker runs when the Trainer is built (before any integration's ``on_train_begin``).

    Only the main process tracks (the integrations, too, log from process zero only).
    """

    def __init__(self, cfg: RunConfig, run_dir: Path) -> None:
        self.cfg = cfg
        self.run_dir = run_dir

    def on_init_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            start_run(self.cfg, self.run_dir)

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and "trackio" in external_trackers(self.cfg):
            import trackio  # TrackioCallback (before this one) has opened the run

            trackio.config.update({**flat_config(self.cfg), RUN_DIR_TAG: str(Path(self.run_dir).resolve())})
