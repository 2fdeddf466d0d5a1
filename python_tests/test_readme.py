"""The README's Python example runs as written."""
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no python example"
    scope = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    loss = scope["loss"]
    assert loss.dim() == 0 and bool(loss.isfinite())
    assert scope["logp"].grad is not None and bool(scope["logp"].grad.isfinite().all())
    assert scope["v"].grad is not None


def test_readme_fused_linear_example_runs():
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
              if "fused_linear_policy_loss" in b]
    assert blocks, "README.md has no fused_linear_policy_loss example"
    scope = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    assert scope["loss"].dim() == 0 and bool(scope["loss"].isfinite())
    assert scope["hidden"].grad is not None and scope["lm_head"].weight.grad is not None
