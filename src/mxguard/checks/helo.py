"""HELO/EHLO checks with Postfix's semantics and reply codes.

Replaces ``reject_invalid_helo_hostname``, ``reject_non_fqdn_helo_hostname``
and ``reject_unknown_helo_hostname`` (RFC 5321 §4.1.1.1, §2.3.5; replies as
Postfix 3.7 sends them):

* invalid syntax       -> ``501 5.5.2 <name>: Helo command rejected: Invalid name``
* not fully qualified  -> ``504 5.5.2 <name>: Helo command rejected: need
  fully-qualified hostname`` (a bare IP address not in brackets included)
* no A, AAAA or MX     -> ``450 4.7.1 <name>: Helo command rejected: Host not found``
* DNS temporary error  -> deferred, never rejected

Config: ``[helo]`` mode, reject_invalid, reject_non_fqdn, reject_unknown,
unknown_code, exempt_networks, exempt_helo. Symbols: HELO_INVALID,
HELO_NOT_FQDN, HELO_BARE_IP, HELO_UNKNOWN, HELO_DNS_TEMPFAIL.
"""

from __future__ import annotations

import asyncio
import fnmatch
import functools
import ipaddress

from mxguard.config import HeloConfig
from mxguard.core.runtime import Runtime, symbol
from mxguard.core.transaction import Action, CheckResult, Decision, Transaction
from mxguard.dns import DnsTempError, Resolver

NAME = "helo"


def valid_address_literal(name: str) -> bool:
    """``[192.0.2.1]`` or ``[IPv6:2001:db8::1]`` (RFC 5321 §4.1.3)."""
    if not (name.startswith("[") and name.endswith("]")):
        return False
    inner = name[1:-1]
    if inner[:5].lower() == "ipv6:":
        inner = inner[5:]
        try:
            return ipaddress.ip_address(inner).version == 6
        except ValueError:
            return False
    return valid_ipv4(inner)


def valid_ipv4(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).version == 4
    except ValueError:
        return False


def valid_hostname(name: str) -> bool:
    """Postfix's valid_hostname(): letters, digits, '-' and '_' in labels of at
    most 63 characters, no label starting or ending with '-', not all-numeric,
    at most 255 characters; one trailing dot is tolerated."""
    if len(name) > 256:  # too long with or without the dot; never kept in the memo
        return False
    return _valid_hostname(name)


@functools.lru_cache(maxsize=4096)  # a pure function, asked up to three times a request
def _valid_hostname(name: str) -> bool:
    if name.endswith("."):
        name = name[:-1]
    if not name or len(name) > 255:
        return False
    labels = name.split(".")
    for label in labels:
        if not label or len(label) > 63 or label[0] == "-" or label[-1] == "-":
            return False
        if not all(c.isascii() and (c.isalnum() or c in "-_") for c in label):
            return False
    return not all(label.isdigit() for label in labels)


def bare_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _exempt_entry(entry: str, tx: Transaction) -> bool:
    pattern, _, client = entry.partition("@")
    if not fnmatch.fnmatchcase(tx.helo.lower(), pattern.lower()):
        return False
    if not client:
        return True
    ip = tx.client_ip
    try:
        net = ipaddress.ip_network(client, strict=False)
    except ValueError:
        name = tx.client_name.lower()
        return name != "unknown" and fnmatch.fnmatchcase(name, client.lower())
    return ip is not None and ip.version == net.version and ip in net


@functools.lru_cache(maxsize=64)
def _networks(entries: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network,
                                                 ...]:
    """``exempt_networks`` parsed once per list (config validated them)."""
    return tuple(ipaddress.ip_network(net, strict=False) for net in entries)


def exempt(tx: Transaction, cfg: HeloConfig) -> str:
    """Why this client is not checked ("" when it is)."""
    if tx.authenticated:
        return "authenticated"
    ip = tx.client_ip
    for network in _networks(tuple(cfg.exempt_networks)):
        if ip is not None and ip.version == network.version and ip in network:
            return "network"
    if any(_exempt_entry(e, tx) for e in cfg.exempt_helo):
        return "helo-pattern"
    return ""


def _reject(code: int, enhanced: str, name: str, what: str) -> Decision:
    action = Action.REJECT if code >= 500 else Action.DEFER
    return Decision(action, code, enhanced, what, prefix=f"<{name}>: Helo command rejected: ")


def syntax(tx: Transaction, cfg: HeloConfig, rt: Runtime) -> CheckResult | None:
    """The checks that need no DNS; a result when the name fails one."""
    name = tx.helo
    if valid_address_literal(name):
        return None
    if cfg.reject_invalid and not valid_hostname(name) and not bare_address(name):
        return CheckResult(NAME, [symbol(rt, "HELO_INVALID", name)],
                           _reject(501, "5.5.2", name, "Invalid name"), reason="invalid")
    if cfg.reject_non_fqdn and (not valid_hostname(name) or "." not in name.rstrip(".")):
        sym = "HELO_BARE_IP" if bare_address(name) else "HELO_NOT_FQDN"
        return CheckResult(NAME, [symbol(rt, sym, name)],
                           _reject(504, "5.5.2", name, "need fully-qualified hostname"),
                           reason="not-fqdn")
    return None


async def resolves(resolver: Resolver, name: str) -> bool:
    """True when ``name`` has an A, AAAA or MX record (Postfix's test).

    When all three answers are cached (a known HELO name: most requests), they
    are read without starting a lookup, so the check does not wait at all."""
    cached = [resolver.cached(name, t) for t in ("A", "AAAA", "MX")]
    if None not in cached:
        return any(a.records for a in cached if a is not None)
    answers = await asyncio.gather(*(resolver.query(name, t) for t in ("A", "AAAA", "MX")))
    return any(a.records for a in answers)


async def check(tx: Transaction, rt: Runtime) -> CheckResult | None:
    cfg = rt.config.helo
    if not tx.helo:
        return None  # smtpd_helo_required is Postfix's job
    why = exempt(tx, cfg)
    if why:
        return CheckResult(NAME, reason=f"exempt:{why}")
    result = syntax(tx, cfg, rt)
    if result is not None or not cfg.reject_unknown or valid_address_literal(tx.helo):
        return result
    name = tx.helo.rstrip(".")
    if not valid_hostname(name):
        return None
    try:
        found = await resolves(rt.resolver, name)
    except DnsTempError as exc:
        decision = Decision(Action.DEFER, 450, "4.7.1",
                            f"Host not found (temporary DNS failure: {exc.kind}), "
                            "try again later", prefix=f"<{tx.helo}>: Helo command rejected: ")
        return CheckResult(NAME, [symbol(rt, "HELO_DNS_TEMPFAIL", exc.kind)], decision,
                           reason="dns-tempfail")
    if found:
        return CheckResult(NAME, reason="ok")
    enhanced = "4.7.1" if cfg.unknown_code < 500 else "5.7.1"
    return CheckResult(NAME, [symbol(rt, "HELO_UNKNOWN", tx.helo)],
                       _reject(cfg.unknown_code, enhanced, tx.helo, "Host not found"),
                       reason="unknown")
