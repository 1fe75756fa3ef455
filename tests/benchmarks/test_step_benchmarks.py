"""benchmarks/step_time.py and benchmarks/baseline_state.py end to end at a small size: the
results format, the interleaved timing, the library's dense and lean steps."""

from benchmarks import baseline_state, gpt2_step, report, step_time
from examples.gpt2.model import get_config


def test_step_time_times_the_library_steps_and_writes_the_report(tmp_path, monkeypatch):
    tiny = get_config("nano", n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64)
    setup = step_time.Setup("tiny 2x32", "gpt2", tiny, (2, 16), 1)
    monkeypatch.setattr(step_time, "setups", lambda remat: [setup])
    out = tmp_path / "st.json"
    argv = ["--rounds", "2", "--malloc", "default", "--out", str(out)]
    doc = step_time.main(argv)
    assert report.load(out) == doc
    meta = doc["meta"]
    assert meta["command"] == "python -m benchmarks.step_time " + " ".join(argv)
    assert meta["rounds"] == 2 and meta["malloc"] == "default" and meta["remat"] is False
    recs = {r["method"]: r for r in doc["records"]}
    assert list(recs) == [
        "adamw", "omgd-layer lean (gamma=1)", "omgd-layer-rotate lean (gamma=1)"
    ]  # fmt: skip
    assert recs["adamw"]["ratio_to_adamw"] == recs["adamw"]["flop_ratio_to_adamw"] == 1.0
    # a round is one cycle of the rotate row: 2 layer phases and the tied wte's
    assert {r["steps_per_round"] for r in recs.values()} == {3}
    lean = recs["omgd-layer lean (gamma=1)"]
    assert lean["median_s"] > 0 and lean["ratio_min"] <= lean["ratio_to_adamw"] <= lean["ratio_max"]
    assert lean["flop_ratio_to_adamw"] < 1  # the inactive blocks' weight gradients are skipped
    rotate = recs["omgd-layer-rotate lean (gamma=1)"]
    assert rotate["flop_ratio_to_adamw"] < 1


def test_baseline_state_writes_every_optimizer(tmp_path):
    out = tmp_path / "bs.json"
    doc = baseline_state.main(["--out", str(out)])
    assert report.load(out) == doc
    rows = {r["method"]: r for r in doc["records"]}
    assert rows["adamw"]["x_adamw"] == 1.0 and len(rows) == len(baseline_state.optimizers())
    assert doc["meta"]["num_params"] == 124_475_904
    for r in rows.values():  # the formula leaves out counters and keys
        assert r["formula_bytes"] <= r["state_bytes"] <= r["formula_bytes"] + 64, r
        assert 0 < r["blocks_state_bytes"] <= r["state_bytes"]


def test_gpt2_step_writes_memory_and_throughput_records(tmp_path, monkeypatch):
    monkeypatch.setattr(gpt2_step, "CHOICES", [("adamw", {}), ("omgd-layer", {})])
    monkeypatch.setattr(gpt2_step, "MEMORY_PRESET", "nano")
    monkeypatch.setattr(gpt2_step, "THROUGHPUT_PRESET", "nano")
    out = tmp_path / "g.json"
    gpt2_step.main(["--batch-size", "1", "--timed", "2", "--out", str(out)])
    doc = report.load(out)
    assert doc["meta"]["batch_size"] == 1 and doc["meta"]["timed"] == 2
    memory = [r for r in doc["records"] if r["table"] == "memory_124m"]
    speed = [r for r in doc["records"] if r["table"] == "throughput_tiny"]
    assert [r["optimizer"] for r in memory] == [r["optimizer"] for r in speed]
    assert [r["optimizer"] for r in memory] == ["adamw", "omgd-layer"]
    for r in memory:  # the one peak definition; params and state are donated arguments
        assert r["peak_bytes"] == r["argument_bytes"] + r["temp_bytes"]
        assert r["argument_bytes"] >= r["param_bytes"] + r["opt_state_bytes"]
    assert memory[1]["opt_state_bytes"] < memory[0]["opt_state_bytes"]
    for r in speed:
        assert r["tokens_per_s"] == r["tokens_per_step"] / r["median_step_s"] > 0
