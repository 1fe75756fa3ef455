"""Hugging Face checkpoint directories, read and written one tensor at a time.

A directory holds ``config.json``, the weights in ``model.safetensors`` or in shards listed by
``model.safetensors.index.json`` (``{"weight_map": {tensor name: shard file}}``) and the
tokenizer files (``tokenizer.json``, ``tokenizer_config.json``...). A model's `Tensor` table
says where each stored tensor goes: a parameter path of the model's pure dict, a slot of the
stacked layer axis, and whether it is stored transposed (PyTorch's ``nn.Linear`` keeps
``(out, in)``, Flax's kernels ``(in, out)``).

`load_params` checks every shard and every tensor's name and shape against the table before it
reads any data, then reads the tensors one by one, each put straight on its device (its slice
of the sharding with a mesh) and written into the stacked array in place: the host holds one
tensor at a time besides the model. `save_params` writes shards of at most a given size and
the index; `write_dir` builds a directory beside its target and renames it into place, so an
error leaves the target as it was.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
CONFIG = "config.json"
# Copied from the source checkpoint on save: what tokenizers and generation read besides weights.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)
_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}
FLOAT_DTYPES = ("float32", "bfloat16", "float16")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read or written, said in a sentence naming the
    file, the key and what was expected."""


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One stored tensor and where it goes in the model.

    Attributes:
      name: its key in the safetensors files (``model.layers.0.self_attn.q_proj.weight``).
      path: the parameter's path in the model's pure dict (``("blocks", "attn", "wq",
        "kernel")``).
      layer: its slot along the stacked layer axis, or None for an unstacked parameter.
      transpose: stored as the transpose of the parameter (a 2-D ``(out, in)`` weight).
    """

    name: str
    path: tuple[str, ...]
    layer: int | None = None
    transpose: bool = False


def float_dtype(dtype, what: str = "dtype") -> str | None:
    """``dtype`` as one of "float32", "bfloat16", "float16" (None stays None)."""
    if dtype is None:
        return None
    name = jnp.dtype(dtype).name
    if name not in FLOAT_DTYPES:
        raise ValueError(f"{what} must be one of {FLOAT_DTYPES}, got {dtype!r}")
    return name


def read_json(path: Path) -> dict:
    """The JSON object in ``path``; CheckpointError if it is missing or malformed."""
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: a Hugging Face checkpoint needs it")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(obj).__name__}")
    return obj


def read_config(directory) -> dict:
    """``directory/config.json`` as a dict (CheckpointError if missing or malformed)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(
            f"{directory} is not a directory (expected a Hugging Face checkpoint)"
        )
    return read_json(directory / CONFIG)


def source_config(source) -> dict | None:
    """The config.json of the checkpoint a model came from (None without one), whose other
    fields (token ids...) a save keeps."""
    if source is None or not (Path(source) / CONFIG).is_file():
        return None
    return read_json(Path(source) / CONFIG)


def weight_files(directory) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it, from the index or the single file.

    Raises CheckpointError naming the index and the key when a listed shard is missing, and
    when the directory holds no safetensors weights at all.
    """
    directory = Path(directory)
    index = directory / INDEX
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: key 'weight_map' must map tensor names to shard files")
        files = {name: directory / str(f) for name, f in weight_map.items()}
        for name, f in files.items():
            if not f.is_file():
                raise CheckpointError(
                    f"{index}: weight_map[{name!r}] names the shard {f.name}, which is missing "
                    f"from {directory}"
                )
        return files
    single = directory / WEIGHTS
    if single.is_file():
        return {name: single for name in _header(single)}
    others = sorted(p.name for p in directory.glob("*.bin")) + sorted(
        p.name for p in directory.glob("*.safetensors")
    )
    raise CheckpointError(
        f"{directory} holds neither {INDEX} nor {WEIGHTS}"
        + (f" (found {', '.join(others)}: only safetensors checkpoints are read)" if others else "")
    )


@functools.lru_cache(maxsize=64)
def _header_cached(path: str, mtime: float) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            slices = {k: f.get_slice(k) for k in f.keys()}  # noqa: SIM118 - not a dict
            return {k: (tuple(s.get_shape()), s.get_dtype()) for k, s in slices.items()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None


def _header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, safetensors dtype) of every tensor in one file, without reading data."""
    return _header_cached(str(path), path.stat().st_mtime)


def stored_tensors(files: dict[str, Path]) -> dict[str, tuple[tuple[int, ...], str, Path]]:
    """name -> (shape, dtype, file) of the tensors the weight map lists; CheckpointError when
    a file does not hold a tensor the index says it does."""
    out = {}
    for name, f in files.items():
        header = _header(f)
        if name not in header:
            raise CheckpointError(f"{f}: holds no tensor {name!r}, which the weight map lists")
        out[name] = (*header[name], f)
    return out


def check(stored: dict, table: list[Tensor], abstract, directory, ignore: Iterable[str] = ()):
    """Every tensor of ``table`` is stored, with the parameter's shape; nothing else is stored
    (names matching ``ignore`` aside). Raises CheckpointError naming the file and the key."""
    ignore = tuple(ignore)
    wanted = {t.name: t for t in table}
    for t in table:
        if t.name not in stored:
            raise CheckpointError(
                f"{directory}: no tensor {t.name!r} in the checkpoint, which the config's model "
                "needs"
            )
        shape, dtype, f = stored[t.name]
        expect = expected_shape(t, abstract)
        if shape != expect:
            raise CheckpointError(
                f"{f.name}: tensor {t.name!r} has shape {list(shape)}, expected {list(expect)} "
                "from config.json"
            )
        if dtype not in _DTYPES:
            raise CheckpointError(
                f"{f.name}: tensor {t.name!r} has dtype {dtype}; expected one of {sorted(_DTYPES)}"
            )
    extra = sorted(n for n in stored if n not in wanted and not n.endswith(ignore))
    if extra:
        raise CheckpointError(
            f"{stored[extra[0]][2].name}: tensor {extra[0]!r} is not part of the model config.json "
            f"describes ({len(extra)} unexpected tensor(s))"
        )


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def expected_shape(t: Tensor, abstract) -> tuple[int, ...]:
    shape = tuple(_get(abstract, t.path).shape)
    if t.layer is not None:
        shape = shape[1:]
    return shape[::-1] if t.transpose else shape


def fsdp_sharding(mesh, shape, stacked: bool) -> NamedSharding:
    """The GPT-2 example's FSDP layout (`examples.gpt2.train.leaf_sharding`): split along the
    largest axis the 'data' axis divides, never the layer axis of a stacked leaf."""
    from examples.gpt2.train import leaf_sharding

    return leaf_sharding(mesh, jax.ShapeDtypeStruct(shape, jnp.float32), True, stacked)


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim`` (None elsewhere)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    fn = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    return fn


def _trim():
    """Hands freed heap pages back to the system. The per-tensor host buffers are small enough
    for glibc to carve from its heap, which otherwise keeps what they leave: 0.13x the model's
    bytes more at the peak of a 1 GB load (benchmarks/hf_load_memory.py)."""
    fn = _malloc_trim()
    if fn is not None:
        fn(0)


@functools.cache
def _writer(sharding):
    def put(buf, x, i):
        return jax.lax.dynamic_update_index_in_dim(buf, x.astype(buf.dtype), i, 0)

    return jax.jit(put, donate_argnums=0, out_shardings=sharding)


def _read(t: Tensor, stored, dtype) -> np.ndarray:
    from safetensors import safe_open

    _, _, f = stored[t.name]
    with safe_open(str(f), framework="numpy") as h:  # mapped only while this tensor is read
        x = h.get_tensor(t.name)
        x = x.T if t.transpose else x
        return np.ascontiguousarray(x, dtype=dtype)


def load_params(directory, table: list[Tensor], abstract, dtype: str, mesh=None,
                ignore: Iterable[str] = ()):  # fmt: skip
    """The model's parameters (a pure dict like ``abstract``) read from ``directory``.

    Args:
      directory: the checkpoint directory.
      table: where every stored tensor goes (`Tensor`).
      abstract: pure dict of ``jax.ShapeDtypeStruct``, the parameters' shapes.
      dtype: the parameters' dtype ("float32", "bfloat16" or "float16").
      mesh: None (the default device), or a mesh with a 'data' axis: every tensor goes straight
        to its FSDP sharding (`fsdp_sharding`).
      ignore: substrings of stored names to skip (buffers such as ``rotary_emb.inv_freq``).

    Returns:
      The pure dict of arrays.

    Raises:
      CheckpointError: missing shards or tensors, unexpected tensors, wrong shapes.
    """
    stored = stored_tensors(weight_files(directory))
    check(stored, table, abstract, directory, ignore)
    np_dtype = np.dtype(jnp.dtype(dtype))
    by_path: dict[tuple, list[Tensor]] = {}
    for t in table:
        by_path.setdefault(t.path, []).append(t)
    flat = {}
    # The unstacked leaves first, largest first: the embedding's and head's transient host
    # copies then come while little of the model is allocated (the peak is the model plus the
    # largest transient after it; a stacked leaf's transients are one layer's tensors).
    order = sorted(by_path, key=lambda p: (by_path[p][0].layer is not None,
                                           -math.prod(_get(abstract, p).shape)))  # fmt: skip
    for path in order:
        tensors = by_path[path]
        shape = tuple(_get(abstract, path).shape)
        stacked = tensors[0].layer is not None
        if mesh is None:
            sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        else:
            sharding = fsdp_sharding(mesh, shape, stacked)
        if not stacked:
            flat[path] = jax.device_put(_read(tensors[0], stored, np_dtype), sharding)
            _trim()
            continue
        if sorted(t.layer for t in tensors) != list(range(shape[0])):
            raise ValueError(f"the tensor table misses layers of {'/'.join(path)}")
        row = sharding  # where one layer's tensor goes: the stacked sharding less its layer axis
        if mesh is not None:
            spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
            row = NamedSharding(mesh, P(*spec[1:]))
        buf = jnp.zeros(shape, np_dtype, device=sharding)
        for t in tensors:
            x = jax.device_put(_read(t, stored, np_dtype), row)
            buf = _writer(sharding)(buf, x, t.layer)
            del x
            _trim()
        flat[path] = buf
    out: dict = {}
    for path, x in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = x
    return out


def _host(x) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    if not x.is_fully_addressable:  # multi-host: every host gathers, the caller writes once
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)


def save_params(params, table: list[Tensor], directory: Path, max_shard_bytes: int,
                dtype: str | None = None) -> list[str]:  # fmt: skip
    """Writes the tensors of ``table`` from ``params`` into ``directory`` as safetensors shards
    of at most ``max_shard_bytes`` (a tensor larger than that gets a shard of its own), with
    ``model.safetensors.index.json`` when there is more than one. Each tensor is brought to the
    host on its own. Returns the file names written."""
    from safetensors.numpy import save_file

    def stored_dtype(t):
        return np.dtype(jnp.dtype(dtype or _get(params, t.path).dtype))

    def nbytes(t):
        leaf = _get(params, t.path)
        n = math.prod(leaf.shape[1:] if t.layer is not None else leaf.shape)
        return n * stored_dtype(t).itemsize

    shards: list[list[Tensor]] = [[]]
    size = 0
    for t in table:
        if shards[-1] and size + nbytes(t) > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes(t)
    n = len(shards)
    names = [WEIGHTS] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for fname, shard in zip(names, shards, strict=True):
        tensors = {}
        for t in shard:
            leaf = _get(params, t.path)
            x = _host(leaf[t.layer] if t.layer is not None else leaf)
            x = x.T if t.transpose else x
            tensors[t.name] = np.ascontiguousarray(x, dtype=stored_dtype(t))
            weight_map[t.name] = fname
        if jax.process_index() == 0:
            save_file(tensors, str(directory / fname), metadata={"format": "pt"})
        del tensors
    if n > 1 and jax.process_index() == 0:
        total = sum(nbytes(t) for t in table)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return names + ([INDEX] if n > 1 else [])


def copy_tokenizer(source, directory: Path) -> list[str]:
    """Copies the tokenizer and generation files of checkpoint ``source`` into ``directory``."""
    copied = []
    for name in TOKENIZER_FILES:
        f = Path(source) / name
        if f.is_file():
            shutil.copyfile(f, directory / name)
            copied.append(name)
    return copied


def write_dir(path, fill: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Builds a directory with ``fill(tmp)`` beside ``path``, then renames it to ``path``.

    An error inside ``fill`` removes the temporary directory and leaves ``path`` untouched. An
    existing non-empty ``path`` is refused unless ``overwrite`` (then it is replaced whole, only
    after the new one is complete). Only the main process writes (multi-host).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise CheckpointError(f"{path} exists and is not empty; choose another directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        tmp.chmod(0o755)
        fill(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if jax.process_index() != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        return path
    if path.exists():
        old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(path)
    return path
