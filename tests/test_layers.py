"""Which leaves are units, layers or always active and every layer-spec error (omgd_jax.layers)."""

import re

import jax
import jax.numpy as jnp
import optax
import pytest

from omgd_jax._src import layers as layers_lib
from omgd_jax._src.layers import ALWAYS, SKIP, STACKED, UNIT, UNROLLED
from omgd_jax._src.placeholder import is_params_placeholder
from tests.conftest import stacked_tree


def test_plan_units_marks_floating_leaves_as_units_and_skips_the_rest():
    tree = {"a": jnp.ones((2, 3)), "b": jnp.arange(4), "c": jnp.ones((), jnp.bfloat16)}
    plan = layers_lib.plan_units(tree)
    assert plan.roles == (UNIT, SKIP, UNIT)  # leaves in key order a, b, c
    assert plan.sizes == (6, 4, 1)
    assert plan.num_units == 2
    assert plan.unit_leaves == (0, 2)
    assert plan.layer_of == (-1, -1, -1)
    assert plan.num_layers == 0


def test_plan_layers_stacked():
    tree = stacked_tree(num_layers=4)  # blocks/attn/kernel, blocks/ln/scale, ln_f, wte
    plan = layers_lib.plan_layers(tree, r"^blocks/")
    assert plan.roles == (STACKED, STACKED, ALWAYS, ALWAYS)
    assert plan.num_layers == plan.num_units == 4
    assert plan.layer_of == (-1, -1, -1, -1)
    assert plan.unit_leaves == ()


def test_plan_layers_unrolled_renumbers_the_captured_ids_in_numeric_order():
    # Layer ids 2, 10 and 7 (string order would put 10 before 2) become 0, 2 and 1.
    tree = {
        "emb": jnp.ones(3),
        "h_2": {"w": jnp.ones((2, 2))},
        "h_10": {"w": jnp.ones((2, 2))},
        "h_7": {"w": jnp.ones((2, 2)), "step": jnp.zeros((), jnp.int32)},
    }
    plan = layers_lib.plan_layers(tree, r"^h_(\d+)/")
    paths = [layers_lib.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    by_path = dict(zip(paths, zip(plan.roles, plan.layer_of, strict=True), strict=True))
    assert by_path == {
        "emb": (ALWAYS, -1),
        "h_10/w": (UNROLLED, 2),
        "h_2/w": (UNROLLED, 0),
        "h_7/step": (SKIP, -1),  # not floating: passed through even inside a layer
        "h_7/w": (UNROLLED, 1),
    }
    assert plan.num_layers == 3


def test_layer_spec_as_compiled_regex_and_as_callable():
    tree = stacked_tree(num_layers=3)
    compiled = layers_lib.plan_layers(tree, re.compile(r"^blocks/"))
    assert compiled == layers_lib.plan_layers(tree, r"^blocks/")
    by_callable = layers_lib.plan_layers(
        tree, lambda path, leaf: "stacked" if path.startswith("blocks/") else None
    )
    assert by_callable == compiled
    unrolled = {f"l{i}": jnp.ones(2) for i in range(3)}
    plan = layers_lib.plan_layers(unrolled, lambda path, leaf: 2 - int(path[1]))
    assert plan.roles == (UNROLLED,) * 3 and plan.layer_of == (2, 1, 0)


def test_plans_work_on_shapes():
    tree = stacked_tree(num_layers=4)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    assert layers_lib.plan_layers(shapes, r"^blocks/") == layers_lib.plan_layers(tree, r"^blocks/")
    assert layers_lib.plan_units(shapes) == layers_lib.plan_units(tree)
    zeros = layers_lib.concrete(shapes["wte"])
    assert isinstance(zeros, jax.Array) and zeros.shape == (7, 3) and not zeros.any()
    assert layers_lib.concrete(tree["wte"]) is tree["wte"]


def test_path_str_joins_dict_keys_attributes_and_indices():
    tree = {"a": [jnp.ones(1), {"b": jnp.ones(1)}]}
    paths = [layers_lib.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    assert paths == ["a/0", "a/1/b"]


def test_the_map_params_placeholder_is_recognised_by_type():
    seen = []

    def init(params):
        seen.append(is_params_placeholder(params))
        return ()

    optax.tree.map_params(init, lambda x: x, ())
    assert seen == [True]
    assert not is_params_placeholder({"w": jnp.ones(2)})
    assert not is_params_placeholder(None)


@pytest.mark.parametrize(
    "tree, spec, error, match",
    [
        (
            {"h": jnp.ones(2)},
            lambda path, leaf: "yes",
            TypeError,
            r"layers: the callable must return None, an int layer id or 'stacked', got 'yes' "
            r"for leaf 'h'",
        ),
        (
            {"h_x": {"w": jnp.ones(2)}},
            r"^h_([a-z])/",
            ValueError,
            r"layers: the first capture group of '\^h_\(\[a-z\]\)/' must be a layer number, "
            r"got 'x' in 'h_x/w'",
        ),
        (
            {"blocks": {"w": jnp.ones(())}},
            r"^blocks/",
            ValueError,
            r"layers: leaf 'blocks/w' was selected as stacked layers but is a scalar",
        ),
        (
            {"blocks": {"n": jnp.arange(3)}, "w": jnp.ones(2)},
            r"^blocks/",
            ValueError,
            r"layers='\^blocks/' selects no floating-point leaf of the tree; paths look like "
            r"\['blocks/n', 'w'\]",
        ),
        (
            {"blocks": {"w": jnp.ones((2, 3))}, "h_0": {"w": jnp.ones(3)}},
            lambda path, leaf: "stacked" if path.startswith("blocks") else 0,
            ValueError,
            "layers: mixes stacked leaves and unrolled layers; use one or the other",
        ),
        (
            {"blocks": {"a": jnp.ones((2, 3)), "b": jnp.ones((4, 3))}},
            r"^blocks/",
            ValueError,
            r"layers: stacked leaves disagree on the number of layers \(leading axes \[2, 4\]\)",
        ),
    ],
)
def test_every_error_of_plan_layers(tree, spec, error, match):
    with pytest.raises(error, match=match):
        layers_lib.plan_layers(tree, spec)
