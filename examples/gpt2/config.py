"""Training configuration: one dataclass, preset defaults, and the command-line parser.

Flags left unset take the preset's default (`PRESET_DEFAULTS`): the nanoGPT / paper recipe for
"gpt2-124m", a scaled-down one for "tiny".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from examples.gpt2.model import PRESETS

OPTIMIZERS = ("adamw", "omgd-layer", "lisa", "omgd-element", "omgd-tensor")


@dataclasses.dataclass
class Config:
    """Everything a run depends on. `None` fields are filled from `PRESET_DEFAULTS`."""

    preset: str = "tiny"
    optimizer: str = "adamw"
    data: str = "data/sotu"
    out_dir: str = "runs/gpt2"
    steps: int | None = None  # optimizer steps (each = grad_accum micro-batches)
    resume: bool = False
    seed: int = 0
    batch_size: int | None = None  # micro-batch, global over all devices and hosts
    grad_accum: int | None = None
    block_size: int | None = None  # sequence length; default the preset's context
    dtype: str = "float32"  # compute dtype; parameters and optimizer state are float32
    remat: bool = False
    # AdamW recipe (SPEC 1.5): beta (0.9, 0.95), lr 6e-4, warm-up + cosine to 6e-5, wd 0.1, clip 1
    lr: float | None = None
    min_lr: float | None = None
    lr_warmup: int | None = None  # linear lr warm-up steps
    lr_decay_steps: int | None = None  # end of the cosine (default: steps)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # OMGD
    num_masks: int | None = None  # M; layer granularity: n_layer // layers_per_phase
    layers_per_phase: int | None = None  # gamma
    steps_per_mask: int | None = None  # K
    warmup_masks: int | None = None  # full-gradient (plain AdamW) steps before masking starts
    omgd_state: str | None = None  # "compact" | "frozen" (omgd-tensor: frozen only)
    mask_seed: int | None = None  # key of the mask schedule (default: seed)
    # bookkeeping
    eval_every: int | None = None
    eval_iters: int | None = None
    log_every: int = 10
    checkpoint_every: int | None = None
    keep: int = 3
    fsdp: bool = False
    distributed: bool = (
        False  # jax.distributed.initialize() (also when JAX_COORDINATOR_ADDRESS is set)
    )
    progress: bool = True
    tensorboard: bool = True

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


PRESET_DEFAULTS: dict[str, dict] = {
    # nanoGPT / paper Fig. 5: ~0.5M tokens per step (12 x 1024 x 40), 100k steps, masks after 1000.
    "gpt2-124m": dict(
        steps=100_000,
        batch_size=12,
        grad_accum=40,
        lr=6e-4,
        min_lr=6e-5,
        lr_warmup=2000,
        layers_per_phase=3,
        steps_per_mask=100,
        warmup_masks=1000,
        eval_every=1000,
        eval_iters=100,
        checkpoint_every=1000,
    ),
    # 2 CPU cores, a few minutes: 8 x 64 tokens a step, gamma 1 of 4 layers, K = 20, masks
    # after 50 steps (the 50304-wide tied head dominates the cost of a step here).
    "tiny": dict(
        steps=300,
        batch_size=8,
        grad_accum=1,
        block_size=64,
        lr=2e-3,
        min_lr=2e-4,
        lr_warmup=20,
        layers_per_phase=1,
        steps_per_mask=20,
        warmup_masks=50,
        eval_every=50,
        eval_iters=8,
        checkpoint_every=100,
    ),
    # Tests and smoke runs: 2 layers of width 32, gamma 1 of 2, K = 5, masks after 5 steps.
    "nano": dict(
        steps=30,
        batch_size=4,
        grad_accum=1,
        block_size=32,
        lr=3e-3,
        min_lr=3e-4,
        lr_warmup=3,
        layers_per_phase=1,
        steps_per_mask=5,
        warmup_masks=5,
        eval_every=10,
        eval_iters=2,
        checkpoint_every=10,
    ),
}


class ConfigError(ValueError):
    """A configuration that cannot run; the message says why in one sentence."""


def finalize(cfg: Config) -> Config:
    """Fills preset defaults and checks the combination. Raises ConfigError with a clear message."""
    if cfg.preset not in PRESETS:
        raise ConfigError(f"unknown preset {cfg.preset!r}; choose one of {sorted(PRESETS)}")
    if cfg.optimizer not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {cfg.optimizer!r}; choose one of {list(OPTIMIZERS)}")
    cfg = dataclasses.replace(cfg)
    for k, v in PRESET_DEFAULTS[cfg.preset].items():
        if getattr(cfg, k) is None:
            setattr(cfg, k, v)
    model = PRESETS[cfg.preset]
    n_layer = model.n_layer
    if cfg.block_size is None:
        cfg.block_size = model.block_size
    if cfg.lr_decay_steps is None:
        cfg.lr_decay_steps = cfg.steps
    if cfg.mask_seed is None:
        cfg.mask_seed = cfg.seed
    if cfg.omgd_state is None:
        cfg.omgd_state = "frozen" if cfg.optimizer == "omgd-tensor" else "compact"
    positive = (
        "steps",
        "batch_size",
        "grad_accum",
        "block_size",
        "steps_per_mask",
        "layers_per_phase",
        "eval_every",
        "eval_iters",
        "log_every",
        "checkpoint_every",
        "keep",
    )
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise ConfigError(
                f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}"
            )
    if cfg.warmup_masks < 0:
        raise ConfigError(f"--warmup-masks must be >= 0, got {cfg.warmup_masks}")
    if cfg.block_size > model.block_size:
        raise ConfigError(
            f"--block-size {cfg.block_size} exceeds the {cfg.preset} context {model.block_size}"
        )
    if cfg.dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"--dtype must be float32 or bfloat16, got {cfg.dtype!r}")
    if cfg.omgd_state not in ("compact", "frozen"):
        raise ConfigError(f"--omgd-state must be compact or frozen, got {cfg.omgd_state!r}")
    if cfg.optimizer == "omgd-tensor" and cfg.omgd_state == "compact":
        raise ConfigError("omgd-tensor has no compact state: use --omgd-state frozen")
    if cfg.optimizer in ("omgd-layer", "lisa"):
        g = cfg.layers_per_phase
        if g > n_layer:
            raise ConfigError(
                f"--layers-per-phase {g} exceeds the {n_layer} layers of {cfg.preset}"
            )
        if n_layer % g:
            raise ConfigError(
                f"--layers-per-phase {g} must divide the {n_layer} layers of "
                f"{cfg.preset} (a cycle is n_layer / gamma phases)"
            )
        if cfg.num_masks is None:
            cfg.num_masks = n_layer // g
        elif cfg.num_masks * g != n_layer:
            raise ConfigError(
                f"--num-masks {cfg.num_masks} x --layers-per-phase {g} must equal "
                f"the {n_layer} layers of {cfg.preset}"
            )
    elif cfg.num_masks is None:
        # element: the same 1/4 share as gamma = 3 of 12 layers; tensor: the paper's r = 0.5.
        cfg.num_masks = 2 if cfg.optimizer == "omgd-tensor" else 4
    if cfg.num_masks < 1:
        raise ConfigError(f"--num-masks must be >= 1, got {cfg.num_masks}")
    return cfg


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m examples.gpt2.train",
        description="Train GPT-2 (nanoGPT recipe) with AdamW, OMGD or LISA. Unset flags take the "
        "preset's defaults.",
    )
    a = p.add_argument
    a("--preset", default="tiny", choices=sorted(PRESETS))
    a("--optimizer", default="adamw", choices=OPTIMIZERS)
    a("--data", default="data/sotu", help="directory with train.bin and val.bin (uint16 tokens)")
    a("--out-dir", default="runs/gpt2", help="metrics.jsonl, TensorBoard events, checkpoints")
    a("--steps", type=int, help="optimizer steps")
    a("--resume", action="store_true", help="continue from the latest checkpoint in --out-dir")
    a("--seed", type=int, default=0)
    a("--batch-size", type=int, help="global micro-batch (sequences)")
    a("--grad-accum", type=int, help="micro-batches per optimizer step")
    a("--block-size", type=int, help="sequence length (default: the preset's context)")
    a("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    a("--remat", action="store_true", help="recompute block activations in the backward pass")
    a("--lr", type=float, help="peak learning rate")
    a("--min-lr", type=float, help="final learning rate of the cosine")
    a("--lr-warmup", type=int, help="linear learning-rate warm-up steps")
    a("--lr-decay-steps", type=int, help="steps of warm-up + cosine (default: --steps)")
    a("--weight-decay", type=float, default=0.1)
    a("--grad-clip", type=float, default=1.0)
    a("--num-masks", type=int, help="M (layer granularity: n_layer / gamma)")
    a("--layers-per-phase", type=int, help="gamma: layers trained per phase (omgd-layer, lisa)")
    a("--steps-per-mask", type=int, help="K: optimizer steps each mask is held")
    a("--warmup-masks", type=int, help="full-gradient AdamW steps before masking starts")
    a(
        "--omgd-state",
        choices=("compact", "frozen"),
        help="compact: state for the active share only; frozen: full state, inactive kept",
    )
    a("--mask-seed", type=int, help="seed of the mask schedule (default: --seed)")
    a("--eval-every", type=int)
    a("--eval-iters", type=int, help="validation batches per evaluation")
    a("--log-every", type=int, default=10)
    a("--checkpoint-every", type=int)
    a("--keep", type=int, default=3, help="checkpoints to keep")
    a("--fsdp", action="store_true", help="shard parameters and optimizer state over devices")
    a("--distributed", action="store_true", help="call jax.distributed.initialize()")
    a("--no-progress", dest="progress", action="store_false", help="no tqdm bar")
    a("--no-tensorboard", dest="tensorboard", action="store_false")
    return p


def parse_args(argv=None) -> Config:
    """Parses flags into a finalized Config; bad input exits through argparse with a message."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        return finalize(Config(**vars(ns)))
    except ConfigError as e:
        parser.error(str(e))


def load_run_config(out_dir: str | Path) -> dict:
    """The config.json a run wrote into its out dir."""
    return json.loads((Path(out_dir) / "config.json").read_text())
