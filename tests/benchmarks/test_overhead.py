"""The overhead benchmark's command line runs and writes its results (tiny sizes; no timing asserted)."""

import json

from benchmarks import overhead


def test_overhead_cli_writes_results(tmp_path):
  overhead.main(
    [
      "--inners",
      "sgd+momentum",
      "--ks",
      "2",
      "--sizes",
      "8192",
      "--repeats",
      "1",
      "--steps",
      "2",
      "--no-training",
      "--out",
      str(tmp_path),
    ]
  )
  result = json.loads((tmp_path / "overhead.json").read_text())
  for dtype in ("float32", "bfloat16"):
    impls = [r["impl"] for r in result["optimizer"] if r["dtype"] == dtype]
    assert impls == [i.name for i in overhead.IMPLS if dtype in i.dtypes]
  assert "lookahead, slow_dtype=float32" in impls and "snoo" in impls
  assert [(r["k"], r["layout"], r["impl"]) for r in result["replicas"]] == [
    (k, layout, impl)
    for k in (5, 10**9)
    for layout in ("sliced", "blocks")
    for impl in ("inner", "snoo", "diloco", "streaming diloco (F=4, int8, EF)")
  ]
  for row in result["optimizer"]:
    assert row["ms"] > 0 and row["temp_bytes"] >= 0
  assert result["compiles"] == {"steps": 1000, "traces": 1, "compiled": 1}
  assert (tmp_path / "overhead.png").stat().st_size > 0
  assert "| sgd+momentum | 2 |" in (tmp_path / "overhead.md").read_text()


def test_parse_args_rejects_unknown_inner():
  import pytest

  with pytest.raises(SystemExit):
    overhead.parse_args(["--inners", "lamb"])
