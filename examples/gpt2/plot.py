"""Loss curves of several runs in one PNG: `python -m examples.gpt2.plot DIR [DIR ...] --out F.png`.

Each DIR is a training out dir (metrics.jsonl + config.json). Train loss is drawn as a solid
line, validation loss as dashed markers in the same colour; labels come from each run's config
(preset, optimizer and its OMGD settings). `plot_pareto` draws validation loss against step
memory, with the Pareto front (`make demo`, benchmarks/compare.py).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise SystemExit(f"error: {path} does not exist; is {run_dir} a training out dir?")
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def run_label(run_dir: str | Path) -> str:
    """'tiny adamw' or 'tiny omgd-layer (gamma=1, K=20, compact)' from the run's config.json."""
    path = Path(run_dir) / "config.json"
    if not path.exists():
        return Path(run_dir).name
    c = json.loads(path.read_text())
    label = f"{c['preset']} {c['optimizer']}"
    opt = c["optimizer"]
    if opt in ("omgd-layer", "lisa", "lisa-wor-noscale"):
        label += f" (gamma={c['layers_per_phase']}, K={c['steps_per_mask']}, {c['omgd_state']})"
    elif opt in ("omgd-element", "omgd-tensor"):
        label += f" (M={c['num_masks']}, K={c['steps_per_mask']}, {c['omgd_state']})"
    elif opt in ("galore", "golore", "mofasgd") and "rank" in c:
        label += f" (r={c['rank']})"
    elif opt == "sift" and "sparse_rate" in c:
        label += f" (rate={c['sparse_rate']})"
    elif opt.startswith(("skip-update", "magma")) and "keep_prob" in c:
        label += f" (p={c['keep_prob']})"
    return label


def plot_runs(run_dirs, out: str | Path, title: str | None = None) -> Path:
    """Draws train (solid) and val (dashed) loss of every run; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, d in enumerate(run_dirs):
        recs = read_metrics(d)
        color = f"C{i}"
        label = run_label(d)
        ax.plot(
            [r["step"] for r in recs],
            [r["loss"] for r in recs],
            color=color,
            label=f"{label} train",
        )
        val = [r for r in recs if r.get("val_loss") is not None]
        if val:
            ax.plot(
                [r["step"] for r in val],
                [r["val_loss"] for r in val],
                "o--",
                color=color,
                markersize=3,
                label=f"{label} val",
            )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title(title or "GPT-2 loss curves")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def pareto_front(points) -> list[int]:
    """Indices of the (memory, loss) points that no other point beats in both, by memory."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], float("inf")
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def plot_pareto(rows, out: str | Path, title: str | None = None) -> Path:
    """Validation loss against peak step memory, one point per row, the Pareto front dashed.

    `rows`: dicts with `label`, `peak_bytes`, `val_loss` and optionally `val_loss_std` (drawn as
    an error bar). Returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mib = [r["peak_bytes"] / 2**20 for r in rows]
    loss = [r["val_loss"] for r in rows]
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for i, r in enumerate(rows):
        color = f"C{i % 10}"
        marker = "o" if i < 10 else "s"
        ax.errorbar(mib[i], loss[i], yerr=r.get("val_loss_std"), fmt=marker, color=color,
                    capsize=3, label=r["label"])  # fmt: skip
        ax.annotate(r["label"].split(" (")[0], (mib[i], loss[i]), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")  # fmt: skip
    front = pareto_front(list(zip(mib, loss, strict=True)))
    ax.plot([mib[i] for i in front], [loss[i] for i in front], "k--", lw=1, label="Pareto front")
    ax.set_xlabel("peak compiled memory of one train step, MiB (arguments + temporaries)")
    ax.set_ylabel("final validation loss")
    ax.set_title(title or "validation loss against step memory")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m examples.gpt2.plot", description=__doc__)
    p.add_argument("runs", nargs="+", help="training out dirs")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--title")
    a = p.parse_args(argv)
    print(plot_runs(a.runs, a.out, a.title))


if __name__ == "__main__":
    main()
