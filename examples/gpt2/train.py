"""Train GPT-2 with AdamW, OMGD (layer / element / tensor) or LISA: `python -m examples.gpt2.train`.

    python -m examples.gpt2.train --preset tiny --optimizer omgd-layer --steps 400 \
        --data data/sotu --out-dir runs/tiny-omgd

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

import dataclasses
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from examples.gpt2.config import Config, ConfigError, finalize, parse_args
from examples.gpt2.model import GPT, get_config, loss_fn

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
                f"of {vocab_size}; was it tokenized with GPT-2's BPE?"
            )
    return train_ds, val_ds, it


# ----------------------------------------------------------------------------- optimizer


def decay_mask(params):
    """Weight decay on matrices and embeddings only (nanoGPT: >= 2-D in the unstacked model)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) in ("kernel", "embedding"), params
    )


def lr_schedule(cfg: Config):
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=cfg.lr_warmup,
        decay_steps=max(cfg.lr_decay_steps, cfg.lr_warmup + 1),
        end_value=cfg.min_lr,
    )


def two_stage(cfg: Config) -> bool:
    """Compact OMGD state: plain AdamW for warmup_masks steps, then the OMGD optimizer."""
    return cfg.optimizer != "adamw" and cfg.omgd_state == "compact" and cfg.warmup_masks > 0


def stages(cfg: Config) -> list[str]:
    return (
        ["adamw", "omgd"]
        if two_stage(cfg)
        else (["adamw"] if cfg.optimizer == "adamw" else ["omgd"])
    )


def stage_at(cfg: Config, step: int) -> str:
    """Which optimizer stage trains optimizer step `step` (0-based)."""
    if two_stage(cfg):
        return "adamw" if step < cfg.warmup_masks else "omgd"
    return stages(cfg)[0]


def omgd_kwargs(cfg: Config) -> dict:
    """Arguments of `omgd_jax.omgd_adamw` for the chosen optimizer (besides lr and AdamW's)."""
    kw = dict(steps_per_mask=cfg.steps_per_mask, key=cfg.mask_seed, state=cfg.omgd_state)
    if cfg.optimizer in ("omgd-layer", "lisa"):
        kw.update(granularity="layer", layers=r"^blocks/", layers_per_phase=cfg.layers_per_phase)
        if cfg.optimizer == "lisa":
            kw.update(traversal="iid", scale=False)
    else:
        kw.update(granularity=cfg.optimizer.removeprefix("omgd-"), num_masks=cfg.num_masks)
    if cfg.omgd_state == "frozen":
        kw.update(warmup_steps=cfg.warmup_masks)
    return kw


def make_optimizer(cfg: Config, stage: str) -> optax.GradientTransformation:
    """clip_by_global_norm -> AdamW (stage 'adamw') or OMGD-wrapped AdamW (stage 'omgd')."""
    sched = lr_schedule(cfg)
    adam = dict(
        b1=cfg.beta1, b2=cfg.beta2, eps=1e-8, weight_decay=cfg.weight_decay, mask=decay_mask
    )
    if stage == "adamw":
        inner = optax.adamw(sched, **adam)
    else:
        import omgd_jax

        lr = sched
        if two_stage(cfg):  # the OMGD optimizer starts counting at the switch
            shift = cfg.warmup_masks
            lr = lambda t: sched(t + shift)
        inner = omgd_jax.omgd_adamw(lr, **adam, **omgd_kwargs(cfg))
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), inner)


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


# ----------------------------------------------------------------------------- steps


def make_train_step(graphdef, tx):
    """(params, opt_state, x, y) -> (params, opt_state, metrics); x, y: (accum, batch, T)."""

    def loss_of(params, x, y):
        return loss_fn(nnx.merge(graphdef, params), x, y)

    def step(params, opt_state, x, y):
        grad_fn = jax.value_and_grad(loss_of)
        if x.shape[0] == 1:
            loss, grads = grad_fn(params, x[0], y[0])
        else:

            def micro(carry, xy):
                loss, grads = grad_fn(params, *xy)
                return jax.tree.map(jnp.add, carry, (loss, grads)), None

            zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
            (loss, grads), _ = jax.lax.scan(micro, zero, (x, y))
            loss, grads = jax.tree.map(lambda g: g / x.shape[0], (loss, grads))
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    return step


_JIT_CACHE: dict = {}


def _cached(key, build):
    """Jitted functions shared by train() calls in one process (demo, tests, notebooks): runs
    with the same model and optimizer settings then compile once."""
    if key not in _JIT_CACHE:
        if len(_JIT_CACHE) >= 16:
            _JIT_CACHE.clear()
        _JIT_CACHE[key] = build()
    return _JIT_CACHE[key]


# The settings that define the OMGD optimizer (and so its compiled step and its state layout).
OMGD_FIELDS = (
    "optimizer",
    "omgd_state",
    "num_masks",
    "layers_per_phase",
    "steps_per_mask",
    "warmup_masks",
    "mask_seed",
)


def _compile_key(cfg: Config, stage: str) -> tuple:
    """The settings an optimizer stage's compiled step depends on (shapes are jit's business)."""
    names = [
        "preset",
        "dtype",
        "remat",
        "fsdp",
        "lr",
        "min_lr",
        "lr_warmup",
        "lr_decay_steps",
        "weight_decay",
        "beta1",
        "beta2",
        "grad_clip",
    ]
    if stage == "omgd":
        names += OMGD_FIELDS
    return tuple(getattr(cfg, n) for n in names)


def make_eval_step(graphdef):
    def evaluate(params, x, y):
        return loss_fn(nnx.merge(graphdef, params), x, y)

    return jax.jit(evaluate)


def tree_bytes(tree, under: str | None = None) -> int:
    """Bytes held by the arrays of a pytree (typed PRNG keys count their key data).

    `under="blocks"` counts only leaves below a dict key of that name (the transformer blocks).
    """
    total = 0
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if under is not None and not any(getattr(k, "key", None) == under for k in path):
            continue
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.eval_shape(jax.random.key_data, x)
        total += math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
    return total


# ----------------------------------------------------------------------------- checkpoints


def _is_key(x) -> bool:
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def keys_to_data(tree):
    """Typed PRNG keys -> their uint32 key data (Orbax stores plain arrays)."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def data_to_keys(tree, template):
    """Inverse of keys_to_data, guided by an (abstract) template with the typed keys."""
    return jax.tree.map(
        lambda x, t: jax.random.wrap_key_data(x) if _is_key(t) else x, tree, template
    )


def abstract_with_keys_as_data(abstract, shardings):
    def one(x, s):
        if _is_key(x):
            x = jax.eval_shape(jax.random.key_data, x)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

    return jax.tree.map(one, abstract, shardings)


def run_identity(cfg: Config) -> dict:
    """What a checkpoint must agree on to be resumed: model, optimizer and state layout."""
    keys = ("preset", *OMGD_FIELDS, "seed", "block_size", "batch_size", "grad_accum")
    return {k: getattr(cfg, k) for k in keys}


class Checkpointer:
    """Orbax CheckpointManager around {params, opt_state} + JSON metadata (stage, step, config)."""

    def __init__(self, directory: Path, keep: int):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        self.mngr = ocp.CheckpointManager(
            directory.absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )

    def latest(self):
        return self.mngr.latest_step()

    def save(self, step: int, params, opt_state, meta: dict):
        ocp = self.ocp
        state = {"params": params, "opt_state": keys_to_data(opt_state)}
        self.mngr.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )

    def meta(self, step: int) -> dict:
        ocp = self.ocp
        return self.mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def restore(self, step: int, abstract_params, abstract_opt, shardings):
        ocp = self.ocp
        abstract = {"params": abstract_params, "opt_state": abstract_opt}
        target = abstract_with_keys_as_data(abstract, shardings)
        out = self.mngr.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
        ).state
        return out["params"], data_to_keys(out["opt_state"], abstract_opt)

    def close(self):
        self.mngr.wait_until_finished()
        self.mngr.close()


# ----------------------------------------------------------------------------- logging


class Logger:
    """metrics.jsonl (+ TensorBoard) in the out dir; on resume drops records past the step."""

    def __init__(self, out_dir: Path, start_step: int, tensorboard: bool, enabled: bool):
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if self.path.exists():
            keep = [
                ln
                for ln in self.path.read_text().splitlines()
                if ln.strip() and json.loads(ln)["step"] <= start_step
            ]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(
                str(out_dir / "tb"), purge_step=start_step + 1 if start_step else None
            )

    def log(self, record: dict):
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, int | float):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self):
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


def _global_batch(mesh, sharding, x_local, global_shape):
    return jax.make_array_from_process_local_data(sharding, x_local, global_shape)


def _start(cfg: Config, ckpt, batches, opt_setup, abstract_params, param_sh, main_host: bool):
    """(params, opt_state, stage, step) restored from the latest checkpoint, or (None, None,
    first stage, 0) for a fresh run. Refuses checkpoints of another run with a sentence."""
    out_dir = cfg.out_dir
    latest = ckpt.latest()
    if latest is not None and not cfg.resume:
        raise SystemExit(
            f"error: {out_dir} already holds checkpoints (latest step {latest}); "
            "pass --resume to continue or choose another --out-dir"
        )
    if latest is None:
        if cfg.resume and main_host:
            print(f"no checkpoint in {out_dir}: starting from step 0", file=sys.stderr)
        return None, None, stage_at(cfg, 0), 0
    meta = ckpt.meta(latest)
    saved = meta["identity"]
    diff = {k: (saved.get(k), v) for k, v in run_identity(cfg).items() if saved.get(k) != v}
    if diff:
        what = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise SystemExit(
            f"error: the checkpoint in {out_dir} comes from another run ({what}); "
            "use the same flags or another --out-dir"
        )
    for k in ("lr", "min_lr", "lr_warmup", "lr_decay_steps", "weight_decay"):
        if meta["config"].get(k) != getattr(cfg, k) and main_host:
            print(
                f"warning: resuming with {k}={getattr(cfg, k)} (checkpoint: "
                f"{meta['config'].get(k)}); the learning-rate schedule changes from here on",
                file=sys.stderr,
            )
    try:
        batches.load_state_dict(meta["data"])
    except ValueError as e:
        raise SystemExit(f"error: cannot resume the data position: {e}") from None
    if batches.step != meta["step"]:
        raise SystemExit(
            f"error: checkpoint at step {meta['step']} has data position {batches.step}"
        )
    stage = meta["stage"]
    _, abstract_opt, opt_sh, _, _ = opt_setup(stage)
    shardings = {"params": param_sh, "opt_state": opt_sh}
    params, opt_state = ckpt.restore(latest, abstract_params, abstract_opt, shardings)
    return params, opt_state, stage, meta["step"]


def train(cfg: Config) -> dict:
    """Runs (or resumes) training. Returns a summary dict (final losses, state bytes, tokens/s)."""
    cfg = finalize(cfg)
    _maybe_init_distributed(cfg)
    out_dir = Path(cfg.out_dir)
    pi, pc = jax.process_index(), jax.process_count()
    main_host = pi == 0
    mesh = make_mesh()
    n_dev = mesh.shape["data"]
    B, A, T = cfg.batch_size, cfg.grad_accum, cfg.block_size
    if B % n_dev:
        raise SystemExit(f"error: --batch-size {B} is not divisible by the {n_dev} devices")
    if B % pc:
        raise SystemExit(f"error: --batch-size {B} is not divisible by the {pc} hosts")

    # Model: abstract first (shapes only), then materialised directly with its shardings.
    mcfg = get_config(cfg.preset, dtype=cfg.dtype, remat=cfg.remat)
    train_data, val_data, batches = open_data(cfg, mcfg.vocab_size)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: GPT(mcfg, nnx.Rngs(cfg.seed))))

    def init_params():
        return nnx.to_pure_dict(nnx.state(GPT(mcfg, nnx.Rngs(cfg.seed)), nnx.Param))

    abstract_params = jax.eval_shape(init_params)
    param_sh = tree_shardings(mesh, abstract_params, cfg.fsdp)

    def opt_setup(stage):
        def build():
            tx = make_optimizer(cfg, stage)
            abstract_opt = jax.eval_shape(tx.init, abstract_params)
            opt_sh = tree_shardings(mesh, abstract_opt, cfg.fsdp)
            step_fn = jax.jit(
                make_train_step(graphdef, tx),
                donate_argnums=(0, 1),
                out_shardings=(param_sh, opt_sh, None),
            )
            init_fn = jax.jit(tx.init, out_shardings=opt_sh)
            return tx, abstract_opt, opt_sh, step_fn, init_fn

        return _cached(("step", stage, _compile_key(cfg, stage), mesh), build)

    ckpt = Checkpointer(out_dir / "checkpoints", cfg.keep)
    try:
        params, opt_state, stage, start = _start(
            cfg, ckpt, batches, opt_setup, abstract_params, param_sh, main_host
        )
        if params is None:
            make = _cached(
                ("init", mcfg, cfg.seed, cfg.fsdp, mesh),
                lambda: jax.jit(init_params, out_shardings=param_sh),
            )
            params = make()
            opt_state = opt_setup(stage)[4](params)
        tx, abstract_opt, opt_sh, step_fn, init_fn = opt_setup(stage)
    except BaseException:
        ckpt.close()
        raise

    if main_host:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(cfg.to_json())
    logger = Logger(out_dir, start, cfg.tensorboard, main_host)
    lr_at = jax.jit(lr_schedule(cfg))  # one compile instead of a dozen eager ops
    eval_fn = _cached(("eval", mcfg), lambda: make_eval_step(graphdef))
    batch_sh = NamedSharding(mesh, P(None, "data", None))
    eval_sh = NamedSharding(mesh, P("data", None))

    def get_batch():
        # Every host draws the global batch (A*B windows) and feeds its rows of each micro-batch.
        x, y = next(batches)
        rows = slice(pi * (B // pc), (pi + 1) * (B // pc))
        x, y = x.reshape(A, B, T)[:, rows], y.reshape(A, B, T)[:, rows]
        shape = (A, B, T)
        return _global_batch(mesh, batch_sh, x, shape), _global_batch(mesh, batch_sh, y, shape)

    val_batches = [
        val_data.get_batch(np.random.default_rng([cfg.seed, 1, i]), B, T)
        for i in range(cfg.eval_iters)
    ]  # the same batches at every evaluation

    def val_loss():
        losses = []
        rows = slice(pi * (B // pc), (pi + 1) * (B // pc))
        for x, y in val_batches:
            x, y = x[rows], y[rows]
            losses.append(
                eval_fn(
                    params,
                    _global_batch(mesh, eval_sh, x, (B, T)),
                    _global_batch(mesh, eval_sh, y, (B, T)),
                )
            )
        return float(np.mean([float(v) for v in losses]))

    stop = {"signal": None}

    def on_sigterm(signum, frame):
        stop["signal"] = signum

    old_handler = signal.signal(signal.SIGTERM, on_sigterm) if _in_main_thread() else None

    def save(step):
        if ckpt.latest() == step:  # e.g. SIGTERM right after a scheduled save
            return
        meta = {
            "step": step,
            "stage": stage,
            "identity": run_identity(cfg),
            "data": {k: int(v) for k, v in batches.state_dict().items()},
            "config": dataclasses.asdict(cfg),
        }
        ckpt.save(step, params, opt_state, meta)

    bar = None
    if cfg.progress and main_host:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=cfg.steps, initial=start, desc=f"{cfg.preset}/{cfg.optimizer}", dynamic_ncols=True
        )
    tokens_per_step = A * B * T
    summary = {"losses": [], "val_loss": None}
    step = start
    t_last, n_last, last_rec, rates, loss_sum = time.perf_counter(), 0, None, [], 0.0
    try:
        while step < cfg.steps:
            if stage_at(cfg, step) != stage:  # warm-up over: switch to the OMGD optimizer
                stage = stage_at(cfg, step)
                del opt_state
                tx, abstract_opt, opt_sh, step_fn, init_fn = opt_setup(stage)
                opt_state = init_fn(params)
            x, y = get_batch()
            params, opt_state, m = step_fn(params, opt_state, x, y)
            step += 1
            n_last += 1
            loss_sum = loss_sum + m["loss"]  # stays on device until logged
            last = step == cfg.steps
            if step % cfg.log_every == 0 or last:
                loss = float(loss_sum) / n_last  # mean over the logging interval
                dt = time.perf_counter() - t_last
                rec = {
                    "step": step,
                    "loss": loss,
                    "lr": float(lr_at(step - 1)),
                    "grad_norm": float(m["grad_norm"]),
                    "tokens_per_s": n_last * tokens_per_step / max(dt, 1e-9),
                    "stage": stage,
                }
                summary["losses"].append((step, loss))
                if step % cfg.eval_every == 0 or last:
                    rec["val_loss"] = summary["val_loss"] = val_loss()
                logger.log(rec)
                last_rec = rec
                rates.append(rec["tokens_per_s"])
                n_last, loss_sum = 0, 0.0
                if bar is not None:
                    bar.set_postfix(
                        loss=f"{loss:.3f}",
                        tok_s=f"{rec['tokens_per_s']:.0f}",
                        **({"val": f"{rec['val_loss']:.3f}"} if "val_loss" in rec else {}),
                    )
            if bar is not None:
                bar.update(1)
            if step % cfg.checkpoint_every == 0 or last:
                save(step)
            if n_last == 0:  # throughput intervals leave out evaluation and checkpointing
                t_last = time.perf_counter()
            if stop["signal"] is not None:
                save(step)
                print(
                    f"\nreceived signal {stop['signal']}: saved step {step} in {out_dir}",
                    file=sys.stderr,
                )
                break
    finally:
        if bar is not None:
            bar.close()
        ckpt.close()
        logger.close()
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
    summary.update(
        step=step,
        stage=stage,
        final_loss=last_rec["loss"] if last_rec else None,
        # median over logging intervals, the first (compilation) left out when there are others
        tokens_per_s=float(np.median(rates[1:] or rates)) if rates else None,
        opt_state_bytes=tree_bytes(opt_state),
        opt_state_blocks_bytes=tree_bytes(opt_state, under="blocks"),
        param_bytes=tree_bytes(params),
        params=params,
        opt_state=opt_state,
    )
    return summary


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def main(argv=None):
    cfg = parse_args(argv)
    try:
        s = train(cfg)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    if jax.process_index() == 0:
        val = f"{s['val_loss']:.4f}" if s["val_loss"] is not None else "n/a"
        verb = "done" if s["step"] >= cfg.steps else "stopped"
        print(
            f"{verb}: step {s['step']}, val_loss {val}, "
            f"optimizer state {s['opt_state_bytes'] / 2**20:.2f} MiB, out dir {cfg.out_dir}"
        )


if __name__ == "__main__":
    main()
