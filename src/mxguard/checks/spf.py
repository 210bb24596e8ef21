"""SPF at the policy door, with policyd-spf's behaviour (RFC 7208).

For each (client address, HELO, sender) -- once per message, however many
recipients -- the HELO identity is checked first (``helo_check``), then the
MAIL FROM identity; a null sender is checked as ``postmaster@<HELO>``, which
is the HELO evaluation itself (§2.4). Results are remembered in
:class:`SpfMemory` (``rt.services["spf_memory"]``, ``result_cache_ttl``
seconds; a temperror at most :data:`TEMPERROR_TTL`) so the milter can write
Authentication-Results from them (:func:`remembered`).

Actions (``[spf]``): fail -> ``fail_action`` (default reject: ``550 5.7.23``
with the domain's exp= explanation or a default one); HELO fail ->
``helo_fail_action``; softfail, neutral / none, permerror -> their
``*_action`` (default score); temperror -> ``temperror_action`` (default
score; ``defer`` answers ``451 4.4.3``). Symbols: SPF_PASS, SPF_FAIL,
SPF_SOFTFAIL, SPF_NEUTRAL, SPF_NONE, SPF_PERMERROR, SPF_TEMPERROR,
SPF_HELO_PASS, SPF_HELO_FAIL, SPF_HELO_SOFTFAIL, SPF_SKIPPED.

The result carries a ``Received-SPF`` header (§9.1) and
``extra = {"spf": result, "spf_domain": domain, ...}`` (greylisting reads it).
Skipped (no decision, symbol SPF_SKIPPED, ``extra["spf"] = "skipped"``):
authenticated clients, ``skip_networks``, ``skip_sender_domains`` (a name,
or ``*.name`` / ``.name`` for its subdomains), and with
``skip_helo_covers_client`` a HELO name whose A/AAAA is the client.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import socket
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from typing import Generic, TypeVar

from mxguard.auth.spf import (
    SpfResult,
    check_helo,
    check_mailfrom,
    client_ip,
    received_spf,
    spf_comment,
)
from mxguard.config import SpfConfig
from mxguard.core.runtime import Runtime, symbol
from mxguard.core.transaction import (
    ACTION_RANK,
    Action,
    CheckResult,
    Decision,
    HeaderEdit,
    Symbol,
    Transaction,
)
from mxguard.dns import DnsTempError

NAME = "spf"
MEMORY_KEY = "spf_memory"
HELO_MEMORY_KEY = "spf_helo_memory"
TEMPERROR_TTL = 60.0  # a temporary failure is not remembered longer than this
MAX_TEXT = 400  # longest explanation put into an SMTP reply
DEFAULT_FAIL_TEXT = SpfConfig().fail_text
HELO_SYMBOLS = {"pass": "SPF_HELO_PASS", "fail": "SPF_HELO_FAIL",
                "softfail": "SPF_HELO_SOFTFAIL"}

log = logging.getLogger("mxguard")

V = TypeVar("V")
Key = tuple[str, str, str]


@dataclass(frozen=True, slots=True)
class SpfVerdict:
    """Both identities' results for one (client address, HELO, sender)."""

    helo: SpfResult | None
    mailfrom: SpfResult

    @property
    def result(self) -> str:
        return self.mailfrom.result


class TtlMemory(Generic[V]):
    """Values per key, bounded by age (an expiry time per entry) and count (LRU)."""

    def __init__(self, size: int = 20000) -> None:
        self.size = size
        self._items: OrderedDict[Key, tuple[float, V]] = OrderedDict()

    def get(self, key: Key, now: float) -> V | None:
        item = self._items.get(key)
        if item is None:
            return None
        if item[0] <= now:
            del self._items[key]
            return None
        self._items.move_to_end(key)
        return item[1]

    def put(self, key: Key, value: V, expires: float) -> None:
        self._items[key] = (expires, value)
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class SpfMemory(TtlMemory[SpfVerdict]):
    """Remembered verdicts of the policy stage, for the milter stage of the same message."""


def memory(rt: Runtime) -> SpfMemory:
    mem: SpfMemory = rt.services.setdefault(MEMORY_KEY, SpfMemory())
    return mem


def remembered(rt: Runtime, client_address: str, helo: str, sender: str) -> SpfVerdict | None:
    """The verdict of the policy stage for this message, if still remembered."""
    return memory(rt).get((client_address, helo, sender), rt.clock())


# ------------------------------------------------------------------ skipping


@lru_cache(maxsize=64)
def _networks(entries: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network,
                                                 ...]:
    nets = []
    for entry in entries:
        try:
            nets.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            log.warning("check=spf bad_skip_network=%r ignored", entry)
    return tuple(nets)


def domain_listed(domain: str, entries: list[str]) -> bool:
    """``example.com`` matches itself; ``*.example.com`` / ``.example.com`` its subdomains."""
    domain = domain.lower().rstrip(".")
    for entry in entries:
        entry = entry.lower().rstrip(".")
        if entry.startswith(("*.", ".")):
            if domain.endswith("." + entry.lstrip("*").lstrip(".")):
                return True
        elif domain == entry:
            return True
    return False


async def _helo_covers_client(tx: Transaction, rt: Runtime) -> bool:
    name = tx.helo.rstrip(".")
    if not name or name.startswith("[") or "." not in name:
        return False
    try:
        addresses, _ = await rt.resolver.addresses(name)
    except DnsTempError:
        return False
    ip = tx.client_ip
    return any(_same_address(a, ip) for a in addresses)


def _same_address(text: str, ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> bool:
    try:
        return client_ip(text) == ip  # IPv4-mapped IPv6 compares as IPv4
    except ValueError:
        return False


async def skip_reason(tx: Transaction, rt: Runtime) -> str:
    """Why this transaction is not SPF-checked ("" when it is)."""
    cfg = rt.config.spf
    if cfg.skip_authenticated and tx.sasl_username:
        return "authenticated"
    ip = tx.client_ip
    if any(ip is not None and ip.version == n.version and ip in n
           for n in _networks(tuple(cfg.skip_networks))):
        return "network"
    domain = tx.sender.rpartition("@")[2] if tx.sender else tx.helo
    if domain and domain_listed(domain, cfg.skip_sender_domains):
        return "sender-domain"
    if cfg.skip_helo_covers_client and await _helo_covers_client(tx, rt):
        return "helo-covers-client"
    return ""


# ------------------------------------------------------------------ evaluation

_FQDN: list[str] = []


async def receiver_name(tx: Transaction) -> str:
    """Our host name for Received-SPF: ``server_name`` if given, else the host name
    (no DNS lookup on the request path)."""
    name = tx.attrs.get("server_name", "")
    if name:
        return name
    if not _FQDN:
        _FQDN.append(socket.gethostname() or "localhost")
    return _FQDN[0]


class HeloMemory(TtlMemory[SpfResult]):
    """The HELO identity's result per (client address, HELO, receiver): the same for
    every message of that client, whatever its sender, so a new sender costs one
    evaluation (MAIL FROM), not two. Bounded like :class:`SpfMemory`, same TTLs."""

    def put(self, key: Key, value: SpfResult, now: float,
            ttl: float = 0.0) -> None:
        """Kept until ``now + ttl`` (a temperror 60 s at most); nothing kept for ttl 0."""
        if value.result == "temperror":
            ttl = min(ttl, TEMPERROR_TTL)
        if ttl <= 0 or len(key[1]) > 255:  # no host name is longer: not kept
            return
        super().put(key, value, now + ttl)


def helo_memory(rt: Runtime) -> HeloMemory:
    mem: HeloMemory = rt.services.setdefault(HELO_MEMORY_KEY, HeloMemory())
    return mem


async def _check_helo(tx: Transaction, rt: Runtime, receiver: str) -> SpfResult:
    """The HELO identity's result, remembered per (client, HELO, receiver)."""
    mem, now, key = helo_memory(rt), rt.clock(), (tx.client_address, tx.helo, receiver)
    found = mem.get(key, now)
    if found is not None:
        return found
    cfg = rt.config.spf
    result = await check_helo(rt.resolver, tx.client_address, tx.helo, receiver=receiver,
                              timeout=cfg.timeout, trace=False)
    mem.put(key, result, now, float(cfg.result_cache_ttl))
    return result


async def _evaluate(tx: Transaction, rt: Runtime, receiver: str) -> SpfVerdict:
    cfg, resolver = rt.config.spf, rt.resolver
    helo_wanted = bool(cfg.helo_check and tx.helo)
    if not tx.sender and helo_wanted:  # the same evaluation (RFC 7208 §2.4)
        helo = await _check_helo(tx, rt, receiver)
        return SpfVerdict(None, dataclasses.replace(helo, identity="mailfrom"))
    # The two identities are independent: evaluate them side by side, so a slow or
    # dead DNS costs one timeout, not two.
    mailfrom_eval = check_mailfrom(resolver, tx.client_address, tx.sender, tx.helo,
                                   receiver=receiver, timeout=cfg.timeout,
                                   trace=False)  # remembered by the thousand: no traces
    if not helo_wanted:
        return SpfVerdict(None, await mailfrom_eval)
    known = helo_memory(rt).get((tx.client_address, tx.helo, receiver), rt.clock())
    if known is not None:  # the HELO of a known client: only MAIL FROM to evaluate
        return SpfVerdict(known, await mailfrom_eval)
    helo, mailfrom = await asyncio.gather(_check_helo(tx, rt, receiver), mailfrom_eval)
    return SpfVerdict(helo, mailfrom)


async def evaluate_once(tx: Transaction, rt: Runtime, receiver: str) -> SpfVerdict:
    """The remembered verdict for this message, or a new evaluation."""
    key = (tx.client_address, tx.helo, tx.sender)
    mem, now = memory(rt), rt.clock()
    verdict = mem.get(key, now)
    if verdict is not None:
        return verdict
    verdict = await _evaluate(tx, rt, receiver)
    ttl = float(rt.config.spf.result_cache_ttl)
    if "temperror" in (verdict.result, verdict.helo.result if verdict.helo else ""):
        ttl = min(ttl, TEMPERROR_TTL)
    if ttl > 0:
        mem.put(key, verdict, now + ttl)
    return verdict


# ------------------------------------------------------------------ replies


def _printable(text: str) -> str:
    if not (text.isascii() and text.isprintable()):  # else: no per-character loop
        text = "".join(c if " " <= c <= "~" else " " for c in text)
    clean = " ".join(text.split())
    return clean[:MAX_TEXT]


def _fail_text(cfg: SpfConfig, res: SpfResult) -> str:
    fields = {"explanation": _printable(res.explanation), "sender": res.sender,
              "client": res.client_ip, "domain": res.domain}
    try:
        return _printable(cfg.fail_text.format(**fields))
    except (KeyError, IndexError, ValueError):
        return _printable(DEFAULT_FAIL_TEXT.format(**fields))


def _text(cfg: SpfConfig, res: SpfResult, receiver: str) -> str:
    if res.result == "fail":
        return _fail_text(cfg, res)
    if res.result == "temperror":
        return _printable(f"Temporary SPF error checking {res.domain}: {res.problem}; "
                          "try again later")
    return _printable(f"SPF {res.result}: {spf_comment(res, receiver)}")


def _action(cfg: SpfConfig, res: SpfResult) -> str:
    if res.identity == "helo":
        return {"fail": cfg.helo_fail_action,
                "temperror": cfg.temperror_action}.get(res.result, "score")
    return {"fail": cfg.fail_action, "softfail": cfg.softfail_action,
            "neutral": cfg.neutral_action, "none": cfg.neutral_action,
            "permerror": cfg.permerror_action,
            "temperror": cfg.temperror_action}.get(res.result, "score")


def decision(cfg: SpfConfig, res: SpfResult, receiver: str) -> Decision | None:
    """The configured hard decision for one identity's result, if any."""
    action = _action(cfg, res)
    if action not in ("reject", "defer"):
        return None
    text = _text(cfg, res, receiver)
    if res.result == "temperror":
        return Decision(Action.DEFER, 451, "4.4.3", text)
    detail = "24" if res.result == "permerror" else "23"  # RFC 7372
    if action == "reject":
        return Decision(Action.REJECT, 550, f"5.7.{detail}", text)
    return Decision(Action.DEFER, 451, f"4.7.{detail}", text)


def symbol_detail(res: SpfResult) -> str:
    """``example.com from 192.0.2.7 (matched -all)``: what ``mxguard explain`` words."""
    how = f"matched {res.mechanism}" if res.mechanism not in ("", "default") else res.problem
    text = f"{res.domain} from {res.client_ip}" if res.client_ip else res.domain
    return f"{text} ({how})" if how else text


def _symbols(rt: Runtime, verdict: SpfVerdict) -> list[Symbol]:
    out: list[Symbol] = []
    helo = verdict.helo
    if helo is not None and helo.result in HELO_SYMBOLS:
        out.append(symbol(rt, HELO_SYMBOLS[helo.result], symbol_detail(helo)))
    mf = verdict.mailfrom
    out.append(symbol(rt, "SPF_" + mf.result.upper(), symbol_detail(mf)))
    return out


def _strongest(decisions: list[Decision | None]) -> Decision | None:
    found = [d for d in decisions if d is not None]
    return max(found, key=lambda d: ACTION_RANK[d.action]) if found else None


# What build_result made of a remembered verdict: the next recipient of the same
# message (the same verdict object) gets a copy instead of a new Received-SPF
# header, decision and symbols. Keyed by the verdict's and config's identity (both
# held, so an id is never reused while its entry lives); bounded; a reload is a
# new config object, so nothing built under the old scores is reused.
MAX_BUILT = 4096
_BUILT: dict[tuple[int, int, str], tuple[SpfVerdict, object, CheckResult]] = {}


def build_result(rt: Runtime, verdict: SpfVerdict, receiver: str) -> CheckResult:
    """Symbols, decision, Received-SPF header and extras for one verdict."""
    cfg = rt.config
    key = (id(verdict), id(cfg), receiver)
    hit = _BUILT.get(key)
    if hit is None or hit[0] is not verdict or hit[1] is not cfg:
        if len(_BUILT) >= MAX_BUILT:
            _BUILT.clear()
        hit = _BUILT[key] = (verdict, cfg, _build_result(rt, verdict, receiver))
    made = hit[2]  # a fresh result: the runner and the door may change its lists
    return CheckResult(NAME, list(made.symbols), made.decision, list(made.headers),
                       made.reason, dict(made.extra))


def _build_result(rt: Runtime, verdict: SpfVerdict, receiver: str) -> CheckResult:
    cfg, mf, helo = rt.config.spf, verdict.mailfrom, verdict.helo
    helo_decision = decision(cfg, helo, receiver) if helo is not None else None
    chosen = _strongest([helo_decision, decision(cfg, mf, receiver)])
    shown = helo if helo is not None and chosen is not None and chosen is helo_decision else mf
    headers = [HeaderEdit("Received-SPF", received_spf(shown, receiver))] if cfg.header else []
    extra = {"spf": mf.result, "spf_domain": mf.domain, "spf_identity": mf.identity}
    if helo is not None:
        extra["spf_helo"] = helo.result
    reason = f"{shown.identity}:{shown.result}"
    return CheckResult(NAME, _symbols(rt, verdict), chosen, headers, reason, extra)


async def check(tx: Transaction, rt: Runtime) -> CheckResult | None:
    """The SPF check of the pipeline (Stage.RCPT)."""
    if tx.client_ip is None:
        return None  # no client address (local submission): nothing to check
    why = await skip_reason(tx, rt)
    if why:
        return CheckResult(NAME, [symbol(rt, "SPF_SKIPPED", why)], reason=f"skipped:{why}",
                           extra={"spf": "skipped"})
    receiver = await receiver_name(tx)
    verdict = await evaluate_once(tx, rt, receiver)
    return build_result(rt, verdict, receiver)


async def at_end_of_message(tx: Transaction, rt: Runtime) -> CheckResult | None:
    """The milter's SPF (Stage.EOM): the verdict the policy door remembered for
    this (client, HELO, sender), or computed now when the policy door is not
    wired. Adds no symbol (the policy door scored it); ``data`` is the
    :class:`~mxguard.auth.dmarc.SpfAuth` DMARC and Authentication-Results use."""
    from mxguard.checks.dmarc import spf_auth

    found = remembered(rt, tx.client_address, tx.helo, tx.sender)
    if found is None:
        if await check(tx, rt) is None:
            return None
        found = remembered(rt, tx.client_address, tx.helo, tx.sender)
        if found is None:
            return None
    auth = spf_auth(found.mailfrom, null_sender=not tx.sender)
    return CheckResult(NAME, extra={"spf": found.result}, data=auth)
