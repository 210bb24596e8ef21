"""The one Resolver: TTL cache, negative caching, TCP fallback, failures, counters."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from mxguard.config import DnsConfig
from mxguard.dns import DnsTempError, Resolver, reverse_name
from mxguard.testing.dns import DNSServer

ZONE = {
    "a.test": [("A", "192.0.2.1"), ("MX", (10, "mx.a.test")), ("TXT", ["v=spf1 ", "-all"])],
    "big.test": [("TXT", f"record number {i} " + "x" * 200) for i in range(6)],
    "slow.test": [("TIMEOUT", None)],
    "bad.test": [("SERVFAIL", None)],
    "alias.test": [("CNAME", "a.test")],
}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def dns() -> Iterator[DNSServer]:
    with DNSServer(ZONE, ttl=300, negative_ttl=60) as srv:
        yield srv


def resolver(dns: DNSServer, clock: Clock | None = None, **kw: object) -> Resolver:
    cfg = DnsConfig(nameservers=[dns.address], timeout=0.5, **kw)  # type: ignore[arg-type]
    return Resolver(cfg, clock=clock) if clock else Resolver(cfg)


async def test_record_shapes(dns: DNSServer) -> None:
    r = resolver(dns)
    assert (await r.query("a.test", "A")).records == ("192.0.2.1",)
    assert (await r.query("a.test", "MX")).records == ((10, "mx.a.test"),)
    assert (await r.query("a.test", "TXT")).records == ("v=spf1 -all",)  # strings joined
    assert (await r.query("alias.test", "A")).records == ("192.0.2.1",)


async def test_nxdomain_and_nodata_are_answers_not_errors(dns: DNSServer) -> None:
    r = resolver(dns)
    nx = await r.query("nothing.test", "A")
    nodata = await r.query("a.test", "AAAA")
    assert (nx.rcode, nx.void) == ("NXDOMAIN", True)
    assert (nodata.rcode, nodata.void) == ("NOERROR", True)
    assert not (await r.query("a.test", "A")).void  # control


@pytest.mark.parametrize(("name", "kind"), [("slow.test", "timeout"), ("bad.test", "servfail")])
async def test_temporary_failures_raise(dns: DNSServer, name: str, kind: str) -> None:
    r = resolver(dns)
    with pytest.raises(DnsTempError) as err:
        await r.query(name, "A")
    assert err.value.kind == kind
    assert r.stats.timeouts + r.stats.servfail == 1


async def test_cache_honours_ttl(dns: DNSServer) -> None:
    clock = Clock()
    r = resolver(dns, clock)
    await r.query("a.test", "A")
    await r.query("A.TEST.", "a")  # same key: case and trailing dot do not matter
    assert len(dns.queries) == 1 and r.stats.cache_hits == 1
    clock.now += 301
    await r.query("a.test", "A")
    assert len(dns.queries) == 2


async def test_negative_answers_cached_for_soa_minimum(dns: DNSServer) -> None:
    clock = Clock()
    r = resolver(dns, clock)
    await r.query("nothing.test", "A")
    await r.query("nothing.test", "A")
    assert len(dns.queries) == 1
    clock.now += 61
    await r.query("nothing.test", "A")
    assert len(dns.queries) == 2


async def test_ttl_zero_is_never_cached() -> None:
    with DNSServer(ZONE, ttl=0, negative_ttl=0) as srv:
        r = resolver(srv)
        await r.query("a.test", "A")
        await r.query("a.test", "A")
        await r.query("nothing.test", "A")
        await r.query("nothing.test", "A")
        assert len(srv.queries) == 4


async def test_cache_off_and_bounded(dns: DNSServer) -> None:
    r = resolver(dns, cache_size=0)
    await r.query("a.test", "A")
    await r.query("a.test", "A")
    assert len(dns.queries) == 2
    small = resolver(dns, cache_size=2)
    for name in ("a.test", "alias.test", "nothing.test"):
        await small.query(name, "A")
    assert len(small._cache) == 2


async def test_truncated_udp_answer_retried_over_tcp(dns: DNSServer) -> None:
    answer = await resolver(dns).query("big.test", "TXT")
    assert len(answer.records) == 6  # > 512 bytes: only TCP can carry it


async def test_identical_queries_in_flight_are_coalesced(dns: DNSServer) -> None:
    r = resolver(dns, cache_size=0)
    results = await asyncio.gather(*(r.query("a.test", "MX") for _ in range(20)))
    assert len({res.records for res in results}) == 1
    assert len(dns.queries) == 1
    assert r.stats.queries == 1


def test_reverse_name() -> None:
    assert reverse_name("192.0.2.1") == "1.2.0.192.in-addr.arpa"
    assert reverse_name("2001:db8::1").endswith(".8.b.d.0.1.0.0.2.ip6.arpa")


async def test_cached_reads_only_unexpired_answers(dns: DNSServer) -> None:
    clock = Clock()
    r = resolver(dns, clock)
    assert r.cached("a.test", "A") is None  # never asked
    await r.query("a.test", "A")
    hit = r.cached("A.TEST.", "a")  # the same key normalisation as query()
    assert hit is not None and hit.records == ("192.0.2.1",)
    assert r.cached("a.test", "MX") is None  # control: another type was not asked
    clock.now += 301
    assert r.cached("a.test", "A") is None  # past its TTL
    queries = r.stats.queries
    await r.query("a.test", "A")
    assert r.stats.queries == queries + 1  # expired: asked again, not served stale
