"""Memory of one GPT-2-124M training step per optimizer (XLA-compiled, nothing allocated), plus
tiny-preset throughput: `python -m benchmarks.gpt2_step --out benchmarks/results/gpt2_step.json`.

For each optimizer choice of `examples.gpt2.train` the example's own jitted step
(`compile_stage`: donated params and optimizer state, clip -> optimizer, micro-batch
`--batch-size` x 1024) is lowered on abstract inputs (`jax.ShapeDtypeStruct`, `nnx.eval_shape`)
and compiled for this machine's backend;
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

from examples.gpt2.config import Config, finalize
from examples.gpt2.model import get_config
from examples.gpt2.optimizers import stages, tree_bytes
from examples.gpt2.train import TrainState, abstract_model, compile_stage, init_params, make_mesh

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


def _stage(cfg):
    """The example's model config and compiled step in the run's last (masking) stage."""
    mcfg = get_config(cfg.preset, dtype=cfg.dtype, remat=cfg.remat)
    graphdef, params = abstract_model(mcfg)
    return mcfg, compile_stage(cfg, stages(cfg)[-1], graphdef, params, make_mesh())


def memory_row(opt, extra, batch, dtype, remat):
    cfg = Config(preset="gpt2-124m", optimizer=opt, batch_size=batch, grad_accum=1, dtype=dtype,
                 remat=remat, **extra)  # fmt: skip
    cfg = finalize(cfg)
    _, stage = _stage(cfg)
    x = jax.ShapeDtypeStruct((1, batch, cfg.block_size), jnp.int32)
    t = time.perf_counter()
    m = stage.step.lower(stage.abstract, x, x).compile().memory_analysis()
    row = {
        "optimizer": _name(opt, extra),
        "param_bytes": tree_bytes(stage.abstract.params),
        "opt_state_bytes": tree_bytes(stage.abstract.opt_state),
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
        mcfg, stage = _stage(cfg)
        params = init_params(mcfg, 0)
        rng = np.random.default_rng(0)
        shape = (cfg.grad_accum, cfg.batch_size, cfg.block_size)
        x, y = (jnp.asarray(rng.integers(0, 50257, shape), jnp.int32) for _ in range(2))
        state, _ = stage.step(TrainState(params, stage.init(params)), x, y)  # compile + one step
        jax.block_until_ready(state)
        runs.append(
            {
                "name": _name(opt, extra),
                "step": stage.step,
                "state": state,
                "xy": (x, y),
                "tokens": int(np.prod(shape)),
                "times": [],
            }
        )
    for _ in range(timed):
        for r in runs:
            t = time.perf_counter()
            r["state"], _ = r["step"](r["state"], *r["xy"])
            jax.block_until_ready(r["state"])
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
