"""Every python code block of README.md runs as written."""

import os
import re

import jax
import pytest

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")
BLOCKS = re.findall(r"```python\n(.*?)```", open(README).read(), flags=re.S)


def test_readme_has_code():
  assert BLOCKS


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index):
  with jax.numpy_rank_promotion("allow"):  # JAX's default, as a reader runs it (the suite sets "raise")
    exec(compile(BLOCKS[index], f"README.md block {index}", "exec"), {})
