"""Fixtures for every test."""

from __future__ import annotations

import os

import pytest

from mxguard.core import runner

# rules_dirs = "auto" (the default) would load SpamAssassin's rules wherever they
# are installed: tests, and the daemons they start (which inherit the
# environment), see none unless a test names them (mxguard.content.rules).
os.environ["MXGUARD_SA_RULES"] = ""


@pytest.fixture(autouse=True)
def fresh_error_log() -> None:
    """The runner logs one error line per check per interval, process-wide: each
    test starts with none logged, whatever ran before it."""
    runner.ERROR_LOG.reset()
