"""GPT-2 model: nanoGPT's exact parameter counts, stacked layers, forward shapes and dtypes."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from examples.gpt2.model import GPT, count_params, expected_params, get_config, loss_fn


def test_gpt2_124m_parameter_count_matches_nanogpt():
    cfg = get_config("gpt2-124m")
    assert count_params(cfg) == 124_475_904 == expected_params(cfg)
    # nanoGPT's get_num_params() leaves out the position embedding: "123.69M".
    assert count_params(cfg, non_embedding=True) == 123_689_472
    unpadded = dataclasses.replace(cfg, vocab_size=50257)
    assert count_params(unpadded) == 124_439_808
    assert count_params(unpadded, non_embedding=True) == 123_653_376  # nanoGPT's "123.65M"


def test_gpt2_124m_layout_matches_spec():
    """SPEC 4: tied token embedding 38.6M, each of the 12 blocks 7.08M, stacked on axis 0."""
    cfg = get_config("gpt2-124m")
    state = nnx.state(nnx.eval_shape(lambda: GPT(cfg, nnx.Rngs(0))), nnx.Param)
    params = nnx.to_pure_dict(state)
    assert params["wte"]["embedding"].shape == (50304, 768)
    blocks = jax.tree.leaves(params["blocks"])
    assert all(x.shape[0] == 12 for x in blocks)
    assert sum(math.prod(x.shape) for x in blocks) // 12 == 7_087_872
    assert params["blocks"]["attn"]["c_attn"]["kernel"].shape == (12, 768, 2304)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))


@pytest.fixture(scope="module")
def tiny():
    return GPT(get_config("tiny"), nnx.Rngs(0))


def test_tiny_forward_shapes_and_init(tiny):
    idx = jnp.asarray(np.random.default_rng(0).integers(0, 50257, (2, 16)), jnp.int32)
    logits = tiny(idx)
    assert logits.shape == (2, 16, 50304) and logits.dtype == jnp.float32
    # Initial loss is close to log(vocab): the head starts near uniform.
    targets = jnp.roll(idx, 1, axis=1)
    assert abs(float(loss_fn(tiny, idx, targets)) - math.log(50304)) < 0.5
    p = nnx.to_pure_dict(nnx.state(tiny, nnx.Param))
    proj_std = float(np.std(np.asarray(p["blocks"]["attn"]["c_proj"]["kernel"])))
    assert abs(proj_std - 0.02 / math.sqrt(2 * 4)) < 1e-3
    assert float(np.std(np.asarray(p["blocks"]["mlp"]["c_fc"]["kernel"]))) == pytest.approx(
        0.02, rel=0.05
    )
    # Layers were initialised independently.
    k = np.asarray(p["blocks"]["attn"]["c_attn"]["kernel"])
    assert not np.allclose(k[0], k[1])


def test_causality(tiny):
    idx = jnp.asarray(np.random.default_rng(1).integers(0, 50257, (1, 12)), jnp.int32)
    changed = idx.at[0, 8].set((idx[0, 8] + 1) % 50257)
    a, b = tiny(idx), tiny(changed)
    np.testing.assert_allclose(a[0, :8], b[0, :8], atol=1e-5)
    assert not np.allclose(a[0, 8:], b[0, 8:])


def test_sequence_longer_than_context_is_rejected(tiny):
    with pytest.raises(ValueError, match="exceeds block_size"):
        tiny(jnp.zeros((1, 129), jnp.int32))


def test_bf16_compute_and_remat_match_fp32():
    base = get_config("nano")
    idx = jnp.asarray(np.random.default_rng(2).integers(0, 50257, (2, 8)), jnp.int32)

    def loss_and_grad(cfg):
        graphdef, params = nnx.split(GPT(cfg, nnx.Rngs(0)), nnx.Param)
        params = nnx.to_pure_dict(params)
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))  # fp32 master weights
        f = jax.jit(jax.value_and_grad(lambda p: loss_fn(nnx.merge(graphdef, p), idx, idx)))
        return f(params)

    ref_loss, ref_grad = loss_and_grad(base)
    loss, grad = loss_and_grad(dataclasses.replace(base, dtype="bfloat16", remat=True))
    np.testing.assert_allclose(loss, ref_loss, rtol=3e-2)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grad))
    cos = sum(
        jnp.vdot(a, b)
        for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad), strict=True)
    )
    cos /= optax.tree.norm(grad) * optax.tree.norm(ref_grad)
    assert float(cos) > 0.99


def test_unknown_preset_and_bad_shape():
    with pytest.raises(ValueError, match="unknown preset"):
        get_config("gpt2-xxl")
    with pytest.raises(ValueError, match="divisible"):
        get_config("tiny", n_head=3)
