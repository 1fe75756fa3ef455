"""Shared helpers: small trees and a way to read the masks a transformation applies."""

import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import pytest

jax.config.update("jax_enable_x64", False)

# One persistent compilation cache per `pytest` run, shared by the xdist workers and the
# processes the tests start (they inherit the environment): most of the suite's time is XLA
# compiling the same small training steps again (every resume, restart and subprocess traces
# them anew). Set before anything compiles; a cache the user chose is used as it is and kept.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="omgd-jax-test-xla-")
    os.environ["OMGD_JAX_TEST_CACHE_OWNER"] = str(os.getpid())
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update(
    "jax_persistent_cache_min_compile_time_secs",
    float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
)
jax.config.update(
    "jax_persistent_cache_min_entry_size_bytes",
    int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]),
)
# XLA's backend optimisation (LLVM codegen) is most of what compiling costs here and none of
# what the tests check: every comparison runs both of its sides under the same setting, and
# compiled memory is XLA's buffer assignment, which the HLO passes decide as before (the same
# bytes, measured). For the workers and the processes the tests start; a value set is kept.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
jax.config.update(
    "jax_disable_most_optimizations",
    os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"].lower() not in ("0", "false", ""),
)


def pytest_unconfigure(config):
    # Only the process that made the cache (the xdist controller) removes it.
    if _OWN_CACHE and os.environ.get("OMGD_JAX_TEST_CACHE_OWNER") == str(os.getpid()):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


def stacked_tree(num_layers=4, width=3):
    """A GPT-like tree: embeddings and head always on, blocks stacked on axis 0."""
    return {
        "wte": jnp.ones((7, width)),
        "blocks": {
            "attn": {"kernel": jnp.ones((num_layers, width, 2 * width))},
            "ln": {"scale": jnp.ones((num_layers, width))},
        },
        "ln_f": jnp.ones((width,)),
    }


def masks_over(tx, tree, steps, **extra):
    """The per-step masks of ``tx`` (fed a gradient of ones), as a list of trees."""
    state = tx.init(tree)
    ones = jax.tree.map(jnp.ones_like, tree)
    update = jax.jit(tx.update)
    out = []
    for _ in range(steps):
        u, state = update(ones, state, tree, **extra)
        out.append(u)
    return out


def random_tree(tree, seed):
    """A tree shaped like ``tree`` with standard normal leaves drawn from ``seed``."""
    keys = jax.random.split(jax.random.key(seed), len(jax.tree.leaves(tree)))
    leaves = [
        jax.random.normal(k, x.shape) for k, x in zip(keys, jax.tree.leaves(tree), strict=True)
    ]
    return jax.tree.unflatten(jax.tree.structure(tree), leaves)


def tree_sum(trees):
    return jax.tree.map(lambda *xs: sum(xs), *trees)


@pytest.fixture
def gpt_tree():
    return stacked_tree()


# `make test` spreads tests over the workers one by one (--dist loadgroup). The files below
# build something expensive in a session-scoped fixture (a compiled comparison, the docs, a
# wheel, a trained run): their tests stay on one worker, so it is built once.
ONE_WORKER_FILES = {
    "test_compare.py",
    "test_memory.py",
    "test_docs.py",
    "test_notebooks.py",
    "test_packaging.py",
    "test_bad_input.py",
    "test_wor_vs_iid.py",
    "test_llama_finetune.py",
}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the marks
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in ONE_WORKER_FILES:
            item.add_marker(pytest.mark.xdist_group(item.path.stem))
