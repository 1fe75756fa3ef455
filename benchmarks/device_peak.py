"""The Llama-3.1-8B ``omgd-layer-rotate`` step run for real: the device's peak bytes beside
the compiled figure.

    python -m benchmarks.device_peak --out benchmarks/results/device_peak.json

For a machine with an accelerator (issue 19): the model of `benchmarks/memory.py`'s Llama rows
(per-layer remat, chunked cross-entropy, ``mlp_chunk``, ``attn_remat``), in bfloat16 (no
float16 stand-in: an accelerator keeps bf16 matmuls in bf16), randomly initialised on the
device, trained by `omgd_jax.lean_train_step` with `omgd_jax.omgd_adamw` (γ layers a phase,
the embedding and the head units of the traversal) for one full cycle with one step a phase,
so every kind of phase runs (layers, embedding, head). One record per step: its phase, its
loss, its wall time and the device's bytes in use after it; then one summary record: the
compiled step's argument + temp bytes (`report.memory`, the figure `memory.py` reports) and
the device's ``peak_bytes_in_use`` over the whole run (the largest phase's, plus what the
runtime holds), side by side. On the CPU backend ``memory_stats()`` is None and the device
figures are null; ``--preset tiny`` runs in seconds there (the suite's check of this script).

Time: the 8B model's initialisation and compile take minutes on one GPU; each step is
seconds. Not run on this machine (no accelerator): no 8B result is committed.
"""

from __future__ import annotations

import argparse
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

import omgd_jax
from benchmarks import report
from benchmarks.memory import LAYERS, ROTATE

PHASE_NAMES = {"embed": "embedding", "wte": "embedding", "head": "head"}


def unit_names(params) -> list[str]:
    """The traversal's extra units in unit order (first leaf first), named as records say."""
    names = []
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        m = re.search(ROTATE, jax.tree_util.keystr(path, simple=True, separator="/"))
        if m and m.group(1) not in names:
            names.append(m.group(1))
    return [PHASE_NAMES.get(n, n) for n in names]


def device_stats() -> dict | None:
    stats = jax.local_devices()[0].memory_stats()
    return None if stats is None else dict(stats)


def run(preset: str, batch: tuple[int, int], gamma: int, dtype: str = "bfloat16") -> list[dict]:
    from examples.llama.model import Llama, get_config, loss_fn

    base = get_config(preset)
    cfg = get_config(
        preset,
        param_dtype=dtype,
        dtype=dtype,
        remat=True,
        loss_chunk=min(512, batch[0] * batch[1]),
        mlp_chunk=base.hidden // 8 if base.hidden % 8 == 0 else 0,
        attn_remat=True,
    )
    graphdef, params = nnx.split(Llama(cfg, nnx.Rngs(0)), nnx.Param)
    tx = omgd_jax.omgd_adamw(
        1e-5,
        b1=0.9,
        b2=0.95,
        weight_decay=0.1,
        mu_dtype=dtype,
        granularity="layer",
        layers=LAYERS,
        layers_per_phase=gamma,
        steps_per_mask=1,
        units=ROTATE,
    )

    def loss_of(p, x, y):
        return loss_fn(nnx.merge(graphdef, p), x, y)

    step = omgd_jax.lean_train_step(loss_of, tx, layers=LAYERS, units=ROTATE)
    state = tx.init(params)
    rng = np.random.default_rng(0)
    tokens = lambda: jnp.asarray(rng.integers(0, cfg.vocab_size, batch), jnp.int32)  # noqa: E731
    x, y = tokens(), tokens()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, x, y).compile()
    mem = report.memory(compiled)
    names = unit_names(params)
    records = []
    cycle = cfg.n_layer // gamma + len(names)
    for _ in tqdm(range(cycle), desc="one cycle, one step a phase"):
        unit = int(omgd_jax.active_unit(state))
        start = time.perf_counter()
        params, state, loss = compiled(params, state, x, y)
        loss = float(loss)  # waits for the step
        stats = device_stats()
        records.append(
            {
                "kind": "step",
                "phase": "layers" if unit < 0 else names[unit],
                "loss": loss,
                "seconds": time.perf_counter() - start,
                "bytes_in_use": None if stats is None else stats.get("bytes_in_use"),
            }
        )
        x, y = tokens(), tokens()
    stats = device_stats()
    records.append(
        {
            "kind": "summary",
            "model": f"{preset} {batch[0]}x{batch[1]} {dtype}",
            "method": f"omgd-layer-rotate lean (gamma={gamma})",
            "phase": "every",
            "compiled_argument": mem["argument_bytes"],
            "compiled_temp": mem["temp_bytes"],
            "compiled_total": mem["peak_bytes"],
            "device_peak_bytes_in_use": None if stats is None else stats.get("peak_bytes_in_use"),
            "device_bytes_limit": None if stats is None else stats.get("bytes_limit"),
        }
    )
    return records


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="write the records as JSON to this file")
    parser.add_argument("--preset", default="llama-3.1-8b", help="examples/llama preset")
    parser.add_argument("--batch", default="16x256", help="micro-batch, BATCHxTOKENS")
    parser.add_argument("--gamma", type=int, default=2, help="layers a phase")
    args = parser.parse_args(argv)
    try:
        batch = tuple(int(n) for n in args.batch.split("x"))
        if len(batch) != 2 or min(batch) < 1:
            raise ValueError
    except ValueError:
        parser.error(f"--batch must be BATCHxTOKENS with positive integers, got {args.batch!r}")
    records = run(args.preset, batch, args.gamma)
    summary = records[-1]
    gib = lambda b: "n/a" if b is None else f"{b / 2**30:.3f} GiB ({b:,} B)"  # noqa: E731
    print(f"\n{summary['model']}, {summary['method']}")
    print("| compiled argument + temp | device peak bytes in use | device limit |")
    print("|---|---|---|")
    print(
        f"| {gib(summary['compiled_total'])} | {gib(summary['device_peak_bytes_in_use'])} "
        f"| {gib(summary['device_bytes_limit'])} |"
    )
    phases = sorted({r["phase"] for r in records if r["kind"] == "step"})
    print("phases run:", ", ".join(phases))
    if args.out:
        report.write(args.out, records, units="bytes", peak="argument + temp (report.peak_bytes)")


if __name__ == "__main__":
    main()
