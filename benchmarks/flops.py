"""Matmul FLOPs of a function, counted on its jaxpr.

XLA's ``cost_analysis()`` counts the body of a loop once, so a step whose layers run in a
``lax.scan`` would be undercounted N_L times; the jaxpr knows every loop's length. Only
``dot_general`` is counted (2 x output elements x contracted size): the matmuls are what the
lean step skips, and the rest (norms, softmax, the update) is memory-bound.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
from jax.extend import core as jex_core

# Weights of the equations whose cost the jaxpr cannot tell: (eqn) -> one weight per branch of
# a cond (e.g. the share of a cycle's phases taking it), or [expected trip count] of a while
# loop (a traced trip count). None: a cond's costliest branch; a while loop must be weighted.
CondWeights = Callable[[jex_core.JaxprEqn], Sequence[float] | None]


def lean_layer_shares(n_layer: int, gamma: int) -> CondWeights:
    """Trip counts of the lean backward's loops over inactive layers, averaged over a cycle.

    The lean backward (`omgd_jax.scan_layers`) runs a loop of input cotangents above each
    active layer, and one below the lowest when the input's cotangent is needed (an embedding
    upstream trains); each active layer runs outside them. The gamma active layers of a phase
    are a uniformly random gamma-subset of the N_L (a group of the cycle's random partition),
    which splits the N_L - gamma others into gamma + 1 runs of (N_L - gamma) / (gamma + 1)
    layers each on average: every loop's expected trip count.
    """
    from omgd_jax._src.layer_scan import INPUT_ONLY_SCOPE

    trips = (n_layer - gamma) / (gamma + 1)

    def weights(eqn):
        # inside the backward the scope reads "transpose(jvp(omgd_input_cotangents))"
        if eqn.primitive.name == "while" and INPUT_ONLY_SCOPE in str(eqn.source_info.name_stack):
            return [trips]
        return None

    return weights


def lean_cycle_shares(n_layer: int, gamma: int, num_extra: int = 0) -> CondWeights:
    """Weights averaged over a whole cycle of a traversal with ``num_extra`` units beyond the
    layers (``units=``): the lean step's switch over the kinds of phase (named ``omgd_phase``,
    branches: layers, unit 0, ..., unit E-1) takes its layers branch in N_L / gamma of the
    cycle's N_L / gamma + E phases and each unit's in one; inside the layers branch the loops
    over inactive layers are weighted as `lean_layer_shares` weights them."""
    from omgd_jax._src.lean import PHASE_SCOPE

    layer = lean_layer_shares(n_layer, gamma)
    phases = n_layer // gamma
    total = phases + num_extra

    def weights(eqn):
        scope = str(eqn.source_info.name_stack).split("/")
        if (
            eqn.primitive.name == "cond"
            and PHASE_SCOPE in scope
            and len(eqn.params["branches"]) == num_extra + 1
        ):
            return [phases / total] + [1 / total] * num_extra
        return layer(eqn)

    return weights


def dot_flops(eqn) -> int:
    (contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    out = eqn.outvars[0].aval.shape
    return 2 * math.prod(out) * math.prod(lhs[d] for d in contract)


def _inner(eqn):
    """The one sub-jaxpr of a call-like equation whose inputs and outputs are the eqn's."""
    for name in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        j = eqn.params.get(name)
        if j is not None:
            j = getattr(j, "jaxpr", j)
            if len(j.invars) == len(eqn.invars) and len(j.outvars) == len(eqn.outvars):
                return j
    return None


def _used(var, used) -> bool:
    return not isinstance(var, jex_core.Literal) and var in used


def live_flops(jaxpr, outs_used, cond_weights=None) -> tuple[float, list[bool]]:
    """FLOPs of the equations that reach a used output (dead code, which XLA removes, is not
    counted), and which inputs are used."""
    used = {v for v, u in zip(jaxpr.outvars, outs_used, strict=True) if u and not
            isinstance(v, jex_core.Literal)}  # fmt: skip
    total = 0.0
    for eqn in reversed(jaxpr.eqns):
        outs = [_used(v, used) for v in eqn.outvars]
        if not any(outs) and not eqn.effects:
            continue
        name, ins = eqn.primitive.name, [True] * len(eqn.invars)
        if name == "dot_general":
            total += dot_flops(eqn)
        elif name == "scan":
            body, n_consts = eqn.params["jaxpr"].jaxpr, eqn.params["num_consts"]
            n_carry = eqn.params["num_carry"]
            carry = outs[:n_carry]
            while True:  # a carry is live if the body reads it to make anything live
                flops, ins = live_flops(body, carry + outs[n_carry:], cond_weights)
                grown = [a or b for a, b in zip(carry, ins[n_consts:], strict=False)]
                if grown == carry:
                    break
                carry = grown
            total += eqn.params["length"] * flops
        elif name == "cond":
            counted = [live_flops(b.jaxpr, outs, cond_weights) for b in eqn.params["branches"]]
            weights = cond_weights(eqn) if cond_weights is not None else None
            flops = [f for f, _ in counted]
            total += (
                max(flops)
                if weights is None
                else sum(w * f for w, f in zip(weights, flops, strict=True))
            )
            ins = [True] + [any(c[1][i] for c in counted) for i in range(len(eqn.invars) - 1)]
        elif name == "while":
            trips = cond_weights(eqn) if cond_weights is not None else None
            if trips is None:
                raise ValueError("live_flops: a while loop has no static trip count; weight it")
            body, n_consts = eqn.params["body_jaxpr"].jaxpr, eqn.params["body_nconsts"]
            carry = outs
            while True:  # as for a scan: a carry is live if the body reads it for one that is
                flops, body_ins = live_flops(body, carry, cond_weights)
                grown = [a or b for a, b in zip(carry, body_ins[n_consts:], strict=True)]
                if grown == carry:
                    break
                carry = grown
            total += trips[0] * flops
            ins = [True] * eqn.params["cond_nconsts"] + body_ins[:n_consts] + carry
        elif (inner := _inner(eqn)) is not None:
            flops, ins = live_flops(inner, outs, cond_weights)
            total += flops
        else:
            for j in _sub_jaxprs(eqn):  # anything else: counted whole
                total += live_flops(j, [True] * len(j.outvars), cond_weights)[0]
        used.update(v for v, u in zip(eqn.invars, ins, strict=True) if u and not
                    isinstance(v, jex_core.Literal))  # fmt: skip
    return total, [v in used for v in jaxpr.invars]


def _sub_jaxprs(eqn):
    for v in eqn.params.values():
        for j in v if isinstance(v, list | tuple) else (v,):
            if isinstance(j, jex_core.ClosedJaxpr):
                yield j.jaxpr
            elif isinstance(j, jex_core.Jaxpr):
                yield j


def count(fn, *args, cond_weights: CondWeights | None = None) -> float:
    """Matmul FLOPs of ``fn(*args)`` (arrays or ShapeDtypeStructs), dead code left out."""
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    return live_flops(jaxpr, [True] * len(jaxpr.outvars), cond_weights)[0]
