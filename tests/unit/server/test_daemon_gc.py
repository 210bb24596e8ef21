"""GC tuning of a serving process: startup objects frozen, young collections less
often. Run in a child interpreter (the test process keeps its own GC settings)."""

from __future__ import annotations

import subprocess
import sys

import pytest

CODE = """
import gc
from mxguard.server.daemon import GC_THRESHOLDS, tune_gc
before = gc.get_threshold()
if {tune}:
    tune_gc()
print(gc.get_threshold() == GC_THRESHOLDS, gc.get_freeze_count() > 0, before == (700, 10, 10))
"""


@pytest.mark.parametrize("tune, expected", [
    (True, "True True True"),
    (False, "False False True"),  # control: a process that does not serve keeps Python's
])
def test_tune_gc(tune: bool, expected: str) -> None:
    out = subprocess.run([sys.executable, "-c", CODE.format(tune=tune)], capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == expected
