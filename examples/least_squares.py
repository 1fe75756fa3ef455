"""Least-squares rate experiment of OMGD (arXiv 2603.05960, Sec. 5.1, Fig. 2; SPEC.md 1.4).

Random reshuffling (RR) with step eta_t = c / ((t + t0) * lambda_min) drives E||theta_t - theta*||^2
down like t^-2. Adding without-replacement masks (OMGD: a mask held for a whole epoch, M = 2
disjoint masks per cycle of M epochs) keeps that rate; an i.i.d. mask redrawn every step, or a
random projection redrawn every step, stalls at t^-1.

    python -m examples.least_squares --steps 1000000 --seeds 8 \
        --out examples/results/least_squares.json --plot examples/results/least_squares.png

Every seed has its own data, w, permutations and mask key. One method runs as a single
`jax.jit(jax.vmap(...))` of a `lax.scan` over epochs with an inner `lax.scan` over the n steps.
The masked methods use `omgd_jax.omgd_mask` inside the scanned step, so this experiment tests the
library. The error is recorded twice per epoch:
  * at the epoch ends (`slopes`): the sample gradients of a pass sum to the full gradient there,
    and RR / wor fall even faster than the theorem's t^-2, about t^-3;
  * halfway through each epoch (`slopes_mid_epoch`): the partial pass has not cancelled, and
    RR / wor show the t^-2 of Thm 5.3. iid and proj are t^-1 at both.

Warm-up: the paper's 100 full-gradient steps. `omgd_mask` counts its mask phases from step 0
(the released script's `masks[t // n]`), so each held mask covers exactly one reshuffled pass
even though masking starts mid-epoch; phases counted from the end of the warm-up would make
every mask straddle two passes, lose the in-pass cancellation and drop wor to t^-1.

Runs in float64 (inside a `jax.enable_x64` context): in float32 the rounding of 10^6 tiny updates
puts a floor near 1e-8 under the RR curve (slope > 0 over the last decade).
"""

import argparse
import time
from functools import partial
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.flatten_util import ravel_pytree

import omgd_jax
from benchmarks import report  # the results format of benchmarks/ and examples/

METHODS = ("rr", "wor", "iid", "proj")
N, D = 1000, 10


# -----------------------------------------------------------------------------
# the random-projection baseline (GoLore-style, redrawn every step)


def stiefel_sample(key, dim, rank, dtype=None):
    """P = Z (Z^T Z)^{-1/2} with Z ~ N(0, 1)^{dim x rank}: uniform on the Stiefel manifold."""
    if not 0 < rank <= dim:
        raise ValueError(f"rank must be in [1, dim={dim}], got {rank}")
    z = jax.random.normal(key, (dim, rank), dtype or jnp.result_type(float))
    s, v = jnp.linalg.eigh(z.T @ z)
    return z @ (v * lax.rsqrt(s)) @ v.T


def orthonormal_basis(z):
    """Gram-Schmidt Q of the columns of z (unrolled; cheap inside a scan, no LAPACK call).

    Q spans the columns of z, so Q Q^T = P P^T for P = z (z^T z)^{-1/2}: same projector.
    """
    cols = []
    for j in range(z.shape[1]):
        v = z[:, j]
        for _ in range(2):  # re-orthogonalise once for accuracy
            for q in cols:
                v = v - (q @ v) * q
        cols.append(v * lax.rsqrt(v @ v))
    return jnp.stack(cols, axis=1)


class ProjectionState(NamedTuple):
    count: jax.Array  # steps taken so far
    key: jax.Array


def random_projection(rank, *, key=0, warmup_steps=0):
    """Optax transform g -> (d / rank) P P^T g, P ~ Stiefel(d, rank) redrawn at every step.

    The whole gradient pytree is flattened to one vector of length d, so d / rank = 1 / r and
    E[(1/r) P P^T] = I. The first `warmup_steps` updates pass through unchanged. `update` takes
    this step's basis (d x rank, orthonormal columns, e.g. `orthonormal_basis` of a Gaussian Z)
    as the extra argument `basis`, or draws Z from fold_in(key, step) itself. Drawing and
    orthonormalising a whole epoch of bases at once outside the scan is several times faster
    on CPU than one small `jax.random.normal` per step with a per-seed (vmapped) key.
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")

    def init_fn(params):
        del params
        k = jax.random.key(key) if isinstance(key, int) else key
        return ProjectionState(count=jnp.zeros([], jnp.int32), key=k)

    def update_fn(updates, state, params=None, *, basis=None, **extra_args):
        del params, extra_args
        flat, unravel = ravel_pytree(updates)
        if rank > flat.size:
            raise ValueError(f"rank must be <= the number of parameters {flat.size}, got {rank}")
        if basis is None:
            z = jax.random.normal(jax.random.fold_in(state.key, state.count), (flat.size, rank),
                                  flat.dtype)
            q = orthonormal_basis(z)  # same span as stiefel_sample's P, so the same P P^T
        elif basis.shape != (flat.size, rank):
            raise ValueError(f"basis must have shape {(flat.size, rank)}, got {basis.shape}")
        else:
            q = basis
        projected = (flat.size / rank) * (q @ (q.T @ flat))
        flat = jnp.where(state.count < warmup_steps, flat, projected)
        return unravel(flat), ProjectionState(count=state.count + 1, key=state.key)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# -----------------------------------------------------------------------------
# problem and methods


def make_problem(key, n=N, d=D):
    """x ~ N(0, I), w ~ U[0, 1]^d, y = x w + N(0, 1).

    Returns x, y, theta* (the least-squares solution of these data) and lambda_min(x^T x / n).
    """
    kx, kw, ke = jax.random.split(key, 3)
    x = jax.random.normal(kx, (n, d))
    w = jax.random.uniform(kw, (d,))
    y = x @ w + jax.random.normal(ke, (n,))
    gram = x.T @ x
    theta_star = jnp.linalg.solve(gram, x.T @ y)
    lam_min = jnp.linalg.eigvalsh(gram / n)[0]
    return x, y, theta_star, lam_min


def make_mask(method, key, n, warmup, ratio=0.5, d=D):
    """The gradient transform of one method (before the step size). `key` may be traced."""
    num_masks = round(1 / ratio)
    if method == "rr":
        return optax.identity()
    if method == "wor":  # OMGD: each mask held for one epoch, a fresh partition every M epochs
        return omgd_jax.omgd_mask(num_masks, steps_per_mask=n, key=key, warmup_steps=warmup,
                                  granularity="element", layout="random")
    if method == "iid":  # ablation: a fresh i.i.d. mask at every step
        return omgd_jax.omgd_mask(num_masks, steps_per_mask=1, key=key, traversal="iid",
                                  warmup_steps=warmup, granularity="element", layout="random")
    if method == "proj":
        return random_projection(round(ratio * d), key=key, warmup_steps=warmup)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def run_seed(key, problem, method, epochs, *, c=2.0, t0=100, warmup=100, ratio=0.5):
    """One seed: ||theta - theta*||^2 in the middle and at the end of each RR epoch (batch 1).

    `problem` is `make_problem(jax.random.split(key, 3)[0])`. Returns (mid, end), each of shape
    [epochs]. The two differ in kind: at the end of an epoch
    the sample gradients of the pass sum to the full gradient (their noise cancels), halfway
    through they do not.
    """
    _, kperm, kmask = jax.random.split(key, 3)  # the first key made `problem`
    x, y, theta_star, lam_min = problem
    n, d = x.shape
    lr = lambda t: c / ((t + t0) * lam_min)
    mask = make_mask(method, kmask, n, warmup, ratio, d)
    tx = optax.chain(mask, optax.scale_by_learning_rate(lr))
    rank = round(ratio * d)

    def step(carry, xs):
        theta, state = carry
        i, q = xs
        g = x[i] * (x[i] @ theta - y[i])
        extra = {} if q is None else {"basis": q}
        u, state = tx.update(g, state, theta, **extra)
        return (theta + u, state), None

    def epoch(carry, k):
        kp, kz = jax.random.split(k)
        idx = jax.random.permutation(kp, n)
        q = None
        if method == "proj":  # a whole epoch of Stiefel bases at once (see random_projection)
            q = jax.vmap(orthonormal_basis)(jax.random.normal(kz, (n, d, rank), x.dtype))
        def half(carry, xs):  # scan over the two halves of the pass: the step is traced once
            carry, _ = lax.scan(step, carry, xs)
            return carry, jnp.sum((carry[0] - theta_star) ** 2)

        halves = jax.tree.map(lambda a: a.reshape(2, n // 2, *a.shape[1:]), (idx, q))
        carry, err = lax.scan(half, carry, halves)
        return carry, (err[0], err[1])

    theta0 = jnp.zeros(d, x.dtype)
    _, err = lax.scan(epoch, (theta0, tx.init(theta0)), jax.random.split(kperm, epochs))
    return err


@partial(jax.jit, static_argnums=(1, 2))
def _make_problems(keys, n, d):
    """make_problem for every seed key (from the first of its three subkeys)."""
    return jax.vmap(lambda k: make_problem(jax.random.split(k, 3)[0], n, d))(keys)


class Result(NamedTuple):
    t: np.ndarray  # steps at the epoch ends: n, 2n, ..., T
    end: np.ndarray  # [seeds, epochs] ||theta - theta*||^2 at the epoch ends
    t_mid: np.ndarray  # steps halfway through the epochs
    mid: np.ndarray  # [seeds, epochs] the same halfway through
    seconds: float  # wall time of the jitted run, compilation included


def run(method, steps, seeds, *, n=N, seed=0, x64=True, **kw):
    """All seeds of one method, vmapped under one `jax.jit`. Returns a `Result`."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if steps <= 0 or steps % n:
        raise ValueError(f"steps must be a positive multiple of n={n}, got {steps}")
    if n % 2:
        raise ValueError(f"n must be even (the error is also recorded mid-epoch), got {n}")
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    epochs = steps // n
    with jax.enable_x64(x64):
        t_start = time.perf_counter()
        keys = jax.random.split(jax.random.key(seed), seeds)
        problems = _make_problems(keys, n, D)  # compiled once, shared by the methods
        f = jax.jit(jax.vmap(lambda k, p: run_seed(k, p, method, epochs, **kw)))
        mid, end = jax.device_get(f(keys, problems))
        seconds = time.perf_counter() - t_start
    t = n * np.arange(1, epochs + 1)
    return Result(t, np.asarray(end), t - n // 2, np.asarray(mid), seconds)


def fit_slope(t, mean_err, decades=1.0):
    """Least-squares slope of log(err) against log(t) over t in [t_max / 10^decades, t_max]."""
    sel = t >= t[-1] / 10**decades
    if sel.sum() < 2:
        raise ValueError("need at least two checkpoints in the fitted range")
    return float(np.polyfit(np.log(t[sel]), np.log(mean_err[sel]), 1)[0])


def plot(results, path=None, title=""):
    """Log-log plot of the seed-averaged error per method with 1/t and 1/t^2 guides.

    Solid: at the epoch ends; faint: halfway through the epochs.
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend, shows inline in Jupyter

    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.subplots()
    for name, r in results.items():
        (line,) = ax.loglog(r.t, r.end.mean(0), label=name, lw=1.6)
        ax.loglog(r.t_mid, r.mid.mean(0), color=line.get_color(), lw=0.8, alpha=0.35)
    t = next(iter(results.values())).t
    anchor = t[len(t) // 10]
    at_anchor = [float(np.interp(anchor, r.t, r.end.mean(0))) for r in results.values()]
    ax.loglog(t, 3 * max(at_anchor) * anchor / t, "k--", lw=0.8, label=r"$\propto 1/t$")
    ax.loglog(t, min(at_anchor) / 3 * (anchor / t) ** 2, "k:", lw=0.8, label=r"$\propto 1/t^2$")
    ax.set_xlabel("step t")
    ax.set_ylabel(r"$E\,\|\theta_t-\theta^*\|^2$")
    ax.set_title(title)
    ax.legend(title="solid: epoch ends\nfaint: mid-epoch", fontsize=8, title_fontsize=8)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1_000_000, help="T, a multiple of n=1000")
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    p.add_argument("--c", type=float, default=2.0, help="eta_t = c / ((t + t0) * lambda_min)")
    p.add_argument("--t0", type=int, default=100)
    p.add_argument("--warmup", type=int, default=100,
                   help="full-gradient steps before masking (the paper's 100)")
    p.add_argument("--float32", action="store_true", help="run in float32 instead of float64")
    p.add_argument("--out", default=None, help="JSON file: slopes, settings, timings, curves")
    p.add_argument("--plot", default=None, help="PNG file for the log-log figure")
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            p.error(f"--methods: unknown method {m!r} (choose from {METHODS})")
    if args.steps <= 0 or args.steps % N:
        p.error(f"--steps must be a positive multiple of n={N}, got {args.steps}")

    results, slopes, slopes_mid = {}, {}, {}
    for m in methods:
        r = run(m, args.steps, args.seeds, c=args.c, t0=args.t0, warmup=args.warmup,
                x64=not args.float32)
        results[m] = r
        slopes[m], slopes_mid[m] = fit_slope(r.t, r.end.mean(0)), fit_slope(r.t_mid, r.mid.mean(0))
        print(f"{m:5s} slope {slopes[m]:+.2f} (mid-epoch {slopes_mid[m]:+.2f})  final error "
              f"{r.end.mean(0)[-1]:.3e}  {r.seconds:.1f} s incl. compile", flush=True)
    if args.plot:
        plot(results, args.plot, f"least squares, n={N}, d={D}, M=2, {args.seeds} seeds")
        print("wrote", args.plot)
    if args.out:
        t = results[methods[0]].t
        idx = np.unique(np.geomspace(1, len(t), 60).astype(int) - 1)
        records = [{"method": m, "slope": slopes[m], "slope_mid_epoch": slopes_mid[m],
                    "final_error": float(r.end.mean(0)[-1]), "seconds": r.seconds,
                    "curve_epoch_end": r.end.mean(0)[idx].tolist()}
                   for m, r in results.items()]  # fmt: skip
        settings = {"n": N, "d": D, "steps": args.steps, "seeds": args.seeds, "num_masks": 2,
                    "warmup_steps": args.warmup, "batch_size": 1,
                    "step_size": "c / ((t + t0) * lambda_min)", "c": args.c, "t0": args.t0,
                    "dtype": "float32" if args.float32 else "float64",
                    "jax": jax.__version__, "optax": optax.__version__}  # fmt: skip
        command = None if argv is None else ["python", "-m", "examples.least_squares", *argv]
        report.write(args.out, records, command=command, settings=settings,
                     slope_fit=f"log E||theta_t - theta*||^2 vs log t, t in [{t[-1] // 10}, "
                     f"{t[-1]}]", curve_t=t[idx].tolist(),
                     figure=None if args.plot is None else Path(args.plot).name)  # fmt: skip
        print("wrote", args.out)
    return slopes


if __name__ == "__main__":
    main()
