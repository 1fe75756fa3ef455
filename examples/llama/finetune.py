"""Fine-tune a Hugging Face Llama-family (or GPT-2) checkpoint: lean layer-wise OMGD by default,
any method of the GPT-2 example (LISA, AdamW, GaLore...) with ``--optimizer``; the result written
back in the Hugging Face layout (``OUT/final``, loadable by transformers and vLLM). GPT-2
(``GPT2LMHeadModel``, `examples.gpt2.hf`) trains one example per row (``--pad``): its learned
absolute positions and plain causal attention cannot restart inside a row.

    python -m examples.llama.finetune --model Meta-Llama-3.1-8B-Instruct --data chat.jsonl \
        --out-dir runs/ft --dtype bfloat16 --remat --loss-chunk 512 --seq-len 2048

Data (`examples.llama.sft`): JSONL records ``{"prompt", "response"}`` or ``{"messages"}``,
rendered with the checkpoint's chat template; loss on response tokens only; examples packed
into rows of ``--seq-len`` tokens with attention and positions restarted at every example
(``--pad``: one example per row). Validation: ``--val-data``, or the last ``--val-fraction`` of
the records; its loss is the mean over all its response tokens.

One optimizer step = ``--batch-size`` rows in each of ``--microbatches`` micro-batches, the loss
the mean over all their response tokens. Layer-wise optimizers (``omgd-layer``, ``lisa``,
``lisa-wor-noscale``) run `omgd_jax.lean_train_step` (only the ``--layers-per-phase`` active
blocks are differentiated and hold optimizer state); the others take the dense gradient.

Outputs in --out-dir, as the GPT-2 example's (whose logging, checkpointing, sharding and
optimizers this program reuses): config.json, metrics.jsonl, TensorBoard events (tb/), Orbax
checkpoints (checkpoints/; ``--resume`` continues bit for bit), loss.png, summary.json and the
fine-tuned model in final/.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import omgd_jax
from examples.gpt2 import hf as gpt2_hf
from examples.gpt2 import optimizers
from examples.gpt2.checkpoint import Checkpointer, SigtermFlag
from examples.gpt2.config import EXTRA_UNITS, LAYER_OPTIMIZERS, OPTIMIZERS, Config, ConfigError
from examples.gpt2.train import (
    Feed,
    Logger,
    Stage,
    TrainState,
    _maybe_init_distributed,
    make_mesh,
    restore_latest_readable,
    tree_shardings,
)
from examples.llama import hf, hf_files, sft
from examples.llama.model import loss_fn


def gpt2_loss(model, x, y, w, positions, segments):
    """`loss_fn`'s weighted mean for GPT-2, whose learned absolute positions and causal mask
    need one example per row from position 0 (``--pad``): the padding after it is unseen."""
    del positions, segments
    ce = optax.softmax_cross_entropy_with_integer_labels(model(x), y)
    return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1e-9)


class Family(NamedTuple):
    """What the program needs of a model family: its `hf` module, the config and abstract
    parameters, the loss, and the shape fields under their names."""

    hf: Any  # examples.llama.hf or examples.gpt2.hf
    loss: Callable  # (model, x, y, w, positions, segments) -> weighted mean cross-entropy
    n_layer: Callable
    width: Callable
    max_len: Callable
    packs: bool  # positions restart and attention stays within an example


LLAMA = Family(hf, loss_fn, lambda c: c.n_layer, lambda c: c.dim, lambda c: c.max_len, True)
GPT2 = Family(gpt2_hf, gpt2_loss, lambda c: c.n_layer, lambda c: c.n_embd,
              lambda c: c.block_size, False)  # fmt: skip


def family_of(hf_config: dict) -> Family:
    """GPT-2 for ``GPT2LMHeadModel``, the Llama family otherwise (which refuses the rest)."""
    archs = hf_config.get("architectures") or [hf_config.get("model_type")]
    return GPT2 if archs[0] in (gpt2_hf.ARCHITECTURE, "gpt2") else LLAMA


@dataclasses.dataclass
class FinetuneConfig(Config):
    """The GPT-2 example's `Config` (optimizer, schedule, logging and checkpoint fields, read by
    its optimizers, logger and checkpointer) plus the fine-tuning inputs. ``preset`` holds the
    checkpoint's directory name, ``block_size`` the sequence length, ``grad_accum`` the
    micro-batches."""

    model: str = ""
    val_data: str | None = None
    val_fraction: float = 0.1
    pad: bool = False
    loss_chunk: int = 0
    eval_batches: int = 0  # 0: the whole validation set
    max_shard_size: int = hf.DEFAULT_SHARD


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m examples.llama.finetune",
                                description=__doc__.split("\n\n")[0])  # fmt: skip
    a = p.add_argument
    a("--model", required=True, help="Hugging Face checkpoint directory (config.json, ...)")
    a("--data", required=True, help="training records, JSONL")
    a("--out-dir", required=True)
    a("--val-data", help="validation records, JSONL (default: the last --val-fraction of --data)")
    a("--val-fraction", type=float, default=0.1)
    a("--optimizer", default="omgd-layer", choices=OPTIMIZERS)
    a("--steps", type=int, default=200)
    a("--batch-size", type=int, default=8, help="rows per micro-batch (all devices and hosts)")
    a("--microbatches", type=int, default=1, help="micro-batches per optimizer step")
    a("--seq-len", type=int, default=1024, help="tokens per row")
    a("--pad", action="store_true", help="one example per row, padded (default: packed)")
    a("--lr", type=float, default=1e-5)
    a("--min-lr", type=float, help="end of the cosine (default: --lr / 10)")
    a("--lr-warmup", type=int, default=10)
    a("--lr-decay-steps", type=int, help="steps of warm-up + cosine (default: --steps)")
    a("--weight-decay", type=float, default=0.0)
    a("--grad-clip", type=float, default=1.0)
    a("--layers-per-phase", type=int, default=2, help="gamma: blocks trained per phase")
    a("--steps-per-mask", type=int, default=50, help="K: steps each set of blocks trains")
    a("--rank", type=int, help="galore / golore / mofasgd rank (default: width / 4)")
    a("--proj-gap", type=int, default=100)
    a("--seed", type=int, default=0)
    a("--dtype", default="float32", choices=("float32", "bfloat16"),
      help="the weights' and computation's dtype (bfloat16: 16-bit training)")  # fmt: skip
    a("--remat", action="store_true", help="keep only each block's input for the backward pass")
    a("--loss-chunk", type=int, default=0, help="cross-entropy over chunks of this many tokens")
    a("--fsdp", action="store_true", help="shard parameters and optimizer state over devices")
    a("--distributed", action="store_true", help="jax.distributed.initialize() (multi-host)")
    a("--eval-every", type=int, default=50)
    a("--eval-batches", type=int, default=0, help="validation batches (0: all of it)")
    a("--log-every", type=int, default=10)
    a("--checkpoint-every", type=int, default=100)
    a("--keep", type=int, default=3, help="checkpoints to keep")
    a("--resume", action="store_true", help="continue from the latest checkpoint in --out-dir")
    a("--max-shard-size", type=int, default=hf.DEFAULT_SHARD, help="bytes per weight shard")
    a("--no-progress", dest="progress", action="store_false")
    a("--no-tensorboard", dest="tensorboard", action="store_false")
    return p


def config_of(args: argparse.Namespace) -> FinetuneConfig:
    """The run's config from parsed flags; ConfigError with a sentence for bad values."""
    for name in ("steps", "batch_size", "microbatches", "seq_len", "eval_every", "log_every",
                 "checkpoint_every", "keep", "layers_per_phase", "steps_per_mask"):  # fmt: skip
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got "
                              f"{getattr(args, name)}")  # fmt: skip
    if not 0 < args.val_fraction < 1:
        raise ConfigError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    model = Path(args.model).resolve()
    return FinetuneConfig(
        preset=model.name, optimizer=args.optimizer, data=str(args.data),
        out_dir=str(args.out_dir), steps=args.steps, resume=args.resume, seed=args.seed,
        batch_size=args.batch_size, grad_accum=args.microbatches, block_size=args.seq_len,
        dtype=args.dtype, remat=args.remat, lr=args.lr,
        min_lr=args.lr / 10 if args.min_lr is None else args.min_lr, lr_warmup=args.lr_warmup,
        lr_decay_steps=args.lr_decay_steps or args.steps, weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        layers_per_phase=args.layers_per_phase, steps_per_mask=args.steps_per_mask,
        warmup_masks=0, omgd_state="frozen" if args.optimizer == "omgd-tensor" else "compact",
        mask_seed=args.seed, rank=args.rank, proj_gap=args.proj_gap,
        eval_every=args.eval_every, eval_iters=args.eval_batches, log_every=args.log_every,
        checkpoint_every=args.checkpoint_every, keep=args.keep, fsdp=args.fsdp,
        distributed=args.distributed, progress=args.progress, tensorboard=args.tensorboard,
        model=str(model), val_data=args.val_data, val_fraction=args.val_fraction, pad=args.pad,
        loss_chunk=args.loss_chunk, eval_batches=args.eval_batches,
        max_shard_size=args.max_shard_size,
    )  # fmt: skip


# ----------------------------------------------------------------------------- data


def open_data(cfg: FinetuneConfig):
    """(tokenizer, train rows, val rows); bad data or tokenizer exits with a sentence."""
    try:
        tok = sft.load_tokenizer(cfg.model)
        records = sft.read_jsonl(cfg.data)
        if cfg.val_data:
            val_records, val_path = sft.read_jsonl(cfg.val_data), cfg.val_data
        else:
            n_val = max(1, int(len(records) * cfg.val_fraction))
            if n_val >= len(records):
                raise sft.DataError(
                    f"{cfg.data} holds {len(records)} record(s): too few to hold out "
                    "--val-fraction of them; pass --val-data"
                )
            records, val_records = records[:-n_val], records[-n_val:]
            val_path = f"{cfg.data} (held out)"
        train = sft.build_rows(cfg.data, tok, cfg.block_size, cfg.pad, records)
        val = sft.build_rows(val_path, tok, cfg.block_size, cfg.pad, val_records)
        batches = sft.RowBatches(train, cfg.batch_size * cfg.grad_accum, cfg.seed)
    except sft.DataError as e:
        raise SystemExit(f"error: {e}") from None
    return tok, train, val, batches


def normalised(batch, microbatches: int):
    """The batch with its weights scaled so that the micro-batch mean of ``sum(ce * w)`` is the
    mean cross-entropy over every response token of the step."""
    x, y, w, pos, seg = batch
    total = float(w.sum())
    w = w * (microbatches / total) if total > 0 else w
    return x, y, w.astype(np.float32), pos, seg


# ----------------------------------------------------------------------------- steps


def make_loss(graphdef, loss=loss_fn):
    """``loss(params, x, y, w, positions, segments) = sum(ce * w)``: `loss_fn` (or the family's
    ``loss``) times the weight it normalises by (the weights come normalised over the step,
    `normalised`)."""

    def loss_of(params, x, y, w, pos, seg):
        model = nnx.merge(graphdef, params)
        return loss(model, x, y, w, pos, seg) * jnp.sum(w)

    return loss_of


def lean_step(graphdef, tx, microbatches: int, loss=loss_fn, units: dict | None = None):
    """The lean layer-wise step (`omgd_jax.lean_train_step`) on (A, B, T) batches; ``units``: the
    optimizer's ``units=`` / ``frozen=`` (`optimizers.unit_kwargs`)."""
    kw = dict(units or {})
    if microbatches > 1:
        if "microbatches" not in inspect.signature(omgd_jax.lean_train_step).parameters:
            raise ConfigError("--microbatches > 1 needs omgd_jax.lean_train_step(microbatches=)")
        kw["microbatches"] = microbatches
    step = omgd_jax.lean_train_step(make_loss(graphdef, loss), tx, layers=optimizers.BLOCKS, **kw)

    def run(state: TrainState, batch):
        args = batch if microbatches > 1 else tuple(a[0] for a in batch)
        params, opt_state, loss = step(state.params, state.opt_state, *args)
        return TrainState(params, opt_state), {"loss": loss}

    return run


def dense_step(graphdef, tx, microbatches: int, loss=loss_fn):
    """The full gradient averaged over the micro-batches (a `lax.scan`), then ``tx``."""
    grad_fn = jax.value_and_grad(make_loss(graphdef, loss))

    def run(state: TrainState, batch):
        def micro(carry, b):
            return jax.tree.map(jnp.add, carry, grad_fn(state.params, *b)), None

        zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
        (loss, grads), _ = jax.lax.scan(micro, zero, batch)
        loss, grads = jax.tree.map(lambda g: g / microbatches, (loss, grads))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return TrainState(optax.apply_updates(state.params, updates), opt_state), {"loss": loss}

    return run


def compile_stage(cfg: FinetuneConfig, graphdef, abstract_params, mesh, loss=loss_fn) -> Stage:
    """The optimizer (the GPT-2 example's `make_optimizer`) and its jitted step."""
    stage = "adamw" if cfg.optimizer == "adamw" else "omgd"
    try:
        tx = optimizers.make_optimizer(cfg, stage)
        abstract = TrainState(abstract_params, jax.eval_shape(tx.init, abstract_params))
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from e
    lean = cfg.optimizer in LAYER_OPTIMIZERS and cfg.omgd_state == "compact"
    if lean:
        body = lean_step(graphdef, tx, cfg.grad_accum, loss, optimizers.unit_kwargs(cfg))
    else:
        body = dense_step(graphdef, tx, cfg.grad_accum, loss)
    shardings = jax.tree.map(lambda t: tree_shardings(mesh, t, cfg.fsdp), abstract)
    step = jax.jit(body, donate_argnums=0, out_shardings=(shardings, None))
    init = jax.jit(tx.init, out_shardings=shardings.opt_state)
    return Stage(stage, abstract, shardings, step, init)


# ----------------------------------------------------------------------------- the run


def run(cfg: FinetuneConfig) -> dict:
    """Fine-tunes (or resumes) and writes OUT/final. Returns a summary dict."""
    _maybe_init_distributed(cfg)
    mesh = make_mesh()
    for n, what in ((mesh.shape["data"], "devices"), (jax.process_count(), "hosts")):
        if cfg.batch_size % n:
            raise SystemExit(f"error: --batch-size {cfg.batch_size} is not divisible by the {n} "
                             f"{what}")  # fmt: skip
    try:
        hf_config = hf_files.read_config(cfg.model)
        fam = family_of(hf_config)
        where = str(Path(cfg.model) / hf_files.CONFIG)
        mcfg = fam.hf.config_from_hf(hf_config, where, cfg.dtype)
    except hf_files.CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    mcfg = dataclasses.replace(mcfg, remat=cfg.remat, loss_chunk=cfg.loss_chunk)
    if not fam.packs and not cfg.pad:
        raise ConfigError(f"{cfg.model} is GPT-2 (learned absolute positions, no segment mask): "
                          "pass --pad to train one example per row")  # fmt: skip
    if not fam.packs and cfg.loss_chunk:
        raise ConfigError("--loss-chunk is for the Llama family; GPT-2 takes the full logits")
    if cfg.block_size > fam.max_len(mcfg):
        raise ConfigError(f"--seq-len {cfg.block_size} exceeds the model's context "
                          f"{fam.max_len(mcfg)}")  # fmt: skip
    if cfg.loss_chunk and (cfg.batch_size * cfg.block_size) % cfg.loss_chunk:
        raise ConfigError(f"--loss-chunk {cfg.loss_chunk} must divide --batch-size x --seq-len")
    n_layer = fam.n_layer(mcfg)
    if cfg.optimizer in LAYER_OPTIMIZERS:
        if n_layer % cfg.layers_per_phase:
            raise ConfigError(f"--layers-per-phase {cfg.layers_per_phase} must divide the "
                              f"model's {n_layer} layers")  # fmt: skip
        cfg.num_masks = n_layer // cfg.layers_per_phase + EXTRA_UNITS.get(cfg.optimizer, 0)
    else:
        cfg.num_masks = 2 if cfg.optimizer == "omgd-tensor" else 4
    if cfg.rank is None:
        cfg.rank = max(1, fam.width(mcfg) // 4)
    tok, train_rows, val_rows, batches = open_data(cfg)
    top = int(max(train_rows.tokens.max(), val_rows.tokens.max()))
    if top >= mcfg.vocab_size:
        raise SystemExit(f"error: the tokenizer of {cfg.model} gives ids up to {top}, beyond "
                         f"the model's vocab_size {mcfg.vocab_size}")  # fmt: skip
    graphdef, _, abstract_params = fam.hf.abstract_params(mcfg)
    stage = compile_stage(cfg, graphdef, abstract_params, mesh, fam.loss)
    feed = Feed(cfg, mesh)
    evaluate = jax.jit(make_loss(graphdef, fam.loss))
    val_batches = _val_batches(val_rows, cfg)

    def val_loss(params) -> float:
        total = sum(float(evaluate(params, *feed.eval_batch(b))) for b in val_batches)
        return total / max(float(val_rows.weights.sum()), 1.0)

    ckpt = Checkpointer(Path(cfg.out_dir) / "checkpoints", cfg.keep)
    try:
        meta, state = restore_latest_readable(ckpt, cfg, batches, {stage.name: stage})
        initial_val = None
        if meta is None:
            step = 0
            try:
                model = fam.hf.load(cfg.model, cfg.dtype, mesh if cfg.fsdp else None,
                                remat=cfg.remat, loss_chunk=cfg.loss_chunk)  # fmt: skip
            except hf_files.CheckpointError as e:
                raise SystemExit(f"error: {e}") from None
            params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
            params = jax.device_put(params, stage.shardings.params)
            del model
            initial_val = val_loss(params)
            state = TrainState(params, stage.init(params))
        else:
            step = meta["step"]
        summary = loop(cfg, stage, state, step, batches, feed, val_loss, ckpt)
    finally:
        ckpt.close()
    summary.update(initial_val_loss=initial_val, train_rows=len(train_rows),
                   val_rows=len(val_rows), truncated=train_rows.truncated + val_rows.truncated,
                   dropped=train_rows.dropped + val_rows.dropped)  # fmt: skip
    final = Path(cfg.out_dir) / "final"
    model = nnx.merge(graphdef, summary["params"])
    fam.hf.save(model, final, source=cfg.model, max_shard_size=cfg.max_shard_size,
                overwrite=True)  # fmt: skip
    if jax.process_index() == 0:
        from examples.gpt2.plot import plot_runs

        plot_runs([cfg.out_dir], Path(cfg.out_dir) / "loss.png", f"fine-tuning {cfg.preset}")
        keep = {k: v for k, v in summary.items() if k not in ("params", "opt_state")}
        (Path(cfg.out_dir) / "summary.json").write_text(json.dumps(keep, indent=2) + "\n")
    summary["final"] = str(final)
    return summary


def _val_batches(rows: sft.Rows, cfg: FinetuneConfig) -> list[tuple]:
    """The validation rows in batches of --batch-size (the last one padded with empty rows)."""
    B, n = cfg.batch_size, len(rows)
    out = []
    for start in range(0, n, B):
        batch = [a[start : start + B] for a in rows.arrays()]
        short = B - len(batch[0])
        if short:
            batch = [np.concatenate([a, np.zeros((short,) + a.shape[1:], a.dtype)]) for a in batch]
        out.append(tuple(batch))
    return out[: cfg.eval_batches] if cfg.eval_batches else out


def loop(cfg: FinetuneConfig, stage: Stage, state, step, batches, feed, val_loss, ckpt) -> dict:
    """Trains from ``step`` to cfg.steps; logs, evaluates, checkpoints; stops on SIGTERM."""
    main_host = jax.process_index() == 0
    if main_host:
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out_dir) / "config.json").write_text(cfg.to_json())
    lr_at = jax.jit(optimizers.lr_schedule(cfg))
    t_last, n_last, loss_sum, tokens = time.perf_counter(), 0, 0.0, 0
    with Logger(cfg, step, enabled=main_host) as logger, SigtermFlag() as sigterm:
        while step < cfg.steps:
            batch = normalised(next(batches), cfg.grad_accum)
            tokens += int(batch[2].astype(bool).sum())
            state, metrics = stage.step(state, feed.train_batch(batch))
            step, n_last = step + 1, n_last + 1
            loss_sum = loss_sum + metrics["loss"]
            last = step == cfg.steps
            if step % cfg.log_every == 0 or last:
                loss = float(loss_sum) / n_last
                seconds = max(time.perf_counter() - t_last, 1e-9)
                rec = {"step": step, "loss": loss, "lr": float(lr_at(step - 1)),
                       "tokens_per_s": n_last * cfg.grad_accum * cfg.batch_size * cfg.block_size
                       / seconds, "response_tokens": tokens, "stage": stage.name}  # fmt: skip
                if step % cfg.eval_every == 0 or last:
                    rec["val_loss"] = val_loss(state.params)
                logger.log(rec)
                n_last, loss_sum = 0, 0.0
            logger.advance()
            if step % cfg.checkpoint_every == 0 or last or sigterm.signal is not None:
                ckpt.save(step, state, stage.name, cfg, batches.state_dict())
            if n_last == 0:
                t_last = time.perf_counter()
            if sigterm.signal is not None:
                print(f"\nreceived signal {sigterm.signal}: saved step {step}", file=sys.stderr)
                break
        return logger.summary(step=step, params=state.params, opt_state=state.opt_state,
                              opt_state_bytes=optimizers.tree_bytes(state.opt_state))  # fmt: skip


def step_memory(hf_config: dict, argv: list[str]) -> dict:
    """Compiled memory of one fine-tuning step for a model given by its config.json alone
    (abstract shapes: no weights, no data), with the flags ``argv`` (``--model``, ``--data`` and
    ``--out-dir`` are filled in). Returns `benchmarks.report.memory`'s bytes (argument, temp,
    ..., ``peak_bytes`` = argument + temp)."""
    from benchmarks import report

    args = build_parser().parse_args(["--model", ".", "--data", "-", "--out-dir", "-", *argv])
    cfg = config_of(args)
    mcfg = hf.config_from_hf(hf_config, "config.json", cfg.dtype)
    mcfg = dataclasses.replace(mcfg, remat=cfg.remat, loss_chunk=cfg.loss_chunk)
    cfg.num_masks = mcfg.n_layer // cfg.layers_per_phase
    cfg.rank = cfg.rank or max(1, mcfg.dim // 4)
    graphdef, _, abstract_params = hf.abstract_params(mcfg)
    stage = compile_stage(cfg, graphdef, abstract_params, make_mesh())
    shape = (cfg.grad_accum, cfg.batch_size, cfg.block_size)
    ints, floats = (jax.ShapeDtypeStruct(shape, t) for t in (jnp.int32, jnp.float32))
    batch = (ints, ints, floats, ints, ints)
    return report.memory(stage.step.lower(stage.abstract, batch).compile())


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        s = run(config_of(args))
    except ConfigError as e:
        parser.error(str(e))
    if jax.process_index() == 0:
        val = "n/a" if s["val_loss"] is None else f"{s['val_loss']:.4f}"
        print(f"done: step {s['step']}, val_loss {val} (from {s['initial_val_loss']}), "
              f"model in {s['final']}")  # fmt: skip


if __name__ == "__main__":
    main()
