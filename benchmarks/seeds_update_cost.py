"""What SkipUpdate, Magma and MoFaSGD save and cost next to AdamW, on the GPT-2-124M tree.

The tree is the GPT-2 example's own (``examples/gpt2/model.py``, built abstractly with
``nnx.eval_shape`` and filled with random values). For every optimizer: the optimizer-state
bytes (summed over the state pytree), the compiled memory of one jitted, donated
``update + apply_updates`` step (`report.memory`) and its median wall time, all optimizers
timed in turn, round after round, in one process (the machine is shared: compare the ratios,
not the milliseconds).

    python -m benchmarks.seeds_update_cost --out benchmarks/results/seeds_update_cost.json
"""

from __future__ import annotations

import argparse
import math
import re
import time

import jax
import optax
from flax import nnx

import omgd_jax
from benchmarks import host_memory, report
from benchmarks.update_cost import compile_step, records_of, time_interleaved
from examples.gpt2.model import GPT, get_config

ADAMW = dict(b1=0.9, b2=0.95, weight_decay=0.1)


def gpt2_124m_shapes(preset: str = "gpt2-124m") -> dict:
    """The parameter tree of the GPT-2 example as `jax.ShapeDtypeStruct` (nothing allocated)."""
    abstract = nnx.eval_shape(lambda: GPT(get_config(preset), nnx.Rngs(0)))
    return nnx.to_pure_dict(nnx.state(abstract, nnx.Param))


def decay_mask(params):
    return jax.tree.map(lambda x: x.ndim >= 2, params)


def optimizers() -> dict[str, optax.GradientTransformation]:
    lr = 6e-4
    out = {"adamw": optax.adamw(lr, mask=decay_mask, **ADAMW)}
    for traversal in ("iid", "wor"):
        out[f"skip_update(adamw,p=0.5,{traversal})"] = omgd_jax.skip_update_adamw(
            lr, 0.5, mask=decay_mask, traversal=traversal, **ADAMW
        )
        out[f"magma(adamw,p=0.5,{traversal})"] = omgd_jax.magma_adamw(
            lr, 0.5, mask=decay_mask, traversal=traversal, **ADAMW
        )
    for rank in (32, 128):
        # init="random": the factors' size and the step do not depend on the initialisation,
        # and 48 SVDs of GPT-2's matrices at init only slow the benchmark down.
        out[f"mofasgd(r={rank})"] = omgd_jax.mofasgd(
            0.02, rank, init="random", adamw_learning_rate=lr, adamw_weight_decay=0.1
        )
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the results as JSON to this file")
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per optimizer")
    parser.add_argument("--preset", default="gpt2-124m", help="GPT-2 example preset")
    parser.add_argument(
        "--only", default="", help="regex: measure only matching optimizers (adamw always runs)"
    )
    host_memory.add_argument(parser)
    args = parser.parse_args(argv)
    malloc = host_memory.configure(args.malloc)  # before JAX starts its CPU client
    t0 = time.perf_counter()

    shapes = gpt2_124m_shapes(args.preset)
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
    steps = {
        name: compile_step(tx, shapes)
        for name, tx in optimizers().items()
        if name == "adamw" or re.search(args.only, name)
    }
    medians, faults = time_interleaved(steps, shapes, args.repeats)
    records = records_of(steps, medians, faults)
    print(
        f"\nGPT-2 example tree ({args.preset}): {n_params / 1e6:.1f}M parameters, "
        f"jax {jax.__version__}, {jax.devices()[0].platform}, median of {args.repeats}, "
        f"malloc {malloc}"
    )
    print(f"{'optimizer':30s} {'update ms':>9s} {'x adamw':>7s} {'state MB':>9s} {'x adamw':>7s}")
    for r in records:
        print(
            f"{r['optimizer']:30s} {1e3 * r['update_s']:9.1f} {r['time_ratio']:7.2f} "
            f"{r['state_bytes'] / 2**20:9.1f} {r['state_ratio']:7.3f}"
        )
    return report.write(
        args.out,
        records,
        command=report.command_of("benchmarks.seeds_update_cost", argv),
        preset=args.preset,
        n_params=n_params,
        repeats=args.repeats,
        malloc=malloc,
        peak="argument + temp bytes of the donated step (report.peak_bytes)",
        timing="median of --repeats interleaved rounds, 2 untimed calls each first",
        wall_s=round(time.perf_counter() - t0, 1),
    )


if __name__ == "__main__":
    main()
