"""Tensor-wise OMGD on a small ResNet with SGD momentum: Table 4 of arXiv 2603.05960 in shape.

    python -m examples.image_classification --dataset fashion_mnist --epochs 10 --seeds 3 \
        --out examples/results/image_classification.json

Methods (SPEC.md 1.2, 1.5), all with SGD momentum 0.9, weight decay 1e-4, lr 0.1 decayed x0.1 at
50% and 75% of training, and full-gradient warm-up epochs before any mask:
  * ``full``: every tensor every step.
  * ``iid``:  ``omgd_mask(2, granularity="tensor", traversal="iid")``: a random half of the
    tensors (scaled by 2) each epoch, drawn independently every epoch.
  * ``wor``:  ``omgd_mask(2, granularity="tensor", traversal="wor")``: a random partition of the
    tensors into two halves every two-epoch cycle, each half trained for one epoch.

Where the mask sits: ``chain(omgd_mask, add_decayed_weights(1e-4), sgd(lr, momentum=0.9))``.
The mask scales the data gradient only, as ``p.grad.mul_(mask); opt.step()`` does with PyTorch's
SGD(weight_decay=1e-4) in the paper's code: weight decay stays dense and the momentum of a
masked tensor keeps decaying and moving it (the "chain form" of SPEC 1.3).

Data: Fashion-MNIST from Debian's ``dataset-fashion-mnist`` (idx files in
/usr/share/datasets/fashion-mnist; installed with apt-get when missing and running as root).
When it cannot be had the run falls back to scikit-learn's 8x8 ``load_digits`` and says so.
The default Fashion-MNIST run trains on the first ``--train-size`` images (15000 of the 60000)
so that the 9 runs (3 methods x 3 seeds) fit in about ten minutes on two CPU cores; the test
set is the full 10000.
"""

import argparse
import gzip
import os
import shutil
import subprocess
import sys
import time
from functools import lru_cache, partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import lax
from tqdm.auto import tqdm

import omgd_jax
from benchmarks import report

METHODS = ("full", "iid", "wor")
DATASETS = ("fashion_mnist", "digits")
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}

# -----------------------------------------------------------------------------
# data


def read_idx(path):
    """A (gzipped) idx file as a numpy array (the MNIST format: magic, dims, then uint8 data)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def ensure_fashion_mnist(root=None, install=True):
    """True if the idx files are in `root` (default FASHION_DIR); tries `apt-get install
    dataset-fashion-mnist` first when they are missing, `install` is set and we run as root."""
    root = Path(root or FASHION_DIR)
    if all((root / f).exists() for f in FASHION_FILES.values()):
        return True
    if not install or os.name != "posix" or os.geteuid() != 0 or not shutil.which("apt-get"):
        return False
    print("installing Debian package dataset-fashion-mnist ...", file=sys.stderr)
    cmd = ["apt-get", "install", "-y", "-q", "dataset-fashion-mnist"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for pre in ([], [["apt-get", "update", "-q"]]):  # retry once after refreshing the lists
        for c in pre + [cmd]:
            subprocess.run(c, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if all((root / f).exists() for f in FASHION_FILES.values()):
            return True
    return False


def load_dataset(name, *, train_size=None, install=True, root=None):
    """(x_train, y_train, x_test, y_test, info): float32 NHWC images standardised by the
    training mean/std, int32 labels. `name` "fashion_mnist" (idx files in `root`, default
    FASHION_DIR) falls back to "digits" when they cannot be had; `info` says so."""
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    root = Path(root or FASHION_DIR)
    info = {"dataset": name}
    if name == "fashion_mnist" and not ensure_fashion_mnist(root, install=install):
        msg = (f"Fashion-MNIST not found in {root} (Debian package dataset-fashion-mnist);"
               " falling back to scikit-learn's load_digits")
        print("WARNING:", msg, file=sys.stderr)
        name, info = "digits", {"dataset": "digits", "fallback_from": "fashion_mnist",
                                "fallback_reason": msg}
    if name == "fashion_mnist":
        arr = {k: read_idx(root / f) for k, f in FASHION_FILES.items()}
        xtr, ytr, xte, yte = arr["x_train"], arr["y_train"], arr["x_test"], arr["y_test"]
    else:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        xtr, xte, ytr, yte = train_test_split(digits.images, digits.target, test_size=0.25,
                                              random_state=0, stratify=digits.target)
    if train_size is not None:
        if train_size < 1:
            raise ValueError(f"train_size must be >= 1, got {train_size}")
        xtr, ytr = xtr[:train_size], ytr[:train_size]
    xtr, xte = np.asarray(xtr, np.float32), np.asarray(xte, np.float32)
    mean, std = xtr.mean(), xtr.std()
    prep = lambda x: ((x - mean) / std)[..., None]
    info.update(train_size=len(xtr), test_size=len(xte), image_shape=list(xtr.shape[1:]))
    return prep(xtr), np.asarray(ytr, np.int32), prep(xte), np.asarray(yte, np.int32), info


# -----------------------------------------------------------------------------
# model


class Block(nnx.Module):
    """Basic residual block: conv3x3-BN-ReLU-conv3x3-BN + (1x1 conv) shortcut, ReLU."""

    def __init__(self, cin, cout, stride, *, rngs):
        conv = lambda a, b, k, s: nnx.Conv(a, b, (k, k), strides=s, padding="SAME",
                                           use_bias=False, rngs=rngs)
        self.conv1, self.bn1 = conv(cin, cout, 3, stride), nnx.BatchNorm(cout, rngs=rngs)
        self.conv2, self.bn2 = conv(cout, cout, 3, 1), nnx.BatchNorm(cout, rngs=rngs)
        self.short = conv(cin, cout, 1, stride) if (stride != 1 or cin != cout) else None

    def __call__(self, x):
        h = nnx.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return nnx.relu(h + (x if self.short is None else self.short(x)))


class ResNet(nnx.Module):
    """A small ResNet: 3x3 stem + BN + ReLU, 2x2 average pooling when the image is larger than
    16 pixels, residual blocks of widths w, 2w, 4w (stride 2 from the second on), global
    average pooling and a linear head. 25 parameter tensors for 3 blocks (43,870 weights at
    width 12)."""

    def __init__(self, num_classes=10, width=12, blocks=3, in_channels=1, *, rngs):
        self.stem = nnx.Conv(in_channels, width, (3, 3), padding="SAME", use_bias=False,
                             rngs=rngs)
        self.bn = nnx.BatchNorm(width, rngs=rngs)
        widths = [width * 2 ** min(i, 2) for i in range(blocks)]
        cins = [width] + widths[:-1]
        self.blocks = nnx.List(
            [Block(a, b, 1 if i == 0 else 2, rngs=rngs) for i, (a, b) in
             enumerate(zip(cins, widths, strict=True))])
        self.head = nnx.Linear(widths[-1], num_classes, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn(self.stem(x)))
        if x.shape[1] > 16:  # 28x28 -> 14x14: most of the cost is in the first block
            x = nnx.avg_pool(x, (2, 2), strides=(2, 2))
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(axis=(1, 2)))


# -----------------------------------------------------------------------------
# optimizer


def make_tx(method, key, *, steps_per_epoch, epochs, warmup_epochs, lr=0.1, momentum=0.9,
            weight_decay=1e-4):
    """chain([omgd_mask,] add_decayed_weights, sgd momentum) with lr x0.1 at 50% and 75%."""
    total = steps_per_epoch * epochs
    schedule = optax.piecewise_constant_schedule(
        lr, {int(0.5 * total): 0.1, int(0.75 * total): 0.1})
    sgd = [optax.add_decayed_weights(weight_decay), optax.sgd(schedule, momentum=momentum)]
    if method == "full":
        return optax.chain(*sgd)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    mask = omgd_jax.omgd_mask(2, steps_per_mask=steps_per_epoch, key=key, granularity="tensor",
                              traversal=method, warmup_steps=warmup_epochs * steps_per_epoch)
    return optax.chain(mask, *sgd)


# -----------------------------------------------------------------------------
# training


@partial(jax.jit, static_argnums=0)
def accuracy(graphdef, params, stats, x, y, batch=500):
    """Test accuracy of the model (graphdef in eval mode, params, batch stats) on (x, y)."""
    m = nnx.merge(graphdef, params, stats)
    nb = len(x) // batch
    pred = lax.map(lambda xb: m(xb).argmax(-1), x[: nb * batch].reshape(nb, batch, *x.shape[1:]))
    correct = (pred.reshape(-1) == y[: nb * batch]).sum()
    if nb * batch < len(x):
        correct += (m(x[nb * batch:]).argmax(-1) == y[nb * batch:]).sum()
    return correct / len(x)


@lru_cache(maxsize=32)
def _programs(method, train_def, steps, epochs, warmup_epochs, lr):
    """The jitted optimizer init and train step of one configuration, built once so that the
    seeds of a configuration share one compilation (``train_def`` is hashable)."""
    make = lambda key: make_tx(method, key, steps_per_epoch=steps, epochs=epochs,
                               warmup_epochs=warmup_epochs, lr=lr)

    def loss_fn(params, stats, x, y):
        m = nnx.merge(train_def, params, stats)
        logits = m(x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, nnx.to_pure_dict(nnx.state(m, nnx.BatchStat))

    # One jitted step driven from Python. A lax.scan over the steps of an epoch would save the
    # dispatch, but XLA:CPU runs these convolutions ~10x slower inside a while loop (measured).
    @partial(jax.jit, donate_argnums=(1, 2, 3))
    def train_step(key, params, stats, opt_state, xtr, ytr, i):
        tx = make(key)  # update() reads the mask key from opt_state; `key` only fixes the type
        (loss, stats), g = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, xtr[i], ytr[i])
        updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, loss

    return jax.jit(lambda k, p: make(k).init(p)), train_step


def train(method, data, *, seed=0, epochs=10, warmup_epochs=2, batch_size=128, width=12,
          blocks=3, lr=0.1, progress=True):
    """Trains one model; returns a dict: final test accuracy, train loss per epoch, seconds."""
    if epochs < 1 or warmup_epochs < 0 or batch_size < 1:
        raise ValueError(f"need epochs >= 1, warmup_epochs >= 0, batch_size >= 1; got "
                         f"{epochs}, {warmup_epochs}, {batch_size}")
    xtr, ytr, xte, yte = data
    steps = len(xtr) // batch_size
    if steps < 1:
        raise ValueError(f"batch_size={batch_size} is larger than the training set ({len(xtr)})")
    num_classes = int(max(ytr.max(), yte.max())) + 1
    model = ResNet(num_classes, width, blocks, xtr.shape[-1], rngs=nnx.Rngs(seed))
    model.train()
    train_def, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    params, stats = nnx.to_pure_dict(params), nnx.to_pure_dict(stats)  # plain dicts of arrays
    model.eval()
    eval_def = nnx.graphdef(model)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    init_state, train_step = _programs(method, train_def, steps, epochs, warmup_epochs, lr)
    mask_key = jax.random.key(seed + 1000)
    opt_state = init_state(mask_key, params)

    rng = np.random.default_rng(seed)
    xtr_d, ytr_d = jnp.asarray(xtr), jnp.asarray(ytr)
    losses, t0 = [], time.perf_counter()
    bar = tqdm(range(epochs), desc=f"{method} seed {seed}", disable=not progress, leave=False)
    for _ in bar:
        idx = rng.permutation(len(xtr))[: steps * batch_size].reshape(steps, batch_size)
        total = 0.0
        for i in idx:
            params, stats, opt_state, loss = train_step(mask_key, params, stats, opt_state,
                                                        xtr_d, ytr_d, jnp.asarray(i))
            total += loss
        losses.append(float(total) / steps)
        bar.set_postfix(train_loss=f"{losses[-1]:.3f}")
    acc = float(accuracy(eval_def, params, stats, jnp.asarray(xte), jnp.asarray(yte)))
    return {"test_accuracy": acc, "train_loss": losses, "seconds": time.perf_counter() - t0,
            "steps_per_epoch": steps, "num_tensors": len(jax.tree.leaves(params))}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=DATASETS, default="fashion_mnist")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--warmup-epochs", type=int, default=2, help="full-gradient epochs first")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--width", type=int, default=12, help="channels of the first block")
    p.add_argument("--blocks", type=int, default=3)
    p.add_argument("--train-size", type=int, default=15000,
                   help="first N training images (0 = all); ignored for digits")
    p.add_argument("--no-install", action="store_true",
                   help="do not apt-get install dataset-fashion-mnist when it is missing")
    p.add_argument("--out", default=None, help="JSON file (benchmarks/report.py format)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            p.error(f"--methods: unknown method {m!r} (choose from {METHODS})")
    if args.seeds < 1:
        p.error(f"--seeds must be >= 1, got {args.seeds}")

    train_size = (args.train_size or None) if args.dataset == "fashion_mnist" else None
    *data, info = load_dataset(args.dataset, train_size=train_size, install=not args.no_install)
    print(f"{info['dataset']}: {info['train_size']} train / {info['test_size']} test images")
    t_start = time.perf_counter()
    runs = {m: [] for m in methods}
    for m in methods:
        for s in range(args.seeds):
            r = train(m, data, seed=s, epochs=args.epochs, warmup_epochs=args.warmup_epochs,
                      batch_size=args.batch_size, width=args.width, blocks=args.blocks,
                      lr=args.lr, progress=not args.no_progress)
            runs[m].append(r)
            print(f"{m:4s} seed {s}: test accuracy {r['test_accuracy']:.4f} "
                  f"({r['seconds']:.0f} s)", flush=True)
    accuracy = {m: {"mean": float(np.mean([r["test_accuracy"] for r in rs])),
                    "std": float(np.std([r["test_accuracy"] for r in rs])),
                    "runs": [r["test_accuracy"] for r in rs]} for m, rs in runs.items()}
    for m, a in accuracy.items():
        print(f"{m:4s} {100 * a['mean']:.2f} +- {100 * a['std']:.2f} %  ({args.seeds} seeds)")
    settings = {**info, **{k: v for k, v in vars(args).items() if k not in ("out",)},
                "optimizer": "chain(omgd_mask, add_decayed_weights(1e-4), "
                             "sgd(lr, momentum=0.9)); lr x0.1 at 50% and 75%",
                "num_masks": 2, "granularity": "tensor",
                "num_tensors": runs[methods[0]][0]["num_tensors"],
                "steps_per_epoch": runs[methods[0]][0]["steps_per_epoch"],
                "std": "population std (ddof=0) over seeds"}  # fmt: skip
    records = [{"method": m, "accuracy": accuracy[m],
                "train_loss": [r["train_loss"] for r in rs],
                "seconds": [r["seconds"] for r in rs]} for m, rs in runs.items()]  # fmt: skip
    command = None if argv is None else ["python", "-m", "examples.image_classification", *argv]
    out = report.write(args.out, records, command=command, settings=settings,
                       wall_s=time.perf_counter() - t_start)  # fmt: skip
    if args.out:
        print("wrote", args.out)
    return out


if __name__ == "__main__":
    main()
