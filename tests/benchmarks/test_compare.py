"""benchmarks/compare.py --quick on a synthetic byte-level corpus (no downloads): one record per
method with its grid, seeds, memory and timing fields, and both figures."""

import json

import numpy as np
import pytest

from benchmarks import compare
from examples.gpt2.plot import pareto_front


@pytest.fixture(scope="module")
def byte_data(tmp_path_factory):
    """A first-order Markov chain over the 256 byte values: learnable, no downloads."""
    d = tmp_path_factory.mktemp("bytes")
    rng = np.random.default_rng(0)
    cum = np.cumsum(rng.dirichlet(np.full(256, 0.05), size=256), axis=1)
    for split, n, seed in (("train", 8_000, 1), ("val", 2_000, 2)):
        u = np.random.default_rng(seed).random(n)
        out, s = np.empty(n, np.uint16), 0
        for i in range(n):
            s = min(int(np.searchsorted(cum[s], u[i])), 255)
            out[i] = s
        out.tofile(d / f"{split}.bin")
    return d


def test_quick_comparison_writes_every_method_and_both_figures(byte_data, tmp_path):
    out = tmp_path / "res" / "compare.json"
    compare.main(["--quick", "--data", str(byte_data), "--out", str(out), "--no-progress"])
    doc = json.loads(out.read_text())
    assert "partial" not in doc
    recs = {r["method"]: r for r in doc["records"]}
    assert list(recs) == [m for m, _, _ in compare.METHODS]
    assert [r["optimizer"] for r in doc["records"]] == [o for _, o, _ in compare.METHODS]
    seeds = doc["setting"]["seeds"]
    for r in doc["records"]:
        assert [g["lr"] for g in r["lr_grid"]] == list(compare.QUICK_LR_GRID)
        assert r["best_lr"] == min(r["lr_grid"], key=lambda g: g["val_loss"])["lr"]
        assert r["seeds"] == list(range(seeds)) and len(r["val_loss"]) == seeds
        assert r["val_loss_mean"] == pytest.approx(np.mean(r["val_loss"]))
        assert r["val_loss_std"] == pytest.approx(np.std(r["val_loss"], ddof=1))
        assert r["lr_grid"][0]["val_loss"] == r["val_loss"][0]  # seed 0 is the grid's run
        mem = r["memory"]
        assert r["peak_memory_bytes"] == mem["argument_bytes"] + mem["temp_bytes"]
        assert mem["argument_bytes"] >= doc["setting"]["param_bytes"] + r["opt_state_bytes"]
        assert len(r["best_run"]["train_loss"]) == doc["setting"]["steps"]
        assert r["step_time_s"] > 0 and r["step_time_rel_adamw"] > 0
    assert recs["AdamW"]["step_time_rel_adamw"] == 1.0
    params = doc["setting"]["param_bytes"]
    assert 2 * params <= recs["AdamW"]["opt_state_bytes"] < 2 * params + 64  # 2 moments, counts
    lean = [r for r in doc["records"] if r["train_step"] == "lean_train_step"]
    assert [r["optimizer"] for r in lean] == ["omgd-layer", "lisa", "lisa-wor-noscale"]
    for r in lean + [recs["OMGD-element (compact, M=4)"], recs["GaLore"], recs["MoFaSGD"]]:
        assert r["opt_state_bytes"] < recs["AdamW"]["opt_state_bytes"]
    # different seeds: other parameters, data and masks
    assert len(set(recs["LISA"]["val_loss"])) == seeds
    for key in ("loss", "pareto"):
        png = out.parent / doc["figures"][key]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pareto_front_keeps_the_points_nothing_beats():
    points = [(3.0, 1.0), (1.0, 3.0), (2.0, 2.0), (2.5, 2.5), (1.5, 3.5)]
    assert pareto_front(points) == [1, 2, 0]  # (2.5, 2.5) and (1.5, 3.5) are dominated
