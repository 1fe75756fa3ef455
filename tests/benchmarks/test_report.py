"""benchmarks/report.py: the one results format (every committed JSON follows it) and the one
timing loop."""

import json
from pathlib import Path

import jax.numpy as jnp
import pytest

from benchmarks import report

ROOT = Path(__file__).resolve().parents[2]
RESULTS = sorted((ROOT / "benchmarks" / "results").glob("*.json")) + sorted(
    (ROOT / "examples").glob("**/results/*.json")
)
# What a reader needs to reproduce a table (the list).
META_KEYS = ("jax", "jaxlib", "backend", "device", "cpu_count", "xla_flags", "allocator",
             "command", "commit", "date")  # fmt: skip


def test_the_results_are_found():
    names = {p.name for p in RESULTS}
    assert {"compare.json", "update_cost.json", "least_squares.json"} <= names
    # the examples' results lie beside the examples
    assert not (ROOT / "benchmarks" / "results" / "least_squares.json").exists()


@pytest.mark.parametrize("path", RESULTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_committed_result_is_meta_and_records(path):
    doc = report.load(path)
    assert set(doc) == {"meta", "records"}, sorted(doc)
    meta = doc["meta"]
    assert isinstance(meta, dict) and isinstance(doc["records"], list) and doc["records"]
    assert all(isinstance(r, dict) for r in doc["records"])
    missing = [k for k in META_KEYS if k not in meta]
    assert not missing, f"{path.name}: meta lacks {missing}"
    for k in ("command", "commit", "date"):
        assert isinstance(meta[k], str) and meta[k], (path.name, k)
    assert meta["command"].startswith("python -m ")
    if "converted" not in meta:  # a converted file says so; a run records every field
        nulls = [k for k in META_KEYS if meta[k] is None]
        assert not nulls, f"{path.name}: {nulls} not recorded"
    for r in doc["records"]:  # the one peak definition wherever a compiled peak is given
        if {"peak_bytes", "argument_bytes", "temp_bytes"} <= set(r):
            assert r["peak_bytes"] == r["argument_bytes"] + r["temp_bytes"], (path.name, r)


def test_load_refuses_the_earlier_formats(tmp_path):
    for old in ({"setting": {}, "records": []}, {"rows": {}}, {"records": []}, []):
        path = tmp_path / "old.json"
        path.write_text(json.dumps(old))
        with pytest.raises(ValueError, match="not a results document"):
            report.load(path)


def test_write_records_the_command_and_the_fields_given(tmp_path):
    doc = report.write(tmp_path / "r.json", [{"a": 1}], command=["python", "-m", "x", "--y"], z=2)
    assert report.load(tmp_path / "r.json") == doc
    assert doc["meta"]["command"] == "python -m x --y" and doc["meta"]["z"] == 2
    assert all(doc["meta"][k] is not None for k in META_KEYS)
    assert report.command_of("benchmarks.x", ["--out", "o"]) == ["python", "-m", "benchmarks.x",
                                                                 "--out", "o"]  # fmt: skip
    assert report.command_of("benchmarks.x", None) is None  # sys.argv


class Clock:
    """A fake perf_counter and a fake page-fault counter: every call of a run costs `cost`."""

    def __init__(self, monkeypatch):
        self.now, self.faults, self.calls = 0.0, 0, []
        monkeypatch.setattr(report.time, "perf_counter", lambda: self.now)

    def run(self, name, cost, faults=0):
        def call():
            self.calls.append(name)
            self.now += cost
            self.faults += faults
            return jnp.zeros(())

        return call


def test_interleaved_times_runs_blocks_in_turn_and_counts_per_call(monkeypatch):
    clock = Clock(monkeypatch)
    runs = {"a": clock.run("a", 1.0, faults=3), "b": clock.run("b", 2.0)}
    times, counts = report.interleaved_times(
        runs, 2, warmup=1, steps=3, counter=lambda: clock.faults
    )
    assert clock.calls == ["a", "b"] + (["a"] * 3 + ["b"] * 3) * 2  # warm-up, then rounds
    assert times == {"a": [1.0, 1.0], "b": [2.0, 2.0]}  # per call, not per block
    assert counts == {"a": [3.0, 3.0], "b": [0.0, 0.0]}
    assert report.interleaved_times(runs, 1, warmup=0)[1] == {}  # no counter, no counts
    with pytest.raises(ValueError, match="steps"):
        report.interleaved_times(runs, 1, steps=0)
    with pytest.raises(ValueError, match="rounds"):
        report.interleaved_medians(runs, 0)


def test_medians_and_per_round_ratios(monkeypatch):
    clock = Clock(monkeypatch)
    medians, times = report.interleaved_medians(
        {"base": clock.run("base", 2.0), "x": clock.run("x", 3.0)}, 3, warmup=0
    )
    assert medians == {"base": 2.0, "x": 3.0} and len(times["x"]) == 3
    times = {"base": [1.0, 2.0, 4.0], "x": [3.0, 2.0, 4.0]}
    assert report.round_ratios(times, "x", "base") == [3.0, 1.0, 1.0]
    assert report.median_ratio(times, "x", "base") == 1.0
    assert report.median_ratio(times, "base", "base") == 1.0
