"""Sphinx configuration of the lookahead-optax documentation.

Build (warnings are errors; the notebooks are executed):

    python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
import tempfile

from sphinx.util import logging

import lookahead_optax

logger = logging.getLogger(__name__)

DOCS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(DOCS)
REPOSITORY_URL = "https://github.com/lookahead-optax/lookahead-optax"  # also [project.urls] in pyproject.toml

project = "lookahead-optax"
author = "lookahead-optax authors"
copyright = "lookahead-optax authors"
release = version = lookahead_optax.__version__

extensions = [
  "myst_nb",
  "sphinx.ext.autodoc",
  "sphinx.ext.autosummary",
  "sphinx.ext.mathjax",
  "sphinx.ext.napoleon",
  "sphinx.ext.viewcode",
  "sphinx_copybutton",
]
exclude_patterns = ["_build", "**/.ipynb_checkpoints", "_*.md"]
templates_path = ["_templates"]

# Markdown pages and notebooks (MyST).
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
# The notebooks are committed without outputs and executed at every build; an error fails the build.
nb_execution_mode = "force"
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_execution_timeout = 600
nb_merge_streams = True

# API reference: one page per public name, from the docstrings (Google style, as in Optax).
autosummary_generate = True
autosummary_ignore_module_all = False  # a module's members are its __all__
autodoc_typehints = "signature"
autodoc_member_order = "bysource"
autodoc_default_options = {"exclude-members": "_asdict, _fields, _field_defaults, _make, _replace, count, index"}
# Signatures show type aliases by name, not expanded into their unions (``DTypeLike``, not
# ``str | type[Any] | dtype | SupportsDType``), and each argument on a line of its own once a
# signature is longer than a line of the column.
autodoc_type_aliases = {
  "AlphaLike": "AlphaLike",  # described on docs/api.md
  "ArrayLike": "numpy.typing.ArrayLike",
  "DTypeLike": "jax.typing.DTypeLike",
  "optax.ScalarOrSchedule": "optax.ScalarOrSchedule",
}
python_use_unqualified_type_names = True
python_maximum_signature_line_length = 88
API_MODULES = ("lookahead_optax", "lookahead_optax.theory")  # the modules docs/api.md lists


def _public_data(module_name: str) -> list[str]:
  """Names in a module's ``__all__`` that are neither functions, classes nor modules (constants)."""
  module = importlib.import_module(module_name)
  return [
    name
    for name in getattr(module, "__all__", ())
    if not callable(getattr(module, name)) and not inspect.ismodule(getattr(module, name))
  ]


autosummary_context = {"public_data": {name: _public_data(name) for name in API_MODULES}}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# Every cross-reference must resolve, except into packages whose inventories we do not download:
# the build runs without network, and no objects.inv of jax, optax or numpy ships with them, so
# there is no intersphinx; their names show as plain code.
nitpicky = True
nitpick_ignore_regex = [
  (r"py:.*", r"(jax|jnp|jaxlib|optax|chex|numpy|np|flax|orbax)(\..*)?"),
  (r"py:.*", r"(typing|collections|builtins|types|enum|numbers)(\..*)?"),
  (r"py:.*", r"(Any|Callable|Optional|Union|Sequence|Mapping|NamedTuple|ArrayLike|DTypeLike|PyTree|Array)"),
  (r"py:.*", r"(int|float|bool|str|tuple|list|dict|None|object|type)"),
]

html_theme = "sphinx_book_theme"
html_title = f"lookahead-optax {release}"
html_theme_options = {
  "show_toc_level": 2,
  "home_page_in_toc": True,
  "use_download_button": True,
  "repository_url": REPOSITORY_URL,
  "repository_branch": "main",
  "path_to_docs": "docs",
  "use_repository_button": True,
  "use_issues_button": True,
}
# Long code, signatures and display math wrap or scroll inside the text column.
html_static_path = ["_static"]
html_css_files = ["custom.css"]


def _kernel_for_this_interpreter() -> None:
  """Notebooks run on this interpreter, whatever Jupyter kernels the machine has installed."""
  from ipykernel.kernelspec import write_kernel_spec

  kernels = tempfile.mkdtemp(prefix="lookahead-optax-kernels-")
  write_kernel_spec(path=os.path.join(kernels, "kernels", "python3"))
  os.environ["JUPYTER_PATH"] = os.pathsep.join(filter(None, [kernels, os.environ.get("JUPYTER_PATH")]))


_kernel_for_this_interpreter()

# Figures and tables that the benchmarks write: `![...](results:NAME.png)` in a page is the file NAME.png
# wherever it sits under benchmarks/results/, so that a page survives a reorganisation of that folder.
RESULTS = os.path.join(REPO, "benchmarks", "results")
RESULTS_LINK = re.compile(r"\]\(results:([^)\s]+)\)")
# results.md shows benchmarks/results/README.md, less its title (the page has its own), figures included.
RESULTS_MARKER = "<!-- benchmarks/results/README.md -->"


def _find_result(name: str) -> list[str]:
  found = []
  for root, dirs, files in os.walk(RESULTS):
    dirs[:] = sorted(d for d in dirs if d != "quick")  # benchmarks/results/quick: local smoke runs
    found += [os.path.join(root, name)] if name in files else []
  return found


def _resolve_results_links(app, docname, source):
  text = source[0]
  if docname == "results" and RESULTS_MARKER in text:
    block = "```{include} ../benchmarks/results/README.md\n:start-line: 1\n:relative-images:\n:relative-docs: ../\n```"
    text = text.replace(RESULTS_MARKER, block)
  here = os.path.dirname(app.env.doc2path(docname))

  def resolve(match):
    found = _find_result(match.group(1))
    if len(found) != 1:
      logger.warning(
        "results:%s matches %d files under benchmarks/results/", match.group(1), len(found), location=docname
      )
      return match.group(0)
    return "](" + os.path.relpath(found[0], here).replace(os.sep, "/") + ")"

  source[0] = RESULTS_LINK.sub(resolve, text)


def _check_api_pages(app, exception):
  """Every public name has its page, every notebook page shows a figure."""
  if exception is not None or app.builder.name != "html":
    return
  out = app.outdir
  names = [
    f"{module}.{name}" for module in API_MODULES for name in getattr(importlib.import_module(module), "__all__", ())
  ]
  missing = [name for name in names + list(API_MODULES) if not os.path.exists(os.path.join(out, "api", f"{name}.html"))]
  if missing:
    raise RuntimeError(f"docs: no API page for {missing}; add new modules to API_MODULES and docs/api.md")
  if app.config.nb_execution_mode == "off":  # a quick build (tests/test_docs_site.py): notebooks without outputs
    return
  for notebook in os.listdir(os.path.join(REPO, "notebooks")):
    if notebook.endswith(".ipynb"):
      page = os.path.join(out, "notebooks", notebook.replace(".ipynb", ".html"))
      if "<img" not in open(page, encoding="utf-8").read():
        raise RuntimeError(f"docs: {page} shows no figure; did the notebook run?")


def _keep_attribute_docstring(app, what, name, obj, options, lines):
  if what == "attribute":
    _ATTRIBUTE_DOCS[name] = list(lines)


def _restore_attribute_docstring(app, what, name, obj, options, lines):
  if what == "attribute" and name in _ATTRIBUTE_DOCS:
    lines[:] = _ATTRIBUTE_DOCS.pop(name)


_ATTRIBUTE_DOCS: dict[str, list[str]] = {}

# Sphinx writes an aliased type inside a union (``AlphaLike | None``) as ``TypeAliasForwardRef('AlphaLike')``.
_ALIAS_REPR = re.compile(r"TypeAliasForwardRef\('([^']*)'\)")


def _alias_names(app, what, name, obj, options, signature, return_annotation):
  fix = lambda text: text if text is None else _ALIAS_REPR.sub(r"\1", text)
  return fix(signature), fix(return_annotation)


def setup(app):
  # A NamedTuple field's docstring is prose; napoleon would read "text: more" as "type: description".
  app.connect("autodoc-process-docstring", _keep_attribute_docstring, priority=100)
  app.connect("autodoc-process-docstring", _restore_attribute_docstring, priority=900)
  app.connect("autodoc-process-signature", _alias_names)
  app.connect("source-read", _resolve_results_links)
  app.connect("build-finished", _check_api_pages)
  sys.setrecursionlimit(max(sys.getrecursionlimit(), 3000))
