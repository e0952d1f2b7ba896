"""Run notebooks headlessly with papermill, and sweeps of them.

`run_notebook` checks the parameters against the notebook's ``parameters`` cell (and the config field
types) before any kernel starts, pins a kernel of *this* Python environment, sets the working
directory, streams cell output to the log, applies an execution timeout, always keeps the output
notebook (a failed run too, with the failing cell marked), scrubs secrets from it, and returns the
notebook's ``results.json`` as data. `run_sweep` runs one notebook per variation of a grid or list and
writes a results table (CSV, Markdown) and a plot; finished variations are skipped on a re-run.
"""

from __future__ import annotations

import ast
import contextlib
import csv
import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mistral_fast.atomic import atomic_path, write_text_atomic
from mistral_fast.constants import RESULTS_FILE
from mistral_fast.errors import ConfigError, MistralFastError, NotebookError
from mistral_fast.resources import resource_dir

log = logging.getLogger("mistral_fast")

NOTEBOOKS_DIR = resource_dir("notebooks")  # the checkout's notebooks/, or the copy inside an installed wheel
DEFAULT_TIMEOUT_S = 24 * 3600  # per cell: a 7B training cell runs for hours; tests pass far less
_SECRET_WORDS = {"token", "secret", "password", "passwd", "key", "apikey", "credential", "credentials"}
_SECRET_VALUE = re.compile(r"^(hf_[A-Za-z0-9]{16,}|api_[A-Za-z0-9]{16,}|sk-[A-Za-z0-9_-]{16,})$")
_SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_TOKEN", "WANDB_API_KEY")


@dataclass
class Parameter:
    """One entry of a notebook's ``parameters`` cell."""

    name: str
    default: Any
    help: str
    line: int


@dataclass
class NotebookRun:
    """What `run_notebook` returns: where the output notebook is and the results it wrote."""

    notebook: str
    output_notebook: str
    results_path: str | None
    results: dict[str, Any] | None
    seconds: float
    parameters: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# The parameters cell
# ---------------------------------------------------------------------------------------------


def _read_notebook(path: Path) -> Any:
    import nbformat

    if not path.is_file():
        raise NotebookError(f"{path}: no such notebook")
    return nbformat.read(path, as_version=4)


def parameters_cell(path: str | os.PathLike[str]) -> tuple[int, str]:
    """(index, source) of the notebook's cell tagged ``parameters``.

    Raises:
        NotebookError: no cell or several cells carry the tag.
    """
    nb = _read_notebook(Path(path))
    found = [(i, c.source) for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(found) != 1:
        raise NotebookError(f"{path}: needs exactly one cell tagged 'parameters', found {len(found)}")
    return found[0]


def read_parameters(path: str | os.PathLike[str]) -> dict[str, Parameter]:
    """The parameters of a notebook: ``name = literal  # help`` lines of its ``parameters`` cell.

    Raises:
        NotebookError: a statement is not a plain assignment of a literal, or has no ``# help`` comment.
    """
    _, source = parameters_cell(path)
    lines = source.splitlines()
    params: dict[str, Parameter] = {}
    for node in ast.parse(source).body:
        where = f"{path}: parameters cell line {node.lineno}"
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise NotebookError(f"{where}: only `name = literal  # help` assignments belong here")
        try:
            value = ast.literal_eval(node.value)
        except ValueError:
            raise NotebookError(f"{where}: {node.targets[0].id} must be a plain literal, not an expression") from None
        _, hash_, comment = lines[node.end_lineno - 1].partition("#")
        if not hash_ or not comment.strip():
            raise NotebookError(f"{where}: {node.targets[0].id} needs a `# help` comment")
        params[node.targets[0].id] = Parameter(node.targets[0].id, value, comment.strip(), node.lineno)
    return params


def looks_secret(name: str, value: Any) -> bool:
    """Whether a parameter looks like a credential (by its name's words, or an ``hf_…`` style value)."""
    words = set(re.split(r"[_\W]+", name.lower()))
    if words & _SECRET_WORDS or any(w in name.lower() for w in ("secret", "password")):
        return True
    return isinstance(value, str) and bool(_SECRET_VALUE.match(value.strip()))


def _type_name(value: Any) -> str:
    return "float" if isinstance(value, float) else type(value).__name__


def _check_type(name: str, value: Any, default: Any) -> Any:
    """Coerce `value` to the type of the notebook default, the harmless cases only (int → float)."""
    if default is None or value is None:
        return value
    if isinstance(default, bool) or isinstance(value, bool):
        if isinstance(default, bool) and isinstance(value, bool):
            return value
    elif isinstance(default, float) and isinstance(value, int | float | str):
        with contextlib.suppress(ValueError):
            return float(value)  # YAML reads 2e-4 as a string
    elif isinstance(value, type(default)):
        return value
    raise ConfigError(
        f"notebook parameter {name}={value!r}: expected {_type_name(default)} (like its default {default!r}), "
        f"got {_type_name(value)}"
    )


def check_parameters(path: str | os.PathLike[str], values: dict[str, Any]) -> dict[str, Any]:
    """Validate parameter overrides against a notebook, before any kernel starts.

    Checks: the name exists in the ``parameters`` cell; the value has the default's type; for names that
    map to config fields (``lora_rank`` → ``lora.rank``) the config field's type too, and every key of
    an ``overrides`` dict; nothing looks like a secret (tokens come from the environment only).

    Returns:
        The values, coerced (``"2e-4"`` → ``0.0002`` for a float).

    Raises:
        ConfigError: naming the parameter and what it expects.
    """
    from mistral_fast.config import check_field
    from mistral_fast.notebook import config_key

    known = read_parameters(path)
    checked: dict[str, Any] = {}
    for name, value in values.items():
        if looks_secret(name, value):
            raise ConfigError(
                f"notebook parameter {name!r} looks like a secret: never pass credentials as parameters (they "
                "would be saved in the output notebook); set HF_TOKEN in the environment instead"
            )
        if name not in known:
            raise ConfigError(f"{Path(path).name} has no parameter {name!r}; its parameters are {sorted(known)}")
        key = config_key(name)
        if key is None:
            value = _check_type(name, value, known[name].default)
        else:  # the config field's own type is the authority (lora_targets takes a set name *or* a list)
            try:
                value = check_field(key, value)
            except ConfigError as err:
                raise ConfigError(f"notebook parameter {name} (config field {key}): {err}") from None
        if name == "overrides":
            for dotted, item in value.items():
                check_field(dotted, item)
        checked[name] = value
    _check_config_values(known, checked)
    return checked


def _check_config_values(known: dict[str, Parameter], values: dict[str, Any]) -> None:
    """Build the run config the kernel will build (`notebook_config`), so bad values fail here too.

    Types are checked one by one above; ranges, allowed names (``lora_targets``) and cross-field rules
    (``save_steps`` a multiple of ``eval_steps``) need the whole config.
    """
    from mistral_fast.notebook import config_key, notebook_config

    if not any(config_key(name) for name in known):
        return  # a notebook that builds no run config (02, 03) has nothing more to check
    namespace = {name: p.default for name, p in known.items()} | values
    try:
        notebook_config(namespace)
    except ConfigError as err:
        raise ConfigError(f"notebook parameters: {err}") from None


# ---------------------------------------------------------------------------------------------
# Kernel, execution, secrets
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def pinned_kernel() -> Iterator[str]:
    """A kernelspec that starts ``sys.executable`` (this environment), visible through JUPYTER_PATH.

    Written to a private temp directory, so nothing in the user's Jupyter set-up is touched, and the
    notebook's own kernel metadata (``python3``, which may be any Python on the machine) is overridden.
    Notebooks running at once in several threads (``sweep --jobs N``) share one such directory, kept on
    JUPYTER_PATH until the last of them is done (each thread swapping the variable would hide another's).
    """
    name = "mistral-fast-" + hashlib.sha256(sys.executable.encode()).hexdigest()[:8]
    with _PINNED_LOCK:
        if _PINNED["users"] == 0:
            root = tempfile.mkdtemp(prefix="mistral_fast_jupyter.")
            spec = Path(root) / "kernels" / name
            spec.mkdir(parents=True)
            argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
            kernel = {"argv": argv, "display_name": f"mistral_fast ({sys.executable})", "language": "python"}
            kernel["metadata"] = {"supported_encryption": ["curve"]}  # ipykernel reads CurveZMQ keys
            (spec / "kernel.json").write_text(json.dumps(kernel))
            old = os.environ.get("JUPYTER_PATH")
            _PINNED.update(root=root, old=old)
            os.environ["JUPYTER_PATH"] = os.pathsep.join(p for p in (root, old) if p)
        _PINNED["users"] += 1
    try:
        yield name
    finally:
        with _PINNED_LOCK:
            _PINNED["users"] -= 1
            if _PINNED["users"] == 0:
                if _PINNED["old"] is None:
                    os.environ.pop("JUPYTER_PATH", None)
                else:
                    os.environ["JUPYTER_PATH"] = _PINNED["old"]
                shutil.rmtree(_PINNED["root"], ignore_errors=True)


_PINNED_LOCK = threading.Lock()
_PINNED: dict[str, Any] = {"users": 0, "root": None, "old": None}


def encrypted_kernel_config() -> Any:
    """Kernel manager config that gives the kernel CurveZMQ keys: its sockets are encrypted.

    ipykernel 7 warns at every start that a kernel on TCP without encryption is open to eavesdropping
    (issue 26: the first line of `mistral-fast demo`'s output). jupyter_client 8.10 provisions keys when
    asked (``transport_encryption``) and the kernelspec declares support (`pinned_kernel` does). An older
    jupyter_client, or a libzmq without Curve, runs the kernel as before.
    """
    import zmq
    from jupyter_client.manager import KernelManager
    from traitlets.config import Config

    if not (zmq.has("curve") and KernelManager.class_traits().get("transport_encryption")):
        return Config()
    return Config({"KernelManager": {"transport_encryption": "auto"}})


def secret_values() -> list[str]:
    """Values of credential-like environment variables (HF_TOKEN, …) long enough to be worth scanning for."""
    names = {n for n in os.environ if n in _SECRET_ENV or looks_secret(n, None)}
    return sorted({os.environ[n] for n in names if len(os.environ[n]) >= 8})


def scrub_secrets(node: Any, secrets: list[str]) -> tuple[Any, int]:
    """Replace every secret value by ``***`` in the strings of a JSON-like tree (a notebook, a cell output).

    Dicts and lists are changed in place (papermill keeps, saves and logs the very node objects), so the
    live notebook never holds a secret after this; a bare string comes back replaced.

    Returns:
        The scrubbed node and how many occurrences were replaced.
    """
    if isinstance(node, str):
        found = 0
        for value in secrets:
            if value in node:
                found += node.count(value)
                node = node.replace(value, "***")
        return node, found
    found = 0
    if isinstance(node, dict):
        for key, item in node.items():
            node[key], n = scrub_secrets(item, secrets)
            found += n
    elif isinstance(node, list):
        for i, item in enumerate(node):
            node[i], n = scrub_secrets(item, secrets)
            found += n
    return node, found


_ENGINE = "mistral_fast_scrubbing"


def _scrubbing_engine() -> str:
    """Register a papermill engine that never lets a secret reach the log or the disk; its name.

    Papermill streams each cell output to its logger (``log_output``) and saves the output notebook at
    every cell start and end and every 30 s; the final `finalise_output` scrub comes too late for both
    (the terminal and batch logs already have it; a run killed mid-way leaves the unscrubbed notebook).
    This engine scrubs every output the moment it arrives, before it is logged, and the whole notebook
    before every save. It is papermill's nbclient engine with those two hooks; the rest is unchanged.
    """
    from papermill.clientwrap import PapermillNotebookClient
    from papermill.engines import NBClientEngine, NotebookExecutionManager, papermill_engines
    from papermill.log import logger
    from papermill.utils import merge_kwargs, remove_args

    from mistral_fast.terminal import TerminalLog

    class ScrubbingManager(NotebookExecutionManager):
        def save(self, **kwargs: Any) -> None:
            if kwargs.get("nb"):
                self.nb = kwargs["nb"]
            scrub_secrets(self.nb, secret_values())
            super().save(**kwargs)

    class ScrubbingClient(PapermillNotebookClient):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.terminal = TerminalLog(lambda: self.widget_state)  # what of each output the log shows, when
            self.message: dict[str, Any] = {}

        def process_message(self, msg: dict[str, Any], cell: Any, cell_index: int) -> Any:
            self.message = msg  # papermill hands log_output_message the output only; its display_id is here
            output = super().process_message(msg, cell, cell_index)
            if msg["msg_type"].startswith("comm") and self.log_output:
                self._log(self.terminal.on_comm(msg["msg_type"], msg["content"].get("comm_id", "")))
            return output

        def log_output_message(self, output: Any) -> None:
            scrub_secrets(output, secret_values())  # in place: the node the notebook holds, before the log
            if output.output_type == "stream" or not self.log_output:
                return super().log_output_message(output)
            display_id = (self.message.get("content", {}).get("transient") or {}).get("display_id")
            self._log(self.terminal.on_output(output, display_id))
            return None

        def execute_cell(self, cell: Any, cell_index: int, *args: Any, **kwargs: Any) -> Any:
            try:
                return super().execute_cell(cell, cell_index, *args, **kwargs)
            finally:
                if self.log_output:
                    self._log(self.terminal.end_cell())

        def _log(self, texts: list[str]) -> None:
            for text in texts:
                self.log.info(scrub_secrets(text, secret_values())[0])

    class ScrubbingEngine(NBClientEngine):
        @classmethod
        def execute_notebook(
            cls, nb, kernel_name, output_path=None, progress_bar=True, log_output=False, autosave_cell_every=30,
            **kwargs,
        ):  # fmt: skip
            # papermill's Engine.execute_notebook, with the scrubbing manager
            nb_man = ScrubbingManager(
                nb, output_path=output_path, progress_bar=progress_bar, log_output=log_output,
                autosave_cell_every=autosave_cell_every,
            )  # fmt: skip
            nb_man.notebook_start()
            try:
                cls.execute_managed_notebook(nb_man, kernel_name, log_output=log_output, **kwargs)
            finally:
                nb_man.cleanup_pbar()
                nb_man.notebook_complete()
            return nb_man.nb

        @classmethod
        def execute_managed_notebook(
            cls, nb_man, kernel_name, log_output=False, stdout_file=None, stderr_file=None, start_timeout=60,
            execution_timeout=None, **kwargs,
        ):  # fmt: skip
            # papermill's NBClientEngine.execute_managed_notebook, with the scrubbing client
            kwargs = remove_args(["input_path"], **kwargs)
            safe_kwargs = remove_args(["timeout", "startup_timeout"], **kwargs)
            final_kwargs = merge_kwargs(
                safe_kwargs, timeout=execution_timeout if execution_timeout else kwargs.get("timeout"),
                startup_timeout=start_timeout, kernel_name=kernel_name, log=logger, log_output=log_output,
                stdout_file=stdout_file, stderr_file=stderr_file, config=encrypted_kernel_config(),
            )  # fmt: skip
            return ScrubbingClient(nb_man, **final_kwargs).execute()

    papermill_engines.register(_ENGINE, ScrubbingEngine)
    return _ENGINE


def finalise_output(path: Path, source: Path) -> int:
    """Scrub credentials from an output notebook and give it back the source's kernelspec.

    Every value of a credential-like environment variable (HF_TOKEN, …) is replaced by ``***``. The
    pinned kernel lived in a temp directory, so the output gets the source notebook's kernelspec (it
    opens in Jupyter without a "kernel not found" prompt) and records which Python ran it.

    Returns:
        How many credential occurrences were removed.
    """
    if not path.is_file():
        return 0
    text = path.read_text(encoding="utf-8")
    found = 0
    for value in secret_values():
        found += text.count(value)
        text = text.replace(value, "***")
    if found:
        log.warning("%s: removed %d occurrence(s) of credentials from the output notebook", path, found)
    nb = json.loads(text)
    plain_progress_bars(nb)
    kernelspec = _read_notebook(source).metadata.get("kernelspec")
    if kernelspec:
        nb.setdefault("metadata", {})["kernelspec"] = dict(kernelspec)
    nb.setdefault("metadata", {})["mistral_fast"] = {"python": sys.executable}
    write_text_atomic(path, json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    return found


_WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


def plain_progress_bars(nb: dict[str, Any]) -> int:
    """Give each tqdm widget of an output notebook its final state as plain text.

    In a papermill kernel tqdm draws ipywidgets (it cannot tell a headless kernel from Jupyter), and the
    ``text/plain`` stored with a widget is its first frame, ``0%``. nbclient keeps the widgets' final
    state in the notebook metadata; from it each bar's ``text/plain`` becomes its last frame
    (``Loading weights: 100%|██████████| 21/21 […]``), which is what a reader without a widget renderer
    (a terminal, GitHub, a diff) sees. Jupyter still renders the widget from the stored state.

    Returns:
        How many progress bars were rewritten.
    """
    from mistral_fast.terminal import WIDGET_VIEW, tqdm_bar_parts, tqdm_bar_text

    states = nb.get("metadata", {}).get("widgets", {}).get(_WIDGET_STATE, {}).get("state", {})
    state_of = lambda model_id: states.get(model_id, {}).get("state", {})  # noqa: E731
    done = 0
    for cell in nb.get("cells", []):
        for output in cell.get("outputs", []):
            view = output.get("data", {}).get(WIDGET_VIEW)
            parts = tqdm_bar_parts(state_of(view.get("model_id", "")), state_of) if view else None
            if parts is None:
                continue  # not a tqdm bar: left as it is
            output["data"]["text/plain"] = tqdm_bar_text(parts)
            done += 1
    return done


def _results_dir(params: dict[str, Parameter], values: dict[str, Any], cwd: Path) -> Path | None:
    """Where the notebook writes results.json: its ``run_dir`` parameter, or its run config's output dir."""
    from mistral_fast.notebook import config_key, notebook_config, resolve_run_dir

    namespace = {name: p.default for name, p in params.items()} | values
    if "run_dir" in namespace:
        smoke, preset = bool(namespace.get("smoke")), str(namespace.get("preset") or "")
        storage = namespace.get("storage") or ""
        return cwd / resolve_run_dir(namespace["run_dir"], smoke=smoke, preset=preset, storage=storage)
    if any(config_key(name) for name in params):  # resolved as the kernel will: "" keeps the preset's dir
        return cwd / notebook_config(namespace).train.output_dir
    return None


def resolve_notebook(notebook: str | os.PathLike[str]) -> Path:
    """A notebook path, or the name of one shipped in ``notebooks/`` (``01_finetune``)."""
    path = Path(notebook)
    if path.is_file():
        return path
    for candidate in (NOTEBOOKS_DIR / path.name, NOTEBOOKS_DIR / f"{path.name}.ipynb"):
        if candidate.is_file():
            return candidate
    shipped = sorted(p.stem for p in NOTEBOOKS_DIR.glob("*.ipynb"))
    raise NotebookError(f"notebook {str(notebook)!r} not found; give a path or one of {shipped}")


def copy_notebooks(dest: str | os.PathLike[str], *, overwrite: bool = False) -> list[Path]:
    """Copy the shipped notebooks (and the sample sweep file) into `dest` for local editing.

    Installed from a wheel, the notebooks live inside site-packages, where edits would be lost on the
    next upgrade; a copy in a directory of the user's is theirs to change (``notebook run PATH`` runs it).

    Args:
        dest: a directory (created if missing).
        overwrite: replace files already there; without it an existing file stops the copy before any write.

    Returns:
        The paths written.

    Raises:
        NotebookError: a file is already there (the user's edits are never replaced silently).
    """
    import shutil

    target = Path(dest)
    sources = sorted(p for p in NOTEBOOKS_DIR.iterdir() if p.suffix in (".ipynb", ".yaml"))
    clash = [str(target / p.name) for p in sources if (target / p.name).exists()]
    if clash and not overwrite:
        raise NotebookError(f"{', '.join(clash)} already exist(s): copy into another directory, or pass --force")
    target.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copyfile(p, target / p.name)) for p in sources]


def run_notebook(
    notebook: str | os.PathLike[str],
    parameters: dict[str, Any] | None = None,
    *,
    output: str | os.PathLike[str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    timeout: int = DEFAULT_TIMEOUT_S,
) -> NotebookRun:
    """Execute a notebook headlessly with papermill in a kernel of this environment.

    Args:
        notebook: path, or a name from ``notebooks/``.
        parameters: overrides of the ``parameters`` cell (checked first; see `check_parameters`).
        output: the output notebook path (default ``runs/notebooks/<name>.ipynb`` under `cwd`).
        cwd: working directory of the kernel (default: the current one); relative paths resolve there.
        timeout: seconds any one cell may run.

    Returns:
        A `NotebookRun` with the output notebook path and the ``results.json`` the notebook wrote.

    Raises:
        ConfigError: a bad parameter (before any kernel starts).
        NotebookError: a cell failed or timed out (the output notebook is kept and named).
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    path = resolve_notebook(notebook)
    values = check_parameters(path, parameters or {})
    workdir = Path(cwd or os.getcwd()).resolve()
    out = Path(output) if output else workdir / "runs" / "notebooks" / path.name
    out = out if out.is_absolute() else workdir / out
    out.parent.mkdir(parents=True, exist_ok=True)
    results_dir = _results_dir(read_parameters(path), values, workdir)
    before = _mtime(results_dir / RESULTS_FILE) if results_dir else None
    start = time.perf_counter()
    log.info("notebook %s -> %s (cwd %s)", path, out, workdir)
    try:
        with pinned_kernel() as kernel:
            papermill.execute_notebook(
                str(path), str(out), parameters=values, kernel_name=kernel, cwd=str(workdir),
                log_output=True, progress_bar=False, execution_timeout=timeout, request_save_on_cell_execute=True,
                engine_name=_scrubbing_engine(),
            )  # fmt: skip
    except PapermillExecutionError as err:
        source = (err.source or "").strip()
        first_line = _one_line(source.splitlines()[0]) if source else ""
        index = _source_index(path, err.source, err.cell_index)
        message = f"{path.name}: cell {index} (`{first_line[:80]}`) failed: {err.ename}: {_one_line(err.evalue)}"
        raise NotebookError(scrub_secrets(f"{message}; output notebook kept at {out}", secret_values())[0]) from None
    except Exception as err:  # timeouts and dead kernels come from nbclient/jupyter_client
        if isinstance(err, MistralFastError):
            raise
        message = f"{path.name}: {type(err).__name__}: {_one_line(str(err))}; output kept at {out}"
        raise NotebookError(scrub_secrets(message, secret_values())[0]) from err
    finally:
        finalise_output(out, path)
    return _finish(path, out, results_dir, before, values, time.perf_counter() - start)


def _source_index(path: Path, source: str | None, fallback: int) -> int:
    """Index of the failing cell in the *source* notebook (papermill's index counts its injected cells)."""
    cells = _read_notebook(path).cells
    return next((i for i, cell in enumerate(cells) if source is not None and cell.source == source), fallback)


def _one_line(text: str) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(text))
    return " ".join(text.split())[:500]


def _mtime(path: Path) -> int | None:
    return path.stat().st_mtime_ns if path.is_file() else None


def _finish(path: Path, out: Path, results_dir: Path | None, before: int | None, values, seconds) -> NotebookRun:
    results_path = results_dir / RESULTS_FILE if results_dir else None
    results = None
    # only a results.json this run wrote counts; one left by an earlier run must not pass for it
    if results_path is not None and _mtime(results_path) not in (None, before):
        results = json.loads(results_path.read_text(encoding="utf-8"))
    return NotebookRun(
        notebook=str(path),
        output_notebook=str(out),
        results_path=str(results_path) if results is not None else None,
        results=results,
        seconds=round(seconds, 2),
        parameters=values,
    )


# ---------------------------------------------------------------------------------------------
# Sweeps
# ---------------------------------------------------------------------------------------------

TABLE_COLUMNS = ("train_loss", "eval_loss", "perplexity", "tokens_per_second", "peak_memory_mb", "wall_seconds")


@dataclass
class SweepSpec:
    """A sweep file: a notebook, base parameters, and a grid or list of variations."""

    notebook: str
    parameters: dict[str, Any]
    variations: list[dict[str, Any]]
    out: str
    timeout: int = DEFAULT_TIMEOUT_S
    name: str = ""  # the sweep's name: its trackers' experiment (train.experiment), default the file's stem
    resources: dict[str, float] = field(default_factory=dict)  # Ray: what each variation asks for (num_gpus, …)
    cwd: str = ""  # where relative paths resolve (the driver's directory; Ray workers run elsewhere)


SWEEP_KEYS = ("notebook", "parameters", "grid", "variations", "out", "timeout", "name", "resources")
RAY_RESOURCES = ("num_cpus", "num_gpus", "memory")


def _resource_ok(name: str, amount: Any) -> bool:
    return name in RAY_RESOURCES and isinstance(amount, int | float) and not isinstance(amount, bool) and amount >= 0


def _resources(path: Path, value: Any) -> dict[str, float]:
    """The sweep file's ``resources`` (each variation's Ray request), checked."""
    value = value or {}
    if not isinstance(value, dict) or not all(_resource_ok(k, v) for k, v in value.items()):
        raise ConfigError(f"{path}: resources must map {list(RAY_RESOURCES)} to numbers >= 0 (e.g. num_gpus: 1)")
    return {k: float(v) for k, v in value.items()}


def load_sweep(path: str | os.PathLike[str], out: str | None = None) -> SweepSpec:
    """Read a sweep YAML file: ``notebook``, ``parameters``, ``grid`` (product) and/or ``variations`` (list).

    Raises:
        ConfigError: unknown keys, no variation, or a variation with a bad parameter (checked up front).
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read the sweep file ({err})") from None
    unknown = sorted(set(data) - set(SWEEP_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; use {', '.join(SWEEP_KEYS)}")
    grid = data.get("grid") or {}
    if any(not isinstance(v, list) or not v for v in grid.values()):
        raise ConfigError(f"{path}: every grid entry must be a non-empty list (e.g. lora_rank: [8, 16])")
    variations = [dict(zip(grid, combo, strict=True)) for combo in itertools.product(*grid.values())] if grid else []
    variations += list(data.get("variations") or [])
    if not variations:
        raise ConfigError(f"{path}: no variations; give `grid:` and/or `variations:`")
    spec = SweepSpec(
        notebook=str(data.get("notebook", "01_finetune")),
        parameters=dict(data.get("parameters") or {}),
        variations=variations,
        out=str(out or data.get("out") or Path("runs") / "sweeps" / path.stem),
        timeout=int(data.get("timeout", DEFAULT_TIMEOUT_S)),
        name=str(data.get("name") or path.stem),
        resources=_resources(path, data.get("resources")),
        cwd=os.getcwd(),
    )
    nb = resolve_notebook(spec.notebook)
    for variation in variations:  # every variation is checked before the first kernel starts
        check_parameters(nb, {**spec.parameters, **variation})
    return spec


def variation_name(index: int, variation: dict[str, Any]) -> str:
    """A directory name for a variation: ``03-lora_rank=16-lora_alpha=32``."""
    text = "-".join(f"{k}={json.dumps(v) if isinstance(v, dict | list) else v}" for k, v in variation.items())
    return f"{index:02d}-" + re.sub(r"[^A-Za-z0-9_.=+-]+", "_", text)[:100]


def _status(vdir: Path) -> dict[str, Any]:
    try:
        return json.loads((vdir / "status.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def run_variation(spec: SweepSpec, index: int, variation: dict[str, Any]) -> dict[str, Any]:
    """Run (or reuse, when it finished before) one variation; never raises for a failed notebook.

    ``status.json`` says ``running`` (with the attempt and the host) while it runs, so a variation whose
    process died is run again by the next attempt or re-run, and its record shows how many tries it took.
    """
    from mistral_fast.evaluate import write_json_atomic

    vdir = Path(spec.cwd or os.getcwd()).resolve() / spec.out / variation_name(index, variation)
    previous = _status(vdir)
    if previous.get("status") == "done":
        log.info("sweep: %s already finished, skipped", vdir.name)
        return previous
    params = _variation_parameters(spec, vdir, variation)
    status: dict[str, Any] = {"name": vdir.name, "variation": variation, "status": "running"}
    status |= {"attempt": int(previous.get("attempt", 0)) + 1, "host": socket.gethostname(), "started": time.time()}
    status["output_notebook"] = str(vdir / "notebook.ipynb")
    write_json_atomic(vdir / "status.json", status)
    start = time.perf_counter()
    try:
        done = run_notebook(spec.notebook, params, output=vdir / "notebook.ipynb", cwd=spec.cwd or None,
                            timeout=spec.timeout)  # fmt: skip
        status |= {"status": "done", "results": done.results}
    except MistralFastError as err:  # one failure must not stop the sweep
        log.error("sweep: %s failed: %s", vdir.name, err)
        status |= {"status": "failed", "error": str(err)}
    status |= {"wall_seconds": round(time.perf_counter() - start, 2), "finished": time.time()}
    write_json_atomic(vdir / "status.json", status)
    return status


def _variation_parameters(spec: SweepSpec, vdir: Path, variation: dict[str, Any]) -> dict[str, Any]:
    """The notebook parameters of one variation: its run directory, and its trackers' experiment and run name.

    Every variation is logged as a run named after it in one experiment named after the sweep (MLflow
    experiment, W&B / Trackio project), unless the sweep's own ``overrides`` name them.
    """
    params = {**spec.parameters, **variation}
    known = read_parameters(resolve_notebook(spec.notebook))
    if "train_output_dir" in known:
        params["train_output_dir"] = str(vdir / "run")
    if "overrides" in known:
        tracking = {"train.experiment": spec.name or Path(spec.out).name, "train.run_name": vdir.name}
        params["overrides"] = {**tracking, **(params.get("overrides") or {})}
    return params


def _row(status: dict[str, Any]) -> dict[str, Any]:
    run = (status.get("results") or {}).get("run") or {}
    train, evaluation = run.get("train") or {}, run.get("evaluation") or {}
    preference = {"preference_accuracy": evaluation["tuned"]["accuracy"]} if "tuned" in evaluation else {}
    if "grpo" in evaluation:  # 05_grpo runs: the held-out mean reward before and after GRPO
        preference = {k: evaluation["grpo"][k] for k in ("reward_before", "reward_after")}
    return {
        "name": status.get("name"),
        **status.get("variation", {}),
        "status": status.get("status"),
        "train_loss": train.get("train_loss"),
        "eval_loss": evaluation.get("loss", train.get("eval_loss")),
        "perplexity": evaluation.get("perplexity", train.get("perplexity")),
        "tokens_per_second": train.get("tokens_per_second"),
        "peak_memory_mb": train.get("peak_memory_mb"),
        "wall_seconds": status.get("wall_seconds"),
        **preference,  # 04_preference runs: the held-out share of pairs ranked right
    }


def write_table(rows: list[dict[str, Any]], out: Path) -> dict[str, Path]:
    """Write the sweep table as ``sweep.csv`` and ``sweep.md`` and a plot ``sweep.png`` (atomically)."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    paths = {"csv": out / "sweep.csv", "markdown": out / "sweep.md", "plot": out / "sweep.png"}
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(paths["csv"]) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    fmt = lambda v: "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
    write_text_atomic(paths["markdown"], "\n".join(lines) + "\n")
    _plot(rows, paths["plot"])
    return paths


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.figure import Figure  # not pyplot: the process's backend stays as it is (train.plot_loss_curve)

    names = [r["name"] for r in rows]
    fig = Figure(figsize=(max(5, 0.9 * len(rows) + 2), 3.5))
    ax = fig.subplots()
    width = 0.4
    for offset, key in ((-width / 2, "train_loss"), (width / 2, "eval_loss")):
        values = [r.get(key) if r.get(key) is not None else 0.0 for r in rows]
        ax.bar([i + offset for i in range(len(rows))], values, width, label=key.replace("_", " "))
    ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("loss")
    ax.legend(loc="lower left", fontsize=8, framealpha=0.9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")


def run_sweep(
    path: str | os.PathLike[str],
    *,
    out: str | None = None,
    executor: str = "local",
    jobs: int = 1,
    address: str | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Path]]:
    """Run every variation of a sweep file; write the table and plot into its output directory.

    Args:
        path: the sweep YAML file.
        out: the sweep directory (default: the file's ``out``).
        executor: ``local`` (this machine; ``jobs`` variations at once) or ``ray`` (one Ray task per
            variation, on the cluster at ``address`` or on a local one started for this call).
        jobs: with ``local``, how many variations run at once (each its own notebook kernel).
        address: with ``ray``, the cluster (``auto``, ``ray://host:10001``, ``host:6379``); None starts a
            local one, unless this process is already connected to one.

    Returns:
        The table rows (one per variation, in the file's order) and the paths of ``sweep.csv``, ``sweep.md``,
        ``sweep.png``.

    Raises:
        ConfigError: an unknown executor or a bad ``jobs``, or a bad sweep file (before anything runs).
    """
    if executor not in ("local", "ray"):
        raise ConfigError(f"executor={executor!r}: use 'local' (with jobs=N) or 'ray'")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"jobs={jobs!r}: a positive number of variations to run at once")
    if executor == "ray" and jobs != 1:
        raise ConfigError(f"jobs={jobs} with executor='ray': Ray runs as many at once as the cluster's resources allow")
    spec = load_sweep(path, out)
    spec.out = str(Path(spec.out).resolve())
    spec.notebook = str(resolve_notebook(spec.notebook).resolve())
    _prepare_trackers(spec)
    items = list(enumerate(spec.variations))
    if executor == "ray":
        statuses = run_on_ray(spec, items, address=address)
    elif jobs > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="sweep") as pool:
            statuses = list(pool.map(lambda item: run_variation(spec, *item), items))
    else:
        statuses = [run_variation(spec, i, v) for i, v in items]
    rows = [_row(s) for s in statuses]
    return rows, write_table(rows, Path(spec.out))


def variation_config(spec: SweepSpec, index: int, variation: dict[str, Any]) -> Any:
    """The `RunConfig` a variation's notebook will build (None for a notebook that builds none)."""
    from mistral_fast.notebook import config_key, notebook_config

    known = read_parameters(resolve_notebook(spec.notebook))
    if not any(config_key(name) for name in known):
        return None
    vdir = Path(spec.out) / variation_name(index, variation)
    namespace = {name: p.default for name, p in known.items()} | _variation_parameters(spec, vdir, variation)
    return notebook_config(namespace)


def _prepare_trackers(spec: SweepSpec) -> None:
    """Create the sweep's MLflow experiment once, before variations run at once.

    Two processes creating MLflow's sqlite tables, or the same experiment, at the same moment collide; the
    variations then only add runs to it.
    """
    configs = [c for i, v in enumerate(spec.variations) if (c := variation_config(spec, i, v)) is not None]
    if not any(set(c.train.report_to) - {"tensorboard"} for c in configs):
        return
    from mistral_fast.tracking import check_trackers, mlflow_experiment, project_name

    for cfg in configs:
        check_trackers(cfg)
    for name in sorted({project_name(c, "mlflow") for c in configs if "mlflow" in c.train.report_to} - {None}):
        mlflow_experiment(name)


# ---------------------------------------------------------------------------------------------
# Sweeps on Ray
# ---------------------------------------------------------------------------------------------

RAY_RETRIES = 1  # a variation whose worker (or node) dies is run once more, then reported failed


def variation_resources(spec: SweepSpec, index: int, variation: dict[str, Any]) -> dict[str, float]:
    """What a variation's Ray task asks for: the sweep's ``resources``, else one GPU unless it trains a tiny
    local model (``smoke``, ``name_or_path: tiny``), which runs on one CPU."""
    from mistral_fast.families import TINY_MODELS

    if spec.resources:
        return dict(spec.resources)
    cfg = variation_config(spec, index, variation)
    if cfg is not None and cfg.model.name_or_path not in TINY_MODELS:
        return {"num_cpus": 1.0, "num_gpus": 1.0}
    return {"num_cpus": 1.0}


def _ray_variation(spec: SweepSpec, index: int, variation: dict[str, Any]) -> dict[str, Any]:
    """One variation on a Ray worker: the same `run_variation` as on one machine (a shared ``out`` directory)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return run_variation(spec, index, variation)


def run_on_ray(spec: SweepSpec, items: list[tuple[int, dict[str, Any]]], *, address: str | None) -> list[dict]:
    """Run each variation as a Ray task; the statuses in the order of `items`.

    Finished variations are skipped (as on one machine) before any task is sent. A task whose worker dies
    is retried once by Ray; a variation lost after that is recorded ``failed`` with Ray's reason, and the
    others go on. Connects to the cluster at `address`, or starts a local one for this call (shut down at
    the end); a process already connected (``ray.init`` before) keeps its cluster.
    """
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address=None if address in (None, "", "local") else address, log_to_driver=True)
    try:
        statuses: dict[int, dict[str, Any]] = {}
        pending: dict[Any, tuple[int, dict[str, Any]]] = {}
        for index, variation in items:
            vdir = Path(spec.out) / variation_name(index, variation)
            if _status(vdir).get("status") == "done":
                statuses[index] = run_variation(spec, index, variation)  # logs "skipped", runs nothing
                continue
            task = ray.remote(_ray_variation).options(
                name=vdir.name, max_retries=RAY_RETRIES, **variation_resources(spec, index, variation)
            )
            pending[task.remote(spec, index, variation)] = (index, variation)
        waiting = list(pending)
        while waiting:
            ready, waiting = ray.wait(waiting, num_returns=1)
            index, variation = pending[ready[0]]
            try:
                statuses[index] = ray.get(ready[0])
            except ray.exceptions.RayError as err:  # the worker or its node died, more often than retried
                statuses[index] = _lost_variation(spec, index, variation, err)
        return [statuses[index] for index, _ in items]
    finally:
        if started:
            ray.shutdown()


def _lost_variation(spec: SweepSpec, index: int, variation: dict[str, Any], err: Exception) -> dict[str, Any]:
    """Record a variation whose Ray task was lost as ``failed`` (the next run of the sweep retries it)."""
    from mistral_fast.evaluate import write_json_atomic

    vdir = Path(spec.out) / variation_name(index, variation)
    status = _status(vdir) | {"name": vdir.name, "variation": variation, "status": "failed"}
    status["error"] = f"Ray task lost after {RAY_RETRIES + 1} attempt(s): {type(err).__name__}: {_one_line(str(err))}"
    log.error("sweep: %s failed: %s", vdir.name, status["error"])
    write_json_atomic(vdir / "status.json", status)
    return status
