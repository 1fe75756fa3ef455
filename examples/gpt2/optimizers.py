"""The GPT-2 example's optimizers: AdamW (nanoGPT's recipe), OMGD (layer / element / tensor), LISA.

One definition serves the training program and the benchmarks (`benchmarks/`):

* `decay_mask`: weight decay on matrices and embeddings only;
* `lr_schedule`: linear warm-up then cosine decay to `min_lr`;
* `stages` / `stage_at`: with compact OMGD state and `--warmup-masks` > 0 a run trains plain AdamW
  first, then switches to the OMGD optimizer (stage "adamw", then "omgd");
* `make_optimizer(cfg, stage)`: clip_by_global_norm -> `base_optimizer(cfg, stage)`, AdamW or
  OMGD-wrapped AdamW;
* `tree_bytes`: the bytes a state pytree holds (how every memory figure here is measured).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

import omgd_jax
from examples.gpt2.config import LAYER_OPTIMIZERS, Config

BLOCKS = r"^blocks/"  # the stacked transformer blocks' key paths


def decay_mask(params):
    """Weight decay on matrices and embeddings only (nanoGPT: >= 2-D in the unstacked model)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) in ("kernel", "embedding"), params
    )


def lr_schedule(cfg: Config) -> optax.Schedule:
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
    """The optimizer stages of a run, in order."""
    if two_stage(cfg):
        return ["adamw", "omgd"]
    return ["adamw"] if cfg.optimizer == "adamw" else ["omgd"]


def stage_at(cfg: Config, step: int) -> str:
    """Which optimizer stage trains optimizer step `step` (0-based)."""
    if two_stage(cfg):
        return "adamw" if step < cfg.warmup_masks else "omgd"
    return stages(cfg)[0]


def omgd_kwargs(cfg: Config) -> dict:
    """Arguments of `omgd_jax.omgd_adamw` for the chosen optimizer (besides lr and AdamW's)."""
    kw = dict(steps_per_mask=cfg.steps_per_mask, key=cfg.mask_seed, state=cfg.omgd_state)
    if cfg.optimizer in LAYER_OPTIMIZERS:
        kw.update(granularity="layer", layers=BLOCKS, layers_per_phase=cfg.layers_per_phase)
        if cfg.optimizer == "lisa":
            kw.update(traversal="iid", scale=False)
    else:
        kw.update(granularity=cfg.optimizer.removeprefix("omgd-"), num_masks=cfg.num_masks)
    if cfg.omgd_state == "frozen":
        kw.update(warmup_steps=cfg.warmup_masks)
    return kw


def adamw_kwargs(cfg: Config) -> dict:
    """AdamW's settings besides the learning rate (shared by both stages)."""
    return dict(
        b1=cfg.beta1, b2=cfg.beta2, eps=1e-8, weight_decay=cfg.weight_decay, mask=decay_mask
    )


def base_optimizer(cfg: Config, stage: str) -> optax.GradientTransformation:
    """AdamW (stage 'adamw') or OMGD-wrapped AdamW (stage 'omgd'), without the clipping.

    Raises the library's ValueError / TypeError for settings it refuses.
    """
    sched = lr_schedule(cfg)
    if stage == "adamw":
        return optax.adamw(sched, **adamw_kwargs(cfg))
    lr = sched
    if two_stage(cfg):  # the OMGD optimizer starts counting at the switch
        shift = cfg.warmup_masks
        lr = lambda t: sched(t + shift)
    return omgd_jax.omgd_adamw(lr, **adamw_kwargs(cfg), **omgd_kwargs(cfg))


def make_optimizer(cfg: Config, stage: str) -> optax.GradientTransformation:
    """What a stage trains with: clip_by_global_norm -> `base_optimizer(cfg, stage)`."""
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), base_optimizer(cfg, stage))


def tree_bytes(tree, under: str | None = None) -> int:
    """Bytes held by the arrays of a pytree (typed PRNG keys count their key data).

    Works on arrays and on `jax.ShapeDtypeStruct`s alike. `under="blocks"` counts only leaves
    below a dict key of that name (the transformer blocks).
    """
    total = 0
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if under is not None and not any(getattr(k, "key", None) == under for k in path):
            continue
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.eval_shape(jax.random.key_data, x)
        total += math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
    return total
