"""Tests of the GPT-2 example's data layer (examples/gpt2/data.py, examples/gpt2/fetch.py).

No network: the tokenizer fixture uses the cached GPT-2 ranks (``python -m examples.gpt2.fetch
tokenizer`` fetches them from PyPI beforehand, or the fixture fetches on demand); fetch tests use
small fake archives with the registry clients monkeypatched out.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from examples.gpt2 import data, fetch, loader

EOT = 50256


@pytest.fixture(scope="module")
def enc():
    return fetch.get_gpt2_encoding()


def _write_docs(root: Path) -> dict[str, str]:
    """A small corpus: plain, unicode, nested, a literal special-token string, and noise files
    that must be ignored (wrong suffix, hidden folder)."""
    docs = {
        "a.txt": "Hello world",
        "b.md": "# Title\n\nUnicode: café — 日本語 🚀\r\nEnd.",
        "c.txt": "Text containing <|endoftext|> literally must stay plain text.",
        "sub/d.txt": "Nested document.\n" * 40,
        "sub/deeper/e.md": "",
    }
    docs.update({f"many/{i:02d}.txt": f"Document number {i}. " * (i + 1) for i in range(9)})
    for name, text in docs.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(text.encode("utf-8"))  # bytes: keep \r\n untouched on disk
    (root / "ignored.json").write_text('{"text": "no"}')
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.txt").write_text("hidden")
    return docs


def _nanogpt_write(path: Path, tokens: np.ndarray) -> None:
    """Write a split exactly as nanoGPT's data/openwebtext/prepare.py does."""
    arr = np.memmap(path, dtype=np.uint16, mode="w+", shape=(len(tokens),))
    arr[:] = tokens
    arr.flush()
    del arr


def _make_split_dir(root: Path, train: np.ndarray, val: np.ndarray | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    _nanogpt_write(root / "train.bin", train)
    _nanogpt_write(root / "val.bin", train[:50] if val is None else val)
    return root


# --- tokenizer --------------------------------------------------------------------------------


def test_encoding_is_gpt2(enc):
    assert enc.name == "r50k_base"
    assert enc.n_vocab == 50257 and enc.eot_token == EOT
    assert enc.encode_ordinary("Hello world") == [15496, 995]  # GPT-2's well-known ids
    assert enc.encode("<|endoftext|>", allowed_special="all") == [EOT]
    assert fetch.tokenizer_cache_path().name == hashlib.sha1(fetch.R50K_URL.encode()).hexdigest()


# --- preparation ------------------------------------------------------------------------------


def test_prepare_text_folder_matches_tiktoken_and_nanogpt_format(tmp_path, enc):
    src = tmp_path / "corpus"
    written = _write_docs(src)
    docs = data.read_text_documents(src)
    assert [d.doc_id for d in docs] == sorted(written)
    assert [d.text for d in docs] == [written[d.doc_id].replace("\r\n", "\n") for d in docs]

    out = tmp_path / "prepared"
    meta = data.prepare(docs, out, source="text", val_fraction=0.2, seed=3, enc=enc,
                        progress=False, batch_docs=3)  # fmt: skip
    train_idx, val_idx = data.split_documents(len(docs), 0.2, seed=3)
    for split, idx in (("train", train_idx), ("val", val_idx)):
        expected = [t for i in idx for t in enc.encode_ordinary(docs[i].text) + [EOT]]
        path = out / f"{split}.bin"
        on_disk = np.memmap(path, dtype=np.uint16, mode="r")  # exactly how nanoGPT reads it
        assert on_disk.tolist() == expected
        assert path.stat().st_size == 2 * len(expected)
        assert int((on_disk == EOT).sum()) == len(idx)  # the literal "<|endoftext|>" is text
        assert meta["splits"][split] == {"docs": len(idx), "tokens": len(expected)}
    assert json.loads((out / "meta.json").read_text()) == meta
    assert meta["n_docs"] == len(docs) == 14
    assert meta["tokenizer"] == "r50k_base" and meta["tokenizer_ranks_sha256"] == fetch.R50K_SHA256
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]


def test_byte_level_tokens_are_the_utf8_bytes_with_nul_after_each_document(tmp_path):
    src = tmp_path / "corpus"
    written = _write_docs(src)
    out = tmp_path / "bytes"
    argv = ["--source", "text", "--path", str(src), "--tokenizer", "bytes", "--out-dir", str(out),
            "--val-fraction", "0.2", "--seed", "3", "--no-progress"]  # fmt: skip
    assert data.main(argv) == 0
    docs = data.read_text_documents(src)
    train_idx, val_idx = data.split_documents(len(docs), 0.2, seed=3)
    for split, idx in (("train", train_idx), ("val", val_idx)):
        expected = [b for i in idx for b in [*docs[i].text.encode("utf-8"), 0]]
        on_disk = np.memmap(out / f"{split}.bin", dtype=np.uint16, mode="r")
        assert on_disk.tolist() == expected
        assert int((on_disk == 0).sum()) == len(idx)  # one NUL per document, none in the text
    meta = data.read_meta(out)
    assert meta["tokenizer"] == "bytes" and meta["vocab_size"] == 256
    assert meta["eot_token"] == 0 and meta["tokenizer_ranks_sha256"] is None
    enc = data.get_encoding("bytes")
    assert enc.decode(enc.encode_ordinary(written["b.md"])) == written["b.md"]
    # the same byte-level recipe is reused as it is
    assert data.ensure_prepared("text", out, path=src, val_fraction=0.2, seed=3,
                                enc=enc) == meta  # fmt: skip
    with pytest.raises(ValueError, match="--tokenizer 'chars' is unknown; allowed: gpt2, bytes"):
        data.get_encoding("chars")


def test_split_by_document_is_deterministic_and_disjoint():
    train, val = data.split_documents(50, 0.1, seed=7)
    train2, val2 = data.split_documents(50, 0.1, seed=7)
    assert np.array_equal(train, train2) and np.array_equal(val, val2)
    assert len(val) == 5 and not set(train) & set(val)
    assert sorted(set(train) | set(val)) == list(range(50))
    assert not np.array_equal(val, data.split_documents(50, 0.1, seed=8)[1])
    assert [len(s) for s in data.split_documents(2, 0.005, seed=0)] == [1, 1]
    assert [len(s) for s in data.split_documents(3, 0.5, seed=0)] == [1, 2]
    with pytest.raises(ValueError, match="val-fraction"):
        data.split_documents(10, 0.0, seed=0)
    with pytest.raises(ValueError, match="val-fraction"):
        data.split_documents(10, 0.9, seed=0)
    with pytest.raises(ValueError, match="at least 2 documents"):
        data.split_documents(1, 0.1, seed=0)


def test_cli_and_ensure_prepared(tmp_path, enc, capsys, monkeypatch):
    src = tmp_path / "corpus"
    _write_docs(src)
    out = tmp_path / "out"
    argv = ["--source", "text", "--path", str(src), "--out-dir", str(out),
            "--val-fraction", "0.3", "--seed", "5", "--no-progress"]  # fmt: skip
    assert data.main(argv) == 0
    meta = data.read_meta(out)
    table = capsys.readouterr().out
    total = meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"]
    assert f"{total:,}" in table and "train" in table and "val" in table

    calls = []
    real = data.prepare_source
    monkeypatch.setattr(data, "prepare_source", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert data.ensure_prepared("text", out, path=src, val_fraction=0.3, seed=5) == meta
    assert calls == []  # same recipe: reused
    data.ensure_prepared("text", out, path=src, val_fraction=0.3, seed=6, progress=False)
    assert calls == [1] and data.read_meta(out)["seed"] == 6


def test_corpus_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="allowed: sotu, text, openwebtext"):
        data.read_documents("wiki")
    with pytest.raises(ValueError, match="requires --path"):
        data.read_documents("text")
    with pytest.raises(ValueError, match="only used with --source text"):
        data.read_documents("sotu", tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        data.read_text_documents(tmp_path / "missing")
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match=r"allowed: \.txt, \.md"):
        data.read_text_documents(tmp_path / "x.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no"):
        data.read_text_documents(tmp_path / "empty")
    (tmp_path / "one.txt").write_text("single")
    assert [d.doc_id for d in data.read_text_documents(tmp_path / "one.txt")] == ["one.txt"]


def test_openwebtext_without_datasets_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(RuntimeError, match="pip install datasets"):
        data.read_documents("openwebtext")


# --- loading ----------------------------------------------------------------------------------


def test_nanogpt_prepared_data_loads_and_get_batch_matches_nanogpt(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 50257, size=400).astype(np.uint16)
    root = _make_split_dir(tmp_path / "nanogpt", tokens)
    ds = loader.TokenDataset(root, "train")
    assert ds.meta is None and len(ds) == 400
    assert np.array_equal(np.asarray(ds.tokens), tokens)

    x, y = ds.get_batch(np.random.default_rng(5), batch_size=6, context=16)
    starts = np.random.default_rng(5).integers(0, 400 - 16, size=6)
    assert x.dtype == y.dtype == np.int32 and x.shape == y.shape == (6, 16)
    for row, s in enumerate(starts):
        assert x[row].tolist() == tokens[s : s + 16].tolist()
        assert y[row].tolist() == tokens[s + 1 : s + 17].tolist()


def test_epoch_batches_cover_each_window_once_and_resume_exactly(tmp_path):
    root = _make_split_dir(tmp_path / "d", np.arange(1000, dtype=np.uint16))
    ds = loader.TokenDataset(root, "train")
    it = loader.EpochBatches(ds, batch_size=4, context=10, seed=7)
    assert (it.n_windows, it.batches_per_epoch) == (99, 24)
    batches = [next(it) for _ in range(30)]  # crosses the epoch boundary at step 24
    for x, y in batches:
        assert np.array_equal(y[:, :-1], x[:, 1:]) and np.array_equal(y[:, -1], x[:, -1] + 1)
    starts0 = np.concatenate([x[:, 0] for x, _ in batches[:24]])
    assert len(set(starts0.tolist())) == 96 and set(starts0 % 10) == {0}
    starts1 = np.concatenate([x[:, 0] for x, _ in batches[24:]])
    assert not np.array_equal(starts0[:24], starts1)  # epoch 1 is reshuffled
    assert it.epoch == 1

    saver = loader.EpochBatches(ds, batch_size=4, context=10, seed=7)
    for _ in range(17):
        next(saver)
    state = json.loads(json.dumps(saver.state_dict()))
    resumed = loader.EpochBatches(ds, batch_size=4, context=10, seed=7)
    resumed.load_state_dict(state)
    for want_x, want_y in batches[17:]:
        got_x, got_y = next(resumed)
        assert np.array_equal(got_x, want_x) and np.array_equal(got_y, want_y)

    other = loader.EpochBatches(ds, batch_size=4, context=10, seed=8)
    with pytest.raises(ValueError, match="seed=7"):
        other.load_state_dict(state)
    ordered = loader.EpochBatches(ds, batch_size=4, context=10, shuffle=False)
    assert next(ordered)[0][:, 0].tolist() == [0, 10, 20, 30]


def test_loader_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=r"nope.*python -m examples\.gpt2\.data"):
        loader.TokenDataset(missing, "train")
    root = tmp_path / "partial"
    root.mkdir()
    _nanogpt_write(root / "train.bin", np.arange(30, dtype=np.uint16))
    with pytest.raises(FileNotFoundError, match="val.bin"):
        loader.TokenDataset(root, "val")
    (root / "val.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        loader.TokenDataset(root, "val")
    (root / "val.bin").write_bytes(b"\x00\x01\x02")
    with pytest.raises(ValueError, match="not a multiple of 2"):
        loader.TokenDataset(root, "val")
    with pytest.raises(ValueError, match="allowed: train, val"):
        loader.TokenDataset(root, "test")


def test_corpus_smaller_than_one_batch(tmp_path):
    root = _make_split_dir(tmp_path / "small", np.arange(22, dtype=np.uint16))
    ds = loader.TokenDataset(root, "train")
    rng = np.random.default_rng(0)
    x, _ = ds.get_batch(rng, batch_size=2, context=10)  # exactly 2 * (10 + 1) tokens: fits
    assert x.shape == (2, 10)
    assert loader.EpochBatches(ds, batch_size=2, context=10).batches_per_epoch == 1
    with pytest.raises(ValueError, match=r"fewer than one batch.*= 24"):
        ds.get_batch(rng, batch_size=2, context=11)
    with pytest.raises(ValueError, match="fewer than one batch"):
        loader.EpochBatches(ds, batch_size=3, context=10)
    with pytest.raises(ValueError, match="context must be a positive integer"):
        ds.get_batch(rng, batch_size=2, context=0)


# --- fetching (offline: registry clients monkeypatched) ----------------------------------------


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


@pytest.fixture
def fake_whisper(tmp_path, monkeypatch):
    """Cache in tmp_path; `pip download` replaced by copying a fake sdist whose ranks member is
    b"fake ranks"; the sdist's pinned hash patched to the fake one. Returns the member bytes."""
    monkeypatch.setenv("OMGD_JAX_CACHE_DIR", str(tmp_path / "cache"))
    member = b"fake ranks\n"
    sdist = _tar_gz({fetch.WHISPER_MEMBER: member, "openai_whisper-x/setup.py": b""})
    monkeypatch.setattr(fetch, "WHISPER_SDIST_SHA256", hashlib.sha256(sdist).hexdigest())
    monkeypatch.setattr(fetch, "_pip_download_whisper",
                        lambda dest: (dest / fetch.WHISPER_SDIST).write_bytes(sdist))  # fmt: skip
    return member


def test_tokenizer_fetch_wrong_sha256_leaves_cache_clean(fake_whisper):
    cache = fetch.tokenizer_cache_dir()
    with pytest.raises(RuntimeError, match=r"sha256 mismatch for the GPT-2 ranks.*fetch tokenizer"):
        fetch.ensure_tokenizer()
    assert not cache.exists() or list(cache.iterdir()) == []


def test_tokenizer_fetch_installs_verified_file(fake_whisper, monkeypatch):
    monkeypatch.setattr(fetch, "R50K_SHA256", hashlib.sha256(fake_whisper).hexdigest())
    path = fetch.ensure_tokenizer()
    assert path == fetch.tokenizer_cache_path() and path.read_bytes() == fake_whisper
    assert list(path.parent.iterdir()) == [path]  # no temp files left


def test_tokenizer_sdist_wrong_sha256(fake_whisper, monkeypatch):
    monkeypatch.setattr(fetch, "WHISPER_SDIST_SHA256", "0" * 64)
    with pytest.raises(RuntimeError, match="sha256 mismatch for the openai-whisper"):
        fetch.fetch_tokenizer()
    assert not fetch.tokenizer_cache_dir().exists()


def test_corrupted_cached_tokenizer_is_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("OMGD_JAX_CACHE_DIR", str(tmp_path))
    path = fetch.tokenizer_cache_path()
    path.parent.mkdir(parents=True)
    path.write_bytes(b"truncated")
    with pytest.raises(RuntimeError, match=r"not cached.*examples\.gpt2\.fetch tokenizer"):
        fetch.ensure_tokenizer(fetch=False)
    assert not path.exists()


def test_registry_client_failures_are_clear():
    fail = [sys.executable, "-c", "import sys; sys.exit(3)"]
    with pytest.raises(RuntimeError, match=r"exited with status 3.*Only package registries"):
        fetch._run(fail, "thing", "python -m examples.gpt2.fetch all")
    with pytest.raises(RuntimeError, match="not installed or not on PATH"):
        fetch._run(["omgd-no-such-client-xyz"], "thing", "python -m examples.gpt2.fetch all")


def _fake_sotu_tarball() -> bytes:
    speech = lambda y, n, p, t: json.dumps({"year": y, "name": n, "party": p, "text": t})
    return _tar_gz({
        "package/package.json": b"{}",
        "package/data/1791_george_washington_n.json": speech(1791, "George Washington", "none",
                                                             "Second.").encode(),
        "package/data/1790_george_washington_n.json": speech(1790, "George Washington", "none",
                                                             "First.").encode(),
        "package/data/1790_george_washington_n.txt": b"First.",
        "package/lib/index.js": b"",
    })  # fmt: skip


def test_read_sotu_from_tarball(tmp_path):
    path = tmp_path / "sotu.tgz"
    path.write_bytes(_fake_sotu_tarball())
    docs = data.read_sotu(path)
    assert [(d.doc_id, d.text) for d in docs] == [
        ("1790_george_washington_n", "First."),
        ("1791_george_washington_n", "Second."),
    ]
    assert docs[0].meta == {"year": 1790, "president": "George Washington", "party": "none"}


def test_sotu_fetch_wrong_sha256_leaves_cache_clean(tmp_path, monkeypatch):
    monkeypatch.setenv("OMGD_JAX_CACHE_DIR", str(tmp_path / "cache"))
    fake = _fake_sotu_tarball()
    monkeypatch.setattr(fetch, "_npm_pack_sotu",
                        lambda dest: (dest / fetch.SOTU_TARBALL).write_bytes(fake))  # fmt: skip
    with pytest.raises(RuntimeError, match=r"sha256 mismatch.*datasets-sotu.*fetch sotu"):
        fetch.ensure_sotu()
    assert not fetch.sotu_cache_path().parent.exists()
    monkeypatch.setattr(fetch, "SOTU_SHA256", hashlib.sha256(fake).hexdigest())
    assert fetch.ensure_sotu().read_bytes() == fake  # control: the matching hash installs


def test_missing_tokenizer_says_how_to_fetch_it(tmp_path, monkeypatch):
    """No cached GPT-2 ranks and no fetching: a sentence naming the command, nothing written."""
    monkeypatch.setenv("OMGD_JAX_CACHE_DIR", str(tmp_path))
    with pytest.raises(RuntimeError, match=r"not cached.*examples\.gpt2\.fetch tokenizer"):
        fetch.ensure_tokenizer(fetch=False)
    assert list(tmp_path.iterdir()) == []
