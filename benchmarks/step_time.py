"""Wall time of whole training steps: AdamW against the lean OMGD-layer step, interleaved.

    python -m benchmarks.step_time --out benchmarks/results/step_time.json

Every step is jitted with the parameters and optimizer state donated and the rows run in turn
in one process (round r: AdamW, then the OMGD rows), so load that comes and goes hits all
alike; the ratio is taken per round and its median reported with the spread. Same activation
policy on every row (``--remat``: per-layer remat; default: none, the lean step keeping each
layer's linearisation residuals). OMGD-layer is `omgd_adamw(granularity="layer")` under
`omgd_jax.lean_train_step`: the backward of an inactive block computes only its input
cotangent, and only the active blocks are updated; OMGD-layer-rotate adds the embedding and
the head to the traversal as units (``units=``): a layers phase then does no work below its
lowest active layer, a head phase no backward through the blocks. The OMGD rows change phase
every step and a round is one cycle of the rotate row (N_L / gamma + its units' phases), so
every kind of phase is timed in its share of the cycle.

Beside the times, every record has the step's matmul FLOPs counted on its jaxpr
(`benchmarks.flops`, dead code left out, the lean step's phases and its backward's loops over
inactive layers weighted by their share of a cycle, `flops.lean_cycle_shares`): their ratio is
what a compute-bound step could reach.
``--malloc hold`` (the default) keeps freed host memory so XLA:CPU's per-call buffers do not
page-fault anew (`benchmarks.host_memory`); ``--malloc default`` leaves glibc as it is.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import omgd_jax
from benchmarks import flops, host_memory, report

LAYERS = r"^blocks/"
# The embedding and head as units of the traversal (`omgd-layer-rotate`): GPT-2's tied wte is
# one unit, Llama's embed and untied head two.
ROTATE = r"^(embed|head|wte)/"


class Setup(NamedTuple):
    name: str
    family: str  # "gpt2" or "llama": which example model
    cfg: Any
    batch: tuple[int, int]
    gamma: int


def setups(remat: bool):
    """The models timed (`Setup`)."""
    from examples.gpt2.model import get_config
    from examples.llama.model import get_config as llama_config

    # GPT-2-124M: the tied 50304 x 768 embedding is 31% of the parameters.
    yield Setup("gpt2-124m 1x1024", "gpt2", get_config("gpt2-124m", remat=remat), (1, 1024), 3)
    # Blocks dominate: 8 blocks of width 512 on a 256-token vocabulary (byte-level).
    small = get_config(
        "gpt2-124m", n_layer=8, n_head=8, n_embd=512, block_size=256, vocab_size=256, remat=remat
    )
    yield Setup("blocks-heavy 8x512 4x256", "gpt2", small, (4, 256), 2)
    # LLaMA-style (RMSNorm, SwiGLU, rope, untied head), blocks dominating: issue 19's preset.
    llama = llama_config(
        "llama-7b", n_layer=16, n_head=8, dim=512, hidden=1376, vocab_size=512, max_len=256,
        remat=remat,
    )  # fmt: skip
    yield Setup("llama-style 16x512 v512 4x256", "llama", llama, (4, 256), 2)


def _model(setup: Setup):
    if setup.family == "llama":
        from examples.llama.model import Llama as model
        from examples.llama.model import loss_fn
    else:
        from examples.gpt2.model import GPT as model
        from examples.gpt2.model import loss_fn
    return model(setup.cfg, nnx.Rngs(0)), loss_fn


def build(setup: Setup):
    """params and {method: (jitted step, tx, number of extra units)}.

    OMGD rows change phase every step (``steps_per_mask=1``), so a round of `cycle_length`
    steps walks a whole cycle of the rotate row: its embedding and head phases are timed in
    their share."""
    model, loss_fn = _model(setup)
    graphdef, params = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(params)

    def loss_of(p, x, y):
        return loss_fn(nnx.merge(graphdef, p), x, y)

    adam = dict(b1=0.9, b2=0.95, weight_decay=0.1)
    adamw = optax.adamw(1e-4, **adam)
    layer = dict(granularity="layer", layers=LAYERS, layers_per_phase=setup.gamma,
                 steps_per_mask=1)  # fmt: skip
    tx = omgd_jax.omgd_adamw(1e-4, **adam, **layer)
    rotate = omgd_jax.omgd_adamw(1e-4, **adam, **layer, units=ROTATE)
    num_extra = len(extra_units(params))
    lean = omgd_jax.lean_train_step(loss_of, tx, layers=LAYERS)
    lean_rotate = omgd_jax.lean_train_step(loss_of, rotate, layers=LAYERS, units=ROTATE)
    g = setup.gamma
    return params, {
        "adamw": (jax.jit(omgd_jax.train_step(loss_of, adamw), donate_argnums=(0, 1)), adamw, 0),
        f"omgd-layer lean (gamma={g})": (jax.jit(lean, donate_argnums=(0, 1)), tx, 0),
        f"omgd-layer-rotate lean (gamma={g})": (
            jax.jit(lean_rotate, donate_argnums=(0, 1)),
            rotate,
            num_extra,
        ),
    }


def extra_units(params) -> set[str]:
    """The units ROTATE makes of ``params``' leaves (one per distinct match)."""
    pattern = re.compile(ROTATE)
    found = set()
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        m = pattern.search(jax.tree_util.keystr(path, simple=True, separator="/"))
        if m:
            found.add(m.group(1))
    return found


def cycle_length(setup: Setup, num_extra: int) -> int:
    """Phases in a cycle of the rotate row: N_L / gamma layer phases and one per extra unit."""
    return setup.cfg.n_layer // setup.gamma + num_extra


def step_flops(setup: Setup) -> dict[str, float]:
    """Matmul FLOPs of every step (abstract inputs), averaged over a cycle's phases
    (`flops.lean_cycle_shares`)."""
    params, steps = build(setup)
    xs = jax.ShapeDtypeStruct(setup.batch, jnp.int32)
    out = {}
    for name, (step, tx, extra) in steps.items():
        weights = flops.lean_cycle_shares(setup.cfg.n_layer, setup.gamma, extra)
        state = jax.eval_shape(tx.init, params)
        out[name] = flops.count(step, params, state, xs, xs, cond_weights=weights)
    return out


def measure(setup: Setup, rounds: int):
    """Seconds per step of every row, interleaved rounds of one rotate cycle each
    (`report.interleaved_medians`, two untimed cycles each first: compile and warm up)."""
    params, steps = build(setup)
    cycle = cycle_length(setup, max(extra for _, _, extra in steps.values()))
    x = jax.random.randint(jax.random.key(1), setup.batch, 0, setup.cfg.vocab_size)
    y = jnp.roll(x, -1, axis=1)
    live = {}
    for name, (step, tx, _) in steps.items():
        p = jax.tree.map(jnp.copy, params)
        live[name] = [step, p, tx.init(p)]

    def run(entry):
        def call():
            entry[1], entry[2], loss = entry[0](entry[1], entry[2], x, y)
            return loss

        return call

    runs = {name: run(entry) for name, entry in live.items()}
    _, times = report.interleaved_medians(runs, rounds, warmup=2 * cycle, steps=cycle)
    return times, cycle


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="write the records as JSON to this file")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds (median)")
    parser.add_argument("--remat", action="store_true", help="per-layer remat on both rows")
    parser.add_argument("--only", default=None, help="setups whose name contains this string")
    host_memory.add_argument(parser)
    args = parser.parse_args(argv)
    malloc = host_memory.configure(args.malloc)  # before JAX starts its CPU client
    t0 = time.perf_counter()
    records = []
    for setup in setups(args.remat):
        if args.only and args.only not in setup.name:
            continue
        times, cycle = measure(setup, args.rounds)
        counted = step_flops(setup)
        for name, ts in times.items():
            ratios = report.round_ratios(times, name, "adamw")
            records.append(
                {
                    "model": setup.name,
                    "method": name,
                    "steps_per_round": cycle,
                    "remat": args.remat,
                    "median_s": statistics.median(ts),
                    "ratio_to_adamw": report.median_ratio(times, name, "adamw"),
                    "ratio_min": min(ratios),
                    "ratio_max": max(ratios),
                    "matmul_flops": counted[name],
                    "flop_ratio_to_adamw": counted[name] / counted["adamw"],
                }
            )
    print(f"malloc: {malloc}")
    print("| model | method | median ms | x AdamW (median) | range | matmul FLOPs x AdamW |")
    print("|---|---|---|---|---|---|")
    for r in records:
        print(
            f"| {r['model']} | {r['method']} | {1e3 * r['median_s']:.0f} | "
            f"{r['ratio_to_adamw']:.2f} | {r['ratio_min']:.2f}-{r['ratio_max']:.2f} | "
            f"{r['flop_ratio_to_adamw']:.3f} |"
        )
    return report.write(
        args.out,
        records,
        command=report.command_of("benchmarks.step_time", argv),
        rounds=args.rounds,
        remat=args.remat,
        malloc=malloc,
        timing="median of --rounds interleaved rounds (AdamW, then the OMGD rows), each a block "
        "of steps_per_round steps (one cycle of the rotate row; OMGD rows change phase every "
        "step), two untimed cycles each first; ratio_to_adamw = median of the per-round ratios",
        wall_s=round(time.perf_counter() - t0, 1),
    )


if __name__ == "__main__":
    main()
