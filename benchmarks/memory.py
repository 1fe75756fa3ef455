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
cross-entropy over chunks of tokens (no full-vocabulary logits). LLaMA-7B is 16-bit
(weights, gradients, moments) as the paper counts; on the CPU backend bf16 matmuls are
widened to f32 and the widening of the whole weight stack is hoisted out of the layer loop,
so the 16-bit rows use float16 with
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

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from tqdm import tqdm

import omgd_jax
from benchmarks import report

LAYERS = r"^blocks/"
GIB = 2**30


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
    """(name, abstract model, loss_fn, batch shape, number of layers, gamma)."""
    from examples.gpt2.model import GPT
    from examples.gpt2.model import get_config as gpt2_config
    from examples.gpt2.model import loss_fn as gpt2_loss
    from examples.llama.model import Llama
    from examples.llama.model import get_config as llama_config
    from examples.llama.model import loss_fn as llama_loss

    llama = llama_config(
        "llama-7b", param_dtype="float16", dtype="float16", remat=True, loss_chunk=512
    )
    yield "llama-7b 16x256 fp16", lambda: Llama(llama, nnx.Rngs(0)), llama_loss, (16, 256), 2
    g = gpt2_config("gpt2-124m", remat=True, loss_chunk=256)
    yield "gpt2-124m 1x1024 fp32", lambda: GPT(g, nnx.Rngs(0)), gpt2_loss, (1, 1024), 3
    yield "gpt2-124m 12x1024 fp32", lambda: GPT(g, nnx.Rngs(0)), gpt2_loss, (12, 1024), 3


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
        "omgd-element compact (M=4)": (
            "dense",
            omgd_jax.omgd_adamw(1e-4, **adam, num_masks=4, steps_per_mask=100),
        ),
        f"lisa lean (gamma={gamma})": (
            "lean",
            omgd_jax.omgd_adamw(1e-4, **adam, **layer, traversal="iid", scale=False),
        ),
    }


def measure(make_model, loss_fn, batch, gamma):
    abstract = nnx.eval_shape(make_model)
    graphdef, params = nnx.split(abstract, nnx.Param)
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    dtype = jax.tree.leaves(params)[0].dtype
    tokens = jax.ShapeDtypeStruct(batch, jnp.int32)

    def loss_of(p, x, y):
        return loss_fn(nnx.merge(graphdef, p), x, y)

    for name, (kind, tx) in methods(gamma, dtype).items():
        opt_state = jax.eval_shape(tx.init, params)
        if kind == "lean":
            step = omgd_jax.lean_train_step(loss_of, tx, layers=LAYERS)

            def grads_of(p, s, x, y, tx=tx):
                fn = omgd_jax.lean_value_and_grad(loss_of, layers=LAYERS)
                return fn(p, omgd_jax.active_layers(s), x, y)[1]
        else:
            step = omgd_jax.train_step(loss_of, tx)

            def grads_of(p, s, x, y):
                return jax.grad(loss_of)(p, x, y)

        grads = jax.eval_shape(grads_of, params, opt_state, tokens, tokens)
        mem = report.memory(report.compile_step(step, params, opt_state, tokens, tokens))
        total = mem["peak_bytes"]
        w, o, g = nbytes(params), nbytes(opt_state), nbytes(grads)
        yield {
            "method": name,
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
    bar = tqdm(total=len(todo) * 5, desc="compiling steps")
    for model, make, loss, batch, gamma in todo:
        for rec in measure(make, loss, batch, gamma):
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
