"""omgd_jax: Omni-Masked Gradient Descent (arXiv 2603.05960) as composable optax transformations.

* `omgd_mask`: the masked gradient, to chain before (or after) any optax optimizer.
* `omgd`: wraps an optax optimizer so that it runs, and keeps state, only on the active share.
* `omgd_adamw`: AdamW under `omgd`, with the learning-rate schedule on the global step.
* `skip_update`, `magma` (+ `_adamw` aliases): randomly masked updates (arXiv 2602.15322).
* `mofasgd`, `scale_by_mofasgd`: low-rank factored momentum (arXiv 2507.08091).
* `joint_traversal`: Algorithm 1's (mask, batch) order for loaders that drive it.
"""

from omgd_jax.mofasgd import MOFASGD_STATIC_ARGS, ScaleByMofasgdState, mofasgd, scale_by_mofasgd
from omgd_jax.schedule import MaskSchedule
from omgd_jax.skip_update import (
    SKIP_UPDATE_STATIC_ARGS,
    MagmaState,
    SkipUpdateState,
    magma,
    magma_adamw,
    skip_update,
    skip_update_adamw,
)
from omgd_jax.transforms import OmgdMaskState, omgd_mask
from omgd_jax.traversal import joint_traversal
from omgd_jax.wrapper import (
    STATIC_ARGS,
    OmgdCompactState,
    OmgdFrozenState,
    omgd,
    omgd_adamw,
    static_args,
)

__all__ = [
    "MOFASGD_STATIC_ARGS",
    "SKIP_UPDATE_STATIC_ARGS",
    "STATIC_ARGS",
    "MagmaState",
    "MaskSchedule",
    "OmgdCompactState",
    "OmgdFrozenState",
    "OmgdMaskState",
    "ScaleByMofasgdState",
    "SkipUpdateState",
    "joint_traversal",
    "magma",
    "magma_adamw",
    "mofasgd",
    "omgd",
    "omgd_adamw",
    "omgd_mask",
    "scale_by_mofasgd",
    "skip_update",
    "skip_update_adamw",
    "static_args",
]
__version__ = "0.1.0"
