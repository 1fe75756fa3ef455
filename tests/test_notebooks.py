"""The tutorial notebooks run top to bottom (at the small settings they ship with) and print what
their text promises.

`NotebookClient.execute` raises on the first cell that fails, so running a notebook is its own
check; the tests then read the executed cells' outputs.
"""

import ast
import pathlib
import re

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]


def execute(name: str):
    notebook = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    client = NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    )
    client.execute()
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def printed(cell) -> str:
    return "".join(out.get("text", "") for out in cell.outputs if out.output_type == "stream")


def figures(cells) -> int:
    return sum("image/png" in out.get("data", {}) for cell in cells for out in cell.outputs)


def cell_with(cells, source_text: str):
    (cell,) = [c for c in cells if source_text in c.source]
    return cell


@pytest.fixture(scope="session")
def quickstart():
    return execute("quickstart.ipynb")


@pytest.fixture(scope="session")
def theory():
    return execute("theory.ipynb")


def test_quickstart_traversal_visits_every_layer_once_per_cycle(quickstart):
    text = printed(cell_with(quickstart, "def active_layers"))
    # Active layers are scaled by N_L / gamma = 4 with OMGD's scale, left at 1 by LISA.
    assert "gradient factor of an active layer: 4.0 (wor, scale on) 1.0 (iid, LISA)" in text
    cycles = {
        name: ast.literal_eval(re.search(rf"^{name}: .*?cycles of 4: (.*)$", text, re.M)[1])
        for name in ("wor", "iid")
    }
    assert len(cycles["wor"]) == 3  # 240 steps / (K = 20 steps x 4 phases)
    assert all(sorted(c) == [0, 1, 2, 3] for c in cycles["wor"])
    # i.i.d. phases repeat some layers and skip others within a cycle
    assert any(sorted(c) != [0, 1, 2, 3] for c in cycles["iid"])


def test_quickstart_training_losses_and_state_sizes(quickstart):
    text = printed(cell_with(quickstart, "def fit("))
    rows = {
        m[1].strip(): (float(m[2]), float(m[3]))
        for m in re.finditer(
            r"^(.+?)\s+final loss ([\d.]+)\s+optimizer state ([\d.]+) KiB$", text, re.M
        )  # fmt: skip
    }
    adamw, compact, masked = (
        rows["AdamW"],
        rows["OMGD layer (LISA-wor, compact)"],
        rows["omgd_mask(element, M=2) -> AdamW"],
    )
    # All three fit the teacher: start near Var(y) ~ 1, end well below 0.1.
    assert all(loss < 0.1 for loss, _ in rows.values()), rows
    # Net(width 32, 4 stacked blocks): Adam keeps 2 floats per parameter; compact layer-wise
    # state keeps them for the 321 parameters outside the blocks and 1 block of 1120.
    outside, block = 8 * 32 + 32 + 32 + 1, 32 * 32 + 32 + 32 + 32
    assert adamw[1] == pytest.approx(8 * (outside + 4 * block) / 1024, abs=0.05)
    assert compact[1] == pytest.approx(8 * (outside + block) / 1024, abs=0.05)
    assert masked[1] == adamw[1]  # a masked gradient into plain AdamW saves no state


def test_quickstart_draws_its_two_figures(quickstart):
    assert figures(quickstart) == 2


def test_theory_without_replacement_keeps_the_fast_rate(theory):
    text = printed(theory[0])
    slope = {
        m[1]: (float(m[2]), float(m[3]))
        for m in re.finditer(
            r"^(\w+)\s+slope .*?epoch ends ([-+\d.]+), mid-epoch ([-+\d.]+)", text, re.M
        )  # fmt: skip
    }
    assert set(slope) == {"rr", "wor", "iid", "proj"}
    for fast in ("rr", "wor"):  # t^-2 mid-epoch (Thm 5.3), faster still at epoch ends
        assert slope[fast][1] < -1.8 and slope[fast][0] < -2.5, slope
    for slow in ("iid", "proj"):  # t^-1 at both (Thm 5.4)
        assert -1.5 < slope[slow][0] < -0.6 and -1.5 < slope[slow][1] < -0.6, slope
    assert figures(theory) == 1
