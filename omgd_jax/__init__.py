"""omgd_jax: Omni-Masked Gradient Descent (arXiv 2603.05960) as composable optax transformations.

* `omgd_mask`: the masked gradient, to chain before (or after) any optax optimizer.
* `omgd`: wraps an optax optimizer so that it runs, and keeps state, only on the active share.
* `omgd_adamw`: AdamW under `omgd`, with the learning-rate schedule on the global step.
* `lisa`, `lisa_wor`, `iid_tensor_mask`, `iid_element_mask`: the layer-wise and i.i.d. baselines.
* `galore`, `golore`: Adam in a rank-r gradient subspace (SVD / uniformly random projectors).
* `sift`: AdamW on a fixed top-|g| subset of every weight, state for the subset only.
* `joint_traversal`: Algorithm 1's (mask, batch) order for loaders that drive it.
"""

from omgd_jax.galore import GaloreState, galore, golore, stiefel_projector
from omgd_jax.lisa import iid_element_mask, iid_tensor_mask, lisa, lisa_wor
from omgd_jax.schedule import MaskSchedule
from omgd_jax.sift import SiftState, sift
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
    "STATIC_ARGS",
    "GaloreState",
    "MaskSchedule",
    "OmgdCompactState",
    "OmgdFrozenState",
    "OmgdMaskState",
    "SiftState",
    "galore",
    "golore",
    "iid_element_mask",
    "iid_tensor_mask",
    "joint_traversal",
    "lisa",
    "lisa_wor",
    "omgd",
    "omgd_adamw",
    "omgd_mask",
    "sift",
    "static_args",
    "stiefel_projector",
]
__version__ = "0.1.0"
