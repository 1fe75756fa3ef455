"""Optimizer-state bytes of the baselines (LISA, GaLore, GoLore, SIFT) on the GPT-2-124M tree.

The parameter tree is built abstractly from `examples/gpt2/model.py` (`nnx.eval_shape`, no
arrays), every optimizer's state by `jax.eval_shape(tx.init, params)`, and its bytes are the
sum of size x itemsize over the state's leaves (the pytree, not a formula). Beside each, the
SPEC §4 arithmetic for the same layout (`formula_bytes`, counters and keys left out) as a
cross-check, and the part of the state that belongs to the transformer blocks (state leaves
whose key path has a `blocks` entry).

    python -m benchmarks.baseline_state --out benchmarks/results/baseline_state.json
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
from benchmarks import report
from examples.gpt2.model import GPT, get_config
from omgd_jax._src.layers import path_str

LR = 6e-4
ADAMW = dict(b1=0.9, b2=0.95, weight_decay=0.1)
RANK = 128
BLOCK_KERNELS = r"^blocks/.*kernel"  # GaLore projects the blocks' linear maps, per layer
LISA = dict(layers=r"^blocks/", layers_per_phase=3, steps_per_mask=100)


def gpt2_params(preset: str = "gpt2-124m"):
    model = nnx.eval_shape(lambda: GPT(get_config(preset), nnx.Rngs(0)))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def state_bytes(tree) -> int:
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def blocks_bytes(tree) -> int:
    """Bytes of the state leaves that belong to the transformer blocks (by key path)."""
    with_path, _ = jax.tree_util.tree_flatten_with_path(tree)
    return sum(
        math.prod(x.shape) * x.dtype.itemsize
        for p, x in with_path
        if "blocks" in path_str(p).split("/")
    )


def leaves_with_names(params):
    with_path, _ = jax.tree_util.tree_flatten_with_path(params)
    return [(path_str(p), x) for p, x in with_path]


def formula(params, kind: str, **kw) -> int:
    """SPEC §4's arithmetic (fp32, 4 bytes a float), counters and PRNG keys left out."""
    total = 0
    for name, x in leaves_with_names(params):
        n = math.prod(x.shape)
        if kind == "adamw":
            total += 2 * n
        elif kind == "lisa":  # embeddings etc. always, gamma of N_L stacked layers
            stacked = name.startswith("blocks/")
            total += 2 * (n * kw["gamma"] // x.shape[0] if stacked else n)
        elif kind == "galore":
            if re.search(BLOCK_KERNELS, name):
                layers, m, k = x.shape
                small, large = min(m, k), max(m, k)
                if kw["side"] == "paper":  # P over the smaller side: mr + 2nr for m <= n
                    total += layers * (small * RANK + 2 * large * RANK)
                else:  # optax: P over the larger side
                    total += layers * (large * RANK + 2 * small * RANK)
            else:
                total += 2 * n
        elif kind == "optax-galore":  # every 2-D leaf projected (rank capped), the rest Adam
            if x.ndim == 2:
                small, large = sorted(x.shape)
                r = min(RANK, small)
                total += large * r + 2 * small * r
            else:
                total += 2 * n
        elif kind == "sift":  # int32 index + two moments per trained entry
            rows = x.shape[0] if name.startswith("blocks/") else 1
            total += 3 * rows * math.ceil(kw["rate"] * (n // rows))
        elif kind == "element":
            total += 2 * math.ceil(n / kw["num_masks"])
    return 4 * total


def optimizers() -> dict[str, tuple[optax.GradientTransformation, int]]:
    params = gpt2_params()
    lisa = dict(**LISA, **ADAMW)
    galore = dict(rank=RANK, update_proj_gap=200, scale=0.25, leaves=BLOCK_KERNELS)
    return {
        "adamw": (optax.adamw(LR, **ADAMW), formula(params, "adamw")),
        "lisa (gamma=3 of 12, compact)": (
            omgd_jax.lisa(LR, **lisa),
            formula(params, "lisa", gamma=3),
        ),
        "lisa_wor (gamma=3 of 12, compact)": (
            omgd_jax.lisa_wor(LR, **lisa),
            formula(params, "lisa", gamma=3),
        ),
        "omgd-element (compact, M=4)": (
            omgd_jax.omgd_adamw(LR, num_masks=4, steps_per_mask=100, **ADAMW),
            formula(params, "element", num_masks=4),
        ),
        "galore r=128, paper side (block kernels per layer)": (
            omgd_jax.galore(LR, projector_side="paper", weight_decay=0.1, **galore),
            formula(params, "galore", side="paper"),
        ),
        "galore r=128, optax side (block kernels per layer)": (
            omgd_jax.galore(LR, projector_side="optax", weight_decay=0.1, **galore),
            formula(params, "galore", side="optax"),
        ),
        "optax.contrib.galore r=128 as is (every 2-D leaf)": (
            omgd_jax.galore(LR, rank=RANK, projector_side="optax", weight_decay=0.1),
            formula(params, "optax-galore"),
        ),
        "golore r=128, paper side (block kernels per layer)": (
            omgd_jax.golore(LR, projector_side="paper", weight_decay=0.1, **galore),
            formula(params, "galore", side="paper"),
        ),
        "sift rate=0.1 (every weight; per layer in blocks)": (
            omgd_jax.sift(LR, 0.1, stacked=r"^blocks/", weight_decay=0.1),
            formula(params, "sift", rate=0.1),
        ),
        "sift rate=0.2 (every weight; per layer in blocks)": (
            omgd_jax.sift(LR, 0.2, stacked=r"^blocks/", weight_decay=0.1),
            formula(params, "sift", rate=0.2),
        ),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    params = gpt2_params()
    num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    rows = []
    for name, (tx, expected) in optimizers().items():
        state = jax.eval_shape(tx.init, params)
        rows.append(
            dict(
                method=name,
                state_bytes=state_bytes(state),
                blocks_state_bytes=blocks_bytes(state),
                formula_bytes=expected,
            )
        )
    adamw = rows[0]["state_bytes"]
    for row in rows:
        row["x_adamw"] = row["state_bytes"] / adamw
    doc = report.write(
        args.out,
        rows,
        command=report.command_of("benchmarks.baseline_state", argv),
        model="gpt2-124m (examples/gpt2/model.py, vocab 50304, blocks stacked on axis 0)",
        num_params=num_params,
        dtype="float32",
        measured_by="sum of size*itemsize over jax.tree.leaves(jax.eval_shape(tx.init, params))",
        wall_s=round(time.perf_counter() - t0, 1),
    )
    width = max(len(r["method"]) for r in rows)
    for r in rows:
        print(
            f"{r['method']:<{width}}  {r['state_bytes'] / 2**20:9.1f} MiB  "
            f"{r['x_adamw']:.3f} x AdamW  blocks {r['blocks_state_bytes'] / 2**20:7.1f} MiB  "
            f"(formula {r['formula_bytes'] / 2**20:9.1f} MiB)"
        )
    return doc


if __name__ == "__main__":
    main()
