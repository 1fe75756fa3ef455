"""Hugging Face GPT-2 checkpoints: parity with transformers, round trip, unprefixed keys, dtypes,
refusals (goldens from scripts/make_hf_goldens.py)."""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from examples.gpt2 import hf
from examples.llama.hf_files import CheckpointError

GOLDEN = Path(__file__).parent / "goldens" / "hf" / "gpt2"


def params_of(model) -> dict:
    flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))[0]
    return {"/".join(str(k.key) for k in path): np.asarray(x) for path, x in flat}


def test_logits_equal_transformers():
    model = hf.load(GOLDEN)
    expected = np.load(GOLDEN / "expected.npz")
    logits = np.asarray(model(jnp.asarray(expected["input_ids"])))
    np.testing.assert_allclose(logits, expected["logits"], rtol=0, atol=1e-4)


def test_round_trip_is_bit_exact_and_old_unprefixed_keys_load(tmp_path):
    model = hf.load(GOLDEN)
    out = hf.save(model, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    a, b = params_of(model), params_of(hf.load(out))
    assert all(np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    # the hub's original gpt2 files: no "transformer." prefix, a causal-mask buffer per layer
    old = tmp_path / "old"
    shutil.copytree(GOLDEN, old)
    tensors = {
        k.removeprefix("transformer."): v
        for k, v in load_file(str(old / "model.safetensors")).items()
    }  # noqa: E501
    tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 32, 32), np.float32))
    save_file(tensors, str(old / "model.safetensors"), metadata={"format": "pt"})
    c = params_of(hf.load(old))
    assert all(np.array_equal(a[k], c[k]) for k in a)


def test_dtypes(tmp_path):
    out = hf.save(hf.load(GOLDEN), tmp_path / "bf16", dtype="bfloat16")
    model = hf.load(out)
    assert model.cfg.param_dtype == "bfloat16" and model.cfg.dtype == "bfloat16"
    assert {x.dtype for x in params_of(model).values()} == {np.dtype(jnp.bfloat16)}
    assert hf.load(out, dtype="float32").cfg.param_dtype == "float32"
    fp16 = hf.load(GOLDEN, dtype="float16")
    assert fp16.cfg.param_dtype == "float16" and fp16.cfg.dtype == "float32"


@pytest.mark.parametrize(
    "change, match",
    [
        ({"architectures": ["LlamaForCausalLM"]}, r"expected \['GPT2LMHeadModel'\]"),
        ({"n_inner": 100}, r"key 'n_inner' is 100"),
        ({"activation_function": "relu"}, r"key 'activation_function' is 'relu'"),
        ({"scale_attn_by_inverse_layer_idx": True}, r"'scale_attn_by_inverse_layer_idx'"),
    ],
)
def test_unsupported_configs_are_refused(tmp_path, change, match):
    d = tmp_path / "g"
    shutil.copytree(GOLDEN, d)
    config = json.loads((d / "config.json").read_text())
    config.update(change)
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=match):
        hf.load(d)
