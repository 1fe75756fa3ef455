"""Each ordering trick of `omgd_jax.ordering` lowers the compiled peak of the step it is in:
measured with the trick and with it replaced by the plain expression, on models sized so that
its effect reaches the peak (argument + temp bytes of the donated step)."""

import types

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import omgd_jax
from benchmarks import report
from examples.llama import model
from examples.llama.model import Llama, get_config, loss_fn
from omgd_jax import ordering
from omgd_jax._src import layer_scan
from omgd_jax._src import ordering as _src_ordering

LAYERS = r"^blocks/"


def without_trick(monkeypatch, name, plain):
    """Replace the trick ``name`` by the plain expression wherever it is looked up: in the library
    (``omgd_jax._src.ordering``) and through the public module the Llama example imports."""
    for module in (ordering, _src_ordering):
        monkeypatch.setattr(module, name, plain)


def without_trick_in_layer_scan(monkeypatch, name, plain):
    """Replace the trick ``name`` in the lean backward (`layer_scan`) only."""
    tricks = {k: getattr(_src_ordering, k) for k in ("after", "ids_after", "zeros_after")}
    monkeypatch.setattr(layer_scan, "ordering", types.SimpleNamespace(**{**tricks, name: plain}))


def llama(batch, **kw):
    cfg = get_config("tiny", n_head=4, vocab_size=512, max_len=64, **kw)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Llama(cfg, nnx.Rngs(0))), nnx.Param)
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)

    def loss_of(p, x, y):
        return loss_fn(nnx.merge(graphdef, p), x, y)

    return params, loss_of, jax.ShapeDtypeStruct(batch, jnp.int32)


def lean_peak(params, loss_of, tokens, gamma):
    tx = omgd_jax.omgd_adamw(
        1e-4, granularity="layer", layers=LAYERS, layers_per_phase=gamma, steps_per_mask=10
    )
    step = omgd_jax.lean_train_step(loss_of, tx, layers=LAYERS)
    state = jax.eval_shape(tx.init, params)
    return report.peak_bytes(report.compile_step(step, params, state, tokens, tokens))


def element_peak(params, loss_of, tokens):
    tx = omgd_jax.omgd_adamw(1e-4, num_masks=4, steps_per_mask=10)
    state = jax.eval_shape(tx.init, params)
    step = omgd_jax.train_step(loss_of, tx)
    return report.peak_bytes(report.compile_step(step, params, state, tokens, tokens))


def test_ids_after_keeps_the_gathered_layer_off_the_backward_peak(monkeypatch):
    params, loss_of, tokens = llama((4, 32), n_layer=4, dim=128, hidden=344)
    layer = (4 * 128 * 128 + 3 * 128 * 344 + 2 * 128) * 4
    with_trick = lean_peak(params, loss_of, tokens, 1)
    without_trick(monkeypatch, "ids_after", lambda ids, tree: ids)
    without = lean_peak(params, loss_of, tokens, 1)
    assert without - with_trick >= 0.9 * layer, (without, with_trick, layer)


def test_zeros_after_makes_the_gradient_buffer_when_the_backward_starts(monkeypatch):
    params, loss_of, tokens = llama((4, 32), n_layer=4, dim=128, hidden=344, remat=False)
    with_trick = lean_peak(params, loss_of, tokens, 2)
    without_trick(monkeypatch, "zeros_after", lambda like, shape, dtype: jnp.zeros(shape, dtype))
    without = lean_peak(params, loss_of, tokens, 2)
    assert without > with_trick, (without, with_trick)


@pytest.mark.parametrize("dim", [256])
def test_materialise_keeps_the_compact_write_in_place(monkeypatch, dim):
    params, loss_of, tokens = llama((2, 16), n_layer=8, dim=dim, hidden=688)
    with_trick = element_peak(params, loss_of, tokens)
    without_trick(monkeypatch, "materialise", lambda tree, pred: tree)
    without = element_peak(params, loss_of, tokens)
    assert without > with_trick, (without, with_trick)


def test_after_recomputes_the_attention_after_the_mlp_backward(monkeypatch):
    # attn_remat's recomputation, merged with the forward's without the trick, keeps the
    # attention's probabilities (4 x 4 x 64 x 64 floats a layer) through the MLP's backward.
    params, loss_of, tokens = llama((4, 64), n_layer=2, dim=64, hidden=688, attn_remat=True)
    with_trick = lean_peak(params, loss_of, tokens, 1)
    without_trick(monkeypatch, "after", lambda tree, like: tree)
    without = lean_peak(params, loss_of, tokens, 1)
    assert without - with_trick >= 4 * 4 * 64 * 64 * 4, (without, with_trick)


def test_after_slices_the_attention_weights_again_for_the_attention_backward(monkeypatch):
    # Without it the attention's kernels, sliced from the stack for the block's recomputed
    # forward, are reused by the attention's backward and live through the MLP's backward.
    params, loss_of, tokens = llama((4, 32), n_layer=4, dim=128, hidden=344, attn_remat=True)
    with_trick = lean_peak(params, loss_of, tokens, 1)
    monkeypatch.setattr(model, "_after_cotangent", lambda s, x, ct: (s, ordering.after(x, ct)))
    without = lean_peak(params, loss_of, tokens, 1)
    kernels = 4 * 128 * 128 * 4
    assert without - with_trick >= kernels, (without, with_trick, kernels)


# A layer of the 4-layer, width-128 LLaMA below: 4 square and 3 MLP kernels, 2 norms.
LAYER_BYTES = (4 * 128 * 128 + 3 * 128 * 344 + 2 * 128) * 4


def test_ids_after_runs_each_active_layer_when_its_cotangent_exists(monkeypatch):
    # Outside the backward's loops, an active layer's recomputation would run as soon as the
    # forward saved its input, its activations kept through the layers above it.
    params, loss_of, tokens = llama((4, 32), n_layer=4, dim=128, hidden=344)
    with_trick = lean_peak(params, loss_of, tokens, 2)
    without_trick_in_layer_scan(monkeypatch, "ids_after", lambda ids, tree: ids)
    without = lean_peak(params, loss_of, tokens, 2)
    assert without - with_trick >= LAYER_BYTES, (without, with_trick)


def test_after_keeps_a_single_slot_gradient_behind_the_backward(monkeypatch):
    # With one active layer XLA drops the [1, ...] buffer and hands the layer's own gradient,
    # which the update could then write into the stack while the loop below still reads it:
    # XLA copies the stacked kernels to allow that.
    params, loss_of, tokens = llama((4, 32), n_layer=4, dim=128, hidden=344)
    with_trick = lean_peak(params, loss_of, tokens, 1)
    without_trick_in_layer_scan(monkeypatch, "after", lambda tree, like: tree)
    without = lean_peak(params, loss_of, tokens, 1)
    assert without - with_trick >= 3 * LAYER_BYTES, (without, with_trick)
