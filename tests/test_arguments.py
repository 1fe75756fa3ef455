"""One vocabulary: ``leaves=`` (the leaves a per-leaf method acts on), ``stacked=``, ``mask=``;
the old keyword names still work, with a DeprecationWarning, and give the same transformation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import omgd_jax

PARAMS = {"blocks": {"kernel": jnp.ones((2, 4, 3))}, "w": jnp.ones((4, 3)), "b": jnp.ones(3)}
GRADS = jax.tree.map(lambda x: jnp.cos(jnp.arange(x.size, dtype=jnp.float32)).reshape(x.shape),
                     PARAMS)  # fmt: skip

CASES = [
    ("galore", lambda **kw: omgd_jax.galore(0.1, rank=2, **kw), "matrices", "leaves", "kernel"),
    ("golore", lambda **kw: omgd_jax.golore(0.1, rank=2, **kw), "matrices", "leaves", "kernel"),
    ("sift", lambda **kw: omgd_jax.sift(0.1, 0.5, **kw), "selected", "leaves", "^w$"),
    ("sift", lambda **kw: omgd_jax.sift(0.1, 0.5, **kw), "layers", "stacked", "blocks"),
    (
        "skip_update",
        lambda **kw: omgd_jax.skip_update(optax.sgd(0.1), 0.5, **kw),
        "masked",
        "leaves",
        "^w$",
    ),  # fmt: skip
    (
        "magma_adamw",
        lambda **kw: omgd_jax.magma_adamw(0.1, 0.5, **kw),
        "decay_mask",
        "mask",
        {"blocks": {"kernel": False}, "w": True, "b": False},
    ),  # fmt: skip
    ("mofasgd", lambda **kw: omgd_jax.mofasgd(0.1, 2, **kw), "low_rank", "leaves", "^w$"),
]


@pytest.mark.parametrize(
    "name, make, old, new, value", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES]
)
def test_old_keyword_warns_and_equals_the_new_one(name, make, old, new, value):
    with pytest.warns(DeprecationWarning, match=f"{old}= is now called {new}="):
        old_tx = make(**{old: value})
    new_tx = make(**{new: value})
    u_old, _ = old_tx.update(GRADS, old_tx.init(PARAMS), PARAMS)
    u_new, _ = new_tx.update(GRADS, new_tx.init(PARAMS), PARAMS)
    jax.tree.map(np.testing.assert_array_equal, u_old, u_new)


def test_old_and_new_keyword_together_is_an_error():
    with pytest.raises(TypeError, match="matrices= is the old name of leaves=; pass leaves= only"):
        omgd_jax.galore(0.1, matrices="w", leaves="w")


def test_static_args_name_the_new_keywords():
    assert "leaves" in omgd_jax.static_args(omgd_jax.galore)
    assert {"leaves", "stacked"} <= set(omgd_jax.static_args(omgd_jax.sift))
    assert "mask" in omgd_jax.static_args(omgd_jax.skip_update)
