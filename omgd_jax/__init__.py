"""omgd_jax: Omni-Masked Gradient Descent (arXiv 2603.05960) as composable optax transformations.

* `omgd_mask`: the masked gradient, to chain before (or after) any optax optimizer.
* `omgd`: wraps an optax optimizer so that it runs, and keeps state, only on the active share.
* `omgd_adamw`: AdamW under `omgd`, with the learning-rate schedule on the global step.
* `joint_traversal`: Algorithm 1's (mask, batch) order for loaders that drive it.
"""

from omgd_jax.compact import OmgdCompactState
from omgd_jax.frozen import OmgdFrozenState
from omgd_jax.lean import (
    active_layers,
    apply_layer_updates,
    gather_layers,
    layer_view,
    lean_train_step,
    lean_value_and_grad,
    scan_layers,
    scatter_layers,
)

from omgd_jax.schedule import MaskSchedule
from omgd_jax.transforms import OmgdMaskState, omgd_mask
from omgd_jax.traversal import joint_traversal
from omgd_jax.wrapper import STATIC_ARGS, omgd, omgd_adamw, static_args

__all__ = [
    "STATIC_ARGS",
    "MaskSchedule",
    "active_layers",
    "apply_layer_updates",
    "gather_layers",
    "layer_view",
    "lean_train_step",
    "lean_value_and_grad",
    "scan_layers",
    "scatter_layers",
    "OmgdCompactState",
    "OmgdFrozenState",
    "OmgdMaskState",
    "joint_traversal",
    "omgd",
    "omgd_adamw",
    "omgd_mask",
    "static_args",
]
__version__ = "0.1.0"
