"""Load the openspf SPF test suites and turn their zonedata into zones for
:mod:`mxguard.testing.dns`.

The suites (``tests/data/spf/rfc7208-tests.yml`` and
``rfc4408-tests.yml``; see tests/data/PROVENANCE.md) are YAML documents, one per
scenario: ``tests`` (name -> helo, host, mailfrom, result, [explanation]) and
``zonedata`` (name -> list of ``{TYPE: value}`` or the bare word ``TIMEOUT``).

Conversion rules (the suite's conventions, see the comments at the top of
rfc7208-tests.yml):

* ``SPF`` entries are served as type SPF (99) *and*, when the name has no
  ``TXT`` entry at all, copied to TXT ("auto-magic duplication of SPF to TXT
  records by test suite drivers"). ``TXT: NONE`` means "no TXT record", and
  also stops that copying.
* A TXT/SPF value is one string or a list of strings (one record of several
  character-strings). Characters written as ``\\xNN`` in the YAML are served
  as those raw bytes. A record with no strings at all (``SPF: []``) cannot
  be parsed by dnspython (the whole answer is dropped), and no zone file can
  express it, so it is served as one empty string.
* ``TIMEOUT``: queries for the name stay unanswered -- except for record
  types the name actually has, which are answered (``spftimeout``: TXT
  answers, the SPF query times out).
* ``MX: [pref, host]`` -> ``(pref, host)``; an empty host is the root (null MX).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mxguard.testing.dns import Zone
from tests.support import DATA

SUITES = {"rfc7208": "rfc7208-tests.yml", "rfc4408": "rfc4408-tests.yml"}
EXPECTED_COUNTS = {"rfc7208": 203, "rfc4408": 191}
RECORD_TYPES = ("A", "AAAA", "MX", "PTR", "TXT", "SPF", "CNAME")


def suite_path(suite: str) -> Path:
    return DATA / "spf" / SUITES[suite]


@dataclass(frozen=True)
class Case:
    suite: str
    scenario: int  # index of the YAML document
    scenario_name: str
    name: str
    helo: str
    host: str
    mailfrom: str
    results: tuple[str, ...]
    explanation: str | None = None

    @property
    def id(self) -> str:
        return f"{self.suite}/{self.scenario_name}/{self.name}"


@dataclass
class Scenario:
    suite: str
    index: int
    name: str
    zone: Zone
    cases: list[Case] = field(default_factory=list)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _wire(value: str) -> bytes:
    """One character-string: ``\\xNN`` escapes from the YAML as raw bytes."""
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8")


def _txt(value: Any) -> list[bytes]:
    strings = [value] if isinstance(value, str) else list(value)
    out: list[bytes] = []
    for s in strings:
        raw = _wire(str(s))
        out.extend(raw[i:i + 255] for i in range(0, len(raw), 255))
        if not raw:
            out.append(b"")
    return out or [b""]


def _entries(records: list[Any]) -> tuple[list[tuple[str, Any]], bool, set[str]]:
    """(records, has TIMEOUT, types written, incl. NONE ones)."""
    out: list[tuple[str, Any]] = []
    timeout, written = False, set()
    for entry in records:
        if entry == "TIMEOUT":
            timeout = True
            continue
        for rtype, value in entry.items():
            written.add(rtype)
            if value == "NONE":
                continue
            if rtype in ("TXT", "SPF"):
                out.append((rtype, _txt(value)))
            elif rtype == "MX":
                out.append(("MX", (int(value[0]), value[1] or ".")))
            else:
                out.append((rtype, str(value)))
    return out, timeout, written


def convert_records(records: list[Any]) -> list[tuple[str, Any]]:
    """One name's suite records -> dnsserver records (rules in the module doc)."""
    out, timeout, written = _entries(records)
    if "TXT" not in written:
        out.extend(("TXT", v) for t, v in list(out) if t == "SPF")
    if timeout:
        present = {t for t, _ in out}
        if not present:
            out.append(("TIMEOUT", None))
        out.extend(("TIMEOUT", t) for t in RECORD_TYPES if t not in present)
    return out


def convert_zone(zonedata: dict[str, list[Any]] | None) -> Zone:
    return {name: convert_records(recs or []) for name, recs in (zonedata or {}).items()}


def _case(suite: str, index: int, scenario: str, name: str, t: dict[str, Any]) -> Case:
    expected = t["result"]
    results = tuple(expected) if isinstance(expected, list) else (expected,)
    return Case(suite, index, scenario, name, str(t.get("helo", "")), str(t["host"]),
                str(t.get("mailfrom", "")), results, t.get("explanation"))


def load_suite(suite: str) -> list[Scenario]:
    """All scenarios of a suite."""
    path = suite_path(suite)
    with path.open(encoding="utf-8") as fh:
        docs = [d for d in yaml.safe_load_all(fh) if d]
    scenarios = []
    for index, doc in enumerate(docs):
        name = _slug(doc.get("description", f"scenario-{index}"))
        sc = Scenario(suite, index, name, convert_zone(doc.get("zonedata")))
        sc.cases = [_case(suite, index, name, n, t) for n, t in doc["tests"].items()]
        scenarios.append(sc)
    return scenarios
