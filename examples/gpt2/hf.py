"""Hugging Face GPT-2 checkpoints (``GPT2LMHeadModel``) in and out, as nanoGPT's from_pretrained.

    model = examples.gpt2.hf.load("gpt2")          # a directory: config.json + model.safetensors
    examples.gpt2.hf.save(model, "out/final")

GPT-2 stores its ``Conv1D`` weights as ``(in, out)``, the layout of Flax kernels, so nothing is
transposed; the head is tied to ``wte``. Keys with or without the ``transformer.`` prefix load
(older checkpoints have none); ``save`` writes the prefix, as transformers does. The reading and
writing, one tensor at a time, is `examples.llama.hf_files`'s.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import jax
from flax import nnx

from examples.gpt2.model import GPT, GPTConfig
from examples.llama import hf_files
from examples.llama.hf_files import CheckpointError, Tensor

ARCHITECTURE = "GPT2LMHeadModel"
# Buffers of older checkpoints (the causal mask), not parameters.
IGNORED = (".attn.bias", ".attn.masked_bias", "lm_head.weight")
LINEARS = (("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"), ("mlp", "c_proj"))
DEFAULT_SHARD = 5 * 10**9


def _int(hf: dict, key: str, where: str) -> int:
    value = hf.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise CheckpointError(f"{where}: key {key!r} must be an int, got {value!r}")
    return value


def config_from_hf(hf: dict, where: str = "config.json", dtype: str = "float32") -> GPTConfig:
    """The `GPTConfig` of a Hugging Face GPT-2 ``config.json`` (a dict).

    ``dtype`` is the parameters' dtype; the computation runs in bfloat16 for bfloat16
    parameters and in float32 otherwise (`GPTConfig` computes in those two).

    Raises:
      CheckpointError: another architecture, a malformed key, or a variant the model does not
        implement (another activation, an MLP width other than 4 d, untied head, inverse
        layer-index scaling), named in the sentence.
    """
    archs = hf.get("architectures") or [hf.get("model_type")]
    if archs[0] not in (ARCHITECTURE, "gpt2"):
        raise CheckpointError(
            f"{where}: key 'architectures' is {archs!r}; expected ['{ARCHITECTURE}'] (the Llama "
            "example reads Llama, Mistral and Qwen2)"
        )
    d = _int(hf, "n_embd", where)
    checks = {
        "activation_function": ("gelu_new", "gelu_pytorch_tanh"),
        "n_inner": (None, 4 * d),
        "tie_word_embeddings": (True,),
        "scale_attn_weights": (True,),
        "scale_attn_by_inverse_layer_idx": (False,),
        "layer_norm_epsilon": (1e-5,),
    }
    defaults = {"activation_function": "gelu_new", "tie_word_embeddings": True,
                "scale_attn_weights": True, "layer_norm_epsilon": 1e-5}  # fmt: skip
    for key, allowed in checks.items():
        value = hf.get(key, defaults.get(key))
        if value not in allowed:
            raise CheckpointError(
                f"{where}: key {key!r} is {value!r}; only {' or '.join(map(repr, allowed))} is "
                "supported"
            )
    return GPTConfig(
        n_layer=_int(hf, "n_layer", where),
        n_head=_int(hf, "n_head", where),
        n_embd=d,
        block_size=_int(hf, "n_positions", where),
        vocab_size=_int(hf, "vocab_size", where),
        dtype="bfloat16" if dtype == "bfloat16" else "float32",
        param_dtype=dtype,
    )


def config_to_hf(cfg: GPTConfig, base: dict | None = None, dtype: str | None = None) -> dict:
    """The config.json of ``cfg`` (``base``'s other fields kept)."""
    out = dict(base or {})
    for stale in ("torch_dtype", "dtype"):
        out.pop(stale, None)
    out.update(
        architectures=[ARCHITECTURE],
        model_type="gpt2",
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_positions=cfg.block_size,
        n_ctx=cfg.block_size,
        vocab_size=cfg.vocab_size,
        n_inner=None,
        activation_function="gelu_new",
        layer_norm_epsilon=1e-5,
        tie_word_embeddings=True,
        scale_attn_weights=True,
        scale_attn_by_inverse_layer_idx=False,
        torch_dtype=dtype or cfg.param_dtype,
    )
    return out


def tensor_table(cfg: GPTConfig, prefix: str = "transformer.") -> list[Tensor]:
    """Every tensor of a GPT-2 checkpoint of ``cfg``: its name and place in `GPT`."""
    table = [Tensor(prefix + "wte.weight", ("wte", "embedding")),
             Tensor(prefix + "wpe.weight", ("wpe", "embedding"))]  # fmt: skip
    for i in range(cfg.n_layer):
        for sub in ("ln_1", "ln_2"):
            table.append(Tensor(f"{prefix}h.{i}.{sub}.weight", ("blocks", sub, "scale"), i))
            table.append(Tensor(f"{prefix}h.{i}.{sub}.bias", ("blocks", sub, "bias"), i))
        for mod, lin in (
            ("attn", "c_attn"),
            ("attn", "c_proj"),
            ("mlp", "c_fc"),
            ("mlp", "c_proj"),
        ):
            for hf_leaf, leaf in (("weight", "kernel"), ("bias", "bias")):
                name = f"{prefix}h.{i}.{mod}.{lin}.{hf_leaf}"
                table.append(Tensor(name, ("blocks", mod, lin, leaf), i))
    table += [Tensor(prefix + "ln_f.weight", ("ln_f", "scale")),
              Tensor(prefix + "ln_f.bias", ("ln_f", "bias"))]  # fmt: skip
    return table


def _prefix(directory: Path) -> str:
    names = hf_files.weight_files(directory)
    return "transformer." if any(n.startswith("transformer.") for n in names) else ""


def _stored_dtype(directory: Path, prefix: str) -> str:
    stored = hf_files.stored_tensors(hf_files.weight_files(directory))
    name = prefix + "wte.weight"
    if name not in stored:
        raise CheckpointError(f"{directory}: no tensor {name!r} in the checkpoint")
    return {"BF16": "bfloat16", "F16": "float16"}.get(stored[name][1], "float32")


def load(path, dtype=None, mesh=None, **overrides) -> GPT:
    """The `GPT` of a Hugging Face GPT-2 checkpoint directory.

    Args:
      path: the directory (``config.json``, ``model.safetensors`` or shards with an index).
      dtype: the parameters' dtype ("float32", "bfloat16", "float16"); None: as stored.
      mesh: None (default device) or a mesh with a 'data' axis (FSDP, as `examples.llama.hf`).
      **overrides: `GPTConfig` fields (``remat``, ``loss_chunk``...).

    Returns:
      The model: ``model(tokens)`` maps int32 [B, T] to float32 logits [B, T, vocab];
      ``model.hf_source`` is ``path``.

    Raises:
      CheckpointError: a sentence naming the file, the key and what was expected.
    """
    path = Path(path)
    hf = hf_files.read_config(path)
    prefix = _prefix(path)
    dtype = hf_files.float_dtype(dtype) or _stored_dtype(path, prefix)
    cfg = dataclasses.replace(config_from_hf(hf, str(path / hf_files.CONFIG), dtype), **overrides)
    graphdef, state, abstract = abstract_params(cfg)
    table = tensor_table(cfg, prefix)
    params = hf_files.load_params(path, table, abstract, dtype, mesh, IGNORED)
    nnx.replace_by_pure_dict(state, params)
    model = nnx.merge(graphdef, state)
    model.hf_source = str(path)
    return model


def save(model: GPT, path, *, source=None, max_shard_size: int = DEFAULT_SHARD, dtype=None,
         overwrite: bool = False) -> Path:  # fmt: skip
    """Writes ``model`` as a Hugging Face GPT-2 checkpoint directory (see `examples.llama.hf.save`
    for the arguments: tokenizer files and config fields from ``source`` or
    ``model.hf_source``, shards past ``max_shard_size`` bytes, written beside ``path`` and
    renamed)."""
    source = source if source is not None else getattr(model, "hf_source", None)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return write(model.cfg, params, path, source=source, max_shard_size=max_shard_size,
                 dtype=dtype, overwrite=overwrite)  # fmt: skip


def write(cfg: GPTConfig, params, path, *, source=None, max_shard_size: int = DEFAULT_SHARD,
          dtype=None, overwrite: bool = False) -> Path:  # fmt: skip
    """`save` of a model given as its config and parameters (a pure dict of arrays)."""
    dtype = hf_files.float_dtype(dtype)
    base = hf_files.source_config(source)

    def fill(tmp: Path):
        hf_files.save_params(params, tensor_table(cfg), tmp, max_shard_size, dtype)
        if source is not None:
            hf_files.copy_tokenizer(source, tmp)
        text = json.dumps(config_to_hf(cfg, base, dtype), indent=2, sort_keys=True) + "\n"
        (tmp / hf_files.CONFIG).write_text(text)

    return hf_files.write_dir(path, fill, overwrite)


def abstract_params(cfg: GPTConfig):
    """(graphdef, state, pure dict of ShapeDtypeStruct) of `GPT(cfg)`; nothing is allocated."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: GPT(cfg, nnx.Rngs(0))))
    return graphdef, state, nnx.to_pure_dict(state)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m examples.gpt2.hf", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    rt = sub.add_parser("roundtrip", help="load SRC and save it to DST")
    rt.add_argument("src")
    rt.add_argument("dst")
    rt.add_argument("--dtype")
    a = p.parse_args(argv)
    try:
        model = load(a.src, a.dtype)
        save(model, a.dst, overwrite=True)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(f"saved {a.dst}: {n} parameters")


if __name__ == "__main__":
    main()
