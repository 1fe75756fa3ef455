"""Does without-replacement beat i.i.d.? Paired seeds, tuned learning rates, confidence intervals.

    python -m benchmarks.wor_vs_iid --out benchmarks/results/wor_vs_iid.json [--quick]
        [--regimes pretrain,finetune,table4]

The paper's central claim (arXiv 2603.05960, Fig. 5, Tables 3 and 4) is that visiting every unit
exactly once per cycle (LISA-wor / OMGD) trains better than drawing the units i.i.d. (LISA, the
i.i.d. masks). Three regimes measure it at a size two CPU cores run:

* ``pretrain`` (Fig. 5 in shape): the GPT-2 example's model with 12 stacked blocks, width 32,
  context 64, byte-level vocabulary 256, on all State of the Union speeches (split by speech).
  Every run first trains ``warmup`` steps of plain AdamW (the paper's recipe: masks start after
  a full-gradient warm-up), then ``cycles`` full cycles of the method: gamma = 3 of 12 blocks
  per phase, K steps per phase, so a cycle is 4 phases = 4K steps (the paper: K = 100 over 100k
  steps; here K is scaled down with the run so that at least 10 cycles fit).
* ``finetune`` (Table 3's use of LISA): one model pretrained with AdamW on the speeches before
  1950, fine-tuned on the later ones (split by speech into train / validation), every method
  from that same checkpoint, from the first step (no warm-up).
* ``table4``: tensor-wise SGDM full / wor / iid on Fashion-MNIST through
  ``examples/image_classification.py`` at the paper's lr 0.1 (``train(method, data, seed=s)``
  already pairs: seed s fixes the initialisation, the batch order and, separately, the masks).

Methods of the language-model regimes (all after ``clip_by_global_norm(1)``, AdamW's betas
(0.9, 0.95), eps 1e-8, weight decay 0.1 on matrices and embeddings, a cosine from the peak lr
to lr/10 over the method's steps):

* ``AdamW``: the reference (in ``pretrain`` it continues the warm-up's AdamW state);
* ``LISA``: ``omgd_jax.lisa`` (i.i.d. layers, no scale);
* ``LISA-wor``: ``omgd_jax.lisa_wor(scale=True)`` (OMGD-layer, Algorithm 2);
* ``LISA-wor without scale``: ``omgd_jax.lisa_wor(scale=False)``;
* ``OMGD-element``: ``omgd_jax.omgd_adamw(granularity="element", num_masks=4)`` (pretrain only).

The layer-wise methods train with ``omgd_jax.lean_train_step`` (the same compiled step for all
three, so they differ only in the traversal and the scale); AdamW and OMGD-element with
``jax.value_and_grad`` over everything.

Pairing: for seed s every method starts from the same parameters (the same warm-up, or the same
checkpoint) and sees the same batches in the same order (``batch_offsets(seed)``, a numpy stream
of the seed alone); the traversal key (``traversal_key(seed)``) comes from another stream, so
only the traversal differs between methods. Every record keeps a digest of its starting
parameters and of its batches, and the summary checks that they agree within a seed.

Learning rates: per method and regime on a factor-2 grid, judged by the mean final validation
loss over ``tune_seeds`` (never used in the comparison); while the best point is at an edge of
the grid, the grid is widened past that edge (up to ``max_widen`` times).

Outputs: the JSON (``benchmarks/report.py`` format: one record per run, written as it goes so
an interrupted run resumes; the summary in ``meta["summary"]``), and ``<out>.png``: the mean
validation curves with 95% bands, and the paired differences against LISA per seed.
``--quick`` (the test suite's setting) runs a 4-block model for a few steps (about 35 s).

Cost of the full run on two shared CPU cores (load average 5-10 from other work): with the three
regimes as parallel processes (``--regimes pretrain`` etc., one file, locked saves), 8 seeds took
23 minutes wall (pretrain 1400 s, finetune 1258 s, table4 736 s); ``--seeds 16`` then resumed
the file and added seeds 8-15 in another 20 minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

import omgd_jax
from benchmarks import paired_stats, report
from examples.gpt2 import data as gpt2_data
from examples.gpt2.model import GPT, GPTConfig, loss_fn

LAYERS = r"^blocks/"
LAYER_METHODS = ("LISA", "LISA-wor", "LISA-wor without scale")
PRETRAIN_METHODS = ("AdamW", "LISA", "LISA-wor", "LISA-wor without scale", "OMGD-element")
FINETUNE_METHODS = ("AdamW", "LISA", "LISA-wor", "LISA-wor without scale")
TABLE4_METHODS = ("full", "iid", "wor")
# (a, b): the summary reports a - b paired over the seeds; the first two are the issue's.
PAIRS = (
    ("LISA-wor", "LISA"),
    ("LISA-wor", "LISA-wor without scale"),
    ("LISA-wor without scale", "LISA"),  # the traversal alone: both unscaled
    ("LISA-wor", "AdamW"),
    ("OMGD-element", "LISA-wor"),
)
TABLE4_PAIRS = (("wor", "iid"), ("wor", "full"), ("iid", "full"))
FINETUNE_SPLIT_YEAR = 1950


@dataclasses.dataclass(frozen=True)
class Setting:
    """Everything that shapes a language-model run (a change invalidates the stored records)."""

    n_layer: int = 12
    n_head: int = 2
    n_embd: int = 32
    block_size: int = 64
    batch: int = 8
    gamma: int = 3
    steps_per_mask: int = 8  # K
    cycles: int = 10
    warmup: int = 96  # AdamW steps before the masks (pretrain)
    warmup_lr: float = 3e-3  # their peak lr (linear ramp from 0)
    eval_every: int = 16
    eval_windows: int = 48
    seeds: tuple[int, ...] = tuple(range(8))
    tune_seeds: tuple[int, ...] = (1000,)
    grid: tuple[float, ...] = (2e-3, 4e-3, 8e-3, 1.6e-2)
    max_widen: int = 3
    pretrain_val_fraction: float = 0.1
    finetune_val_fraction: float = 0.2
    pretrain_steps: int = 1600  # the finetune regime's checkpoint (AdamW on speeches < 1950)
    pretrain_lr: float = 3e-3
    b1: float = 0.9
    b2: float = 0.95
    weight_decay: float = 0.1
    clip: float = 1.0
    # table4
    t4_seeds: tuple[int, ...] = tuple(range(8))
    t4_dataset: str = "fashion_mnist"
    t4_train_size: int = 5000
    t4_epochs: int = 8
    t4_warmup_epochs: int = 2
    t4_batch: int = 128
    t4_width: int = 8
    t4_lr: float = 0.1

    @property
    def num_masks(self) -> int:
        return self.n_layer // self.gamma

    @property
    def cycle_steps(self) -> int:
        return self.num_masks * self.steps_per_mask

    @property
    def stage_steps(self) -> int:
        return self.cycles * self.cycle_steps

    def model(self) -> GPTConfig:
        return GPTConfig(n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd,
                         block_size=self.block_size, vocab_size=256)  # fmt: skip

    def lm_fields(self) -> dict:
        """The fields that shape a language-model run (records are matched on them)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if not k.startswith("t4_")}


FULL = Setting()
QUICK = Setting(n_layer=4, n_embd=16, block_size=16, batch=4, gamma=1, steps_per_mask=2,
                cycles=2, warmup=4, eval_every=4, eval_windows=4, seeds=(0, 1),
                tune_seeds=(1000,), grid=(3e-3, 1e-2), max_widen=1, pretrain_steps=8,
                t4_seeds=(0, 1), t4_dataset="digits", t4_train_size=0, t4_epochs=2,
                t4_warmup_epochs=0, t4_batch=64, t4_width=4)  # fmt: skip


# -----------------------------------------------------------------------------------------------
# data


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Byte tokens of a train and a validation split (documents ended by byte 0)."""

    train: np.ndarray
    val: np.ndarray
    description: str


def _bytes_of(docs) -> np.ndarray:
    enc = gpt2_data.ByteEncoding()
    out = []
    for d in docs:
        out.append(np.frombuffer(d.text.encode("utf-8"), np.uint8))
        out.append(np.array([enc.eot_token], np.uint8))
    return np.concatenate(out) if out else np.zeros(0, np.uint8)


def _split(docs, val_fraction: float, seed: int = 0):
    tr, va = gpt2_data.split_documents(len(docs), val_fraction, seed)
    return [docs[i] for i in tr], [docs[i] for i in va]


def load_corpora(s: Setting) -> dict[str, Corpus]:
    """``pretrain``: all speeches; ``early``: those before 1950 (the checkpoint's corpus);
    ``late``: those from 1950 on (the fine-tuning corpus). Each split by speech, seeded."""
    docs = gpt2_data.read_sotu()
    early = [d for d in docs if d.meta["year"] < FINETUNE_SPLIT_YEAR]
    late = [d for d in docs if d.meta["year"] >= FINETUNE_SPLIT_YEAR]
    out = {}
    for name, group, frac in (("pretrain", docs, s.pretrain_val_fraction),
                              ("early", early, s.pretrain_val_fraction),
                              ("late", late, s.finetune_val_fraction)):  # fmt: skip
        tr, va = _split(group, frac)
        years = sorted(d.meta["year"] for d in group)
        out[name] = Corpus(
            _bytes_of(tr),
            _bytes_of(va),
            f"{len(tr)} train / {len(va)} val speeches, {years[0]}-{years[-1]}",
        )
    return out


def _stream(seed: int, purpose: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), purpose]))


DATA_STREAM, TRAVERSAL_STREAM, VAL_STREAM = 0xDA7A, 0x7EA5, 0x5A1


def batch_offsets(seed: int, steps: int, batch: int, n_tokens: int, block: int) -> np.ndarray:
    """Start offsets [steps, batch] of the training windows of seed ``seed`` (its data order):
    a function of the seed alone, the same for every method."""
    return _stream(seed, DATA_STREAM).integers(0, n_tokens - block - 1, size=(steps, batch))


def traversal_key(seed: int) -> int:
    """The masks' PRNG seed for seed ``seed``: from a stream independent of the data order."""
    return int(_stream(seed, TRAVERSAL_STREAM).integers(0, 2**31 - 1))


def windows(tokens: np.ndarray, offsets: np.ndarray, block: int) -> np.ndarray:
    """int32 windows [..., block + 1] starting at ``offsets`` (inputs and shifted targets)."""
    return tokens[offsets[..., None] + np.arange(block + 1)].astype(np.int32)


def val_windows(corpus: Corpus, s: Setting) -> np.ndarray:
    """The fixed validation windows every run of a regime is evaluated on (evenly spread)."""
    n = len(corpus.val) - s.block_size - 1
    offsets = np.linspace(0, n - 1, s.eval_windows).astype(np.int64)
    return windows(corpus.val, offsets, s.block_size)


def digest(*arrays) -> str:
    """A short sha256 of arrays (or pytrees of arrays): equal digests, equal bits."""
    h = hashlib.sha256()
    for a in arrays:
        for leaf in jax.tree.leaves(a):
            x = np.asarray(leaf)
            h.update(str(x.shape).encode() + str(x.dtype).encode())
            h.update(np.ascontiguousarray(x).tobytes())
    return h.hexdigest()[:16]


# -----------------------------------------------------------------------------------------------
# model and optimizers


def init_params(s: Setting, seed: int):
    """(graphdef, params) of the GPT with initialisation seed ``seed``."""
    model = GPT(s.model(), nnx.Rngs(seed))
    graphdef, state = nnx.split(model, nnx.Param)
    return graphdef, nnx.to_pure_dict(state)


def decay_mask(params):
    """Weight decay on matrices and embeddings (nanoGPT's rule, as the GPT-2 example's)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) in ("kernel", "embedding"), params
    )


def lr_schedule(lr, steps, offset=0, warm_lr=0.0):
    """The learning rate at optimizer step ``count``: a linear ramp to ``warm_lr`` over the
    first ``offset`` steps (the warm-up), then a cosine from ``lr`` down to ``lr / 10`` over
    ``steps`` steps, ``lr * (0.1 + 0.9 (1 + cos(pi t / steps)) / 2)`` at t = count - offset.
    All four may be traced values: one compiled program serves every lr and stage."""

    def schedule(count):
        ramp = warm_lr * (count + 1) / jnp.maximum(offset, 1)
        t = jnp.clip(count - offset, 0, steps).astype(jnp.float32)
        decay = lr * (0.1 + 0.45 * (1 + jnp.cos(jnp.pi * t / steps)))
        return jnp.where(count < offset, ramp, decay)

    return schedule


def make_tx(method: str, s: Setting, schedule, key) -> optax.GradientTransformation:
    """clip_by_global_norm then the method, with AdamW's settings and the given lr schedule."""
    adam = dict(b1=s.b1, b2=s.b2, eps=1e-8, weight_decay=s.weight_decay, mask=decay_mask)
    layer = dict(layers=LAYERS, layers_per_phase=s.gamma, steps_per_mask=s.steps_per_mask,
                 key=key)  # fmt: skip
    if method == "AdamW":
        inner = optax.adamw(schedule, **adam)
    elif method == "LISA":
        inner = omgd_jax.lisa(schedule, **layer, **adam)
    elif method == "LISA-wor":
        inner = omgd_jax.lisa_wor(schedule, **layer, scale=True, **adam)
    elif method == "LISA-wor without scale":
        inner = omgd_jax.lisa_wor(schedule, **layer, scale=False, **adam)
    elif method == "OMGD-element":
        inner = omgd_jax.omgd_adamw(schedule, **adam, granularity="element",
                                    num_masks=s.num_masks, steps_per_mask=s.steps_per_mask,
                                    key=key)  # fmt: skip
    else:
        raise ValueError(f"unknown method {method!r}")
    return optax.chain(optax.clip_by_global_norm(s.clip), inner)


class Trainer:
    """Compiled pieces shared by every run with one Setting: one program per method (the lr,
    the schedule's offset and the batches are data, so tuning compiles nothing new)."""

    def __init__(self, s: Setting):
        self.s = s
        self.graphdef, _ = init_params(s, 0)
        self._chunks: dict[str, Any] = {}

        def loss(params, win):
            return loss_fn(nnx.merge(self.graphdef, params), win[:, :-1], win[:, 1:])

        self.loss = loss
        if s.eval_windows % s.batch:
            raise ValueError(f"eval_windows={s.eval_windows} must be a multiple of batch={s.batch}")
        self.eval = jax.jit(
            lambda p, w: jax.lax.map(
                lambda x: loss(p, x), w.reshape(-1, s.batch, w.shape[-1])
            ).mean()
        )
        self._inits: dict[str, Any] = {}

    def init_state(self, method: str, params, key: int):
        if method not in self._inits:
            self._inits[method] = jax.jit(
                lambda p, k: make_tx(method, self.s, lr_schedule(1.0, 1), k).init(p)
            )
        return self._inits[method](params, jax.random.key(key))

    def chunk(self, method: str):
        """``f(params, opt_state, windows[n, B, T+1], lr, steps, offset, warm_lr) -> (params,
        opt_state, losses[n])``: n steps of ``method`` with `lr_schedule`."""
        if method in self._chunks:
            return self._chunks[method]
        s, loss = self.s, self.loss

        def run(params, opt_state, wins, lr, steps, offset, warm_lr):
            # The mask key is read from opt_state; the one given here only fixes its type.
            tx = make_tx(method, s, lr_schedule(lr, steps, offset, warm_lr), jax.random.key(0))
            if method in LAYER_METHODS:
                step = omgd_jax.lean_train_step(loss, tx, layers=LAYERS)
            else:

                def step(p, st, win):
                    value, g = jax.value_and_grad(loss)(p, win)
                    u, st = tx.update(g, st, p)
                    return optax.apply_updates(p, u), st, value

            def body(carry, win):
                p, st = carry
                p, st, value = step(p, st, win)
                return (p, st), value

            (params, opt_state), losses = jax.lax.scan(body, (params, opt_state), wins)
            return params, opt_state, losses

        self._chunks[method] = jax.jit(run, donate_argnums=(0, 1))
        return self._chunks[method]


_TRAINERS: dict[Setting, Trainer] = {}


def trainer_for(s: Setting) -> Trainer:
    """The `Trainer` of ``s``, built once per process (its compiled programs are reused)."""
    if s not in _TRAINERS:
        _TRAINERS[s] = Trainer(s)
    return _TRAINERS[s]


def _copy(tree):
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


# -----------------------------------------------------------------------------------------------
# one run


@dataclasses.dataclass
class Start:
    """Where the method's stage of seed s starts: parameters, AdamW state (None: fresh), the
    step count so far, and the corpus."""

    params: Any
    adamw_state: Any
    steps_before: int
    corpus: Corpus
    val: np.ndarray


def adamw_steps(trainer: Trainer, corpus: Corpus, seed: int, steps: int, *, warm: int,
                warm_lr: float, lr: float = 0.0, decay_steps: int = 1):  # fmt: skip
    """Initialisation ``seed``, then ``steps`` AdamW steps on the first batches of the seed's
    data order, with `lr_schedule` (ramp to ``warm_lr`` over ``warm`` steps, then the cosine
    from ``lr`` over ``decay_steps``), through the AdamW program the reference trains with.
    Returns (params, AdamW state)."""
    s = trainer.s
    _, params = init_params(s, seed)
    state = trainer.init_state("AdamW", params, 0)
    if steps % s.eval_every:
        raise ValueError(f"{steps} AdamW steps: not a multiple of eval_every={s.eval_every}")
    offs = batch_offsets(seed, steps, s.batch, len(corpus.train), s.block_size)
    chunk = trainer.chunk("AdamW")
    for a in range(0, steps, s.eval_every):
        wins = jnp.asarray(windows(corpus.train, offs[a : a + s.eval_every], s.block_size))
        params, state, _ = chunk(params, state, wins, jnp.float32(lr), decay_steps, warm,
                                 jnp.float32(warm_lr))  # fmt: skip
    return params, state


def warm_start(trainer: Trainer, corpus: Corpus, val: np.ndarray, seed: int, steps: int,
               lr: float) -> Start:  # fmt: skip
    """Initialisation ``seed``, then ``steps`` AdamW steps (linear lr ramp to ``lr``) on the
    first ``steps`` batches of the seed's data order: the shared start of every method (AdamW
    continues this state and its step count; the masked methods start their own)."""
    s = trainer.s
    if steps == 0:
        return Start(init_params(s, seed)[1], None, 0, corpus, val)
    params, state = adamw_steps(trainer, corpus, seed, steps, warm=steps, warm_lr=lr)
    return Start(params, state, steps, corpus, val)


def train_run(trainer: Trainer, method: str, start: Start, seed: int, lr: float) -> dict:
    """The method's stage from ``start``: ``stage_steps`` steps on the seed's batches after the
    warm-up's, evaluated every ``eval_every`` steps. Returns the record's measured fields."""
    s = trainer.s
    n = s.stage_steps
    offs = batch_offsets(seed, start.steps_before + n, s.batch, len(start.corpus.train),
                         s.block_size)[start.steps_before:]  # fmt: skip
    params = _copy(start.params)
    key = traversal_key(seed)
    if method == "AdamW" and start.adamw_state is not None:
        opt_state, offset = _copy(start.adamw_state), start.steps_before
    else:
        opt_state, offset = trainer.init_state(method, params, key), 0
    init_digest = digest(params)
    chunk = trainer.chunk(method)
    val = jnp.asarray(start.val)
    steps, curve, train_loss = [0], [float(trainer.eval(params, val))], []
    t0 = time.perf_counter()
    for a in range(0, n, s.eval_every):
        wins = windows(start.corpus.train, offs[a : a + s.eval_every], s.block_size)
        params, opt_state, losses = chunk(params, opt_state, jnp.asarray(wins),
                                          jnp.float32(lr), n, offset, jnp.float32(0.0))  # fmt: skip
        train_loss.append(float(losses.mean()))
        steps.append(a + len(wins))
        curve.append(float(trainer.eval(params, val)))
    finite = bool(np.all(np.isfinite(curve)))
    return {
        "final_val_loss": curve[-1] if finite else math.inf,
        "val_auc": paired_stats.curve_area(steps, curve) if finite else math.inf,
        "val_steps": steps,
        "val_loss": curve,
        "train_loss": train_loss,
        "init_digest": init_digest,
        "batches_digest": digest(offs),
        "first_batch_digest": digest(windows(start.corpus.train, offs[:1], s.block_size)),
        "traversal_key": key,
        "seconds": time.perf_counter() - t0,
    }


# -----------------------------------------------------------------------------------------------
# the results document, shared by processes running different regimes


class Results:
    """The JSON document, re-read and extended under a file lock at every save, so several
    processes (``--regimes pretrain`` and ``--regimes finetune,table4``) can fill one file."""

    def __init__(self, path: Path | None, setting: Setting, quick: bool):
        self.path, self.setting, self.quick = path, setting, quick
        self.owned: set[str] = set()  # regimes whose summary this process writes
        self.doc = {"meta": report.meta(setting=_jsonable(dataclasses.asdict(setting)),
                                        quick=quick), "records": []}  # fmt: skip
        if path is not None and path.exists():
            old = report.load(path)
            if _compatible(old["meta"].get("setting"), self.doc["meta"]["setting"]):
                self.doc["records"] = old["records"]
                self.doc["meta"]["summary"] = old["meta"].get("summary", {})
            else:
                print(f"{path}: other settings; starting afresh", file=sys.stderr)

    @contextlib.contextmanager
    def _locked(self):
        if self.path is None:
            yield
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(_lock_path(self.path), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if self.path.exists():
                    old = report.load(self.path)
                    if _compatible(old["meta"].get("setting"), self.doc["meta"]["setting"]):
                        known = {_key(r) for r in self.doc["records"]}
                        self.doc["records"] += [r for r in old["records"]
                                                if _key(r) not in known]  # fmt: skip
                        mine = self.doc["meta"].get("summary", {})
                        self.doc["meta"]["summary"] = {
                            **old["meta"].get("summary", {}),
                            **{k: v for k, v in mine.items() if k in self.owned},
                        }
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def find(self, **key) -> dict | None:
        want = _key(key)
        for r in self.doc["records"]:
            if _key(r) == want:
                return r
        return None

    def add(self, record: dict) -> None:
        with self._locked():
            if self.find(**record) is None:
                self.doc["records"].append(record)
            if self.path is not None:
                report.save(self.path, self.doc)

    def set_summary(self, regime: str, summary: dict) -> None:
        self.owned.add(regime)
        with self._locked():
            self.doc["meta"].setdefault("summary", {})[regime] = summary
            if self.path is not None:
                report.save(self.path, self.doc)

    def records(self, **where) -> list[dict]:
        return [r for r in self.doc["records"] if all(r.get(k) == v for k, v in where.items())]


def _lock_path(path: Path) -> Path:
    """The lock file of a results file: in the temp folder, named by the file's absolute path
    (not beside the results, where it would be committed)."""
    tag = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"wor_vs_iid-{tag}.lock"


SEED_FIELDS = ("seeds", "t4_seeds")  # records are keyed by seed: more seeds extend a file


def _compatible(a: dict | None, b: dict) -> bool:
    """Whether records made under setting ``a`` belong to a run under ``b``: equal but for the
    seed lists (so ``--seeds 16`` resumes an 8-seed file and adds seeds 8-15)."""
    if a is None:
        return False
    strip = lambda x: {k: v for k, v in x.items() if k not in SEED_FIELDS}
    return strip(a) == strip(b)


def _key(r: dict) -> tuple:
    return (r.get("regime"), r.get("phase"), r.get("method"), _lr_key(r.get("lr")),
            r.get("seed"))  # fmt: skip


def _lr_key(lr):
    return None if lr is None else float(f"{lr:.6g}")


def _jsonable(x):
    return json.loads(json.dumps(x, default=list))


# -----------------------------------------------------------------------------------------------
# tuning and comparison


def widen(grid: list[float], losses: dict[float, float]) -> float | None:
    """The next grid point to try, or None when the best point is inside the grid.

    The best (lowest loss) point at the low edge adds ``min / 2``; at the high edge,
    ``max * 2``; a best point with a non-finite loss is treated as unknown (None).
    """
    tried = sorted(grid)
    best = min(tried, key=lambda lr: losses[lr])
    if not math.isfinite(losses[best]):
        return None
    if best == tried[0]:
        return tried[0] / 2
    if best == tried[-1]:
        return tried[-1] * 2
    return None


def tune(results: Results, regime: str, method: str, trainer: Trainer, starts: dict,
         bar: tqdm) -> dict:  # fmt: skip
    """The method's lr on the tuning seeds: grid, widened while its best point is at an edge."""
    s = trainer.s
    grid, widened = list(s.grid), 0
    counted = set()  # (lr, seed) pairs the progress bar has counted
    while True:
        losses = {}
        for lr in grid:
            per_seed = []
            for seed in s.tune_seeds:
                rec = results.find(regime=regime, phase="tune", method=method, lr=lr, seed=seed)
                if rec is None:
                    bar.set_description(f"{regime} tune {method} lr={lr:.3g} seed {seed}")
                    out = train_run(trainer, method, starts[seed], seed, lr)
                    rec = {"regime": regime, "phase": "tune", "method": method, "lr": lr,
                           "seed": seed, **out}  # fmt: skip
                    results.add(rec)
                if (lr, seed) not in counted:
                    counted.add((lr, seed))
                    bar.update(1)
                per_seed.append(rec["final_val_loss"])
            losses[lr] = float(np.mean(per_seed))
        nxt = widen(grid, losses)
        if nxt is None or widened >= s.max_widen:
            break
        grid.append(nxt)
        widened += 1
        bar.total += len(s.tune_seeds)
    best = min(sorted(grid), key=lambda lr: losses[lr])
    return {
        "grid": sorted(grid),
        "tune_loss": {f"{k:.6g}": losses[k] for k in sorted(grid)},
        "lr": best,
        "at_edge": best in (min(grid), max(grid)),
        "widened": widened,
    }


def summarize_lm(results: Results, regime: str, methods, tuned: dict) -> dict:
    """Per method: mean final loss and area (t intervals); per pair: paired differences;
    the pairing check (same start and batches within a seed, different across seeds)."""
    s = results.setting
    runs = {m: {r["seed"]: r for r in results.records(regime=regime, phase="compare", method=m)}
            for m in methods}  # fmt: skip
    seeds = [x for x in s.seeds if all(x in runs[m] for m in methods)]
    out: dict[str, Any] = {"seeds": seeds, "methods": {}, "pairs": {}, "tuning": tuned}
    for m in methods:
        fin = [runs[m][x]["final_val_loss"] for x in seeds]
        auc = [runs[m][x]["val_auc"] for x in seeds]
        out["methods"][m] = {"lr": tuned[m]["lr"],
                             "final_val_loss": paired_stats.mean_ci(fin) if len(seeds) > 1
                             else {"mean": float(np.mean(fin)) if fin else None},
                             "val_auc": paired_stats.mean_ci(auc) if len(seeds) > 1
                             else {"mean": float(np.mean(auc)) if auc else None}}  # fmt: skip
    for a, b in PAIRS:
        if a in methods and b in methods and len(seeds) > 1:
            out["pairs"][f"{a} - {b}"] = {
                metric: paired_stats.paired_difference([runs[a][x][metric] for x in seeds],
                                                       [runs[b][x][metric] for x in seeds])
                for metric in ("final_val_loss", "val_auc")
            }  # fmt: skip
    same_start = all(len({runs[m][x]["init_digest"] for m in methods}) == 1 for x in seeds)
    same_batches = all(len({runs[m][x]["batches_digest"] for m in methods}) == 1 for x in seeds)
    starts = {runs[methods[0]][x]["init_digest"] for x in seeds}
    batches = {runs[methods[0]][x]["batches_digest"] for x in seeds}
    out["pairing"] = {"same_start_within_seed": same_start,
                      "same_batches_within_seed": same_batches,
                      "distinct_starts_across_seeds": len(starts) == len(seeds),
                      "distinct_batches_across_seeds": len(batches) == len(seeds)}  # fmt: skip
    return out


class _Lazy(dict):
    def __init__(self, make):
        super().__init__()
        self.make = make

    def __missing__(self, key):
        self[key] = value = self.make(key)
        return value


def lm_regime(results: Results, regime: str, trainer: Trainer, corpora: dict, *,
              progress: bool) -> dict:  # fmt: skip
    s = trainer.s
    if regime == "pretrain":
        corpus, methods = corpora["pretrain"], PRETRAIN_METHODS
        val = val_windows(corpus, s)

        def make_start(seed):
            return warm_start(trainer, corpus, val, seed, s.warmup, s.warmup_lr)
    else:
        corpus, methods = corpora["late"], FINETUNE_METHODS
        val = val_windows(corpus, s)
        early = corpora["early"]
        base = warm_start_cached(trainer, early, s, cache=not results.quick)

        def make_start(seed):
            return Start(base, None, 0, corpus, val)

    n_runs = len(methods) * (len(s.grid) * len(s.tune_seeds) + len(s.seeds))
    bar = tqdm(total=n_runs, desc=regime, disable=not progress)
    starts = _Lazy(make_start)  # built when a run needs it: a resumed run trains nothing
    tuned = {m: tune(results, regime, m, trainer, starts, bar) for m in methods}
    results.set_summary(regime, {"tuning": tuned, "partial": True})
    for seed in s.seeds:  # seed-major: an interrupted run leaves complete pairs
        for m in methods:
            lr = tuned[m]["lr"]
            if results.find(regime=regime, phase="compare", method=m, lr=lr, seed=seed) is None:
                bar.set_description(f"{regime} {m} seed {seed}")
                out = train_run(trainer, m, starts[seed], seed, lr)
                results.add({"regime": regime, "phase": "compare", "method": m, "lr": lr,
                             "seed": seed, **out})  # fmt: skip
            bar.update(1)
    bar.close()
    summary = summarize_lm(results, regime, methods, tuned)
    summary["corpus"] = corpus.description
    if regime == "finetune":
        early = corpora["early"].description
        summary["checkpoint"] = f"AdamW, {s.pretrain_steps} steps on {early}, lr {s.pretrain_lr}"
    results.set_summary(regime, summary)
    return summary


def warm_start_cached(trainer: Trainer, corpus: Corpus, s: Setting, cache: bool = True):
    """The fine-tuning checkpoint: AdamW for ``pretrain_steps`` on ``corpus`` from seed 0
    (cached on disk under data/wor_vs_iid/, keyed by the setting, unless ``cache`` is off)."""
    tag = hashlib.sha256(json.dumps(_jsonable(s.lm_fields()), sort_keys=True).encode()
                         ).hexdigest()[:12]  # fmt: skip
    path = Path("data") / "wor_vs_iid" / f"checkpoint-{tag}.npz"
    _, template = init_params(s, 0)
    leaves, treedef = jax.tree.flatten(template)
    if cache and path.exists():
        with np.load(path) as z:
            return jax.tree.unflatten(
                treedef, [jnp.asarray(z[f"a{i}"]) for i in range(len(leaves))]
            )
    warm = s.pretrain_steps // 10
    params, _ = adamw_steps(trainer, corpus, 0, s.pretrain_steps, warm=warm, warm_lr=s.pretrain_lr,
                            lr=s.pretrain_lr, decay_steps=s.pretrain_steps - warm)  # fmt: skip
    if not cache:
        return params
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **{f"a{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(params))})
    os.replace(tmp, path)
    return params


def table4_regime(results: Results, *, progress: bool) -> dict:
    """Tensor-wise SGDM full / iid / wor on Fashion-MNIST, paired over ``t4_seeds``."""
    from examples import image_classification as ic

    s = results.setting
    train_size = s.t4_train_size or None
    *data, info = ic.load_dataset(s.t4_dataset, train_size=train_size)
    bar = tqdm(total=len(s.t4_seeds) * len(TABLE4_METHODS), desc="table4", disable=not progress)
    for seed in s.t4_seeds:
        for m in TABLE4_METHODS:
            if results.find(regime="table4", phase="compare", method=m, lr=s.t4_lr,
                            seed=seed) is None:  # fmt: skip
                bar.set_description(f"table4 {m} seed {seed}")
                r = ic.train(m, data, seed=seed, epochs=s.t4_epochs,
                             warmup_epochs=s.t4_warmup_epochs, batch_size=s.t4_batch,
                             width=s.t4_width, lr=s.t4_lr, progress=False)  # fmt: skip
                results.add({"regime": "table4", "phase": "compare", "method": m,
                             "lr": s.t4_lr, "seed": seed, "data": info, **r})  # fmt: skip
            bar.update(1)
    bar.close()
    runs = {m: {r["seed"]: r for r in results.records(regime="table4", method=m)}
            for m in TABLE4_METHODS}  # fmt: skip
    seeds = [x for x in s.t4_seeds if all(x in runs[m] for m in TABLE4_METHODS)]
    out = {"seeds": seeds, "data": info, "methods": {}, "pairs": {},
           "setting": {"epochs": s.t4_epochs, "warmup_epochs": s.t4_warmup_epochs,
                       "batch_size": s.t4_batch, "width": s.t4_width, "lr": s.t4_lr,
                       "train_size": info.get("train_size")}}  # fmt: skip
    for m in TABLE4_METHODS:
        acc = [runs[m][x]["test_accuracy"] for x in seeds]
        out["methods"][m] = {"test_accuracy": paired_stats.mean_ci(acc) if len(seeds) > 1
                             else {"mean": float(np.mean(acc)) if acc else None}}  # fmt: skip
    if len(seeds) > 1:
        for a, b in TABLE4_PAIRS:
            out["pairs"][f"{a} - {b}"] = {"test_accuracy": paired_stats.paired_difference(
                [runs[a][x]["test_accuracy"] for x in seeds],
                [runs[b][x]["test_accuracy"] for x in seeds])}  # fmt: skip
    results.set_summary("table4", out)
    return out


# -----------------------------------------------------------------------------------------------
# figure and printout


def plot(doc: dict, path: Path) -> None:
    """Mean validation curves with 95% t bands per LM regime (top), and per seed the paired
    final-loss differences against LISA with their 95% CIs (bottom); for table4 the test
    accuracies per method and the paired differences (right column)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = doc["meta"].get("summary", {})
    regimes = [r for r in ("pretrain", "finetune") if r in summary and "methods" in summary[r]]
    t4 = summary.get("table4") if summary.get("table4", {}).get("pairs") else None
    if not regimes and t4 is None:
        return
    ncol = len(regimes) + (t4 is not None)
    fig, axes = plt.subplots(3, ncol, figsize=(6.5 * ncol, 12.5), squeeze=False)
    colors = {"AdamW": "k", "LISA": "tab:red", "LISA-wor": "tab:blue",
              "LISA-wor without scale": "tab:cyan", "OMGD-element": "tab:green"}  # fmt: skip
    for col, regime in enumerate(regimes):
        ax, bx = axes[0, col], axes[1, col]
        sm = summary[regime]
        for m, info in sm["methods"].items():
            recs = [r for r in doc["records"] if r["regime"] == regime and r["phase"] == "compare"
                    and r["method"] == m and r["seed"] in sm["seeds"]]  # fmt: skip
            if not recs:
                continue
            steps = np.asarray(recs[0]["val_steps"])
            curves = np.asarray([r["val_loss"] for r in recs])
            mean = curves.mean(0)
            if len(recs) > 1:
                half = (paired_stats.t_quantile(0.975, len(recs) - 1) * curves.std(0, ddof=1)
                        / math.sqrt(len(recs)))  # fmt: skip
                ax.fill_between(steps, mean - half, mean + half, color=colors.get(m), alpha=0.2)
            ax.plot(steps, mean, color=colors.get(m), label=f"{m} (lr {info['lr']:.3g})")
        ax.set_xlabel("steps of the method (after the warm-up)" if regime == "pretrain"
                      else "fine-tuning steps")  # fmt: skip
        ax.set_ylabel("validation loss (nats/byte)")
        ax.set_title(f"{regime}: mean of {len(sm['seeds'])} paired seeds, 95% bands")
        lo = min(np.min(r["val_loss"][len(r["val_loss"]) // 4:]) for r in doc["records"]
                 if r["regime"] == regime and r["phase"] == "compare")  # fmt: skip
        hi = max(np.max(r["val_loss"][len(r["val_loss"]) // 4:]) for r in doc["records"]
                 if r["regime"] == regime and r["phase"] == "compare")  # fmt: skip
        ax.set_ylim(lo - 0.05 * (hi - lo + 1e-3), hi + 0.3 * (hi - lo + 1e-3))
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        # paired differences against LISA, per seed, with the mean and its CI
        names = [m for m in sm["methods"] if m != "LISA"]
        for i, m in enumerate(names):
            key = f"{m} - LISA"
            d = []
            for seed in sm["seeds"]:
                ra = [r for r in doc["records"] if r["regime"] == regime and r["phase"] ==
                      "compare" and r["seed"] == seed and r["method"] in (m, "LISA")]  # fmt: skip
                by = {r["method"]: r["final_val_loss"] for r in ra}
                d.append(by[m] - by["LISA"])
            bx.scatter(np.full(len(d), i) + np.linspace(-0.15, 0.15, len(d)), d,
                       color=colors.get(m), s=12)  # fmt: skip
            pair = sm["pairs"].get(key, {}).get("final_val_loss")
            if pair is None and len(d) > 1:
                pair = paired_stats.paired_difference(np.asarray(d), np.zeros(len(d)))
            if pair is not None:
                bx.errorbar([i + 0.3], [pair["mean_diff"]],
                            yerr=[[pair["mean_diff"] - pair["ci_low"]],
                                  [pair["ci_high"] - pair["mean_diff"]]],
                            color=colors.get(m), fmt="o", capsize=4)  # fmt: skip
        bx.axhline(0, color="gray", lw=1)
        bx.set_xticks(range(len(names)), [n.replace(" without", "\nwithout") for n in names],
                      fontsize=8)  # fmt: skip
        bx.set_ylabel("final val loss minus LISA's (same seed)")
        bx.set_title(f"{regime}: paired differences (dots: seeds; bar: mean, 95% CI)")
        bx.grid(alpha=0.3)
        _plot_difference_curves(doc, regime, sm, axes[2, col], colors)
    if t4 is not None:
        _plot_table4(doc, t4, axes[0, -1], axes[1, -1])
        axes[2, -1].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_difference_curves(doc: dict, regime: str, sm: dict, ax, colors) -> None:
    """Validation loss minus LISA's of the same seed along the run, mean and 95% t band."""
    recs = {(r["method"], r["seed"]): r for r in doc["records"]
            if r["regime"] == regime and r["phase"] == "compare"}  # fmt: skip
    seeds = sm["seeds"]
    for m in sm["methods"]:
        if m not in LAYER_METHODS or m == "LISA":  # the traversal's contrast, at its scale
            continue
        d = np.asarray([np.subtract(recs[m, x]["val_loss"], recs["LISA", x]["val_loss"])
                        for x in seeds])  # fmt: skip
        steps = recs[m, seeds[0]]["val_steps"]
        mean = d.mean(0)
        ax.plot(steps, mean, color=colors.get(m), label=f"{m} - LISA")
        if len(seeds) > 1:
            half = (paired_stats.t_quantile(0.975, len(seeds) - 1) * d.std(0, ddof=1)
                    / math.sqrt(len(seeds)))  # fmt: skip
            ax.fill_between(steps, mean - half, mean + half, color=colors.get(m), alpha=0.2)
    ax.axhline(0, color="gray", lw=1)
    ax.set_xlabel("steps")
    ax.set_ylabel("val loss minus LISA's (same seed)")
    ax.set_title(f"{regime}: paired difference along the run, mean and 95% band")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def _plot_table4(doc: dict, sm: dict, ax, bx) -> None:
    colors = {"full": "k", "iid": "tab:red", "wor": "tab:blue"}
    for i, m in enumerate(TABLE4_METHODS):
        acc = {r["seed"]: r["test_accuracy"] for r in doc["records"]
               if r["regime"] == "table4" and r["method"] == m}  # fmt: skip
        y = [100 * acc[x] for x in sm["seeds"]]
        ax.scatter(np.full(len(y), i) + np.linspace(-0.15, 0.15, len(y)), y, s=12,
                   color=colors[m])  # fmt: skip
        a = sm["methods"][m]["test_accuracy"]
        ax.errorbar([i + 0.3], [100 * a["mean"]], yerr=[100 * a.get("half_width", 0)],
                    fmt="o", capsize=4, color=colors[m])  # fmt: skip
    ax.set_xticks(range(len(TABLE4_METHODS)), TABLE4_METHODS)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"table4 ({sm['data']['dataset']}, tensor-wise SGDM): {len(sm['seeds'])} seeds")
    ax.grid(alpha=0.3)
    for i, (key, p) in enumerate(sm["pairs"].items()):
        a, b = key.split(" - ")
        acc = {m: {r["seed"]: r["test_accuracy"] for r in doc["records"]
                   if r["regime"] == "table4" and r["method"] == m} for m in (a, b)}  # fmt: skip
        d = [100 * (acc[a][x] - acc[b][x]) for x in sm["seeds"]]
        bx.scatter(np.full(len(d), i) + np.linspace(-0.15, 0.15, len(d)), d, s=12,
                   color=colors[a])  # fmt: skip
        r = p["test_accuracy"]
        bx.errorbar([i + 0.3], [100 * r["mean_diff"]],
                    yerr=[[100 * (r["mean_diff"] - r["ci_low"])],
                          [100 * (r["ci_high"] - r["mean_diff"])]],
                    fmt="o", capsize=4, color=colors[a])  # fmt: skip
    bx.axhline(0, color="gray", lw=1)
    bx.set_xticks(range(len(sm["pairs"])), list(sm["pairs"]))
    bx.set_ylabel("accuracy difference (pp, same seed)")
    bx.set_title("table4: paired differences (dots: seeds; bar: mean, 95% CI)")
    bx.grid(alpha=0.3)


def describe(summary: dict) -> str:
    """A plain-text table of the summary."""
    lines = []
    for regime in ("pretrain", "finetune"):
        sm = summary.get(regime)
        if not sm or "methods" not in sm:
            continue
        lines.append(f"== {regime} ({len(sm['seeds'])} paired seeds)")
        for m, info in sm["methods"].items():
            f, a = info["final_val_loss"], info["val_auc"]
            t = sm["tuning"][m]
            grid = ", ".join(f"{x:.3g}" for x in t["grid"])
            edge = "; AT EDGE" if t["at_edge"] else ""
            lines.append(
                f"  {m:24s} lr {info['lr']:.3g} (grid {grid}{edge})  final "
                f"{f['mean']:.4f} ± {f.get('half_width', 0):.4f}  auc {a['mean']:.4f}"
            )
        for key, p in sm["pairs"].items():
            for metric, r in p.items():
                lines.append(f"  {key:38s} {metric:15s} {r['mean_diff']:+.2e} "
                             f"[{r['ci_low']:+.2e}, {r['ci_high']:+.2e}] p={r['p_value']:.3g} "
                             f"(sign-flip {r['p_sign_flip']:.3g}, a lower in {r['wins_a']}"
                             f"/{r['n']})")  # fmt: skip
    sm = summary.get("table4")
    if sm and sm.get("methods"):
        lines.append(f"== table4 ({len(sm['seeds'])} paired seeds, {sm['data']['dataset']})")
        for m, info in sm["methods"].items():
            a = info["test_accuracy"]
            lines.append(f"  {m:5s} {100 * a['mean']:.2f} ± {100 * a.get('half_width', 0):.2f} %")
        for key, p in sm["pairs"].items():
            r = p["test_accuracy"]
            lines.append(f"  {key:12s} {100 * r['mean_diff']:+.2f} pp [{100 * r['ci_low']:+.2f},"
                         f" {100 * r['ci_high']:+.2f}] p={r['p_value']:.3g}")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/wor_vs_iid.json")
    p.add_argument("--quick", action="store_true", help="the test suite's tiny setting")
    p.add_argument(
        "--regimes",
        default="pretrain,finetune,table4",
        help="comma-separated subset of pretrain, finetune, table4",
    )
    p.add_argument("--seeds", type=int, default=None,
                   help="number of paired seeds of the LM regimes (and of table4 unless "
                        "--t4-seeds); more than a stored file has extends it")  # fmt: skip
    p.add_argument("--t4-seeds", type=int, default=None, help="number of table4 seeds")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    regimes = [r for r in args.regimes.split(",") if r]
    for r in regimes:
        if r not in ("pretrain", "finetune", "table4"):
            p.error(f"--regimes: unknown regime {r!r}")
    s = QUICK if args.quick else FULL
    if args.seeds is not None:
        s = dataclasses.replace(s, seeds=tuple(range(args.seeds)),
                                t4_seeds=tuple(range(args.seeds)))  # fmt: skip
    if args.t4_seeds is not None:
        s = dataclasses.replace(s, t4_seeds=tuple(range(args.t4_seeds)))
    out = Path(args.out) if args.out else None
    results = Results(out, s, args.quick)
    t0 = time.perf_counter()
    progress = not args.no_progress
    lm = [r for r in regimes if r != "table4"]
    if lm:
        corpora = load_corpora(s)
        trainer = trainer_for(s)
        for regime in lm:
            lm_regime(results, regime, trainer, corpora, progress=progress)
    if "table4" in regimes:
        table4_regime(results, progress=progress)
    summary = results.doc["meta"].get("summary", {})
    print(describe(summary))
    print(f"wall time {time.perf_counter() - t0:.0f} s")
    if out is not None:
        plot(results.doc, out.with_suffix(".png"))
        print("wrote", out, "and", out.with_suffix(".png"))
    return results.doc


if __name__ == "__main__":
    main()
