"""Fixtures of the multi-device tests: each check script runs once per session on 8 simulated devices."""

from __future__ import annotations

import pytest

from tests.distributed.multidevice_utils import session_results


def _results(kind):
  out = session_results("multidevice_checks.py", kind)
  assert out["device_count"] == 8
  return out


class Results:
  """What a check script measured, by check name; a check that raised fails the test that reads it."""

  def __init__(self, kind):
    self.kind, self._out = kind, None

  def __getitem__(self, name):
    if self._out is None:
      self._out = _results(self.kind)
    out = self._out[name]
    assert "error" not in out, out.get("error") if isinstance(out, dict) else out
    return out


@pytest.fixture(scope="session")
def lookahead_results():
  return Results("lookahead")


@pytest.fixture(scope="session")
def diloco_results():
  return Results("diloco")
