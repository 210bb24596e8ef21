"""The eval registry (:data:`EVALS`, :func:`register`), the :class:`ScanContext`
evals read, and the helpers (addresses, domains, numeric arguments) the eval
families share."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from mxguard.content.mime import ParsedMessage, rendered_body

EvalFn = Callable[..., bool | int]
EVALS: dict[str, EvalFn] = {}
# Evals that need the network (DNS blocklists, Razor, Pyzor, DCC): never run here.
NET_EVALS = frozenset((
    "check_rbl", "check_rbl_sub", "check_rbl_txt", "check_uridnsbl", "check_rbl_from_host",
    "check_rbl_from_domain", "check_rbl_envfrom", "check_rbl_headers", "check_rbl_ns_from",
    "check_razor2", "check_razor2_range", "check_pyzor", "check_dcc", "check_dcc_reputation_range",
    "check_dns_sender", "check_askdns", "check_uri_host_in_blocklist", "check_hashbl_bodyre",
))


def register(name: str) -> Callable[[EvalFn], EvalFn]:
    def deco(fn: EvalFn) -> EvalFn:
        EVALS[name] = fn
        return fn
    return deco


class DomainSet(frozenset[str]):
    """A domain list (``url_shortener``, ``freemail_domains``, ``enlist_uri_host``)
    that knows its deepest entry (``depth``, in labels), so a lookup walks only
    that many labels of a host, however many labels the host has."""

    depth: int

    def __new__(cls, domains: Iterable[str] = ()) -> DomainSet:
        self = super().__new__(cls, domains)
        self.depth = max((d.count(".") + 1 for d in self), default=0)
        return self


@dataclass
class RuleLists:
    """List settings from the rule files that evals use."""

    url_shorteners: frozenset[str] = DomainSet()
    freemail_domains: frozenset[str] = DomainSet()
    uri_host_lists: dict[str, frozenset[str]] = field(default_factory=dict)


@dataclass
class ScanContext:
    """One message being scanned: parsed MIME, the transaction (or None in
    ``mxguard scan``), the clock, a Bayes probability if known, caches."""

    msg: ParsedMessage
    tx: Any = None
    now: float = field(default_factory=time.time)
    bayes_prob: float | None = None
    lists: RuleLists = field(default_factory=RuleLists)
    cache: dict[str, Any] = field(default_factory=dict)

    def memo(self, key: str, fn: Callable[[], Any]) -> Any:
        if key not in self.cache:
            self.cache[key] = fn()
        return self.cache[key]

    @property
    def body(self) -> str:
        value: str = self.memo("body", lambda: rendered_body(self.msg))
        return value

    def result(self, check: str) -> Any:
        results = getattr(self.tx, "results", None) or {}
        return results.get(check)

    def result_extra(self, check: str, key: str) -> str:
        res = self.result(check)
        extra = getattr(res, "extra", None) or {}
        return str(extra.get(key, "")).lower()

    @property
    def envelope_from(self) -> str:
        sender = getattr(self.tx, "sender", None)
        if sender is not None and self.tx is not None:
            return str(sender)
        rp = self.msg.first("Return-Path")
        return address(rp) if rp else ""


# ------------------------------------------------------------------ helpers


ADDRESS_WINDOW = 4096  # characters of a header value parsed first for its first address


def _addresses(value: str, want_at: bool) -> list[tuple[str, str]]:
    """``getaddresses`` of ``value``, or of its first :data:`ADDRESS_WINDOW`
    characters when that already holds a complete first address (a pair
    followed by another): the evals read only the first address, and a
    To: of 100,000 recipients must not be parsed again by every eval."""
    try:
        if len(value) > ADDRESS_WINDOW:
            pairs = email.utils.getaddresses([value[:ADDRESS_WINDOW]])
            for i, (_, addr) in enumerate(pairs[:-1]):
                if "@" in addr or (not want_at and i == 0):
                    return pairs[i:i + 1]
        return email.utils.getaddresses([value])
    except Exception:
        return []


def address(value: str) -> str:
    """The first address of a header value (lower case), '' if none."""
    for _, addr in _addresses(value, True):
        if "@" in addr:
            return addr.strip().lower()
    return ""


def display_name(value: str) -> str:
    pairs = _addresses(value, False)
    return pairs[0][0].strip() if pairs else ""


def domain_of(addr: str) -> str:
    return addr.rpartition("@")[2].strip().rstrip(".>").lower() if "@" in addr else ""


def org_domain(host: str) -> str:
    """Registrable domain via the public suffix list (the last two labels if
    the list cannot be loaded)."""
    host = host.strip(".").lower()
    if not host or host.replace(".", "").isdigit() or ":" in host:
        return host
    psl = _psl()
    if psl is not None:
        value: str | None = psl.privatesuffix(host)
        if value:
            return value
    return ".".join(host.split(".")[-2:])


_PSL: list[Any] = []


def _psl() -> Any:
    if not _PSL:
        try:
            from publicsuffixlist import PublicSuffixList

            _PSL.append(PublicSuffixList())
        except Exception:
            _PSL.append(None)
    return _PSL[0]


def num(value: str, default: float = 0.0) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def in_domain_list(domain: str, domains: frozenset[str]) -> bool:
    """``domain`` or a parent listed; ``*.example`` entries match subdomains.

    Linear in the length of ``domain``: only its last ``depth`` labels can
    match an entry of the list (a host of thousands of labels costs one
    ``rsplit``), and each candidate suffix is one set lookup."""
    if not domain or not domains:
        return False
    depth = domains.depth if isinstance(domains, DomainSet) else \
        max(d.count(".") + 1 for d in domains)
    tail = domain.rsplit(".", depth)  # the last `depth` labels, the rest in tail[0]
    labels = tail[1:] if len(tail) > depth else tail
    deeper = len(tail) > depth  # labels left of the ones walked: a wildcard may match
    for i in range(len(labels)):
        candidate = ".".join(labels[i:])
        if candidate in domains or ((i or deeper) and "*." + candidate in domains):
            return True
    return False


__all__ = ["EVALS", "NET_EVALS", "DomainSet", "EvalFn", "RuleLists", "ScanContext", "address",
           "display_name", "domain_of", "in_domain_list", "num", "org_domain", "register"]
