"""Bad input: every case raises at once, with a sentence that names the problem."""

import re

import jax
import jax.numpy as jnp
import optax
import pytest

import omgd_jax
from tests.conftest import stacked_tree

ADAM = optax.adam(1e-3)
LAYER = dict(granularity="layer", layers=r"^blocks/")


def first_update(tx, tree=None, update_tree=None):
    tree = stacked_tree() if tree is None else tree
    state = tx.init(tree)
    upd = tree if update_tree is None else update_tree
    return tx.update(upd, state, upd)


def injected_without_static_args():
    tx = optax.inject_hyperparams(omgd_jax.omgd_adamw)(learning_rate=1e-3, num_masks=2)
    return tx.init(stacked_tree())


def scan_ids_without_view():
    return omgd_jax.scan_layers(lambda p, x: p * x, jnp.ones(3), 1.0, ids=jnp.array([0]))


CASES = [
    # (what, call, error type, words the message must hold)
    ("zero masks", lambda: omgd_jax.omgd_mask(0), ValueError, "num_masks must be >= 1, got 0"),
    ("negative masks", lambda: omgd_jax.omgd(ADAM, -2), ValueError, "num_masks must be >= 1"),
    ("float masks", lambda: omgd_jax.omgd_mask(2.5), TypeError, "num_masks must be an int"),
    ("bool masks", lambda: omgd_jax.omgd_mask(True), TypeError, "num_masks must be an int"),
    ("zero hold", lambda: omgd_jax.omgd_mask(2, 0), ValueError, "steps_per_mask must be >= 1"),
    ("negative warm-up", lambda: omgd_jax.omgd_mask(2, warmup_steps=-1), ValueError,
     "warmup_steps must be >= 0"),
    ("unknown granularity", lambda: omgd_jax.omgd_mask(2, granularity="row"), ValueError,
     "granularity must be one of ('element', 'tensor', 'layer'), got 'row'"),
    ("unknown traversal", lambda: omgd_jax.omgd_mask(2, traversal="random"), ValueError,
     "traversal must be one of"),
    ("unknown layout", lambda: omgd_jax.omgd_mask(2, layout="banded"), ValueError,
     "layout must be one of"),
    ("unknown state", lambda: omgd_jax.omgd(ADAM, 2, state="lazy"), ValueError,
     "state must be one of ('compact', 'frozen')"),
    ("scale not a bool", lambda: omgd_jax.omgd_mask(2, scale="yes"), TypeError,
     "scale must be a bool"),
    ("key a string", lambda: omgd_jax.omgd_mask(2, key="seed"), TypeError,
     "key must be an int seed or a single jax PRNG key"),
    ("inner not an optimizer", lambda: omgd_jax.omgd("adam", 2), TypeError,
     "inner must be an optax.GradientTransformation"),
    ("no masks given", lambda: omgd_jax.omgd_mask(), ValueError, "num_masks is required"),
    ("layer without layers=", lambda: omgd_jax.omgd_mask(2, granularity="layer"), ValueError,
     "granularity='layer' needs layers="),
    ("layers= without layer", lambda: omgd_jax.omgd_mask(2, layers="^b/"), ValueError,
     "layers= is only used with granularity='layer'"),
    ("gamma without layer", lambda: omgd_jax.omgd_mask(2, layers_per_phase=1), ValueError,
     "layers_per_phase is only used with granularity='layer'"),
    ("M and gamma", lambda: omgd_jax.omgd_mask(2, layers_per_phase=1, **LAYER), ValueError,
     "give num_masks or layers_per_phase"),
    ("compact tensor", lambda: omgd_jax.omgd(ADAM, 2, granularity="tensor"), ValueError,
     "state='compact' supports granularity 'element' and 'layer'"),
    ("compact warm-up", lambda: omgd_jax.omgd(ADAM, 2, warmup_steps=3), ValueError,
     "warmup_steps must be 0 with state='compact'"),
    ("compact random layout", lambda: omgd_jax.omgd(ADAM, 2, layout="random"), ValueError,
     "state='compact' needs layout='contiguous'"),
    ("layers selecting nothing",
     lambda: first_update(omgd_jax.omgd_mask(1, granularity="layer", layers="^nope/")),
     ValueError, "selects no floating-point leaf"),
    ("gamma above the depth",
     lambda: first_update(omgd_jax.omgd(ADAM, layers_per_phase=5, **LAYER)), ValueError,
     "layers_per_phase=5 is larger than the number of layers (4)"),
    ("M not dividing the depth", lambda: first_update(omgd_jax.omgd(ADAM, 3, **LAYER)), ValueError,
     "num_masks=3 must divide the number of layers (4)"),
    ("compact: another tree",
     lambda: first_update(omgd_jax.omgd(ADAM, 2), update_tree={"w": jnp.ones(3)}), ValueError,
     "does not match the tree given to init"),
    ("frozen: another tree",
     lambda: first_update(omgd_jax.omgd(ADAM, 2, state="frozen"), update_tree={"w": jnp.ones(3)}),
     ValueError, "does not match"),
    ("inject_hyperparams without static_args", injected_without_static_args, TypeError,
     "static_args=omgd_jax.static_args(factory)"),
    ("lean ids without view", scan_ids_without_view, ValueError, "ids is given without view"),
    ("active_layers of a plain Adam state",
     lambda: omgd_jax.active_layers(ADAM.init(stacked_tree())), ValueError,
     "must hold exactly one layer-wise compact OMGD state"),
    ("repartition of fixed bands", lambda: omgd_jax.omgd_mask(2, repartition=True), ValueError,
     "repartition=True needs a partition to redraw, and layout='contiguous' has fixed"),
    ("repartition not a bool", lambda: omgd_jax.omgd(ADAM, 2, repartition=1), TypeError,
     "repartition must be a bool, got 1"),
    ("galore rank 0", lambda: omgd_jax.galore(1e-3, rank=0), ValueError, "rank must be >= 1"),
]  # fmt: skip


def test_the_table_is_large():
    assert len(CASES) >= 20


@pytest.mark.parametrize("what, call, error, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_a_sentence_naming_the_problem(what, call, error, words):
    with pytest.raises(error) as e:
        call()
    assert words in str(e.value), str(e.value)


def test_traced_sizes_name_static_args_in_jit():
    """The same sentence when a factory is built inside jit with a traced size."""

    @jax.jit
    def build(k):
        return omgd_jax.omgd_mask(2, steps_per_mask=k).init({"w": jnp.ones(2)})

    with pytest.raises(TypeError, match="steps_per_mask must be a Python int >= 1, got an array"):
        build(3)


# ------------------------------------------------------------------ the GPT-2 example's cases
def _snapshot(directory):
    """Every file under ``directory`` with its bytes: what must survive a refused run."""
    return {p: p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A nano AdamW run of 2 steps with its checkpoint, and its data."""
    import numpy as np

    from examples.gpt2.train import train
    from tests.examples.test_gpt2_train import _cfg

    root = tmp_path_factory.mktemp("bad_input")
    data = root / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    rng.integers(0, 64, 4000, dtype=np.uint16).tofile(data / "train.bin")
    rng.integers(0, 64, 1000, dtype=np.uint16).tofile(data / "val.bin")
    out = root / "run"
    train(_cfg(data, out, steps=2, eval_every=2, checkpoint_every=2))
    return data, out


def _example_cases():
    import numpy as np

    def empty(d):
        (d / "train.bin").write_bytes(b"")
        (d / "val.bin").write_bytes(b"")

    def short(d):
        np.arange(50, dtype=np.uint16).tofile(d / "train.bin")
        np.arange(50, dtype=np.uint16).tofile(d / "val.bin")

    return [
        # (what, data preparation or None for the trained run's data, config, message)
        ("missing corpus", "absent", dict(steps=1), "does not exist"),
        ("empty corpus", empty, dict(steps=1), "is empty"),
        ("corpus shorter than one batch", short, dict(steps=1), "fewer than one batch"),
        ("resuming with a different preset", None,
         dict(preset="tiny", block_size=32, steps=4, resume=True),
         "preset: checkpoint 'nano' vs now 'tiny'"),
        ("a checkpoint from another optimizer", None,
         dict(optimizer="omgd-layer", steps=4, resume=True),
         "optimizer: checkpoint 'adamw' vs now 'omgd-layer'"),
        ("checkpoints without --resume", None, dict(steps=4), "already holds checkpoints"),
    ]  # fmt: skip


@pytest.mark.parametrize(
    "what, prepare, config, message", _example_cases(), ids=[c[0] for c in _example_cases()]
)
def test_the_example_refuses_with_a_sentence_and_keeps_the_files(
    what, prepare, config, message, trained_run, tmp_path
):
    from examples.gpt2.train import train
    from tests.examples.test_gpt2_train import _cfg

    data, out = trained_run
    if prepare is not None:
        data = tmp_path / "data"
        if prepare != "absent":
            data.mkdir()
            prepare(data)
    before = _snapshot(out)
    with pytest.raises(SystemExit, match=re.escape(message)):
        train(_cfg(data, out, **config))
    assert _snapshot(out) == before  # nothing on disk lost or changed
