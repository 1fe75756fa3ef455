"""Wall time of whole training steps: AdamW against the lean OMGD-layer step, interleaved.

    python -m benchmarks.step_time --out benchmarks/results/step_time.json

Both steps are jitted with the parameters and optimizer state donated and run in turn in one
process (round r: AdamW, then OMGD), so load that comes and goes hits both alike; the ratio is
taken per round and its median reported with the spread. Same activation policy on both rows
(``--remat``: per-layer remat for both; default: none for either, the lean step keeping each
layer's linearisation residuals). OMGD-layer is `omgd_adamw(granularity="layer")` under
`omgd_jax.lean_train_step`: the backward of an inactive block computes only its input
cotangent, and only the active blocks are updated.

Beside the times, every record has the step's matmul FLOPs counted on its jaxpr
(`benchmarks.flops`, dead code left out, the lean backward's branch weighted by the share of
active layers): their ratio is what a compute-bound step could reach. ``--malloc hold`` (the
default) keeps freed host memory so XLA:CPU's per-call buffers do not page-fault anew
(`benchmarks.host_memory`); ``--malloc default`` leaves glibc as it is.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import omgd_jax
from benchmarks import flops, host_memory, report

LAYERS = r"^blocks/"


def setups(remat: bool):
    """(name, config, batch, gamma)."""
    from examples.gpt2.model import get_config

    # GPT-2-124M: the tied 50304 x 768 embedding is 31% of the parameters and always trained.
    yield "gpt2-124m 1x1024", get_config("gpt2-124m", remat=remat), (1, 1024), 3
    # Blocks dominate: 8 blocks of width 512 on a 256-token vocabulary (byte-level).
    small = get_config(
        "gpt2-124m", n_layer=8, n_head=8, n_embd=512, block_size=256, vocab_size=256, remat=remat
    )
    yield "blocks-heavy 8x512 4x256", small, (4, 256), 2


def build(cfg, gamma):
    from examples.gpt2.model import GPT, loss_fn

    model = GPT(cfg, nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(params)

    def loss_of(p, x, y):
        return loss_fn(nnx.merge(graphdef, p), x, y)

    adam = dict(b1=0.9, b2=0.95, weight_decay=0.1)
    adamw = optax.adamw(1e-4, **adam)

    tx = omgd_jax.omgd_adamw(
        1e-4, **adam, granularity="layer", layers=LAYERS, layers_per_phase=gamma, steps_per_mask=100
    )
    lean = omgd_jax.lean_train_step(loss_of, tx, layers=LAYERS)
    return params, {
        "adamw": (jax.jit(omgd_jax.train_step(loss_of, adamw), donate_argnums=(0, 1)), adamw),
        f"omgd-layer lean (gamma={gamma})": (jax.jit(lean, donate_argnums=(0, 1)), tx),
    }


def step_flops(cfg, batch, gamma) -> dict[str, float]:
    """Matmul FLOPs of every step (abstract inputs)."""
    params, steps = build(cfg, gamma)
    xs = jax.ShapeDtypeStruct(batch, jnp.int32)
    weights = flops.lean_layer_shares(cfg.n_layer, gamma)
    out = {}
    for name, (step, tx) in steps.items():
        state = jax.eval_shape(tx.init, params)
        out[name] = flops.count(step, params, state, xs, xs, cond_weights=weights)
    return out


def measure(cfg, batch, gamma, rounds):
    """Seconds per step of every row, interleaved rounds (`report.interleaved_medians`, two
    untimed calls each first: compile and warm up)."""
    params, steps = build(cfg, gamma)
    x = jax.random.randint(jax.random.key(1), batch, 0, cfg.vocab_size)
    y = jnp.roll(x, -1, axis=1)
    live = {}
    for name, (step, tx) in steps.items():
        p = jax.tree.map(jnp.copy, params)
        live[name] = [step, p, tx.init(p)]

    def run(entry):
        def call():
            entry[1], entry[2], loss = entry[0](entry[1], entry[2], x, y)
            return loss

        return call

    runs = {name: run(entry) for name, entry in live.items()}
    _, times = report.interleaved_medians(runs, rounds, warmup=2)
    return times


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
    for model, cfg, batch, gamma in setups(args.remat):
        if args.only and args.only not in model:
            continue
        times = measure(cfg, batch, gamma, args.rounds)
        counted = step_flops(cfg, batch, gamma)
        for name, ts in times.items():
            ratios = report.round_ratios(times, name, "adamw")
            records.append(
                {
                    "model": model,
                    "method": name,
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
        timing="median of --rounds interleaved rounds (AdamW, then OMGD), 2 untimed calls "
        "each first; ratio_to_adamw = median of the per-round ratios",
        wall_s=round(time.perf_counter() - t0, 1),
    )


if __name__ == "__main__":
    main()
