"""Peak host memory of `examples.llama.hf.load` on a sharded Hugging Face checkpoint of >= 1 GB.

    python -m benchmarks.hf_load_memory --out benchmarks/results/hf_load_memory.json

Generates a random bf16 Llama-style checkpoint (width 1024, 40 layers, GQA 16 / 4 heads, MLP
2816, vocabulary 32000: 1.03 GB in shards of 256 MB with an index, `examples.llama.tiny`), then
loads it in a fresh Python process per row and reads ``ru_maxrss`` there: once after the
imports and the CPU client's start (``baseline``), once after the load (``peak``). The target is
``peak - baseline <= 1.25 x`` the model's bytes (the loaded model itself is 1x: on XLA:CPU the
device memory is host memory); the absolute peak is recorded beside it. The generated
checkpoint is deleted afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, resource, sys, time
import jax
from examples.llama import hf
jax.devices()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t = time.perf_counter()
model = hf.load(sys.argv[1], dtype=sys.argv[2] if sys.argv[2] != "stored" else None)
leaves = jax.tree.leaves(hf.nnx.state(model, hf.nnx.Param))
jax.block_until_ready(leaves)
seconds = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
status = open("/proc/self/status").read().split("VmHWM:")[1].split()[0]  # kB, this mm only
print(json.dumps({"baseline_rss_bytes": base, "peak_rss_bytes": peak, "seconds": seconds,
                  "vm_hwm_bytes": int(status) * 1024,
                  "model_bytes": sum(x.nbytes for x in leaves),
                  "dtype": str(leaves[0].dtype)}))
"""


def make_checkpoint(path: Path, shard_bytes: int):
    """Writes the random checkpoint (run in a subprocess of its own: see `main`)."""
    from examples.llama import tiny
    from examples.llama.model import LlamaConfig

    cfg = LlamaConfig(n_layer=40, n_head=16, dim=1024, hidden=2816, vocab_size=32000,
                      max_len=4096, n_kv_head=4, norm_eps=1e-5, param_dtype="bfloat16",
                      dtype="bfloat16")  # fmt: skip
    tiny.random_checkpoint(path, None, cfg, seed=0, max_shard_size=shard_bytes)
    return cfg


def measure(path: Path, dtype: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), dtype], cwd=ROOT, check=True,
                         capture_output=True, text=True)  # fmt: skip
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    rec["load_rss_bytes"] = rec["peak_rss_bytes"] - rec["baseline_rss_bytes"]
    rec["load_over_model"] = rec["load_rss_bytes"] / rec["model_bytes"]
    rec["peak_over_model"] = rec["peak_rss_bytes"] / rec["model_bytes"]
    rec["meets_1_25x"] = rec["load_over_model"] <= 1.25
    return rec


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.hf_load_memory", description=__doc__)
    p.add_argument("--out", default="benchmarks/results/hf_load_memory.json")
    p.add_argument("--dir", help="where to generate the checkpoint (default: a temp dir)")
    p.add_argument("--shard-bytes", type=int, default=256 * 2**20)
    p.add_argument("--keep", action="store_true", help="keep the generated checkpoint")
    a = p.parse_args(argv)
    work = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="hf_load_memory-"))
    ckpt = work / "checkpoint"
    try:
        # In a child: ru_maxrss survives fork and exec, so the measuring processes must be
        # started from this one while it is small (no jax, no generated weights in it).
        make = f"from benchmarks.hf_load_memory import *; make_checkpoint(Path({str(ckpt)!r}), {a.shard_bytes})"  # noqa: E501
        subprocess.run([sys.executable, "-c", make], cwd=ROOT, check=True)
        files = sorted(ckpt.glob("*.safetensors"))
        on_disk = sum(f.stat().st_size for f in files)
        records = []
        for dtype in ("stored", "float32"):  # bf16 as stored, and upcast while loading
            rec = {"checkpoint_bytes": on_disk, "shards": len(files), "load_dtype": dtype}
            rec.update(measure(ckpt, dtype))
            records.append(rec)
            print(json.dumps(rec), flush=True)
    finally:
        if not a.keep:
            shutil.rmtree(work if not a.dir else ckpt, ignore_errors=True)
    rss = ("ru_maxrss of a fresh process: baseline after imports + CPU client start, peak after "
           "the load; target (peak - baseline) <= 1.25 x model bytes")  # fmt: skip
    from benchmarks import report  # imports jax: only after the measurements

    report.write(a.out, records, benchmark="hf_load_memory", rss=rss,
                 model="llama-style d1024 L40 GQA16/4 f2816 V32000 bf16")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
