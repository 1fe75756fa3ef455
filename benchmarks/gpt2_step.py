"""Memory of one GPT-2-124M training step per optimizer (XLA-compiled, nothing allocated), plus
tiny-preset throughput: `python -m benchmarks.gpt2_step --out benchmarks/results/gpt2_step.json`.

For each optimizer choice of `examples.gpt2.train` the example's own jitted step
(`compile_stage`: donated params and optimizer state, clip -> optimizer, micro-batch
`--batch-size` x 1024) is lowered on abstract inputs (`jax.ShapeDtypeStruct`, `nnx.eval_shape`)
and compiled for this machine's backend;
`report.memory` gives argument / output / temp bytes and the peak (argument + temp, the outputs
aliasing the donated inputs). The optimizer-state
bytes come from the abstract state pytree. The OMGD optimizers are measured in their masking
stage (the state they hold after the AdamW warm-up). Then every optimizer trains the tiny preset
on random tokens in this process: tokens/s is the median of `--timed` steps after compilation.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import report
from examples.gpt2.config import Config, finalize
from examples.gpt2.model import get_config
from examples.gpt2.optimizers import stages, tree_bytes
from examples.gpt2.train import TrainState, abstract_model, compile_stage, init_params, make_mesh

MEMORY_PRESET, THROUGHPUT_PRESET = "gpt2-124m", "tiny"  # the tests use "nano" for both
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
    cfg = Config(preset=MEMORY_PRESET, optimizer=opt, batch_size=batch, grad_accum=1, dtype=dtype,
                 remat=remat, **extra)  # fmt: skip
    cfg = finalize(cfg)
    _, stage = _stage(cfg)
    x = jax.ShapeDtypeStruct((1, batch, cfg.block_size), jnp.int32)
    t = time.perf_counter()
    compiled = stage.step.lower(stage.abstract, x, x).compile()
    return {
        "table": "memory_124m",
        "optimizer": _name(opt, extra),
        "param_bytes": tree_bytes(stage.abstract.params),
        "opt_state_bytes": tree_bytes(stage.abstract.opt_state),
        **report.memory(compiled),  # peak_bytes = argument + temp (the one definition)
        "alias_bytes": int(compiled.memory_analysis().alias_size_in_bytes),
        "compile_s": round(time.perf_counter() - t, 1),
    }


def throughput(choices, timed):
    """Tiny-preset tokens/s per optimizer. All steps are compiled first, then timed in rounds
    (one step of each optimizer per round, `report.interleaved_medians`) so that a varying
    machine load hits all alike."""
    runs = {}
    for opt, extra in choices:
        cfg = finalize(Config(preset=THROUGHPUT_PRESET, optimizer=opt, warmup_masks=0, **extra))
        mcfg, stage = _stage(cfg)
        params = init_params(mcfg, 0)
        rng = np.random.default_rng(0)
        shape = (cfg.grad_accum, cfg.batch_size, cfg.block_size)
        x, y = (jnp.asarray(rng.integers(0, 50257, shape), jnp.int32) for _ in range(2))
        state, _ = stage.step(TrainState(params, stage.init(params)), x, y)  # compile + one step
        jax.block_until_ready(state)
        runs[_name(opt, extra)] = {"step": stage.step, "state": state, "xy": (x, y),
                                   "tokens": int(np.prod(shape))}  # fmt: skip

    def call(r):
        def one_step():
            r["state"], _ = r["step"](r["state"], *r["xy"])
            return r["state"]

        return one_step

    medians, _ = report.interleaved_medians(
        {name: call(r) for name, r in runs.items()}, timed, warmup=0
    )
    return [
        {
            "table": "throughput_tiny",
            "optimizer": name,
            "tokens_per_step": r["tokens"],
            "median_step_s": float(medians[name]),
            "tokens_per_s": float(r["tokens"] / medians[name]),
        }
        for name, r in runs.items()
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
    t0 = time.perf_counter()

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
    report.write(
        a.out,
        rows + speed,
        command=report.command_of("benchmarks.gpt2_step", argv),
        batch_size=a.batch_size,
        block_size=1024,
        dtype=a.dtype,
        remat=a.remat,
        timed=0 if a.skip_throughput else a.timed,
        tables={
            "memory_124m": "one GPT-2-124M step per optimizer, compiled on abstract inputs; "
            "peak_bytes = argument + temp bytes of the donated step (report.peak_bytes)",
            "throughput_tiny": "tiny preset, median of --timed interleaved rounds after "
            "compilation and one step",
        },
        wall_s=round(time.perf_counter() - t0, 1),
    )
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
