"""Paired comparisons of two methods run on the same seeds: mean difference, 95% CI, tests.

For seeds s = 1..n, method A gives a_s and method B gives b_s on the *same* initialisation and
data order (only the method differs), so the seed-to-seed spread cancels in d_s = a_s - b_s:

* :func:`paired_difference`: mean of d, its Student-t confidence interval
  ``mean ± t_{1-α/2, n-1} · sd(d)/√n`` (sd with ddof 1), the two-sided paired t-test and an exact
  sign-flip permutation test (all 2^n sign patterns for n ≤ 16, a seeded Monte-Carlo sample
  beyond), which assumes only that d is symmetric about 0 under the null;
* :func:`mean_ci`: one method's mean with its t interval;
* :func:`curve_area`: the normalised area under a validation curve (its trapezoid mean).

The t distribution comes from ``scipy.stats`` (a dependency of jax, so always installed).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
from scipy import stats

EXACT_SIGN_FLIPS = 16  # up to 2^16 = 65536 patterns enumerated exactly
MONTE_CARLO_FLIPS = 100_000


def _as_vector(x: Sequence[float], name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} holds non-finite values: {a}")
    return a


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with ``df`` degrees of freedom."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    return float(stats.t.ppf(p, df))


def mean_ci(x: Sequence[float], confidence: float = 0.95) -> dict:
    """Mean of ``x`` with its Student-t interval (sd with ddof 1); n, sd and the half width."""
    a = _as_vector(x, "x")
    n = len(a)
    if n < 2:
        raise ValueError(f"need at least 2 values for an interval, got {n}")
    mean, sd = float(a.mean()), float(a.std(ddof=1))
    half = t_quantile(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "ci_low": mean - half, "ci_high": mean + half,
            "half_width": half, "confidence": confidence}  # fmt: skip


def sign_flip_p_value(d: Sequence[float], *, seed: int = 0) -> float:
    """Two-sided p-value of the sign-flip test of "d is symmetric about 0" with |mean(d)| as the
    statistic: the share of sign patterns whose |mean| reaches the observed one (exact for
    n <= 16, else a Monte-Carlo estimate over ``MONTE_CARLO_FLIPS`` patterns, observed included).
    """
    a = _as_vector(d, "d")
    n = len(a)
    if n < 1:
        raise ValueError("need at least one difference")
    observed = abs(a.mean())
    tol = 1e-12 * max(1.0, float(np.abs(a).max()))
    if n <= EXACT_SIGN_FLIPS:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
        means = np.abs(signs @ a) / n
        return float(np.mean(means >= observed - tol))
    rng = np.random.default_rng(seed)
    signs = rng.choice((1.0, -1.0), size=(MONTE_CARLO_FLIPS, n))
    hits = np.sum(np.abs(signs @ a) / n >= observed - tol)
    return float((hits + 1) / (MONTE_CARLO_FLIPS + 1))


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> dict:
    """The paired comparison of ``a`` against ``b`` (entry s of each from seed s).

    Returns a dict: ``n``, ``mean_a``, ``mean_b``, ``mean_diff`` (mean of a - b), ``sd_diff``
    (ddof 1), ``se``, ``ci_low``/``ci_high`` (the Student-t interval at ``confidence``), ``t``,
    ``df``, ``p_value`` (two-sided paired t-test), ``p_sign_flip`` (the permutation test),
    ``wins_a`` (seeds where a < b: lower is better for losses) and ``confidence``.

    A difference that is exactly constant over the seeds has sd 0: its interval is that one
    value and its t-test p-value is 0 (or 1 when the constant is 0).
    """
    x, y = _as_vector(a, "a"), _as_vector(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"a and b must pair up: {len(x)} against {len(y)} values")
    n = len(x)
    if n < 2:
        raise ValueError(f"need at least 2 pairs, got {n}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    d = x - y
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    se = sd / math.sqrt(n)
    df = n - 1
    half = t_quantile(0.5 + confidence / 2, df) * se
    if se > 0:
        t = mean / se
        p = float(2 * stats.t.sf(abs(t), df))
    else:
        t = math.copysign(math.inf, mean) if mean else 0.0
        p = 0.0 if mean else 1.0
    return {
        "n": n,
        "mean_a": float(x.mean()),
        "mean_b": float(y.mean()),
        "mean_diff": mean,
        "sd_diff": sd,
        "se": se,
        "ci_low": mean - half,
        "ci_high": mean + half,
        "t": t,
        "df": df,
        "p_value": p,
        "p_sign_flip": sign_flip_p_value(d),
        "wins_a": int(np.sum(d < 0)),
        "confidence": confidence,
    }


def curve_area(steps: Sequence[float], values: Sequence[float]) -> float:
    """The trapezoid mean of a curve over its span: ∫ v dt / (t_last - t_first).

    The area under a validation-loss curve, normalised so that it reads as a loss (the mean
    loss over the run); a curve lower everywhere has a lower area.
    """
    t, v = _as_vector(steps, "steps"), _as_vector(values, "values")
    if t.shape != v.shape or len(t) < 2:
        raise ValueError(f"need matching steps and values, at least 2 points; got {t.shape}, "
                         f"{v.shape}")  # fmt: skip
    if np.any(np.diff(t) <= 0):
        raise ValueError("steps must increase strictly")
    area = float(np.sum((v[1:] + v[:-1]) / 2 * np.diff(t)))
    return area / float(t[-1] - t[0])
