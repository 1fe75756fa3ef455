"""The LLaMA-style model: shapes of the 7B preset (abstractly) and lean training of the tiny one."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import omgd_jax
from examples.llama.model import Llama, get_config, loss_fn, rotary


def test_llama_7b_has_the_published_parameter_count():
    abstract = nnx.eval_shape(lambda: Llama(get_config("llama-7b"), nnx.Rngs(0)))
    params = nnx.state(abstract, nnx.Param)
    # 32 x (4 d^2 + 3 d f + 2 d) + 2 V d + d, d = 4096, f = 11008, V = 32000 (no biases)
    d, f, v = 4096, 11008, 32000
    expected = 32 * (4 * d * d + 3 * d * f + 2 * d) + 2 * v * d + d
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(params)) == expected == 6_738_415_616
    assert params["blocks"]["attn"]["wq"]["kernel"].shape == (32, d, d)


def test_rotary_is_a_rotation_that_depends_on_relative_position():
    q = jax.random.normal(jax.random.key(0), (1, 6, 2, 8))
    rq = rotary(q, 10000.0)
    norms = jnp.linalg.norm(rq, axis=-1), jnp.linalg.norm(q, axis=-1)
    np.testing.assert_allclose(*norms, rtol=1e-5)
    # the same vector at every position: scores depend on the offset only
    same = jnp.broadcast_to(q[:, :1], q.shape)
    r = rotary(same, 10000.0)[0, :, 0]
    np.testing.assert_allclose(r[1] @ r[3], r[2] @ r[4], rtol=1e-5)


def test_chunked_loss_equals_the_full_loss():
    idx = jax.random.randint(jax.random.key(0), (2, 32), 0, 256)
    full = loss_fn(Llama(get_config("tiny"), nnx.Rngs(0)), idx, idx)
    chunked = loss_fn(Llama(get_config("tiny", loss_chunk=16), nnx.Rngs(0)), idx, idx)
    np.testing.assert_allclose(chunked, full, rtol=1e-6)


@pytest.mark.parametrize("remat", [True, False])
def test_tiny_llama_trains_with_the_lean_step(remat):
    cfg = get_config("tiny", remat=remat)
    graphdef, params = nnx.split(Llama(cfg, nnx.Rngs(0)), nnx.Param)

    def loss_of(p, x, y):
        return loss_fn(nnx.merge(graphdef, p), x, y)

    tx = omgd_jax.omgd_adamw(
        3e-3, granularity="layer", layers=r"^blocks/", layers_per_phase=2, steps_per_mask=5
    )
    step = jax.jit(omgd_jax.lean_train_step(loss_of, tx, layers=r"^blocks/"), donate_argnums=(0, 1))
    state = tx.init(params)
    x = jnp.tile(jnp.arange(32) % 7, (4, 1))  # a periodic sequence: learnable
    y = jnp.roll(x, -1, axis=1)
    losses = []
    for _ in range(20):
        params, state, loss = step(params, state, x, y)
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0], losses
    grads = jax.eval_shape(
        omgd_jax.lean_value_and_grad(loss_of, layers=r"^blocks/"), params, jnp.array([0, 1]), x, y
    )[1]
    assert {g.shape[0] for g in jax.tree.leaves(grads["blocks"])} == {2}  # [gamma, ...] only
