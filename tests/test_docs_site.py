"""The documentation site as a reader sees it: built with Sphinx (warnings are errors), then read back.

The site is built once per module into a temporary folder, with the notebooks left unexecuted (their
execution is the docs CI build's job); everything else is as ``python -m sphinx -W -b html docs ...``
builds it. Checked on the built HTML: every figure under ``benchmarks/results/`` is on the results page
as an image whose file is there, internal links and anchors resolve, the API overview links to every
public name, every public function's page shows its arguments, and the comparison table and the
repository link are on the front page. Checked on the sources: the API overview's signatures are the
real ones, and every public function documents each of its arguments under ``Args:``.
"""

from __future__ import annotations

import hashlib
import html.parser
import importlib
import inspect
import io
import os
import re
import urllib.parse

import pytest

import lookahead_optax
from lookahead_optax import theory

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
DOCS = os.path.join(REPO, "docs")
RESULTS = os.path.join(REPO, "benchmarks", "results")
REPOSITORY_URL = "https://github.com/lookahead-optax/lookahead-optax"
MODULES = (lookahead_optax, theory)

# Sphinx extensions and the theme use APIs that Sphinx has scheduled for removal; not this project's concern.
pytestmark = pytest.mark.filterwarnings("ignore::PendingDeprecationWarning", "ignore::DeprecationWarning")


class _Page(html.parser.HTMLParser):
  """The ids, links (``href``) and images (``src``) of one HTML page."""

  def __init__(self):
    super().__init__()
    self.ids, self.links, self.images = set(), [], []

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    if attrs.get("id"):
      self.ids.add(attrs["id"])
    if tag == "a" and attrs.get("name"):
      self.ids.add(attrs["name"])
    if tag in ("a", "link") and attrs.get("href") is not None:
      self.links.append(attrs["href"])
    if tag in ("img", "script") and attrs.get("src"):
      (self.images if tag == "img" else self.links).append(attrs["src"])


def _parse(text: str) -> _Page:
  page = _Page()
  page.feed(text)
  return page


@pytest.fixture(scope="module")
def site(tmp_path_factory):
  """The folder of the built HTML site."""
  from sphinx.application import Sphinx

  out = tmp_path_factory.mktemp("docs_site")
  warnings = io.StringIO()
  app = Sphinx(
    DOCS,
    DOCS,
    str(out / "html"),
    str(out / "doctrees"),
    "html",
    confoverrides={"nb_execution_mode": "off"},
    status=io.StringIO(),
    warning=warnings,
    freshenv=True,
    warningiserror=True,
    keep_going=True,
  )
  app.build()
  assert app.statuscode == 0 and not warnings.getvalue(), warnings.getvalue()
  return str(out / "html")


def _read(site, name):
  with open(os.path.join(site, name), encoding="utf-8") as f:
    return f.read()


def _pages(site):
  """The site's HTML pages (not the theme's templates under _static/)."""
  for root, dirs, files in os.walk(site):
    dirs[:] = [d for d in dirs if not (root == site and d == "_static")]
    for name in files:
      if name.endswith(".html"):
        yield os.path.join(root, name)


def _results_figures():
  """Every figure the benchmarks committed: the PNGs under benchmarks/results/, less local smoke runs (quick*)."""
  found = []
  for root, dirs, files in os.walk(RESULTS):
    dirs[:] = sorted(d for d in dirs if not d.startswith("quick"))
    found += [os.path.join(root, f) for f in sorted(files) if f.endswith(".png")]
  return found


def _digest(path):
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def test_every_results_figure_is_an_image_on_the_results_page(site):
  figures = _results_figures()
  assert len(figures) >= 15  # paper, outer, overhead, theory, mixed_precision
  page = _parse(_read(site, "results.html"))
  shown = {}
  for src in page.images:
    path = os.path.normpath(os.path.join(site, urllib.parse.unquote(src)))
    assert os.path.isfile(path), f"results.html shows {src}, which is not in the site"
    shown[_digest(path)] = src
  missing = [os.path.relpath(f, REPO) for f in figures if _digest(f) not in shown]
  assert not missing, (
    f"not on the results page: {missing}; embed each in benchmarks/results/README.md (relative path) or in "
    "docs/results.md (results:NAME.png)"
  )


def test_internal_links_and_anchors_resolve(site):
  ids, pages = {}, {}
  for path in _pages(site):
    pages[path] = _parse(open(path, encoding="utf-8").read())
    ids[os.path.normpath(path)] = pages[path].ids
  broken, checked = [], 0
  for path, page in pages.items():
    for target in page.links + page.images:
      parts = urllib.parse.urlsplit(target)
      if parts.scheme or parts.netloc or target.startswith(("mailto:", "javascript:", "data:")):
        continue
      if not parts.path and not parts.fragment:
        continue
      dest = os.path.normpath(os.path.join(os.path.dirname(path), urllib.parse.unquote(parts.path)))
      if parts.path.endswith("/"):
        dest = os.path.join(dest, "index.html")
      checked += 1
      where = f"{os.path.relpath(path, site)} -> {target}"
      if not os.path.exists(dest):
        broken.append(where)
      # Source listings (viewcode) point at the page of a name re-exported by another module, with the anchor
      # of the module that defines it; the page is checked, not the anchor.
      elif (
        parts.fragment
        and dest.endswith(".html")
        and parts.fragment not in ids.get(dest, set())
        and not (os.path.relpath(path, site).startswith("_modules" + os.sep))
      ):
        broken.append(where + " (no such anchor)")
  assert checked > 1000
  assert not broken, f"{len(broken)} broken internal links, e.g. {broken[:10]}"


def _overview(site):
  """The links of docs/api.md's overview: from its heading to the generated reference."""
  text = _read(site, "api.html")
  start, end = text.index('id="overview"'), text.index('id="api-full-reference"')
  return set(_parse(text[start:end]).links)


def test_api_overview_links_to_every_public_name(site):
  links = _overview(site)
  missing = []
  for module in MODULES:
    for name in module.__all__:
      obj = getattr(module, name)
      full = f"{module.__name__}.{name}"
      anchor = f"module-{full}" if inspect.ismodule(obj) else full
      if f"api/{full}.html#{anchor}" not in links:
        missing.append(full)
      assert os.path.isfile(os.path.join(site, "api", f"{full}.html")), full
  assert not missing, f"docs/api.md's overview does not link to {missing}"


OVERVIEW_ENTRY = re.compile(r"\{py:func\}`(?P<name>\w+)\((?P<args>[^`]*)\) <(?P<target>[\w.]+)>`")


def _written(parameter: inspect.Parameter) -> str:
  """A parameter as the overview writes it: no annotation, string defaults in double quotes."""
  text = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}.get(parameter.kind, "")
  text += parameter.name
  if parameter.default is not inspect.Parameter.empty:
    default = parameter.default
    text += "=" + (f'"{default}"' if isinstance(default, str) else repr(default))
  return text


def _signature(obj) -> str:
  parts, star = [], False
  for p in inspect.signature(obj).parameters.values():
    if p.kind is inspect.Parameter.KEYWORD_ONLY and not star:
      parts.append("*")
    star = star or p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.VAR_POSITIONAL)
    parts.append(_written(p))
  return ", ".join(parts)


def test_api_overview_signatures_are_the_real_ones():
  text = open(os.path.join(DOCS, "api.md"), encoding="utf-8").read()
  entries = list(OVERVIEW_ENTRY.finditer(text))
  functions = [f"{m.__name__}.{n}" for m in MODULES for n in m.__all__ if inspect.isfunction(getattr(m, n))]
  assert sorted(e["target"] for e in entries) == sorted(functions)
  for entry in entries:
    module, _, name = entry["target"].rpartition(".")
    assert entry["name"] == name, entry.group(0)
    real = _signature(getattr(importlib.import_module(module), name))
    assert entry["args"] == real, f"docs/api.md: {name}({entry['args']}); the function: {name}({real})"


def _args_section(doc: str) -> list[str]:
  """The argument names documented under ``Args:`` of a Google-style docstring."""
  lines = doc.splitlines()
  if "Args:" not in lines:
    return []
  names = []
  for line in lines[lines.index("Args:") + 1 :]:
    if line and not line.startswith(" "):
      break
    match = re.match(r"^ {2}(\*{0,2}\w+(?:, \*{0,2}\w+)*)( \([^)]*\))?:", line)  # "a, b: ..." documents both
    if match:
      names += [n.lstrip("*") for n in match.group(1).split(", ")]
  return names


def _public_functions():
  return [(m, n) for m in MODULES for n in m.__all__ if inspect.isfunction(getattr(m, n))]


@pytest.mark.parametrize("module,name", _public_functions(), ids=[n for _, n in _public_functions()])
def test_public_function_documents_every_argument(module, name):
  obj = getattr(module, name)
  documented = _args_section(inspect.getdoc(obj) or "")
  expected = list(inspect.signature(obj).parameters)
  assert documented, f"{module.__name__}.{name}: no Args: section"
  assert documented == expected, f"{module.__name__}.{name}: Args documents {documented}, the signature has {expected}"


def test_public_named_tuples_document_every_field():
  from sphinx.pycode import ModuleAnalyzer

  for module in MODULES:
    for name in module.__all__:
      cls = getattr(module, name)
      if not (inspect.isclass(cls) and issubclass(cls, tuple) and hasattr(cls, "_fields")):
        continue
      docs = ModuleAnalyzer.for_module(cls.__module__).find_attr_docs()
      missing = [f for f in cls._fields if not "".join(docs.get((cls.__name__, f), [])).strip()]
      assert not missing, f"{module.__name__}.{name}: fields without a docstring: {missing}"


def test_function_pages_show_their_arguments(site):
  for module, name in _public_functions():
    text = _read(site, os.path.join("api", f"{module.__name__}.{name}.html"))
    assert re.search(r"<dt class=\"field-\w+\">Parameters", text), f"{name}: no Parameters list on its page"


def test_front_page_has_the_comparison_table_and_the_repository(site):
  text = _read(site, "index.html")
  table = text[text.index('id="how-it-compares"') :]
  assert "<table" in table and "params you hold" in table and "optax.lookahead" in table
  assert f'href="{REPOSITORY_URL}"' in text


def test_site_styles_keep_code_and_math_in_the_column(site):
  css = _read(site, os.path.join("_static", "custom.css"))
  assert "code.literal span.pre" in css and "overflow-wrap: anywhere" in css
  assert "_static/custom.css" in _read(site, "api.html")
