"""Check what `python -m build` wrote to dist/: one sdist and one wheel of this version, complete.

The wheel must hold every module of lookahead_optax/ and py.typed (a file left out of the package
list would otherwise pass every test run from the source tree), the license, and the metadata that
pyproject.toml declares.
"""

from __future__ import annotations

import email
import glob
import os
import re
import sys
import tarfile
import zipfile

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))


def main() -> int:
  init = open(os.path.join(REPO, "lookahead_optax", "__init__.py"), encoding="utf-8").read()
  version = re.search(r'^__version__ = "([^"]+)"', init, flags=re.M).group(1)
  wheels = glob.glob(os.path.join(REPO, "dist", "*.whl"))
  sdists = glob.glob(os.path.join(REPO, "dist", "*.tar.gz"))
  assert len(wheels) == 1 and len(sdists) == 1, f"expected one wheel and one sdist in dist/, got {wheels + sdists}"
  wheel, sdist = wheels[0], sdists[0]
  assert os.path.basename(wheel).startswith(f"lookahead_optax-{version}-"), (wheel, version)
  assert os.path.basename(sdist) == f"lookahead_optax-{version}.tar.gz", (sdist, version)

  modules = sorted(
    f"lookahead_optax/{name}"
    for name in os.listdir(os.path.join(REPO, "lookahead_optax"))
    if name.endswith(".py") or name == "py.typed"
  )
  with zipfile.ZipFile(wheel) as zf:
    names = set(zf.namelist())
    info = f"lookahead_optax-{version}.dist-info"
    metadata = email.message_from_bytes(zf.read(f"{info}/METADATA"))
  missing = [m for m in modules if m not in names]
  assert not missing, f"{os.path.basename(wheel)} lacks {missing}"
  assert f"{info}/licenses/LICENSE" in names, "the wheel lacks LICENSE"
  stray = sorted(n for n in names if not n.startswith(("lookahead_optax/", info)))
  assert not stray, f"the wheel ships files outside the package: {stray}"
  assert metadata["Version"] == version
  assert metadata["License-Expression"] == "Apache-2.0", metadata["License-Expression"]
  assert metadata["Requires-Python"] == ">=3.11", metadata["Requires-Python"]
  requires = metadata.get_all("Requires-Dist")
  assert any(r.startswith("jax>=") for r in requires), requires

  with tarfile.open(sdist) as tf:
    snames = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
  for needed in ["LICENSE", "README.md", "pyproject.toml", *modules]:
    assert needed in snames, f"{os.path.basename(sdist)} lacks {needed}"

  print(
    f"dist OK: {os.path.basename(wheel)} ({len(modules)} package files, py.typed, LICENSE), {os.path.basename(sdist)}"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
