"""SPF records (RFC 7208): macro strings (§7), names and identities, and the
record and mechanism grammar (§4.6, §5, §6). Pure: no I/O; evaluation lives in
:mod:`mxguard.auth.spf`."""

from __future__ import annotations

import ipaddress
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import quote

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


def subdomain_of(name: str, domain: str) -> bool:
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
