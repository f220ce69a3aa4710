"""Every python code block of README.md and of the docs pages runs as written; local links resolve.

A block runs in this process, unless an HTML comment on the line just before its fence asks for
simulated devices or processes (the comment does not show on the rendered page):

    <!-- run: devices=4 -->               one fresh process that sees 4 CPU devices
    <!-- run: processes=2 devices=2 -->   2 processes with 2 CPU devices each, gloo collectives

A fresh process is needed because the device count (``XLA_FLAGS=--xla_force_host_platform_device_count=N``)
must be set before jax starts. Such a block runs as a script, as the page tells a reader to run it: with
``NPROC`` twice the device count (the page's advice for simulated devices), and with ``processes=N``, each
process with ``PROCESS_ID`` (0 to N-1) and ``JAX_COORDINATOR_ADDRESS`` (a free port on 127.0.0.1) in its
environment, read by the block's own ``jax.distributed.initialize``. Once the block is done, each process
checks that it saw the devices and processes asked for.
"""

import glob
import json
import os
import re

import jax
import pytest

from tests.distributed.multidevice_utils import run_processes

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
PAGES = [os.path.join(REPO, "README.md")] + sorted(glob.glob(os.path.join(REPO, "docs", "**", "*.md"), recursive=True))
PAGES = [p for p in PAGES if os.sep + "_build" + os.sep not in p]

BLOCK = re.compile(r"(?:<!--[ \t]*run:(?P<run>[^\n]*?)-->[ \t]*\n)?```python\n(?P<code>.*?)```", flags=re.S)
RUN_KEYS = ("devices", "processes")
TIMEOUT = 300  # seconds per subprocess block: a few seconds each, generous for a loaded 2-core machine

# Run after a subprocess block, in the same process: did the block see what its marker asked for?
CHECK = """
import json, runpy, sys
runpy.run_path(sys.argv[1], run_name="__main__")
import jax
print("RUN-CHECK " + json.dumps({"processes": jax.process_count(), "devices": jax.device_count()}))
"""


def parse_run(marker: str, where: str) -> dict:
  """``"devices=4 processes=2"`` as ``{"devices": 4, "processes": 2}``; a ValueError for anything else."""
  run = {}
  for item in marker.split():
    key, _, value = item.partition("=")
    if key not in RUN_KEYS or not value.isdigit() or int(value) < 1 or key in run:
      raise ValueError(f"{where}: bad run marker item {item!r} in {marker!r}; expected devices=N and/or processes=N")
    run[key] = int(value)
  if not run:
    raise ValueError(f"{where}: empty run marker; expected devices=N and/or processes=N")
  return {"devices": 1, "processes": 1} | run


def _blocks(path):
  """``(code, run)`` for each python block of a page; ``run`` is None for an in-process block."""
  text = open(path, encoding="utf-8").read()
  return [
    (m["code"], None if m["run"] is None else parse_run(m["run"], f"{os.path.relpath(path, REPO)}"))
    for m in BLOCK.finditer(text)
  ]


BLOCKS = [(os.path.relpath(page, REPO), i, code, run) for page in PAGES for i, (code, run) in enumerate(_blocks(page))]


def _label(page, i, run):
  if run is None:
    return f"{page}:{i}"
  return f"{page}:{i}[" + ",".join(f"{k}={run[k]}" for k in RUN_KEYS) + "]"


def test_readme_has_code():
  assert _blocks(os.path.join(REPO, "README.md"))


def test_docs_have_code():
  assert any(page.startswith("docs") for page, _, _, _ in BLOCKS)


def test_distributed_guide_runs_on_devices_and_processes():
  """The guide's multi-device and multi-process blocks are marked, so they run as such, not on one device."""
  runs = [run for page, _, _, run in BLOCKS if page == os.path.join("docs", "guide", "distributed.md")]
  assert any(run and run["processes"] == 1 and run["devices"] > 1 for run in runs)
  assert sum(bool(run and run["processes"] > 1) for run in runs) >= 2  # train.py and DiLoCo across hosts


def test_run_markers_parse():
  assert parse_run(" devices=4 ", "x") == {"devices": 4, "processes": 1}
  assert parse_run("processes=2 devices=2", "x") == {"devices": 2, "processes": 2}
  for bad in ("", "devices=0", "device=4", "devices=four", "devices=2 devices=4"):
    with pytest.raises(ValueError, match="run marker"):
      parse_run(bad, "x")
  page = "<!-- run: devices=4 -->\n```python\nA\n```\n\n```python\nB\n```\n"
  found = [(m["run"], m["code"]) for m in BLOCK.finditer(page)]
  assert found == [(" devices=4 ", "A\n"), (None, "B\n")]


def test_every_run_marker_precedes_a_python_block():
  """A marker that is not on the line just before a python fence would leave its block in this process."""
  for page in PAGES:
    text = open(page, encoding="utf-8").read()
    markers = len(re.findall(r"<!--[ \t]*run:", text))
    used = sum(m["run"] is not None for m in BLOCK.finditer(text))
    assert markers == used, (
      f"{os.path.relpath(page, REPO)}: {markers - used} run marker(s) not just before a python block"
    )


def _run_processes(code: str, run: dict, tmp_path) -> list[str]:
  """Run ``code`` as a script in ``run["processes"]`` fresh processes; their outputs, in process order."""
  script, checker = tmp_path / "block.py", tmp_path / "check.py"
  script.write_text(code)
  checker.write_text(CHECK)
  path = os.pathsep.join([REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])

  def extra_env(i, port):
    env = {"PYTHONPATH": path, "NPROC": str(2 * run["devices"])}
    if run["processes"] > 1:
      env |= {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "PROCESS_ID": str(i)}
    return env

  argv = lambda i, port: [str(checker), str(script)]
  return run_processes(argv, run["processes"], run["devices"], TIMEOUT, extra_env=extra_env, cwd=tmp_path)


@pytest.mark.parametrize("page,index,code,run", BLOCKS, ids=[_label(page, i, run) for page, i, _, run in BLOCKS])
def test_code_block_runs(page, index, code, run, tmp_path):
  if run is None:
    with jax.numpy_rank_promotion("allow"):  # JAX's default, as a reader runs it (the suite sets "raise")
      exec(compile(code, f"{page} block {index}", "exec"), {})
    return
  for i, log in enumerate(_run_processes(code, run, tmp_path)):
    seen = [json.loads(line.split(" ", 1)[1]) for line in log.splitlines() if line.startswith("RUN-CHECK ")]
    expected = {"processes": run["processes"], "devices": run["processes"] * run["devices"]}
    assert seen == [expected], f"{page} block {index}, process {i}: saw {seen}, expected {expected}:\n{log[-2000:]}"


def test_readme_links_and_images_exist():
  """Relative links and images of the README point at files of the repository."""
  text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
  targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
  local = [t for t in targets if "://" not in t and not t.startswith("mailto:")]
  assert local
  missing = [t for t in local if not os.path.exists(os.path.join(REPO, t))]
  assert not missing, f"README.md links to missing files: {missing}"
