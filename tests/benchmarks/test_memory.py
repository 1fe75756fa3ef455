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
        assert r["phase"] in memory.PHASES
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


def test_llama_block_options_lower_the_lean_peak():
    """The rows' `mlp_chunk` and `attn_remat`: the lean step's peak drops by more than the
    attention probabilities and two of the MLP's (tokens, hidden) activations of one layer."""
    kw = dict(n_layer=2, n_head=4, dim=64, hidden=688, vocab_size=512, max_len=64)
    lean = "omgd-layer lean (gamma=1)"

    def peak(**options):
        cfg = get_config("tiny", **kw, **options)
        (rec,) = memory.measure(lambda: Llama(cfg, nnx.Rngs(0)), loss_fn, (4, 64), 1, [lean])
        return rec["total"]

    plain, lean_block = peak(), peak(mlp_chunk=86, attn_remat=True)
    assert plain - lean_block >= (4 * 4 * 64 * 64 + 2 * 4 * 64 * 688) * 4, (plain, lean_block)


def test_frozen_embedding_row_keeps_no_gradient_or_moments_of_the_embedding(rows):
    lean, frozen = (
        rows["omgd-layer lean (gamma=1)"],
        rows["omgd-layer-frozen-embedding lean (gamma=1)"],
    )
    embedding = 512 * 128 * 4
    assert frozen["gradients"] == lean["gradients"] - embedding
    assert 0 <= (lean["optimizer"] - 2 * embedding) - frozen["optimizer"] < 64
    # The peak: the moments are arguments that no longer exist; the embedding's gradient was
    # not on the peak of the always-trained step at this size (XLA frees it before the update),
    # so the peak drops by the moments' bytes, less a little of the schedule's noise.
    assert 0 <= lean["argument"] - frozen["argument"] - 2 * embedding < 64
    assert frozen["total"] < lean["total"] - 1.5 * embedding


def test_rotate_row_is_one_program_for_every_phase(rows):
    rotate = rows["omgd-layer-rotate lean (gamma=1)"]
    assert rotate["phase"] == "every"
    assert {r["phase"] for m, r in rows.items() if "rotate" not in m} == {"layers"}


def test_rotate_row_keeps_the_moments_of_one_extra_unit_not_of_both(rows):
    """The embedding and the (untied) head are units of the traversal: their Adam moments
    share one slot as large as the larger of the two, where the always-active row keeps both
    (the figure that did not drop before the slot: the same bytes as the always-active row)."""
    lean, rotate = rows["omgd-layer lean (gamma=1)"], rows["omgd-layer-rotate lean (gamma=1)"]
    embedding = 512 * 128 * 4  # = the head's bytes
    assert 0 <= rotate["optimizer"] - (lean["optimizer"] - 2 * embedding) < 64
    assert rotate["argument"] < lean["argument"] - 1.9 * embedding


def test_llama_31_8b_rows_add_the_rotate_and_frozen_embedding_rows():
    specs = {m[0]: m for m in memory.models()}
    spec = specs["llama-3.1-8b 16x256 fp16"]
    assert spec[3:5] == ((16, 256), 2)
    assert set(spec[5]) == {
        "adamw",
        "galore r128",
        "omgd-layer lean (gamma=2)",
        "omgd-layer-rotate lean (gamma=2)",
        "omgd-layer-frozen-embedding lean (gamma=2)",
    }
    assert set(spec[5]) <= set(memory.methods(2, jnp.float16))
    # The other models keep the five rows the tables have always had.
    assert set(specs["llama-7b 16x256 fp16"][5]) == {n.format(gamma=2) for n in memory.CORE}
