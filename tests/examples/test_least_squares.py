"""The least-squares rate experiment (examples/least_squares.py) at a reduced horizon."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import report
from examples import least_squares as ls


def test_stiefel_sample_has_orthonormal_columns():
    p = ls.stiefel_sample(jax.random.key(0), 10, 5)
    assert p.shape == (10, 5)
    np.testing.assert_allclose(p.T @ p, np.eye(5), atol=1e-5)


def test_scaled_projector_is_unbiased():
    d, k = 10, 5
    keys = jax.random.split(jax.random.key(1), 4000)
    ps = jax.vmap(lambda key: ls.stiefel_sample(key, d, k))(keys)
    mean = (d / k) * jnp.einsum("nij,nkj->ik", ps, ps) / len(keys)
    np.testing.assert_allclose(mean, np.eye(d), atol=0.05)


def test_orthonormal_basis_spans_the_same_space_as_stiefel_sample():
    key = jax.random.key(2)
    z = jax.random.normal(key, (10, 5))
    q, p = ls.orthonormal_basis(z), ls.stiefel_sample(key, 10, 5)
    np.testing.assert_allclose(q.T @ q, np.eye(5), atol=1e-5)
    np.testing.assert_allclose(q @ q.T, p @ p.T, atol=1e-5)


def test_random_projection_transform():
    key = jax.random.key(3)
    tx = ls.random_projection(5, key=key, warmup_steps=1)
    g = {"a": jnp.arange(4.0), "b": jnp.ones((2, 3))}
    flat = jnp.concatenate([g["a"], g["b"].ravel()])
    state = tx.init(g)
    u0, state = tx.update(g, state)  # warm-up: unchanged
    np.testing.assert_allclose(u0["a"], g["a"])
    u1, state = tx.update(g, state)  # step 1: (1/r) P P^T g with Z from fold_in(key, 1)
    p = ls.stiefel_sample(jax.random.fold_in(key, 1), 10, 5)
    expected = 2.0 * p @ (p.T @ flat)
    np.testing.assert_allclose(jnp.concatenate([u1["a"], u1["b"].ravel()]), expected, atol=1e-5)
    q = ls.orthonormal_basis(jax.random.normal(jax.random.key(4), (10, 5)))
    u2, _ = tx.update(g, state, basis=q)  # a basis handed in is used as it is
    np.testing.assert_allclose(
        jnp.concatenate([u2["a"], u2["b"].ravel()]), 2.0 * q @ (q.T @ flat), atol=1e-5
    )
    with pytest.raises(ValueError, match="basis"):
        tx.update(g, state, basis=q[:, :4])


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="steps"):
        ls.run("rr", 1500, 2)
    with pytest.raises(ValueError, match="method"):
        ls.run("sgd", 1000, 2)
    with pytest.raises(ValueError, match="rank"):
        ls.random_projection(0)


def test_short_rate_run(tmp_path):
    """T = 2e4, 4 seeds: wor keeps RR's fast rate, the per-step iid mask and projection do not."""
    out, png = tmp_path / "ls.json", tmp_path / "ls.png"
    ls.main(["--steps", "20000", "--seeds", "4", "--out", str(out), "--plot", str(png)])
    doc = report.load(out)
    recs = {r["method"]: r for r in doc["records"]}
    assert list(recs) == ["rr", "wor", "iid", "proj"]
    assert doc["meta"]["settings"]["steps"] == 20000 and doc["meta"]["figure"] == "ls.png"
    assert all(len(r["curve_epoch_end"]) == len(doc["meta"]["curve_t"]) for r in recs.values())
    assert png.stat().st_size > 0
    s = {m: r["slope"] for m, r in recs.items()}
    e = {m: r["final_error"] for m, r in recs.items()}
    assert e["wor"] < e["iid"] / 10 and e["wor"] < e["proj"] / 10
    assert e["rr"] < e["iid"] / 10
    for fast in ("rr", "wor"):
        for slow in ("iid", "proj"):
            assert s[fast] < s[slow] - 0.7, (fast, slow, s)
    assert s["rr"] < -1.5 and s["wor"] < -1.5
    mid = {m: r["slope_mid_epoch"] for m, r in recs.items()}
    assert mid["rr"] < -1.5 and mid["wor"] < -1.5 and mid["iid"] > -1.6
    assert -1.6 < s["iid"] < -0.4
