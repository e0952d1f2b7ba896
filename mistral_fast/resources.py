"""Where the presets (`configs/`), the sample data (`data/`) and the notebooks (`notebooks/`) are.

They live once in git, at the top of the repository (the layout users know), and the wheel carries a
copy under ``mistral_fast/_resources/`` (pyproject.toml maps them there at build time). One lookup
serves both: a checkout's own directories first, so an edit shows at once, else the installed copy
read through `importlib.resources` (a pip-installed package on Colab or Kaggle has no checkout).
No torch here: the CLI's ``config --list`` stays instant.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Literal

from mistral_fast.errors import MistralFastError

Kind = Literal["configs", "data", "notebooks"]
KINDS: tuple[str, ...] = ("configs", "data", "notebooks")
_CHECKOUT = Path(__file__).resolve().parent.parent


def in_checkout() -> bool:
    """Whether this package is imported from a source checkout (``pyproject.toml`` beside the package)."""
    return (_CHECKOUT / "pyproject.toml").is_file() and (_CHECKOUT / "mistral_fast").is_dir()


def resource_dir(kind: Kind) -> Path:
    """The directory of shipped ``configs``, ``data`` or ``notebooks``: the checkout's, else the installed copy.

    The choice is per directory, never per file: an editable install may also hold a stale copy under
    ``_resources/``, and a file deleted from the checkout must not come back from there.

    Raises:
        MistralFastError: an unknown kind, or an installation without the resources (a wheel built
            without them, or a zip import), saying how to reinstall.
    """
    if kind not in KINDS:
        raise MistralFastError(f"resource kind {kind!r}: one of {list(KINDS)}")
    if in_checkout() and (_CHECKOUT / kind).is_dir():
        return _CHECKOUT / kind
    installed = importlib.resources.files("mistral_fast").joinpath("_resources", kind)
    path = Path(str(installed))
    if not path.is_dir():  # a zip import gives no real directory; papermill and pip need real files
        raise MistralFastError(
            f"mistral_fast at {_CHECKOUT / 'mistral_fast'} has no {kind}/ (looked in {path}): reinstall it from "
            "a wheel or the repository (pip install 'mistral-fast @ git+URL'), not from a zip"
        )
    return path


def resource_path(kind: Kind, name: str) -> Path:
    """A file shipped in ``configs``, ``data`` or ``notebooks`` (it may not exist: callers say what is there)."""
    return resource_dir(kind) / name
