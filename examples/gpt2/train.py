"""Train GPT-2 with AdamW, OMGD (layer / element / tensor) or LISA: `python -m examples.gpt2.train`.

    python -m examples.gpt2.train --preset tiny --optimizer omgd-layer --steps 400 \
        --data data/sotu --out-dir runs/tiny-omgd

Where things are: the model is `model.py`, the optimizers `optimizers.py`, the flags `config.py`,
the data `loader.py`, checkpoints `checkpoint.py`; here are the train step (`train_step`, jitted
once per optimizer stage by `compile_stage`) and the loop (`train`).

One jitted step = one optimizer step over `grad_accum` micro-batches (a `lax.scan` accumulates the
gradient), so OMGD's phases and the learning-rate schedule count optimizer steps. The gradient is
clipped to global norm 1 before the OMGD mask. With `--omgd-state compact` masking starts after
`--warmup-masks` plain AdamW steps: the run then switches to the OMGD optimizer (its state starts
from zero on the active share, its schedule is shifted so the learning rate follows the global
step); checkpoints record the stage. With `--omgd-state frozen` the library's `warmup_steps`
does the warm-up instead.

Outputs in --out-dir: config.json; metrics.jsonl, one JSON per logged step (`loss` is the mean
train loss since the previous record, `val_loss` on evaluation steps); TensorBoard events (tb/);
Orbax checkpoints (checkpoints/) every --checkpoint-every steps, at the end and on SIGTERM.
`--resume` continues bit-for-bit: params, optimizer state (incl. OMGD's mask key and counters),
the data position (the reshuffled-epoch iterator's step) and the stage (AdamW warm-up or OMGD).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import omgd_jax
from benchmarks import report
from examples.gpt2.checkpoint import Checkpointer, SigtermFlag, resume_point
from examples.gpt2.config import Config, ConfigError, build_parser, finalize, parse_args
from examples.gpt2.model import GPT, GPTConfig, get_config, loss_fn
from examples.gpt2.optimizers import (
    BLOCKS,
    LAYER_OPTIMIZERS,
    grad_norm,
    lr_schedule,
    make_optimizer,
    stage_at,
    stages,
    tree_bytes,
    unit_kwargs,
)

# ----------------------------------------------------------------------------- model


def model_config(cfg: Config) -> GPTConfig:
    """The network a (finalized) run trains: its preset with --dtype, --remat, --vocab-size."""
    return get_config(cfg.preset, dtype=cfg.dtype, remat=cfg.remat, vocab_size=cfg.vocab_size)


def init_params(mcfg: GPTConfig, seed: int):
    """The model's parameters as a pure dict (`nnx.Param` state), freshly initialised."""
    return nnx.to_pure_dict(nnx.state(GPT(mcfg, nnx.Rngs(seed)), nnx.Param))


def abstract_model(mcfg: GPTConfig, seed: int = 0):
    """(graphdef, abstract params): the model's structure and parameter shapes; nothing is
    allocated."""
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: GPT(mcfg, nnx.Rngs(seed))))
    return graphdef, jax.eval_shape(functools.partial(init_params, mcfg, seed))


# ----------------------------------------------------------------------------- data


def open_data(cfg: Config, vocab_size: int):
    """Train / val `TokenDataset`s and the resumable train iterator (one global batch a step).

    Training batches walk the split in reshuffled epochs (`EpochBatches`, random reshuffling as in
    the paper's analysis); the whole data position is the iterator's step, saved in checkpoints.
    Bad data (missing, empty, smaller than one batch, ids beyond the vocabulary) exits with a
    sentence.
    """
    from examples.gpt2.loader import EpochBatches, TokenDataset

    n = cfg.batch_size * cfg.grad_accum
    try:
        train_ds, val_ds = TokenDataset(cfg.data, "train"), TokenDataset(cfg.data, "val")
        it = EpochBatches(train_ds, n, cfg.block_size, seed=cfg.seed)
        val_ds.check_fits(cfg.batch_size, cfg.block_size)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    for ds in (train_ds, val_ds):
        top = int(np.max(ds.tokens[: 1 << 22]))
        if top >= vocab_size:
            raise SystemExit(
                f"error: {ds.path} holds token id {top}, beyond the model's vocabulary "
                f"of {vocab_size}; was it tokenized with GPT-2's BPE (or bytes: --preset "
                "small-bytes / --vocab-size 256)?"
            )
    return train_ds, val_ds, it


class Feed:
    """Global device batches from host-local NumPy ones: every host draws the same global batch
    and feeds its rows of it (`jax.make_array_from_process_local_data`)."""

    def __init__(self, cfg: Config, mesh):
        B, pc, pi = cfg.batch_size, jax.process_count(), jax.process_index()
        self.rows = slice(pi * (B // pc), (pi + 1) * (B // pc))
        self.train_shape = (cfg.grad_accum, B, cfg.block_size)
        self.train_sharding = NamedSharding(mesh, P(None, "data", None))
        self.eval_sharding = NamedSharding(mesh, P("data", None))

    def train_batch(self, xy):
        """(A*B, T) windows -> x, y of shape (A, B, T), batch axis split over devices."""
        return tuple(
            jax.make_array_from_process_local_data(
                self.train_sharding, a.reshape(self.train_shape)[:, self.rows], self.train_shape
            )
            for a in xy
        )

    def eval_batch(self, xy):
        return tuple(
            jax.make_array_from_process_local_data(self.eval_sharding, a[self.rows], a.shape)
            for a in xy
        )


# ----------------------------------------------------------------------------- sharding


def make_mesh():
    """A 1-D mesh over every device (all hosts): batch and, with --fsdp, params on 'data'."""
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def leaf_sharding(mesh, x, fsdp: bool, stacked: bool = False) -> NamedSharding:
    """Replicated, or (fsdp) split along the largest axis the device count divides.

    The layer axis of stacked leaves is never split, so layer-wise masking slices locally.
    """
    n = mesh.shape["data"]
    shape = getattr(x, "shape", ())
    if not fsdp or n == 1 or jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return NamedSharding(mesh, P())
    axes = sorted(range(1 if stacked else 0, len(shape)), key=lambda i: -shape[i])
    for i in axes:
        if shape[i] % n == 0 and shape[i] >= n:
            spec = [None] * len(shape)
            spec[i] = "data"
            return NamedSharding(mesh, P(*spec))
    return NamedSharding(mesh, P())


def tree_shardings(mesh, tree, fsdp: bool):
    def one(path, x):
        stacked = any(getattr(k, "key", None) == "blocks" for k in path)
        return leaf_sharding(mesh, x, fsdp, stacked)

    return jax.tree_util.tree_map_with_path(one, tree)


# ----------------------------------------------------------------------------- the step


class TrainState(NamedTuple):
    """What one train step reads and replaces (donated): the training run's device state."""

    params: Any  # the model's nnx.Param tree, a pure dict of float32 arrays
    opt_state: Any  # the optimizer state of the current stage


def step_function(cfg: Config, stage: str) -> Callable:
    """The library step a stage trains with: `omgd_jax.lean_train_step` for layer-wise compact
    OMGD / LISA (unless --no-lean), `omgd_jax.train_step` (the dense gradient) otherwise."""
    layerwise = cfg.optimizer in LAYER_OPTIMIZERS and cfg.omgd_state == "compact"
    lean = stage == "omgd" and layerwise and cfg.lean
    return omgd_jax.lean_train_step if lean else omgd_jax.train_step


def make_step(cfg: Config, stage: str, graphdef, tx) -> Callable:
    """``(TrainState, x, y) -> (TrainState, metrics)`` on x, y of shape (accum, batch, T): one
    optimizer step of the library's step (`step_function`) over `grad_accum` micro-batches."""

    def loss_of(params, x, y):
        return loss_fn(nnx.merge(graphdef, params), x, y)

    factory = step_function(cfg, stage)
    lean = factory is omgd_jax.lean_train_step
    kw = {"layers": BLOCKS, **unit_kwargs(cfg)} if lean else {}
    inner = factory(loss_of, tx, microbatches=cfg.grad_accum, **kw)

    def step(state: TrainState, x, y):
        params, opt_state, loss = inner(state.params, state.opt_state, x, y)
        return TrainState(params, opt_state), {"loss": loss, "grad_norm": grad_norm(opt_state)}

    return step


def eval_step(graphdef, params, x, y):
    return loss_fn(nnx.merge(graphdef, params), x, y)


class Stage(NamedTuple):
    """One optimizer stage of a run ("adamw" warm-up or "omgd"), its functions jitted once."""

    name: str
    abstract: TrainState  # shapes and dtypes (jax.ShapeDtypeStruct) of the state
    shardings: TrainState  # where each array of the state lives
    step: Callable  # jitted (TrainState, x, y) -> (TrainState, metrics), state donated
    init: Callable  # jitted params -> the stage's fresh optimizer state


def compile_stage(cfg: Config, name: str, graphdef, abstract_params, mesh) -> Stage:
    """Builds the stage's optimizer and jits its step (compiled at the first call).

    Raises ConfigError with the library's sentence for settings omgd_jax refuses.
    """
    try:
        tx = make_optimizer(cfg, name)
        abstract = TrainState(abstract_params, jax.eval_shape(tx.init, abstract_params))
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from e
    shardings = jax.tree.map(lambda t: tree_shardings(mesh, t, cfg.fsdp), abstract)
    step = jax.jit(
        make_step(cfg, name, graphdef, tx),
        donate_argnums=0,
        out_shardings=(shardings, None),
    )
    init = jax.jit(tx.init, out_shardings=shardings.opt_state)
    return Stage(name, abstract, shardings, step, init)


def step_memory(cfg: Config) -> dict:
    """Compiled memory of one train step of a finalized run in its last stage (the masking one
    for OMGD / LISA: the lean step where it applies), from abstract inputs; nothing allocated."""
    mcfg = model_config(cfg)
    graphdef, abstract_params = abstract_model(mcfg, cfg.seed)
    stage = compile_stage(cfg, stages(cfg)[-1], graphdef, abstract_params, make_mesh())
    x = jax.ShapeDtypeStruct((cfg.grad_accum, cfg.batch_size, cfg.block_size), jnp.int32)
    return report.memory(stage.step.lower(stage.abstract, x, x).compile())


# ----------------------------------------------------------------------------- logging


class Logger:
    """metrics.jsonl, TensorBoard and the progress bar (main host only); keeps what `train`
    returns (losses, last val loss, tokens/s). On resume drops records past the start step."""

    def __init__(self, cfg: Config, start_step: int, enabled: bool):
        out_dir = Path(cfg.out_dir)
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.tb = self.bar = None
        self.losses, self.rates, self.val_loss, self.last = [], [], None, None
        if not enabled:
            return
        if self.path.exists():
            keep = [
                ln
                for ln in self.path.read_text().splitlines()
                if ln.strip() and json.loads(ln)["step"] <= start_step
            ]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        if cfg.tensorboard:
            from tensorboardX import SummaryWriter

            purge = start_step + 1 if start_step else None
            self.tb = SummaryWriter(str(out_dir / "tb"), purge_step=purge)
        if cfg.progress:
            from tqdm.auto import tqdm

            desc = f"{cfg.preset}/{cfg.optimizer}"
            self.bar = tqdm(total=cfg.steps, initial=start_step, desc=desc, dynamic_ncols=True)

    def log(self, rec: dict):
        self.losses.append((rec["step"], rec["loss"]))
        self.rates.append(rec["tokens_per_s"])
        self.val_loss = rec.get("val_loss", self.val_loss)
        self.last = rec
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, int | float):
                    self.tb.add_scalar(k, v, rec["step"])
        if self.bar is not None:
            shown = {"loss": f"{rec['loss']:.3f}", "tok_s": f"{rec['tokens_per_s']:.0f}"}
            if "val_loss" in rec:
                shown["val"] = f"{rec['val_loss']:.3f}"
            self.bar.set_postfix(shown)

    def advance(self):
        if self.bar is not None:
            self.bar.update(1)

    def summary(self, **extra) -> dict:
        return {
            "losses": self.losses,
            "val_loss": self.val_loss,
            "final_loss": self.last["loss"] if self.last else None,
            # median over logging intervals, the first (compilation) left out when there are others
            "tokens_per_s": float(np.median(self.rates[1:] or self.rates)) if self.rates else None,
            **extra,
        }

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


# ----------------------------------------------------------------------------- the loop


def _maybe_init_distributed(cfg: Config):
    """Multi-host: `jax.distributed.initialize()` with --distributed or JAX_COORDINATOR_ADDRESS.

    Cluster auto-detection (TPU pods, SLURM, Open MPI, Kubernetes) fills in the rest; elsewhere
    set JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID on every host.
    """
    if not (cfg.distributed or os.environ.get("JAX_COORDINATOR_ADDRESS")):
        return
    kw = {}
    for env, arg in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
        if os.environ.get(env):
            kw[arg] = int(os.environ[env])
    try:
        jax.distributed.initialize(**kw)
    except RuntimeError as e:  # already initialised
        if "already" not in str(e):
            raise


def train(cfg: Config) -> dict:
    """Runs (or resumes) training. Returns a summary dict (final losses, state bytes, tokens/s).

    Raises ConfigError for settings that cannot run; bad data or checkpoints exit with a sentence.
    """
    return run(finalize(cfg))


def run(cfg: Config) -> dict:
    """`train` for a finalized config: the set-up, then `loop`."""
    _maybe_init_distributed(cfg)
    mesh = make_mesh()
    for n, what in ((mesh.shape["data"], "devices"), (jax.process_count(), "hosts")):
        if cfg.batch_size % n:
            raise SystemExit(
                f"error: --batch-size {cfg.batch_size} is not divisible by the {n} {what}"
            )
    # Model and optimizer stages: abstract first (shapes only), materialised with their shardings.
    mcfg = model_config(cfg)
    graphdef, abstract_params = abstract_model(mcfg, cfg.seed)
    by_name = {s: compile_stage(cfg, s, graphdef, abstract_params, mesh) for s in stages(cfg)}
    _, val_data, batches = open_data(cfg, mcfg.vocab_size)
    feed = Feed(cfg, mesh)
    rngs = [np.random.default_rng([cfg.seed, 1, i]) for i in range(cfg.eval_iters)]
    val_batches = [  # the same batches at every evaluation
        feed.eval_batch(val_data.get_batch(rng, cfg.batch_size, cfg.block_size)) for rng in rngs
    ]
    evaluate = jax.jit(functools.partial(eval_step, graphdef))

    def val_loss(params) -> float:
        return float(np.mean([float(evaluate(params, *xy)) for xy in val_batches]))

    ckpt = Checkpointer(Path(cfg.out_dir) / "checkpoints", cfg.keep)
    try:
        meta, state = restore_latest_readable(ckpt, cfg, batches, by_name)
        if meta is None:  # a fresh run
            step, stage = 0, by_name[stage_at(cfg, 0)]
            make_params = functools.partial(init_params, mcfg, cfg.seed)
            params = jax.jit(make_params, out_shardings=stage.shardings.params)()
            state = TrainState(params, stage.init(params))
        else:
            step, stage = meta["step"], by_name[meta["stage"]]
        return loop(cfg, by_name, stage, state, step, batches, feed, val_loss, ckpt)
    finally:
        ckpt.close()


def restore_latest_readable(ckpt, cfg: Config, batches, by_name) -> tuple[dict | None, Any]:
    """(metadata, TrainState) of the newest checkpoint that reads back whole, or (None, None).

    An unreadable checkpoint (truncated or corrupted files) is reported, renamed
    ``<step>.unreadable`` (kept for the user, out of the run's way) and the next older one is
    tried; a checkpoint of another run is refused (`resume_point`) as before.
    """
    verbose = jax.process_index() == 0
    candidates = ckpt.steps() if cfg.resume else [None]
    for n, step in enumerate(candidates or [None]):
        meta = None
        try:
            meta = resume_point(ckpt, cfg, batches, verbose=verbose, step=step)
            if meta is None:
                return None, None
            stage = by_name[meta["stage"]]
            return meta, ckpt.restore(meta["step"], stage.abstract, stage.shardings)
        except SystemExit:
            raise
        except Exception as e:  # noqa: BLE001 - any failure to read the files
            older = candidates[n + 1] if n + 1 < len(candidates) else None
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}" if str(e) else repr(e)
            moved = ckpt.set_aside(step) if jax.process_index() == 0 else None
            if verbose:
                then = f"resuming from step {older}" if older is not None else "starting afresh"
                print(
                    f"warning: the checkpoint of step {step} in {cfg.out_dir} cannot be read "
                    f"({reason}); it is kept as {moved}; {then}",
                    file=sys.stderr,
                )
    if cfg.resume and candidates:
        raise SystemExit(
            f"error: no readable checkpoint in {cfg.out_dir} (unreadable ones were renamed "
            "*.unreadable); remove --resume to start afresh"
        )
    return None, None


def loop(cfg, by_name, stage, state, step, batches, feed, val_loss, ckpt) -> dict:
    """Trains from `step` to cfg.steps; logs, evaluates, checkpoints; stops early on SIGTERM."""
    main_host = jax.process_index() == 0
    if main_host:
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out_dir) / "config.json").write_text(cfg.to_json())
    logger = Logger(cfg, step, enabled=main_host)
    lr_at = jax.jit(lr_schedule(cfg))  # one compile instead of a dozen eager ops
    tokens_per_step = cfg.grad_accum * cfg.batch_size * cfg.block_size
    t_last, n_last, loss_sum = time.perf_counter(), 0, 0.0
    # The layers every layer-wise OMGD / LISA step trains, read from this host's optimizer state.
    layerwise, masks = cfg.optimizer in LAYER_OPTIMIZERS and cfg.omgd_state == "compact", []
    with logger, SigtermFlag() as sigterm:
        while step < cfg.steps:
            if stage_at(cfg, step) != stage.name:  # warm-up over: switch to the OMGD optimizer
                stage, params = by_name[stage_at(cfg, step)], state.params
                del state  # frees the AdamW moments before the new state is made
                state = TrainState(params, stage.init(params))
            x, y = feed.train_batch(next(batches))
            if layerwise and stage.name == "omgd":  # a copy: the state is donated to the step
                masks.append((step, omgd_jax.active_layers(state.opt_state) + 0))
            state, metrics = stage.step(state, x, y)
            step, n_last = step + 1, n_last + 1
            loss_sum = loss_sum + metrics["loss"]  # stays on device until logged
            last = step == cfg.steps
            if step % cfg.log_every == 0 or last:
                loss = float(loss_sum) / n_last  # waits for the step: only then read the clock
                seconds = max(time.perf_counter() - t_last, 1e-9)
                rec = {
                    "step": step,
                    "loss": loss,  # mean over the logging interval
                    "lr": float(lr_at(step - 1)),
                    "grad_norm": float(metrics["grad_norm"]),
                    "tokens_per_s": n_last * tokens_per_step / seconds,
                    "stage": stage.name,
                }
                if step % cfg.eval_every == 0 or last:
                    rec["val_loss"] = val_loss(state.params)
                logger.log(rec)
                n_last, loss_sum = 0, 0.0
            logger.advance()
            if step % cfg.checkpoint_every == 0 or last or sigterm.signal is not None:
                ckpt.save(step, state, stage.name, cfg, batches.state_dict())
            if n_last == 0:  # throughput intervals leave out evaluation and checkpointing
                t_last = time.perf_counter()
            if sigterm.signal is not None:
                print(
                    f"\nreceived signal {sigterm.signal}: saved step {step} in {cfg.out_dir}",
                    file=sys.stderr,
                )
                break
    return logger.summary(
        step=step,
        stage=stage.name,
        opt_state_bytes=tree_bytes(state.opt_state),
        opt_state_blocks_bytes=tree_bytes(state.opt_state, under="blocks"),
        param_bytes=tree_bytes(state.params),
        params=state.params,
        opt_state=state.opt_state,
        active_layers=[(t, np.asarray(ids.addressable_data(0)).tolist()) for t, ids in masks],
    )


def main(argv=None):
    cfg = parse_args(argv)
    try:
        s = run(cfg)
    except ConfigError as e:  # the library's refusals, in its words
        build_parser().error(str(e))
    if jax.process_index() == 0:
        val = f"{s['val_loss']:.4f}" if s["val_loss"] is not None else "n/a"
        verb = "done" if s["step"] >= cfg.steps else "stopped"
        print(
            f"{verb}: step {s['step']}, val_loss {val}, "
            f"optimizer state {s['opt_state_bytes'] / 2**20:.2f} MiB, out dir {cfg.out_dir}"
        )


if __name__ == "__main__":
    main()
