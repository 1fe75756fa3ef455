"""The README's code blocks that promise to run do run."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _block_after(heading: str) -> str:
    text = README.read_text()
    section = text[text.index(heading) :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_lean_step_snippet_runs_and_trains_one_block():
    scope: dict = {}
    exec(compile(_block_after("## The lean layer-wise step"), "README.md", "exec"), scope)
    nnx = scope["nnx"]
    start = nnx.to_pure_dict(nnx.state(scope["Net"](nnx.Rngs(0)), nnx.Param))
    after = nnx.to_pure_dict(scope["params"])
    kernels = zip(after["blocks"]["kernel"], start["blocks"]["kernel"], strict=True)
    changed = [bool((a != b).any()) for a, b in kernels]
    assert sum(changed) == 1  # layers_per_phase=1: one of the 4 blocks moved
    assert float(scope["loss"]) > 0
