"""benchmarks/device_peak.py at the tiny preset on CPU: one cycle runs every kind of phase, the
summary sets the compiled figure beside the device's (null on CPU), in the results format."""

import math

import pytest

from benchmarks import device_peak, report


def test_one_cycle_runs_every_phase_and_reports_the_compiled_peak(tmp_path):
    out = tmp_path / "device_peak.json"
    device_peak.main(["--preset", "tiny", "--batch", "2x16", "--gamma", "2", "--out", str(out)])
    doc = report.load(out)
    steps = [r for r in doc["records"] if r["kind"] == "step"]
    (summary,) = [r for r in doc["records"] if r["kind"] == "summary"]
    # tiny: 4 layers, 2 a phase, plus the embedding and the head: M = 4, one step a phase
    assert len(steps) == 4
    assert sorted(r["phase"] for r in steps) == ["embedding", "head", "layers", "layers"]
    assert all(math.isfinite(r["loss"]) for r in steps)
    assert summary["compiled_total"] == summary["compiled_argument"] + summary["compiled_temp"]
    assert summary["compiled_argument"] > 0 and summary["compiled_temp"] > 0
    assert summary["phase"] == "every"
    assert summary["device_peak_bytes_in_use"] is None  # the CPU backend keeps no stats


def test_a_bad_batch_is_refused_with_the_argument_named(capsys):
    with pytest.raises(SystemExit):
        device_peak.main(["--preset", "tiny", "--batch", "16by256"])
    assert "--batch must be BATCHxTOKENS" in capsys.readouterr().err
