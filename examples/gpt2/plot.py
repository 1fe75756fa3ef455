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

from examples.gpt2.config import LAYER_OPTIMIZERS


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
    if opt in LAYER_OPTIMIZERS:
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


# offsets (points) tried for a point's label, nearest first: right, left, above, below, then the
# diagonals, on rings of growing radius; the first that overlaps nothing already drawn is taken
_RINGS = (6, 14, 24, 36, 50, 66, 84)
_ANGLES = (0, 180, 90, 270, 30, 150, 330, 210, 60, 120, 300, 240)


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def place_labels(ax, xs, ys, labels, *, fontsize: float = 7, obstacles=()) -> list:
    """Labels beside the points (xs[i], ys[i]) that overlap no other label, no point and stay in
    the axes, placed deterministically: points from the top down, each label at the first offset
    of `_RINGS` x `_ANGLES` that is free (a thin leader line once it sits away from its point);
    where none is free, the offset that overlaps least. `obstacles`: more display-space boxes to
    keep clear (error bars). Draw the data and fix the limits and layout first: offsets are in
    points, so a later change of the axes' size moves points but not their labels. Returns the
    labels' display-space boxes (matplotlib Bbox), in the order of `labels`."""
    import math

    from matplotlib.transforms import Bbox

    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    dpi = fig.dpi / 72.0
    frame = ax.get_window_extent(renderer)
    pts = ax.transData.transform(list(zip(xs, ys, strict=True)))
    marker = 4 * dpi  # half-size of a marker's box, pixels
    taken = [Bbox.from_extents(x - marker, y - marker, x + marker, y + marker) for x, y in pts]
    taken += list(obstacles)
    boxes = [None] * len(labels)
    order = sorted(range(len(labels)), key=lambda i: (-pts[i][1], pts[i][0], labels[i]))
    for i in order:
        probe = ax.text(0, 0, labels[i], fontsize=fontsize)
        ext = probe.get_window_extent(renderer)
        w, h = ext.width, ext.height
        probe.remove()
        best = None
        for r in _RINGS:
            for deg in _ANGLES:
                dx, dy = r * math.cos(math.radians(deg)), r * math.sin(math.radians(deg))
                ha = "left" if dx > 1e-9 else "right" if dx < -1e-9 else "center"
                va = "bottom" if dy > 1e-9 else "top" if dy < -1e-9 else "center"
                x0 = pts[i][0] + dx * dpi - {"left": 0, "right": w, "center": w / 2}[ha]
                y0 = pts[i][1] + dy * dpi - {"bottom": 0, "top": h, "center": h / 2}[va]
                box = Bbox.from_bounds(x0, y0, w, h)
                inside = (box.x0 >= frame.x0 and box.x1 <= frame.x1 and box.y0 >= frame.y0
                          and box.y1 <= frame.y1)  # fmt: skip
                hits = sum(_overlaps(box, t) for t in taken) + (0 if inside else 100)
                if best is None or hits < best[0]:
                    best = (hits, dx, dy, ha, va, r, box)
                if hits == 0:
                    break
            if best[0] == 0:
                break
        _, dx, dy, ha, va, r, box = best
        arrow = dict(arrowstyle="-", lw=0.5, color="0.5", shrinkA=0, shrinkB=3) if r > 14 else None
        ax.annotate(labels[i], (xs[i], ys[i]), xytext=(dx, dy), textcoords="offset points",
                    fontsize=fontsize, ha=ha, va=va, arrowprops=arrow)  # fmt: skip
        taken.append(box)
        boxes[i] = box
    return boxes


def plot_pareto(rows, out: str | Path, title: str | None = None, panels=None) -> Path:
    """Validation loss against peak step memory, one point per row, the Pareto front dashed.

    `rows`: dicts with `label`, `peak_bytes`, `val_loss` and optionally `val_loss_std` (drawn as
    an error bar). `panels`: ``[(key, panel title), ...]``, one panel per memory field of the
    rows, side by side on one loss axis (rows whose field is None are left out of that panel);
    default one panel of `peak_bytes`. Point labels never overlap (`place_labels`). Returns the
    PNG path; the labels' boxes per panel are in ``plot_pareto.last_label_boxes``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.transforms import Bbox

    panels = list(panels or [("peak_bytes", None)])
    fig, axes = plt.subplots(1, len(panels), figsize=(7.5 * len(panels), 6), dpi=120, sharey=True,
                             squeeze=False)  # fmt: skip
    axes = axes[0]
    loss = [r["val_loss"] for r in rows]
    tab20 = plt.get_cmap("tab20").colors
    colors = tab20[0::2] + tab20[1::2]  # the ten strong colours, then their light shades
    drawn = []
    for ax, (key, panel_title) in zip(axes, panels, strict=True):
        idx = [i for i, r in enumerate(rows) if r.get(key) is not None]
        mib = {i: rows[i][key] / 2**20 for i in idx}
        for i in idx:
            r = rows[i]
            ax.errorbar(mib[i], loss[i], yerr=r.get("val_loss_std"), fmt="o" if i < 10 else "s",
                        color=colors[i % len(colors)], capsize=3, label=r["label"])  # fmt: skip
        front = pareto_front([(mib[i], loss[i]) for i in idx])
        ax.plot([mib[idx[k]] for k in front], [loss[idx[k]] for k in front], "k--", lw=1,
                label="Pareto front")  # fmt: skip
        ax.set_xlabel("peak compiled memory of one train step, MiB (arguments + temporaries)")
        if panel_title:
            ax.set_title(panel_title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.margins(x=0.25, y=0.12)
        drawn.append((ax, idx, mib))
    axes[0].set_ylabel("final validation loss")
    handles, names = axes[0].get_legend_handles_labels()
    fig.suptitle(title or "validation loss against step memory")
    fig.legend(handles, names, loc="lower center", ncol=3 if len(panels) > 1 else 2, fontsize=7,
               frameon=False)  # fmt: skip
    legend_rows = -(-len(names) // (3 if len(panels) > 1 else 2))
    fig.tight_layout(rect=(0, 0.028 * legend_rows + 0.02, 1, 1))
    fig.canvas.draw()  # limits and layout fixed: labels are placed against the final geometry
    boxes = []
    for ax, idx, mib in drawn:
        bars = []
        for i in idx:
            std = rows[i].get("val_loss_std") or 0.0
            (x, y0), (_, y1) = ax.transData.transform([(mib[i], loss[i] - std),
                                                       (mib[i], loss[i] + std)])  # fmt: skip
            bars.append(Bbox.from_extents(x - 1, y0, x + 1, y1))
        short = [rows[i]["label"].split(" (")[0] for i in idx]
        boxes.append(place_labels(ax, [mib[i] for i in idx], [loss[i] for i in idx], short,
                                  obstacles=bars))  # fmt: skip
    plot_pareto.last_label_boxes = boxes
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=fig.dpi)
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
