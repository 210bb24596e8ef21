"""HELO checks: Postfix 3.7's reply for each case, exemptions, modes, DNS failures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from mxguard.checks import evaluate, helo
from mxguard.config import Config, DnsConfig, HeloConfig
from mxguard.core.runtime import Runtime
from mxguard.core.transaction import Action, Mode, Stage, Transaction
from mxguard.dns import Resolver
from mxguard.testing.dns import DNSServer

ZONE = {
    "mail.example.test": [("A", "192.0.2.10")],
    "v6.example.test": [("AAAA", "2001:db8::1")],
    "mxonly.example.test": [("MX", (10, "mail.example.test"))],
    "slow.example.test": [("TIMEOUT", None)],
    "broken.example.test": [("SERVFAIL", None)],
    "txtonly.example.test": [("TXT", "hello")],
}


@pytest.fixture(scope="module")
def dns() -> Iterator[DNSServer]:
    with DNSServer(ZONE) as srv:
        yield srv


def runtime(dns: DNSServer, **helo_opts: object) -> Runtime:
    cfg = Config(helo=HeloConfig(**{"exempt_networks": [], **helo_opts}))  # type: ignore[arg-type]
    return Runtime(config=cfg, resolver=Resolver(DnsConfig(nameservers=[dns.address],
                                                           timeout=0.5)))


def tx(name: str, client: str = "203.0.113.5", **kw: str) -> Transaction:
    return Transaction(stage=Stage.RCPT, helo=name, client_address=client, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("name", "reply"), [
    ("foo..example.test", "501 5.5.2 <foo..example.test>: Helo command rejected: Invalid name"),
    ("-bad.example.test", "501 5.5.2 <-bad.example.test>: Helo command rejected: Invalid name"),
    ("bad-.example.test", "501 5.5.2 <bad-.example.test>: Helo command rejected: Invalid name"),
    ("sp ace.example.test", "501 5.5.2 <sp ace.example.test>: Helo command rejected: Invalid name"),
    ("x" * 64 + ".example.test", None),  # filled below: label over 63 characters
    ("[300.1.2.3]", "501 5.5.2 <[300.1.2.3]>: Helo command rejected: Invalid name"),
    ("localhost", "504 5.5.2 <localhost>: Helo command rejected: need fully-qualified hostname"),
    ("exchange", "504 5.5.2 <exchange>: Helo command rejected: need fully-qualified hostname"),
    ("192.0.2.1", "504 5.5.2 <192.0.2.1>: Helo command rejected: need fully-qualified hostname"),
    ("nx.example.test", "450 4.7.1 <nx.example.test>: Helo command rejected: Host not found"),
    ("txtonly.example.test",
     "450 4.7.1 <txtonly.example.test>: Helo command rejected: Host not found"),
    ("server.local", "450 4.7.1 <server.local>: Helo command rejected: Host not found"),
])
async def test_rejections_use_postfix_replies(dns: DNSServer, name: str,
                                              reply: str | None) -> None:
    if reply is None:
        reply = f"501 5.5.2 <{name}>: Helo command rejected: Invalid name"
    result = await helo.check(tx(name), runtime(dns))
    assert result is not None and result.decision is not None
    assert result.decision.reply() == reply
    assert result.symbols


@pytest.mark.parametrize("name", [
    "mail.example.test", "MAIL.Example.Test", "mail.example.test.", "v6.example.test",
    "mxonly.example.test", "[192.0.2.1]", "[IPv6:2001:db8::1]", "under_score.mail.example.test",
])
async def test_good_names_pass(dns: DNSServer, name: str) -> None:
    zone_ok = dict(ZONE)
    zone_ok["under_score.mail.example.test"] = [("A", "192.0.2.11")]
    dns.set_zone(zone_ok)
    try:
        result = await helo.check(tx(name), runtime(dns))
    finally:
        dns.set_zone(ZONE)
    assert result is None or result.decision is None, result


@pytest.mark.parametrize("name", ["slow.example.test", "broken.example.test"])
async def test_dns_failure_defers_never_rejects(dns: DNSServer, name: str) -> None:
    result = await helo.check(tx(name), runtime(dns, unknown_code=550))
    assert result is not None and result.decision is not None
    assert result.decision.action is Action.DEFER
    assert result.decision.code == 450 and result.decision.enhanced.startswith("4.")
    assert [s.name for s in result.symbols] == ["HELO_DNS_TEMPFAIL"]


@pytest.mark.parametrize(("opts", "kw", "exempt"), [
    ({"exempt_networks": ["203.0.113.0/24"]}, {}, True),
    ({"exempt_networks": ["198.51.100.0/24"]}, {}, False),
    ({}, {"sasl_username": "alice"}, True),
    ({"exempt_helo": ["*.local"]}, {}, True),
    ({"exempt_helo": ["*.lan"]}, {}, False),
    ({"exempt_helo": ["*.local@203.0.113.0/24"]}, {}, True),
    ({"exempt_helo": ["*.local@198.51.100.0/24"]}, {}, False),
    ({"exempt_helo": ["*.local@*.partner.example"]}, {"client_name": "gw.partner.example"}, True),
    ({"exempt_helo": ["*.local@*.partner.example"]}, {"client_name": "unknown"}, False),
])
async def test_exemptions(dns: DNSServer, opts: dict[str, object], kw: dict[str, str],
                          exempt: bool) -> None:
    result = await helo.check(tx("exchange.local", **kw), runtime(dns, **opts))
    assert result is not None
    assert (result.decision is None) is exempt


@pytest.mark.parametrize(("mode", "action", "score"), [
    (Mode.ENFORCE, Action.REJECT, 2.0),
    (Mode.SCORE, Action.ACCEPT, 2.0),
    (Mode.OBSERVE, Action.ACCEPT, 0.0),
])
async def test_modes_through_the_pipeline(dns: DNSServer, mode: Mode, action: Action,
                                          score: float) -> None:
    rt = runtime(dns, mode=mode)
    verdict = await evaluate(tx("exchange"), rt, Stage.HELO)
    assert verdict.action is action
    assert verdict.score == score
    assert [s.name for s in verdict.symbols] == ["HELO_NOT_FQDN"]
    assert bool(verdict.observed) is (mode is Mode.OBSERVE)


async def test_switches_turn_single_tests_off(dns: DNSServer) -> None:
    rt = runtime(dns, reject_non_fqdn=False, reject_unknown=False)
    assert await helo.check(tx("exchange"), rt) is None
    assert (await helo.check(tx("a..b"), rt)).decision is not None  # type: ignore[union-attr]


@pytest.mark.parametrize(("name", "known"), [
    ("mail.example.test", True), ("v6.example.test", True), ("mxonly.example.test", True),
    ("txtonly.example.test", False), ("nx.example.test", False),
])
async def test_a_known_name_is_judged_from_the_cache_alike(dns: DNSServer, name: str,
                                                           known: bool) -> None:
    """The second sight of a name reads the three cached answers without a lookup
    and comes to the same verdict as the first, which asked the DNS."""
    resolver = Resolver(DnsConfig(nameservers=[dns.address], timeout=0.5))
    assert await helo.resolves(resolver, name) is known
    asked = resolver.stats.queries
    assert await helo.resolves(resolver, name) is known
    assert resolver.stats.queries == asked  # answered from the cache
    resolver.clear_cache()  # control: nothing cached, so the DNS is asked again
    assert await helo.resolves(resolver, name) is known
    assert resolver.stats.queries == asked + 3


async def test_a_name_partly_cached_is_looked_up(dns: DNSServer) -> None:
    resolver = Resolver(DnsConfig(nameservers=[dns.address], timeout=0.5))
    await resolver.query("mxonly.example.test", "A")  # NODATA, cached; AAAA and MX are not
    assert await helo.resolves(resolver, "mxonly.example.test") is True
    assert resolver.stats.queries == 3


def test_hostname_memo_keeps_only_host_sized_names() -> None:
    long = ("a" * 60 + ".") * 5  # 305 characters: too long for a host name
    before = helo._valid_hostname.cache_info().currsize
    assert helo.valid_hostname(long) is False
    assert helo._valid_hostname.cache_info().currsize == before  # not remembered
    assert helo.valid_hostname("mail.example.test") is True  # control: remembered, same answer
    assert helo.valid_hostname("mail.example.test") is True
