"""Hugging Face Llama-family checkpoints in and out: Llama 2 / 3 / 3.1 / 3.2, Mistral, Qwen2 / 2.5.

    model = examples.llama.hf.load("Meta-Llama-3.1-8B", dtype="bfloat16")   # or mesh=...
    logits = model(tokens)                                  # int32 [B, T] -> [B, T, vocab]
    examples.llama.hf.save(model, "out/final")              # transformers and vLLM load it

`config_from_hf` maps ``config.json`` onto `LlamaConfig` (refusing, with a sentence naming the
field, what the model does not implement: another ``rope_scaling`` type, partial rotary,
another activation, MLP biases, quantized weights); `tensor_table` names every stored tensor
and its place in the stacked model. Loading reads the tensors one at a time into the stacked
arrays (`examples.llama.hf_files`); with a mesh each goes straight to its FSDP sharding.

From the command line, ``python -m examples.llama.hf roundtrip SRC DST`` loads SRC and saves it
to DST (what `make_goldens.py` checks with transformers).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from examples.llama import hf_files
from examples.llama.hf_files import CheckpointError, Tensor
from examples.llama.model import Llama, Llama3RopeScaling, LlamaConfig

# architectures[0] in config.json -> model_type
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
# Stored buffers that are not parameters (older checkpoints keep the rotary frequencies).
IGNORED = ("rotary_emb.inv_freq",)
ATTENTION = [("q_proj", "wq"), ("k_proj", "wk"), ("v_proj", "wv"), ("o_proj", "wo")]
MLP = [("gate_proj", "w_gate"), ("up_proj", "w_up"), ("down_proj", "w_down")]
ATTENTION = [("q_proj", "wq"), ("k_proj", "wk"), ("v_proj", "wv"), ("o_proj", "wo")]
MLP = [("gate_proj", "w_gate"), ("up_proj", "w_up"), ("down_proj", "w_down")]
DEFAULT_SHARD = 5 * 10**9  # bytes per safetensors shard, as transformers used to default to


def _field(hf: dict, key: str, where: str, default=None, required=True, number=False):
    """``hf[key]``: an int (a number with ``number``); None when absent and not ``required``."""
    value = hf.get(key, default)
    if value is None and not required:
        return None
    kinds = (int, float) if number else (int,)
    if not isinstance(value, kinds) or isinstance(value, bool):
        what = "a number" if number else "an int"
        raise CheckpointError(f"{where}: key {key!r} must be {what}, got {value!r}")
    return value


def _rope(hf: dict, where: str) -> tuple[float, Llama3RopeScaling | None]:
    """(rope_theta, llama3 scaling or None) from ``rope_theta`` + ``rope_scaling`` (the usual
    config.json) or ``rope_parameters`` (transformers 5)."""
    params = hf.get("rope_parameters")
    key = "rope_parameters"
    if not isinstance(params, dict):
        params, key = hf.get("rope_scaling"), "rope_scaling"
    params = dict(params or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    if not isinstance(theta, int | float) or isinstance(theta, bool) or theta <= 0:
        raise CheckpointError(f"{where}: key 'rope_theta' must be a positive number, got {theta!r}")
    kind = params.get("rope_type", params.get("type", "default"))
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise CheckpointError(
            f"{where}: key 'partial_rotary_factor' is {partial!r}; only 1.0 (rotary positions "
            "on the whole head) is supported"
        )
    if kind == "default":
        return float(theta), None
    if kind != "llama3":
        raise CheckpointError(
            f"{where}: key {key!r} has rope type {kind!r}; only 'llama3' scaling (or none) is "
            "supported"
        )
    names = ("factor", "low_freq_factor", "high_freq_factor")
    for name in names:
        if not isinstance(params.get(name), int | float):
            raise CheckpointError(f"{where}: {key}[{name!r}] must be a number for llama3 scaling")
    original = params.get("original_max_position_embeddings", hf.get("max_position_embeddings"))
    if not isinstance(original, int):
        raise CheckpointError(
            f"{where}: {key}['original_max_position_embeddings'] must be an int for llama3 scaling"
        )
    values = {n: float(params[n]) for n in names}
    return float(theta), Llama3RopeScaling(**values, original_max_len=original)


def config_from_hf(hf: dict, where: str = "config.json", dtype: str = "float32") -> LlamaConfig:
    """The `LlamaConfig` of a Hugging Face ``config.json`` (a dict).

    Args:
      hf: the parsed config.json.
      where: the file's name, for error messages.
      dtype: the parameters' (and computation's) dtype.

    Returns:
      The config, with ``param_dtype = dtype = dtype``.

    Raises:
      CheckpointError: an unknown architecture, a missing or malformed key, or a field the
        model does not implement (named in the sentence).
    """
    archs = hf.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs else None
    if arch not in ARCHITECTURES:
        raise CheckpointError(
            f"{where}: key 'architectures' is {archs!r}; expected one of {sorted(ARCHITECTURES)}"
            " (the GPT-2 example reads GPT2LMHeadModel)"
        )
    model_type = ARCHITECTURES[arch]
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{where}: key 'hidden_act' is {act!r}; only 'silu' is supported")
    for key in ("mlp_bias", "quantization_config"):
        if hf.get(key):
            raise CheckpointError(f"{where}: key {key!r} is set; it is not supported")
    n_head = _field(hf, "num_attention_heads", where)
    dim = _field(hf, "hidden_size", where)
    head_dim = _field(hf, "head_dim", where, required=False)
    if head_dim is None and dim % n_head:
        raise CheckpointError(
            f"{where}: key 'hidden_size' ({dim}) is not divisible by 'num_attention_heads' "
            f"({n_head}) and no 'head_dim' is given"
        )
    n_kv = _field(hf, "num_key_value_heads", where, default=n_head)
    if n_head % n_kv:
        raise CheckpointError(
            f"{where}: key 'num_attention_heads' ({n_head}) is not divisible by "
            f"'num_key_value_heads' ({n_kv})"
        )
    theta, scaling = _rope(hf, where)
    window = None
    if model_type == "mistral" or (model_type == "qwen2" and hf.get("use_sliding_window")):
        window = _field(hf, "sliding_window", where, required=False)
    bias = bool(hf.get("attention_bias", False))
    return LlamaConfig(
        n_layer=_field(hf, "num_hidden_layers", where),
        n_head=n_head,
        dim=dim,
        hidden=_field(hf, "intermediate_size", where),
        vocab_size=_field(hf, "vocab_size", where),
        max_len=_field(hf, "max_position_embeddings", where, default=2048),
        rope_theta=theta,
        param_dtype=dtype,
        dtype=dtype,
        n_kv_head=n_kv,
        head_dim=head_dim if head_dim is not None and head_dim != dim // n_head else None,
        norm_eps=float(_field(hf, "rms_norm_eps", where, default=1e-6, number=True)),
        rope_scaling=scaling,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=bias or model_type == "qwen2",
        o_bias=bias,
        sliding_window=window,
        arch=model_type,
    )


def config_to_hf(cfg: LlamaConfig, base: dict | None = None, dtype: str | None = None) -> dict:
    """The config.json of ``cfg``: ``base`` (the source checkpoint's, kept for the fields this
    model does not read: token ids, ...) with every architecture field set from ``cfg``."""
    arch = {v: k for k, v in ARCHITECTURES.items()}[cfg.arch]
    if cfg.arch == "qwen2" and (not cfg.qkv_bias or cfg.o_bias):
        raise ValueError("a qwen2 model has q/k/v biases and no output bias")
    if cfg.arch != "qwen2" and cfg.qkv_bias != cfg.o_bias:
        raise ValueError(f"a {cfg.arch} model has biases on all four projections or on none")
    out = dict(base or {})
    for stale in ("rope_parameters", "rope_scaling", "torch_dtype", "dtype"):
        out.pop(stale, None)
    scaling = None
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        scaling = {
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_len,
        }
    out.update(
        architectures=[arch],
        model_type=cfg.arch,
        hidden_size=cfg.dim,
        intermediate_size=cfg.hidden,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.hd,
        vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        rope_scaling=scaling,
        tie_word_embeddings=cfg.tie_embeddings,
        hidden_act="silu",
        torch_dtype=dtype or cfg.param_dtype,
    )
    if cfg.arch == "llama":
        out.update(attention_bias=cfg.qkv_bias, mlp_bias=False)
    if cfg.arch == "mistral":
        out["sliding_window"] = cfg.sliding_window
    if cfg.arch == "qwen2":
        out["use_sliding_window"] = cfg.sliding_window is not None
        if cfg.sliding_window is not None:
            out["sliding_window"] = cfg.sliding_window
    return out


def tensor_table(cfg: LlamaConfig) -> list[Tensor]:
    """Every tensor of a checkpoint of ``cfg``: its Hugging Face name and place in `Llama`."""
    table = [Tensor("model.embed_tokens.weight", ("embed", "embedding"))]
    for i in range(cfg.n_layer):
        pre = f"model.layers.{i}."
        table.append(Tensor(pre + "input_layernorm.weight", ("blocks", "attn_norm", "scale"), i))
        for hf_name, ours in ATTENTION:
            name = f"{pre}self_attn.{hf_name}."
            table.append(Tensor(name + "weight", ("blocks", "attn", ours, "kernel"), i, True))
            if (cfg.qkv_bias and ours != "wo") or (cfg.o_bias and ours == "wo"):
                table.append(Tensor(name + "bias", ("blocks", "attn", ours, "bias"), i))
        table.append(
            Tensor(pre + "post_attention_layernorm.weight", ("blocks", "mlp_norm", "scale"), i)
        )
        for hf_name, ours in MLP:
            name = f"{pre}mlp.{hf_name}.weight"
            table.append(Tensor(name, ("blocks", "mlp", ours, "kernel"), i, True))
    table.append(Tensor("model.norm.weight", ("norm", "scale")))
    if not cfg.tie_embeddings:
        table.append(Tensor("lm_head.weight", ("head", "kernel"), None, True))
    return table


def _stored_dtype(directory: Path) -> str:
    """The dtype the checkpoint's embedding table is stored in, as a jnp dtype name."""
    stored = hf_files.stored_tensors(hf_files.weight_files(directory))
    name = "model.embed_tokens.weight"
    if name not in stored:
        raise CheckpointError(f"{directory}: no tensor {name!r} in the checkpoint")
    return {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float32"}.get(
        stored[name][1], "float32"
    )


def abstract_params(cfg: LlamaConfig):
    """(graphdef, pure dict of ShapeDtypeStruct) of `Llama(cfg)`; nothing is allocated."""
    abstract = nnx.eval_shape(lambda: Llama(cfg, nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    return graphdef, state, nnx.to_pure_dict(state)


def load(path, dtype=None, mesh=None, **overrides) -> Llama:
    """The `Llama` of a Hugging Face checkpoint directory.

    Args:
      path: the directory (``config.json``, ``model.safetensors`` or shards with
        ``model.safetensors.index.json``).
      dtype: the parameters' and computation's dtype ("float32", "bfloat16", "float16"); None:
        the dtype the checkpoint is stored in.
      mesh: None (default device), or a `jax.sharding.Mesh` with a 'data' axis: parameters
        sharded FSDP-style (`examples.llama.hf_files.fsdp_sharding`).
      **overrides: `LlamaConfig` fields to set (``remat``, ``loss_chunk``, ``dtype`` for the
        computation alone...).

    Returns:
      The model; ``model(tokens)`` maps int32 [B, T] to float32 logits [B, T, vocab].
      ``model.hf_source`` is ``path`` (what `save` copies the tokenizer from).

    Raises:
      CheckpointError: a sentence naming the file, the key and what was expected.
    """
    path = Path(path)
    hf = hf_files.read_config(path)
    dtype = hf_files.float_dtype(dtype) or _stored_dtype(path)
    cfg = dataclasses.replace(config_from_hf(hf, str(path / hf_files.CONFIG), dtype), **overrides)
    graphdef, state, abstract = abstract_params(cfg)
    params = hf_files.load_params(path, tensor_table(cfg), abstract, cfg.param_dtype, mesh, IGNORED)
    nnx.replace_by_pure_dict(state, params)
    model = nnx.merge(graphdef, state)
    model.hf_source = str(path)
    return model


def save(model: Llama, path, *, source=None, max_shard_size: int = DEFAULT_SHARD, dtype=None,
         overwrite: bool = False) -> Path:  # fmt: skip
    """Writes ``model`` as a Hugging Face checkpoint directory that transformers and vLLM load.

    Args:
      model: the `Llama` (or its ``(graphdef, params)`` merged back with `nnx.merge`).
      path: the directory to write; built beside it and renamed into place (an error leaves it
        as it was).
      source: checkpoint to copy the tokenizer files and the other config.json fields from;
        None: ``model.hf_source`` when `load` made the model.
      max_shard_size: bytes per safetensors shard; past it the weights are sharded, with
        ``model.safetensors.index.json``.
      dtype: the stored dtype; None: the parameters'.
      overwrite: replace an existing non-empty ``path``.

    Returns:
      ``path``.
    """
    source = source if source is not None else getattr(model, "hf_source", None)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return write(model.cfg, params, path, source=source, max_shard_size=max_shard_size,
                 dtype=dtype, overwrite=overwrite)  # fmt: skip


def write(cfg: LlamaConfig, params, path, *, source=None, max_shard_size: int = DEFAULT_SHARD,
          dtype=None, overwrite: bool = False) -> Path:  # fmt: skip
    """`save` of a model given as its config and parameters (a pure dict of arrays, host or
    device, as ``nnx.to_pure_dict(nnx.state(model, nnx.Param))`` gives)."""
    dtype = hf_files.float_dtype(dtype)
    base = hf_files.source_config(source)

    def fill(tmp: Path):
        hf_files.save_params(params, tensor_table(cfg), tmp, max_shard_size, dtype)
        if source is not None:
            hf_files.copy_tokenizer(source, tmp)
        config = config_to_hf(cfg, base, dtype)
        (tmp / hf_files.CONFIG).write_text(_json(config))

    return hf_files.write_dir(path, fill, overwrite)


def _json(obj) -> str:
    import json

    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m examples.llama.hf", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    rt = sub.add_parser("roundtrip", help="load SRC and save it to DST")
    rt.add_argument("src")
    rt.add_argument("dst")
    rt.add_argument("--dtype")
    rt.add_argument("--max-shard-size", type=int, default=DEFAULT_SHARD)
    a = p.parse_args(argv)
    try:
        model = load(a.src, a.dtype)
        save(model, a.dst, max_shard_size=a.max_shard_size, overwrite=True)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    print(f"saved {a.dst}: {sum(x.size for x in leaves)} parameters, {jnp.dtype(leaves[0].dtype)}")


if __name__ == "__main__":
    main()
