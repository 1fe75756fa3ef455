"""The update-cost benchmarks run end to end at a small size and write their documented JSON."""

from benchmarks import report, seeds_update_cost, update_cost


def test_update_cost_writes_ratios_state_and_faults(tmp_path):
    out = tmp_path / "uc.json"
    argv = ["--layers", "6", "--only", "lean", "--repeats", "1", "--malloc", "default"]
    update_cost.main([*argv, "--out", str(out)])
    doc = report.load(out)
    meta = doc["meta"]
    assert meta["malloc"] == "default" and meta["repeats"] == 1 and meta["layers"] == 6
    assert meta["command"] == f"python -m benchmarks.update_cost {' '.join(argv)} --out {out}"
    rows = {r["optimizer"]: r for r in doc["records"]}
    assert list(rows) == ["adamw", update_cost.LEAN]
    assert rows["adamw"]["time_ratio"] == 1.0
    lean = rows[update_cost.LEAN]
    # Moments for the embeddings (39.4M) and 3 of the 6 blocks (42.5M): 0.74 of AdamW's.
    assert 0.7 < lean["state_ratio"] < 0.78
    assert lean["update_s"] > 0 and lean["minor_faults_per_call"] >= 0
    for r in rows.values():  # the one peak definition, and the state among the arguments
        assert r["peak_bytes"] == r["argument_bytes"] + r["temp_bytes"]
        assert r["argument_bytes"] >= r["state_bytes"]


def test_seeds_update_cost_writes_every_optimizer(tmp_path):
    out = tmp_path / "suc.json"
    seeds_update_cost.main(
        ["--preset", "nano", "--repeats", "1", "--malloc", "default", "--out", str(out)]
    )
    doc = report.load(out)
    rows = {r["optimizer"]: r for r in doc["records"]}
    assert doc["meta"]["preset"] == "nano" and doc["meta"]["n_params"] > 0
    assert "adamw" in rows and len(rows) > 3
    assert all(r["update_s"] > 0 and r["state_bytes"] > 0 for r in rows.values())
    assert all(r["peak_bytes"] == r["argument_bytes"] + r["temp_bytes"] for r in rows.values())
