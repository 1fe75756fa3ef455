"""What an OMGD update costs next to AdamW's, on the GPT-2-124M parameter tree (CPU, jit).

For every optimizer: the median wall time of one jitted `update + apply_updates` step with the
parameters and optimizer state donated, the optimizer-state bytes (from the state pytree), and
the XLA-compiled memory of the step (`report.memory`: peak = argument + temp bytes of the
donated step).
Everything runs in one process, side by side, and is reported relative to AdamW. The tree is the
GPT-2 example's model (`nnx.eval_shape`), the optimizers are the example's at the gpt2-124m
preset (`base_optimizer`: AdamW with its decay mask and schedule, or OMGD around it; the
gradient clipping before them is left out, as it costs every row the same).

    python -m benchmarks.update_cost --out benchmarks/results/update_cost.json

``--malloc hold`` (the default) keeps freed host memory in the process, so the temporary
buffer XLA:CPU allocates on every call does not page-fault anew each time (see
`benchmarks.host_memory`); ``--malloc default`` measures glibc as it comes. The minor page
faults per call are recorded beside every time.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import omgd_jax
from benchmarks import host_memory, report
from examples.gpt2.config import Config, finalize
from examples.gpt2.model import get_config
from examples.gpt2.optimizers import (
    BLOCKS,
    adamw_kwargs,
    base_optimizer,
    lr_schedule,
    tree_bytes,
)
from examples.gpt2.train import abstract_model

LEAN = "omgd(adamw,layer,3/12) lean"


def gpt2_shapes(n_layer: int = 12) -> dict:
    """The GPT-2-124M parameter tree of the example's model (blocks stacked on axis 0), abstract."""
    return abstract_model(get_config("gpt2-124m", n_layer=n_layer))[1]


def optimizers() -> dict[str, optax.GradientTransformation]:
    """The example's optimizers (gpt2-124m preset, masking from the first step)."""

    def cfg(**kw):
        return finalize(Config(preset="gpt2-124m", warmup_masks=0, **kw))

    adamw = cfg()
    out = {"adamw": base_optimizer(adamw, "adamw")}
    out["mask(element,M=4)+adamw"] = optax.chain(
        omgd_jax.omgd_mask(4, adamw.steps_per_mask),
        optax.adamw(lr_schedule(adamw), **adamw_kwargs(adamw)),
    )
    for m in (2, 4, 8):
        out[f"omgd(adamw,element,M={m})"] = base_optimizer(
            cfg(optimizer="omgd-element", num_masks=m), "omgd"
        )
    out["omgd(adamw,layer,3/12)"] = base_optimizer(cfg(optimizer="omgd-layer"), "omgd")
    # The same optimizer under the lean step: [gamma, ...] gradients in, gamma layers written.
    out[LEAN] = out["omgd(adamw,layer,3/12)"]
    out["omgd(adamw,layer,3/12,frozen)"] = base_optimizer(
        cfg(optimizer="omgd-layer", omgd_state="frozen"), "omgd"
    )
    return out


def compile_step(tx, shapes, lean: bool = False) -> dict:
    """Compiles one donated `update + apply_updates` step on abstract inputs.

    ``lean``: the update of `omgd_jax.lean_train_step` (gradients for the active layers only,
    handed to ``tx`` with ``layer_ids=LayerIds(ids, N_L)``, updated layers written into the
    donated stack in place). Memory: `report.memory` (peak = argument + temp bytes).
    """

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    def lean_step(params, state, grads):
        ids = omgd_jax.active_layers(state)
        view = omgd_jax.layer_view(params, ids, layers=BLOCKS)
        depth = jax.tree.leaves(params["blocks"])[0].shape[0]
        layer_ids = omgd_jax.LayerIds(ids, depth)
        updates, state = tx.update(grads, state, view, layer_ids=layer_ids)
        return omgd_jax.apply_layer_updates(params, view, updates, ids, layers=BLOCKS), state

    state_shapes = jax.eval_shape(tx.init, shapes)
    grad_shapes = shapes
    if lean:
        ids = jax.eval_shape(omgd_jax.active_layers, state_shapes)
        grad_shapes = jax.eval_shape(
            lambda p, i: omgd_jax.layer_view(p, i, layers=BLOCKS), shapes, ids
        )
    compiled = report.compile_step(lean_step if lean else step, shapes, state_shapes, grad_shapes)
    return {
        "compiled": compiled,
        "init": jax.jit(tx.init),
        "grad_shapes": grad_shapes,
        "state_bytes": tree_bytes(state_shapes),
        **report.memory(compiled),
        "alias_bytes": int(compiled.memory_analysis().alias_size_in_bytes),
    }


def _normal(shapes, scale: float, seed: int):
    """Host arrays shaped like ``shapes``, normal with standard deviation ``scale``."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: (scale * rng.standard_normal(s.shape, np.float32)).astype(s.dtype), shapes
    )


def time_interleaved(steps: dict, shapes, repeats: int) -> tuple[dict, dict]:
    """Median step time and minor page faults per call of every optimizer, timed in turn,
    round after round (`report.interleaved_times`, two untimed calls each first: the first
    calls pay for allocation). Interleaving spreads any slow-down of the machine over all alike.
    """
    # NumPy draws the inputs: their values do not change the cost of an elementwise update,
    # and XLA's threefry costs more than the timed steps on a -O0 test run.
    grads = {
        name: jax.device_put(_normal(step["grad_shapes"], 1e-3, seed=1))
        for name, step in steps.items()
    }
    host_params = _normal(shapes, 0.02, seed=0)
    live = {}
    for name, step in steps.items():
        params = jax.tree.map(jnp.array, host_params)  # a copy each: the steps donate them
        live[name] = (params, step["init"](params))

    def run(name):
        def call():
            live[name] = steps[name]["compiled"](*live[name], grads[name])
            return live[name]

        return call

    times, faults = report.interleaved_times(
        {name: run(name) for name in steps}, repeats, warmup=2, counter=host_memory.minor_faults
    )
    return report.medians(times), {name: statistics.mean(f) for name, f in faults.items()}


def records_of(steps: dict, medians: dict, faults: dict) -> list[dict]:
    """One record per optimizer (``optimizer`` names it), with the ratios to AdamW's."""
    rows = {}
    for name, step in steps.items():
        rows[name] = {k: v for k, v in step.items() if k not in ("compiled", "init", "grad_shapes")}
        rows[name]["update_s"] = medians[name]
        rows[name]["minor_faults_per_call"] = faults[name]
    add_ratios(rows)
    return [{"optimizer": name, **row} for name, row in rows.items()]


def add_ratios(rows: dict) -> None:
    """Adds each row's time and state-bytes ratios to the "adamw" row's."""
    base = rows["adamw"]
    for r in rows.values():
        r["time_ratio"] = r["update_s"] / base["update_s"]
        r["state_ratio"] = r["state_bytes"] / base["state_bytes"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the results as JSON to this file")
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per optimizer")
    parser.add_argument("--layers", type=int, default=12, help="transformer layers (12: 124M)")
    parser.add_argument(
        "--only",
        default="",
        help="regex: measure only matching optimizers (adamw, the baseline, always runs)",
    )
    host_memory.add_argument(parser)
    args = parser.parse_args(argv)
    malloc = host_memory.configure(args.malloc)  # before JAX starts its CPU client
    t0 = time.perf_counter()

    shapes = gpt2_shapes(args.layers)
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
    steps = {}
    for name, tx in optimizers().items():
        if name == "adamw" or re.search(args.only, name):
            steps[name] = compile_step(tx, shapes, lean=name == LEAN)
    medians, faults = time_interleaved(steps, shapes, args.repeats)
    records = records_of(steps, medians, faults)
    header = (
        f"{'optimizer':34s} {'update ms':>9s} {'x adamw':>7s} {'state MB':>9s} "
        f"{'x adamw':>7s} {'XLA temp MB':>11s} {'faults/call':>11s}"
    )
    print(
        f"\nGPT-2 tree: {n_params / 1e6:.1f}M parameters, jax {jax.__version__}, "
        f"{jax.devices()[0].platform}, malloc {malloc}"
    )
    print(header)
    for r in records:
        print(
            f"{r['optimizer']:34s} {1e3 * r['update_s']:9.1f} {r['time_ratio']:7.2f} "
            f"{r['state_bytes'] / 2**20:9.1f} {r['state_ratio']:7.3f} "
            f"{r['temp_bytes'] / 2**20:11.1f} {r['minor_faults_per_call']:11.0f}"
        )
    return report.write(
        args.out,
        records,
        command=report.command_of("benchmarks.update_cost", argv),
        n_params=n_params,
        layers=args.layers,
        repeats=args.repeats,
        malloc=malloc,
        peak="argument + temp bytes of the donated step (report.peak_bytes)",
        timing="median of --repeats interleaved rounds, 2 untimed calls each first",
        wall_s=round(time.perf_counter() - t0, 1),
    )


if __name__ == "__main__":
    main()
