"""The one async DNS Resolver every check uses.

Built on dnspython's async resolver (nameservers and port from ``[dns]``,
TCP fallback on truncation is dnspython's). We add what checks need:

* a TTL-honouring cache (TTL 0 is never cached) with negative caching from the
  SOA of negative answers, bounded in size;
* coalescing of identical in-flight queries;
* one answer shape (:class:`Answer`): ``NOERROR`` with records (possibly none:
  NODATA) or ``NXDOMAIN``; temporary failures raise :class:`DnsTempError`;
* counters for metrics.

Records come back as plain Python values: addresses and names as ``str``
(no trailing dot), TXT as one ``str`` per record (its strings joined),
MX as ``(preference, exchange)``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rcode
import dns.rdatatype
import dns.resolver

from mxguard.config import DnsConfig, split_hostport


class DnsTempError(Exception):
    """A temporary DNS failure (timeout, SERVFAIL, refused, network)."""

    def __init__(self, name: str, rdtype: str, kind: str) -> None:
        super().__init__(f"{kind} looking up {name}/{rdtype}")
        self.name, self.rdtype, self.kind = name, rdtype, kind


@dataclass(frozen=True, slots=True)
class Answer:
    name: str
    rdtype: str
    rcode: str  # "NOERROR" | "NXDOMAIN"
    records: tuple[Any, ...] = ()
    ttl: int = 0

    @property
    def void(self) -> bool:
        """NXDOMAIN or an empty answer (RFC 7208 §4.6.4 "void lookup")."""
        return not self.records


@dataclass
class ResolverStats:
    queries: int = 0
    cache_hits: int = 0
    nxdomain: int = 0
    nodata: int = 0
    timeouts: int = 0
    servfail: int = 0
    by_type: dict[str, int] = field(default_factory=dict)


def _text(name: dns.name.Name | str) -> str:
    return str(name).rstrip(".") or "."


def _convert(rdtype: str, rdata: Any) -> Any:
    if rdtype in ("A", "AAAA"):
        return rdata.address
    if rdtype == "TXT" or rdtype == "SPF":
        return b"".join(rdata.strings).decode("utf-8", "surrogateescape")
    if rdtype == "MX":
        return (int(rdata.preference), _text(rdata.exchange))
    if rdtype in ("PTR", "CNAME", "NS"):
        return _text(rdata.target)
    return rdata.to_text()


def _negative_ttl(response: dns.message.Message | None, cap: int) -> int:
    if response is None:
        return 0
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA:
            return int(min(rrset.ttl, rrset[0].minimum, cap))
    return 0


def reverse_name(ip: str) -> str:
    """``192.0.2.1`` -> ``1.2.0.192.in-addr.arpa``."""
    return ipaddress.ip_address(ip).reverse_pointer


class Resolver:
    """Async DNS with cache. ``nameservers`` empty means /etc/resolv.conf."""

    def __init__(self, cfg: DnsConfig | None = None, *, clock: Any = time.monotonic) -> None:
        cfg = cfg or DnsConfig()
        self.timeout = cfg.timeout
        self.cache_size = cfg.cache_size
        self.negative_ttl_max = cfg.negative_ttl_max
        self._clock = clock
        if cfg.nameservers:
            self._res = dns.asyncresolver.Resolver(configure=False)
            servers: list[str | dns.nameserver.Nameserver] = []
            for ns in cfg.nameservers:
                host, port = split_hostport(ns, 53)
                servers.append(dns.nameserver.Do53Nameserver(host, port))
            self._res.nameservers = servers
        else:
            self._res = dns.asyncresolver.Resolver(configure=True)
        self._res.timeout = cfg.timeout
        self._res.lifetime = cfg.timeout
        self._res.cache = None  # our own cache honours TTL 0 and negative answers
        self._cache: OrderedDict[tuple[str, str], tuple[float, Answer]] = OrderedDict()
        self._inflight: dict[tuple[str, str], asyncio.Future[Answer]] = {}
        self.stats = ResolverStats()

    async def query(self, name: str, rdtype: str, *, timeout: float | None = None) -> Answer:
        """Look up ``name``/``rdtype``; raises :class:`DnsTempError` on temporary failure."""
        key = (name.lower().rstrip("."), rdtype.upper())
        hit = self._cache.get(key)
        if hit is not None:
            if hit[0] > self._clock():
                self.stats.cache_hits += 1
                self._cache.move_to_end(key)
                return hit[1]
            del self._cache[key]
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            answer = await self._lookup(key[0], key[1], timeout or self.timeout)
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # mark retrieved: waiters may be none
            raise
        else:
            fut.set_result(answer)
            self._store(key, answer)
            return answer
        finally:
            del self._inflight[key]

    def cached(self, name: str, rdtype: str) -> Answer | None:
        """The cached, unexpired answer for ``name``/``rdtype``, or None; no query
        and no wait (a check that has all it needs cached need not suspend)."""
        key = (name.lower().rstrip("."), rdtype.upper())
        hit = self._cache.get(key)
        if hit is None or hit[0] <= self._clock():
            return None
        self.stats.cache_hits += 1
        self._cache.move_to_end(key)
        return hit[1]

    def _store(self, key: tuple[str, str], answer: Answer) -> None:
        if self.cache_size <= 0 or answer.ttl <= 0:
            return
        self._cache[key] = (self._clock() + answer.ttl, answer)
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    async def _lookup(self, name: str, rdtype: str, timeout: float) -> Answer:
        self.stats.queries += 1
        self.stats.by_type[rdtype] = self.stats.by_type.get(rdtype, 0) + 1
        try:
            ans = await self._res.resolve(name + ".", rdtype, raise_on_no_answer=False,
                                          lifetime=timeout, search=False)
        except dns.resolver.NXDOMAIN as exc:
            self.stats.nxdomain += 1
            responses = exc.responses()  # type: ignore[no-untyped-call]
            resp = next(iter(responses.values()), None) if responses else None
            return Answer(name, rdtype, "NXDOMAIN", (),
                          _negative_ttl(resp, self.negative_ttl_max))
        except (dns.exception.Timeout, dns.resolver.LifetimeTimeout):
            self.stats.timeouts += 1
            raise DnsTempError(name, rdtype, "timeout") from None
        except dns.resolver.NoNameservers:
            self.stats.servfail += 1
            raise DnsTempError(name, rdtype, "servfail") from None
        except dns.resolver.YXDOMAIN:
            return Answer(name, rdtype, "NXDOMAIN", ())
        except (dns.exception.DNSException, OSError, ValueError) as exc:
            self.stats.servfail += 1
            raise DnsTempError(name, rdtype, type(exc).__name__) from None
        if ans.rrset is None:
            self.stats.nodata += 1
            return Answer(name, rdtype, "NOERROR", (),
                          _negative_ttl(ans.response, self.negative_ttl_max))
        records = tuple(_convert(rdtype, rd) for rd in ans.rrset)
        return Answer(name, rdtype, "NOERROR", records, int(ans.rrset.ttl))

    # ------------------------------------------------------------ helpers

    async def addresses(self, name: str) -> tuple[list[str], bool]:
        """A and AAAA of ``name``: (addresses, nxdomain)."""
        a, aaaa = await asyncio.gather(self.query(name, "A"), self.query(name, "AAAA"))
        return [*a.records, *aaaa.records], a.rcode == "NXDOMAIN"

    def clear_cache(self) -> None:
        self._cache.clear()
