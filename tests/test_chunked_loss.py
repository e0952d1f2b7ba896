"""The chunked causal-LM loss equals transformers' plain loss (value and gradients) without the full logits."""

from __future__ import annotations

import pytest
import torch

from mistral_fast.config import RunConfig
from mistral_fast.modeling.chunked_loss import causal_lm_loss, chunk_rows, model_loss


def _plain(hidden, weight, labels, num_items=None):
    """transformers' ForCausalLMLoss on the full logits (the reference)."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    logits = torch.nn.functional.linear(hidden, weight)
    return ForCausalLMLoss(logits, labels, vocab_size=weight.shape[0], num_items_in_batch=num_items)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_items", [None, 37])
def test_equal_to_the_plain_loss_with_gradients(dtype, num_items):
    gen = torch.Generator().manual_seed(0)
    hidden = (torch.randn(3, 50, 64, generator=gen) * 2).to(dtype).requires_grad_()
    weight = (torch.randn(1000, 64, generator=gen) * 0.1).to(dtype).requires_grad_()
    labels = torch.randint(0, 1000, (3, 50), generator=gen)
    labels[0, :20] = -100  # a prompt: not trained
    labels[2, -5:] = -100  # padding
    ours = causal_lm_loss(hidden, weight, labels, num_items, rows=16)  # several chunks, a ragged last one
    ours.backward()
    got = (ours.detach(), hidden.grad.clone(), weight.grad.clone())
    hidden.grad, weight.grad = None, None
    plain = _plain(hidden, weight, labels, num_items)
    plain.backward()
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: both round the same products, summed differently
    assert torch.allclose(got[0], plain.detach(), rtol=tol, atol=tol)
    assert torch.allclose(got[1].float(), hidden.grad.float(), rtol=tol, atol=tol * 1e-1)
    assert torch.allclose(got[2].float(), weight.grad.float(), rtol=tol, atol=tol * 1e-1)


def test_chunk_size_follows_the_vocabulary():
    assert chunk_rows(131072) == 128 and chunk_rows(32768) == 512  # 64 MiB of fp32 logits per chunk


def test_on_the_qlora_tiny_nemo_equal_to_the_models_own_loss():
    """The loaded QLoRA model (4-bit layers, LoRA, k-bit prepared lm_head): loss and LoRA gradients to 1e-5."""
    from mistral_fast.modeling import load_model

    cfg = RunConfig().with_overrides(
        {"model.name_or_path": "tiny-nemo", "model.tokenizer": "v3-tekken", "model.backend": "hf",
         "model.compute_dtype": "float32", "lora.dropout": 0.0}
    )  # fmt: skip
    model = load_model(cfg).model
    model.train()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 131072, (2, 40), generator=gen)
    labels = ids.clone()
    labels[:, :10] = -100
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for p in params.values():  # lora_B is zero at init: give every matrix a gradient to compare
        p.data.normal_(0, 0.05, generator=gen)

    def loss_and_grads(fn):
        model.zero_grad()
        loss = fn()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in params.items()}

    ours, our_grads = loss_and_grads(lambda: model_loss(model, inputs, rows=7))
    plain, plain_grads = loss_and_grads(lambda: model(**inputs).loss)
    assert torch.allclose(ours, plain, rtol=1e-5, atol=1e-5)
    assert our_grads.keys() == plain_grads.keys() and len(our_grads) == 28
    for name, grad in our_grads.items():
        assert torch.allclose(grad, plain_grads[name], rtol=1e-5, atol=1e-6), name
