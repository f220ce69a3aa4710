"""Older import path of the shared code, kept so that ``from benchmarks import harness`` still works.

New code imports ``benchmarks.common`` (``train``, ``report``, ...), where these names live.
"""

from benchmarks.common.report import RESULTS, environment, markdown_table, write_json  # noqa: F401
from benchmarks.common.train import accuracy, cross_entropy, eval_params, functional, functional_params, train  # noqa: F401
