"""The update-cost benchmarks run end to end at a small size and write their documented JSON."""

import json

from benchmarks import seeds_update_cost, update_cost


def test_update_cost_writes_ratios_state_and_faults(tmp_path):
    out = tmp_path / "uc.json"
    update_cost.main(
        [
            "--layers",
            "6",
            "--only",
            "lean",
            "--repeats",
            "1",
            "--malloc",
            "default",
            "--out",
            str(out),
        ]
    )
    doc = json.loads(out.read_text())
    assert doc["malloc"] == "default"
    rows = doc["rows"]
    assert set(rows) == {"adamw", update_cost.LEAN}
    assert rows["adamw"]["time_ratio"] == 1.0
    lean = rows[update_cost.LEAN]
    # Moments for the embeddings (39.4M) and 3 of the 6 blocks (42.5M): 0.74 of AdamW's.
    assert 0.7 < lean["state_ratio"] < 0.78
    assert lean["update_s"] > 0 and lean["minor_faults_per_call"] >= 0


def test_seeds_update_cost_writes_every_optimizer(tmp_path):
    out = tmp_path / "suc.json"
    seeds_update_cost.main(
        ["--preset", "nano", "--repeats", "1", "--malloc", "default", "--out", str(out)]
    )
    rows = json.loads(out.read_text())["rows"]
    assert "adamw" in rows and len(rows) > 3
    assert all(r["update_s"] > 0 and r["state_bytes"] > 0 for r in rows.values())
