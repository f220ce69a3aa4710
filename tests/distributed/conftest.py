"""Fixtures of the multi-device tests: each check script runs once per session on 8 simulated devices."""

from __future__ import annotations

import pytest

from tests.distributed.multidevice_utils import session_results


class Results:
  """What a check script measured, by check name; a check that raised fails the test that reads it."""

  def __init__(self, script, *args):
    self.script, self.args, self._out = script, args, None

  def _results(self):
    if self._out is None:
      self._out = session_results(self.script, *self.args)
      assert self._out["device_count"] == 8
      assert "setup" not in self._out, self._out["setup"]["error"]
    return self._out

  def __getitem__(self, name):
    out = self._results()[name]
    assert "error" not in out, out.get("error") if isinstance(out, dict) else out
    return out


@pytest.fixture(scope="session")
def lookahead_results():
  return Results("multidevice_checks.py", "lookahead")


@pytest.fixture(scope="session")
def diloco_results():
  return Results("multidevice_checks.py", "diloco")


@pytest.fixture(scope="session")
def streaming_results():
  return Results("streaming_checks.py")


@pytest.fixture(scope="session")
def exchange_results():
  return Results("streaming_checks.py", "exchange")
