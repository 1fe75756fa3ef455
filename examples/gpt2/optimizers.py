"""The GPT-2 example's optimizers: AdamW (nanoGPT's recipe), OMGD (layer / element / tensor), LISA
(i.i.d. and without replacement, unscaled), GaLore, GoLore, SIFT, SkipUpdate and Magma (i.i.d. and
without replacement), MoFaSGD.

One definition serves the training program and the benchmarks (`benchmarks/`):

* `decay_mask`: weight decay on matrices and embeddings only;
* `lr_schedule`: linear warm-up then cosine decay to `min_lr`;
* `stages` / `stage_at`: with compact OMGD state and `--warmup-masks` > 0 a run trains plain AdamW
  first, then switches to the OMGD optimizer (stage "adamw", then "omgd");
* `make_optimizer(cfg, stage)`: clip_by_global_norm -> `base_optimizer(cfg, stage)`, AdamW or
  the chosen method (`method_optimizer`), with AdamW's betas, eps, weight decay and decay mask
  wherever the method has them;
* `tree_bytes`: the bytes a state pytree holds (how every memory figure here is measured).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

import omgd_jax
from examples.gpt2.config import LAYER_OPTIMIZERS, OMGD_OPTIMIZERS, Config

BLOCKS = r"^blocks/"  # the stacked transformer blocks' key paths
# omgd-layer-rotate's extra units, one each: GPT-2's token embedding (tied to the head) and its
# positions, or the Llama family's embedding and head; omgd-layer-frozen-embedding's frozen
# leaves: the token embedding (GPT-2's with its tied head).
ROTATE_UNITS = r"^(wte|wpe|embed|head)/"
FROZEN_EMBEDDING = r"^(wte|embed)/"
BLOCK_MATRICES = r"^blocks/.*/kernel$"  # their weight matrices, [N_L, m, n]: what GaLore projects


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
    """Compact OMGD state: plain AdamW for warmup_masks steps, then the OMGD optimizer.

    Only the OMGD / LISA family warms up; the other methods run their own rule from step 0."""
    return cfg.optimizer in OMGD_OPTIMIZERS and cfg.omgd_state == "compact" and cfg.warmup_masks > 0


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
        elif cfg.optimizer == "lisa-wor-noscale":
            kw.update(scale=False)
        kw.update(unit_kwargs(cfg))
    else:
        kw.update(granularity=cfg.optimizer.removeprefix("omgd-"), num_masks=cfg.num_masks)
    if cfg.omgd_state == "frozen":
        kw.update(warmup_steps=cfg.warmup_masks)
    return kw


def unit_kwargs(cfg: Config) -> dict:
    """``units=`` / ``frozen=`` of the layer-wise optimizer: given to `omgd_jax.omgd_adamw` and to
    its lean step alike (the step must be told what the optimizer was)."""
    if cfg.optimizer == "omgd-layer-rotate":
        return {"units": ROTATE_UNITS}
    if cfg.optimizer == "omgd-layer-frozen-embedding":
        return {"frozen": FROZEN_EMBEDDING}
    return {}


def adamw_kwargs(cfg: Config) -> dict:
    """AdamW's settings besides the learning rate (shared by both stages)."""
    return dict(
        b1=cfg.beta1, b2=cfg.beta2, eps=1e-8, weight_decay=cfg.weight_decay, mask=decay_mask
    )


def base_optimizer(cfg: Config, stage: str) -> optax.GradientTransformation:
    """AdamW (stage 'adamw') or the chosen method (stage 'omgd'), without the clipping.

    Raises the library's ValueError / TypeError for settings it refuses.
    """
    sched = lr_schedule(cfg)
    if stage == "adamw":
        return optax.adamw(sched, **adamw_kwargs(cfg))
    lr = sched
    if two_stage(cfg):  # the OMGD optimizer starts counting at the switch
        shift = cfg.warmup_masks
        lr = lambda t: sched(t + shift)
    return method_optimizer(cfg, lr)


def method_optimizer(cfg: Config, lr: optax.Schedule) -> optax.GradientTransformation:
    """The optimizer named by --optimizer (not "adamw") with learning-rate schedule `lr`.

    Every method keeps AdamW's betas, eps, weight decay and decay mask where it has them; the
    per-method settings are Config fields (--rank, --proj-gap, --sparse-rate, --keep-prob, ...).
    Matrices are the blocks' kernels (stacked [N_L, m, n], one per layer) for GaLore, GoLore and
    SIFT, and omgd_jax's default rule (the same kernels) for SkipUpdate, Magma and MoFaSGD;
    embeddings, norms and biases train with dense AdamW.
    """
    name, adam = cfg.optimizer, adamw_kwargs(cfg)
    b1, b2, eps, wd = adam["b1"], adam["b2"], adam["eps"], adam["weight_decay"]
    key = cfg.mask_seed
    if name in OMGD_OPTIMIZERS:
        return omgd_jax.omgd_adamw(lr, **adam, **omgd_kwargs(cfg))
    if name in ("galore", "golore"):
        kw = dict(rank=cfg.rank, update_proj_gap=cfg.proj_gap, scale=cfg.galore_scale,
                  leaves=BLOCK_MATRICES, b1=b1, b2=b2, eps=eps, weight_decay=wd,
                  mask=decay_mask)  # fmt: skip
        if name == "golore":
            return omgd_jax.golore(lr, svd_steps=cfg.svd_steps, key=key, **kw)
        return omgd_jax.galore(lr, **kw)
    if name == "sift":
        return omgd_jax.sift(lr, cfg.sparse_rate, leaves=BLOCK_MATRICES, stacked=BLOCKS,
                             b1=b1, b2=b2, eps=eps, weight_decay=wd, mask=decay_mask)  # fmt: skip
    if name.startswith(("skip-update", "magma")):
        traversal = "wor" if name.endswith("-wor") else "iid"
        kw = dict(b1=b1, b2=b2, eps=eps, weight_decay=wd, mask=decay_mask, key=key,
                  traversal=traversal)  # fmt: skip
        if name.startswith("magma"):
            return omgd_jax.magma_adamw(lr, cfg.keep_prob, cfg.magma_tau, **kw)
        return omgd_jax.skip_update_adamw(lr, cfg.keep_prob, **kw)
    if name == "mofasgd":
        scale = cfg.lowrank_lr_scale
        return omgd_jax.mofasgd(lambda t: scale * lr(t), cfg.rank, key=key,
                                adamw_learning_rate=lr, adamw_b1=b1, adamw_b2=b2,
                                adamw_eps=eps, adamw_weight_decay=wd)  # fmt: skip
    raise ValueError(f"no optimizer named {name!r}")  # finalize refuses it first


class GradNormState(NamedTuple):
    """State of `record_grad_norm`: the global norm of the last gradient it saw."""

    grad_norm: jax.Array  # float32 scalar


def record_grad_norm() -> optax.GradientTransformation:
    """Passes the gradient through and keeps its global norm in the state (for the logs): the
    norm of what the step differentiated (the trained share, for the lean step)."""

    def init(params):
        del params
        return GradNormState(jnp.zeros((), jnp.float32))

    def update(updates, state, params=None):
        del state, params
        return updates, GradNormState(optax.tree.norm(updates).astype(jnp.float32))

    return optax.GradientTransformation(init, update)


def grad_norm(opt_state) -> jax.Array:
    """The norm `record_grad_norm` kept in a `make_optimizer` state."""
    return opt_state[0].grad_norm


def make_optimizer(cfg: Config, stage: str) -> optax.GradientTransformation:
    """What a stage trains with: record the gradient norm -> clip_by_global_norm ->
    `base_optimizer(cfg, stage)`."""
    return optax.chain(
        record_grad_norm(), optax.clip_by_global_norm(cfg.grad_clip), base_optimizer(cfg, stage)
    )


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
