"""benchmarks/wor_vs_iid.py: the paired protocol, tuning, resume and summary (--quick)."""

import dataclasses
import math

import numpy as np
import pytest

from benchmarks import report
from benchmarks import wor_vs_iid as w


@pytest.fixture(scope="session")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("wor") / "wor.json"
    doc = w.main(["--quick", "--out", str(out), "--regimes", "pretrain,finetune", "--no-progress"])
    return out, doc


def _compare(doc, regime):
    return [r for r in doc["records"] if r["regime"] == regime and r["phase"] == "compare"]


def test_pairing_same_start_and_batches_within_a_seed(quick):
    _, doc = quick
    recs = _compare(doc, "pretrain")
    assert {r["method"] for r in recs} == set(w.PRETRAIN_METHODS)
    by_seed = {}
    for r in recs:
        by_seed.setdefault(r["seed"], []).append(r)
    assert sorted(by_seed) == list(w.QUICK.seeds)
    for rs in by_seed.values():
        assert len(rs) == len(w.PRETRAIN_METHODS)
        for field in ("init_digest", "batches_digest", "first_batch_digest", "traversal_key"):
            assert len({r[field] for r in rs}) == 1, field
        # only the traversal differs, and it does change the result
        losses = {r["method"]: r["final_val_loss"] for r in rs}
        assert losses["LISA"] != losses["LISA-wor"]
    for field in ("init_digest", "batches_digest", "traversal_key"):
        assert len({rs[0][field] for rs in by_seed.values()}) == len(by_seed), field
    assert all(doc["meta"]["summary"]["pretrain"]["pairing"].values())
    # fine-tuning: one checkpoint for every seed, each seed its own batches
    ft = doc["meta"]["summary"]["finetune"]["pairing"]
    assert ft["same_start_within_seed"] and ft["same_batches_within_seed"]
    assert ft["distinct_batches_across_seeds"] and not ft["distinct_starts_across_seeds"]


def test_data_order_is_independent_of_the_traversal():
    a = w.batch_offsets(3, 5, 4, 10_000, 16)
    np.testing.assert_array_equal(a, w.batch_offsets(3, 5, 4, 10_000, 16))
    # a longer run sees the same first batches (the warm-up's batches are a prefix)
    np.testing.assert_array_equal(a, w.batch_offsets(3, 9, 4, 10_000, 16)[:5])
    assert not np.array_equal(a, w.batch_offsets(4, 5, 4, 10_000, 16))
    assert w.traversal_key(3) != w.traversal_key(4)
    assert a.min() >= 0 and a.max() < 10_000 - 17


def test_same_start_gives_same_first_step_only_the_traversal_differs(quick):
    s = w.QUICK
    trainer = w.trainer_for(s)  # the programs the quick run compiled
    rng = np.random.default_rng(0)
    corpus = w.Corpus(rng.integers(1, 256, 5000).astype(np.uint8),
                      rng.integers(1, 256, 500).astype(np.uint8), "random bytes")  # fmt: skip
    start = w.warm_start(trainer, corpus, w.val_windows(corpus, s), 0, s.warmup, s.warmup_lr)
    runs = {m: w.train_run(trainer, m, start, 0, 1e-2) for m in ("LISA", "LISA-wor")}
    a, b = runs["LISA"], runs["LISA-wor"]
    assert a["init_digest"] == b["init_digest"] == w.digest(start.params)
    assert a["first_batch_digest"] == b["first_batch_digest"]
    assert a["val_loss"][0] == b["val_loss"][0]  # evaluated before any step
    assert a["val_loss"][1:] != b["val_loss"][1:]


def test_summary_has_means_pairs_and_tuned_lrs(quick):
    out, doc = quick
    assert report.load(out)["records"] == doc["records"]
    assert out.with_suffix(".png").stat().st_size > 10_000
    sm = doc["meta"]["summary"]["pretrain"]
    for m in w.PRETRAIN_METHODS:
        f = sm["methods"][m]["final_val_loss"]
        assert f["ci_low"] <= f["mean"] <= f["ci_high"] and math.isfinite(f["mean"])
        t = sm["tuning"][m]
        assert sm["methods"][m]["lr"] == t["lr"] in t["grid"]
        assert set(w.QUICK.grid) <= set(t["grid"])
        tuned = [r for r in doc["records"] if r["regime"] == "pretrain" and r["phase"] == "tune"
                 and r["method"] == m]  # fmt: skip
        assert {r["seed"] for r in tuned} == set(w.QUICK.tune_seeds)
        assert not set(w.QUICK.tune_seeds) & set(sm["seeds"])
        best = min(tuned, key=lambda r: r["final_val_loss"])
        assert best["lr"] == t["lr"]
    for key in ("LISA-wor - LISA", "LISA-wor - LISA-wor without scale"):
        for metric in ("final_val_loss", "val_auc"):
            p = sm["pairs"][key][metric]
            assert p["n"] == len(w.QUICK.seeds)
            assert p["ci_low"] <= p["mean_diff"] <= p["ci_high"] and 0 <= p["p_value"] <= 1
    a = {r["seed"]: r["final_val_loss"] for r in _compare(doc, "pretrain")
         if r["method"] == "LISA-wor"}  # fmt: skip
    b = {r["seed"]: r["final_val_loss"] for r in _compare(doc, "pretrain")
         if r["method"] == "LISA"}  # fmt: skip
    d = [a[x] - b[x] for x in sm["seeds"]]
    assert sm["pairs"]["LISA-wor - LISA"]["final_val_loss"]["mean_diff"] == pytest.approx(
        np.mean(d)
    )
    assert set(doc["meta"]["summary"]["finetune"]["methods"]) == set(w.FINETUNE_METHODS)
    assert "AdamW" in w.describe(doc["meta"]["summary"])


def test_resume_trains_nothing_new(quick):
    out, doc = quick
    again = w.main(["--quick", "--out", str(out), "--regimes", "pretrain,finetune",
                    "--no-progress"])  # fmt: skip
    assert again["records"] == doc["records"]


def test_widen_moves_past_the_edge_of_the_grid():
    grid = [1e-3, 2e-3, 4e-3]
    assert w.widen(grid, {1e-3: 1.0, 2e-3: 2.0, 4e-3: 3.0}) == 5e-4
    assert w.widen(grid, {1e-3: 3.0, 2e-3: 2.0, 4e-3: 1.0}) == 8e-3
    assert w.widen(grid, {1e-3: 3.0, 2e-3: 1.0, 4e-3: 2.0}) is None
    assert w.widen(grid, {1e-3: math.inf, 2e-3: math.inf, 4e-3: math.inf}) is None


def test_table4_pairs_the_seeds_and_reports_differences(tmp_path, monkeypatch):
    from examples import image_classification as ic

    calls = []
    planted = {"full": 0.90, "iid": 0.88, "wor": 0.89}

    def fake_train(method, data, *, seed, **kw):
        calls.append((method, seed, tuple(sorted(kw.items()))))
        return {"test_accuracy": planted[method] + 0.01 * np.sin(seed + 0.1), "seconds": 0.0}

    monkeypatch.setattr(ic, "train", fake_train)
    monkeypatch.setattr(ic, "load_dataset", lambda name, **kw: (0, 0, 0, 0, {"dataset": name}))
    s = dataclasses.replace(w.QUICK, t4_seeds=(0, 1, 2))
    results = w.Results(tmp_path / "t4.json", s, quick=True)
    sm = w.table4_regime(results, progress=False)
    assert len(calls) == 9
    for seed in (0, 1, 2):  # every method of a seed gets the same seed and settings
        assert len({c[1:] for c in calls if c[1] == seed}) == 1
    pair = sm["pairs"]["wor - iid"]["test_accuracy"]
    assert pair["mean_diff"] == pytest.approx(0.01) and pair["ci_low"] > 0
    assert sm["pairs"]["iid - full"]["test_accuracy"]["ci_high"] < 0
    # a second pass finds every run stored and trains nothing
    w.table4_regime(w.Results(tmp_path / "t4.json", s, quick=True), progress=False)
    assert len(calls) == 9


def test_more_seeds_extend_a_stored_file_other_settings_do_not(tmp_path):
    path = tmp_path / "r.json"
    first = w.Results(path, w.QUICK, quick=True)
    rec = {"regime": "pretrain", "phase": "compare", "method": "LISA", "lr": 0.01, "seed": 0}
    first.add(rec)
    more = w.Results(path, dataclasses.replace(w.QUICK, seeds=(0, 1, 2, 3)), quick=True)
    assert more.find(**rec) is not None
    other = w.Results(path, dataclasses.replace(w.QUICK, n_embd=8), quick=True)
    assert other.find(**rec) is None and other.records() == []
