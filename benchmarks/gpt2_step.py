"""Memory of one GPT-2-124M training step per optimizer (XLA-compiled, nothing allocated), plus
tiny-preset throughput: `python -m benchmarks.gpt2_step --out benchmarks/results/gpt2_step.json`.

For each optimizer choice of `examples.gpt2.train` the jitted step (donated params and optimizer
state, clip -> optimizer, micro-batch `--batch-size` x 1024) is lowered on abstract inputs
(`jax.ShapeDtypeStruct`, `nnx.eval_shape`) and compiled for this machine's backend;
`compiled.memory_analysis()` gives argument / output / temp / alias bytes. The optimizer-state
bytes come from the abstract state pytree. The OMGD optimizers are measured in their masking
stage (the state they hold after the AdamW warm-up). Then every optimizer trains the tiny preset
on random tokens in this process: tokens/s is the median of `--timed` steps after compilation.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from examples.gpt2.config import Config, finalize
from examples.gpt2.model import GPT, get_config
from examples.gpt2.train import make_optimizer, make_train_step, tree_bytes

CHOICES = [
    ("adamw", {}),
    ("omgd-layer", {}),  # gamma 3 of 12, compact state
    ("omgd-layer", {"omgd_state": "frozen"}),
    ("lisa", {}),
    ("omgd-element", {}),  # M = 4, compact
    ("omgd-tensor", {}),  # M = 2, frozen
]


def _name(opt, extra):
    return opt + (f" ({extra['omgd_state']})" if "omgd_state" in extra else "")


def _setup(cfg):
    stage = "adamw" if cfg.optimizer == "adamw" else "omgd"
    mcfg = get_config(cfg.preset, dtype=cfg.dtype, remat=cfg.remat)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: GPT(mcfg, nnx.Rngs(0))), nnx.Param)
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(state))
    tx = make_optimizer(cfg, stage)
    opt = jax.eval_shape(tx.init, params)
    step = jax.jit(make_train_step(graphdef, tx), donate_argnums=(0, 1))
    return mcfg, graphdef, params, tx, opt, step


def memory_row(opt, extra, batch, dtype, remat):
    cfg = finalize(
        Config(
            preset="gpt2-124m",
            optimizer=opt,
            batch_size=batch,
            grad_accum=1,
            dtype=dtype,
            remat=remat,
            **extra,
        )
    )
    _, _, params, _, opt_state, step = _setup(cfg)
    x = jax.ShapeDtypeStruct((1, batch, cfg.block_size), jnp.int32)
    t = time.perf_counter()
    m = step.lower(params, opt_state, x, x).compile().memory_analysis()
    row = {
        "optimizer": _name(opt, extra),
        "param_bytes": tree_bytes(params),
        "opt_state_bytes": tree_bytes(opt_state),
        "argument_bytes": m.argument_size_in_bytes,
        "output_bytes": m.output_size_in_bytes,
        "temp_bytes": m.temp_size_in_bytes,
        "alias_bytes": m.alias_size_in_bytes,
        "compile_s": round(time.perf_counter() - t, 1),
    }
    # Live at the peak of a step, at most: inputs + outputs not aliased to inputs + scratch.
    row["peak_bytes"] = (
        row["argument_bytes"] + row["output_bytes"] - row["alias_bytes"] + row["temp_bytes"]
    )
    return row


def throughput(choices, timed):
    """Tiny-preset tokens/s per optimizer. All steps are compiled first, then timed in rounds
    (one step of each optimizer per round) so that a varying machine load hits all alike."""
    runs = []
    for opt, extra in choices:
        cfg = finalize(Config(preset="tiny", optimizer=opt, warmup_masks=0, **extra))
        mcfg, _, _, tx, _, step = _setup(cfg)
        params = nnx.to_pure_dict(nnx.state(GPT(mcfg, nnx.Rngs(0)), nnx.Param))
        rng = np.random.default_rng(0)
        shape = (cfg.grad_accum, cfg.batch_size, cfg.block_size)
        x, y = (jnp.asarray(rng.integers(0, 50257, shape), jnp.int32) for _ in range(2))
        carry = step(params, tx.init(params), x, y)  # compile + one step
        jax.block_until_ready(carry)
        runs.append(
            {
                "name": _name(opt, extra),
                "step": step,
                "carry": carry,
                "xy": (x, y),
                "tokens": int(np.prod(shape)),
                "times": [],
            }
        )
    for _ in range(timed):
        for r in runs:
            t = time.perf_counter()
            r["carry"] = r["step"](*r["carry"][:2], *r["xy"])
            jax.block_until_ready(r["carry"])
            r["times"].append(time.perf_counter() - t)
    return [
        {
            "optimizer": r["name"],
            "tokens_per_step": r["tokens"],
            "median_step_s": float(np.median(r["times"])),
            "tokens_per_s": float(r["tokens"] / np.median(r["times"])),
        }
        for r in runs
    ]


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.gpt2_step",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--batch-size", type=int, default=12, help="micro-batch of the 124M step")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--remat", action="store_true")
    p.add_argument("--timed", type=int, default=9, help="timed tiny steps per optimizer")
    p.add_argument("--skip-throughput", action="store_true")
    a = p.parse_args(argv)

    mib = 2**20
    rows = []
    print(
        f"GPT-2-124M, one step of {a.batch_size} x 1024 tokens, {a.dtype}"
        f"{', remat' if a.remat else ''}, backend {jax.default_backend()} (MiB)"
    )
    print(
        f"{'optimizer':<20} {'params':>8} {'opt state':>10} {'argument':>9} {'output':>8} "
        f"{'alias':>8} {'temp':>8} {'peak':>8}"
    )
    for opt, extra in CHOICES:
        r = memory_row(opt, extra, a.batch_size, a.dtype, a.remat)
        rows.append(r)
        cols = ("param", "opt_state", "argument", "output", "alias", "temp", "peak")
        widths = (8, 10, 9, 8, 8, 8, 8)
        cells = " ".join(
            f"{r[c + '_bytes'] / mib:>{w}.0f}" for c, w in zip(cols, widths, strict=True)
        )
        print(f"{r['optimizer']:<20} {cells}", flush=True)
    speed = []
    if not a.skip_throughput:
        print("\ntiny preset (8 x 64 tokens a step), median of timed steps after compilation")
        speed = throughput(CHOICES, a.timed)
        for r in speed:
            print(
                f"{r['optimizer']:<20} {r['tokens_per_s']:>8.0f} tokens/s "
                f"({r['median_step_s'] * 1e3:.0f} ms/step)",
                flush=True,
            )
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "setup": {
                    "batch_size": a.batch_size,
                    "block_size": 1024,
                    "dtype": a.dtype,
                    "remat": a.remat,
                    "backend": jax.default_backend(),
                    "devices": jax.device_count(),
                    "jax": jax.__version__,
                    "machine": platform.machine(),
                },
                "memory_124m": rows,
                "throughput_tiny": speed,
            },
            indent=2,
        )
    )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
