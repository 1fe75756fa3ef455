"""benchmarks/paired_stats.py on synthetic paired data with known answers."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks import paired_stats as ps


def test_t_quantile_matches_tables():
    # Student-t tables: t_{0.975, 7} = 2.3646, t_{0.975, 1} = 12.706, t_{0.975, 30} = 2.0423.
    assert ps.t_quantile(0.975, 7) == pytest.approx(2.364624, abs=1e-6)
    assert ps.t_quantile(0.975, 1) == pytest.approx(12.706205, abs=1e-6)
    assert ps.t_quantile(0.975, 30) == pytest.approx(2.042272, abs=1e-6)
    assert ps.t_quantile(0.5, 5) == pytest.approx(0.0, abs=1e-12)


def test_paired_difference_by_hand():
    a = [1.0, 2.0, 3.0, 4.0]
    b = [0.5, 1.0, 3.5, 2.0]  # d = 0.5, 1.0, -0.5, 2.0
    r = ps.paired_difference(a, b)
    d = np.array([0.5, 1.0, -0.5, 2.0])
    se = d.std(ddof=1) / 2
    assert r["mean_diff"] == pytest.approx(0.75)
    assert r["se"] == pytest.approx(se)
    assert r["ci_low"] == pytest.approx(0.75 - 3.182446 * se, rel=1e-5)
    assert r["ci_high"] == pytest.approx(0.75 + 3.182446 * se, rel=1e-5)
    assert r["t"] == pytest.approx(0.75 / se)
    assert r["df"] == 3 and r["n"] == 4 and r["wins_a"] == 1
    # the paired t-test: scipy.stats.ttest_rel(a, b) gives t = 1.4412, p = 0.24519
    assert r["p_value"] == pytest.approx(0.245194, abs=1e-5)
    # sign flips: of the 16 patterns, those with |sum| >= 3 are +-(+,+,-,+), +-(+,+,+,+)
    # and +-(-,+,+,+) (|sum| 3, 4, 3): 6 of 16
    assert r["p_sign_flip"] == pytest.approx(6 / 16)


def test_pairing_removes_the_seed_spread():
    rng = np.random.default_rng(0)
    seed_effect = rng.normal(0, 1.0, 8)  # large, shared by both methods of a seed
    a = 2.0 + seed_effect + rng.normal(0, 0.01, 8)
    b = 2.05 + seed_effect + rng.normal(0, 0.01, 8)
    r = ps.paired_difference(a, b)
    assert r["ci_high"] < 0 and r["p_value"] < 1e-4 and r["wins_a"] == 8
    # unpaired, the same numbers would be hopeless: the means' intervals overlap widely
    ma, mb = ps.mean_ci(a), ps.mean_ci(b)
    assert ma["ci_high"] > mb["ci_low"] and mb["ci_high"] > ma["ci_low"]


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(8, 30),
    shift=st.floats(0.05, 5.0),
    noise=st.floats(1e-3, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_planted_difference_is_detected(n, shift, noise, seed):
    """A difference of 6 standard errors or more is found: CI excludes 0 with the right sign."""
    rng = np.random.default_rng(seed)
    base = rng.normal(3.0, 1.0, n)
    eps = rng.normal(0.0, 1.0, n)
    eps = (eps - eps.mean()) / eps.std(ddof=1)  # noise of exactly sd `noise`
    d = eps * noise  # mean exactly 0
    delta = 6 * noise / math.sqrt(n) + shift * noise  # at least 6 standard errors
    r = ps.paired_difference(base + delta + d, base)
    assert r["ci_low"] > 0 and r["mean_diff"] == pytest.approx(delta, rel=1e-6)
    assert r["p_value"] < 0.01
    r = ps.paired_difference(base, base + delta + d)
    assert r["ci_high"] < 0 and r["p_value"] < 0.01


def test_no_difference_interval_covers_zero_at_its_level():
    """Under no difference the 95% interval covers 0 in about 95% of experiments, and the
    t-test's and sign-flip test's p-values fall below 0.05 in about 5%."""
    rng = np.random.default_rng(1)
    trials, n = 2000, 8
    covered = rejected_t = rejected_flip = 0
    for _ in range(trials):
        base = rng.normal(2.0, 1.0, n)
        r = ps.paired_difference(base + rng.normal(0, 0.1, n), base + rng.normal(0, 0.1, n))
        covered += r["ci_low"] <= 0.0 <= r["ci_high"]
        rejected_t += r["p_value"] < 0.05
        rejected_flip += r["p_sign_flip"] < 0.05
    # binomial sd of a 95% rate over 2000 trials: 0.49%; allow 4 sd
    assert abs(covered / trials - 0.95) < 0.02
    assert abs(rejected_t / trials - 0.05) < 0.02
    assert rejected_flip / trials < 0.07
    # the interval and the test agree: covers 0 exactly when p >= 0.05
    assert covered == trials - rejected_t


@given(st.lists(st.floats(-10, 10), min_size=2, max_size=12), st.floats(-3, 3))
@settings(max_examples=50, deadline=None)
def test_shifting_one_method_shifts_only_the_mean(values, c):
    a = np.asarray(values)
    b = a[::-1].copy()
    r0, r1 = ps.paired_difference(a, b), ps.paired_difference(a + c, b)
    assert r1["mean_diff"] == pytest.approx(r0["mean_diff"] + c, abs=1e-9)
    assert r1["sd_diff"] == pytest.approx(r0["sd_diff"], abs=1e-7)
    assert r1["ci_high"] - r1["ci_low"] == pytest.approx(r0["ci_high"] - r0["ci_low"], abs=1e-6)


def test_constant_difference_and_bad_input():
    r = ps.paired_difference([1.0, 2.0, 3.0], [0.0, 1.0, 2.0])
    assert r["sd_diff"] == 0 and r["ci_low"] == r["ci_high"] == 1.0 and r["p_value"] == 0.0
    r = ps.paired_difference([1.0, 2.0], [1.0, 2.0])
    assert r["mean_diff"] == 0 and r["p_value"] == 1.0
    with pytest.raises(ValueError, match="pair up"):
        ps.paired_difference([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="at least 2"):
        ps.paired_difference([1.0], [2.0])
    with pytest.raises(ValueError, match="non-finite"):
        ps.paired_difference([1.0, float("nan")], [2.0, 3.0])


def test_mean_ci_and_curve_area():
    r = ps.mean_ci([1.0, 2.0, 3.0])
    assert r["mean"] == 2.0 and r["sd"] == 1.0
    assert r["half_width"] == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert ps.curve_area([0, 1, 2], [3.0, 3.0, 3.0]) == pytest.approx(3.0)
    assert ps.curve_area([0, 10], [4.0, 2.0]) == pytest.approx(3.0)
    assert ps.curve_area([0, 1, 3], [2.0, 0.0, 0.0]) == pytest.approx(1.0 / 3)
    with pytest.raises(ValueError, match="increase"):
        ps.curve_area([0, 0], [1.0, 2.0])


def test_sign_flip_monte_carlo_beyond_exact_range():
    rng = np.random.default_rng(3)
    d = rng.normal(0.0, 1.0, 20)
    p = ps.sign_flip_p_value(d)
    assert 0.0 < p <= 1.0
    assert ps.sign_flip_p_value(d + 5.0) < 1e-3
