"""Loading prepared GPT-2 token data (nanoGPT's flat uint16 ``train.bin`` / ``val.bin``).

``TokenDataset`` memmaps a split; ``TokenDataset.get_batch`` samples random windows (nanoGPT's
``get_batch``); ``EpochBatches`` walks the split in a seeded order whose whole position is one
integer ``step``, so a training run can checkpoint and resume it exactly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

# The on-disk format, shared with `data.py` (which writes it): nanoGPT's flat uint16 splits.
SPLITS = ("train", "val")
#: Token storage type, as in nanoGPT (GPT-2's 50257 ids fit in 16 bits).
TOKEN_DTYPE = np.uint16
META_FILE = "meta.json"
FORMAT = "nanogpt-uint16"
DEFAULT_SEED = 0


def read_meta(data_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """``meta.json`` of a prepared directory, or ``None`` if absent (e.g. nanoGPT data)."""
    path = Path(data_dir) / META_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


class TokenDataset:
    """A memmapped split (``<data_dir>/<split>.bin``, flat uint16 as in nanoGPT).

    Attributes: ``path``, ``split``, ``tokens`` (read-only ``np.memmap``) and ``meta``
    (``meta.json`` contents or ``None`` for data prepared by nanoGPT)."""

    def __init__(self, data_dir: str | os.PathLike[str], split: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is unknown; allowed: {', '.join(SPLITS)}.")
        root = Path(data_dir)
        hint = (
            "Prepare it with `python -m examples.gpt2.data --source sotu --out-dir "
            f"{root}` (or --source text --path P)."
        )
        if not root.is_dir():
            raise FileNotFoundError(f"Data directory {root} does not exist. {hint}")
        self.path = root / f"{split}.bin"
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path} does not exist. {hint}")
        size = self.path.stat().st_size
        itemsize = np.dtype(TOKEN_DTYPE).itemsize
        if size == 0:
            raise ValueError(f"{self.path} is empty (split {split!r} has no tokens). {hint}")
        if size % itemsize:
            raise ValueError(
                f"{self.path} has {size} bytes, not a multiple of {itemsize}: not a uint16 "
                f"token file (truncated?). {hint}"
            )
        self.split = split
        self.meta = read_meta(root)
        self.tokens: np.memmap = np.memmap(self.path, dtype=TOKEN_DTYPE, mode="r")

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def check_fits(self, batch_size: int, context: int) -> None:
        """Raise ``ValueError`` unless the split holds one batch:
        ``batch_size * (context + 1)`` tokens."""
        _check_positive_int("batch_size", batch_size)
        _check_positive_int("context", context)
        need = batch_size * (context + 1)
        if len(self) < need:
            raise ValueError(
                f"{self.path} has {len(self)} tokens, fewer than one batch of "
                f"batch_size * (context + 1) = {batch_size} * ({context} + 1) = {need}. "
                "Use a larger corpus, a larger --val-fraction for val, or a smaller "
                "batch_size/context."
            )

    def windows(self, starts: np.ndarray, context: int) -> tuple[np.ndarray, np.ndarray]:
        """``(x, y)`` int32 arrays of shape ``(len(starts), context)``: ``x = tokens[s:s+T]``,
        ``y = tokens[s+1:s+T+1]`` for each start ``s``."""
        idx = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(context + 1)
        w = np.asarray(self.tokens[idx], dtype=np.int32)
        return w[:, :-1], w[:, 1:]

    def get_batch(
        self, rng: np.random.Generator, batch_size: int, context: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """nanoGPT's ``get_batch``: ``batch_size`` windows at uniform random starts in
        ``[0, len - context - 1]``; returns int32 ``(x, y)`` of shape ``(batch_size, context)``."""
        self.check_fits(batch_size, context)
        starts = rng.integers(0, len(self) - context, size=batch_size)
        return self.windows(starts, context)


class EpochBatches(Iterator[tuple[np.ndarray, np.ndarray]]):
    """Deterministic, resumable batches over a split, epoch after epoch (infinite iterator).

    The split is cut into ``n_windows = (len - 1) // context`` windows of ``context + 1`` tokens
    at stride ``context`` (consecutive windows share one token, so every token after the first
    is a target exactly once per epoch; the tail remainder is unused). Epoch ``e`` visits the
    windows in the order ``default_rng([seed, e]).permutation(n_windows)`` (or in file order if
    ``shuffle=False``), ``batch_size`` at a time, dropping the last incomplete batch.

    The entire position is the integer ``step`` (batches produced so far), so
    ``state_dict()`` / ``load_state_dict()`` resume exactly; the state also records the
    settings, and loading into an iterator with different settings raises ``ValueError``."""

    def __init__(
        self,
        dataset: TokenDataset,
        batch_size: int,
        context: int,
        *,
        seed: int = DEFAULT_SEED,
        shuffle: bool = True,
        step: int = 0,
    ) -> None:
        dataset.check_fits(batch_size, context)
        if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}.")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.context = int(context)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.step = int(step)
        self.n_windows = (len(dataset) - 1) // self.context
        self.batches_per_epoch = self.n_windows // self.batch_size
        self._order_epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    @property
    def epoch(self) -> int:
        """Epoch of the next batch."""
        return self.step // self.batches_per_epoch

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            else:
                self._order = np.arange(self.n_windows)
            self._order_epoch = epoch
        return self._order

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """The batch produced at ``step`` (pure function of ``step`` and the settings)."""
        epoch, b = divmod(int(step), self.batches_per_epoch)
        windows = self._epoch_order(epoch)[b * self.batch_size : (b + 1) * self.batch_size]
        return self.dataset.windows(windows * self.context, self.context)

    def __iter__(self) -> EpochBatches:
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        out = self.batch(self.step)
        self.step += 1
        return out

    def state_dict(self) -> dict[str, int]:
        """Small JSON-serialisable state: ``step`` plus the settings it is only valid for."""
        return {
            "step": self.step,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "context": self.context,
            "shuffle": int(self.shuffle),
            "n_tokens": len(self.dataset),
        }

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Resume from ``state_dict()`` output; raises ``ValueError`` if any setting differs."""
        mine = self.state_dict()
        missing = sorted(set(mine) - set(state))
        if missing:
            raise ValueError(f"data iterator state lacks keys {missing}; got {dict(state)}.")
        for key in mine:
            if key != "step" and int(state[key]) != mine[key]:
                raise ValueError(
                    f"data iterator state was saved with {key}={state[key]}, but this iterator "
                    f"has {key}={mine[key]}; resume with the same data and settings."
                )
        step = state["step"]
        if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}.")
        self.step = int(step)
