"""The main-job demo runs end to end and learns."""

from benchmarks import demo


def test_demo_learns_digits():
  results = demo.run(steps=60, seeds=1, progress=False)
  assert len(results) == 2
  for rows in results.values():
    assert rows[0]["test_acc"] > 0.5  # chance is 0.1
