"""Causal-LM cross-entropy without the full logits: the lm_head projection and the loss, a chunk of tokens at a time.

With tekken's 131,072 ids the fp32 logits of one 4,096-token sequence are 2 GiB, and transformers' loss holds
about three such tensors at the start of the backward pass (log-softmax's output, its gradient, the logits'
gradient; `mistral_fast.memory.logits_peak_bytes`): more than a QLoRA'd Nemo's decoder layers. Here the
forward computes, for each chunk of trained positions, ``logits = hidden @ W.T`` (in the lm_head's dtype, then
fp32 as transformers does), their log-sum-exp and the target logit, and keeps only the per-token
log-sum-exp; the backward recomputes each chunk's logits and turns them into the gradient of the hidden states
(and of ``W`` when it is trainable) at once. The live extra memory is a few chunk × vocab fp32 tensors
(`chunk_rows`: 64 MiB of logits per chunk) instead of three batch × seq × vocab ones.

Only positions whose next-token label is not -100 are projected (prompt tokens cost nothing). The reduction
is transformers' ``ForCausalLMLoss``: the sum over trained tokens divided by ``num_items_in_batch`` when the
Trainer passes it (gradient accumulation), else their mean — so the loss and its gradients equal the plain
loss's (tests/test_chunked_loss.py: within 1e-5).

On CUDA, TRL 1.15's SFTTrainer already projects in chunks (its fused LM head, a Triton kernel); this is the
hf backend's path where that kernel cannot run (CPU), wired in `mistral_fast.train`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["CHUNK_BYTES", "causal_lm_loss", "chunk_rows", "chunked_cross_entropy", "model_loss"]

CHUNK_BYTES = 64 * 2**20
"""fp32 logits per chunk: small next to a decoder layer, large enough that the matmuls stay efficient."""


def chunk_rows(vocab: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Token rows per chunk so that one chunk's fp32 logits take about `chunk_bytes` (at least 16 rows)."""
    return max(16, chunk_bytes // (4 * vocab))


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F

    return F.linear(hidden, weight).float()  # as transformers: the lm_head's dtype, then fp32


def _make_function() -> type:
    import torch

    class _ChunkedCrossEntropy(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows: int) -> Any:
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            lse = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
            for start in range(0, hidden.shape[0], rows):
                stop = min(start + rows, hidden.shape[0])
                logits = _chunk_logits(hidden[start:stop], weight)
                lse[start:stop] = torch.logsumexp(logits, dim=-1)
                picked = logits.gather(1, targets[start:stop, None]).squeeze(1)
                total += (lse[start:stop] - picked).sum()
                del logits
            ctx.save_for_backward(hidden, weight, targets, lse)
            ctx.rows = rows
            return total

        @staticmethod
        def backward(ctx: Any, grad_total: torch.Tensor) -> Any:
            hidden, weight, targets, lse = ctx.saved_tensors
            need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            grad_hidden = torch.empty_like(hidden) if need_hidden else None
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
            for start in range(0, hidden.shape[0], ctx.rows):
                stop = min(start + ctx.rows, hidden.shape[0])
                # d(lse - logit[t]) / dlogits = softmax - onehot(t), computed in place on the recomputed chunk
                grad = _chunk_logits(hidden[start:stop], weight)
                grad.sub_(lse[start:stop, None]).exp_()
                grad[torch.arange(stop - start, device=grad.device), targets[start:stop]] -= 1
                grad.mul_(grad_total)
                if need_hidden:
                    grad_hidden[start:stop] = (grad.to(weight.dtype) @ weight).to(hidden.dtype)
                if need_weight:
                    grad_weight += grad.t() @ hidden[start:stop].float()
                del grad
            if grad_weight is not None:
                grad_weight = grad_weight.to(weight.dtype)
            return grad_hidden, grad_weight, None, None

    return _ChunkedCrossEntropy


_FUNCTION: type | None = None


def chunked_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows: int | None = None
) -> torch.Tensor:
    """Summed cross-entropy of ``hidden @ weight.T`` against `targets`, projected `rows` tokens at a time.

    Args:
        hidden: ``(tokens, hidden)`` final hidden states of the positions to score.
        weight: the lm_head's ``(vocab, hidden)`` weight.
        targets: ``(tokens,)`` next-token ids.
        rows: tokens per chunk; default `chunk_rows` of the vocabulary.

    Returns:
        A 0-d fp32 tensor: the sum of the per-token losses.
    """
    global _FUNCTION
    if _FUNCTION is None:
        _FUNCTION = _make_function()
    return _FUNCTION.apply(hidden, weight, targets, rows or chunk_rows(weight.shape[0]))


def causal_lm_loss(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: int | torch.Tensor | None = None,
    rows: int | None = None,
) -> torch.Tensor:
    """transformers' causal-LM loss (shift, ignore -100, sum/num_items or mean) without the full logits.

    Args:
        hidden_states: ``(batch, seq, hidden)`` output of the decoder's final norm.
        weight: the lm_head weight.
        labels: ``(batch, seq)`` labels, -100 where not trained (unshifted, as given to the model).
        num_items_in_batch: the Trainer's count of trained tokens over the accumulated batch, if any.
        rows: tokens per chunk (default: `chunk_rows`).

    Returns:
        The loss (0-d fp32).
    """
    labels = labels[:, 1:].to(hidden_states.device)
    mask = labels != -100
    total = chunked_cross_entropy(hidden_states[:, :-1][mask], weight, labels[mask], rows)
    if num_items_in_batch is None:
        return total / mask.sum().clamp(min=1)
    if hasattr(num_items_in_batch, "to"):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


_DECODER_INPUTS = ("input_ids", "attention_mask", "position_ids", "inputs_embeds")


def model_loss(
    model: Any, inputs: dict[str, Any], num_items_in_batch: int | torch.Tensor | None = None, rows: int | None = None
) -> torch.Tensor:
    """Run a (peft-wrapped) causal LM's decoder on `inputs` and return `causal_lm_loss` of its ``labels``.

    The decoder is ``base_model`` of the transformers model (LoRA layers are injected in place, so they run).
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    kwargs = {k: inputs[k] for k in _DECODER_INPUTS if inputs.get(k) is not None}
    outputs = inner.base_model(**kwargs, use_cache=False)
    weight = inner.get_output_embeddings().weight
    return causal_lm_loss(outputs.last_hidden_state, weight, inputs["labels"], num_items_in_batch, rows)
