"""URIs of a message: :class:`Uri`, found in plain text (:func:`text_uris`) or
HTML (by :mod:`.mime_html`), normalised by :func:`normalize_uri` (scheme and
host lower-case, obfuscated numeric IPv4 hosts as dotted quads, user-info
dropped); at most :data:`MAX_URIS` are kept per message."""

from __future__ import annotations

import html
import ipaddress
import re
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mxguard.content.mime import ParsedMessage

MAX_URIS = 1000  # URIs kept per message


@dataclass(frozen=True, slots=True)
class Uri:
    """A normalised URI. ``text`` is the visible link text of an ``<a>``
    element (empty for URIs found in plain text); ``tag`` where it was found:
    ``text``, ``a``, ``img``, ``form``, ``area``, ``iframe``, ``link``, ``base``."""

    url: str
    host: str  # lower case, no trailing dot; IPv4/IPv6 literal for IP hosts
    scheme: str = "http"
    text: str = ""
    tag: str = "text"

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host.strip("[]"))
        except ValueError:
            return False
        return True


_TEXT_URI = re.compile(r"(?i)\b(?:(?:https?|ftp)://|www\d{0,3}\.|mailto:)[^\s<>\"'`{}|\\^]+")
_TRAILING = ".,;:!?)]}>*'\""


def text_uris(text: str) -> list[Uri]:
    out: list[Uri] = []
    for m in _TEXT_URI.finditer(text):
        uri = normalize_uri(m.group(0).rstrip(_TRAILING))
        if uri is not None:
            out.append(uri)
            if len(out) >= MAX_URIS:
                break
    return out


def add_uris(msg: ParsedMessage, uris: Iterable[Uri]) -> None:
    seen = {(u.url, u.text, u.tag) for u in msg.uris} if msg.uris else set()
    for uri in uris:
        if len(msg.uris) >= MAX_URIS:
            return
        key = (uri.url, uri.text, uri.tag)
        if key not in seen:
            seen.add(key)
            msg.uris.append(uri)


def _numeric_ipv4(host: str) -> str:
    """Dotted quad for hosts like ``3232235777``, ``0xc0a80101``, ``0300.0250.1.1``."""
    pieces = host.split(".")
    if not 1 <= len(pieces) <= 4:
        return ""
    try:
        nums = [int(p, 16) if p[:2] == "0x" else int(p, 8) if len(p) > 1 and p[0] == "0"
                else int(p) for p in pieces]
    except ValueError:
        return ""
    value = 0
    for n in nums[:-1]:
        if not 0 <= n <= 255:
            return ""
        value = value << 8 | n
    width = 8 * (5 - len(nums))
    if not 0 <= nums[-1] < 1 << width:
        return ""
    value = value << width | nums[-1]
    return str(ipaddress.IPv4Address(value)) if value < 1 << 32 else ""


def normalize_uri(url: str, *, text: str = "", tag: str = "text") -> Uri | None:
    """A :class:`Uri`, or None for schemes we do not track (javascript:, cid: ...)."""
    url = "".join(html.unescape(url).split())
    if not url:
        return None
    low = url.lower()
    if low.startswith("www"):
        url, low = "http://" + url, "http://" + low
    if low.startswith("mailto:"):
        addr = urllib.parse.unquote(url[7:]).partition("?")[0]
        host = addr.rpartition("@")[2].lower().strip(".") if "@" in addr else ""
        return Uri("mailto:" + addr, host, "mailto", text, tag)
    if low.startswith("//"):
        url, low = "http:" + url, "http:" + low
    if not low.startswith(("http://", "https://", "ftp://")):
        return None
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return None
    host = urllib.parse.unquote(host).lower().rstrip(".")
    if host and host.replace(".", "").replace("x", "").isalnum() and host[0].isdigit():
        host = _numeric_ipv4(host) or host
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc += f":{port}"
    rebuilt = urllib.parse.urlunsplit((parts.scheme.lower(), netloc, parts.path or "/",
                                       parts.query, parts.fragment))
    return Uri(rebuilt, host, parts.scheme.lower(), text, tag)


__all__ = ["MAX_URIS", "Uri", "add_uris", "normalize_uri", "text_uris"]
