"""Pure greylisting logic: triplet keys, sender normalisation, whitelists.

No I/O here except reading whitelist files. Facts carried over from postgrey
(behaviour, not code):

* The client is its network (/24 IPv4, /64 IPv6 by default) because large
  senders retry from another address of the same pool.
* The sender is normalised so that per-message envelope senders (VERP,
  address extensions, BATV, SRS, numbered bounce addresses) map onto one
  triplet: lower-case; BATV ``prvs=TAG=user@`` (also ``msprvs1=`` and
  Barracuda's ``btv1==TAG==user@``) unwrapped; SRS0/SRS1 addresses unwrapped
  to the original ``user@domain``; ``+ext`` removed; every run of digits in
  the local part folded to ``#``.

Whitelist files have one entry per line, ``#`` starts a comment:

* client files: an IP address, a CIDR, a domain (matches the VERIFIED client
  name and its subdomains; ``*.example.com`` and ``.example.com`` mean the
  same), or ``/regex/`` (searched in the verified client name, case-blind);
* recipient files: ``user@domain``, ``local@`` (any domain), ``domain``
  (exactly that domain), ``*.domain`` (the domain and its subdomains), or
  ``/regex/`` (searched in the lower-cased recipient).
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources

DEFAULT_CLIENT_FILE = "greylist_whitelist_clients.txt"
DEFAULT_RECIPIENT_FILE = "greylist_whitelist_recipients.txt"

_DIGITS = re.compile(r"[0-9]+")
_BATV = re.compile(r"^(?:prvs|msprvs[0-9]*)=[0-9a-z]+=(.+)$")
_BATV_BARRACUDA = re.compile(r"^btv1==[0-9a-z]+==(.+)$")
# SRS0=HHH=TT=domain=user ; SRS1=HHH=forwarder==HHH=TT=domain=user
_SRS0 = re.compile(r"^srs0[=+-][^=]+=[^=]+=([^=]+)=(.+)$")
_SRS1 = re.compile(r"^srs1[=+-][^=]+=[^=]+==[^=]+=[^=]+=([^=]+)=(.+)$")
_HOSTNAME = re.compile(r"^[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*$")
_COMMENT = re.compile(r"(^|\s)#.*$")
_NUMERIC = re.compile(r"^[0-9.]+(/[0-9]*)?$")


class WhitelistError(ValueError):
    """A bad whitelist file or entry; the message names the file and line."""


# ---------------------------------------------------------------- triplet


# A client address as (version, integer): parsed with inet_pton, which is an
# order of magnitude faster than the ipaddress module on the request path.
IPInt = tuple[int, int]


@functools.lru_cache(maxsize=16384)
def parse_ip(address: str) -> IPInt | None:
    """``(4, int)`` / ``(6, int)`` of a client address (IPv4-mapped IPv6 as IPv4)."""
    try:
        if ":" not in address:
            return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, address), "big")
        value = int.from_bytes(socket.inet_pton(socket.AF_INET6, address.split("%")[0]),
                               "big")
    except (OSError, ValueError):
        return None
    if value >> 32 == 0xFFFF:
        return 4, value & 0xFFFFFFFF
    return 6, value


def _mask(ip: IPInt, prefix: int) -> int:
    bits = 32 if ip[0] == 4 else 128
    return ip[1] >> (bits - prefix) << (bits - prefix)


@functools.lru_cache(maxsize=16384)
def client_network(address: str, ipv4_prefix: int = 24, ipv6_prefix: int = 64,
                   by_host: bool = False) -> str:
    """``192.0.2.77`` -> ``192.0.2.0/24``; the address itself with ``by_host``."""
    ip = parse_ip(address)
    if ip is None:
        return address.strip().lower() or "unknown"
    version = ip[0]
    prefix = (32 if version == 4 else 128) if by_host else (
        ipv4_prefix if version == 4 else ipv6_prefix)
    family, size = (socket.AF_INET, 4) if version == 4 else (socket.AF_INET6, 16)
    text = socket.inet_ntop(family, _mask(ip, prefix).to_bytes(size, "big"))
    return text if by_host else f"{text}/{prefix}"


def _unwrap(local: str, domain: str) -> tuple[str, str]:
    """Undo BATV and SRS wrapping of a (lower-case) address."""
    m = _BATV.match(local) or _BATV_BARRACUDA.match(local)
    if m:
        local = m.group(1)
    m = _SRS1.match(local) or _SRS0.match(local)
    if m:
        domain, local = m.group(1), m.group(2)
    return local, domain


@functools.lru_cache(maxsize=8192)
def normalize_sender(sender: str) -> str:
    """The sender as the triplet sees it (see the module docstring)."""
    address = sender.strip().lower()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    if not address:
        return ""
    local, at, domain = address.rpartition("@")
    if not at:
        local, domain = address, ""
    local, domain = _unwrap(local, domain)
    if "+" in local[1:]:
        local = local[0] + local[1:].split("+", 1)[0]
    local = _DIGITS.sub("#", local)
    return f"{local}@{domain}" if domain or at else local


def normalize_recipient(recipient: str) -> str:
    address = recipient.strip().lower()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    return address


def triplet_text(network: str, sender: str, recipient: str) -> str:
    """The clear-text triplet key: tab-separated (tabs inside fields become spaces)."""
    return "\t".join(part.replace("\t", " ") for part in (network, sender, recipient))


def hashed_key(secret: bytes, text: str) -> str:
    """Keyed BLAKE2b of a key (privacy mode): the store never sees addresses."""
    data = text.encode("utf-8", "surrogateescape")
    return "h:" + hashlib.blake2b(data, key=secret, digest_size=16).hexdigest()


# ---------------------------------------------------------------- domains


def _domain_pattern(text: str) -> tuple[str, bool]:
    """``*.example.com`` / ``.example.com`` -> (``example.com``, True)."""
    wildcard = text.startswith(("*.", "."))
    domain = text.lstrip("*").lstrip(".").rstrip(".")
    if not _HOSTNAME.match(domain):
        raise ValueError(f"{text!r} is not a domain")
    return domain, wildcard


def _suffixes(name: str) -> Iterable[str]:
    """``a.b.c`` -> ``a.b.c``, ``b.c``, ``c``."""
    while name:
        yield name
        _, _, name = name.partition(".")


@dataclass
class DomainSet:
    """Exact domains and ``*.parent`` patterns (the parent and its subdomains)."""

    exact: dict[str, str] = field(default_factory=dict)
    parents: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, patterns: Iterable[str]) -> DomainSet:
        ds = cls()
        for p in patterns:
            ds.add(p.strip().lower(), p)
        return ds

    def add(self, text: str, entry: str, subdomains: bool = False) -> None:
        domain, wildcard = _domain_pattern(text)
        (self.parents if wildcard or subdomains else self.exact)[domain] = entry

    def match(self, name: str) -> str | None:
        name = name.rstrip(".").lower()
        if not name or not (self.exact or self.parents):
            return None
        if name in self.exact:
            return self.exact[name]
        for suffix in _suffixes(name):
            if suffix in self.parents:
                return self.parents[suffix]
        return None


# ---------------------------------------------------------------- whitelists


def _regex(text: str) -> re.Pattern[str] | None:
    if len(text) >= 2 and text.startswith("/") and text.endswith("/"):
        try:
            return re.compile(text[1:-1], re.IGNORECASE)
        except re.error as exc:
            raise ValueError(f"bad regular expression {text}: {exc}") from None
    return None


MATCH_MEMO = 4096  # (client, name) answers kept per client list


@dataclass
class ClientList:
    """Client IPs / CIDRs, verified-name domains and /regexes/."""

    nets: dict[tuple[int, int], dict[int, str]] = field(default_factory=dict)
    domains: DomainSet = field(default_factory=DomainSet)
    regexes: list[tuple[re.Pattern[str], str]] = field(default_factory=list)
    # (address, name) -> the match: clients come back, and a list of many prefix
    # lengths cost ~6 % of a policy request; emptied by add() and when full
    _memo: dict[tuple[IPInt | None, str], str | None] = field(
        default_factory=dict, repr=False, compare=False)

    def add(self, entry: str) -> None:
        """Add one entry; ValueError names what is wrong with it."""
        self._memo.clear()
        rx = _regex(entry)
        if rx is not None:
            self.regexes.append((rx, entry))
            return
        if ":" in entry or _NUMERIC.match(entry):
            try:
                net = ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"{entry!r} is not an IP address or CIDR") from None
            key = (net.version, net.prefixlen)
            self.nets.setdefault(key, {})[int(net.network_address)] = entry
            return
        self.domains.add(entry.lower(), entry, subdomains=True)

    def match(self, ip: IPInt | None, name: str) -> str | None:
        """The entry matching the client address or its verified name, or None."""
        key = (ip, name)
        memo = self._memo
        try:
            return memo[key]
        except KeyError:
            pass
        hit = self._match(ip, name)
        if len(memo) >= MATCH_MEMO:
            memo.clear()
        memo[key] = hit
        return hit

    def _match(self, ip: IPInt | None, name: str) -> str | None:
        if ip is not None:
            for (version, prefix), table in self.nets.items():
                if version == ip[0]:
                    hit = table.get(_mask(ip, prefix))
                    if hit is not None:
                        return hit
        if not name or name == "unknown":
            return None  # only a verified name is trusted
        hit = self.domains.match(name)
        if hit is not None:
            return hit
        return next((entry for rx, entry in self.regexes if rx.search(name)), None)

    def __len__(self) -> int:
        return (sum(len(t) for t in self.nets.values()) + len(self.domains.exact)
                + len(self.domains.parents) + len(self.regexes))


@dataclass
class RecipientList:
    """Recipient addresses, ``local@`` parts, domains and /regexes/."""

    addresses: dict[str, str] = field(default_factory=dict)
    locals: dict[str, str] = field(default_factory=dict)
    domains: DomainSet = field(default_factory=DomainSet)
    regexes: list[tuple[re.Pattern[str], str]] = field(default_factory=list)

    def add(self, entry: str) -> None:
        rx = _regex(entry)
        if rx is not None:
            self.regexes.append((rx, entry))
            return
        text = entry.lower()
        local, at, domain = text.rpartition("@")
        if not at:
            self.domains.add(text, entry)
        elif not local:
            raise ValueError(f"{entry!r} has no local part")
        elif not domain:
            self.locals[local] = entry
        else:
            _domain_pattern(domain)
            self.addresses[text] = entry

    def match(self, recipient: str) -> str | None:
        """The entry matching the (normalised) recipient, or None."""
        hit = self.addresses.get(recipient)
        if hit is not None:
            return hit
        local, _, domain = recipient.rpartition("@")
        hit = self.locals.get(local) or self.domains.match(domain)
        if hit is not None:
            return hit
        return next((entry for rx, entry in self.regexes if rx.search(recipient)), None)

    def __len__(self) -> int:
        return (len(self.addresses) + len(self.locals) + len(self.domains.exact)
                + len(self.domains.parents) + len(self.regexes))


@dataclass
class Whitelists:
    clients: ClientList = field(default_factory=ClientList)
    recipients: RecipientList = field(default_factory=RecipientList)


def classify_entry(entry: str) -> str:
    """``client`` or ``recipient``: an entry with ``@`` is a recipient."""
    return "recipient" if "@" in entry and not entry.startswith("/") else "client"


def parse_lines(lines: Iterable[str], target: ClientList | RecipientList, source: str) -> None:
    """Add every entry of a whitelist file; WhitelistError names file and line."""
    for lineno, raw in enumerate(lines, 1):
        line = _COMMENT.sub("", raw).strip()
        if not line:
            continue
        if len(line.split()) > 1:
            raise WhitelistError(f"{source}:{lineno}: one entry per line, got {line!r}")
        try:
            target.add(line)
        except ValueError as exc:
            raise WhitelistError(f"{source}:{lineno}: {exc}") from None


def _read_file(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read().splitlines()
    except OSError as exc:
        raise WhitelistError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise WhitelistError(f"{path}: not UTF-8 text: {exc}") from None


def _shipped(name: str) -> tuple[list[str], str]:
    ref = resources.files("mxguard").joinpath("data").joinpath(name)
    return ref.read_text(encoding="utf-8").splitlines(), f"mxguard/data/{name}"


def load_whitelists(client_files: Iterable[str], recipient_files: Iterable[str],
                    default: bool = True) -> Whitelists:
    """Build fresh lists from files (and the shipped defaults); raise on any error."""
    wl = Whitelists()
    if default:
        lines, source = _shipped(DEFAULT_CLIENT_FILE)
        parse_lines(lines, wl.clients, source)
        lines, source = _shipped(DEFAULT_RECIPIENT_FILE)
        parse_lines(lines, wl.recipients, source)
    for path in client_files:
        parse_lines(_read_file(path), wl.clients, path)
    for path in recipient_files:
        parse_lines(_read_file(path), wl.recipients, path)
    return wl


def validate_entry(entry: str, kind: str) -> None:
    """Raise WhitelistError if ``entry`` is not a valid ``kind`` entry."""
    target: ClientList | RecipientList = ClientList() if kind == "client" else RecipientList()
    try:
        target.add(entry)
    except ValueError as exc:
        raise WhitelistError(f"{kind} whitelist entry {entry!r}: {exc}") from None
