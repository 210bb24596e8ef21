"""Sender Policy Framework (RFC 7208): an async ``check_host()``.

Every DNS query goes through :class:`mxguard.dns.Resolver`; nothing else does
I/O. Covered: all mechanisms (all, include, a, mx, ptr, ip4, ip6, exists),
the redirect and exp modifiers, macro expansion (§7, incl. ``c``/``r``/``t``
in explanations only, URL escaping of upper-case letters, truncation of long
names to 253 characters), the limits of §4.6.4 (10 DNS terms, 2 void
lookups, 10 MX hosts -- more is a permerror --, first 10 PTR names), the
permerror/temperror rules, IPv6 and IPv4-mapped IPv6 clients (treated as
IPv4, §5), and an overall time limit (a temperror when exceeded).

Only TXT records are looked up; the obsolete ``SPF`` RR type is ignored
(§3.1, §4.4). A record is parsed whole before it is evaluated, so a syntax
error anywhere in it is a permerror (§4.6).

Entry points: :func:`check_host` (one domain), :func:`check_mailfrom` (MAIL
FROM identity; a null sender becomes ``postmaster@<HELO>``, §2.4) and
:func:`check_helo` (HELO identity, §2.3). :func:`received_spf` formats the
``Received-SPF`` header field of §9.1.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from mxguard.auth.spf_record import (  # the record grammar; re-exported: the SPF API
    DEFAULT_EXPLANATION,
    MAX_DNS_TERMS,
    MAX_NAMES,
    MAX_VOID_LOOKUPS,
    QUALIFIERS,
    RESULTS,
    IPAddress,
    IPNetwork,
    Macro,
    Mechanism,
    PermError,
    Record,
    TempError,
    Token,
    client_ip,
    expand,
    expand_macros,
    identity_domain,
    is_spf_record,
    macro_values,
    parse_domain_spec,
    parse_macro_string,
    parse_mechanism,
    parse_record,
    parsed_record,
    queryable,
    split_sender,
    subdomain_of,
    truncate_domain,
)
from mxguard.dns import Answer, DnsTempError, Resolver

# ------------------------------------------------------------------ evaluation


@dataclass(slots=True)
class SpfResult:
    """The outcome of one check_host() evaluation."""

    result: str  # one of RESULTS
    domain: str = ""  # the domain checked (the identity's domain)
    explanation: str = ""  # for "fail": the domain's exp= text, or our default
    explanation_from_domain: bool = False  # True when the text came from exp=
    mechanism: str = ""  # the matched mechanism as written, or "default"
    problem: str = ""  # why, for permerror / temperror / none
    identity: str = "mailfrom"  # "mailfrom" or "helo"
    client_ip: str = ""
    sender: str = ""  # the sender checked (postmaster@HELO for a null sender)
    helo: str = ""
    trace: Sequence[str] = ()  # lookups done, in order (check_host(trace=True))


@dataclass(frozen=True, slots=True)
class _Outcome:
    result: str
    mechanism: str = ""
    domain: str = ""  # the domain whose record decided (its exp= applies)
    exp: tuple[Token, ...] | None = None


@dataclass(slots=True)
class _Evaluation:
    """State of one top-level evaluation: context, limits, trace."""

    resolver: Resolver
    ip: IPAddress
    sender: str
    helo: str
    receiver: str
    terms: int = 0
    voids: int = 0
    trace: list[str] | None = None  # the result's trace; None: keep none
    _ptr: list[str] | None = None

    async def query(self, name: str, rdtype: str) -> Answer:
        try:
            answer = await self.resolver.query(name, rdtype)
        except DnsTempError as exc:
            if self.trace is not None:
                self.trace.append(f"{rdtype} {name}: {exc.kind}")
            raise
        if self.trace is not None:
            shown = ",".join(str(r) for r in answer.records[:4]) if answer.records \
                else answer.rcode
            self.trace.append(f"{rdtype} {name}: {shown}")
        return answer

    def count_term(self, text: str) -> None:
        self.terms += 1
        if self.terms > MAX_DNS_TERMS:
            raise PermError(f"more than {MAX_DNS_TERMS} DNS-querying terms (at {text!r})")

    def count_void(self, answer: Answer) -> None:
        if not answer.records:
            self.voids += 1
            if self.voids > MAX_VOID_LOOKUPS:
                raise PermError(f"more than {MAX_VOID_LOOKUPS} void lookups "
                                f"(at {answer.name})")

    @property
    def addr_type(self) -> str:
        return "A" if self.ip.version == 4 else "AAAA"

    async def expand(self, tokens: tuple[Token, ...], domain: str) -> str:
        needs_p = any(isinstance(t, Macro) and t.letter == "p" for t in tokens)
        validated = await self.validated_name(domain) if needs_p else "unknown"
        values = macro_values(self.ip, self.sender, domain, self.helo,
                              receiver=self.receiver, validated=validated)
        return expand(tokens, values)

    async def target(self, mech: Mechanism, domain: str) -> str | None:
        """The mechanism's target-name, or None when DNS cannot carry it."""
        if mech.domain is None:
            return domain
        name = truncate_domain(await self.expand(mech.domain, domain))
        return name if queryable(name) else None

    # ---------------------------------------------------------- records

    async def record(self, domain: str) -> str | None:
        """The one SPF record of ``domain``; None when there is none (§4.5)."""
        if not queryable(domain):
            return None
        answer = await self.query(domain, "TXT")
        found = [t for t in answer.records if is_spf_record(t)]
        if len(found) > 1:
            raise PermError(f"{domain} has {len(found)} SPF records")
        return found[0] if found else None

    async def check(self, domain: str) -> _Outcome:
        """check_host() for one domain; errors raise PermError / TempError."""
        text = await self.record(domain)
        if text is None:
            return _Outcome("none", domain=domain)
        record = parsed_record(text)
        for mech in record.mechanisms:
            if await self.matches(mech, domain):
                return _Outcome(mech.result, mech.text, domain, record.exp)
        if record.redirect is not None:
            return await self.redirect(record.redirect, domain)
        return _Outcome("neutral", "default", domain, record.exp)

    async def redirect(self, tokens: tuple[Token, ...], domain: str) -> _Outcome:
        self.count_term("redirect")
        target = truncate_domain(await self.expand(tokens, domain))
        outcome = await self.check(target)
        if outcome.result == "none":
            raise PermError(f"redirect={target}: no SPF record there")
        return outcome

    # ---------------------------------------------------------- mechanisms

    async def matches(self, mech: Mechanism, domain: str) -> bool:
        if mech.kind == "all":
            return True
        if mech.network is not None:
            return self.ip.version == mech.network.version and self.ip in mech.network
        self.count_term(mech.text)
        handler: Callable[[Mechanism, str], Awaitable[bool]] = getattr(self, "m_" + mech.kind)
        return await handler(mech, domain)

    async def m_include(self, mech: Mechanism, domain: str) -> bool:
        target = await self.target(mech, domain)
        outcome = await self.check(target) if target else _Outcome("none")
        if outcome.result == "none":
            raise PermError(f"{mech.text}: no SPF record at {target}")
        return outcome.result == "pass"

    async def m_a(self, mech: Mechanism, domain: str) -> bool:
        target = await self.target(mech, domain)
        if target is None:
            return False
        answer = await self.query(target, self.addr_type)
        self.count_void(answer)
        return any(self.in_cidr(mech, a) for a in answer.records)

    async def m_mx(self, mech: Mechanism, domain: str) -> bool:
        target = await self.target(mech, domain)
        if target is None:
            return False
        answer = await self.query(target, "MX")
        self.count_void(answer)
        if len(answer.records) > MAX_NAMES:
            raise PermError(f"{mech.text}: {target} has more than {MAX_NAMES} MX records")
        hosts = [host for _, host in sorted(answer.records) if queryable(host)]
        found = await asyncio.gather(*(self.query(h, self.addr_type) for h in hosts))
        return any(self.in_cidr(mech, a) for ans in found for a in ans.records)

    async def m_ptr(self, mech: Mechanism, domain: str) -> bool:
        target = await self.target(mech, domain)
        if target is None:
            return False
        names = [n for n in await self.ptr_names(count=True) if subdomain_of(n, target)]
        return bool(await self.validated(names))

    async def m_exists(self, mech: Mechanism, domain: str) -> bool:
        target = await self.target(mech, domain)
        if target is None:
            return False
        answer = await self.query(target, "A")
        self.count_void(answer)
        return bool(answer.records)

    def in_cidr(self, mech: Mechanism, address: str) -> bool:
        try:
            addr = ipaddress.ip_address(address)
        except ValueError:
            return False
        if addr.version != self.ip.version:
            return False
        prefix = mech.cidr4 if addr.version == 4 else mech.cidr6
        return self.ip in ipaddress.ip_network((addr, prefix), strict=False)

    # ---------------------------------------------------------- PTR, %{p}

    async def ptr_names(self, *, count: bool) -> list[str]:
        """The first 10 PTR names of the client; [] on DNS errors (§5.5)."""
        if self._ptr is None:
            try:
                answer = await self.query(self.ip.reverse_pointer, "PTR")
            except DnsTempError:
                return []
            if count:
                self.count_void(answer)
            self._ptr = [str(n) for n in answer.records[:MAX_NAMES]]
        return self._ptr

    async def validated(self, names: list[str]) -> list[str]:
        """Those names whose A/AAAA include the client; DNS errors skip a name."""
        names = [n for n in names if queryable(n)]
        answers = await asyncio.gather(*(self.query(n, self.addr_type) for n in names),
                                       return_exceptions=True)
        out: list[str] = []
        for name, answer in zip(names, answers, strict=True):
            if isinstance(answer, BaseException):
                if not isinstance(answer, DnsTempError):
                    raise answer
                continue
            if any(self.same_ip(a) for a in answer.records):
                out.append(name)
        return out

    def same_ip(self, address: str) -> bool:
        try:
            return client_ip(address) == self.ip
        except ValueError:
            return False

    async def validated_name(self, domain: str) -> str:
        """The ``p`` macro (§7.3): a validated name, preferring ``domain`` itself,
        then its subdomains; ``unknown`` when none."""
        names = await self.validated(await self.ptr_names(count=False))
        for wanted in (lambda n: n.lower() == domain.lower(),
                       lambda n: subdomain_of(n, domain), lambda n: True):
            for name in names:
                if wanted(name):
                    return name
        return "unknown"

    # ---------------------------------------------------------- explanation

    async def explain(self, outcome: _Outcome) -> tuple[str, bool]:
        """(explanation, came from exp=) for a fail (§6.2)."""
        if outcome.exp is not None:
            text = await self.exp_text(outcome.exp, outcome.domain)
            if text is not None:
                return text, True
        tokens = parse_macro_string(DEFAULT_EXPLANATION, explanation=True)
        return await self.expand(tokens, outcome.domain), False

    async def exp_text(self, tokens: tuple[Token, ...], domain: str) -> str | None:
        """The expanded exp= TXT; None on any problem (ignored, §6.2)."""
        try:
            name = truncate_domain(await self.expand(tokens, domain))
            if not queryable(name):
                return None
            answer = await self.query(name, "TXT")
            if len(answer.records) != 1:
                return None
            text = parse_macro_string(answer.records[0], explanation=True)
            return await self.expand(text, domain)
        except (PermError, DnsTempError):
            return None


# ------------------------------------------------------------------ entry points


async def _evaluate(ev: _Evaluation, domain: str, res: SpfResult) -> None:
    """Fill ``res`` from check_host(domain); errors become results."""
    try:
        outcome = await ev.check(domain)
        if outcome.result == "fail":
            res.explanation, res.explanation_from_domain = await ev.explain(outcome)
    except PermError as exc:
        res.result, res.problem = "permerror", str(exc)
    except (TempError, DnsTempError) as exc:
        res.result, res.problem = "temperror", str(exc)
    else:
        res.result, res.mechanism = outcome.result, outcome.mechanism
        if outcome.result == "none":
            res.problem = f"no SPF record at {domain}"


async def check_host(resolver: Resolver, ip: str | IPAddress, domain: str, sender: str,
                     helo: str = "", *, receiver: str = "unknown", timeout: float = 20.0,
                     identity: str = "mailfrom", trace: bool = True) -> SpfResult:
    """RFC 7208 check_host(<ip>, <domain>, <sender>) with ``helo`` for ``%{h}``.

    ``trace``: record every lookup in ``result.trace`` (for people: the CLI); the
    daemon, which keeps thousands of results in memory, passes False.

    ``ip`` must be a valid address (ValueError otherwise). Never raises for
    DNS or record problems: those are ``temperror`` / ``permerror`` results.
    Exceeding ``timeout`` seconds in all gives ``temperror`` (§4.6.4).
    """
    addr = client_ip(ip)
    local, sender_domain = split_sender(sender, helo)
    full_sender = f"{local}@{identity_domain(sender_domain) or sender_domain}"  # A-labels
    if full_sender == sender:
        full_sender = sender  # one string, not two: the daemon keeps results by the thousand
    shown_ip = str(addr)
    if isinstance(ip, str) and shown_ip == ip:
        shown_ip = ip
    res = SpfResult("none", domain, identity=identity, client_ip=shown_ip,
                    sender=full_sender, helo=helo)
    checked = identity_domain(domain)
    if checked is None:
        res.problem = f"{domain!r} is not a valid domain name"
        return res
    res.domain = checked
    lookups: list[str] | None = [] if trace else None
    if lookups is not None:
        res.trace = lookups
    ev = _Evaluation(resolver, addr, full_sender, helo, receiver, trace=lookups)
    try:
        async with asyncio.timeout(timeout):
            await _evaluate(ev, checked, res)
    except TimeoutError:
        res.result, res.problem = "temperror", f"SPF evaluation exceeded {timeout:g}s"
        res.mechanism = res.explanation = ""
    return res


async def check_mailfrom(resolver: Resolver, ip: str | IPAddress, sender: str, helo: str, *,
                         receiver: str = "unknown", timeout: float = 20.0,
                         trace: bool = True) -> SpfResult:
    """The MAIL FROM identity (§2.4): a null sender is checked as postmaster@HELO."""
    _, domain = split_sender(sender, helo)
    return await check_host(resolver, ip, domain, sender, helo, receiver=receiver,
                            timeout=timeout, identity="mailfrom", trace=trace)


async def check_helo(resolver: Resolver, ip: str | IPAddress, helo: str, *,
                     receiver: str = "unknown", timeout: float = 20.0,
                     trace: bool = True) -> SpfResult:
    """The HELO identity (§2.3): check_host(ip, HELO, postmaster@HELO)."""
    return await check_host(resolver, ip, helo, "", helo, receiver=receiver,
                            timeout=timeout, identity="helo", trace=trace)


# ------------------------------------------------------------------ Received-SPF

_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-]+)*")


def _ascii_printable(text: str, replacement: str) -> str:
    if text.isascii() and text.isprintable():  # the usual case: no per-character loop
        return text
    return "".join(ch if " " <= ch <= "~" else replacement for ch in text)


def _value(text: str) -> str:
    if _DOT_ATOM.fullmatch(text):
        return text
    clean = _ascii_printable(text, "?")
    return '"' + clean.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _comment_text(text: str) -> str:
    clean = _ascii_printable(text, "?")
    return clean.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def spf_comment(res: SpfResult, receiver: str) -> str:
    """The human part of Received-SPF (the wording of RFC 7208 §9.1's examples)."""
    who, ip = f"domain of {res.sender}", res.client_ip
    if res.identity == "helo":
        who = f"domain of {res.helo}"
    text = {
        "pass": f"{who} designates {ip} as permitted sender",
        "fail": f"{who} does not designate {ip} as permitted sender",
        "softfail": f"transitioning {who} does not designate {ip} as permitted sender",
        "neutral": f"{ip} is neither permitted nor denied by {who}",
        "none": f"{who} does not designate permitted sender hosts",
        "permerror": f"permanent error in processing {who}: {res.problem}",
        "temperror": f"temporary error in processing {who}: {res.problem}",
    }[res.result]
    return _comment_text(f"{receiver}: {text}")


def received_spf(res: SpfResult, receiver: str) -> str:
    """The value of a ``Received-SPF`` header field (RFC 7208 §9.1)."""
    pairs = [("client-ip", res.client_ip), ("envelope-from", res.sender),
             ("helo", res.helo), ("receiver", receiver), ("identity", res.identity)]
    if res.mechanism:
        pairs.append(("mechanism", res.mechanism))
    if res.problem and res.result in ("permerror", "temperror"):
        pairs.append(("problem", res.problem))
    body = "; ".join(f"{k}={_value(v)}" for k, v in pairs if v)
    return f"{res.result} ({spf_comment(res, receiver)}) {body};"


__all__ = ["MAX_DNS_TERMS", "MAX_NAMES", "MAX_VOID_LOOKUPS", "QUALIFIERS", "RESULTS",
           "IPAddress", "IPNetwork", "PermError", "Record", "SpfResult", "TempError", "Token",
           "check_helo", "check_host", "check_mailfrom", "client_ip", "expand", "expand_macros",
           "identity_domain", "is_spf_record", "macro_values", "parse_domain_spec",
           "parse_macro_string", "parse_mechanism", "parse_record", "parsed_record", "queryable",
           "received_spf", "spf_comment", "truncate_domain"]
