"""Writing results: where they go, the environment they came from, tables and figures."""

from __future__ import annotations

import argparse
import json
import os
import platform

import jax
import numpy as np
import optax

import lookahead_optax

RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results")


def results_dir(experiment: str) -> str:
  """``benchmarks/results/<experiment>``: where an experiment writes by default."""
  return os.path.join(RESULTS, experiment)


def seeds_count(text: str) -> int:
  """``--seeds``: at least 2, since every verdict is Welch's test over seeds."""
  n = int(text)
  if n < 2:
    raise argparse.ArgumentTypeError(f"--seeds must be at least 2 (verdicts compare seeds with Welch's test), got {n}")
  return n


def parser(prog: str, description: str) -> argparse.ArgumentParser:
  """The parser of an experiment command, its ``description`` (a docstring) printed as written."""
  return argparse.ArgumentParser(
    prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
  )


def add_selection(parser: argparse.ArgumentParser, flag: str, names, help: str, default=None) -> None:
  """``flag NAME [NAME ...]``: which of ``names`` (tasks, experiments) to run, ``default`` (all) when not given."""
  parser.add_argument(
    flag, nargs="+", default=list(names if default is None else default), choices=list(names), help=help
  )


def add_run_arguments(
  parser: argparse.ArgumentParser, *, quick: str, seeds: int, unit: str, folder: str, reports: str
) -> None:
  """The options every experiment command shares: ``--quick``, ``--seeds``, ``--out``, ``--report-only``."""
  parser.add_argument("--quick", action="store_true", help=f"smoke run: {quick}")
  parser.add_argument("--seeds", type=seeds_count, default=seeds, help=f"seeds per {unit} (default {seeds})")
  parser.add_argument(
    "--out",
    default=None,
    help=f"output folder (default benchmarks/results/{folder}; with --quick benchmarks/results/quick_{folder})",
  )
  parser.add_argument("--report-only", action="store_true", help=f"train nothing: rewrite the {reports} from the JSON")


def environment() -> dict:
  """Versions and device, recorded with every result."""
  import flax

  return {
    "jax": jax.__version__,
    "optax": optax.__version__,
    "flax": flax.__version__,
    "lookahead_optax": lookahead_optax.__version__,
    "python": platform.python_version(),
    "device": str(jax.devices()[0].device_kind),
    "devices": jax.device_count(),
    "platform": jax.default_backend(),
    "cpus": os.cpu_count(),
  }


def write_json(path: str, obj) -> str:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=_to_json)
    f.write("\n")
  return path


def _to_json(x):
  if isinstance(x, (np.ndarray, jax.Array)):
    return np.asarray(x).tolist()
  return float(x)


def write_text(path: str, text: str) -> str:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    f.write(text if text.endswith("\n") else text + "\n")
  return path


def markdown_table(headers: list[str], rows: list[list]) -> str:
  """A GitHub markdown table; floats get 4 significant digits."""
  fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
  lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
  lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
  return "\n".join(lines)


def text_table(headers: list[str], rows: list[list]) -> str:
  """A plain-text table with aligned columns, for the terminal."""
  cells = [list(map(str, headers))] + [[str(v) for v in row] for row in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
  line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
  return "\n".join([line(cells[0]), line(["-" * w for w in widths])] + [line(r) for r in cells[1:]])


def mean_std(values, scale: float = 1.0, digits: int | None = None) -> str:
  """``"mean ± std"`` (population std); ``digits`` decimals, else 4 significant digits."""
  values = scale * np.asarray(values, dtype=float)
  if digits is None:
    return f"{values.mean():.4g} ± {values.std():.2g}"
  return f"{values.mean():.{digits}f} ± {values.std():.{digits}f}"


def mean_curve(curves) -> tuple[np.ndarray, np.ndarray]:
  """``(mean, std)`` over the first axis of equally long curves (runs x points)."""
  arr = np.asarray(curves, dtype=float)
  return arr.mean(0), arr.std(0)


def smooth(x, width: int) -> np.ndarray:
  """Moving average over ``width`` points (fewer points out: only full windows)."""
  x = np.asarray(x, dtype=float)
  width = max(1, min(width, len(x)))
  return np.convolve(x, np.ones(width) / width, mode="valid")


def pyplot():
  """matplotlib's pyplot on the non-interactive Agg backend (figures are written to files)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def save_figure(fig, path: str) -> str:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  pyplot().close(fig)
  return path
