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

    def trips(inactive):  # this phase: `inactive` layers' dX spread over the gamma loops
        return lambda eqn: [inactive / GAMMA] if eqn.primitive.name == "while" else None

    bottom = flops.count(lean_grad, params, jnp.arange(GAMMA), x, cond_weights=trips(N - GAMMA))
    assert bottom == pytest.approx((2 * N + GAMMA) * MATMUL)  # layers 0, 1: every dX runs
    top = jnp.arange(N - GAMMA, N)  # the top layers: no dX below them, only their dX + dW
    assert flops.count(lean_grad, params, top, x, cond_weights=trips(0)) == (
        pytest.approx((N + 2 * GAMMA) * MATMUL)
    )
    with pytest.raises(ValueError, match="no static trip count"):  # unweighted: no guess
        flops.count(lean_grad, params, top, x)


def test_the_cycle_average_of_the_lean_backward_matches_its_phases():
    # lean_layer_shares weights the loops over inactive layers by their mean length over
    # uniformly random gamma-subsets: the weighted count equals the mean of the exact counts.
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


def test_a_cycle_with_the_embedding_and_head_as_units_averages_its_phases():
    """Embedding -> N linear layers -> head, the embedding and the head units of the
    traversal: a cycle is N / gamma layer phases and one phase each for the embedding and the
    head. Per phase, in matmuls: every phase runs the forward (N + 1). A layers phase adds the
    head's dX and the blocks' backward above the lowest active layer (as in the test above);
    the embedding's phase the head's dX and every block's dX (the lookup's gradient is no
    matmul); the head's phase its dW alone (nothing upstream trains: no backward through the
    blocks)."""
    V = 5
    params = {"embed": jnp.ones((V, D)), "blocks": {"w": jnp.ones((N, D, D))},
              "head": jnp.ones((D, D))}  # fmt: skip

    def loss(p, tokens):
        h = omgd_jax.scan_layers(lambda layer, h: h @ layer["w"], p["blocks"], p["embed"][tokens],
                                 remat=False)  # fmt: skip
        return (h @ p["head"]).sum()

    lean_grad = omgd_jax.lean_value_and_grad(loss, layers="^blocks/", units="^(embed|head)$")
    tokens = jnp.arange(B) % V
    layer_phases = [N + 1 + 1 + (N - min(s) - GAMMA) + 2 * GAMMA
                    for s in itertools.combinations(range(N), GAMMA)]  # fmt: skip
    embed_phase, head_phase = (N + 1) + 1 + N, (N + 1) + 1
    phases = N // GAMMA
    cycle = (phases * sum(layer_phases) / len(layer_phases) + embed_phase + head_phase) / (
        phases + 2
    )
    weights = flops.lean_cycle_shares(N, GAMMA, num_extra=2)
    counted = flops.count(lean_grad, params, jnp.arange(GAMMA), jnp.int32(0), tokens,
                          cond_weights=weights)  # fmt: skip
    assert counted == pytest.approx(cycle * MATMUL)
    # the phase switch alone unweighted: its costliest branch (a layers phase, on average),
    # not the cycle's mean: the switch's weights are what moved it
    loops = flops.lean_layer_shares(N, GAMMA)
    costliest = flops.count(lean_grad, params, jnp.arange(GAMMA), jnp.int32(0), tokens,
                            cond_weights=loops)  # fmt: skip
    layer_mean = sum(layer_phases) / len(layer_phases)
    assert costliest == pytest.approx(max(layer_mean, embed_phase, head_phase) * MATMUL)
    assert costliest > counted
