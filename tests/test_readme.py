"""Every python code block of README.md and of the docs pages runs as written; local links resolve."""

import glob
import os
import re

import jax
import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
PAGES = [os.path.join(REPO, "README.md")] + sorted(glob.glob(os.path.join(REPO, "docs", "**", "*.md"), recursive=True))
PAGES = [p for p in PAGES if os.sep + "_build" + os.sep not in p]


def _blocks(path):
  return re.findall(r"```python\n(.*?)```", open(path, encoding="utf-8").read(), flags=re.S)


BLOCKS = [(os.path.relpath(page, REPO), i, code) for page in PAGES for i, code in enumerate(_blocks(page))]


def test_readme_has_code():
  assert _blocks(os.path.join(REPO, "README.md"))


def test_docs_have_code():
  assert any(page.startswith("docs") for page, _, _ in BLOCKS)


@pytest.mark.parametrize("page,index,code", BLOCKS, ids=[f"{page}:{i}" for page, i, _ in BLOCKS])
def test_code_block_runs(page, index, code):
  with jax.numpy_rank_promotion("allow"):  # JAX's default, as a reader runs it (the suite sets "raise")
    exec(compile(code, f"{page} block {index}", "exec"), {})


def test_readme_links_and_images_exist():
  """Relative links and images of the README point at files of the repository."""
  text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
  targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
  local = [t for t in targets if "://" not in t and not t.startswith("mailto:")]
  assert local
  missing = [t for t in local if not os.path.exists(os.path.join(REPO, t))]
  assert not missing, f"README.md links to missing files: {missing}"
