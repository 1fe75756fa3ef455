"""Training configuration: one dataclass, preset defaults, and the command-line parser.

Flags left unset take the preset's default (`PRESET_DEFAULTS`): the nanoGPT / paper recipe for
"gpt2-124m", a scaled-down one for "tiny".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Literal

from examples.gpt2.model import PRESETS

Optimizer = Literal[
    "adamw",
    "omgd-layer",
    "lisa",
    "lisa-wor-noscale",
    "omgd-layer-rotate",
    "omgd-layer-frozen-embedding",
    "omgd-element",
    "omgd-tensor",
    "galore",
    "golore",
    "sift",
    "skip-update",
    "skip-update-wor",
    "magma",
    "magma-wor",
    "mofasgd",
]
OPTIMIZERS = typing.get_args(Optimizer)
# Layer-wise: whole transformer blocks masked (gamma of them trained per phase; the lean step).
LAYER_OPTIMIZERS = (
    "omgd-layer",
    "lisa",
    "lisa-wor-noscale",
    "omgd-layer-rotate",  # the embedding(s) and head join the traversal as units of their own
    "omgd-layer-frozen-embedding",  # the token embedding never trained
)
# Units of the traversal besides the layers, per layer-wise optimizer (M = n_layer / gamma + E).
EXTRA_UNITS = {"omgd-layer-rotate": 2}
# The OMGD mask family (omgd_jax.omgd_adamw): --num-masks, --steps-per-mask, --omgd-state, ...
OMGD_OPTIMIZERS = (*LAYER_OPTIMIZERS, "omgd-element", "omgd-tensor")


def option(default, help: str | None = None, *, choices=None):
    """A Config field and its command-line flag `--<name>`; choices from a `Literal` annotation
    or `choices`."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


@dataclasses.dataclass
class Config:
    """Everything a run depends on. `None` fields are filled from `PRESET_DEFAULTS` by `finalize`.

    The command-line flags are these fields (`build_parser`): `--out-dir` for `out_dir`;
    booleans that default to True are turned off with `--no-<name>`.
    """

    preset: str = option("tiny", choices=tuple(sorted(PRESETS)))
    optimizer: Optimizer = option("adamw")
    data: str = option("data/sotu", "directory with train.bin and val.bin (uint16 tokens)")
    out_dir: str = option("runs/gpt2", "metrics.jsonl, TensorBoard events, checkpoints")
    steps: int | None = option(None, "optimizer steps (each = grad_accum micro-batches)")
    resume: bool = option(False, "continue from the latest checkpoint in --out-dir")
    seed: int = option(0)
    batch_size: int | None = option(None, "global micro-batch (sequences, all devices and hosts)")
    grad_accum: int | None = option(None, "micro-batches per optimizer step")
    block_size: int | None = option(None, "sequence length (default: the preset's context)")
    vocab_size: int | None = option(
        None, "vocabulary of the model (default: the preset's; 256 for byte-level data)"
    )
    dtype: Literal["float32", "bfloat16"] = option(
        "float32", "compute dtype; parameters and optimizer state stay float32"
    )
    remat: bool = option(False, "recompute block activations in the backward pass")
    # AdamW recipe (SPEC 1.5): beta (0.9, 0.95), lr 6e-4, warm-up + cosine to 6e-5, wd 0.1, clip 1
    lr: float | None = option(None, "peak learning rate")
    min_lr: float | None = option(None, "final learning rate of the cosine")
    lr_warmup: int | None = option(None, "linear learning-rate warm-up steps")
    lr_decay_steps: int | None = option(None, "steps of warm-up + cosine (default: --steps)")
    weight_decay: float = option(0.1)
    beta1: float = option(0.9)
    beta2: float = option(0.95)
    grad_clip: float = option(1.0)
    # OMGD
    num_masks: int | None = option(None, "M (layer granularity: n_layer / gamma)")
    layers_per_phase: int | None = option(
        None, "gamma: layers trained per phase (omgd-layer, lisa)"
    )
    steps_per_mask: int | None = option(None, "K: optimizer steps each mask is held")
    warmup_masks: int | None = option(
        None, "full-gradient AdamW steps before masking starts (the OMGD / LISA optimizers)"
    )
    omgd_state: Literal["compact", "frozen"] | None = option(
        None,
        "compact: state for the active share only; frozen: full state, inactive kept "
        "(default: compact; omgd-tensor: frozen)",
    )
    mask_seed: int | None = option(
        None, "seed of the masks / projectors of every randomised optimizer (default: --seed)"
    )
    lean: bool = option(
        True,
        "omgd-layer / lisa with compact state: differentiate, store and update only the active "
        "blocks (omgd_jax.lean_train_step); --no-lean takes the dense gradient",
    )
    # the other methods (SPEC 2, 3): GaLore / GoLore, SIFT, SkipUpdate / Magma, MoFaSGD
    rank: int | None = option(
        None, "rank r of galore, golore and mofasgd (default: the preset's, n_embd / 4)"
    )
    proj_gap: int | None = option(None, "galore / golore: steps between projector refreshes (T)")
    galore_scale: float = option(0.25, "galore / golore: alpha, the scale of the update")
    svd_steps: int = option(0, "golore: SVD projectors for this many steps, random ones after")
    sparse_rate: float = option(0.2, "sift: the share of every block matrix that is trained")
    keep_prob: float = option(0.5, "skip-update / magma: p, the keep probability of a matrix")
    magma_tau: float = option(2.0, "magma: tau, the temperature of the alignment score")
    lowrank_lr_scale: float = option(
        10.0, "mofasgd: learning rate of the factored matrices = this x --lr (AdamW's: --lr)"
    )
    # bookkeeping
    eval_every: int | None = option(None)
    eval_iters: int | None = option(None, "validation batches per evaluation")
    log_every: int = option(10)
    checkpoint_every: int | None = option(None)
    keep: int = option(3, "checkpoints to keep")
    fsdp: bool = option(False, "shard parameters and optimizer state over devices")
    distributed: bool = option(
        False, "call jax.distributed.initialize() (also when JAX_COORDINATOR_ADDRESS is set)"
    )
    progress: bool = option(True, "tqdm progress bar")
    tensorboard: bool = option(True, "TensorBoard events in --out-dir/tb")

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
        proj_gap=200,
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
        proj_gap=50,
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
        proj_gap=5,
    ),
}
# Byte-level SOTU (`--data data/sotu-bytes`): the tiny recipe on a model whose blocks hold most
# parameters and FLOPs (benchmarks/compare.py, `make demo`), with its longer context.
PRESET_DEFAULTS["small-bytes"] = {**PRESET_DEFAULTS["tiny"], "block_size": 128}


class ConfigError(ValueError):
    """A configuration that cannot run; the message says why in one sentence."""


def finalize(cfg: Config) -> Config:
    """A copy with the preset's defaults filled in, checked. Raises ConfigError with a sentence.

    What `omgd_jax` checks itself (layers_per_phase against the model's layers, num_masks and
    steps_per_mask >= 1, granularities without compact state) is left to it: `train` turns its
    ValueError into a ConfigError when it builds the optimizer.
    """
    if cfg.preset not in PRESETS:
        raise ConfigError(f"unknown preset {cfg.preset!r}; choose one of {sorted(PRESETS)}")
    if cfg.optimizer not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {cfg.optimizer!r}; choose one of {list(OPTIMIZERS)}")
    model = PRESETS[cfg.preset]
    derived = dict(  # unless the preset says otherwise
        block_size=model.block_size,
        vocab_size=model.vocab_size,
        lr_decay_steps=cfg.steps or PRESET_DEFAULTS[cfg.preset]["steps"],
        mask_seed=cfg.seed,
        omgd_state="frozen" if cfg.optimizer == "omgd-tensor" else "compact",
        rank=max(1, model.n_embd // 4),
    )
    defaults = {**derived, **PRESET_DEFAULTS[cfg.preset]}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in defaults.items() if getattr(cfg, k) is None})
    positive = ("steps", "batch_size", "grad_accum", "block_size", "vocab_size", "eval_every",
                "eval_iters", "log_every", "checkpoint_every", "keep")  # fmt: skip
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{flag_of(name)} must be positive, got {getattr(cfg, name)}")
    for name in ("rank", "proj_gap"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{flag_of(name)} must be positive, got {getattr(cfg, name)}")
    if cfg.warmup_masks < 0:
        raise ConfigError(f"--warmup-masks must be >= 0, got {cfg.warmup_masks}")
    if cfg.block_size > model.block_size:
        raise ConfigError(
            f"--block-size {cfg.block_size} exceeds the {cfg.preset} context {model.block_size}"
        )
    if cfg.optimizer in LAYER_OPTIMIZERS:
        # The library takes gamma (layers_per_phase); M = n_layer / gamma follows from it.
        g = cfg.layers_per_phase
        extra = EXTRA_UNITS.get(cfg.optimizer, 0)
        if cfg.num_masks is None:
            cfg.num_masks = model.n_layer // max(g, 1) + extra
        elif (cfg.num_masks - extra) * g != model.n_layer:
            minus = f" (minus its {extra} extra units)" if extra else ""
            raise ConfigError(
                f"--num-masks {cfg.num_masks}{minus} x --layers-per-phase {g} must equal the "
                f"{model.n_layer} layers of {cfg.preset}"
            )
    elif cfg.num_masks is None:
        # element: the same 1/4 share as gamma = 3 of 12 layers; tensor: the paper's r = 0.5.
        cfg.num_masks = 2 if cfg.optimizer == "omgd-tensor" else 4
    return cfg


def flag_of(name: str) -> str:
    """The command-line flag of a Config field."""
    return "--" + name.replace("_", "-")


def _type_and_choices(annotation):
    """(argparse type, choices) of a field annotation: `int | None` -> int; Literal -> choices."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return _type_and_choices(args[0])
    if typing.get_origin(annotation) is Literal:
        return type(args[0]), args
    return annotation, None


def build_parser() -> argparse.ArgumentParser:
    """One flag per Config field: its name, type, choices, default and help come from the field."""
    p = argparse.ArgumentParser(
        prog="python -m examples.gpt2.train",
        description="Train GPT-2 (nanoGPT recipe) with AdamW, OMGD or LISA. Unset flags take the "
        "preset's defaults.",
    )
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        help_ = f.metadata.get("help")
        kind, choices = _type_and_choices(hints[f.name])
        if kind is bool:
            # False by default: --name turns it on; True by default: --no-name turns it off.
            on = f.default is False
            name = flag_of(f.name) if on else "--no-" + f.name.replace("_", "-")
            action = "store_true" if on else "store_false"
            p.add_argument(name, dest=f.name, action=action, help=help_)
        else:
            p.add_argument(flag_of(f.name), type=kind, default=f.default, help=help_,
                           choices=f.metadata.get("choices") or choices)  # fmt: skip
    return p


def parse_args(argv=None) -> Config:
    """Parses flags into a finalized Config; bad input exits through argparse with a message."""
    parser = build_parser()
    try:
        return finalize(Config(**vars(parser.parse_args(argv))))
    except ConfigError as e:
        parser.error(str(e))


def load_run_config(out_dir: str | Path) -> dict:
    """The config.json a run wrote into its out dir."""
    return json.loads((Path(out_dir) / "config.json").read_text())
