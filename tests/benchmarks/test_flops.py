"""The jaxpr matmul-FLOP counter the step-time benchmark reports (benchmarks/flops.py)."""

import itertools

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


def linear_stack_loss(p, x):
    f = lambda layer, h: h @ layer["w"]  # noqa: E731
    return omgd_jax.scan_layers(f, p["blocks"], x, remat=False).sum()


def test_the_lean_backward_skips_the_inactive_weight_matmuls():
    # Linear layers x -> x W_l: the dense gradient costs forward + dX + dW for every layer,
    # the lean one forward + dX for every layer above the lowest active one + dW for the gamma
    # active ones; below the lowest active layer nothing runs.
    params = {"blocks": {"w": jnp.ones((N, D, D))}}
    x = jnp.ones((B, D))
    dense = flops.count(jax.grad(linear_stack_loss), params, x)
    lean_grad = omgd_jax.lean_value_and_grad(linear_stack_loss, layers="^blocks/")
    assert dense == 3 * N * MATMUL

    def exact(below, active):  # this phase's branch shares: (below, inactive, active)
        return lambda eqn: [below / N, (N - below - active) / N, active / N]

    bottom = flops.count(lean_grad, params, jnp.arange(GAMMA), x, cond_weights=exact(0, GAMMA))
    assert bottom == pytest.approx((2 * N + GAMMA) * MATMUL)  # layers 0, 1: every dX runs
    top = jnp.arange(N - GAMMA, N)  # the top layers: no dX below them, only their dX + dW
    assert flops.count(lean_grad, params, top, x, cond_weights=exact(N - GAMMA, GAMMA)) == (
        pytest.approx((N + 2 * GAMMA) * MATMUL)
    )


def test_the_cycle_average_of_the_lean_backward_matches_its_phases():
    # lean_layer_shares averages the three branches over uniformly random gamma-subsets: the
    # weighted count equals the mean of the exact counts over every subset.
    params = {"blocks": {"w": jnp.ones((N, D, D))}}
    x = jnp.ones((B, D))
    lean_grad = omgd_jax.lean_value_and_grad(linear_stack_loss, layers="^blocks/")
    per_subset = [N + 2 * GAMMA + (N - min(s) - GAMMA) for s in
                  itertools.combinations(range(N), GAMMA)]  # fmt: skip
    mean = sum(per_subset) / len(per_subset) * MATMUL
    weights = flops.lean_layer_shares(N, GAMMA)
    assert flops.count(lean_grad, params, jnp.arange(GAMMA), x, cond_weights=weights) == (
        pytest.approx(mean)
    )
