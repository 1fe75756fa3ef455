"""Checkpoints of a GPT-2 run: Orbax CheckpointManager, resume checks, save on SIGTERM.

A checkpoint holds the `TrainState` (params and optimizer state; typed PRNG keys stored as their
key data) and JSON metadata: the step, the optimizer stage ("adamw" warm-up or "omgd"), the data
iterator's position, the run's identity (what must agree to resume) and the whole config.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from examples.gpt2.config import Config

# What a checkpoint must agree on to be resumed: model, data layout, optimizer and state layout.
IDENTITY_FIELDS = ("preset", "optimizer", "omgd_state", "num_masks", "layers_per_phase",
                   "steps_per_mask", "warmup_masks", "mask_seed", "seed", "block_size",
                   "batch_size", "grad_accum")  # fmt: skip
# Changing these on resume is allowed, with a warning: the schedule changes from there on.
SCHEDULE_FIELDS = ("lr", "min_lr", "lr_warmup", "lr_decay_steps", "weight_decay")


def run_identity(cfg: Config) -> dict:
    return {k: getattr(cfg, k) for k in IDENTITY_FIELDS}


def _is_key(x) -> bool:
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _is_empty(x) -> bool:
    return math.prod(x.shape) == 0


def keys_to_data(tree):
    """Typed PRNG keys -> their uint32 key data (Orbax stores plain arrays); empty arrays
    (omgd_jax's shard grids, layer ids outside layer granularity) -> None (Orbax refuses them,
    and their shape is all they hold)."""

    def one(x):
        if _is_empty(x):
            return None
        return jax.random.key_data(x) if _is_key(x) else x

    return jax.tree.map(one, tree)


def data_to_keys(tree, template, shardings):
    """Inverse of keys_to_data, guided by an (abstract) template with the typed keys."""

    def one(t, x, s):
        if _is_empty(t):
            return jnp.zeros(t.shape, t.dtype, device=s)
        return jax.random.wrap_key_data(x) if _is_key(t) else x

    return jax.tree.map(one, template, tree, shardings, is_leaf=lambda x: x is None)


def _restore_target(abstract, shardings):
    """Abstract arrays with their shardings, typed keys replaced by their key data, empty
    arrays by None."""

    def one(x, s):
        if _is_empty(x):
            return None
        if _is_key(x):
            x = jax.eval_shape(jax.random.key_data, x)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

    return jax.tree.map(one, abstract, shardings)


class Checkpointer:
    """Orbax CheckpointManager around a TrainState + JSON metadata (stage, step, data, config)."""

    def __init__(self, directory: Path, keep: int):
        self.mngr = ocp.CheckpointManager(
            Path(directory).absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )

    def latest(self) -> int | None:
        return self.mngr.latest_step()

    def steps(self) -> list[int]:
        """The saved steps, newest first."""
        return sorted(self.mngr.all_steps(), reverse=True)

    def set_aside(self, step: int) -> Path:
        """Moves the checkpoint of ``step`` out of the way (renamed ``<step>.unreadable``, not
        deleted), so the run can save that step again."""
        source = Path(self.mngr.directory) / str(step)
        target = source.with_name(f"{step}.unreadable")
        n = 1
        while target.exists():
            target, n = source.with_name(f"{step}.unreadable.{n}"), n + 1
        source.rename(target)
        self.mngr.reload()
        return target

    def save(self, step: int, state, stage: str, cfg: Config, data_position: dict):
        """Saves `state` (a TrainState) at `step`, unless that step is saved already."""
        if self.latest() == step:  # e.g. SIGTERM right after a scheduled save
            return
        meta = {
            "step": step,
            "stage": stage,
            "identity": run_identity(cfg),
            "data": {k: int(v) for k, v in data_position.items()},
            "config": dataclasses.asdict(cfg),
        }
        self.mngr.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(keys_to_data(state._asdict())),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )

    def meta(self, step: int) -> dict:
        return self.mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def restore(self, step: int, abstract_state, shardings):
        """The TrainState saved at `step`, laid out as `abstract_state` with `shardings`."""
        target = _restore_target(abstract_state._asdict(), shardings._asdict())
        out = self.mngr.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
        ).state
        return type(abstract_state)(
            **data_to_keys(out, abstract_state._asdict(), shardings._asdict())
        )

    def close(self):
        self.mngr.wait_until_finished()
        self.mngr.close()


def resume_point(
    ckpt: Checkpointer, cfg: Config, batches, verbose: bool, step: int | None = None
) -> dict | None:
    """The metadata of the checkpoint to resume from (the latest, or ``step``; `batches` moved
    to its data position), or None for a fresh run. Refuses, with a sentence, checkpoints
    without --resume and checkpoints of another run."""
    latest = ckpt.latest()
    if latest is not None and not cfg.resume:
        raise SystemExit(
            f"error: {cfg.out_dir} already holds checkpoints (latest step {latest}); "
            "pass --resume to continue or choose another --out-dir"
        )
    if latest is None:
        if cfg.resume and verbose:
            print(f"no checkpoint in {cfg.out_dir}: starting from step 0", file=sys.stderr)
        return None
    meta = ckpt.meta(latest if step is None else step)
    saved = meta["identity"]
    diff = {k: (saved.get(k), v) for k, v in run_identity(cfg).items() if saved.get(k) != v}
    if diff:
        what = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise SystemExit(
            f"error: the checkpoint in {cfg.out_dir} comes from another run ({what}); "
            "use the same flags or another --out-dir"
        )
    for k in SCHEDULE_FIELDS:
        if meta["config"].get(k) != getattr(cfg, k) and verbose:
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
    return meta


class SigtermFlag:
    """Within `with`: SIGTERM sets `.signal` instead of killing the process (main thread only),
    so the loop can save a checkpoint and stop."""

    def __init__(self):
        self.signal = None
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def _on_signal(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
