"""The notebooks are committed without outputs and import only the library and public packages.

They are executed by the docs build (`python -m sphinx -W ... docs docs/_build/html`, in .ci/run),
which fails on any error in a cell and checks that each notebook draws a figure.
"""

from __future__ import annotations

import glob
import os
import re

import nbformat
import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "notebooks", "*.ipynb")))
# What a user has after `pip install "lookahead-optax[test]"`: no module of this repository but the library.
LOCAL_MODULES = ("benchmarks", "tests", "conftest")


def test_there_are_notebooks():
  assert len(NOTEBOOKS) >= 2, NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_is_committed_without_outputs(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, f"{os.path.basename(path)}: clear the outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_imports_only_installed_packages(path):
  nb = nbformat.read(path, as_version=4)
  source = "\n".join(cell.source for cell in nb.cells if cell.cell_type == "code")
  imported = re.findall(r"^\s*(?:from|import)\s+([A-Za-z_][\w]*)", source, flags=re.M)
  local = sorted(set(imported) & set(LOCAL_MODULES))
  assert not local, f"{os.path.basename(path)} imports {local}: it must run anywhere after pip install"
