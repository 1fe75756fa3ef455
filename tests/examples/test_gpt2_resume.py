"""Exact resume of the GPT-2 example anywhere: stopped at seeded random steps, on phase, cycle
and AdamW->OMGD boundaries and by SIGTERM; corrupted checkpoints; 8 devices <-> 1."""

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys

import jax
import numpy as np

from examples.gpt2 import train as train_mod
from examples.gpt2.train import train
from tests.examples.test_gpt2_train import _cfg, _losses, data_dir  # noqa: F401 (fixture)

# nano: 2 blocks, gamma 1 -> M = 2; K = 2 -> phases start at even steps, cycles every 4;
# AdamW for 3 steps, OMGD from step 3 (the switch).
KW = dict(optimizer="omgd-layer", warmup_masks=3, steps_per_mask=2, eval_every=100,
          checkpoint_every=100, keep=10)  # fmt: skip
STEPS = 14


def equal_trees(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def stops():
    """Where the interrupted run stops: the switch (3), a cycle and phase boundary (4),
    mid-phase (5), and two seeded random steps."""
    rng = np.random.default_rng(11)
    extra = rng.choice(range(6, STEPS - 3), size=2, replace=False)  # SIGTERM 2 steps later
    return sorted({3, 4, 5, *map(int, extra)})


def test_resume_anywhere_is_bit_for_bit(data_dir, tmp_path, monkeypatch):  # noqa: F811
    straight = train(_cfg(data_dir, tmp_path / "straight", steps=STEPS, **KW))
    out = tmp_path / "split"
    points = stops()
    summary = None
    for n, stop in enumerate(points):
        summary = train(_cfg(data_dir, out, steps=stop, resume=n > 0, **KW))
        assert summary["step"] == stop
    # Then a SIGTERM (a real one, to this process) while step 2 of the rest is logged.
    sigterm_at = points[-1] + 2
    real_log = train_mod.Logger.log

    def log_then_signal(self, rec):
        real_log(self, rec)
        if rec["step"] == sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(train_mod.Logger, "log", log_then_signal)
    stopped = train(_cfg(data_dir, out, steps=STEPS, resume=True, **KW))
    assert stopped["step"] == sigterm_at < STEPS  # it stopped there and saved
    monkeypatch.setattr(train_mod.Logger, "log", real_log)
    summary = train(_cfg(data_dir, out, steps=STEPS, resume=True, **KW))
    a_steps, a = _losses(tmp_path / "straight")
    b_steps, b = _losses(out)
    assert a_steps == b_steps == list(range(1, STEPS + 1))  # no batch skipped or repeated
    np.testing.assert_array_equal(a, b)  # every logged loss, bit for bit
    equal_trees(straight["params"], summary["params"])
    equal_trees(
        jax.tree.map(lambda x: jax.random.key_data(x) if jax.dtypes.issubdtype(
            x.dtype, jax.dtypes.prng_key) else x, straight["opt_state"]),
        jax.tree.map(lambda x: jax.random.key_data(x) if jax.dtypes.issubdtype(
            x.dtype, jax.dtypes.prng_key) else x, summary["opt_state"]),
    )  # fmt: skip


def _largest_file(directory: pathlib.Path) -> pathlib.Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_a_corrupted_latest_checkpoint_resumes_from_the_last_good_one(
    data_dir,  # noqa: F811
    tmp_path,
    capsys,
):
    kw = dict(KW, checkpoint_every=3)
    train(_cfg(data_dir, tmp_path / "straight", steps=9, **kw))
    out = tmp_path / "run"
    train(_cfg(data_dir, out, steps=6, **kw))  # checkpoints at 3 and 6
    victim = _largest_file(out / "checkpoints" / "6" / "state")
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])  # truncated
    train(_cfg(data_dir, out, steps=9, resume=True, **kw))
    err = capsys.readouterr().err
    assert "the checkpoint of step 6" in err and "cannot be read" in err
    assert "resuming from step 3" in err
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert "6.unreadable" in kept and {"3", "6", "9"} <= set(kept)  # nothing deleted
    a_steps, a = _losses(tmp_path / "straight")
    b_steps, b = _losses(out)
    assert a_steps == b_steps == list(range(1, 10))
    np.testing.assert_array_equal(a, b)


_EIGHT_DEVICES = """
import json, sys
import jax
from examples.gpt2.config import Config
from examples.gpt2.train import train
assert jax.device_count() == 8
train(Config(**json.loads(sys.argv[1])))
"""


def _on_eight_devices(cfg):
    env = dict(os.environ)  # the suite's XLA flags kept
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"
    subprocess.run(
        [sys.executable, "-c", _EIGHT_DEVICES, json.dumps(dataclasses.asdict(cfg))],
        check=True,
        env=env,
        cwd=str(pathlib.Path(__file__).resolve().parents[2]),
        timeout=600,
    )


def test_a_checkpoint_written_on_eight_devices_resumes_on_one_and_back(data_dir, tmp_path):  # noqa: F811
    """FSDP on 8 devices to step 4, one device to 8, 8 devices to 12 == one device throughout
    (rtol 2e-4: float32 reductions in another order, as for the 8-device run itself)."""
    kw = dict(KW, fsdp=True, batch_size=8)
    train(_cfg(data_dir, tmp_path / "one", steps=12, **kw))
    out = tmp_path / "moved"
    _on_eight_devices(_cfg(data_dir, out, steps=4, **kw))
    train(_cfg(data_dir, out, steps=8, resume=True, **kw))
    _on_eight_devices(_cfg(data_dir, out, steps=12, resume=True, **kw))
    a_steps, a = _losses(tmp_path / "one")
    b_steps, b = _losses(out)
    assert a_steps == b_steps == list(range(1, 13))
    np.testing.assert_allclose(b, a, rtol=2e-4)


def test_element_compact_state_resumes_bit_for_bit(data_dir, tmp_path):  # noqa: F811
    """omgd-element's state holds empty arrays (shard grids, no layer ids), which Orbax
    cannot store: the checkpoint maps them out and back."""
    kw = dict(optimizer="omgd-element", warmup_masks=1, steps_per_mask=1, eval_every=100,
              checkpoint_every=100)  # fmt: skip
    straight = train(_cfg(data_dir, tmp_path / "straight", steps=6, **kw))
    train(_cfg(data_dir, tmp_path / "split", steps=3, **kw))
    resumed = train(_cfg(data_dir, tmp_path / "split", steps=6, resume=True, **kw))
    np.testing.assert_array_equal(_losses(tmp_path / "straight")[1], _losses(tmp_path / "split")[1])
    equal_trees(straight["params"], resumed["params"])
