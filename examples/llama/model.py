"""A LLaMA-style decoder in Flax NNX: RMSNorm, rotary positions, SwiGLU, no biases, untied head.

The blocks are stacked on a leading layer axis (`nnx.vmap` to build, `omgd_jax.scan_layers` to
run), so layer-wise OMGD picks them with ``layers=r"^blocks/"`` and the lean step trains only
the active ones. ``"llama-7b"`` (6.74B parameters) is used by `benchmarks/memory.py` through
abstract shapes only (`nnx.eval_shape`): no 7B weights are ever allocated. ``"tiny"`` trains in
the tests.

Parameter paths:

    embed/embedding                (vocab, d)
    blocks/attn_norm/scale         (L, d)
    blocks/attn/{wq,wk,wv,wo}/kernel   (L, d, d)
    blocks/mlp_norm/scale          (L, d)
    blocks/mlp/{w_gate,w_up}/kernel    (L, d, f); blocks/mlp/w_down/kernel (L, f, d)
    norm/scale                     (d,)
    head/kernel                    (d, vocab)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import omgd_jax
from examples.embedding import embed


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
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

    def __post_init__(self):
        if self.dim % self.n_head:
            raise ValueError(f"dim={self.dim} is not divisible by n_head={self.n_head}")


PRESETS = {
    "llama-7b": LlamaConfig(),
    "tiny": LlamaConfig(n_layer=4, n_head=4, dim=64, hidden=172, vocab_size=256, max_len=64),
}


def get_config(preset: str, **overrides) -> LlamaConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[preset], **overrides)


def _linear(din, dout, cfg, rngs):
    return nnx.Linear(
        din,
        dout,
        use_bias=False,
        kernel_init=nnx.initializers.normal(0.02),
        dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.dtype(cfg.param_dtype),
        rngs=rngs,
    )


def _norm(d, cfg, rngs):
    return nnx.RMSNorm(
        d,
        epsilon=1e-6,
        dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.dtype(cfg.param_dtype),
        rngs=rngs,
    )


def rotary(x: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding of (B, T, H, hd) queries or keys (pairs of halves)."""
    T, hd = x.shape[1], x.shape[-1]
    freq = theta ** (-jnp.arange(0, hd // 2, dtype=jnp.float32) * 2 / hd)
    angle = jnp.arange(T, dtype=jnp.float32)[:, None] * freq[None]  # (T, hd/2)
    cos, sin = (f(angle)[None, :, None, :].astype(x.dtype) for f in (jnp.cos, jnp.sin))
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def causal_attention(q, k, v):
    """Softmax attention with scores in the compute dtype (16-bit scores in 16-bit training).

    Written out rather than `jax.nn.dot_product_attention`, whose 16-bit path asks for f32
    accumulation, which XLA:CPU does not offer.
    """
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
    T = q.shape[1]
    causal = jnp.tril(jnp.ones((T, T), bool))
    scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)


class Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.wq, self.wk, self.wv, self.wo = (
            _linear(cfg.dim, cfg.dim, cfg, rngs) for _ in range(4)
        )

    def __call__(self, x):
        B, T, C = x.shape
        H = self.cfg.n_head
        q, k, v = (w(x).reshape(B, T, H, C // H) for w in (self.wq, self.wk, self.wv))
        q, k = rotary(q, self.cfg.rope_theta), rotary(k, self.cfg.rope_theta)
        return self.wo(causal_attention(q, k, v).reshape(B, T, C))


class SwiGLU(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        self.w_gate = _linear(cfg.dim, cfg.hidden, cfg, rngs)
        self.w_up = _linear(cfg.dim, cfg.hidden, cfg, rngs)
        self.w_down = _linear(cfg.hidden, cfg.dim, cfg, rngs)

    def __call__(self, x):
        return self.w_down(nnx.silu(self.w_gate(x)) * self.w_up(x))


class Block(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        self.attn_norm = _norm(cfg.dim, cfg, rngs)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = _norm(cfg.dim, cfg, rngs)
        self.mlp = SwiGLU(cfg, rngs)

    def __call__(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class Llama(nnx.Module):
    """``model.hidden(idx)``: the final normed states (B, T, d); ``model(idx)``: the logits."""

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
        self.head = _linear(cfg.dim, cfg.vocab_size, cfg, rngs)

    def hidden(self, idx):
        if idx.shape[1] > self.cfg.max_len:
            raise ValueError(f"sequence length {idx.shape[1]} exceeds max_len {self.cfg.max_len}")
        graphdef, stack = nnx.split(self.blocks)
        x = omgd_jax.scan_layers(
            lambda layer, h: nnx.merge(graphdef, layer)(h),
            stack,
            embed(self.embed, idx),
            remat=self.cfg.remat,
        )
        return self.norm(x)

    def __call__(self, idx):
        return self.head(self.hidden(idx)).astype(jnp.float32)


def loss_fn(model: Llama, idx, targets):
    """Mean next-token cross-entropy in float32; chunked over tokens when ``loss_chunk`` > 0.

    Chunking (a `lax.map` over token chunks with the chunk's logits recomputed in the backward
    pass) keeps the (B T, vocab) logits from ever existing at once.
    """
    h = model.hidden(idx)
    chunk = model.cfg.loss_chunk
    if not chunk:
        logits = model.head(h).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    d = h.shape[-1]
    h, t = h.reshape(-1, chunk, d), targets.reshape(-1, chunk)

    @jax.checkpoint
    def one(ht):
        logits = model.head(ht[0]).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, ht[1]).sum()

    return jnp.sum(jax.lax.map(one, (h, t))) / targets.size
