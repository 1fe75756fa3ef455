"""GPT-2 training program on the "nano" preset and a synthetic token corpus (no downloads).

Covers: every optimizer lowers the loss in 30 steps; save + resume reproduces an uninterrupted
run exactly (through the AdamW -> OMGD switch, with OMGD's PRNG key and counters); bad input
exits with a sentence; metrics, plot and demo plumbing.
"""

import dataclasses
import json
import math
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

import omgd_jax
from examples.gpt2 import optimizers
from examples.gpt2.config import PRESET_DEFAULTS, Config, ConfigError, build_parser, finalize
from examples.gpt2.model import PRESETS, get_config
from examples.gpt2.optimizers import tree_bytes
from examples.gpt2.train import abstract_model, init_params, main, model_config, train


def _markov_tokens(n, seed, vocab=64):
    """A first-order Markov chain over `vocab` GPT-2 ids: learnable structure, no downloads."""
    rng = np.random.default_rng(0)
    cum = np.cumsum(rng.dirichlet(np.full(vocab, 0.1), size=vocab), axis=1)
    u = np.random.default_rng(seed).random(n)
    out = np.empty(n, np.uint16)
    s = 0
    for i in range(n):
        s = min(int(np.searchsorted(cum[s], u[i])), vocab - 1)
        out[i] = s
    return out


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tokens")
    _markov_tokens(30_000, 1).tofile(d / "train.bin")
    _markov_tokens(3_000, 2).tofile(d / "val.bin")
    return d


def _cfg(data_dir, out_dir, **kw):
    base = dict(
        preset="nano",
        data=str(data_dir),
        out_dir=str(out_dir),
        progress=False,
        tensorboard=False,
        log_every=1,
        eval_iters=1,
        lr_decay_steps=30,  # one schedule whatever --steps: runs share compiles and resume exactly
    )
    base.update(kw)
    return Config(**base)


def _losses(out_dir):
    recs = [json.loads(ln) for ln in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in recs], [r["loss"] for r in recs]


@pytest.mark.parametrize(
    "optimizer, extra",
    [
        ("adamw", {}),
        ("omgd-layer", {}),
        ("lisa", {}),
        ("omgd-element", {}),
        ("omgd-tensor", {}),  # frozen state (tensor granularity has no compact one)
    ],
)
def test_thirty_steps_lower_the_loss(data_dir, tmp_path, optimizer, extra):
    # warmup_masks=0: masking from the first step, so the OMGD path itself must learn.
    s = train(
        _cfg(
            data_dir,
            tmp_path,
            optimizer=optimizer,
            steps=30,
            warmup_masks=0,
            eval_every=30,
            checkpoint_every=30,
            **extra,
        )
    )
    steps, losses = _losses(tmp_path)
    assert steps == list(range(1, 31))
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5, losses
    assert np.isfinite(s["val_loss"]) and s["val_loss"] < losses[0]
    assert s["stage"] == ("adamw" if optimizer == "adamw" else "omgd")
    full = 2 * s["param_bytes"]  # AdamW: two moments per parameter
    if optimizer == "omgd-element":  # compact: moments for a 1/M = 1/4 window of every leaf
        assert s["opt_state_bytes"] < 0.3 * full
    elif optimizer in ("omgd-layer", "lisa"):
        # compact layer state: moments for gamma of the N_L blocks, for every other leaf in full
        cfg = finalize(_cfg(data_dir, tmp_path, optimizer=optimizer))
        n_layer, gamma = PRESETS["nano"].n_layer, cfg.layers_per_phase
        blocks = tree_bytes(s["params"], under="blocks")
        assert gamma < n_layer
        assert s["opt_state_blocks_bytes"] == 2 * blocks * gamma // n_layer
        others = 2 * (s["param_bytes"] - blocks)
        assert others <= s["opt_state_bytes"] - s["opt_state_blocks_bytes"] < others + 64
    else:
        assert full <= s["opt_state_bytes"] < 1.01 * full


@pytest.mark.parametrize(
    "optimizer",
    [
        "lisa-wor-noscale",
        "galore",
        "golore",
        "sift",
        "skip-update",
        "skip-update-wor",
        "magma",
        "magma-wor",
        "mofasgd",
    ],  # fmt: skip
)
def test_every_other_method_lowers_the_loss_in_twelve_steps(data_dir, tmp_path, optimizer):
    """Each --optimizer trains the example (its own rule from step 0); state as it promises."""
    kw = dict(optimizer=optimizer, steps=12, warmup_masks=0, eval_every=12, checkpoint_every=12,
              lr_decay_steps=12, rank=4, proj_gap=4)  # fmt: skip
    s = train(_cfg(data_dir, tmp_path, **kw))
    steps, losses = _losses(tmp_path)
    assert steps == list(range(1, 13)) and s["stage"] == "omgd"
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3, losses
    assert np.isfinite(s["val_loss"]) and s["val_loss"] < losses[0]
    full = 2 * s["param_bytes"]  # AdamW: two moments per parameter
    blocks = tree_bytes(s["params"], under="blocks")
    if optimizer in ("galore", "golore", "sift", "mofasgd"):  # less state on the block matrices
        assert s["opt_state_bytes"] < full - blocks
    elif optimizer.startswith(("skip-update", "magma")):  # dense moments + keys and scores
        assert full <= s["opt_state_bytes"] < 1.01 * full
    else:  # lisa-wor-noscale: compact layer state, gamma = 1 of the 2 blocks
        assert s["opt_state_blocks_bytes"] == blocks


@pytest.mark.parametrize("optimizer", ["omgd-layer-rotate", "omgd-layer-frozen-embedding"])
def test_embedding_units_train_as_the_optimizer_says(data_dir, tmp_path, optimizer):
    """Rotate: one cycle (2 blocks one at a time + the token and position embeddings, M = 4
    phases of 3 steps) moves every block and both embeddings; frozen: the token embedding (and
    its tied head) stays bit for bit, the blocks train. Both lower the loss."""
    cfg = _cfg(data_dir, tmp_path, optimizer=optimizer, steps=12, warmup_masks=0,
               eval_every=12, checkpoint_every=12, lr_decay_steps=12, steps_per_mask=3)  # fmt: skip
    s = train(cfg)
    _, losses = _losses(tmp_path)
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.05, losses  # a unit at a time
    done = finalize(dataclasses.replace(cfg))
    # The run's own initialisation (jitted: the eager one differs in the last bit).
    before = jax.jit(lambda: init_params(model_config(done), done.seed))()

    def moved(*path):
        a, b = s["params"], before
        for k in path:
            a, b = a[k], b[k]
        return not np.array_equal(np.asarray(a), np.asarray(b))

    block = s["params"]["blocks"]["mlp"]["c_fc"]["kernel"]
    start = before["blocks"]["mlp"]["c_fc"]["kernel"]
    layers_moved = [not np.array_equal(block[i], start[i]) for i in range(block.shape[0])]
    assert layers_moved == [True, True]
    if optimizer == "omgd-layer-rotate":
        assert done.num_masks == 4
        assert moved("wte", "embedding") and moved("wpe", "embedding")
    else:
        assert done.num_masks == 2
        assert not moved("wte", "embedding") and moved("wpe", "embedding")


def test_method_optimizers_map_to_the_library():
    """The Config fields reach the library's arguments (read back from the states)."""
    import optax

    def state_of(**c):
        cfg = finalize(Config(preset="nano", **c))
        params = abstract_model(get_config("nano"))[1]
        return jax.eval_shape(optimizers.make_optimizer(cfg, "omgd").init, params)

    # galore: rank 4 projectors for every block kernel, [N_L, m, r] (m = 32: the smaller side)
    proj = optax.tree.get(state_of(optimizer="galore", rank=4), "galore_projector")
    kernels = [
        f"blocks/{m}/kernel" for m in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj")
    ]
    assert {
        "/".join(str(getattr(k, "key", k)) for k in path): x.shape
        for path, x in jax.tree_util.tree_flatten_with_path(proj)[0]
    } == dict.fromkeys(kernels, (2, 32, 4))  # nothing for embeddings, norms, biases
    # sift: ceil(20%) of each block matrix, per layer
    idx = optax.tree.get(state_of(optimizer="sift", sparse_rate=0.2), "sift_indices")
    assert idx["blocks"]["mlp"]["c_fc"]["kernel"].shape == (2, math.ceil(0.2 * 32 * 128))
    # mofasgd: rank 4 factors of the 4 block kernels, nothing else
    u = optax.tree.get(state_of(optimizer="mofasgd", rank=4), "mofasgd_u")
    assert [x.shape for x in u if x is not None] == [(2, 32, 4)] * 3 + [(2, 128, 4)]
    assert finalize(Config(preset="small-bytes", optimizer="galore")).rank == 32  # n_embd / 4
    with pytest.raises(ConfigError, match="--rank must be positive, got 0"):
        finalize(Config(preset="nano", optimizer="galore", rank=0))


@pytest.mark.parametrize("optimizer", ["omgd-layer", "lisa"])
def test_lean_step_trains_like_the_dense_step(data_dir, tmp_path, optimizer):
    """The default (lean) step of layer-wise compact OMGD equals --no-lean step for step.

    Clipping is switched off: the lean step clips by the trained share's norm (PyTorch's
    behaviour), the dense one by the whole gradient's. Tolerance: float32 sums in another order.
    """
    kw = dict(optimizer=optimizer, steps=10, warmup_masks=2, steps_per_mask=2, grad_clip=1e9)
    assert step_function_for(data_dir, tmp_path, **kw) == "lean_train_step"
    assert step_function_for(data_dir, tmp_path, lean=False, **kw) == "train_step"
    train(_cfg(data_dir, tmp_path / "lean", **kw))
    train(_cfg(data_dir, tmp_path / "dense", lean=False, **kw))
    lean_steps, lean = _losses(tmp_path / "lean")
    dense_steps, dense = _losses(tmp_path / "dense")
    assert lean_steps == dense_steps == list(range(1, 11))
    np.testing.assert_allclose(lean, dense, rtol=2e-5)


def step_function_for(data_dir, tmp_path, **kw):
    from examples.gpt2.train import step_function

    return step_function(finalize(_cfg(data_dir, tmp_path, **kw)), "omgd").__name__


def test_resume_reproduces_an_uninterrupted_run(data_dir, tmp_path):
    """2N steps in one go == N steps, stop, --resume for N more (omgd-layer, switch at step 3)."""
    kw = dict(
        optimizer="omgd-layer",
        warmup_masks=3,
        steps_per_mask=2,
        eval_every=6,
        checkpoint_every=3,
        keep=2,
    )
    train(_cfg(data_dir, tmp_path / "straight", steps=12, **kw))
    train(_cfg(data_dir, tmp_path / "split", steps=6, **kw))
    train(_cfg(data_dir, tmp_path / "split", steps=12, resume=True, **kw))
    a_steps, a = _losses(tmp_path / "straight")
    b_steps, b = _losses(tmp_path / "split")
    assert a_steps == b_steps == list(range(1, 13))
    np.testing.assert_array_equal(a, b)  # bit-identical, including after the resume at 6
    kept = sorted(
        int(p.name) for p in (tmp_path / "split" / "checkpoints").iterdir() if p.name.isdigit()
    )
    assert kept == [9, 12]  # --keep 2


def test_checkpoint_from_another_run_is_refused(data_dir, tmp_path):
    train(_cfg(data_dir, tmp_path, steps=2, eval_every=2, checkpoint_every=2))
    with pytest.raises(SystemExit, match="already holds checkpoints"):
        train(_cfg(data_dir, tmp_path, steps=4))
    with pytest.raises(SystemExit, match=r"comes from another run \(optimizer: checkpoint"):
        train(_cfg(data_dir, tmp_path, optimizer="omgd-layer", steps=4, resume=True))
    with pytest.raises(SystemExit, match="preset: checkpoint 'nano' vs now 'tiny'"):
        train(_cfg(data_dir, tmp_path, preset="tiny", block_size=32, steps=4, resume=True))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--preset", "gpt2-xl"], "invalid choice: 'gpt2-xl'"),
        (["--optimizer", "sgd"], "invalid choice: 'sgd'"),
        (["--omgd-state", "lazy"], "invalid choice: 'lazy'"),
        (["--bogus-flag"], "unrecognized arguments: --bogus-flag"),
        (["--steps", "0"], "--steps must be positive"),
        (["--warmup-masks", "-1"], "--warmup-masks must be >= 0"),
        (["--block-size", "4096"], "exceeds the tiny context 128"),
        (["--optimizer", "lisa", "--num-masks", "3"], "--num-masks 3 x --layers-per-phase 1"),
        (
            ["--optimizer", "omgd-layer-rotate", "--num-masks", "3"],
            "--num-masks 3 (minus its 2 extra units) x --layers-per-phase 1",
        ),
    ],
)
def test_bad_flags_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def _library_refusal(**omgd):
    """The sentence omgd_jax raises for these settings on the tiny model's parameter tree."""
    _, params = abstract_model(get_config("tiny"))
    with pytest.raises(ValueError) as e:
        jax.eval_shape(omgd_jax.omgd_adamw(1e-3, **{"steps_per_mask": 20, **omgd}).init, params)
    return str(e.value)


@pytest.mark.parametrize(
    "argv, omgd",
    [
        (["--optimizer", "omgd-layer", "--layers-per-phase", "5"], dict(layers_per_phase=5)),
        (["--optimizer", "lisa", "--layers-per-phase", "3"], dict(layers_per_phase=3)),
        (["--optimizer", "omgd-layer", "--steps-per-mask", "0"], dict(steps_per_mask=0)),
    ],
)
def test_settings_the_library_refuses_exit_with_its_sentence(argv, omgd, capsys):
    """No second copy of omgd_jax's checks: its own ValueError reaches the user, as a usage
    error, before any data is read."""
    layer = dict(granularity="layer", layers=r"^blocks/", layers_per_phase=1)
    with pytest.raises(SystemExit) as e:
        main([*argv, "--data", "/nonexistent"])
    assert e.value.code == 2
    assert _library_refusal(**{**layer, **omgd}) in capsys.readouterr().err


def test_tensor_has_no_compact_state_in_the_library_s_words(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--optimizer", "omgd-tensor", "--omgd-state", "compact", "--data", "/nonexistent"])
    assert e.value.code == 2
    sentence = _library_refusal(granularity="tensor", num_masks=2, state="compact")
    assert sentence in capsys.readouterr().err


@pytest.mark.parametrize("preset", sorted(PRESET_DEFAULTS))
def test_presets_fill_the_unset_fields_and_set_ones_win(preset):
    cfg = finalize(Config(preset=preset))
    assert {k: getattr(cfg, k) for k in PRESET_DEFAULTS[preset]} == PRESET_DEFAULTS[preset]
    context = PRESET_DEFAULTS[preset].get("block_size", PRESETS[preset].block_size)
    assert (cfg.block_size, cfg.lr_decay_steps, cfg.mask_seed) == (context, cfg.steps, cfg.seed)
    assert (cfg.omgd_state, cfg.num_masks) == ("compact", 4)  # adamw: unused, but recorded
    cfg = finalize(Config(preset=preset, steps=7, block_size=16, seed=3, lr=1e-5))
    assert (cfg.steps, cfg.block_size, cfg.lr_decay_steps, cfg.mask_seed, cfg.lr) == (
        7, 16, 7, 3, 1e-5
    )  # fmt: skip
    assert finalize(cfg) == cfg


def test_flags_are_the_config_fields_with_its_defaults():
    assert vars(build_parser().parse_args([])) == dataclasses.asdict(Config())
    ns = build_parser().parse_args(
        ["--no-progress", "--remat", "--lr", "1e-3", "--dtype", "bfloat16"]
    )
    assert (ns.progress, ns.remat, ns.lr, ns.dtype) == (False, True, 1e-3, "bfloat16")


def test_bad_data_exits_with_a_message(tmp_path):
    def run(d):
        return train(_cfg(d, tmp_path / "out", steps=1))

    with pytest.raises(SystemExit, match="does not exist"):
        run(tmp_path / "nowhere")
    d = tmp_path / "empty"
    d.mkdir()
    (d / "train.bin").write_bytes(b"")
    (d / "val.bin").write_bytes(b"")
    with pytest.raises(SystemExit, match="is empty"):
        run(d)
    d = tmp_path / "small"
    d.mkdir()
    np.arange(50, dtype=np.uint16).tofile(d / "train.bin")
    np.arange(50, dtype=np.uint16).tofile(d / "val.bin")
    with pytest.raises(SystemExit, match="fewer than one batch"):
        run(d)
    d = tmp_path / "wide"
    d.mkdir()
    np.full(1000, 60000, np.uint16).tofile(d / "train.bin")
    np.full(1000, 60000, np.uint16).tofile(d / "val.bin")
    with pytest.raises(SystemExit, match="beyond the model's vocabulary"):
        run(d)


def test_optimizer_choices_map_to_the_library():
    def kw(**c):
        return optimizers.omgd_kwargs(finalize(Config(preset="gpt2-124m", **c)))

    assert kw(optimizer="omgd-layer") == dict(
        steps_per_mask=100,
        key=0,
        state="compact",
        granularity="layer",
        layers=r"^blocks/",
        layers_per_phase=3,
    )
    assert kw(optimizer="lisa")["traversal"] == "iid" and kw(optimizer="lisa")["scale"] is False
    assert kw(optimizer="omgd-tensor") == dict(
        steps_per_mask=100,
        key=0,
        state="frozen",
        granularity="tensor",
        num_masks=2,
        warmup_steps=1000,
    )
    assert finalize(Config(preset="gpt2-124m", optimizer="omgd-layer")).num_masks == 4
    # decay only matrices and embeddings, even though stacked biases and norms are 2-D
    params = {
        "blocks": {
            "ln_1": {"scale": np.ones((2, 3))},
            "c": {"kernel": np.ones((2, 3, 3)), "bias": np.ones((2, 3))},
        },
        "wte": {"embedding": np.ones((5, 3))},
    }
    assert jax.tree.leaves(optimizers.decay_mask(params)) == [False, True, False, True]


def test_plot_and_demo(data_dir, tmp_path, monkeypatch, capsys):
    from examples import demo
    from examples.gpt2.plot import plot_runs

    monkeypatch.setattr(demo, "prepare_data", lambda d: None)
    rows = demo.main(
        [
            "--preset",
            "small-bytes",  # blocks hold most parameters: where the lean step saves
            "--steps",
            "8",
            "--data",
            str(data_dir),
            "--out-dir",
            str(tmp_path),
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert [r["optimizer"] for r in rows] == ["adamw", "lisa", "omgd-layer"]
    assert "peak step MiB" in out and "opt state MiB" in out
    adamw, lisa, omgd = rows
    cfg = finalize(Config(preset="small-bytes", optimizer="lisa", data=str(data_dir)))
    n_layer, gamma = PRESETS["small-bytes"].n_layer, cfg.layers_per_phase
    assert gamma < n_layer
    for r in (lisa, omgd):  # block state: gamma of the n_layer blocks (compact)
        assert r["opt_state_blocks_bytes"] == adamw["opt_state_blocks_bytes"] * gamma // n_layer
        assert r["opt_state_bytes"] < adamw["opt_state_bytes"]
        # the lean step holds gradients and moments for gamma of the blocks only
        assert r["peak_bytes"] < adamw["peak_bytes"]
    for r in rows:
        assert np.isfinite(r["val_loss"]) and r["peak_bytes"] > r["opt_state_bytes"]
        assert f"{r['val_loss']:.4f}" in out
    for png in ("loss.png", "pareto.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = plot_runs([tmp_path / "adamw", tmp_path / "lisa"], tmp_path / "again.png")
    assert again.stat().st_size > 10_000


_MULTI_DEVICE_RUN = """
import json, sys
from examples.gpt2.config import Config
from examples.gpt2.train import train
import jax
assert jax.device_count() == 8, jax.devices()
for cfg in json.loads(sys.argv[1]):  # one process for every layout: one start, shared compiles
    train(Config(**cfg))
"""


def _scale_out_run(steps):
    """omgd-layer on 8 sequences a step, switching from AdamW at step 2, one evaluation."""
    return dict(optimizer="omgd-layer", steps=steps, batch_size=8, warmup_masks=2,
                steps_per_mask=2, eval_every=steps, checkpoint_every=steps)  # fmt: skip


def test_eight_cpu_devices_match_one(data_dir, tmp_path):
    """The mesh path: 8 forced host devices == 1 device, data parallel (batch split, params and
    state replicated) and FSDP (params and state split too)."""
    kw = _scale_out_run(6)
    train(_cfg(data_dir, tmp_path / "one", **kw))
    layouts = {"data-parallel": False, "fsdp": True}
    many = [dataclasses.asdict(_cfg(data_dir, tmp_path / name, fsdp=fsdp, **kw))
            for name, fsdp in layouts.items()]  # fmt: skip
    env = dict(os.environ)  # the suite's XLA flags kept
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"
    subprocess.run(
        [sys.executable, "-c", _MULTI_DEVICE_RUN, json.dumps(many)],
        check=True,
        env=env,
        cwd=str(pathlib.Path(__file__).resolve().parents[2]),
        timeout=600,
    )
    _, one = _losses(tmp_path / "one")
    assert len(one) == 6 and one[0] != one[-1]
    for name in layouts:
        _, eight = _losses(tmp_path / name)
        np.testing.assert_allclose(eight, one, rtol=2e-4, err_msg=name)


TWO_DEVICES = "--xla_force_host_platform_device_count=2"


def test_two_processes_over_loopback_match_one(data_dir, tmp_path):
    """Multi-host path: `jax.distributed.initialize` over 127.0.0.1, 2 processes x 2 devices,
    each feeding its share of the batch (`make_array_from_process_local_data`)."""
    import socket

    kw = _scale_out_run(4)
    one_summary = train(_cfg(data_dir, tmp_path / "one", **kw))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = json.dumps(dataclasses.asdict(_cfg(data_dir, tmp_path / "two", **kw)))
    root = str(pathlib.Path(__file__).resolve().parents[2])
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _MULTI_PROCESS_RUN, cfg],
            env=dict(
                os.environ,
                JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                JAX_NUM_PROCESSES="2",
                JAX_PROCESS_ID=str(i),
                XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {TWO_DEVICES}",
            ),
            cwd=root,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            p.kill()
            outputs.append(p.communicate()[0])
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outputs)
    assert all("process_count=2 device_count=4" in o for o in outputs), outputs
    _, one = _losses(tmp_path / "one")
    _, two = _losses(tmp_path / "two")
    assert len(one) == 4
    np.testing.assert_allclose(two, one, rtol=2e-4)
    # The masks: every process's active layers per step, gathered from both processes
    # (`process_allgather`), printed by each; identical across processes and to one process's.
    gathered = [json.loads(o.split("MASKS ")[1].splitlines()[0]) for o in outputs]
    assert gathered[0] == gathered[1]
    per_process = gathered[0]
    assert len(per_process) == 2 and per_process[0] == per_process[1]
    assert [ids for _, ids in one_summary["active_layers"]] == per_process[0]
    assert len(per_process[0]) == 2  # steps 2 and 3 (masks after 2 AdamW steps)


_MULTI_PROCESS_RUN = """
import json, sys
import jax
import numpy as np
from jax.experimental import multihost_utils
from examples.gpt2.config import Config
from examples.gpt2.train import train
s = train(Config(**json.loads(sys.argv[1])))
ids = np.array([ids for _, ids in s["active_layers"]], np.int32)
print("MASKS " + json.dumps(multihost_utils.process_allgather(ids).tolist()), flush=True)
print(f"process_count={jax.process_count()} device_count={jax.device_count()}", flush=True)
"""


def test_sigterm_saves_a_checkpoint_that_resumes(data_dir, tmp_path):
    """SIGTERM mid-run: the step in progress finishes, is saved, the process exits cleanly; a
    --resume run then continues from that step (examples/gpt2/checkpoint.py)."""
    import signal
    import time

    out = tmp_path / "run"
    argv = ["--preset", "nano", "--data", str(data_dir), "--out-dir", str(out), "--log-every",
            "1", "--eval-iters", "1", "--no-progress", "--no-tensorboard"]  # fmt: skip
    root = str(pathlib.Path(__file__).resolve().parents[2])
    cmd = [sys.executable, "-m", "examples.gpt2.train", *argv]
    proc = subprocess.Popen([*cmd, "--steps", "100000"], cwd=root, stderr=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    saved = int(re.search(r"received signal 15: saved step (\d+)", stderr)[1])
    assert saved >= 2 and f"stopped: step {saved}" in stdout
    assert (out / "checkpoints" / str(saved)).is_dir()
    subprocess.run([*cmd, "--steps", str(saved + 2), "--resume"], cwd=root, check=True,
                   capture_output=True, timeout=300)  # fmt: skip
    steps, _ = _losses(out)
    assert steps == list(range(1, saved + 3))
