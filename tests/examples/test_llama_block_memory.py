"""The LLaMA model's memory options (`mlp_chunk`, `attn_remat`) change memory, not values."""

import jax
import numpy as np
import pytest
from flax import nnx

from examples.llama.model import Llama, Llama3RopeScaling, get_config, loss_fn, swiglu


def test_chunked_swiglu_equals_the_plain_one_forward_and_backward():
    k = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(k[0], (2, 5, 16))
    wg, wu = (jax.random.normal(k[i], (16, 24)) / 4 for i in (1, 2))
    wd = jax.random.normal(k[3], (24, 16)) / 4
    dy = jax.random.normal(k[4], (2, 5, 16))

    def plain(x, wg, wu, wd):
        return (jax.nn.silu(x @ wg) * (x @ wu)) @ wd

    want, want_vjp = jax.vjp(plain, x, wg, wu, wd)
    for chunk in (24, 8, 6):
        got, got_vjp = jax.vjp(lambda *a, c=chunk: swiglu(*a, c), x, wg, wu, wd)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        for g, w in zip(got_vjp(dy), want_vjp(dy), strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "options", [dict(mlp_chunk=43), dict(attn_remat=True), dict(mlp_chunk=86, attn_remat=True)]
)
def test_memory_options_keep_the_loss_and_its_gradient(options):
    # Grouped-query attention and llama3 rope scaling, as Llama-3.1-8B has them.
    base = get_config("tiny", n_kv_head=2, rope_scaling=Llama3RopeScaling(original_max_len=16))
    idx = jax.random.randint(jax.random.key(1), (2, 16), 0, base.vocab_size)

    def value_and_grad(cfg):
        graphdef, params = nnx.split(Llama(cfg, nnx.Rngs(0)), nnx.Param)
        loss = lambda p: loss_fn(nnx.merge(graphdef, p), idx[:, :-1], idx[:, 1:])  # noqa: E731
        return jax.jit(jax.value_and_grad(loss))(params)  # traced: closures would leak

    want, want_g = value_and_grad(base)
    got, got_g = value_and_grad(get_config("tiny", **{**base.__dict__, **options}))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for g, w in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


def test_mlp_chunk_must_divide_the_hidden_width():
    with pytest.raises(ValueError, match="mlp_chunk=5 must be 0 or divide hidden=172"):
        get_config("tiny", mlp_chunk=5)


def test_llama_31_8b_preset_has_its_shapes():
    cfg = get_config("llama-3.1-8b")
    params = nnx.state(nnx.eval_shape(lambda: Llama(cfg, nnx.Rngs(0))), nnx.Param)
    n = sum(x.size for x in jax.tree.leaves(params))
    assert (cfg.kv_heads, cfg.hidden, cfg.vocab_size, cfg.tie_embeddings) == (
        8,
        14336,
        128256,
        False,
    )
    assert n == 8_030_261_248  # Meta-Llama-3.1-8B's parameter count
    assert params["blocks"]["attn"]["wk"]["kernel"].shape == (32, 4096, 1024)
