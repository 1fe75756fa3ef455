"""The methods omgd_jax is compared with, under the same optax API (the library's baselines wing).

Each method exports its factory (an ``optax.GradientTransformationExtraArgs``), its AdamW alias
where it has one, its ``scale_by_*`` form where the method is a preconditioner, and its state:

* LISA (Pan et al., 2024): `lisa` (i.i.d. layers, unscaled), `lisa_wor` (OMGD-layer by name),
  both AdamW aliases of `omgd_jax.omgd` (its scale-by form: ``omgd(inner, traversal=...)``);
  i.i.d. element / tensor masks `iid_element_mask`, `iid_tensor_mask`. State: `OmgdCompactState`
  (``state="compact"``) or `OmgdFrozenState`.
* GaLore / GoLore (Zhao et al., 2024; He et al., 2024): `scale_by_galore`, `galore`, `golore`,
  `stiefel_projector`;
  `GaloreState`.
* SIFT (Song et al., 2023): `scale_by_sift`, `sift`; `SiftState`.
* SkipUpdate / Magma (arXiv 2602.15322): `skip_update`, `skip_update_adamw`, `magma`,
  `magma_adamw`; `SkipUpdateState`, `MagmaState`.
* MoFaSGD (arXiv 2507.08091): `scale_by_mofasgd`, `mofasgd`; `ScaleByMofasgdState`.

Every name here is also exported by `omgd_jax` itself.
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
from omgd_jax._src.compact import OmgdCompactState
from omgd_jax._src.frozen import OmgdFrozenState

__all__ = [
    "GaloreState",
    "MagmaState",
    "OmgdCompactState",
    "OmgdFrozenState",
    "ScaleByMofasgdState",
    "SiftState",
    "SkipUpdateState",
    "galore",
    "golore",
    "iid_element_mask",
    "iid_tensor_mask",
    "lisa",
    "lisa_wor",
    "magma",
    "magma_adamw",
    "mofasgd",
    "scale_by_galore",
    "scale_by_mofasgd",
    "scale_by_sift",
    "sift",
    "skip_update",
    "skip_update_adamw",
    "stiefel_projector",
]
