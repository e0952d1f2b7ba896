"""The tiny local Mistral behind ``model.name_or_path: tiny``: tests and the offline demo.

Apart from the product loaders on purpose: it builds a model (random weights, the real tokenizer), it
does not load one. `resolve_model_path("tiny")` is the one place the loaders meet it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mistral_fast.constants import NF4_BLOCK
from mistral_fast.errors import ModelError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger("mistral_fast")

# The tiny model behind `model.name_or_path: tiny`. Every size is a multiple of 64 (bitsandbytes'
# 4-bit blocksize) and head_dim is 32; vocab and special ids are the real Mistral v0.3 ones, so the
# real tokenizer, chat template and GGUF export all run unchanged. The 32768 x 128 embedding and
# lm_head dominate the cost; 128/2 layers trains a step of 4 x 256 tokens in well under a second on
# one CPU thread while still having GQA, several heads and a real MLP.
TINY_DEFAULTS: dict[str, Any] = {
    "hidden_size": 128,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "intermediate_size": 448,  # 3.5 x hidden, Mistral-7B's ratio (14336 / 4096)
    "vocab_size": 32768,
    "sliding_window": 4096,  # Mistral-7B v0.1's window: the sliding-window code path, a no-op below 4k tokens
    "rope_theta": 1e6,  # v0.2/v0.3's RoPE base
    "max_position_embeddings": 32768,
    "seed": 0,
    "dtype": "bfloat16",  # what Mistral checkpoints ship in
    "tokenizer": "v3",
    "head_dim": None,  # None: hidden_size / num_heads (Mistral-7B); Nemo and Small 3 decouple it
    "tie_word_embeddings": False,  # Mistral-7B, Nemo and Small untie lm_head; Ministral 3 (3B) ties it
    "attention_gain": 1.0,  # q_proj and k_proj weights x this after the draw (1: N(0, 0.02) like the rest)
    "copy_heads": False,  # each head's o_proj block = its v_proj rows transposed (see _shape_attention)
    "word_pairs": 0.0,  # share of a word's bare form in its space-prefixed form's embedding (see _pair_word_forms)
}
# Arguments added after models were cached: at their TINY_DEFAULTS value they stay out of the cache key (same key,
# same bytes).
_LATER_ARGUMENTS = ("head_dim", "tie_word_embeddings", "attention_gain", "copy_heads", "word_pairs")
# The tekken generations in small: the real 131,072-id tekken vocabulary, no sliding window, and a head_dim
# that is not hidden/heads (Nemo: 128 with 5120/32 = 160; here 16 with 128/4 = 32), the shape that breaks
# code assuming hidden_size == num_heads * head_dim. q/o projections are 64 wide: 4-bit blocks stay in rows.
TINY_VARIANTS: dict[str, dict[str, Any]] = {
    "tiny": {},
    "tiny-nemo": {
        "tokenizer": "v3-tekken",
        "vocab_size": 131072,
        "head_dim": 16,
        "sliding_window": None,
        "rope_theta": 1e6,
    },
    "tiny-small": {
        "tokenizer": "v7-tekken",
        "vocab_size": 131072,
        "head_dim": 16,
        "sliding_window": None,
        "rope_theta": 1e8,
    },
    # A random model that can copy a token from its prompt, as function calling needs (tools-smoke): tied
    # embeddings, so a token's input vector is its output direction; copy heads, so attending to a token
    # writes that vector; q/k x4, so attention starts selective enough for LoRA to steer it in minutes; word
    # pairs, so the request's " km" and the call's "km" (two ids) are near each other, as in a trained model.
    # 256 wide (8 heads, 4 kv): at 128 the adapter learns the training calls but held-out ones slowly (README).
    "tiny-copy": {
        "tie_word_embeddings": True,
        "copy_heads": True,
        "attention_gain": 4.0,
        "word_pairs": 0.7,
        "hidden_size": 256,
        "num_heads": 8,
        "num_kv_heads": 4,
        "intermediate_size": 896,
    },
}
"""``model.name_or_path`` of each tiny model → its `build_tiny_model` arguments (rows: `families.TINY_MODELS`)."""
# Bump when build_tiny_model changes what it writes: the cache key includes it.
_TINY_FORMAT = 2
_TINY_FINAL_NORM = 8.0


def build_tiny_model(
    path: str | os.PathLike[str],
    *,
    hidden_size: int = TINY_DEFAULTS["hidden_size"],
    num_layers: int = TINY_DEFAULTS["num_layers"],
    num_heads: int = TINY_DEFAULTS["num_heads"],
    num_kv_heads: int = TINY_DEFAULTS["num_kv_heads"],
    intermediate_size: int = TINY_DEFAULTS["intermediate_size"],
    vocab_size: int = TINY_DEFAULTS["vocab_size"],
    sliding_window: int | None = TINY_DEFAULTS["sliding_window"],
    rope_theta: float = TINY_DEFAULTS["rope_theta"],
    max_position_embeddings: int = TINY_DEFAULTS["max_position_embeddings"],
    seed: int = TINY_DEFAULTS["seed"],
    dtype: str = TINY_DEFAULTS["dtype"],
    tokenizer: str = TINY_DEFAULTS["tokenizer"],
    head_dim: int | None = TINY_DEFAULTS["head_dim"],
    tie_word_embeddings: bool = TINY_DEFAULTS["tie_word_embeddings"],
    attention_gain: float = TINY_DEFAULTS["attention_gain"],
    copy_heads: bool = TINY_DEFAULTS["copy_heads"],
    word_pairs: float = TINY_DEFAULTS["word_pairs"],
) -> Path:
    """Write a small random `MistralForCausalLM` with the real tokenizer to `path`.

    The architecture is Mistral's own (GQA, sliding window, RoPE base, SiLU MLP, RMSNorm, untied
    embeddings, BOS 1 / EOS 2); only the sizes are small. Weights are drawn from a seeded generator
    in a fixed order, so the same arguments give byte-identical safetensors.

    Args:
        path: directory to write (created; existing files are overwritten).
        hidden_size: model width; a multiple of 64 so 4-bit blocks never straddle rows.
        num_layers: decoder layers.
        num_heads: attention heads; ``hidden_size / num_heads`` is the head dim.
        num_kv_heads: key/value heads (grouped-query attention); divides ``num_heads``.
        intermediate_size: MLP width; a multiple of 64.
        vocab_size: must cover the tokenizer (32768 for Mistral v3).
        sliding_window: attention window in tokens, or None for full attention.
        rope_theta: RoPE base frequency.
        max_position_embeddings: longest supported context.
        seed: weight seed.
        dtype: storage dtype of the weights (``"bfloat16"``, ``"float16"`` or ``"float32"``).
        tokenizer: tokenizer version passed to `mistral_fast.tokenizer.load_tokenizer`.
        head_dim: attention head width; None for ``hidden_size / num_heads``.
        tie_word_embeddings: one matrix for the embeddings and ``lm_head`` (no ``lm_head.weight`` is written).
        attention_gain: factor on the drawn ``q_proj``/``k_proj`` weights; attention logits scale by its square.
        copy_heads: make every head's output projection the transpose of its value projection, so attending
            to a token adds (a projection of) that token's own vector to the residual stream.
        word_pairs: in [0, 1); above 0, each space-prefixed piece whose bare form is also a piece (SentencePiece
            ``▁km`` and ``km``) gets an embedding that shares this part of its variance with the bare form's.

    Returns:
        The directory: ``config.json``, ``generation_config.json``, ``model.safetensors`` and the
        tokenizer files.

    Raises:
        ModelError: a size is not usable with 4-bit quantisation or does not fit the tokenizer.
    """
    import torch
    from transformers import GenerationConfig, MistralForCausalLM

    from mistral_fast.tokenizer import load_tokenizer

    _check_tiny_sizes(hidden_size, intermediate_size, num_heads, num_kv_heads)
    tok = load_tokenizer(tokenizer)
    if len(tok) > vocab_size:
        raise ModelError(f"vocab_size={vocab_size} is smaller than the {tokenizer} tokenizer ({len(tok)} tokens)")
    config = _text_config(
        tok,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim or hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        rope_theta=rope_theta,
        sliding_window=sliding_window,
        tie_word_embeddings=tie_word_embeddings,
    )
    model = MistralForCausalLM(config)
    _init_tiny_weights(model, seed=seed, std=config.initializer_range)
    _shape_attention(model, attention_gain=attention_gain, copy_heads=copy_heads)
    _pair_word_forms(model, tok, word_pairs)
    model = model.to(getattr(torch, dtype))
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)  # safetensors (transformers 5 writes nothing else)
    tok.save_pretrained(out)
    return out


def _check_tiny_sizes(hidden_size: int, intermediate_size: int, num_heads: int, num_kv_heads: int) -> None:
    for name, value in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size)):
        if value <= 0 or value % NF4_BLOCK:
            raise ModelError(f"{name}={value}: use a positive multiple of 64 (bitsandbytes' 4-bit blocksize)")
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ModelError(
            f"num_heads={num_heads}, num_kv_heads={num_kv_heads}: num_heads must divide hidden_size={hidden_size} "
            "and num_kv_heads must divide num_heads"
        )


def _init_tiny_weights(model: PreTrainedModel, *, seed: int, std: float) -> None:
    """Seeded N(0, std) matrices and unit norms, drawn in sorted-name order.

    Our own draw rather than transformers' `_init_weights`: its order and defaults change between
    releases, and the cache key promises the same weights for the same arguments.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name in ("model.norm.weight", "model.language_model.norm.weight"):  # Mistral3: the wrapped decoder's
                # A unit final norm with N(0, 0.02) lm_head rows caps logits near ±2.5: every next-token
                # distribution is almost uniform, no fine-tune can make it confident (LoRA does not touch the
                # norm or the head), and greedy comparisons hinge on near-ties. Trained Mistral models have a
                # final norm of several units; this scale gives the random model peaked distributions too.
                param.fill_(_TINY_FINAL_NORM)
            elif name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def _shape_attention(model: PreTrainedModel, *, attention_gain: float, copy_heads: bool) -> None:
    """Give the random attention of a tiny model the two things copying from the prompt needs.

    Why: a frozen N(0, 0.02) model attends almost uniformly (logits of std ~0.05), and what a head writes is an
    unrelated random map of what it reads, so LoRA has to grow both a selective attention and a token-to-itself
    map before a single argument can be copied; at 300 CPU steps it grows neither. ``attention_gain`` scales
    ``q_proj``/``k_proj``; ``copy_heads`` sets each head's ``o_proj`` block to its (shared, GQA) ``v_proj`` rows
    transposed, so the head's value-output map is a positive semi-definite projection: with tied embeddings, the
    attended token's logit rises. Nothing is drawn here, so the draw of every other weight is unchanged.
    """
    import torch

    if attention_gain == 1.0 and not copy_heads:
        return
    cfg = model.config
    head_dim = cfg.head_dim
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            attn.q_proj.weight.mul_(attention_gain)
            attn.k_proj.weight.mul_(attention_gain)
            if copy_heads:
                for head in range(cfg.num_attention_heads):
                    kv = head // group
                    rows = attn.v_proj.weight[kv * head_dim : (kv + 1) * head_dim]
                    attn.o_proj.weight[:, head * head_dim : (head + 1) * head_dim] = rows.T


def _pair_word_forms(model: PreTrainedModel, tok: Any, share: float) -> None:
    """Make each space-prefixed piece's embedding ``sqrt(1 - share) * own + sqrt(share) * bare form's``.

    Why: SentencePiece writes a word after a space and the same word after a quote as different ids (a
    request's ``▁km``, a call's ``"km"`` → ``km``; ``▁Norway``, ``"Norway"`` → ``N``, ``or``, ``way``). A trained
    model's embeddings relate the two; a random model's are unrelated, so copying a word from a request into
    JSON arguments is a lookup the adapter must learn word by word, and a few CPU minutes are not enough for it
    (README, Tool calls). The bare form is the piece the word starts with after a quote (the whole word when it
    is one piece); the rest of a longer word follows from its first piece, which LoRA learns quickly. With the
    forms paired (cosine ~``sqrt(share)``), copy heads carry the word across. The norm stays that of a drawn
    row; the vectors mixed in are the drawn ones, so the order of the pairs does not matter; nothing is drawn.
    """
    import torch

    if not share:
        return
    if not 0 < share < 1:
        raise ModelError(f"word_pairs={share}: use a share in [0, 1)")
    vocab = tok.get_vocab()
    words = {index: piece[1:] for piece, index in vocab.items() if piece[:1] in ("▁", "Ġ") and len(piece) > 1}
    quote = tok.convert_ids_to_tokens(tok('"', add_special_tokens=False)["input_ids"])
    unsplit = [index for index, word in words.items() if word not in vocab]
    encoded = tok(['"' + words[index] for index in unsplit], add_special_tokens=False)["input_ids"]
    first = {}
    for index, ids in zip(unsplit, encoded, strict=True):
        pieces = tok.convert_ids_to_tokens(ids)
        if pieces[: len(quote)] == quote and len(pieces) > len(quote):
            first[index] = ids[len(quote)]
    spaced = list(words)
    bare = [vocab[words[index]] if words[index] in vocab else first.get(index) for index in spaced]
    spaced, bare = [s for s, b in zip(spaced, bare, strict=True) if b is not None], [b for b in bare if b is not None]
    weight = model.get_input_embeddings().weight
    with torch.no_grad():
        drawn = weight.detach().clone()
        weight[spaced] = (1 - share) ** 0.5 * drawn[spaced] + share**0.5 * drawn[bare]


def tiny_model_dir(**overrides: Any) -> Path:
    """The cached tiny model for ``model.name_or_path: tiny``, built on first use.

    The cache lives in ``$MISTRAL_FAST_CACHE`` (default ``~/.cache/mistral_fast``) under a name that
    hashes the build arguments, the build format and the tokenizer source, so a change to any of them
    builds a fresh copy instead of reusing a stale one. The build goes to a temporary directory that
    is renamed into place: concurrent processes (pytest workers, notebooks) never see a half-written
    model, and the loser of a race simply uses the winner's copy.

    Args:
        **overrides: any `build_tiny_model` keyword, e.g. ``hidden_size=256``.

    Returns:
        The model directory.
    """
    params = {**TINY_DEFAULTS, **overrides}
    unknown = sorted(set(overrides) - set(TINY_DEFAULTS))
    if unknown:
        raise ModelError(f"tiny_model_dir: unknown argument(s) {unknown}; known: {sorted(TINY_DEFAULTS)}")
    name = f"tiny-mistral-{params['tokenizer']}-{_tiny_cache_key(params)}"
    return _cached_build(name, lambda tmp: build_tiny_model(tmp, **params), "tiny model")


def _cached_build(name: str, build: Any, what: str) -> Path:
    """``$MISTRAL_FAST_CACHE/name``, built by ``build(tmp)`` into a temporary directory renamed into place."""
    root = Path(os.environ.get("MISTRAL_FAST_CACHE") or Path.home() / ".cache" / "mistral_fast")
    final = root / name
    if (final / "config.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        build(tmp)
        with contextlib.suppress(OSError):  # another process won the race: its copy is identical
            tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not (final / "config.json").is_file():
        raise ModelError(f"could not build the {what} into {final}: check that the directory is writable")
    log.info("built the %s in %s", what, final)
    return final


def _tiny_cache_key(params: dict[str, Any]) -> str:
    import transformers

    # arguments at the value they had before they existed: keep the cache keys of models built before them
    params = {k: v for k, v in params.items() if k not in _LATER_ARGUMENTS or v != TINY_DEFAULTS[k]}
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    digest.update(f"format={_TINY_FORMAT};transformers={transformers.__version__}".encode())
    tokenizer_src = Path(__file__).resolve().parent.parent / "tokenizer.py"
    if tokenizer_src.is_file():  # a tokenizer fix must not leave a stale copy in the cache
        digest.update(tokenizer_src.read_bytes())
    tekken_src = tokenizer_src.with_name("tekken.py")
    if params.get("tokenizer", "").endswith("-tekken") and tekken_src.is_file():
        digest.update(tekken_src.read_bytes())
    return digest.hexdigest()[:12]


# The tiny Mixtral behind ``model.name_or_path: tiny-mixtral``: Mixtral-8x7B v0.1's architecture (SentencePiece
# v1 vocabulary, 32000 ids, so it matches that family row) at the tiny Mistral's width, with 4 experts, top-2
# routing and an expert width of 192 (a multiple of 64, so NF4 blocks never straddle rows). 4 experts keep every
# expert reachable by a few dozen routed tokens, which the per-expert gradient and merge tests rely on.
TINY_MIXTRAL_DEFAULTS: dict[str, Any] = {
    "hidden_size": 128,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "intermediate_size": 192,
    "num_experts": 4,
    "experts_per_token": 2,
    "vocab_size": 32000,
    "rope_theta": 1e6,
    "max_position_embeddings": 32768,
    "router_aux_loss_coef": 0.02,  # Mixtral-8x7B's config.json value
    "seed": 0,
    "dtype": "bfloat16",
    "tokenizer": "v1",
}
_TINY_MIXTRAL_FORMAT = 1


def _text_config(
    tok: Any, *, num_layers: int, num_heads: int, num_kv_heads: int, tie_word_embeddings: bool = False, **sizes: Any
) -> Any:
    """The tiny Mistral language model's config (`build_tiny_model`, and the text model of
    `build_tiny_mistral3`): one definition, so the two tiny models differ only in the sizes they are given."""
    from transformers import MistralConfig

    return MistralConfig(
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        hidden_act="silu",
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        initializer_range=0.02,
        **sizes,
    )


def build_tiny_mixtral(
    path: str | os.PathLike[str],
    *,
    hidden_size: int = TINY_MIXTRAL_DEFAULTS["hidden_size"],
    num_layers: int = TINY_MIXTRAL_DEFAULTS["num_layers"],
    num_heads: int = TINY_MIXTRAL_DEFAULTS["num_heads"],
    num_kv_heads: int = TINY_MIXTRAL_DEFAULTS["num_kv_heads"],
    intermediate_size: int = TINY_MIXTRAL_DEFAULTS["intermediate_size"],
    num_experts: int = TINY_MIXTRAL_DEFAULTS["num_experts"],
    experts_per_token: int = TINY_MIXTRAL_DEFAULTS["experts_per_token"],
    vocab_size: int = TINY_MIXTRAL_DEFAULTS["vocab_size"],
    rope_theta: float = TINY_MIXTRAL_DEFAULTS["rope_theta"],
    max_position_embeddings: int = TINY_MIXTRAL_DEFAULTS["max_position_embeddings"],
    router_aux_loss_coef: float = TINY_MIXTRAL_DEFAULTS["router_aux_loss_coef"],
    seed: int = TINY_MIXTRAL_DEFAULTS["seed"],
    dtype: str = TINY_MIXTRAL_DEFAULTS["dtype"],
    tokenizer: str = TINY_MIXTRAL_DEFAULTS["tokenizer"],
) -> Path:
    """Write a small random `MixtralForCausalLM` with the real tokenizer to `path`.

    Mixtral's architecture (GQA, RoPE, RMSNorm, a top-k router over SwiGLU experts, untied embeddings,
    no sliding window as in Mixtral-8x7B's config) at tiny sizes; weights drawn as `build_tiny_model` draws
    them (seeded, sorted-name order). transformers writes the checkpoint in Mixtral's own layout
    (``block_sparse_moe.experts.{e}.w1/w2/w3``, ``block_sparse_moe.gate``), as the hub models are.

    Args:
        path: directory to write.
        hidden_size: model width; a multiple of 64.
        num_layers: decoder layers.
        num_heads: attention heads.
        num_kv_heads: key/value heads.
        intermediate_size: each expert's width; a multiple of 64.
        num_experts: experts per layer (``num_local_experts``).
        experts_per_token: experts each token is routed to (``num_experts_per_tok``).
        vocab_size: must cover the tokenizer (32000 for v1, 32768 for v3).
        rope_theta: RoPE base.
        max_position_embeddings: longest supported context.
        router_aux_loss_coef: the load-balancing loss weight written to config.json.
        seed: weight seed.
        dtype: storage dtype.
        tokenizer: tokenizer version (``"v1"`` for 8x7B, ``"v3"`` for 8x22B).

    Returns:
        The directory.

    Raises:
        ModelError: a size is not usable with 4-bit quantisation, or top-k exceeds the experts.
    """
    import torch
    from transformers import GenerationConfig, MixtralConfig, MixtralForCausalLM

    from mistral_fast.tokenizer import load_tokenizer

    _check_tiny_sizes(hidden_size, intermediate_size, num_heads, num_kv_heads)
    if not 1 <= experts_per_token <= num_experts:
        raise ModelError(f"experts_per_token={experts_per_token}: must be between 1 and num_experts={num_experts}")
    tok = load_tokenizer(tokenizer)
    if len(tok) > vocab_size:
        raise ModelError(f"vocab_size={vocab_size} is smaller than the {tokenizer} tokenizer ({len(tok)} tokens)")
    config = MixtralConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        hidden_act="silu",
        max_position_embeddings=max_position_embeddings,
        rope_theta=rope_theta,
        sliding_window=None,
        rms_norm_eps=1e-5,
        num_local_experts=num_experts,
        num_experts_per_tok=experts_per_token,
        router_aux_loss_coef=router_aux_loss_coef,
        output_router_logits=False,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        initializer_range=0.02,
    )
    model = MixtralForCausalLM(config)
    _init_tiny_weights(model, seed=seed, std=config.initializer_range)
    model = model.to(getattr(torch, dtype))
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def tiny_mixtral_dir(**overrides: Any) -> Path:
    """The cached tiny Mixtral for ``model.name_or_path: tiny-mixtral``, built on first use (as `tiny_model_dir`).

    Args:
        **overrides: any `build_tiny_mixtral` keyword.

    Returns:
        The model directory.
    """
    params = {**TINY_MIXTRAL_DEFAULTS, **overrides}
    unknown = sorted(set(overrides) - set(TINY_MIXTRAL_DEFAULTS))
    if unknown:
        raise ModelError(f"tiny_mixtral_dir: unknown argument(s) {unknown}; known: {sorted(TINY_MIXTRAL_DEFAULTS)}")
    name = f"tiny-mixtral-{params['tokenizer']}-{_tiny_cache_key({**params, 'mixtral': _TINY_MIXTRAL_FORMAT})}"
    return _cached_build(name, lambda tmp: build_tiny_mixtral(tmp, **params), "tiny Mixtral")


# The tiny Mistral Small 3.1 behind ``model.name_or_path: tiny-mistral3``: transformers'
# ``Mistral3ForConditionalGeneration`` (a Mistral language model, a Pixtral vision tower and the patch-merging
# projector), its language model the tiny Small 3's (tekken v7 vocabulary, head_dim 16 != 128/4, RoPE base 1e8),
# its vision tower three Pixtral layers of width 64 (two heads of 32) over 16-pixel patches. Every width is a
# multiple of 64, so the 4-bit blocks of the language model stay in rows, and the vision tower is small enough
# that its 16-bit bytes cost nothing next to the 131k-row embedding.
TINY_MISTRAL3_DEFAULTS: dict[str, Any] = {
    **{
        k: v
        for k, v in TINY_DEFAULTS.items()
        if k not in ("tokenizer", "vocab_size", "sliding_window", *_LATER_ARGUMENTS)
    },
    "tokenizer": "v7-tekken",
    "vocab_size": 131072,
    "head_dim": 16,
    "rope_theta": 1e8,
    "vision_hidden_size": 64,
    "vision_intermediate_size": 128,
    "vision_layers": 3,  # llama.cpp maps the projector's linear_1/linear_2 through block ids: >= 3 blocks
    "vision_heads": 2,
    "image_size": 64,
    "patch_size": 16,
    "spatial_merge_size": 2,
}
_TINY_MISTRAL3_FORMAT = 1
# Pixtral's image-normalisation constants (preprocessor_config.json of Mistral-Small-3.1-24B-Instruct-2503):
# llama.cpp's converter reads them from that file into the mmproj GGUF.
PIXTRAL_IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
PIXTRAL_IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]


def build_tiny_mistral3(path: str | os.PathLike[str], **kwargs: Any) -> Path:
    """Write a small random `Mistral3ForConditionalGeneration` (text + vision) with the real tekken tokenizer.

    The text model is built as `build_tiny_model` builds it (same arguments, same draw), the vision tower
    and projector from `PixtralVisionConfig`; weights are drawn in sorted-name order from one seeded
    generator, so the same arguments give the same bytes. A ``preprocessor_config.json`` with Pixtral's
    image statistics is written too (llama.cpp's converter reads it for the ``mmproj`` file).

    Args:
        path: directory to write.
        **kwargs: any key of `TINY_MISTRAL3_DEFAULTS`.

    Returns:
        The directory.

    Raises:
        ModelError: an unknown argument, or a size not usable with 4-bit quantisation.
    """
    import torch
    from transformers import (
        GenerationConfig,
        Mistral3Config,
        Mistral3ForConditionalGeneration,
        PixtralVisionConfig,
    )

    from mistral_fast.tokenizer import load_tokenizer

    unknown = sorted(set(kwargs) - set(TINY_MISTRAL3_DEFAULTS))
    if unknown:
        raise ModelError(f"build_tiny_mistral3: unknown argument(s) {unknown}; known: {sorted(TINY_MISTRAL3_DEFAULTS)}")
    p = {**TINY_MISTRAL3_DEFAULTS, **kwargs}
    _check_tiny_sizes(p["hidden_size"], p["intermediate_size"], p["num_heads"], p["num_kv_heads"])
    tok = load_tokenizer(p["tokenizer"])
    text = _text_config(
        tok,
        vocab_size=p["vocab_size"],
        hidden_size=p["hidden_size"],
        intermediate_size=p["intermediate_size"],
        num_layers=p["num_layers"],
        num_heads=p["num_heads"],
        num_kv_heads=p["num_kv_heads"],
        head_dim=p["head_dim"],
        max_position_embeddings=p["max_position_embeddings"],
        rope_theta=p["rope_theta"],
        sliding_window=None,
    )
    vision = PixtralVisionConfig(
        hidden_size=p["vision_hidden_size"],
        intermediate_size=p["vision_intermediate_size"],
        num_hidden_layers=p["vision_layers"],
        num_attention_heads=p["vision_heads"],
        head_dim=p["vision_hidden_size"] // p["vision_heads"],
        image_size=p["image_size"],
        patch_size=p["patch_size"],
        hidden_act="silu",
        rope_theta=10000.0,
    )
    config = Mistral3Config(
        text_config=text,
        vision_config=vision,
        image_token_index=10,  # [IMG] in every tekken vocabulary
        spatial_merge_size=p["spatial_merge_size"],
        multimodal_projector_bias=False,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    model = Mistral3ForConditionalGeneration(config)
    _init_tiny_weights(model, seed=p["seed"], std=0.02)
    model = model.to(getattr(torch, p["dtype"]))
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    preprocessor = {
        "image_processor_type": "PixtralImageProcessorFast",
        "image_mean": PIXTRAL_IMAGE_MEAN,
        "image_std": PIXTRAL_IMAGE_STD,
        "patch_size": p["patch_size"],
        "size": {"longest_edge": p["image_size"]},
    }
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    return out


def tiny_mistral3_dir(**overrides: Any) -> Path:
    """The cached tiny Mistral 3 for ``model.name_or_path: tiny-mistral3``, built on first use (as `tiny_model_dir`)."""
    params = {**TINY_MISTRAL3_DEFAULTS, **overrides}
    unknown = sorted(set(overrides) - set(TINY_MISTRAL3_DEFAULTS))
    if unknown:
        raise ModelError(f"tiny_mistral3_dir: unknown argument(s) {unknown}; known: {sorted(TINY_MISTRAL3_DEFAULTS)}")
    name = f"tiny-mistral3-{params['tokenizer']}-{_tiny_cache_key({**params, 'mistral3': _TINY_MISTRAL3_FORMAT})}"
    return _cached_build(name, lambda tmp: build_tiny_mistral3(tmp, **params), "tiny Mistral 3")
