"""The jaxpr matmul-FLOP counter the step-time benchmark reports (benchmarks/flops.py)."""

import jax
import jax.numpy as jnp
import pytest

import omgd_jax
from benchmarks import flops

B, D, N, GAMMA = 4, 8, 6, 2
MATMUL = 2 * B * D * D  # one (B, D) x (D, D) product


def test_a_matmul_counts_two_flops_per_multiply_add():
    x, w = jnp.ones((B, 5)), jnp.ones((5, 7))
    assert flops.count(jnp.dot, x, w) == 2 * B * 5 * 7


def test_a_scan_counts_its_body_length_times_and_dead_code_not_at_all():
    def f(x, ws):
        unused = x @ ws[0]  # noqa: F841  (dead: XLA removes it)
        return jax.lax.scan(lambda h, w: (h @ w, None), x, ws)[0]

    assert flops.count(f, jnp.ones((B, D)), jnp.ones((N, D, D))) == N * MATMUL


def test_a_cond_is_weighted_by_its_branches_share():
    def f(p, x, w):
        return jax.lax.cond(p, lambda x: x @ w @ w, lambda x: x @ w, x)

    args = (True, jnp.ones((B, D)), jnp.ones((D, D)))
    assert flops.count(f, *args) == 2 * MATMUL  # default: the costliest branch
    weighted = flops.count(f, *args, cond_weights=lambda eqn: [0.75, 0.25])
    assert weighted == pytest.approx(0.75 * MATMUL + 0.25 * 2 * MATMUL)


def test_the_lean_backward_skips_the_inactive_weight_matmuls():
    # Linear layers x -> x W_l: the dense gradient costs forward + dX + dW for every layer,
    # the lean one forward + dX for every layer + dW for the gamma active ones.
    params = {"blocks": {"w": jnp.ones((N, D, D))}}

    def loss(p, x):
        f = lambda layer, h: h @ layer["w"]  # noqa: E731
        return omgd_jax.scan_layers(f, p["blocks"], x, remat=False).sum()

    x = jnp.ones((B, D))
    dense = flops.count(jax.grad(loss), params, x)
    lean_grad = omgd_jax.lean_value_and_grad(loss, layers="^blocks/")
    share = lambda eqn: [1 - GAMMA / N, GAMMA / N]  # noqa: E731
    lean = flops.count(lean_grad, params, jnp.arange(GAMMA), x, cond_weights=share)
    assert dense == 3 * N * MATMUL
    assert lean == pytest.approx((2 * N + GAMMA) * MATMUL)
