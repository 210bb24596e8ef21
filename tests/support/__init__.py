"""Test helpers. :data:`DATA` is the vendored test data (``tests/data``, see
its PROVENANCE.md): the only place tests read conformance files from."""

from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "data"
