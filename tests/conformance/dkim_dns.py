"""DKIM conformance data (``tests/data/dkim``, see tests/data/PROVENANCE.md)
turned into zones for :mod:`mxguard.testing.dns`.

* ``mail-dkim/FAKE_DNS.dat``: one ``name value`` line per TXT record. Markers:
  ``NXDOMAIN`` -> the name is left out of the zone (the server answers
  NXDOMAIN); ``~~Query timed out~~`` -> ``("TIMEOUT", None)`` (never
  answered); ``~~SERVFAIL~~`` -> ``("SERVFAIL", None)``; ``""`` -> one empty
  TXT string.
* ``rfc8463-example.yaml``: ``dns`` maps names to a record, or to
  ``"@file PATH"`` (a dkimpy ``*.txt`` key record file).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from mxguard.testing.dns import Zone
from tests.support import DATA

MARKERS: dict[str, tuple[str, Any] | None] = {
    "NXDOMAIN": None,
    "~~Query timed out~~": ("TIMEOUT", None),
    "~~SERVFAIL~~": ("SERVFAIL", None),
}


def dkim_dir() -> Path:
    """``tests/data/dkim``."""
    return DATA / "dkim"


def fake_dns_zone(path: Path | None = None) -> Zone:
    """The Mail::DKIM corpus's ``FAKE_DNS.dat`` as a zone."""
    path = path or dkim_dir() / "mail-dkim" / "FAKE_DNS.dat"
    zone: Zone = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, _, value = line.strip().partition(" ")
        value = value.strip()
        if value in MARKERS:
            marker = MARKERS[value]
            if marker is not None:
                zone.setdefault(name.lower(), []).append(marker)
            continue
        if value == '""':
            value = ""
        zone.setdefault(name.lower(), []).append(("TXT", value))
    return zone


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def corpus_cases() -> list[dict[str, Any]]:
    """``mail-dkim/expected.yaml`` cases (file, expected, signatures, note)."""
    data = load_yaml(dkim_dir() / "mail-dkim" / "expected.yaml")
    return list(data["cases"])


def rfc8463() -> dict[str, Any]:
    return dict(load_yaml(dkim_dir() / "rfc8463-example.yaml"))


def rfc8463_zone(example: dict[str, Any] | None = None) -> Zone:
    example = example or rfc8463()
    zone: Zone = {}
    for name, value in example["dns"].items():
        if value.startswith("@file "):
            value = (dkim_dir() / value[len("@file "):]).read_text(encoding="utf-8").strip()
        zone[name.lower()] = [("TXT", value)]
    return zone
