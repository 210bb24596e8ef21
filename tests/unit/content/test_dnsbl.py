"""DNS blocklists against the loopback DNS server: client IP (v4, v6) and URI
domains, listing codes, refusal codes, the timeout budget, the check."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from mxguard.config import Config, DnsblConfig, DnsConfig
from mxguard.content.dnsbl import (
    DnsblConfigError,
    check,
    ip_query_label,
    listable_ip,
    lookup,
    parse_zones,
    symbol_name,
    uri_domains,
)
from mxguard.core.transaction import Transaction
from mxguard.dns import Resolver
from mxguard.testing.dns import DNSServer

LISTED_V4 = "203.0.113.7"  # TEST-NET-3 addresses are not "global": see listable_ip
ZONE = {
    # client zone bl.test: 8.8.8.8 listed (127.0.0.2), 1.1.1.1 not
    "8.8.8.8.bl.test": [("A", "127.0.0.2"), ("A", "127.0.0.4")],
    "9.9.9.9.bl.test": [("A", "127.255.255.254")],  # "public resolver" refusal
    "4.4.8.8.bl.test": [("A", "127.0.0.1")],  # never a listing (RFC 5782)
    "4.4.4.4.bl.test": [("A", "198.51.100.1")],  # rewritten NXDOMAIN
    "8.8.8.8.other.test": [("A", "127.0.0.10")],
    "1.1.1.1.slow.test": [("TIMEOUT", None)],
    "8.8.8.8.slow.test": [("TIMEOUT", None)],
    # 2001:4860:4860::8888 listed
    # 2001:4860:4860:0000:0000:0000:0000:8888, nibbles reversed
    "8.8.8.8" + ".0" * 16 + ".0.6.8.4.0.6.8.4.1.0.0.2.bl.test": [("A", "127.0.0.3")],
    # URI zone uri.test
    "spammer.example.uri.test": [("A", "127.0.0.2")],
    "other.co.uk.uri.test": [("A", "127.0.0.8")],
}


@pytest.fixture(scope="module")
def dns() -> Iterator[DNSServer]:
    with DNSServer(ZONE) as srv:
        yield srv


def resolver(dns: DNSServer) -> Resolver:
    return Resolver(DnsConfig(nameservers=[dns.address], timeout=2.0, cache_size=0))


def cfg(**kw: object) -> DnsblConfig:
    base: dict[str, object] = {"client_zones": ["bl.test=3.5"], "uri_zones": ["uri.test=4"],
                               "timeout": 2.0}
    base.update(kw)
    return DnsblConfig(**base)  # type: ignore[arg-type]


# ------------------------------------------------------------ pure helpers


@pytest.mark.parametrize(("ip", "label"), [
    ("192.0.2.1", "1.2.0.192"),
    ("::ffff:192.0.2.1", "1.2.0.192"),
    ("2001:db8::1", "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2"),
    ("[2001:db8::1]", "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2"),
    ("not-an-ip", None),
    ("", None),
])
def test_ip_query_label(ip: str, label: str | None) -> None:
    assert ip_query_label(ip) == label


@pytest.mark.parametrize(("ip", "ok"), [
    ("8.8.8.8", True), ("2001:4860:4860::8888", True),
    ("127.0.0.1", False), ("10.1.2.3", False), ("192.168.1.1", False), ("::1", False),
    ("fe80::1", False), (LISTED_V4, False), ("garbage", False),
])
def test_listable_ip(ip: str, ok: bool) -> None:
    assert listable_ip(ip) is ok


@pytest.mark.parametrize(("entries", "expected"), [
    (["zen.example.org=5"], [("zen.example.org", 5.0, "RBL_ZEN_EXAMPLE_ORG")]),
    ([" B-L.Example.NET. = 1.5 "], [("b-l.example.net", 1.5, "RBL_B_L_EXAMPLE_NET")]),
    (["bl.example"], [("bl.example", 1.0, "RBL_BL_EXAMPLE")]),
])
def test_parse_zones(entries: list[str], expected: list[tuple[str, float, str]]) -> None:
    assert [(z.zone, z.score, z.symbol) for z in parse_zones(entries, "RBL")] == expected


@pytest.mark.parametrize("bad", ["=5", "nodots=2", "zone.example=lots", "two words.example=1"])
def test_parse_zones_rejects(bad: str) -> None:
    with pytest.raises(DnsblConfigError):
        parse_zones([bad], "RBL")


def test_symbol_name_sanitised() -> None:
    assert symbol_name("URIBL", "multi.uribl.com") == "URIBL_MULTI_URIBL_COM"
    assert symbol_name("RBL", "..odd__zone!.test") == "RBL_ODD_ZONE_TEST"


def test_uri_domains_registered_and_bounded() -> None:
    hosts = ["www.spammer.example", "a.b.spammer.example", "shop.other.co.uk", "192.0.2.1",
             "[2001:db8::1]", "localhost", "x.y.z.example", "third.example"]
    assert uri_domains(hosts, 10) == ["spammer.example", "other.co.uk", "z.example",
                                      "third.example"]
    assert uri_domains(hosts, 2) == ["spammer.example", "other.co.uk"]
    assert uri_domains(hosts, 0) == []


# ------------------------------------------------------------ lookups


@pytest.mark.parametrize(("client", "symbols", "detail"), [
    ("8.8.8.8", {"RBL_BL_TEST"}, "127.0.0.2,127.0.0.4"),
    ("2001:4860:4860::8888", {"RBL_BL_TEST"}, "127.0.0.3"),
    ("1.1.1.1", set(), ""),  # not listed: control
    ("127.0.0.1", set(), ""),  # loopback: never looked up
])
async def test_client_lookup(dns: DNSServer, client: str, symbols: set[str],
                             detail: str) -> None:
    res = await lookup(resolver(dns), cfg(uri_zones=[]), client)
    assert {s.name for s in res.symbols} == symbols
    if symbols:
        assert res.symbols[0].score == 3.5 and detail in res.symbols[0].detail


@pytest.mark.parametrize("client", ["9.9.9.9", "8.8.4.4", "4.4.4.4"])
async def test_refusal_codes_are_no_listing_and_warn(dns: DNSServer, client: str,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="mxguard"):
        res = await lookup(resolver(dns), cfg(uri_zones=[]), client)
    assert res.symbols == []
    assert res.refused == ["bl.test"]
    assert "zone=bl.test" in caplog.text


async def test_uri_lookup(dns: DNSServer) -> None:
    hosts = ["www.spammer.example", "clean.example", "mail.other.co.uk", "spammer.example"]
    res = await lookup(resolver(dns), cfg(client_zones=[]), None, hosts)
    assert [s.name for s in res.symbols] == ["URIBL_URI_TEST"]  # once per zone
    assert res.symbols[0].score == 4.0
    assert res.queries == 3  # distinct registered domains


async def test_max_uris_bounds_queries(dns: DNSServer) -> None:
    hosts = [f"h{i}.example" for i in range(50)] + ["spammer.example"]
    res = await lookup(resolver(dns), cfg(client_zones=[], max_uris=5), None, hosts)
    assert res.queries == 5 and res.symbols == []


async def test_several_zones_and_score_override(dns: DNSServer) -> None:
    c = cfg(client_zones=["bl.test=3.5", "other.test=1"], uri_zones=[])
    res = await lookup(resolver(dns), c, "8.8.8.8", scores={"RBL_OTHER_TEST": 0.25})
    assert {(s.name, s.score) for s in res.symbols} == {("RBL_BL_TEST", 3.5),
                                                        ("RBL_OTHER_TEST", 0.25)}


async def test_one_timeout_budget_for_all_lookups(dns: DNSServer) -> None:
    c = cfg(client_zones=["bl.test=3", "slow.test=2"], uri_zones=["uri.test=4"], timeout=0.3)
    t = time.monotonic()
    res = await lookup(resolver(dns), c, "8.8.8.8", ["spammer.example"])
    elapsed = time.monotonic() - t
    assert elapsed < 1.5  # the budget, not one query timeout per zone
    assert res.timed_out or res.errors
    # answers that arrived in time still count
    assert {s.name for s in res.symbols} == {"RBL_BL_TEST", "URIBL_URI_TEST"}


async def test_nothing_configured_means_no_queries(dns: DNSServer) -> None:
    before = len(dns.queries)
    res = await lookup(resolver(dns), DnsblConfig(), "8.8.8.8", ["spammer.example"])
    assert res.queries == 0 and res.symbols == []
    assert len(dns.queries) == before


def test_off_by_default() -> None:
    assert DnsblConfig().mode.value == "off"
    assert DnsblConfig().client_zones == [] and DnsblConfig().uri_zones == []


# ------------------------------------------------------------ the check


def runtime(dns: DNSServer, dnsbl: DnsblConfig) -> SimpleNamespace:
    return SimpleNamespace(config=Config(dnsbl=dnsbl), resolver=resolver(dns))


async def test_check_uses_client_and_parsed_uris(dns: DNSServer) -> None:
    tx = Transaction(client_address="8.8.8.8")
    parsed = SimpleNamespace(uris=[SimpleNamespace(host="www.spammer.example")])
    res = await check(tx, runtime(dns, cfg()), parsed)  # type: ignore[arg-type]
    assert res is not None and res.check == "dnsbl"
    assert {s.name for s in res.symbols} == {"RBL_BL_TEST", "URIBL_URI_TEST"}
    assert "hits=2" in res.reason
    control = await check(tx, runtime(dns, cfg()))  # type: ignore[arg-type]
    assert control is not None and {s.name for s in control.symbols} == {"RBL_BL_TEST"}


async def test_check_without_zones_does_nothing(dns: DNSServer) -> None:
    tx = Transaction(client_address="8.8.8.8")
    assert await check(tx, runtime(dns, DnsblConfig())) is None  # type: ignore[arg-type]


async def test_check_bad_zone_entry_is_logged_not_raised(
        dns: DNSServer, caplog: pytest.LogCaptureFixture) -> None:
    tx = Transaction(client_address="8.8.8.8")
    with caplog.at_level(logging.WARNING, logger="mxguard"):
        res = await check(tx, runtime(dns, cfg(client_zones=["=3"])))  # type: ignore[arg-type]
    assert res is not None and res.symbols == [] and res.reason == "config_error"
    assert "dnsbl config" in caplog.text


async def test_check_with_parsed_message(dns: DNSServer) -> None:
    from mxguard.content.mime import parse_message

    parsed = parse_message(b"Subject: x\r\n\r\nsee http://www.spammer.example/offer\r\n")
    tx = Transaction(client_address="1.1.1.1")  # not listed: only the URI hits
    res = await check(tx, runtime(dns, cfg()), parsed)  # type: ignore[arg-type]
    assert res is not None and [s.name for s in res.symbols] == ["URIBL_URI_TEST"]
