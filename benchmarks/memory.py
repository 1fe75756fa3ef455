"""Compiled memory of one training step, split like the paper's Table 8.

    python -m benchmarks.memory --out benchmarks/results/memory.json

Every row is `jax.jit(step, donate_argnums=(0, 1)).lower(<ShapeDtypeStruct inputs>).compile()
.memory_analysis()`: nothing is allocated, so LLaMA-7B runs on a laptop. The split:

* weights: bytes of the parameter pytree; optimizer: bytes of the optimizer-state pytree (both
  are arguments, donated, so the new ones alias them);
* gradients: bytes of the gradient pytree the step builds (full-size for dense steps, the
  always-active leaves plus the [gamma, ...] views for the lean step);
* other: total - weights - optimizer - gradients (activations, logits, temporaries);
* total = argument + temp bytes (the outputs alias the donated arguments).

Same activation policy on every row: per-layer remat (each block keeps its input) and
cross-entropy over chunks of tokens (no full-vocabulary logits); the LLaMA rows also run the
SwiGLU in 8 chunks of hidden units (``mlp_chunk``) and recompute the attention in the backward
after the MLP's (``attn_remat``), both options of `examples/llama/model.py` (same values).
Every record names the traversal phase it measures (``"phase"``): ``"layers"`` for the rows
whose embedding and head are always trained or frozen (the dense rows have no phases and say
``"layers"`` too); ``"every"`` for ``omgd-layer-rotate``, whose embedding and head are units of
the traversal: the active unit is traced data, so one compiled program serves the layers, the
embedding and the head phases, and its peak is the largest phase's or more. LLaMA-7B and
Llama-3.1-8B are 16-bit (weights, gradients, moments) as the paper counts; on the CPU backend
bf16 matmuls are widened to f32 and the widening of the whole weight stack is hoisted out of the
layer loop, so the 16-bit rows use float16 with
`--xla_disable_hlo_passes=change-op-data-type` (same bytes as bf16). XLA:CPU also hands row
reductions (RMSNorm's mean of squares and its backward) to YNNPACK, whose fusions take their
broadcast operands materialised: at LLaMA-7B four f32 [16, 256, 4096] broadcasts (256 MiB)
sit in every layer's backward, which an accelerator fuses away. Every row is compiled with
`--xla_cpu_experimental_ynn_fusion_type=-reduce` (XLA's own reductions instead); `--ynn`
keeps XLA:CPU's default.
"""

from __future__ import annotations

import argparse
import math
import os
import re

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from tqdm import tqdm

import omgd_jax
from benchmarks import report

LAYERS = r"^blocks/"
GIB = 2**30
# The units of the rotate row (the Llama and GPT-2 paths of the embedding and head, one unit
# each) and the frozen embedding of the frozen-embedding row.
ROTATE = r"^(embed|head|wte)/"
FROZEN_EMBEDDING = r"^(embed|wte)/"
PHASES = ("layers", "every")  # what a record's "phase" can say (see the module docstring)
# The rows of every model; Llama-3.1-8B adds the rotate and frozen-embedding rows.
CORE = (
    "adamw",
    "galore r128",
    "omgd-layer lean (gamma={gamma})",
    "omgd-element compact (M=4)",
    "lisa lean (gamma={gamma})",
)


def xla_flags(ynn: bool = False) -> str:
    """XLA_FLAGS for the measurement: 16-bit matmuls kept 16-bit; YNNPACK reductions off."""
    flags = "--xla_disable_hlo_passes=change-op-data-type"
    if not ynn:
        flags += " --xla_cpu_experimental_ynn_fusion_type=-reduce"
    return (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()


def nbytes(tree) -> int:
    total = 0
    for x in jax.tree.leaves(tree):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.eval_shape(jax.random.key_data, x)
        total += math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
    return total


def models():
    """(name, abstract model, loss_fn, batch shape, gamma, the names of its methods)."""
    from examples.gpt2.model import GPT
    from examples.gpt2.model import get_config as gpt2_config
    from examples.gpt2.model import loss_fn as gpt2_loss
    from examples.llama.model import Llama
    from examples.llama.model import get_config as llama_config
    from examples.llama.model import loss_fn as llama_loss

    def llama(preset):
        cfg = llama_config(
            preset,
            param_dtype="float16",
            dtype="float16",
            remat=True,
            loss_chunk=512,
            mlp_chunk=llama_config(preset).hidden // 8,
            attn_remat=True,
        )
        return lambda: Llama(cfg, nnx.Rngs(0))

    core = tuple(name.format(gamma=2) for name in CORE)
    yield "llama-7b 16x256 fp16", llama("llama-7b"), llama_loss, (16, 256), 2, core
    eight_b = (
        "adamw",
        "galore r128",
        "omgd-layer lean (gamma=2)",
        "omgd-layer-rotate lean (gamma=2)",
        "omgd-layer-frozen-embedding lean (gamma=2)",
    )
    yield "llama-3.1-8b 16x256 fp16", llama("llama-3.1-8b"), llama_loss, (16, 256), 2, eight_b
    g = gpt2_config("gpt2-124m", remat=True, loss_chunk=256)
    core = tuple(name.format(gamma=3) for name in CORE)
    yield "gpt2-124m 1x1024 fp32", lambda: GPT(g, nnx.Rngs(0)), gpt2_loss, (1, 1024), 3, core
    yield "gpt2-124m 12x1024 fp32", lambda: GPT(g, nnx.Rngs(0)), gpt2_loss, (12, 1024), 3, core


def methods(gamma, dtype):
    adam = dict(b1=0.9, b2=0.95, weight_decay=0.1, mu_dtype=dtype)
    adam_kw = dict(b1=0.9, b2=0.95, weight_decay=0.1)
    layer = dict(granularity="layer", layers=LAYERS, layers_per_phase=gamma, steps_per_mask=100)
    return {
        "adamw": ("dense", optax.adamw(1e-4, **adam)),
        # optax.contrib.galore through omgd_jax.galore, which also projects stacked
        # [N_L, m, n] kernels (per layer; optax's alone leaves 3-D leaves to plain Adam), the
        # paper's side (the smaller dimension); embeddings, head and norms stay on Adam.
        "galore r128": (
            "dense",
            omgd_jax.galore(1e-4, rank=128, leaves=r"^blocks/.*kernel", **adam_kw),
        ),
        f"omgd-layer lean (gamma={gamma})": ("lean", omgd_jax.omgd_adamw(1e-4, **adam, **layer)),
        f"omgd-layer-rotate lean (gamma={gamma})": (
            "lean",
            omgd_jax.omgd_adamw(1e-4, **adam, **layer, units=ROTATE),
            dict(units=ROTATE),
        ),
        f"omgd-layer-frozen-embedding lean (gamma={gamma})": (
            "lean",
            omgd_jax.omgd_adamw(1e-4, **adam, **layer, frozen=FROZEN_EMBEDDING),
            dict(frozen=FROZEN_EMBEDDING),
        ),
        "omgd-element compact (M=4)": (
            "dense",
            omgd_jax.omgd_adamw(1e-4, **adam, num_masks=4, steps_per_mask=100),
        ),
        f"lisa lean (gamma={gamma})": (
            "lean",
            omgd_jax.omgd_adamw(1e-4, **adam, **layer, traversal="iid", scale=False),
        ),
    }


def measure(make_model, loss_fn, batch, gamma, only=None):
    """One record per method of `methods` (those named in ``only``, or all)."""
    abstract = nnx.eval_shape(make_model)
    graphdef, params = nnx.split(abstract, nnx.Param)
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    dtype = jax.tree.leaves(params)[0].dtype
    tokens = jax.ShapeDtypeStruct(batch, jnp.int32)

    def loss_of(p, x, y):
        return loss_fn(nnx.merge(graphdef, p), x, y)

    for name, (kind, tx, *spec) in methods(gamma, dtype).items():
        if only is not None and name not in only:
            continue
        spec = spec[0] if spec else {}
        opt_state = jax.eval_shape(tx.init, params)
        if kind == "lean":
            step = omgd_jax.lean_train_step(loss_of, tx, layers=LAYERS, **spec)

            def grads_of(p, s, x, y, spec=spec):
                fn = omgd_jax.lean_value_and_grad(loss_of, layers=LAYERS, **spec)
                if "units" in spec:
                    return fn(p, omgd_jax.active_layers(s), omgd_jax.active_unit(s), x, y)[1]
                return fn(p, omgd_jax.active_layers(s), x, y)[1]
        else:
            step = omgd_jax.train_step(loss_of, tx)

            def grads_of(p, s, x, y):
                return jax.grad(loss_of)(p, x, y)

        grads = jax.eval_shape(grads_of, params, opt_state, tokens, tokens)
        mem = report.memory(report.compile_step(step, params, opt_state, tokens, tokens))
        total = mem["peak_bytes"]
        if "frozen" in spec:  # the frozen leaves' zeros have no consumer: no buffer
            frozen = re.compile(spec["frozen"])
            grads = [
                x
                for path, x in jax.tree_util.tree_flatten_with_path(grads)[0]
                if not frozen.search(jax.tree_util.keystr(path, simple=True, separator="/"))
            ]
        if "units" in spec:
            # The step hands the phase's gradient out packed: the stack's views or one unit's
            # leaves in one buffer, as long as the largest of them.
            units, layers, by_part = re.compile(spec["units"]), re.compile(LAYERS), {}
            rest = []
            for path, x in jax.tree_util.tree_flatten_with_path(grads)[0]:
                leaf = jax.tree_util.keystr(path, simple=True, separator="/")
                m = units.search(leaf)
                part = m.group(1) if m else "layers" if layers.search(leaf) else None
                if part is None:
                    rest.append(x)
                else:
                    by_part[part] = by_part.get(part, 0) + nbytes(x)
            grads = rest + [jax.ShapeDtypeStruct((max(by_part.values()),), jnp.uint8)]
        w, o, g = nbytes(params), nbytes(opt_state), nbytes(grads)
        yield {
            "method": name,
            "phase": "every" if "units" in spec else "layers",
            "weights": w,
            "gradients": g,
            "optimizer": o,
            "other": total - w - o - g,
            "total": total,
            "argument": mem["argument_bytes"],
            "temp": mem["temp_bytes"],
        }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="write the records as JSON to this file")
    parser.add_argument("--only", default=None, help="models whose name contains this string")
    parser.add_argument(
        "--ynn",
        action="store_true",
        help="keep XLA:CPU's YNNPACK reduce fusions (they materialise their broadcast operands)",
    )
    args = parser.parse_args(argv)
    # Read when JAX creates its CPU client, which nothing above has done yet.
    os.environ["XLA_FLAGS"] = xla_flags(args.ynn)
    records = []
    todo = [m for m in models() if args.only is None or args.only in m[0]]
    bar = tqdm(total=sum(len(m[5]) for m in todo), desc="compiling steps")
    for model, make, loss, batch, gamma, only in todo:
        for rec in measure(make, loss, batch, gamma, only):
            records.append({"model": model, **rec})
            bar.update()
    bar.close()
    by_model = {}
    for r in records:
        by_model.setdefault(r["model"], []).append(r)
    for model, rows in by_model.items():
        base = rows[0]["total"]
        print(f"\n{model} (GiB)")
        print("| method | weights | gradients | optimizer | other | total | x AdamW |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            cols = [r[k] / GIB for k in ("weights", "gradients", "optimizer", "other", "total")]
            print(
                f"| {r['method']} | "
                + " | ".join(f"{c:.2f}" for c in cols)
                + f" | {r['total'] / base:.3f} |"
            )
    if args.out:
        report.write(args.out, records, units="bytes", peak="argument + temp (report.peak_bytes)")


if __name__ == "__main__":
    main()
