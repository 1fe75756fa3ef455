"""benchmarks/memory.py at a small size: the Table-8 split, and what the lean step must keep."""

import jax.numpy as jnp
import pytest
from flax import nnx

from benchmarks import memory
from examples.llama.model import Llama, get_config, loss_fn


@pytest.fixture(scope="session")
def rows():
    """Every method's record for a 4-layer LLaMA (width 128) at 4 x 32 tokens, 1 of 4 active."""
    cfg = get_config("tiny", n_layer=4, n_head=4, dim=128, hidden=344, vocab_size=512, max_len=64)
    records = memory.measure(lambda: Llama(cfg, nnx.Rngs(0)), loss_fn, (4, 32), 1)
    return {r["method"]: r for r in records}


def test_records_hold_the_five_columns_that_add_up(rows):
    assert set(rows) == set(memory.methods(1, jnp.float32))
    for r in rows.values():
        assert r["total"] == r["argument"] + r["temp"]
        assert r["total"] == r["weights"] + r["gradients"] + r["optimizer"] + r["other"]
        assert r["other"] >= 0


def test_lean_step_keeps_the_gradients_and_state_of_one_layer_only(rows):
    dense, lean = rows["adamw"], rows["omgd-layer lean (gamma=1)"]
    weights = dense["weights"]
    # Per-layer bytes: the 4 stacked blocks of the tiny LLaMA (4 square + 3 MLP kernels, 2 norms).
    layer = (4 * 128 * 128 + 3 * 128 * 344 + 2 * 128) * 4
    always = weights - 4 * layer
    assert dense["gradients"] == weights
    assert lean["gradients"] == always + layer  # no [N_L, ...] gradient
    # Moments of 1 of the 4 layers; the rest are scalars (count, key, phase, ids).
    assert 0 <= lean["optimizer"] - (dense["optimizer"] - 2 * 3 * layer) < 64
    # Activations and temporaries: no more than the dense step's. The gathered copy of the
    # active layer must not live beside the backward pass (it did before `_after`: + 1 layer).
    assert lean["other"] <= dense["other"] + layer // 4, (lean["other"], dense["other"], layer)


def test_xla_flags_keep_16_bit_matmuls_and_drop_ynn_reductions(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_foo=1")
    assert memory.xla_flags() == (
        "--xla_foo=1 --xla_disable_hlo_passes=change-op-data-type"
        " --xla_cpu_experimental_ynn_fusion_type=-reduce"
    )
    assert "ynn" not in memory.xla_flags(ynn=True)
