"""Hugging Face Llama-family checkpoints: parity with transformers' logits, round trips, dtypes,
sharded loading, and the sentences bad checkpoints get.

The goldens (tests/examples/goldens/hf/) are tiny random checkpoints written by transformers
with the logits it computes, made by scripts/make_hf_goldens.py (versions and the reverse check,
transformers loading what our `save` wrote, in scripts/make_hf_goldens.json).
"""

import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from examples.llama import hf, hf_files
from examples.llama.hf_files import CheckpointError

ROOT = Path(__file__).resolve().parents[2]
GOLDENS = Path(__file__).parent / "goldens" / "hf"
VARIANTS = ["llama2", "llama31", "llama32", "qwen2", "mistral"]


@functools.cache
def golden(name: str):
    """The golden checkpoint ``name`` loaded once (tests only read it)."""
    return hf.load(GOLDENS / name)


def params_of(model) -> dict:
    flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))[0]
    return {"/".join(str(k.key) for k in path): np.asarray(x) for path, x in flat}


def digest(directory: Path) -> dict:
    """name -> sha256 of every file under ``directory`` (to show nothing changed)."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def copy(name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copytree(GOLDENS / name, dst)
    return dst


@pytest.mark.parametrize("name", VARIANTS)
def test_logits_equal_transformers(name):
    model = golden(name)
    expected = np.load(GOLDENS / name / "expected.npz")
    logits = np.asarray(model(jnp.asarray(expected["input_ids"])))
    assert logits.shape == expected["logits"].shape
    assert model.cfg.param_dtype == "float32"
    np.testing.assert_allclose(logits, expected["logits"], rtol=0, atol=1e-4)


def test_the_variants_use_what_their_configs_say():
    cfgs = {n: golden(n).cfg for n in VARIANTS}
    assert cfgs["llama31"].kv_heads == 1 and cfgs["llama31"].rope_scaling.factor == 8.0
    assert cfgs["llama32"].tie_embeddings and cfgs["qwen2"].tie_embeddings
    assert cfgs["qwen2"].qkv_bias and not cfgs["qwen2"].o_bias
    assert cfgs["mistral"].hd == 16 != cfgs["mistral"].dim // cfgs["mistral"].n_head
    assert cfgs["mistral"].sliding_window == 4096
    assert not any(k.startswith("head/") for k in params_of(golden("llama32")))


def test_llama3_rope_scaling_matters_and_the_classic_config_keys_load(tmp_path):
    expected = np.load(GOLDENS / "llama31" / "expected.npz")
    ids = jnp.asarray(expected["input_ids"])
    d = copy("llama31", tmp_path)
    config = json.loads((d / "config.json").read_text())
    rope = config.pop("rope_parameters")
    # Llama 3.1's own config.json: rope_theta beside rope_scaling (transformers 5 nests them).
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope
    (d / "config.json").write_text(json.dumps(config))
    np.testing.assert_allclose(np.asarray(hf.load(d)(ids)), expected["logits"], atol=1e-4)
    config["rope_scaling"] = None  # without the scaling the logits differ
    (d / "config.json").write_text(json.dumps(config))
    assert np.abs(np.asarray(hf.load(d)(ids)) - expected["logits"]).max() > 1e-2


@pytest.mark.parametrize("name", ["llama31", "qwen2"])
def test_load_save_load_is_bit_exact_and_shards_past_the_size(name, tmp_path):
    src = copy(name, tmp_path)
    (src / "tokenizer.json").write_text('{"model": {}}')
    (src / "tokenizer_config.json").write_text('{"chat_template": "x"}')
    model = hf.load(src)
    out = hf.save(model, tmp_path / "out", max_shard_size=16_000)
    index = json.loads((out / hf_files.INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert (out / "tokenizer.json").read_text() == '{"model": {}}'  # copied from hf_source
    assert (out / "tokenizer_config.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == json.loads((src / "config.json").read_text())["architectures"]
    again = hf.load(out)
    a, b = params_of(model), params_of(again)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    assert again.cfg == model.cfg


def test_16_bit_checkpoints_load_in_their_dtype_or_the_one_asked_for(tmp_path):
    f32 = params_of(golden("llama32"))
    for tag, dtype in (("bf16", "bfloat16"), ("fp16", "float16")):
        model = hf.load(GOLDENS / f"llama32_{tag}")
        got = params_of(model)
        assert model.cfg.param_dtype == model.cfg.dtype == dtype
        for k in f32:  # transformers rounded the same float32 weights to nearest even
            assert got[k].dtype == jnp.dtype(dtype), k
            np.testing.assert_array_equal(got[k], f32[k].astype(jnp.dtype(dtype)), err_msg=k)
        up = params_of(hf.load(GOLDENS / f"llama32_{tag}", dtype="float32"))
        for k in f32:
            assert up[k].dtype == np.float32
            np.testing.assert_array_equal(up[k], got[k].astype(np.float32), err_msg=k)
        logits = model(jnp.zeros((1, 4), jnp.int32))
        assert logits.dtype == jnp.float32 and bool(jnp.isfinite(logits).all())
    # asked for on load, and for the stored copy on save
    model = hf.load(GOLDENS / "llama32", dtype=jnp.bfloat16)
    assert {x.dtype for x in params_of(model).values()} == {np.dtype(jnp.bfloat16)}
    out = hf.save(golden("llama32"), tmp_path / "bf16", dtype="bfloat16")
    again = params_of(hf.load(out))
    for k, x in params_of(model).items():
        np.testing.assert_array_equal(again[k], x, err_msg=k)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_packed_sequences_equal_separate_ones():
    model = golden("llama31")
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (1, 12)), jnp.int32)
    positions = jnp.asarray([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]])
    segments = jnp.asarray([[1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2]])
    packed = np.asarray(model(ids, positions, segments))
    np.testing.assert_allclose(packed[:, :5], np.asarray(model(ids[:, :5])), atol=1e-5)
    np.testing.assert_allclose(packed[:, 5:], np.asarray(model(ids[:, 5:])), atol=1e-5)


# ----------------------------------------------------------------------------- bad input


def test_missing_shard_names_the_index_the_key_and_the_file(tmp_path):
    d = copy("llama31", tmp_path)
    (d / "model-00002-of-00005.safetensors").unlink()
    before = digest(d)
    with pytest.raises(CheckpointError) as e:
        hf.load(d)
    msg = str(e.value)
    assert "model.safetensors.index.json" in msg and "model-00002-of-00005.safetensors" in msg
    assert "weight_map['model." in msg and "missing" in msg
    assert digest(d) == before


def test_wrong_shape_names_the_file_the_key_and_both_shapes(tmp_path):
    d = copy("llama2", tmp_path)
    from safetensors.numpy import load_file

    tensors = load_file(str(d / "model.safetensors"))
    tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros((48, 31), np.float32)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    before = digest(d)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor "
                       r"'model\.layers\.1\.mlp\.up_proj\.weight' has shape \[48, 31\], "
                       r"expected \[48, 32\]"):  # fmt: skip
        hf.load(d)
    assert digest(d) == before


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    d = copy("llama2", tmp_path)
    from safetensors.numpy import load_file

    tensors = load_file(str(d / "model.safetensors"))
    del tensors["model.norm.weight"]
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"no tensor 'model\.norm\.weight'"):
        hf.load(d)
    tensors["model.norm.weight"] = np.ones(32, np.float32)
    tensors["model.layers.0.extra.weight"] = np.ones(3, np.float32)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.extra\.weight' is not part"):
        hf.load(d)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"architectures": ["FalconForCausalLM"]}, r"key 'architectures' is \['Falcon"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}},
         r"key 'rope_parameters' has rope type 'yarn'"),
        ({"hidden_act": "gelu"}, r"key 'hidden_act' is 'gelu'"),
        ({"num_key_value_heads": 3}, r"'num_attention_heads' \(4\) is not divisible"),
        ({"hidden_size": "32"}, r"key 'hidden_size' must be an int, got '32'"),
    ],
)  # fmt: skip
def test_unsupported_configs_are_refused_naming_the_key(tmp_path, change, match):
    d = copy("llama2", tmp_path)
    config = json.loads((d / "config.json").read_text())
    config.update(change)
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=match) as e:
        hf.load(d)
    assert str(d / "config.json") in str(e.value)


def test_malformed_config_and_missing_weights(tmp_path):
    d = copy("llama2", tmp_path)
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json is not valid JSON"):
        hf.load(d)
    shutil.copyfile(GOLDENS / "llama2" / "config.json", d / "config.json")
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"neither model\.safetensors\.index\.json nor .*"
                       r"pytorch_model\.bin"):  # fmt: skip
        hf.load(d)
    with pytest.raises(CheckpointError, match="is not a directory"):
        hf.load(tmp_path / "nowhere")


def test_a_sliding_window_shorter_than_the_sequence_is_refused(tmp_path):
    d = copy("mistral", tmp_path)
    config = json.loads((d / "config.json").read_text())
    config["sliding_window"] = 8
    (d / "config.json").write_text(json.dumps(config))
    model = hf.load(d)
    assert model(jnp.zeros((1, 8), jnp.int32)).shape == (1, 8, 64)
    with pytest.raises(ValueError, match="exceeds the config's sliding_window 8"):
        model(jnp.zeros((1, 9), jnp.int32))


def test_save_leaves_the_target_as_it_was_on_error(tmp_path, monkeypatch):
    model = golden("llama2")
    target = tmp_path / "final"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="exists and is not empty"):
        hf.save(model, target)
    hf.save(model, target, overwrite=True)
    before = digest(target)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(hf_files, "save_params", boom)
    with pytest.raises(OSError, match="disk full"):
        hf.save(model, target, overwrite=True)
    assert digest(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # no partial directory left


EIGHT = """
import jax, numpy as np, jax.numpy as jnp
from examples.llama import hf, hf_files
from examples.gpt2.train import make_mesh
assert jax.device_count() == 8
mesh = make_mesh()
for name in ("llama31",):
    d = "tests/examples/goldens/hf/" + name
    model = hf.load(d, mesh=mesh)
    params = jax.tree_util.tree_flatten_with_path(hf.nnx.to_pure_dict(hf.nnx.state(model)))[0]
    split = 0
    for path, x in params:
        stacked = path[0].key == "blocks"
        want = hf_files.fsdp_sharding(mesh, x.shape, stacked)
        assert x.sharding == want, (path, x.sharding, want)
        split += "data" in tuple(want.spec)
        assert not stacked or want.spec[0] is None  # the layer axis is never split
    assert split >= 5, split
    e = np.load(d + "/expected.npz")
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(e["input_ids"]))), e["logits"],
                               atol=1e-4)
print("ok")
"""


def test_sharded_load_on_eight_cpu_devices():
    env = dict(os.environ)  # the suite's XLA flags kept
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"
    result = subprocess.run([sys.executable, "-c", EIGHT], env=env, cwd=str(ROOT),
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-4000:]
