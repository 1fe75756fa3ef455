"""Shared helpers: small trees and a way to read the masks a transformation applies."""

import jax
import jax.numpy as jnp
import pytest

jax.config.update("jax_enable_x64", False)


def stacked_tree(num_layers=4, width=3):
    """A GPT-like tree: embeddings and head always on, blocks stacked on axis 0."""
    return {
        "wte": jnp.ones((7, width)),
        "blocks": {
            "attn": {"kernel": jnp.ones((num_layers, width, 2 * width))},
            "ln": {"scale": jnp.ones((num_layers, width))},
        },
        "ln_f": jnp.ones((width,)),
    }


def masks_over(tx, tree, steps, **extra):
    """The per-step masks of ``tx`` (fed a gradient of ones), as a list of trees."""
    state = tx.init(tree)
    ones = jax.tree.map(jnp.ones_like, tree)
    update = jax.jit(tx.update)
    out = []
    for _ in range(steps):
        u, state = update(ones, state, tree, **extra)
        out.append(u)
    return out


def random_tree(tree, seed):
    """A tree shaped like ``tree`` with standard normal leaves drawn from ``seed``."""
    keys = jax.random.split(jax.random.key(seed), len(jax.tree.leaves(tree)))
    leaves = [
        jax.random.normal(k, x.shape) for k, x in zip(keys, jax.tree.leaves(tree), strict=True)
    ]
    return jax.tree.unflatten(jax.tree.structure(tree), leaves)


def tree_sum(trees):
    return jax.tree.map(lambda *xs: sum(xs), *trees)


@pytest.fixture
def gpt_tree():
    return stacked_tree()
