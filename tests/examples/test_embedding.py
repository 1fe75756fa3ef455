"""examples/embedding.py: nnx.Embed's values and gradients, its gradient buffer made late."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from examples.embedding import embed


def _module(dtype=None, param_dtype=jnp.float32):
    return nnx.Embed(50, 8, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("dtype", [None, jnp.float32, jnp.bfloat16])
def test_values_and_gradients_equal_nnx_embed(dtype):
    module = _module(dtype)
    idx = jnp.array([[3, 7, 3, 49], [0, 3, 7, 7]])  # repeated ids: their cotangents add up
    w = jax.random.normal(jax.random.key(1), idx.shape + (8,))
    graphdef, state = nnx.split(module)

    def loss(state, call):
        m = nnx.merge(graphdef, state)
        return jnp.sum(call(m, idx).astype(jnp.float32) * w)

    ours, g_ours = jax.value_and_grad(loss)(state, embed)
    ref, g_ref = jax.value_and_grad(loss)(state, lambda m, i: m(i))
    assert embed(module, idx).dtype == module(idx).dtype
    np.testing.assert_allclose(ours, ref, rtol=1e-6)
    tol = 1e-2 if dtype == jnp.bfloat16 else 1e-6  # ours sums repeated ids in float32
    np.testing.assert_allclose(
        g_ours["embedding"][...], g_ref["embedding"][...], rtol=tol, atol=tol
    )
    # Hand-checkable: the gradient of row 3 is the sum of w where idx == 3.
    expect = np.asarray(w)[np.asarray(idx) == 3].sum(0)
    np.testing.assert_allclose(g_ours["embedding"][...][3], expect, rtol=tol, atol=tol)


def test_rejects_float_ids():
    with pytest.raises(ValueError, match="idx must hold integer"):
        embed(_module(), jnp.zeros((2,), jnp.float32))


def test_gradient_table_is_not_live_during_the_layers_backward():
    """An SGD step on a big table and a stack of layers: the zeros table of the gradient is
    made when the backward pass reaches the lookup, so it never sits beside the layers'
    backward buffers. ``jnp.take``'s own transpose lets XLA make it first."""
    vocab, d, n = 8192, 128, 8
    table_bytes = vocab * d * 4
    params = {
        "table": jax.ShapeDtypeStruct((vocab, d), jnp.float32),
        "layers": jax.ShapeDtypeStruct((n, d, d), jnp.float32),
    }
    idx = jax.ShapeDtypeStruct((8, 512), jnp.int32)
    module = nnx.eval_shape(lambda: nnx.Embed(vocab, d, rngs=nnx.Rngs(0)))
    graphdef = nnx.graphdef(module)

    def ours(t, i):
        return embed(nnx.merge(graphdef, nnx.State({"embedding": nnx.Param(t)})), i)

    def peak(lookup):
        def loss(p, idx):
            x = lookup(p["table"], idx)

            def body(h, w):
                return jnp.tanh(h @ w), None

            return jnp.sum(jax.lax.scan(jax.checkpoint(body), x, p["layers"])[0] ** 2)

        def step(p, idx):
            g = jax.grad(loss)(p, idx)
            return jax.tree.map(lambda a, b: a - 1e-3 * b, p, g)

        compiled = jax.jit(step, donate_argnums=0).lower(params, idx).compile()
        mem = compiled.memory_analysis()
        return mem.argument_size_in_bytes + mem.temp_size_in_bytes

    plain, lean = peak(lambda t, i: jnp.take(t, i, axis=0)), peak(ours)
    assert plain - lean >= table_bytes // 2, (plain, lean, table_bytes)
