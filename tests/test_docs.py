"""The API reference builds with warnings as errors, with a page for every public name.

A broken docstring (a field list napoleon cannot parse, bad reST in the maths) fails here,
as it fails `make docs`. The build goes to a temporary folder.
"""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

import omgd_jax

ROOT = Path(__file__).resolve().parents[1]
# What the docstring of every transformation factory has (the project's docstring standard).
SECTIONS = ("Args:", "Returns:", "Examples:", "References:")


@pytest.fixture(scope="session")
def html(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("docs")
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html"]
    cmd += ["-d", str(out / "doctrees"), str(ROOT / "docs"), str(out / "html")]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return out / "html"


def _text(page: Path) -> str:
    return page.read_text(encoding="utf-8")


@pytest.mark.slow
def test_every_public_name_has_a_page(html):
    pages = {p.name for p in (html / "_autosummary").glob("*.html")}
    assert pages == {f"omgd_jax.{name}.html" for name in omgd_jax.__all__}
    api = _text(html / "api.html")
    for name in omgd_jax.__all__:
        assert f'href="_autosummary/omgd_jax.{name}.html"' in api, name


@pytest.mark.slow
def test_a_page_renders_the_maths_sections_and_the_doctest(html):
    page = _text(html / "_autosummary" / "omgd_jax.omgd_mask.html")
    assert 'class="math' in page and "mathjax" in page.lower()
    assert r"\sum_{j=1}^{M} S^{(j)} = M \cdot \mathbf{1}" in page
    for section in ("Parameters", "Returns", "Examples", "References"):
        assert f">{section}<" in page or f">{section}:<" in page, section
    assert "[2. 2. 2. 2.]" in page  # the doctest's output, shown as written


@pytest.mark.slow
def test_the_notebooks_are_included_with_their_outputs(html):
    for name in ("quickstart", "theory"):
        page = _text(html / "notebooks" / f"{name}.html")
        assert "cell_output" in page, name  # committed outputs rendered, not re-executed
    assert re.search(r'<img [^>]*src="[^"]*\.png"', _text(html / "notebooks" / "theory.html"))


def _transformation_factories() -> dict[str, object]:
    return {
        name: obj
        for name in omgd_jax.__all__
        if inspect.isfunction(obj := getattr(omgd_jax, name))
        and "GradientTransformation" in str(inspect.signature(obj).return_annotation)
    }


def test_every_transformation_documents_maths_args_returns_examples_references():
    factories = _transformation_factories()
    assert {"omgd_mask", "omgd", "omgd_adamw"} <= set(factories)
    missing = {}
    for name, factory in factories.items():
        lines = [line.strip() for line in inspect.getdoc(factory).splitlines()]
        gaps = [s for s in SECTIONS if s not in lines]
        gaps += [] if ".. math::" in lines else [".. math::"]
        if gaps:
            missing[name] = gaps
    assert not missing, f"docstring sections missing: {missing}"
