"""Every notebook in notebooks/ runs top to bottom without an error, and is committed without outputs."""

from __future__ import annotations

import glob
import os
import sys

import nbformat
import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "notebooks", "*.ipynb")))
KERNEL = "lookahead-optax-tests"


def test_there_are_notebooks():
  assert len(NOTEBOOKS) >= 2, NOTEBOOKS


@pytest.fixture(scope="module")
def kernel_manager_factory(tmp_path_factory):
  """Kernels run this interpreter (the test venv's), whatever kernelspecs the machine has installed."""
  from ipykernel.kernelspec import write_kernel_spec
  from jupyter_client.kernelspec import KernelSpecManager
  from jupyter_client.manager import AsyncKernelManager

  kernels = tmp_path_factory.mktemp("kernels")
  write_kernel_spec(path=str(kernels / KERNEL))
  specs = KernelSpecManager(kernel_dirs=[str(kernels)])
  assert specs.get_kernel_spec(KERNEL).argv[0] == sys.executable
  return lambda: AsyncKernelManager(kernel_name=KERNEL, kernel_spec_manager=specs)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, kernel_manager_factory):
  from nbclient import NotebookClient

  nb = nbformat.read(path, as_version=4)
  # cwd = repo root, so that `import benchmarks` works as it does for a user.
  client = NotebookClient(nb, km=kernel_manager_factory(), timeout=600,
                          resources={"metadata": {"path": REPO}})
  client.execute()  # raises CellExecutionError, with the cell and traceback, on any error
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
  assert not errors
  assert any(c.cell_type == "code" and any("image/png" in o.get("data", {}) for o in c.outputs)
             for c in nb.cells), "no inline plot"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_is_committed_without_outputs(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, f"{os.path.basename(path)}: clear the outputs"
