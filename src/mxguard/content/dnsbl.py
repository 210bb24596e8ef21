"""DNS blocklists: the client IP against DNSBL zones, body URI domains against URIBL zones.

Configured in ``[dnsbl]`` (off by default: public lists need registration and
refuse queries from big public resolvers):

* ``client_zones = ["zen.example.org=5"]`` -- the client address is looked up
  as ``<reversed address>.<zone>`` (IPv4: octets reversed, ``2.0.0.127``;
  IPv6: 32 nibbles reversed, RFC 5782);
* ``uri_zones = ["uribl.example.org=4"]`` -- the registered domain (public
  suffix + 1 label, from ``publicsuffixlist``) of each URI host of the body,
  at most ``max_uris`` distinct domains, as ``<domain>.<zone>``.

All lookups of one message run concurrently through the shared
:class:`mxguard.dns.Resolver` under one budget of ``timeout`` seconds
(``asyncio.timeout``); what has not answered by then counts as not listed.

An ``A`` answer in ``127.0.0.0/8`` other than ``127.0.0.1`` is a listing: the
symbol ``RBL_<ZONE>`` / ``URIBL_<ZONE>`` (zone upper-cased, every run of
other characters ``_``: ``zen.example.org`` -> ``RBL_ZEN_EXAMPLE_ORG``) with the
zone's score (``[scores]`` can override it by symbol name). ``127.255.255.x``
(the lists' "query refused / public resolver / over quota" codes),
``127.0.0.1`` (RFC 5782: never a listing; URIBL's "blocked") and addresses
outside ``127/8`` (a resolver that rewrites NXDOMAIN) are no listing and log
one warning naming the zone.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mxguard.core.transaction import CheckResult, Symbol
from mxguard.dns import DnsTempError, Resolver

if TYPE_CHECKING:
    from mxguard.config import DnsblConfig
    from mxguard.content.mime import ParsedMessage
    from mxguard.core.runtime import Runtime
    from mxguard.core.transaction import Transaction

log = logging.getLogger("mxguard")

_SANITIZE = re.compile(r"[^A-Z0-9]+")
_REFUSED = ipaddress.ip_network("127.255.255.0/24")
_LOOPBACK8 = ipaddress.ip_network("127.0.0.0/8")


class DnsblConfigError(ValueError):
    """A ``zone=score`` entry that cannot be used."""


@dataclass(frozen=True, slots=True)
class Zone:
    zone: str
    score: float
    symbol: str


def symbol_name(prefix: str, zone: str) -> str:
    """``RBL`` + ``zen.example.org`` -> ``RBL_ZEN_EXAMPLE_ORG``."""
    return f"{prefix}_{_SANITIZE.sub('_', zone.upper()).strip('_')}"


def parse_zones(entries: Iterable[str], prefix: str) -> list[Zone]:
    """``["zone=score", ...]`` -> zones; a zone without ``=score`` scores 1.0."""
    zones: list[Zone] = []
    for entry in entries:
        name, sep, score_text = entry.partition("=")
        zone = name.strip().strip(".").lower()
        if not zone or "." not in zone or any(c.isspace() for c in zone):
            raise DnsblConfigError(f"{entry!r}: expected \"zone=score\" with a DNS zone name")
        try:
            score = float(score_text) if sep else 1.0
        except ValueError:
            raise DnsblConfigError(f"{entry!r}: score {score_text.strip()!r} is not a "
                                   "number") from None
        zones.append(Zone(zone, score, symbol_name(prefix, zone)))
    return zones


def ip_query_label(address: str) -> str | None:
    """The DNSBL query prefix of an address: reversed octets / nibbles, None if invalid."""
    try:
        ip = ipaddress.ip_address(address.strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    rev = ip.reverse_pointer  # "4.3.2.1.in-addr.arpa" / "...ip6.arpa"
    return rev.rsplit(".", 2)[0]


def listable_ip(address: str) -> bool:
    """Whether an address can be on a public list (not loopback, private, reserved ...)."""
    try:
        ip = ipaddress.ip_address(address.strip().strip("[]"))
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global


def uri_domains(hosts: Iterable[str], limit: int) -> list[str]:
    """Distinct registered domains of URI hosts, first-seen order, at most ``limit``.
    IP literals and names without a registered domain are skipped."""
    from mxguard.auth.dmarc import default_org_domains

    org = default_org_domains()
    out: dict[str, None] = {}
    for host in hosts:
        if len(out) >= limit:
            break
        name = host.strip().strip("[]").rstrip(".").lower()
        if not name or ":" in name or name.replace(".", "").isdigit():
            continue
        try:
            reg = org.registrable(name)
        except Exception:  # the PSL library on odd input: skip the host
            continue
        if reg and reg not in out:
            out[reg] = None
    return list(out)


@dataclass
class DnsblResult:
    symbols: list[Symbol] = field(default_factory=list)
    queries: int = 0
    timed_out: bool = False
    errors: int = 0  # temporary DNS failures
    refused: list[str] = field(default_factory=list)  # zones that refused / misanswered

    @property
    def reason(self) -> str:
        parts = [f"hits={len(self.symbols)}", f"queries={self.queries}"]
        if self.timed_out:
            parts.append("timeout")
        if self.errors:
            parts.append(f"dns_errors={self.errors}")
        return " ".join(parts)


@dataclass(frozen=True, slots=True)
class _Hit:
    zone: Zone
    name: str
    codes: tuple[str, ...]  # listing codes (127.0.0.x)
    refused: tuple[str, ...]  # answers that are no listing
    error: bool = False


async def _one(resolver: Resolver, zone: Zone, name: str, timeout: float) -> _Hit:
    try:
        answer = await resolver.query(name, "A", timeout=timeout)
    except DnsTempError:
        return _Hit(zone, name, (), (), error=True)
    codes: list[str] = []
    refused: list[str] = []
    for rec in answer.records:
        try:
            ip = ipaddress.IPv4Address(rec)
        except ValueError:
            refused.append(str(rec))
            continue
        if ip in _LOOPBACK8 and ip not in _REFUSED and str(ip) != "127.0.0.1":
            codes.append(str(ip))
        else:
            refused.append(str(ip))
    return _Hit(zone, name, tuple(codes), tuple(refused))


async def lookup(resolver: Resolver, cfg: DnsblConfig, client_ip: str | None,
                 uri_hosts: Iterable[str] = (), *,
                 scores: Mapping[str, float] | None = None) -> DnsblResult:
    """Every configured lookup for one message, concurrently, within ``cfg.timeout``.

    ``scores`` (e.g. ``Config.scores``) overrides a zone's score by symbol name.
    Raises :class:`DnsblConfigError` for a malformed zone entry."""
    result = DnsblResult()
    jobs: list[tuple[Zone, str]] = []
    label = ip_query_label(client_ip) if client_ip and listable_ip(client_ip) else None
    if label:
        jobs += [(z, f"{label}.{z.zone}") for z in parse_zones(cfg.client_zones, "RBL")]
    uri_zones = parse_zones(cfg.uri_zones, "URIBL")
    if uri_zones and cfg.max_uris > 0:
        for domain in uri_domains(uri_hosts, cfg.max_uris):
            jobs += [(z, f"{domain}.{z.zone}") for z in uri_zones]
    if not jobs:
        return result
    result.queries = len(jobs)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + cfg.timeout
    tasks = [asyncio.ensure_future(_one(resolver, z, n, cfg.timeout)) for z, n in jobs]
    hits: list[_Hit] = []
    try:
        async with asyncio.timeout_at(deadline):
            for fut in asyncio.as_completed(tasks):
                hits.append(await fut)
    except TimeoutError:
        result.timed_out = True
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
    overrides = scores or {}
    listed: dict[str, Symbol] = {}
    for hit in sorted(hits, key=lambda h: (h.zone.symbol, h.name)):
        if hit.error:
            result.errors += 1
        if hit.refused:
            result.refused.append(hit.zone.zone)
            log.warning("dnsbl zone=%s query=%s answer=%s: no listing (query refused, "
                        "blocked resolver or rewritten answer)", hit.zone.zone, hit.name,
                        ",".join(hit.refused))
        if hit.codes:
            sym = hit.zone.symbol
            if sym in listed:
                continue
            score = overrides.get(sym, hit.zone.score)
            listed[sym] = Symbol(sym, score, f"{hit.name} {','.join(hit.codes)}")
    result.symbols = list(listed.values())
    return result


async def check(tx: Transaction, rt: Runtime,
                parsed: ParsedMessage | None = None) -> CheckResult | None:
    """The ``dnsbl`` check at end of message: the client IP and the URI hosts of
    ``parsed`` (None: client IP only).
    The caller skips it when ``rt.config.mode("dnsbl")`` is off."""
    cfg = rt.config.dnsbl
    if not (cfg.client_zones or cfg.uri_zones):
        return None
    hosts = [u.host for u in parsed.uris if u.host] if parsed is not None else []
    try:
        res = await lookup(rt.resolver, cfg, tx.client_address, hosts,
                           scores=rt.config.scores)
    except DnsblConfigError as exc:
        log.warning("dnsbl config: %s", exc)
        return CheckResult("dnsbl", reason="config_error")
    return CheckResult("dnsbl", symbols=res.symbols, reason=res.reason, data=res)


__all__ = ["DnsblConfigError", "DnsblResult", "Zone", "check", "ip_query_label", "listable_ip",
           "lookup", "parse_zones", "symbol_name", "uri_domains"]
