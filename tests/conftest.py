"""Fixtures for every test."""

from __future__ import annotations

import pytest

from mxguard.core import runner


@pytest.fixture(autouse=True)
def fresh_error_log() -> None:
    """The runner logs one error line per check per interval, process-wide: each
    test starts with none logged, whatever ran before it."""
    runner.ERROR_LOG.reset()
