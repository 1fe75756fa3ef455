"""LISA and the i.i.d. masks of the paper's ablations, as named aliases of the OMGD core.

Nothing here is new maths: every factory is :func:`omgd_jax.omgd_adamw` or
:func:`omgd_jax.omgd_mask` with the arguments that make it the method of the literature, so a
comparison between them differs only in the traversal (i.i.d. against without replacement)
and the scale, never in the code that applies the masks.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import optax

from omgd_jax._src.transforms import omgd_mask
from omgd_jax._src.wrapper import omgd_adamw


def lisa(
    learning_rate: optax.ScalarOrSchedule,
    *,
    layers: Any,
    layers_per_phase: int,
    steps_per_mask: int,
    key: jax.Array | int = 0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any | None = None,
    weight_decay: float = 1e-4,
    mask: Any | None = None,
    nesterov: bool = False,
    state: Literal["compact", "frozen"] = "compact",
    units: Any | None = None,
    frozen: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""LISA: AdamW on the embeddings, the head and :math:`\gamma` random layers at a time.

    Layerwise Importance Sampled AdamW (Pan et al. 2024). The :math:`N_L` transformer layers
    (the leaves picked by ``layers``) are the units; everything else (embeddings, head, final
    norm) is always trained. Every K = ``steps_per_mask`` steps a fresh set
    :math:`A_p` of :math:`\gamma` = ``layers_per_phase`` layers is drawn, **independently of
    the earlier phases** (with replacement across phases), and only those are trained:

    .. math::
        A_p \sim \mathrm{Uniform}\{A \subset [N_L] : |A| = \gamma\}\ \text{i.i.d.},\qquad
        g_t^{(l)} = \mathbb{1}[l \in A_{\lfloor t/K \rfloor}]\, \nabla_l f(\theta_t),

    with no rescaling of the kept layers. The optimizer state is that of LISA's authors:
    AdamW state only for the always-on leaves and the :math:`\gamma` active layers, restarted
    from zero whenever the active set changes (``state="compact"``); ``state="frozen"`` keeps
    a full state per layer instead (the PyTorch ``requires_grad`` behaviour, no saving).

    This is exactly ``omgd_adamw(..., granularity="layer", traversal="iid", scale=False)``.
    Over :math:`N_L/\gamma` phases some layer is usually trained twice and another not at all;
    :func:`lisa_wor` walks through a partition instead, which is OMGD's point.

    Args:
      learning_rate: a float or an optax schedule (applied on the global step).
      layers: which leaves are transformer layers, as for :func:`omgd_jax.omgd_mask`: a regex
        on the '/'-joined key path (no capture group: stacked layers, layer axis first, e.g.
        ``r"^blocks/"``; one capture group: the layer number of unrolled layers) or a callable.
      layers_per_phase: :math:`\gamma`, the layers trained at once; must divide :math:`N_L`.
      steps_per_mask: K, optimizer steps between two draws (LISA's sampling period).
      key: PRNG key or int seed of the draws.
      b1, b2, eps, eps_root, mu_dtype, weight_decay, mask, nesterov: as in ``optax.adamw``
        (``mask`` selects the decayed weights).
      state: ``"compact"`` (LISA's: state only for the active layers) or ``"frozen"``.
      units: leaves that join the draws as units of their own (embedding, head), as in
        :func:`omgd_jax.omgd`: every phase then draws, uniformly from the
        :math:`N_L/\gamma + E` labels, either :math:`\gamma` layers or one extra unit. None
        (LISA's default): always trained.
      frozen: leaves never trained (update zero, no state), as in :func:`omgd_jax.omgd`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Examples:
      >>> import jax.numpy as jnp, numpy as np, omgd_jax
      >>> params = {"emb": jnp.ones((3, 2)), "blocks": jnp.ones((4, 2, 2))}  # 4 stacked layers
      >>> tx = omgd_jax.lisa(0.1, layers="^blocks", layers_per_phase=1, steps_per_mask=1,
      ...                    weight_decay=0.0)
      >>> state = tx.init(params)
      >>> u, state = tx.update(params, state, params)
      >>> print(np.count_nonzero(np.asarray(u["blocks"]).reshape(4, -1).any(1)))  # one layer
      1
      >>> print([round(float(x), 4) for x in u["emb"][0]])  # always on, unscaled: -lr * sign(g)
      [-0.1, -0.1]

    References:
      Pan et al., LISA: Layerwise Importance Sampling for Memory-Efficient Large Language
      Model Fine-Tuning, arXiv 2403.17919, 2024.
      Yang et al., Omni-Masked Gradient Descent, arXiv 2603.05960, 2026 (LISA as the i.i.d.
      baseline of Algorithm 2).
    """
    return omgd_adamw(
        learning_rate,
        b1,
        b2,
        eps,
        eps_root,
        mu_dtype,
        weight_decay,
        mask,
        nesterov=nesterov,
        steps_per_mask=steps_per_mask,
        state=state,
        key=key,
        granularity="layer",
        traversal="iid",
        scale=False,
        layers=layers,
        layers_per_phase=layers_per_phase,
        units=units,
        frozen=frozen,
    )


def lisa_wor(
    learning_rate: optax.ScalarOrSchedule,
    *,
    layers: Any,
    layers_per_phase: int,
    steps_per_mask: int,
    key: jax.Array | int = 0,
    scale: bool = True,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any | None = None,
    weight_decay: float = 1e-4,
    mask: Any | None = None,
    nesterov: bool = False,
    state: Literal["compact", "frozen"] = "compact",
    repartition: bool = True,
    units: Any | None = None,
    frozen: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""LISA-wor (OMGD-layer, the paper's Algorithm 2): layers drawn without replacement.

    As :func:`lisa`, but every cycle of :math:`M = N_L/\gamma` phases draws a random partition
    of the :math:`N_L` layers into M groups of :math:`\gamma` and trains them one group per
    phase, so each layer is trained for exactly K steps per cycle. With ``scale=True`` (the
    paper's LISA-wor) the active layers' gradients are multiplied by :math:`N_L/\gamma`, which
    makes the masks sum to :math:`M \cdot \mathbf{1}` over a cycle:

    .. math::
        \bigcup_{j=1}^{M} A^{(j)}_k = [N_L],\quad A^{(i)}_k \cap A^{(j)}_k = \emptyset,\qquad
        g_t^{(l)} = \tfrac{N_L}{\gamma}\, \mathbb{1}[l \in A_t]\, \nabla_l f(\theta_t).

    ``scale=False`` gives the paper's "LISA-wor-no-scale" ablation (Table 3).
    This is exactly ``omgd_adamw(..., granularity="layer", traversal="wor", scale=scale)``.

    Args:
      learning_rate, layers, layers_per_phase, steps_per_mask, key: as in :func:`lisa`.
      b1, b2, eps, eps_root, mu_dtype, weight_decay, mask, nesterov, state: as in :func:`lisa`.
      scale: multiply the active layers' gradients by :math:`N_L/\gamma` (default, the paper).
      repartition: a fresh partition every cycle (the paper) or one drawn once (released code).
      units: leaves that join the traversal as units of their own (embedding, head, final
        norm), as in :func:`omgd_jax.omgd`: a cycle is then :math:`M = N_L/\gamma + E`
        phases, each layer and each extra unit trained (and, with ``scale``, scaled by M) in
        exactly one of them. None (the paper's default): always trained, scale 1.
      frozen: leaves never trained (update zero, no state), as in :func:`omgd_jax.omgd`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Examples:
      >>> import jax.numpy as jnp, numpy as np, omgd_jax
      >>> params = {"emb": jnp.ones((3, 2)), "blocks": jnp.ones((4, 2, 2))}
      >>> tx = omgd_jax.lisa_wor(0.1, layers="^blocks", layers_per_phase=1, steps_per_mask=1,
      ...                        weight_decay=0.0)
      >>> state, trained = tx.init(params), []
      >>> for _ in range(4):  # one cycle: every layer exactly once
      ...     u, state = tx.update(params, state, params)
      ...     trained.append(int(np.flatnonzero(np.asarray(u["blocks"]).reshape(4, -1).any(1))[0]))
      >>> print(sorted(trained))
      [0, 1, 2, 3]

    References:
      Yang et al., Omni-Masked Gradient Descent, arXiv 2603.05960, 2026 (Algorithm 2).
      Pan et al., LISA, arXiv 2403.17919, 2024.
    """
    return omgd_adamw(
        learning_rate,
        b1,
        b2,
        eps,
        eps_root,
        mu_dtype,
        weight_decay,
        mask,
        nesterov=nesterov,
        steps_per_mask=steps_per_mask,
        state=state,
        key=key,
        granularity="layer",
        traversal="wor",
        scale=scale,
        layers=layers,
        layers_per_phase=layers_per_phase,
        repartition=repartition,
        units=units,
        frozen=frozen,
    )


def iid_tensor_mask(
    num_masks: int,
    steps_per_mask: int = 1,
    *,
    key: jax.Array | int = 0,
    scale: bool = True,
    warmup_steps: int = 0,
    balance: Literal["count", "size"] = "count",
) -> optax.GradientTransformationExtraArgs:
    r"""The i.i.d. tensor-wise mask (the paper's "SGDM-iid mask" ablation, Table 4).

    Every phase of K = ``steps_per_mask`` steps keeps one group of a fresh random partition of
    the parameter tensors into M = ``num_masks`` groups, drawn independently of the earlier
    phases: the same law per phase as OMGD's tensor-wise mask, but no coverage per cycle.

    .. math::
        g_t = S_t \odot \nabla f(\theta_t),\qquad S_t = M\,\mathbb{1}_{G_t},\quad
        G_t \text{ i.i.d. over phases},\quad \mathbb{E}[S_t] = \mathbf{1}.

    This is exactly ``omgd_mask(num_masks, steps_per_mask, granularity="tensor",
    traversal="iid", ...)``; chain it before an optimizer (``optax.sgd(lr, momentum=0.9)`` in
    the paper, with ``steps_per_mask`` = the batches of an epoch).

    Args:
      num_masks: M (keep ratio 1/M of the tensors).
      steps_per_mask: K, steps each mask is held.
      key: PRNG key or int seed.
      scale: multiply kept entries by M.
      warmup_steps: full-gradient steps first.
      balance: cut the permuted tensors into groups of equal ``"count"`` or about equal
        ``"size"`` (element count).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (state: the key and a step counter).

    Examples:
      >>> import jax.numpy as jnp, omgd_jax
      >>> tx = omgd_jax.iid_tensor_mask(2, key=0)
      >>> g = {"a": jnp.ones(2), "b": jnp.ones(3)}
      >>> u, _ = tx.update(g, tx.init(g))
      >>> print(sorted([float(u["a"][0]), float(u["b"][0])]))  # one tensor kept, times M
      [0.0, 2.0]

    References:
      Yang et al., Omni-Masked Gradient Descent, arXiv 2603.05960, 2026 (§5.2, Table 4).
    """
    return omgd_mask(
        num_masks,
        steps_per_mask,
        key=key,
        granularity="tensor",
        traversal="iid",
        scale=scale,
        warmup_steps=warmup_steps,
        balance=balance,
    )


def iid_element_mask(
    num_masks: int,
    steps_per_mask: int = 1,
    *,
    key: jax.Array | int = 0,
    scale: bool = True,
    warmup_steps: int = 0,
    layout: Literal["contiguous", "random"] = "contiguous",
) -> optax.GradientTransformationExtraArgs:
    r"""The i.i.d. element-wise mask (the ablation of the paper's rate theory, §5.1).

    Every phase keeps one group of a fresh partition of the coordinates into M groups,
    independently of the earlier phases, so :math:`\mathbb{E}[S_t] = \mathbf{1}` but
    :math:`\sum_{j} S^{(j)} \ne M\cdot\mathbf{1}` over a cycle: redrawn every step
    (``steps_per_mask=1``) it loses OMGD's rate (:math:`t^{-1}` instead of :math:`t^{-2}` on
    least squares, Thm 5.3/5.4).

    .. math::
        g_t = S_t \odot \nabla f(\theta_t),\qquad S_t = M\,\mathbb{1}_{G_t},\quad
        G_t \text{ i.i.d. over phases}.

    This is exactly ``omgd_mask(num_masks, steps_per_mask, granularity="element",
    traversal="iid", ...)``. ``layout="random"`` gives every coordinate a random group (the
    theory's fine-grained mask); ``"contiguous"`` (the core's default) keeps a random band.

    Args:
      num_masks: M (keep ratio 1/M).
      steps_per_mask: K, steps each mask is held (1: redrawn every step).
      key: PRNG key or int seed.
      scale: multiply kept entries by M.
      warmup_steps: full-gradient steps first.
      layout: ``"contiguous"`` bands or a ``"random"`` hash partition.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (state: the key and a step counter).

    Examples:
      >>> import jax.numpy as jnp, numpy as np, omgd_jax
      >>> tx = omgd_jax.iid_element_mask(4, key=0)
      >>> g = {"w": jnp.ones(8)}
      >>> u, _ = tx.update(g, tx.init(g))
      >>> print(np.unique(np.asarray(u["w"]), return_counts=True)[1])  # 2 of 8 kept, times 4
      [6 2]

    References:
      Yang et al., Omni-Masked Gradient Descent, arXiv 2603.05960, 2026 (§5.1, Fig. 2).
    """
    return omgd_mask(
        num_masks,
        steps_per_mask,
        key=key,
        granularity="element",
        traversal="iid",
        scale=scale,
        warmup_steps=warmup_steps,
        layout=layout,
    )
