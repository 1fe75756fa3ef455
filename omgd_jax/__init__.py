"""omgd_jax: Omni-Masked Gradient Descent (arXiv 2603.05960) as composable optax transformations.

* `omgd_mask`: the masked gradient, to chain before (or after) any optax optimizer.
* `omgd`: wraps an optax optimizer so that it runs, and keeps state, only on the active share.
* `omgd_adamw`: AdamW under `omgd`, with the learning-rate schedule on the global step.
* `lean_train_step`, `lean_value_and_grad`, `scan_layers`, `active_layers`, `active_unit`,
  `LayerIds`: the lean layer-wise step that differentiates, stores and updates only the active
  layers; `train_step` is the dense step with the same signature (both take micro-batches).
* `omgd_jax.baselines`: the comparison methods (also exported here):
* `lisa`, `lisa_wor`, `iid_tensor_mask`, `iid_element_mask`: the layer-wise and i.i.d. baselines.
* `galore`, `golore`: Adam in a rank-r gradient subspace (SVD / uniformly random projectors).
* `sift`: AdamW on a fixed top-:math:`|g|` subset of every weight, state for the subset only.
* `skip_update`, `magma` (+ `_adamw` aliases): randomly masked updates (arXiv 2602.15322).
* `mofasgd`, `scale_by_mofasgd`: low-rank factored momentum (arXiv 2507.08091).
* `joint_traversal`: Algorithm 1's (mask, batch) order for loaders that drive it.
"""

from omgd_jax._src.baselines.galore import (
    GaloreState,
    galore,
    golore,
    scale_by_galore,
    stiefel_projector,
)
from omgd_jax._src.baselines.lisa import iid_element_mask, iid_tensor_mask, lisa, lisa_wor
from omgd_jax._src.baselines.mofasgd import ScaleByMofasgdState, mofasgd, scale_by_mofasgd
from omgd_jax._src.baselines.sift import SiftState, scale_by_sift, sift
from omgd_jax._src.baselines.skip_update import (
    MagmaState,
    SkipUpdateState,
    magma,
    magma_adamw,
    skip_update,
    skip_update_adamw,
)
from omgd_jax._src.compact import LayerIds, OmgdCompactState
from omgd_jax._src.frozen import OmgdFrozenState
from omgd_jax._src.layer_scan import add_to_layers, gather_layers, scan_layers, scatter_layers
from omgd_jax._src.lean import (
    active_layers,
    active_unit,
    apply_layer_updates,
    layer_view,
    lean_train_step,
    lean_value_and_grad,
    train_step,
)
from omgd_jax._src.schedule import MaskSchedule
from omgd_jax._src.transforms import OmgdMaskState, omgd_mask
from omgd_jax._src.traversal import joint_traversal
from omgd_jax._src.wrapper import STATIC_ARGS, omgd, omgd_adamw, static_args

__all__ = [
    "STATIC_ARGS",
    "GaloreState",
    "LayerIds",
    "MagmaState",
    "MaskSchedule",
    "OmgdCompactState",
    "OmgdFrozenState",
    "OmgdMaskState",
    "ScaleByMofasgdState",
    "SiftState",
    "SkipUpdateState",
    "active_layers",
    "active_unit",
    "apply_layer_updates",
    "gather_layers",
    "galore",
    "golore",
    "iid_element_mask",
    "iid_tensor_mask",
    "joint_traversal",
    "layer_view",
    "lean_train_step",
    "lean_value_and_grad",
    "lisa",
    "lisa_wor",
    "magma",
    "magma_adamw",
    "mofasgd",
    "omgd",
    "omgd_adamw",
    "omgd_mask",
    "scale_by_galore",
    "scale_by_mofasgd",
    "scale_by_sift",
    "scan_layers",
    "add_to_layers",
    "scatter_layers",
    "sift",
    "skip_update",
    "skip_update_adamw",
    "static_args",
    "stiefel_projector",
    "train_step",
]
__version__ = "0.1.0"
