"""`Example`: one normalised training example, the type the data stage produces and the tokenizer consumes.

It lives below both (a foundation module) so that neither imports the other for it: `data` validates
conversations with the tokenizer's rules, and the tokenizer tokenises `Example`s; with the type in `data`
the two modules would form an import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Example:
    """One normalised training example: a conversation, or raw text for continued pre-training."""

    messages: list[dict[str, Any]] | None
    text: str | None
    where: str
    tools: list[dict[str, Any]] | None = None  # the functions the conversation may call (OpenAI's shape)
