"""The tensor-wise OMGD image classifier (examples/image_classification.py) on sklearn digits."""

import gzip

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from benchmarks import report
from examples import image_classification as ic


def test_read_idx_roundtrip(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    header = bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in a.shape)
    path = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(header + a.tobytes())
    np.testing.assert_array_equal(ic.read_idx(path), a)


def test_missing_fashion_mnist_falls_back_to_digits(tmp_path):
    xtr, ytr, xte, yte, info = ic.load_dataset("fashion_mnist", install=False, root=tmp_path)
    assert info["dataset"] == "digits" and info["fallback_from"] == "fashion_mnist"
    assert xtr.shape[1:] == (8, 8, 1) and len(xtr) == len(ytr) and len(xte) == len(yte)
    assert abs(float(xtr.mean())) < 1e-4
    with pytest.raises(ValueError, match="dataset"):
        ic.load_dataset("cifar10")


def test_wor_mask_trains_disjoint_halves_of_the_tensors():
    params = {f"w{i}": jnp.zeros(3) for i in range(6)}
    grads = jax.tree.map(jnp.ones_like, params)
    # Two warm-up epochs are one whole cycle (phases count from step 0): steps 2 and 3 are
    # the two masks of cycle 1.
    tx = ic.make_tx(
        "wor",
        jax.random.key(0),
        steps_per_epoch=1,
        epochs=8,
        warmup_epochs=2,
        weight_decay=0.0,
        momentum=0.0,
    )
    state = tx.init(params)
    moved = []
    for _ in range(4):
        u, state = tx.update(grads, state, params)
        moved.append({k: bool(jnp.any(v != 0)) for k, v in u.items()})
    assert all(moved[0].values()) and all(moved[1].values())
    first = {k for k, v in moved[2].items() if v}
    second = {k for k, v in moved[3].items() if v}
    assert len(first) == len(second) == 3 and first.isdisjoint(second)
    u, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(u["w0"], -0.1 * np.ones(3))  # lr 0.1, scale 1 in the warm-up
    with pytest.raises(ValueError, match="method"):
        ic.make_tx("adam", 0, steps_per_epoch=1, epochs=1, warmup_epochs=0)
    assert isinstance(
        ic.make_tx("full", 0, steps_per_epoch=1, epochs=1, warmup_epochs=0),
        optax.GradientTransformation,
    )


def test_digits_all_methods_beat_chance(tmp_path):
    out = tmp_path / "ic.json"
    ic.main(
        [
            "--dataset",
            "digits",
            "--epochs",
            "3",
            "--warmup-epochs",
            "1",
            "--seeds",
            "1",
            "--batch-size",
            "32",
            "--width",
            "8",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    res = report.load(out)
    recs = {r["method"]: r for r in res["records"]}
    assert set(recs) == {"full", "iid", "wor"}
    for m, r in recs.items():
        assert set(r["accuracy"]) >= {"mean", "std"}
        assert r["accuracy"]["mean"] > 0.5, (m, r)  # chance is 0.1
    assert res["meta"]["settings"]["dataset"] == "digits"
