"""A LLaMA-family decoder in Flax NNX: RMSNorm, rotary positions, SwiGLU.

One model covers the Llama architecture family as Hugging Face's ``config.json`` describes it
(`examples.llama.hf` reads and writes those checkpoints): Llama 2, Llama 3 / 3.1 / 3.2 (grouped-
query attention, ``llama3`` rope scaling, tied embeddings), Mistral and Qwen2 / 2.5 (q/k/v
biases). The presets keep the original LLaMA shape: multi-head attention, no biases, untied head.

The blocks are stacked on a leading layer axis (`nnx.vmap` to build, `omgd_jax.scan_layers` to
run), so layer-wise OMGD picks them with ``layers=r"^blocks/"`` and the lean step trains only
the active ones. ``"llama-7b"`` (6.74B parameters) and ``"llama-3.1-8b"`` (8.03B) are used by
`benchmarks/memory.py` through abstract shapes only (`nnx.eval_shape`): no 7B weights are ever
allocated. ``"tiny"`` trains in
the tests.

Parameter paths (H heads, K key/value heads, h = head_dim; d = H h in the presets):

    embed/embedding                (vocab, d)
    blocks/attn_norm/scale         (L, d)
    blocks/attn/wq/kernel          (L, d, H h)      blocks/attn/wo/kernel (L, H h, d)
    blocks/attn/{wk,wv}/kernel     (L, d, K h)
    blocks/attn/{wq,wk,wv}/bias    (L, H h), (L, K h)   only with ``qkv_bias`` (Qwen2)
    blocks/attn/wo/bias            (L, d)               only with ``o_bias``
    blocks/mlp_norm/scale          (L, d)
    blocks/mlp/{w_gate,w_up}/kernel    (L, d, f); blocks/mlp/w_down/kernel (L, f, d)
    norm/scale                     (d,)
    head/kernel                    (d, vocab)       absent with ``tie_embeddings``

Packed sequences: ``model(idx, positions=..., segment_ids=...)`` restarts the rotary positions
and confines attention to tokens of the same segment (one example each).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import omgd_jax
from examples.embedding import embed
from omgd_jax import ordering


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
    """``rope_scaling`` of type ``llama3`` (Llama 3.1 / 3.2): long wavelengths divided by
    ``factor``, short ones kept, a smooth blend between ``original_max_len / low_freq_factor``
    and ``original_max_len / high_freq_factor``."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_len: int = 8192


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shape of the network; the fields after ``loss_chunk`` cover the Hugging Face variants
    (their defaults are the original LLaMA's)."""

    n_layer: int = 32
    n_head: int = 32
    dim: int = 4096
    hidden: int = 11008  # SwiGLU width
    vocab_size: int = 32000
    max_len: int = 2048
    rope_theta: float = 10000.0
    param_dtype: str = "float32"  # the weights' dtype ("bfloat16"/"float16" for 16-bit training)
    dtype: str = "float32"  # compute dtype
    remat: bool = True  # keep only each block's input for the backward pass
    loss_chunk: int = 0  # >0: cross-entropy over chunks of this many tokens (no full logits)
    n_kv_head: int | None = None  # key/value heads (grouped-query attention); None: n_head
    head_dim: int | None = None  # None: dim // n_head
    norm_eps: float = 1e-6  # RMSNorm epsilon (Hugging Face's rms_norm_eps)
    rope_scaling: Llama3RopeScaling | None = None
    tie_embeddings: bool = False  # the head is the embedding table (no head/kernel)
    qkv_bias: bool = False  # biases on the q, k, v projections (Qwen2; Llama's attention_bias)
    o_bias: bool = False  # bias on the output projection (Llama's attention_bias)
    sliding_window: int | None = None  # longer sequences are refused (no windowed attention)
    arch: str = "llama"  # Hugging Face model_type: "llama", "mistral" or "qwen2"
    # Memory of one block's backward pass (same values; see `swiglu` and `Block`):
    mlp_chunk: int = 0  # >0: the SwiGLU in chunks of this many hidden units (divides hidden)
    attn_remat: bool = False  # recompute attention in the backward, after the MLP's backward

    def __post_init__(self):
        if self.head_dim is None and self.dim % self.n_head:
            raise ValueError(f"dim={self.dim} is not divisible by n_head={self.n_head}")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
        if self.hd % 2:
            raise ValueError(f"head_dim={self.hd} must be even (rotary positions)")
        if self.mlp_chunk < 0 or (self.mlp_chunk and self.hidden % self.mlp_chunk):
            raise ValueError(f"mlp_chunk={self.mlp_chunk} must be 0 or divide hidden={self.hidden}")

    @property
    def kv_heads(self) -> int:
        """Key/value heads: ``n_kv_head``, or ``n_head`` (multi-head attention)."""
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def hd(self) -> int:
        """Width of one attention head: ``head_dim``, or ``dim // n_head``."""
        return self.dim // self.n_head if self.head_dim is None else self.head_dim


PRESETS = {
    "llama-7b": LlamaConfig(),
    # Meta-Llama-3.1-8B's config.json: grouped-query attention, llama3 rope scaling, untied.
    "llama-3.1-8b": LlamaConfig(
        n_kv_head=8,
        hidden=14336,
        vocab_size=128256,
        max_len=131072,
        rope_theta=500000.0,
        norm_eps=1e-5,
        rope_scaling=Llama3RopeScaling(),
    ),
    "tiny": LlamaConfig(n_layer=4, n_head=4, dim=64, hidden=172, vocab_size=256, max_len=64),
}


def get_config(preset: str, **overrides) -> LlamaConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[preset], **overrides)


def _linear(din, dout, cfg, rngs, bias=False):
    return nnx.Linear(
        din,
        dout,
        use_bias=bias,
        kernel_init=nnx.initializers.normal(0.02),
        dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.dtype(cfg.param_dtype),
        rngs=rngs,
    )


def _norm(d, cfg, rngs):
    return nnx.RMSNorm(
        d,
        epsilon=cfg.norm_eps,
        dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.dtype(cfg.param_dtype),
        rngs=rngs,
    )


def rope_frequencies(head_dim: int, theta: float, scaling: Llama3RopeScaling | None = None):
    """The rotary inverse frequencies (head_dim / 2,) in float32, as Hugging Face computes them:
    ``1 / theta ** (2i / head_dim)``, then the ``llama3`` rescaling when ``scaling`` is given."""
    inv = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    if scaling is None:
        return inv
    s = scaling
    low_wavelen = s.original_max_len / s.low_freq_factor  # longer: divided by factor
    high_wavelen = s.original_max_len / s.high_freq_factor  # shorter: kept
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (s.original_max_len / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def rotary(
    x: jax.Array,
    theta: float,
    positions: jax.Array | None = None,
    scaling: Llama3RopeScaling | None = None,
) -> jax.Array:
    """Rotary position embedding of (B, T, H, hd) queries or keys (pairs of halves).

    Args:
      x: queries or keys, (B, T, H, hd).
      theta: the rotary base (``rope_theta``).
      positions: int (B, T) position of every token (packed sequences restart them); None:
        ``0 .. T-1`` in every row.
      scaling: ``llama3`` rope scaling of the frequencies, or None.

    Returns:
      ``x`` rotated, in its dtype (the angles are computed in float32).
    """
    T, hd = x.shape[1], x.shape[-1]
    if positions is None and scaling is None:
        freq = theta ** (-jnp.arange(0, hd // 2, dtype=jnp.float32) * 2 / hd)
        angle = jnp.arange(T, dtype=jnp.float32)[:, None] * freq[None]  # (T, hd/2)
        cos, sin = (f(angle)[None, :, None, :].astype(x.dtype) for f in (jnp.cos, jnp.sin))
    else:
        cos, sin = rotary_tables(hd, theta, positions, scaling, x.shape[0], T)
        cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def rotary_tables(hd, theta, positions, scaling, B, T):
    """float32 (cos, sin) of shape (B or 1, T, 1, hd/2) for `rotary`."""
    if positions is None:
        positions = jnp.arange(T)[None]
    angle = positions.astype(jnp.float32)[..., None] * rope_frequencies(hd, theta, scaling)
    return jnp.cos(angle)[:, :, None], jnp.sin(angle)[:, :, None]


def attention_mask(segment_ids: jax.Array | None, T: int) -> jax.Array:
    """Which keys each query sees: causal, within its own segment. (T, T), or (B, T, T) with
    ``segment_ids`` (int (B, T), one id per packed example)."""
    causal = jnp.tril(jnp.ones((T, T), bool))
    if segment_ids is None:
        return causal
    return causal & (segment_ids[:, :, None] == segment_ids[:, None, :])


def causal_attention(q, k, v, mask=None):
    """Softmax attention with scores in the compute dtype (16-bit scores in 16-bit training).

    ``q`` is (B, T, H, hd); ``k`` and ``v`` (B, T, K, hd) with K dividing H (grouped-query
    attention: query head h reads key/value head h // (H / K)). ``mask``: bool (T, T) or
    (B, T, T) from `attention_mask`; None: causal.

    Written out rather than `jax.nn.dot_product_attention`, whose 16-bit path asks for f32
    accumulation, which XLA:CPU does not offer.
    """
    B, T, H, hd = q.shape
    K = k.shape[2]
    if mask is None:
        mask = jnp.tril(jnp.ones((T, T), bool))
    scale = jnp.sqrt(hd).astype(q.dtype)
    if K == H:
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / scale
        allowed = mask if mask.ndim == 2 else mask[:, None]
        scores = jnp.where(allowed, scores, jnp.finfo(scores.dtype).min)
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
    qg = q.reshape(B, T, K, H // K, hd)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", qg, k) / scale
    allowed = mask if mask.ndim == 2 else mask[:, None, None]
    scores = jnp.where(allowed, scores, jnp.finfo(scores.dtype).min)
    out = jnp.einsum("bkgqs,bskd->bqkgd", jax.nn.softmax(scores, axis=-1), v)
    return out.reshape(B, T, H, hd)


class Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        H, K, hd = cfg.n_head, cfg.kv_heads, cfg.hd
        self.wq = _linear(cfg.dim, H * hd, cfg, rngs, bias=cfg.qkv_bias)
        self.wk = _linear(cfg.dim, K * hd, cfg, rngs, bias=cfg.qkv_bias)
        self.wv = _linear(cfg.dim, K * hd, cfg, rngs, bias=cfg.qkv_bias)
        self.wo = _linear(H * hd, cfg.dim, cfg, rngs, bias=cfg.o_bias)

    def __call__(self, x, rope=None, mask=None):
        """``rope``: (cos, sin) tables from `rotary_tables` (None: positions 0 .. T-1, no
        scaling); ``mask`` from `attention_mask` (None: causal)."""
        B, T, _ = x.shape
        cfg = self.cfg
        q = self.wq(x).reshape(B, T, cfg.n_head, cfg.hd)
        k, v = (w(x).reshape(B, T, cfg.kv_heads, cfg.hd) for w in (self.wk, self.wv))
        if rope is None:
            q, k = rotary(q, cfg.rope_theta), rotary(k, cfg.rope_theta)
        else:
            q, k = _rotate(q, *rope), _rotate(k, *rope)
        return self.wo(causal_attention(q, k, v, mask).reshape(B, T, cfg.n_head * cfg.hd))


def _rotate(x, cos, sin):
    cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def _cols(w, c, s):
    return jax.lax.dynamic_slice_in_dim(w, c * s, s, axis=1)


def _rows(w, c, s):
    return jax.lax.dynamic_slice_in_dim(w, c * s, s, axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def swiglu(x, w_gate, w_up, w_down, chunk):
    """``(silu(x w_gate) * (x w_up)) w_down`` over chunks of ``chunk`` hidden units.

    The hidden units are independent until ``w_down`` sums them, so the forward pass adds the
    chunks' outputs and the backward pass recomputes one chunk's gate and up activations at a
    time and writes that chunk's columns (rows of ``w_down``) of the weight gradients: no
    (tokens, hidden) activation or cotangent ever exists whole, and, unlike chunks of tokens,
    no weight gradient is accumulated across chunks (each chunk owns its columns). The sums over
    chunks (output, input cotangent) are taken in float32. ``x`` (..., d); the weights in
    ``x``'s dtype; ``chunk`` divides the hidden width.
    """
    return _swiglu_fwd(x, w_gate, w_up, w_down, chunk)[0]


def _swiglu_fwd(x, w_gate, w_up, w_down, s):
    acc = jnp.promote_types(x.dtype, jnp.float32)

    def body(c, out):
        h = nnx.silu(x @ _cols(w_gate, c, s)) * (x @ _cols(w_up, c, s))
        return out + (h @ _rows(w_down, c, s)).astype(acc)

    zero = jnp.zeros(x.shape[:-1] + (w_down.shape[1],), acc)
    out = jax.lax.fori_loop(0, w_gate.shape[1] // s, body, zero)
    return out.astype(x.dtype), (x, w_gate, w_up, w_down)


def _swiglu_bwd(s, res, dy):
    x, w_gate, w_up, w_down = res
    acc = jnp.promote_types(x.dtype, jnp.float32)

    def body(c, carry):
        dx, dg_w, du_w, dd_w = carry
        g, u = x @ _cols(w_gate, c, s), x @ _cols(w_up, c, s)
        sig = jax.nn.sigmoid(g)
        a = g * sig  # silu(g)
        dd = jnp.einsum("...s,...d->sd", a * u, dy).astype(dd_w.dtype)
        dh = dy @ _rows(w_down, c, s).T
        du, dg = dh * a, dh * u * (sig * (1 + g * (1 - sig)))
        dg_c = jnp.einsum("...d,...s->ds", x, dg).astype(dg_w.dtype)
        du_c = jnp.einsum("...d,...s->ds", x, du).astype(du_w.dtype)
        dx = dx + (dg @ _cols(w_gate, c, s).T + du @ _cols(w_up, c, s).T).astype(acc)
        return (
            dx,
            jax.lax.dynamic_update_slice_in_dim(dg_w, dg_c, c * s, 1),
            jax.lax.dynamic_update_slice_in_dim(du_w, du_c, c * s, 1),
            jax.lax.dynamic_update_slice_in_dim(dd_w, dd, c * s, 0),
        )

    # Made from dy, so the buffers exist from when this backward starts (ordering.zeros_after).
    init = tuple(
        ordering.zeros_after(dy, a.shape, d)
        for a, d in ((x, acc), (w_gate, w_gate.dtype), (w_up, w_up.dtype), (w_down, w_down.dtype))
    )
    dx, dg_w, du_w, dd_w = jax.lax.fori_loop(0, w_gate.shape[1] // s, body, init)
    return dx.astype(x.dtype), dg_w, du_w, dd_w


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class SwiGLU(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        self.w_gate = _linear(cfg.dim, cfg.hidden, cfg, rngs)
        self.w_up = _linear(cfg.dim, cfg.hidden, cfg, rngs)
        self.w_down = _linear(cfg.hidden, cfg.dim, cfg, rngs)
        self.chunk = cfg.mlp_chunk
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(self, x):
        if not self.chunk:
            return self.w_down(nnx.silu(self.w_gate(x)) * self.w_up(x))
        w = (m.kernel[...].astype(self.dtype) for m in (self.w_gate, self.w_up, self.w_down))
        return swiglu(x.astype(self.dtype), *w, self.chunk)


class Block(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        self.attn_norm = _norm(cfg.dim, cfg, rngs)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = _norm(cfg.dim, cfg, rngs)
        self.mlp = SwiGLU(cfg, rngs)
        self.attn_remat = cfg.attn_remat

    def __call__(self, x, rope=None, mask=None):
        if self.attn_remat:
            x = x + _recompute_after_cotangent(self.attn_norm, self.attn, x, rope, mask)
        else:
            x = x + self.attn(self.attn_norm(x), rope, mask)
        return x + self.mlp(self.mlp_norm(x))


def _recompute_after_cotangent(norm, attn, x, rope, mask):
    """``attn(norm(x), rope, mask)`` keeping only ``x`` for the backward pass, which recomputes
    the attention from ``x`` made to depend on the incoming cotangent (`ordering.after`).

    Why: with per-layer remat the backward of a block recomputes the block's forward and keeps
    the attention's residuals (queries, keys, values, the (B, H, T, T) probabilities) through
    the MLP's backward. ``jax.checkpoint`` around the attention does not help on one device:
    XLA merges its recomputation with the forward's identical one (XLA:CPU drops optimization
    barriers). Recomputed from ``ordering.after(x, cotangent)``, it runs after the MLP's
    backward, whose output that cotangent is. Costs one more attention forward per block.
    """
    graphdef, state = nnx.split((norm, attn))

    def fn(state, x, tables):  # the rotary tables and the mask are arguments, not closures:
        n, a = nnx.merge(graphdef, state)  # a custom_vjp must not close over traced arrays
        return a(n(x), *tables)

    @jax.custom_vjp
    def run(state, x, tables):
        return fn(state, x, tables)

    def run_fwd(state, x, tables):
        return fn(state, x, tables), (state, x, tables)

    def run_bwd(res, ct):
        state, x, tables = res
        state, x = _after_cotangent(state, x, ct)
        d_state, dx = jax.vjp(lambda s, h: fn(s, h, tables), state, x)[1](ct)
        return d_state, dx, jax.tree.map(_no_cotangent, tables)

    run.defvjp(run_fwd, run_bwd)
    return run(state, x, (rope, mask))


def _after_cotangent(state, x, ct):
    """The attention's weights and input, made once the cotangent ``ct`` exists.

    Why the weights too: the blocks are stacked, so under the layer scan the weights are copies
    sliced from the stack; the slices made for the block's recomputed forward (needed before
    the MLP's backward) were reused by the attention's backward, so they lived through the
    MLP's backward (at LLaMA-7B four 32 MiB kernels on the peak). Sliced again from ``after``,
    they are made when the attention's backward starts.
    """
    return ordering.after((state, x), ct)


def _no_cotangent(x):
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, jax.dtypes.float0)


class Llama(nnx.Module):
    """``model.hidden(idx)``: the final normed states (B, T, d); ``model(idx)``: the logits.

    Both take ``positions`` and ``segment_ids`` (int (B, T)) for packed sequences."""

    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Embed(
            cfg.vocab_size,
            cfg.dim,
            embedding_init=nnx.initializers.normal(0.02),
            dtype=jnp.dtype(cfg.dtype),
            param_dtype=jnp.dtype(cfg.param_dtype),
            rngs=rngs,
        )

        @nnx.split_rngs(splits=cfg.n_layer)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs):
            return Block(cfg, rngs)

        self.blocks = make_blocks(rngs)
        self.norm = _norm(cfg.dim, cfg, rngs)
        if not cfg.tie_embeddings:
            self.head = _linear(cfg.dim, cfg.vocab_size, cfg, rngs)

    def hidden(self, idx, positions=None, segment_ids=None):
        cfg = self.cfg
        B, T = idx.shape
        if T > cfg.max_len:
            raise ValueError(f"sequence length {T} exceeds max_len {cfg.max_len}")
        if cfg.sliding_window is not None and T > cfg.sliding_window:
            raise ValueError(
                f"sequence length {T} exceeds the config's sliding_window {cfg.sliding_window}: "
                "sliding-window attention is not supported; use sequences of at most "
                f"{cfg.sliding_window} tokens"
            )
        rope = mask = None
        if positions is not None or segment_ids is not None or cfg.rope_scaling is not None:
            rope = rotary_tables(cfg.hd, cfg.rope_theta, positions, cfg.rope_scaling, B, T)
        if segment_ids is not None:
            mask = attention_mask(segment_ids, T)
        graphdef, stack = nnx.split(self.blocks)
        x = omgd_jax.scan_layers(
            lambda layer, h: nnx.merge(graphdef, layer)(h, rope, mask),
            stack,
            embed(self.embed, idx),
            remat=cfg.remat,
        )
        return self.norm(x)

    def logits(self, h):
        """float32 logits of final states ``h`` (..., d): the head, or the tied embedding."""
        out = self.embed.attend(h) if self.cfg.tie_embeddings else self.head(h)
        return out.astype(jnp.float32)

    def __call__(self, idx, positions=None, segment_ids=None):
        return self.logits(self.hidden(idx, positions, segment_ids))


def loss_fn(model: Llama, idx, targets, weights=None, positions=None, segment_ids=None):
    """Mean next-token cross-entropy in float32; chunked over tokens when ``loss_chunk`` > 0.

    Chunking (a `lax.map` over token chunks with the chunk's logits recomputed in the backward
    pass) keeps the (B T, vocab) logits from ever existing at once.

    Args:
      model: the `Llama`.
      idx: int (B, T) input tokens.
      targets: int (B, T) next tokens.
      weights: float (B, T) weight of every token's loss (0 leaves it out: prompt, padding);
        None: 1 everywhere.
      positions, segment_ids: int (B, T) for packed sequences (see `Llama.hidden`).

    Returns:
      ``sum(weights * ce) / sum(weights)`` (the plain mean without ``weights``; 0 when every
      weight is 0).
    """
    h = model.hidden(idx, positions, segment_ids)
    chunk = model.cfg.loss_chunk
    if not chunk:
        ce = optax.softmax_cross_entropy_with_integer_labels(model.logits(h), targets)
        if weights is None:
            return ce.mean()
        return jnp.sum(ce * weights) / jnp.maximum(jnp.sum(weights), 1e-9)
    d = h.shape[-1]
    w = jnp.ones(targets.shape, jnp.float32) if weights is None else weights
    h, t, w = h.reshape(-1, chunk, d), targets.reshape(-1, chunk), w.reshape(-1, chunk)

    @jax.checkpoint
    def one(htw):
        ce = optax.softmax_cross_entropy_with_integer_labels(model.logits(htw[0]), htw[1])
        return ce.sum() if weights is None else jnp.sum(ce * htw[2])

    total = jnp.sum(jax.lax.map(one, (h, t, w)))
    if weights is None:
        return total / targets.size
    return total / jnp.maximum(jnp.sum(weights), 1e-9)
