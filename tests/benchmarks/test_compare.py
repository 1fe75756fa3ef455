"""benchmarks/compare.py --quick on a synthetic byte-level corpus (no downloads): one record per
method with its grid, seeds, memory and timing fields, and both figures."""

import json

import numpy as np
import pytest

from benchmarks import compare, report
from examples.gpt2.plot import pareto_front


@pytest.fixture(scope="session")
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
    doc = report.load(out)
    meta = doc["meta"]
    assert "partial" not in meta and set(doc) == {"meta", "records"}
    assert meta["command"].startswith("python -m benchmarks.compare --quick")
    assert meta["backend"] == "cpu" and meta["wall_s"] > 0
    setting = meta["setting"]
    recs = {r["method"]: r for r in doc["records"]}
    assert list(recs) == [m for m, _, _ in compare.METHODS]
    assert [r["optimizer"] for r in doc["records"]] == [o for _, o, _ in compare.METHODS]
    seeds = setting["seeds"]
    for r in doc["records"]:
        assert [g["lr"] for g in r["lr_grid"]] == list(compare.QUICK_LR_GRID)
        assert r["best_lr"] == min(r["lr_grid"], key=lambda g: g["val_loss"])["lr"]
        assert r["lr_position"] == "only"  # one rate: nothing tuned, nothing to warn about
        assert r["seeds"] == list(range(seeds)) and len(r["val_loss"]) == seeds
        assert r["val_loss_mean"] == pytest.approx(np.mean(r["val_loss"]))
        assert r["val_loss_std"] == pytest.approx(np.std(r["val_loss"], ddof=1))
        assert r["lr_grid"][0]["val_loss"] == r["val_loss"][0]  # seed 0 is the grid's run
        mem = r["memory"]
        assert r["peak_memory_bytes"] == mem["argument_bytes"] + mem["temp_bytes"]
        assert mem["argument_bytes"] >= setting["param_bytes"] + r["opt_state_bytes"]
        remat = r["memory_remat"]  # the same step with per-block remat, the same definition
        if r["optimizer"] not in compare.QUICK_REMAT_METHODS:  # --quick: a few methods only
            assert remat is None and r["peak_memory_remat_bytes"] is None
        else:
            assert r["peak_memory_remat_bytes"] == remat["argument_bytes"] + remat["temp_bytes"]
            assert remat["argument_bytes"] == mem["argument_bytes"]  # same donated state, batch
            assert r["peak_memory_remat_bytes"] < r["peak_memory_bytes"]
        assert len(r["best_run"]["train_loss"]) == setting["steps"]
        assert r["step_time_s"] > 0 and r["step_time_rel_adamw"] > 0
    assert recs["AdamW"]["step_time_rel_adamw"] == 1.0
    params = setting["param_bytes"]
    assert 2 * params <= recs["AdamW"]["opt_state_bytes"] < 2 * params + 64  # 2 moments, counts
    lean = [r for r in doc["records"] if r["train_step"] == "lean_train_step"]
    assert [r["optimizer"] for r in lean] == [
        "omgd-layer", "lisa", "lisa-wor-noscale", "omgd-layer-rotate", "omgd-layer-frozen-embedding"
    ]  # fmt: skip
    for r in lean + [recs["OMGD-element (compact, M=4)"], recs["GaLore"], recs["MoFaSGD"]]:
        assert r["opt_state_bytes"] < recs["AdamW"]["opt_state_bytes"]
    # with remat the lean step keeps far less than its no-remat step (the committed table's test
    # compares it with AdamW's too)
    assert "lisa" in compare.QUICK_REMAT_METHODS
    lisa = recs["LISA"]
    assert lisa["peak_memory_remat_bytes"] < 0.8 * lisa["peak_memory_bytes"]
    assert setting["lr_grids"] == {o: list(compare.QUICK_LR_GRID) for _, o, _ in compare.METHODS}
    assert meta["lr_at_grid_edge"] == {}
    # different seeds: other parameters, data and masks
    assert len(set(recs["LISA"]["val_loss"])) == seeds
    for key in ("loss", "pareto"):
        png = out.parent / meta["figures"][key]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pareto_front_keeps_the_points_nothing_beats():
    points = [(3.0, 1.0), (1.0, 3.0), (2.0, 2.0), (2.5, 2.5), (1.5, 3.5)]
    assert pareto_front(points) == [1, 2, 0]  # (2.5, 2.5) and (1.5, 3.5) are dominated


# ------------------------------------------------------------- --methods and --merge (no training)
LABELS = [label for label, _, _ in compare.METHODS]


def record(label, loss):
    """A record with the fields the table and figures read; `loss` tells runs apart."""
    optimizer = dict((m, o) for m, o, _ in compare.METHODS).get(label, "x")
    return {"method": label, "optimizer": optimizer, "best_lr": 1e-3, "val_loss_mean": loss,
            "val_loss_std": 0.01, "opt_state_bytes": 2**20, "peak_memory_bytes": 2**22,
            "step_time_rel_adamw": 1.0, "best_run": {"train_loss": [loss + 1, loss + 0.5, loss],
                                                     "val": [(3, loss)]}}  # fmt: skip


def document(labels, loss, partial=False, commit="c0", **setting):
    base = dict(preset="small-bytes", steps=3, seeds=2, quick=False, tokens_per_run=24)
    meta = {"commit": commit, "date": "d0", "setting": {**base, **setting}}
    return {"meta": {**meta, "partial": True} if partial else meta,
            "records": [record(m, loss) for m in labels]}  # fmt: skip


def test_select_methods_takes_labels_or_optimizer_names_and_adds_adamw():
    assert [m[0] for m in compare.select_methods("MoFaSGD")] == ["AdamW", "MoFaSGD"]
    assert [m[0] for m in compare.select_methods("mofasgd, LISA")] == ["AdamW", "LISA", "MoFaSGD"]
    # a label with commas of its own, then another
    chosen = compare.select_methods("OMGD-layer (LISA-wor, compact, lean step),magma")
    assert [m[1] for m in chosen] == ["adamw", "omgd-layer", "magma"]
    assert compare.select_methods("adamw") == compare.METHODS[:1]
    with pytest.raises(ValueError, match=r"unknown method 'Adam'.*'MoFaSGD' \(mofasgd\)"):
        compare.select_methods("MoFaSGD,Adam")


def test_methods_flag_refuses_unknown_names_before_training(capsys, tmp_path):
    with pytest.raises(SystemExit):
        compare.main(["--out", str(tmp_path / "c.json"), "--data", "x", "--methods", "sgd"])
    err = capsys.readouterr().err
    assert "unknown method 'sgd'" in err and "'GaLore' (galore)" in err


def test_merge_replaces_the_methods_run_and_keeps_the_others():
    old = document(LABELS, loss=3.0)
    new = document(["AdamW", "MoFaSGD"], loss=2.0, commit="c1", wall_s=5.0)
    doc = compare.merge(old, new)
    assert [r["method"] for r in doc["records"]] == LABELS  # METHODS order
    losses = {r["method"]: r["val_loss_mean"] for r in doc["records"]}
    assert losses == {m: (2.0 if m in ("AdamW", "MoFaSGD") else 3.0) for m in LABELS}
    assert set(doc) == {"meta", "records"}
    assert "partial" not in doc["meta"] and doc["meta"]["setting"]["wall_s"] == 5.0
    # the meta is the new run's; the kept records say which run they come from
    assert doc["meta"]["commit"] == "c1"
    kept = doc["meta"]["kept_from_earlier_run"]
    assert kept == {"methods": [m for m in LABELS if m not in ("AdamW", "MoFaSGD")],
                    "commit": "c0", "date": "d0"}  # fmt: skip
    # the README's case: a partial document missing MoFaSGD becomes complete
    missing = document(LABELS[:-1], loss=3.0, partial=True)
    done = compare.merge(missing, document(["AdamW", "MoFaSGD"], loss=2.0))
    assert [r["method"] for r in done["records"]] == LABELS and "partial" not in done["meta"]
    # still partial: a method missing, or the new run not finished
    assert compare.merge(document(LABELS[:5], 3.0), new)["meta"]["partial"] is True
    assert compare.merge(old, document(["AdamW"], 2.0, partial=True))["meta"]["partial"] is True
    assert compare.merge(None, new)["meta"]["partial"] is True
    assert "kept_from_earlier_run" not in compare.merge(None, new)["meta"]
    with pytest.raises(ValueError, match="steps: 3 there, 300 now"):
        compare.merge(old, document(["AdamW"], 2.0, steps=300))


def test_main_merge_keeps_the_file_whole_during_and_after_the_run(tmp_path, monkeypatch, capsys):
    out = tmp_path / "compare.json"
    out.write_text(json.dumps(document(LABELS[:-1], loss=3.0, partial=True)))
    seen = {}

    def fake_run(setting, data, grid, methods, progress, on_record):
        assert [m[0] for m in methods] == ["AdamW", "MoFaSGD"]
        on_record([record("AdamW", 2.0)])  # mid-run save: merged, the others still there
        seen["mid"] = report.load(out)
        return document(["AdamW", "MoFaSGD"], loss=2.0, steps=setting["steps"],
                        seeds=setting["seeds"], lr_grid=list(grid))  # fmt: skip

    monkeypatch.setattr(compare, "run", fake_run)
    args = ["--out", str(out), "--data", "x", "--steps", "3", "--seeds", "2", "--no-progress"]
    compare.main([*args, "--methods", "MoFaSGD", "--merge"])
    mid = seen["mid"]
    assert [r["method"] for r in mid["records"]] == LABELS[:-1] and mid["meta"]["partial"]
    doc = report.load(out)
    assert [r["method"] for r in doc["records"]] == LABELS and "partial" not in doc["meta"]
    assert doc["meta"]["command"] == "python -m benchmarks.compare " + " ".join(
        [*args, "--methods", "MoFaSGD", "--merge"]
    )
    losses = {r["method"]: r["val_loss_mean"] for r in doc["records"]}
    assert losses["MoFaSGD"] == losses["AdamW"] == 2.0 and losses["LISA"] == 3.0
    table = capsys.readouterr().out
    assert all(f"| {m} |" in table for m in LABELS)
    for key in ("loss", "pareto"):
        assert (out.parent / doc["meta"]["figures"][key]).read_bytes()[:4] == b"\x89PNG"
    # without --merge the file holds this run's methods only, marked partial
    compare.main([*args, "--methods", "MoFaSGD"])
    doc = report.load(out)
    assert [r["method"] for r in doc["records"]] == ["AdamW", "MoFaSGD"] and doc["meta"]["partial"]


def test_merge_refuses_a_file_of_the_earlier_format(tmp_path, capsys):
    out = tmp_path / "compare.json"
    old = document(LABELS, loss=3.0)
    out.write_text(json.dumps({"setting": old["meta"]["setting"], "records": old["records"]}))
    with pytest.raises(SystemExit):
        compare.main(["--out", str(out), "--data", "x", "--methods", "MoFaSGD", "--merge"])
    assert "not a results document" in capsys.readouterr().err


def test_merge_into_the_committed_table_keeps_its_provenance_with_its_records():
    committed = report.load(compare.__file__.replace("compare.py", "results/compare.json"))
    same = {k: v for k, v in committed["meta"]["setting"].items() if k in compare.MERGE_KEYS}
    doc = compare.merge(committed, document(["AdamW", "MoFaSGD"], loss=2.0, commit="c1", **same))
    assert [r["method"] for r in doc["records"]] == LABELS and "partial" not in doc["meta"]
    assert doc["meta"]["commit"] == "c1" and "converted" not in doc["meta"]
    kept = doc["meta"]["kept_from_earlier_run"]
    assert kept["commit"] == committed["meta"]["commit"]
    for k in ("converted", "kept_from_earlier_run", "merged_runs"):  # its own provenance, kept
        assert kept.get(k) == committed["meta"].get(k)
    assert "AdamW" not in kept["methods"] and "LISA" in kept["methods"]


# ------------------------------------------------------------- learning-rate grids (no training)
def test_lr_position_tells_the_edges_from_the_inside():
    grid = [{"lr": lr, "val_loss": 1.0} for lr in (1e-3, 2e-3, 4e-3)]
    assert compare.lr_position(grid, 1e-3) == "lowest"
    assert compare.lr_position(grid, 2e-3) == "interior"
    assert compare.lr_position(grid, 4e-3) == "highest"
    assert compare.lr_position([4e-3, 1e-3, 2e-3], 2e-3) == "interior"  # rates, any order
    assert compare.lr_position([3e-3], 3e-3) == "only"
    assert compare.edge_message("LISA", "lisa", grid, 2e-3) is None


def test_a_best_rate_at_the_grid_edge_warns_with_the_way_to_widen_it():
    def grid(*losses):
        return [{"lr": lr, "val_loss": v} for lr, v in zip((1e-3, 2e-3, 4e-3), losses, strict=True)]

    with pytest.warns(compare.LrAtGridEdge, match=r"LISA: .* 0\.001 is the lowest of its grid "
                      r"\{0\.001, 0\.002, 0\.004\}.*LR_GRIDS\['lisa'\].*downward"):  # fmt: skip
        assert compare.choose_lr("LISA", "lisa", grid(2.4, 2.5, 2.9)) == 1e-3
    with pytest.warns(compare.LrAtGridEdge, match="highest of its grid.*upward"):
        assert compare.choose_lr("AdamW", "adamw", grid(2.36, 2.35, 2.34)) == 4e-3
    with pytest.warns(compare.LrAtGridEdge, match="highest"):  # a diverged point loses
        assert compare.choose_lr("x", "adamw", grid(float("nan"), 2.5, 2.4)) == 4e-3
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compare.choose_lr("LISA", "lisa", grid(2.5, 2.4, 2.9)) == 2e-3
        assert compare.choose_lr("q", "lisa", [{"lr": 3e-3, "val_loss": 2.0}]) == 3e-3


def test_every_method_has_its_grid_and_the_layerwise_ones_reach_below_the_default():
    for _, optimizer, _ in compare.METHODS:
        grid = compare.lr_grid_of(optimizer)
        assert list(grid) == sorted(grid) and len(grid) >= 3
        assert compare.lr_grid_of(optimizer, quick=True) == compare.QUICK_LR_GRID
    for optimizer in ("omgd-layer", "lisa", "lisa-wor-noscale"):
        assert min(compare.lr_grid_of(optimizer)) < min(compare.LR_GRID)


def test_require_interior_refuses_a_rate_at_the_edge_after_writing(tmp_path, monkeypatch, capsys):
    out = tmp_path / "compare.json"

    def fake_run(setting, data, grid, methods, progress, on_record):
        assert grid == {o: compare.lr_grid_of(o) for _, o, _ in methods}
        recs = [record("AdamW", 2.0), record("LISA", 2.4)]
        recs[1]["lr_grid"] = [{"lr": lr, "val_loss": 2.4 + lr} for lr in grid["lisa"]]
        recs[1]["best_lr"] = min(grid["lisa"])  # the lowest: the edge
        return document(["AdamW"], loss=2.0, steps=setting["steps"], seeds=setting["seeds"],
                        lr_grid=list(compare.LR_GRID)) | {"records": recs}  # fmt: skip

    monkeypatch.setattr(compare, "run", fake_run)
    for plot in ("plot_losses", "plot_memory_pareto"):  # the figures are another test's
        monkeypatch.setattr(compare, plot, lambda doc, out, title: out)
    args = ["--out", str(out), "--data", "x", "--steps", "3", "--seeds", "2", "--no-progress",
            "--methods", "lisa"]  # fmt: skip
    compare.main(args)  # a warning only
    assert "LISA: the best learning rate" in capsys.readouterr().err
    assert report.load(out)["meta"]["lr_at_grid_edge"] == {"LISA": "lowest"}
    out.unlink()
    with pytest.raises(SystemExit, match=r"(?s)edge of its grid.*LISA.*lowest.*JSON is written"):
        compare.main([*args, "--require-interior"])
    assert report.load(out)["records"][1]["method"] == "LISA"


def test_committed_table_has_bracketed_layerwise_rows_and_both_memories():
    committed = report.load(compare.__file__.replace("compare.py", "results/compare.json"))
    recs = {r["optimizer"]: r for r in committed["records"]}
    for optimizer, grid in compare.LR_GRIDS.items():
        r = recs[optimizer]  # the committed command reproduces the row: its grid is the code's
        assert [g["lr"] for g in r["lr_grid"]] == list(grid), optimizer
    # every row's best rate is inside its grid (issue 20), whichever grid it was tuned on
    # (the records from before `lr_position` existed: from their own grid)
    for r in committed["records"]:
        where = compare.lr_position(r["lr_grid"], r["best_lr"])
        assert r.get("lr_position", where) == where == "interior", r["method"]
    assert committed["meta"]["lr_at_grid_edge"] == {}
    assert committed["meta"]["lr_at_grid_edge"] == compare.at_grid_edge(committed["records"])
    for r in committed["records"]:  # both figures, the library's one peak definition
        for key, mem in (("peak_memory_bytes", r["memory"]),
                         ("peak_memory_remat_bytes", r["memory_remat"])):  # fmt: skip
            assert r[key] == mem["argument_bytes"] + mem["temp_bytes"]
        assert r["memory_remat"]["argument_bytes"] == r["memory"]["argument_bytes"]
        assert r["peak_memory_remat_bytes"] < 0.5 * r["peak_memory_bytes"]
    lean = [r for r in committed["records"] if r["train_step"] == "lean_train_step"]
    adamw = recs["adamw"]["peak_memory_remat_bytes"]
    assert lean and all(r["peak_memory_remat_bytes"] < 0.85 * adamw for r in lean)


def test_add_remat_memory_fills_the_records_and_refuses_a_changed_step(monkeypatch):
    class FakeMethod:
        def __init__(self, cfg, graphdef, abstract_params, mesh, x_shape):
            self.memory = {"argument_bytes": 10**5, "output_bytes": 0, "temp_bytes": 9 * 10**5,
                           "peak_bytes": 10**6}  # fmt: skip
            self.memory_remat = {"argument_bytes": 10**5, "output_bytes": 0, "temp_bytes": 10**5,
                                 "peak_bytes": 2 * 10**5}  # fmt: skip

    monkeypatch.setattr(compare, "Method", FakeMethod)
    doc = document(["AdamW", "LISA"], loss=2.0, preset="nano", vocab_size=256, eval_every=1,
                   eval_iters=1)  # fmt: skip
    for r in doc["records"]:
        r["memory"] = FakeMethod(*[None] * 5).memory
    assert compare.add_remat_memory(doc, {"LISA"}, progress=False) == ["LISA"]
    adamw, lisa = doc["records"]
    assert "memory_remat" not in adamw and lisa["peak_memory_remat_bytes"] == 2 * 10**5
    assert "memory_recompiled" not in lisa  # the same step as recorded
    adamw["memory"] = dict(adamw["memory"], peak_bytes=10**6 + 64)  # bytes: kept, not refused
    assert compare.add_remat_memory(doc, {"AdamW"}, progress=False) == ["AdamW"]
    assert adamw["memory_recompiled"]["peak_bytes"] == 10**6
    assert adamw["memory"]["peak_bytes"] == 10**6 + 64
    adamw["memory"] = dict(adamw["memory"], peak_bytes=2 * 10**6)
    with pytest.raises(RuntimeError, match="AdamW: the step compiles to .* rerun the method"):
        compare.add_remat_memory(doc, {"AdamW"}, progress=False)


def test_pareto_labels_never_overlap_in_either_panel(tmp_path):
    from examples.gpt2.plot import plot_pareto

    # the committed table's shape: five methods at one peak within 0.01 of loss, two more
    # pairs nearly on top of each other
    pts = [(114.4, 2.354), (114.4, 2.359), (114.4, 2.363), (114.4, 2.360), (114.4, 2.356),
           (108.4, 2.421), (108.4, 2.404), (108.4, 2.419), (109.6, 2.531), (110.2, 2.358),
           (110.2, 2.378), (113.2, 2.361), (110.4, 2.317)]  # fmt: skip
    rows = [{"label": f"method number {i} (details)", "peak_bytes": m * 2**20,
             "peak_remat_bytes": m / 3 * 2**20, "val_loss": v, "val_loss_std": 0.005}
            for i, (m, v) in enumerate(pts)]  # fmt: skip
    panels = [("peak_bytes", "no remat"), ("peak_remat_bytes", "remat")]
    png = plot_pareto(rows, tmp_path / "p.png", "t", panels=panels)
    assert png.read_bytes()[:4] == b"\x89PNG"
    panels = plot_pareto.last_label_boxes
    assert [len(b) for b in panels] == [len(rows), len(rows)]
    for boxes in panels:
        for i, a in enumerate(boxes):
            for b in boxes[i + 1 :]:
                assert not (a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1)
