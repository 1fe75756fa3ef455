"""The wheel: what it holds, and that it works installed on its own (jax + optax, no checkout).

The wheel is built without build isolation (the installed setuptools, no download) from a copy
of the files the build reads, so the checkout gets no build/ or *.egg-info. It is installed into
a fresh `python -m venv` whose only other packages are omgd-jax's dependency closure: the
distributions that its `Requires-Dist` (no extras) needs, found recursively in this test's
environment and put on the fresh environment's path through a .pth file that names a folder of
links to exactly those distributions. Why not `pip install` with dependencies: that contacts
the index and, for a newer jax release, downloads a few hundred MB, too slow and too fragile for
the suite. flax, orbax and the examples are therefore absent there, so an import of any of them
fails; the script also checks `sys.modules` for them.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import venv
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import omgd_jax

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BUILD_INPUTS = ("pyproject.toml", "README.md", "LICENSE")

# Runs in the fresh environment. Builds every factory of `omgd_jax.__all__` (a function
# annotated to return an optax GradientTransformation), so that names added later are covered.
SMOKE_SCRIPT = r"""
import importlib.metadata, inspect, json, sys

import jax
import jax.numpy as jnp
import optax

import omgd_jax

REQUIRED = {  # values of required arguments
    "inner": optax.adam(0.1),  # with a first moment, which magma reads
    "learning_rate": 0.1,
    "layers": "^w",  # "w" (4, 8) read as 4 stacked layers
    "layers_per_phase": 2,
    "rank": 2,
}
COMMON = {"num_masks": 2, "steps_per_mask": 1}  # passed to the factories that take them


def is_factory(obj):
    if not inspect.isfunction(obj):
        return False
    annotation = inspect.signature(obj).return_annotation
    return "GradientTransformation" in str(annotation)


def arguments(name, factory):
    kwargs = {}
    for arg, p in inspect.signature(factory).parameters.items():
        if arg in COMMON:
            kwargs[arg] = COMMON[arg]
        elif p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            if arg not in REQUIRED:
                raise SystemExit(f"tests/test_packaging.py: REQUIRED needs a value for {arg!r} "
                                 f"(a required argument of omgd_jax.{name})")
            kwargs[arg] = REQUIRED[arg]
    return kwargs


MATRICES_ONLY = {"scale_by_mofasgd"}  # building blocks for 2-D leaves (aliases route the rest)


def run(tx, matrices_only=False):
    params = {"w": 1.0 + jnp.arange(32.0).reshape(4, 8) / 32, "b": jnp.ones(8)}
    if matrices_only:
        params = {"w": params["w"]}
    grads = jax.tree.map(jnp.ones_like, params)
    traces = []

    @jax.jit
    def step(g, s, p):
        traces.append(1)
        return tx.update(g, s, p)

    state = tx.init(params)
    updates, state1 = step(grads, state, params)
    _, state2 = step(grads, state1, params)
    spec = lambda t: (jax.tree.structure(t), [(x.shape, x.dtype) for x in jax.tree.leaves(t)])
    leaves = jax.tree.leaves(updates)
    return {
        "same_tree": jax.tree.structure(updates) == jax.tree.structure(params),
        "finite": all(bool(jnp.isfinite(x).all()) for x in leaves),
        "nonzero": int(sum(int((x != 0).sum()) for x in leaves)),
        "size": int(sum(x.size for x in leaves)),
        "state_stable": spec(state) == spec(state1) == spec(state2),
        "traces": len(traces),
    }


report = {
    "file": omgd_jax.__file__,
    "version": omgd_jax.__version__,
    "metadata_version": importlib.metadata.version("omgd-jax"),
    "missing": [n for n in omgd_jax.__all__ if not hasattr(omgd_jax, n)],
    "factories": {},
}
for name in omgd_jax.__all__:
    obj = getattr(omgd_jax, name, None)
    if is_factory(obj):
        report["factories"][name] = run(obj(**arguments(name, obj)), name in MATRICES_ONLY)
# A typed key (a traced int seed is refused: the seed becomes a key outside jit).
traversal = jax.jit(omgd_jax.joint_traversal, static_argnums=(1, 2))
masks, batches = traversal(jax.random.key(0), 2, 3, jnp.int32(1))
report["joint_traversal"] = sorted(zip(masks.tolist(), batches.tolist()))
report["foreign_modules"] = sorted(
    m for m in sys.modules if m.split(".")[0] in ("flax", "orbax", "examples")
)
print(json.dumps(report))
"""


def _build_wheel(out: Path, src: Path) -> tuple[Path, str]:
    for name in BUILD_INPUTS:
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "omgd_jax", src / "omgd_jax", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    cmd = [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out)]
    done = subprocess.run([*cmd, str(src)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = out.glob("*.whl")
    return wheel, done.stdout + done.stderr


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    return _build_wheel(tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("src"))


def _metadata(wheel: Path):
    with zipfile.ZipFile(wheel) as zf:
        (name,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        return Parser().parsestr(zf.read(name).decode())


def test_the_build_does_not_warn(built):
    _, log = built
    assert not re.search(r"deprecat", log, re.IGNORECASE), log


def test_the_wheel_holds_the_library_alone(built):
    wheel, _ = built
    version = omgd_jax.__version__
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    dist_info = f"omgd_jax-{version}.dist-info/"
    strays = [n for n in names if not n.startswith(("omgd_jax/", dist_info))]
    assert not strays, f"files outside omgd_jax/: {strays}"
    assert "omgd_jax/py.typed" in names
    assert f"{dist_info}licenses/LICENSE" in names
    shipped = {n.removeprefix("omgd_jax/") for n in names if n.endswith(".py")}
    package = ROOT / "omgd_jax"
    assert shipped == {p.relative_to(package).as_posix() for p in package.rglob("*.py")}


def test_the_metadata_declares_version_license_and_core_dependencies(built):
    wheel, _ = built
    meta = _metadata(wheel)
    assert meta["Version"] == omgd_jax.__version__
    assert meta["License-Expression"] == "Apache-2.0"
    core = [Requirement(r) for r in meta.get_all("Requires-Dist")]
    core = sorted(canonicalize_name(r.name) for r in core if r.marker is None)
    assert core == ["jax", "optax"]


def _dependency_closure(wheel: Path) -> list[importlib.metadata.Distribution]:
    """The installed distributions that the wheel's non-extra requirements need, recursively."""
    todo = [Requirement(r) for r in _metadata(wheel).get_all("Requires-Dist")]
    found: dict[str, importlib.metadata.Distribution] = {}
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(req.name)
        if name in found:
            continue
        dist = importlib.metadata.distribution(name)
        assert req.specifier.contains(dist.version, prereleases=True), (req, dist.version)
        found[name] = dist
        todo += [Requirement(r) for r in dist.requires or []]
    return list(found.values())


def _link_distributions(dists, folder: Path) -> None:
    """Links every top-level file or folder of ``dists`` (modules, .libs, dist-info)."""
    folder.mkdir()
    for dist in dists:
        assert dist.files, f"{dist.metadata['Name']} has no RECORD"
        tops = {f.parts[0] for f in dist.files}
        for top in tops - {"..", "__pycache__"}:
            target = Path(dist.locate_file(top))
            if target.exists() and not (folder / top).exists():
                (folder / top).symlink_to(target)


def test_the_wheel_works_installed_alone(built, tmp_path):
    wheel, _ = built
    env_dir, deps, work = tmp_path / "env", tmp_path / "deps", tmp_path / "work"
    venv.create(env_dir, with_pip=False, symlinks=True)
    python = env_dir / "bin" / "python"
    (site,) = env_dir.glob("lib/python*/site-packages")
    _link_distributions(_dependency_closure(wheel), deps)
    (site / "omgd_jax_test_deps.pth").write_text(f"{deps}\n")
    pip = [sys.executable, "-m", "pip", "--python", str(python)]
    install = subprocess.run(
        [*pip, "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert install.returncode == 0, install.stdout + install.stderr

    work.mkdir()  # run outside the checkout, so that only the installed copy can be imported
    (work / "smoke.py").write_text(SMOKE_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["JAX_PLATFORMS"] = "cpu"
    done = subprocess.run(
        [str(python), "smoke.py"], cwd=work, env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])

    assert Path(report["file"]).is_relative_to(site), report["file"]
    assert report["version"] == report["metadata_version"] == omgd_jax.__version__
    assert report["missing"] == []
    assert report["foreign_modules"] == []
    assert {"omgd_mask", "omgd", "omgd_adamw"} <= set(report["factories"])
    for name, result in report["factories"].items():
        assert result["same_tree"] and result["finite"], (name, result)
        assert result["state_stable"] and result["traces"] == 1, (name, result)
    # M = 2 contiguous bands of ceil(n/2) per leaf: half of w (32) and of b (8) move.
    for name in ("omgd_mask", "omgd", "omgd_adamw"):
        assert report["factories"][name]["nonzero"] == 20, (name, report["factories"][name])
    assert report["joint_traversal"] == [[m, b] for m in range(2) for b in range(3)]
