"""Errors a user can act on.

Every error the package raises on purpose is a `MistralFastError`: its message says what was wrong,
where (file:line or parameter name) and what to do. The CLI prints it as one line and exits with
code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class MistralFastError(ValueError):
    """Base class of the errors a user can act on (bad input, bad config, missing file)."""


class ConfigError(MistralFastError):
    """A run configuration field, YAML file or override is invalid."""


class DataError(MistralFastError):
    """A data file or record cannot be used for training."""


class TokenizerError(MistralFastError):
    """A conversation cannot be encoded in Mistral's chat format, or a tokenizer is unusable."""


class ModelError(MistralFastError):
    """A model path, architecture or quantisation request cannot be honoured."""


class NotebookError(MistralFastError):
    """A notebook run failed: a cell raised, timed out, or the notebook is malformed."""
