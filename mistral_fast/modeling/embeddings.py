"""Untrained embedding rows: found before training, so a run stops instead of learning from (or into) zeros.

Mistral Nemo *base* ships control tokens whose rows in ``embed_tokens`` and ``lm_head`` were never trained
(near-zero: Mistral pretrained on text without ``[INST]``…; unsloth #1024 reports NaN losses). A chat data
set puts ``[INST]``, ``[/INST]`` and ``</s>`` in every example: the model reads zero vectors there and is
asked to predict ``</s>`` from a zero ``lm_head`` row. QLoRA trains neither matrix, so the adapter cannot fix
them either. Unsloth overwrites such rows with the mean of the trained rows, in the base weights; a peft
adapter saved afterwards does not carry that change, so the same adapter on the original base (evaluation,
merge, GGUF) would see the zero rows again. mistral_fast therefore stops, names the tokens and says what to
do, rather than train on a base it cannot reproduce at export.

A row is untrained when its L2 norm is below `RELATIVE_THRESHOLD` times the median row norm of its matrix
("near zero against the rest": trained rows of Mistral checkpoints sit within a factor of a few of the median).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from mistral_fast.errors import ModelError

if TYPE_CHECKING:
    import torch

__all__ = ["RELATIVE_THRESHOLD", "check_untrained_tokens", "untrained_rows"]

RELATIVE_THRESHOLD = 1e-2


def untrained_rows(weight: torch.Tensor, threshold: float = RELATIVE_THRESHOLD) -> torch.Tensor:
    """Boolean mask of the rows of an embedding or output matrix whose norm is near zero against the rest.

    Args:
        weight: a ``(vocab, hidden)`` matrix (any float dtype; computed in fp32).
        threshold: a row is untrained below ``threshold × median row norm``.

    Returns:
        A ``(vocab,)`` bool tensor.
    """
    import torch

    norms = weight.detach().float().norm(dim=1)
    return norms < threshold * torch.median(norms)


def _matrices(model: Any) -> dict[str, torch.Tensor]:
    """The input embedding and (if separate) the output projection of a (peft-wrapped) causal LM."""
    out = {"embed_tokens": model.get_input_embeddings().weight}
    head = model.get_output_embeddings()
    if head is not None and head.weight is not out["embed_tokens"]:
        out["lm_head"] = head.weight
    return out


def check_untrained_tokens(model: Any, token_ids: Iterable[int], tokenizer: Any = None) -> None:
    """Stop before training when the data uses tokens whose embedding or ``lm_head`` rows are untrained.

    Args:
        model: the loaded model (transformers or peft).
        token_ids: every id the training and evaluation data contain.
        tokenizer: names the tokens in the message (optional).

    Raises:
        ModelError: which tokens, in which matrix, how often, and what to do.
    """
    used = sorted(set(token_ids))
    if not used:
        return
    found: dict[int, list[str]] = {}
    for name, weight in _matrices(model).items():
        mask = untrained_rows(weight)
        for token in used:
            if token < mask.shape[0] and bool(mask[token]):
                found.setdefault(token, []).append(name)
    if not found:
        return
    names = tokenizer.convert_ids_to_tokens(list(found)) if tokenizer is not None else [str(t) for t in found]
    listed = ", ".join(f"{n!r} (id {t}: {'+'.join(found[t])})" for t, n in list(zip(found, names, strict=True))[:8])
    raise ModelError(
        f"the training data uses {len(found)} token(s) whose rows in the base model are untrained (near-zero "
        f"norm against the rest): {listed}{' …' if len(found) > 8 else ''}. LoRA does not train these rows, so the "
        "model would read and predict zeros there (NaN losses on Mistral Nemo base). Use the instruct checkpoint "
        "of this model (its control tokens are trained), or, when only chat control tokens are listed, data "
        "in the 'text' format (it uses <s> and </s> only)"
    )
