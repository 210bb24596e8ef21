"""``mxguard dns check``'s DMARC section against RFC 9989, on the loopback DNS:
removed tags, p=, t=, rua= and the authorization record of an external
rua= destination (RFC 9990), the record the tree walk finds (RFC 9989
§4.10.1). Each warning has a control domain that does not get it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from mxguard.auth.spf_lint import Lint
from mxguard.cli import dns as dns_cli
from mxguard.cli import main
from mxguard.config import DnsConfig
from mxguard.dns import Resolver
from mxguard.testing.dns import DNSServer, Zone

GOOD = "v=DMARC1; p=reject; rua=mailto:agg@good.example"
ZONE: Zone = {
    "_dmarc.good.example": [("TXT", GOOD)],
    "_dmarc.old.example": [("TXT", "v=DMARC1; p=reject; pct=50; rf=afrf; ri=3600; "
                                   "rua=mailto:agg@old.example")],
    "_dmarc.nop.example": [("TXT", "v=DMARC1; rua=mailto:agg@nop.example")],
    "_dmarc.norua.example": [("TXT", "v=DMARC1; p=reject")],
    "_dmarc.trial.example": [("TXT", "v=DMARC1; p=reject; t=y; rua=mailto:agg@trial.example")],
    "_dmarc.ext.example": [("TXT", "v=DMARC1; p=reject; rua=mailto:d@reports.test")],
    "_dmarc.authz.example": [("TXT", "v=DMARC1; p=reject; rua=mailto:d@reports.test")],
    "authz.example._report._dmarc.reports.test": [("TXT", "v=DMARC1")],
    "_dmarc.sub.example": [("TXT", "v=DMARC1; p=reject; rua=mailto:d@mail.sub.example")],
    "_dmarc.org.example": [("TXT", GOOD)],
    "_dmarc.tw.example": [("TIMEOUT", None)],
}


@pytest.fixture(scope="module")
def dns() -> Iterator[DNSServer]:
    with DNSServer(ZONE) as srv:
        yield srv


def dmarc_lines(dns: DNSServer, domain: str) -> list[str]:
    resolver = Resolver(DnsConfig(nameservers=[dns.address], timeout=0.3, cache_size=0))
    lint = Lint()
    asyncio.run(dns_cli._dmarc_section(resolver, domain, lint))
    return lint.lines


def has(lines: list[str], level: str, text: str) -> bool:
    return any(line.startswith(level) and text in line for line in lines)


@pytest.mark.parametrize(("domain", "level", "text", "present"), [
    # RFC 9989 §4.7: pct, rf, ri are no longer tags
    ("old.example", "WARN", "pct= was removed by RFC 9989", True),
    ("old.example", "WARN", "rf= was removed by RFC 9989", True),
    ("old.example", "WARN", "ri= was removed by RFC 9989", True),
    ("good.example", "WARN", "was removed by RFC 9989", False),  # control
    # RFC 9989 §4.7: no p= reads as p=none
    ("nop.example", "WARN", "no p=", True),
    ("good.example", "WARN", "no p=", False),  # control
    ("norua.example", "WARN", "no rua=", True),
    ("good.example", "WARN", "no rua=", False),  # control
    ("trial.example", "WARN", "t=y: test mode", True),
    ("good.example", "WARN", "t=y", False),  # control
    # RFC 9990: an external destination must authorize the domain
    ("ext.example", "WARN", "external destination without authorization record", True),
    ("authz.example", "PASS", "reports.test accepts reports for authz.example", True),
    ("authz.example", "WARN", "without authorization", False),  # control: published
    ("sub.example", "WARN", "without authorization", False),  # control: same org domain
    # RFC 9989 §4.10.1: a subdomain is covered by its organizational domain's record
    ("a.b.org.example", "PASS", "the record of org.example applies to a.b.org.example", True),
    ("nowhere.example", "FAIL", "no DMARC record", True),
    ("a.tw.example", "FAIL", "DMARC tree walk", True),
])
def test_dmarc_lint(dns: DNSServer, domain: str, level: str, text: str,
                    present: bool) -> None:
    lines = dmarc_lines(dns, domain)
    assert has(lines, level, text) is present, lines


def test_fix_names_the_authorization_record(dns: DNSServer) -> None:
    lines = dmarc_lines(dns, "ext.example")
    assert any('ext.example._report._dmarc.reports.test. IN TXT "v=DMARC1"' in line
               for line in lines), lines


def test_dns_check_command_prints_the_lint(dns: DNSServer, tmp_path: Path) -> None:
    """The command shows the RFC 9989 warnings (control: a clean record shows none)
    and exits 1 on FAIL lines (the test zone has no SPF or MX)."""
    cfg = tmp_path / "mxguard.toml"
    cfg.write_text(f'[dns]\nnameservers = ["{dns.address}"]\ntimeout = 0.3\n')
    runner = CliRunner()
    old = runner.invoke(main, ["dns", "check", "old.example", "--config", str(cfg)])
    assert "pct= was removed by RFC 9989" in old.output, old.output
    assert old.exit_code == 1 and "Traceback" not in old.output
    good = runner.invoke(main, ["dns", "check", "good.example", "--config", str(cfg)])
    assert "removed by RFC 9989" not in good.output
