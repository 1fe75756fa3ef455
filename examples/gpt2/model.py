"""GPT-2 in Flax NNX, in nanoGPT's shape, with the transformer blocks stacked along a layer axis.

Every parameter of the `blocks` submodule has a leading axis of size `n_layer` (created with
`nnx.vmap`, run with `nnx.scan`), so layer-wise OMGD picks layers by index along axis 0:

    omgd_jax.omgd_adamw(..., granularity="layer", layers=r"^blocks/", layers_per_phase=3)

Parameter paths ('/'-joined, as `nnx.to_pure_dict(nnx.state(model, nnx.Param))` spells them):

    wte/embedding                 (vocab, d)        token embedding, tied to the output head
    wpe/embedding                 (ctx, d)          learned positions
    blocks/ln_1/{scale,bias}      (L, d)
    blocks/attn/c_attn/{kernel,bias}   (L, d, 3d), (L, 3d)
    blocks/attn/c_proj/{kernel,bias}   (L, d, d), (L, d)      init std 0.02/sqrt(2L)
    blocks/ln_2/{scale,bias}      (L, d)
    blocks/mlp/c_fc/{kernel,bias}      (L, d, 4d), (L, 4d)
    blocks/mlp/c_proj/{kernel,bias}    (L, 4d, d), (L, d)     init std 0.02/sqrt(2L)
    ln_f/{scale,bias}             (d,)

No dropout (nanoGPT pre-trains GPT-2 with dropout 0). Parameters are float32 ("master
weights"; `param_dtype` keeps a 16-bit Hugging Face checkpoint in its dtype, `examples.gpt2.hf`);
`dtype="bfloat16"` only changes the compute dtype of matmuls and activations, the logits and the
loss are float32.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import omgd_jax
from examples.embedding import embed


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Shape of the network. `vocab_size` 50304 is GPT-2's 50257 padded to a multiple of 64."""

    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024
    vocab_size: int = 50304
    dtype: str = "float32"  # compute dtype: "float32" | "bfloat16"; params stay float32
    remat: bool = False  # recompute each block's activations in the backward pass
    loss_chunk: int = 0  # >0: cross-entropy over chunks of this many tokens (no full logits)
    param_dtype: str = "float32"  # the weights' dtype (16-bit for Hugging Face checkpoints kept so)

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        if self.param_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(
                f"param_dtype must be 'float32', 'bfloat16' or 'float16', got {self.param_dtype!r}"
            )


PRESETS: dict[str, GPTConfig] = {
    # nanoGPT's GPT-2 small: 124,475,904 parameters (124,439,808 with the unpadded vocab 50257).
    "gpt2-124m": GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024),
    # Trains to a visibly falling loss on 2 CPU cores in a few minutes.
    "tiny": GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=128),
    # For tests and smoke runs: a step takes tens of milliseconds on a CPU.
    "nano": GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32),
    # Byte-level tokens (vocab 256, as nanoGPT's shakespeare_char): the 4 blocks hold 94% of the
    # parameters and nearly all the FLOPs, so layer-wise methods are really tested (benchmarks/
    # compare.py, `make demo`). Data: `python -m examples.gpt2.data --tokenizer bytes`.
    "small-bytes": GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=256),
}


def get_config(preset: str, **overrides) -> GPTConfig:
    """The preset's `GPTConfig`, with `overrides` (e.g. dtype, remat) applied."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[preset], **overrides)


def _dense(din, dout, std, cfg, rngs):
    return nnx.Linear(
        din,
        dout,
        kernel_init=nnx.initializers.normal(std),
        bias_init=nnx.initializers.zeros_init(),
        dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.dtype(cfg.param_dtype),
        rngs=rngs,
    )


def _layernorm(d, cfg, rngs):
    return nnx.LayerNorm(
        d,
        epsilon=1e-5,
        dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.dtype(cfg.param_dtype),
        rngs=rngs,
    )


class CausalSelfAttention(nnx.Module):
    def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
        proj_std = 0.02 / math.sqrt(2 * cfg.n_layer)
        self.n_head = cfg.n_head
        self.c_attn = _dense(cfg.n_embd, 3 * cfg.n_embd, 0.02, cfg, rngs)
        self.c_proj = _dense(cfg.n_embd, cfg.n_embd, proj_std, cfg, rngs)

    def __call__(self, x):
        B, T, C = x.shape
        q, k, v = jnp.split(self.c_attn(x), 3, axis=-1)
        q, k, v = (t.reshape(B, T, self.n_head, C // self.n_head) for t in (q, k, v))
        y = jax.nn.dot_product_attention(q, k, v, is_causal=True)  # (B, T, H, hd)
        return self.c_proj(y.reshape(B, T, C))


class MLP(nnx.Module):
    def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
        proj_std = 0.02 / math.sqrt(2 * cfg.n_layer)
        self.c_fc = _dense(cfg.n_embd, 4 * cfg.n_embd, 0.02, cfg, rngs)
        self.c_proj = _dense(4 * cfg.n_embd, cfg.n_embd, proj_std, cfg, rngs)

    def __call__(self, x):
        return self.c_proj(nnx.gelu(self.c_fc(x), approximate=True))


class Block(nnx.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
        self.ln_1 = _layernorm(cfg.n_embd, cfg, rngs)
        self.attn = CausalSelfAttention(cfg, rngs)
        self.ln_2 = _layernorm(cfg.n_embd, cfg, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nnx.Module):
    """GPT-2 language model. `model(idx)` maps int tokens (B, T) to float32 logits (B, T, vocab)."""

    def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        dt = jnp.dtype(cfg.dtype)
        init = nnx.initializers.normal(0.02)
        self.wte = nnx.Embed(
            cfg.vocab_size,
            cfg.n_embd,
            embedding_init=init,
            dtype=dt,
            param_dtype=jnp.dtype(cfg.param_dtype),
            rngs=rngs,
        )
        self.wpe = nnx.Embed(
            cfg.block_size,
            cfg.n_embd,
            embedding_init=init,
            dtype=dt,
            param_dtype=jnp.dtype(cfg.param_dtype),
            rngs=rngs,
        )

        @nnx.split_rngs(splits=cfg.n_layer)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs):
            return Block(cfg, rngs)

        self.blocks = make_blocks(rngs)  # every leaf: leading layer axis of size n_layer
        self.ln_f = _layernorm(cfg.n_embd, cfg, rngs)

    def hidden(self, idx):
        """The final LayerNorm's output (B, T, d), before the tied head."""
        cfg = self.cfg
        T = idx.shape[1]
        if T > cfg.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {cfg.block_size}")
        x = embed(self.wte, idx) + self.wpe(jnp.arange(T))[None]

        # omgd_jax.scan_layers is lax.scan over the stacked blocks; under omgd_jax's lean
        # layer-wise step it differentiates only the active blocks.
        graphdef, stack = nnx.split(self.blocks)
        x = omgd_jax.scan_layers(
            lambda layer, h: nnx.merge(graphdef, layer)(h), stack, x, remat=cfg.remat
        )
        return self.ln_f(x)

    def __call__(self, idx):
        return self.wte.attend(self.hidden(idx)).astype(jnp.float32)  # tied output head


def loss_fn(model: GPT, idx, targets):
    """Mean next-token cross-entropy in float32; chunked over tokens when ``loss_chunk`` > 0.

    Chunking (a `lax.map` over token chunks, each chunk's logits recomputed in the backward
    pass) keeps the (B T, vocab) logits from ever existing at once.
    """
    chunk = model.cfg.loss_chunk
    if not chunk:
        logits = model(idx)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    h = model.hidden(idx)
    h, t = h.reshape(-1, chunk, h.shape[-1]), targets.reshape(-1, chunk)

    @jax.checkpoint
    def one(ht):
        logits = model.wte.attend(ht[0]).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, ht[1]).sum()

    return jnp.sum(jax.lax.map(one, (h, t))) / targets.size


def count_params(cfg: GPTConfig, non_embedding: bool = False) -> int:
    """Number of parameters, computed from shapes (nothing is allocated).

    `non_embedding=True` subtracts the position embedding, as nanoGPT's `get_num_params()` reports
    (the token embedding stays counted because it is the output head too).
    """
    abstract = nnx.eval_shape(lambda: GPT(cfg, nnx.Rngs(0)))
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    return n - cfg.block_size * cfg.n_embd if non_embedding else n


def expected_params(cfg: GPTConfig) -> int:
    """nanoGPT's closed-form count: embeddings + L blocks (12 d^2 + 13 d) + final LayerNorm."""
    d = cfg.n_embd
    block = (
        12 * d * d + 13 * d
    )  # c_attn 3d^2+3d, attn c_proj d^2+d, c_fc 4d^2+4d, c_proj 4d^2+d, 2 LN 4d
    return cfg.vocab_size * d + cfg.block_size * d + cfg.n_layer * block + 2 * d
