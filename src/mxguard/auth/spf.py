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
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from urllib.parse import quote

from mxguard.dns import Answer, DnsTempError, Resolver

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

RESULTS = ("pass", "fail", "softfail", "neutral", "none", "permerror", "temperror")
QUALIFIERS = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}
MAX_DNS_TERMS = 10  # include, a, mx, ptr, exists, redirect (§4.6.4)
MAX_VOID_LOOKUPS = 2  # NXDOMAIN or empty answers (§4.6.4)
MAX_NAMES = 10  # MX hosts and PTR names looked up per term (§4.6.4)
MAX_DOMAIN = 253
DEFAULT_EXPLANATION = "%{c} is not allowed to send mail for %{d}: see the SPF record of %{d}"

DOMAIN_LETTERS = frozenset("slodiphv")
EXP_LETTERS = DOMAIN_LETTERS | frozenset("crt")
_ESCAPES = {"%": "%", "_": " ", "-": "%20"}
_MACRO_BODY = re.compile(r"([A-Za-z])([0-9]*)([rR]?)([.\-+,/_=]*)")
_MODIFIER = re.compile(r"([A-Za-z][A-Za-z0-9_.\-]*)=(.*)", re.S)
_MECHANISM = re.compile(r"([+\-~?]?)([A-Za-z][A-Za-z0-9]*)(.*)", re.S)
_DUAL_CIDR = re.compile(r"(?::(?P<dom>.*?))?(?:/(?P<c4>[0-9]+))?(?://(?P<c6>[0-9]+))?", re.S)
_IP_NETWORK = re.compile(r":(?P<addr>[^/]+)(?:/(?P<cidr>[0-9]+))?", re.S)
_TOPLABEL = re.compile(r"[A-Za-z0-9]*[A-Za-z][A-Za-z0-9]*|[A-Za-z0-9]+-[A-Za-z0-9\-]*[A-Za-z0-9]")
_DIGITS = re.compile(r"0|[1-9][0-9]*")


class PermError(Exception):
    """The domain's SPF data cannot be interpreted (§2.6.7)."""


class TempError(Exception):
    """A transient error while evaluating (§2.6.6)."""


# ------------------------------------------------------------------ macros


@dataclass(frozen=True, slots=True)
class Macro:
    """One ``%{...}`` (or ``%%``, ``%_``, ``%-``) of a macro-string (§7.1)."""

    letter: str  # lower case; "%", "_" or "-" for the escapes
    digits: int | None = None
    reverse: bool = False
    delimiters: str = ""
    url_escape: bool = False

    def apply(self, values: Mapping[str, str]) -> str:
        if self.letter in _ESCAPES:
            return _ESCAPES[self.letter]
        parts = re.split("[" + re.escape(self.delimiters or ".") + "]", values[self.letter])
        if self.reverse:
            parts.reverse()
        if self.digits is not None:
            parts = parts[-self.digits:]
        text = ".".join(parts)
        return quote(text, safe="") if self.url_escape else text


Token = str | Macro


def _parse_macro(text: str, i: int, letters: frozenset[str]) -> tuple[Macro, int]:
    """The macro-expand starting at ``text[i] == "%"``; its token and the next index."""
    nxt = text[i + 1:i + 2]
    if nxt in _ESCAPES:
        return Macro(nxt), i + 2
    end = text.find("}", i)
    m = _MACRO_BODY.fullmatch(text, i + 2, end) if nxt == "{" and end > 0 else None
    if m is None or m.group(1).lower() not in letters:
        raise PermError(f"invalid macro at {text[i:i + 12]!r}")
    # more than a million parts is "all of them"; never int() a huge digit string
    significant = (m.group(2).lstrip("0") or "0") if m.group(2) else ""
    digits = (int(significant) if len(significant) <= 6 else 10**6) if significant else None
    if digits == 0:
        raise PermError(f"macro with zero parts: {text[i:end + 1]!r}")
    letter = m.group(1)
    return Macro(letter.lower(), digits, bool(m.group(3)), m.group(4), letter.isupper()), end + 1


def parse_macro_string(text: str, *, explanation: bool = False) -> tuple[Token, ...]:
    """Tokens of a macro-string (§7.1); explanation strings also allow spaces
    and the letters c, r, t. Raises :class:`PermError` on bad syntax."""
    letters = EXP_LETTERS if explanation else DOMAIN_LETTERS
    tokens: list[Token] = []
    start = i = 0
    while i < len(text):
        ch = text[i]
        if ch != "%":
            if not ("!" <= ch <= "~" or (explanation and ch == " ")):
                raise PermError(f"character {ch!r} not allowed in {text!r}")
            i += 1
            continue
        if start < i:
            tokens.append(text[start:i])
        macro, i = _parse_macro(text, i, letters)
        tokens.append(macro)
        start = i
    if start < len(text):
        tokens.append(text[start:])
    return tuple(tokens)


def parse_domain_spec(text: str) -> tuple[Token, ...]:
    """A domain-spec: a macro-string ending in a macro or in ``.toplabel[.]``."""
    tokens = parse_macro_string(text)
    if not tokens:
        raise PermError("empty domain-spec")
    tail = tokens[-1]
    if isinstance(tail, Macro):
        return tokens
    tail = tail[:-1] if tail.endswith(".") else tail
    _, dot, top = tail.rpartition(".")
    if not dot or not _TOPLABEL.fullmatch(top):
        raise PermError(f"invalid domain-spec {text!r}")
    return tokens


def expand(tokens: tuple[Token, ...], values: Mapping[str, str]) -> str:
    """Expand parsed tokens with macro values keyed by letter."""
    return "".join(t if isinstance(t, str) else t.apply(values) for t in tokens)


def ip_dotted(ip: IPAddress) -> str:
    """The ``i`` macro: dotted quad, or 32 dot-separated nibbles for IPv6."""
    if ip.version == 4:
        return str(ip)
    return ".".join(ip.exploded.replace(":", ""))


def macro_values(ip: IPAddress, sender: str, domain: str, helo: str, *,
                 receiver: str = "unknown", validated: str = "unknown",
                 now: float | None = None) -> dict[str, str]:
    """Values of every macro letter (§7.3) for one evaluation context."""
    local, sender_domain = split_sender(sender, helo)
    return {
        "s": f"{local}@{sender_domain}", "l": local, "o": sender_domain, "d": domain,
        "i": ip_dotted(ip), "p": validated, "v": "in-addr" if ip.version == 4 else "ip6",
        "h": helo, "c": str(ip), "r": receiver,
        "t": str(int(time.time() if now is None else now)),
    }


def expand_macros(text: str, ip: str, sender: str, domain: str, helo: str = "", *,
                  explanation: bool = False, receiver: str = "unknown",
                  validated: str = "unknown", now: float | None = None) -> str:
    """Parse and expand ``text`` (no DNS: ``%{p}`` is ``validated``)."""
    values = macro_values(client_ip(ip), sender, domain, helo, receiver=receiver,
                          validated=validated, now=now)
    return expand(parse_macro_string(text, explanation=explanation), values)


# ------------------------------------------------------------------ names


def split_sender(sender: str, helo: str) -> tuple[str, str]:
    """(local-part, domain); a null sender is postmaster@helo, a missing
    local-part is postmaster (§2.4, §4.3)."""
    if not sender:
        return "postmaster", helo
    local, _, domain = sender.rpartition("@")
    return local or "postmaster", domain


def client_ip(ip: str | IPAddress) -> IPAddress:
    """Parse a client address; IPv4-mapped IPv6 becomes IPv4 (§5). A zone
    index (``fe80::1%eth0``) is dropped: it is no part of the address and
    breaks ``exploded`` (the ``%{i}`` macro)."""
    addr = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.scope_id is not None:
            addr = ipaddress.IPv6Address(int(addr))
        if addr.ipv4_mapped is not None:
            return addr.ipv4_mapped
    return addr


def truncate_domain(name: str) -> str:
    """Drop one trailing dot, then left labels until at most 253 chars (§7.3)."""
    name = name[:-1] if name.endswith(".") else name
    while len(name) > MAX_DOMAIN and "." in name:
        name = name.split(".", 1)[1]
    return name


def queryable(name: str) -> bool:
    """A name DNS can carry: ASCII, labels of 1..63 characters, <= 253 in all,
    and no backslash (the resolver would read it as a master-file escape:
    ``a\\065`` is ``aA``, ``a\\999`` an error that would become a temperror)."""
    if not name or len(name) > MAX_DOMAIN or not name.isascii() or "\\" in name:
        return False
    return all(0 < len(label) <= 63 for label in name.split("."))


def identity_domain(domain: str) -> str | None:
    """The <domain> of initial processing (§4.3), or None when malformed."""
    domain = domain[:-1] if domain.endswith(".") else domain
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    if domain.startswith("[") or "." not in domain or not queryable(domain):
        return None
    return domain


def is_spf_record(text: str) -> bool:
    """``v=spf1`` (any case) followed by a space or the end (§4.5)."""
    return text[:6].lower() == "v=spf1" and (len(text) == 6 or text[6] == " ")


def _subdomain_of(name: str, domain: str) -> bool:
    name, domain = name.lower().rstrip("."), domain.lower().rstrip(".")
    return name == domain or name.endswith("." + domain)


# ------------------------------------------------------------------ records


@dataclass(frozen=True, slots=True)
class Mechanism:
    """One directive: qualifier, kind and its arguments, and the text as written."""

    text: str
    qualifier: str
    kind: str  # all include a mx ptr ip4 ip6 exists
    domain: tuple[Token, ...] | None = None  # None: the current domain
    network: IPNetwork | None = None  # ip4 / ip6
    cidr4: int = 32
    cidr6: int = 128

    @property
    def result(self) -> str:
        return QUALIFIERS[self.qualifier]


@dataclass(frozen=True, slots=True)
class Record:
    mechanisms: tuple[Mechanism, ...]
    redirect: tuple[Token, ...] | None = None
    exp: tuple[Token, ...] | None = None


def _cidr(text: str | None, most: int, term: str) -> int:
    if text is None:
        return most
    if not _DIGITS.fullmatch(text) or len(text) > 3 or int(text) > most:
        raise PermError(f"invalid CIDR length in {term!r}")
    return int(text)


def _optional_domain(dom: str | None, term: str) -> tuple[Token, ...] | None:
    if dom is None:
        return None
    if not dom:
        raise PermError(f"empty domain-spec in {term!r}")
    return parse_domain_spec(dom)


def _parse_network(kind: str, rest: str, term: str) -> IPNetwork:
    m = _IP_NETWORK.fullmatch(rest)
    if m is None or "%" in rest:
        raise PermError(f"invalid {kind} network in {term!r}")
    try:
        if kind == "ip4":
            addr: IPAddress = ipaddress.IPv4Address(m.group("addr"))
        else:
            addr = ipaddress.IPv6Address(m.group("addr"))
    except ValueError:
        raise PermError(f"invalid {kind} address in {term!r}") from None
    prefix = _cidr(m.group("cidr"), addr.max_prefixlen, term)
    return ipaddress.ip_network((addr, prefix), strict=False)


def parse_mechanism(term: str) -> Mechanism:
    """One mechanism term (§5); raises :class:`PermError` on any syntax error."""
    m = _MECHANISM.fullmatch(term)
    if m is None:
        raise PermError(f"unknown term {term!r}")
    qualifier, kind, rest = m.group(1) or "+", m.group(2).lower(), m.group(3)
    if kind == "all" and not rest:
        return Mechanism(term, qualifier, kind)
    if kind in ("include", "exists") and rest.startswith(":"):
        return Mechanism(term, qualifier, kind, parse_domain_spec(rest[1:]))
    if kind == "ptr" and (not rest or rest.startswith(":")):
        dom = rest[1:] if rest else None
        return Mechanism(term, qualifier, kind, _optional_domain(dom, term))
    if kind in ("ip4", "ip6"):
        return Mechanism(term, qualifier, kind, network=_parse_network(kind, rest, term))
    dual = _DUAL_CIDR.fullmatch(rest) if kind in ("a", "mx") else None
    if dual is None:
        raise PermError(f"unknown or malformed mechanism {term!r}")
    return Mechanism(term, qualifier, kind, _optional_domain(dual.group("dom"), term),
                     cidr4=_cidr(dual.group("c4"), 32, term),
                     cidr6=_cidr(dual.group("c6"), 128, term))


def parse_record(text: str) -> Record:
    """Parse a whole ``v=spf1`` record (§4.6); any syntax error is a PermError."""
    if not text.isascii():
        raise PermError("SPF record contains non-ASCII characters")
    mechanisms: list[Mechanism] = []
    modifiers: dict[str, tuple[Token, ...]] = {}
    for term in text.split(" ")[1:]:
        if not term:
            continue
        if any(not "!" <= ch <= "~" for ch in term):
            raise PermError(f"invalid character in term {term!r}")
        mod = _MODIFIER.fullmatch(term)
        if mod is None:
            mechanisms.append(parse_mechanism(term))
            continue
        name, value = mod.group(1).lower(), mod.group(2)
        if name not in ("redirect", "exp"):
            parse_macro_string(value)  # unknown modifiers are ignored, but must parse
        elif name in modifiers:
            raise PermError(f"{name}= appears more than once")
        else:
            modifiers[name] = parse_domain_spec(value)
    return Record(tuple(mechanisms), modifiers.get("redirect"), modifiers.get("exp"))


@lru_cache(maxsize=4096)
def _parse_or_error(text: str) -> Record | str:
    try:
        return parse_record(text)
    except PermError as exc:
        return str(exc)


def parsed_record(text: str) -> Record:
    """:func:`parse_record` with a cache: the same few thousand records are
    evaluated again and again, and parsing was half the time of an evaluation."""
    parsed = _parse_or_error(text)
    if isinstance(parsed, str):
        raise PermError(parsed)
    return parsed


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
    trace: list[str] = field(default_factory=list)  # lookups done, in order


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
    trace: list[str] = field(default_factory=list)
    _ptr: list[str] | None = None

    async def query(self, name: str, rdtype: str) -> Answer:
        try:
            answer = await self.resolver.query(name, rdtype)
        except DnsTempError as exc:
            self.trace.append(f"{rdtype} {name}: {exc.kind}")
            raise
        shown = ",".join(str(r) for r in answer.records[:4]) if answer.records else answer.rcode
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
        names = [n for n in await self.ptr_names(count=True) if _subdomain_of(n, target)]
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
                       lambda n: _subdomain_of(n, domain), lambda n: True):
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
                     identity: str = "mailfrom") -> SpfResult:
    """RFC 7208 check_host(<ip>, <domain>, <sender>) with ``helo`` for ``%{h}``.

    ``ip`` must be a valid address (ValueError otherwise). Never raises for
    DNS or record problems: those are ``temperror`` / ``permerror`` results.
    Exceeding ``timeout`` seconds in all gives ``temperror`` (§4.6.4).
    """
    addr = client_ip(ip)
    local, sender_domain = split_sender(sender, helo)
    full_sender = f"{local}@{identity_domain(sender_domain) or sender_domain}"  # A-labels
    res = SpfResult("none", domain, identity=identity, client_ip=str(addr),
                    sender=full_sender, helo=helo)
    checked = identity_domain(domain)
    if checked is None:
        res.problem = f"{domain!r} is not a valid domain name"
        return res
    res.domain = checked
    ev = _Evaluation(resolver, addr, full_sender, helo, receiver, trace=res.trace)
    try:
        async with asyncio.timeout(timeout):
            await _evaluate(ev, checked, res)
    except TimeoutError:
        res.result, res.problem = "temperror", f"SPF evaluation exceeded {timeout:g}s"
        res.mechanism = res.explanation = ""
    return res


async def check_mailfrom(resolver: Resolver, ip: str | IPAddress, sender: str, helo: str, *,
                         receiver: str = "unknown", timeout: float = 20.0) -> SpfResult:
    """The MAIL FROM identity (§2.4): a null sender is checked as postmaster@HELO."""
    _, domain = split_sender(sender, helo)
    return await check_host(resolver, ip, domain, sender, helo, receiver=receiver,
                            timeout=timeout, identity="mailfrom")


async def check_helo(resolver: Resolver, ip: str | IPAddress, helo: str, *,
                     receiver: str = "unknown", timeout: float = 20.0) -> SpfResult:
    """The HELO identity (§2.3): check_host(ip, HELO, postmaster@HELO)."""
    return await check_host(resolver, ip, helo, "", helo, receiver=receiver,
                            timeout=timeout, identity="helo")


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
