"""Authentication-Results (RFC 8601): build our header, find forged ones.

* :func:`build` -- one header value::

    mx.example.net; spf=pass smtp.mailfrom=example.org;
     dkim=pass header.d=example.org header.s=sel header.b=AbCdEfGh;
     dmarc=pass (p=reject dis=none) header.from=example.org

  (``fold=True`` puts each result on its own line, as above; the default is
  one line, which also fits a policy ``PREPEND``). Nothing checked gives
  ``authserv-id; none``. ``header.b`` is the shortest prefix of at least 8
  characters that tells the message's signatures apart (RFC 6008).
* :func:`forged_indexes` -- the 1-based occurrences of incoming
  ``Authentication-Results`` fields that claim our authserv-id (RFC 8601 §5:
  a border MTA removes them). Matching is case-insensitive, ignores CFWS
  (comments, folding) before the id, a quoted id, a version after it, and a
  trailing dot. Fields of other authserv-ids are kept. Never raises.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterable, Sequence
from functools import lru_cache

from mxguard.auth.dmarc import DkimAuth, DmarcResult, SpfAuth

HEADER = "Authentication-Results"
SPF_RESULTS = frozenset({"none", "pass", "fail", "softfail", "neutral", "temperror",
                         "permerror", "policy"})
DKIM_RESULTS = frozenset({"none", "pass", "fail", "policy", "neutral", "temperror",
                          "permerror"})
DMARC_RESULTS = frozenset({"none", "pass", "fail", "temperror", "permerror"})
MIN_B = 8  # RFC 6008: at least 8 characters of b=
MAX_COMMENT = 200
_TSPECIALS = frozenset('()<>@,;:\\"/[]?=')
_ATEXT = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+"
_MAILBOX = re.compile(rf"(?:{_ATEXT}(?:\.{_ATEXT})*)?@[A-Za-z0-9\-_]+(?:\.[A-Za-z0-9\-_]+)*\Z")
_TOKEN_VALUE = re.compile(r"[A-Za-z0-9!#$%&'*+\-^_`{|}~.]+\Z")


@lru_cache(maxsize=1)
def default_authserv_id() -> str:
    """This host's name as the system knows it (no DNS lookup: getfqdn() would query
    the system resolver and block). Set ``[milter] authserv_id`` to choose it."""
    return socket.gethostname() or "localhost"


# ------------------------------------------------------------------ building


def _printable(text: str) -> str:
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())


def _quoted(text: str) -> str:
    return '"' + _printable(text).replace("\\", "\\\\").replace('"', '\\"') + '"'


def pvalue(text: str) -> str:
    """A property value: bare when RFC 8601 allows it (token, [local-part]@domain),
    else a quoted-string."""
    return text if _TOKEN_VALUE.match(text) or _MAILBOX.match(text) else _quoted(text)


def token(text: str) -> str:
    """An RFC 2045 value (token or quoted-string): authserv-id, reason."""
    return text if _TOKEN_VALUE.match(text) else _quoted(text)


def comment(text: str) -> str:
    """`` (text)`` with parentheses and backslashes escaped; "" for no text."""
    clean = _printable(text)[:MAX_COMMENT]
    if not clean:
        return ""
    for ch in "\\()":
        clean = clean.replace(ch, "\\" + ch)
    return f" ({clean})"


def spf_resinfo(spf: SpfAuth) -> str | None:
    """``spf=pass smtp.mailfrom=...`` (``smtp.helo`` for the HELO identity)."""
    if spf.result not in SPF_RESULTS:
        return None  # e.g. "skipped": not an SPF result
    text = f"spf={spf.result}{comment(spf.comment)}"
    if spf.identity == "helo":
        return f"{text} smtp.helo={pvalue(spf.domain)}" if spf.domain else text
    ident = spf.sender or spf.domain
    return f"{text} smtp.mailfrom={pvalue(ident)}" if ident else text


def short_b(values: Sequence[str]) -> dict[str, str]:
    """Each b= value -> its shortest prefix (>= 8 chars) unique among ``values``."""
    clean = {v: "".join(v.split()) for v in values if v}
    out: dict[str, str] = {}
    for raw, b in clean.items():
        n = MIN_B
        while n < len(b) and any(o != b and o.startswith(b[:n]) for o in clean.values()):
            n += 1
        out[raw] = b[:n]
    return out


def dkim_resinfo(sig: DkimAuth, b_prefix: str = "") -> str | None:
    """``dkim=pass header.d=... header.i=... header.s=... header.b=...``."""
    if sig.result not in DKIM_RESULTS:
        return None
    parts = [f"dkim={sig.result}"]
    if sig.reason:
        parts[0] += f" reason={token(sig.reason)}"
    for name, value in (("d", sig.domain), ("i", sig.identity), ("s", sig.selector),
                        ("b", b_prefix)):
        if value:
            parts.append(f"header.{name}={pvalue(value)}")
    return " ".join(parts)


def dkim_resinfos(sigs: Sequence[DkimAuth] | None) -> list[str]:
    """One resinfo per signature; ``dkim=none`` for an unsigned message."""
    if sigs is None:
        return []
    if not sigs:
        return ["dkim=none (no signatures)"]
    prefixes = short_b([s.b for s in sigs])
    found = (dkim_resinfo(s, prefixes.get(s.b, "")) for s in sigs)
    return [r for r in found if r is not None]


def dmarc_resinfo(res: DmarcResult, disposition: str | None = None) -> str | None:
    """``dmarc=fail (p=reject dis=quarantine) header.from=...``; ``disposition``
    overrides the DMARC one with what was actually done (local policy)."""
    if res.result not in DMARC_RESULTS:
        return None
    if res.result in ("pass", "fail"):
        dis = disposition or res.disposition
        text = f"dmarc={res.result} (p={res.policy} dis={dis})"
    else:
        text = f"dmarc={res.result}{comment(res.reason)}"
    if res.from_domain:
        text += f" header.from={pvalue(res.from_domain)}"
    return text


def build(authserv_id: str, *, spf: SpfAuth | None = None,
          dkim: Sequence[DkimAuth] | None = None, dmarc: DmarcResult | None = None,
          dmarc_disposition: str | None = None, fold: bool = False) -> str:
    """The header value. ``dkim=None``: DKIM not checked; ``[]``: no signatures."""
    infos: list[str] = []
    if spf is not None and (info := spf_resinfo(spf)):
        infos.append(info)
    infos += dkim_resinfos(dkim)
    if dmarc is not None and (info := dmarc_resinfo(dmarc, dmarc_disposition)):
        infos.append(info)
    head = token(authserv_id or default_authserv_id())
    if not infos:
        return f"{head}; none"
    sep = ";\n\t" if fold else "; "
    return head + sep + sep.join(infos)


# ------------------------------------------------------------------ forged headers


def _skip_comment(text: str, i: int) -> int:
    """Past the comment opening at ``text[i]`` (nested; unterminated: to the end)."""
    depth = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return len(text)


def skip_cfws(text: str, i: int = 0) -> int:
    """Index of the first character after whitespace and comments from ``i``."""
    while i < len(text):
        if text[i] in " \t\r\n":
            i += 1
        elif text[i] == "(":
            i = _skip_comment(text, i)
        else:
            break
    return i


def _quoted_string(text: str, i: int) -> str:
    out: list[str] = []
    i += 1
    while i < len(text) and text[i] != '"':
        if text[i] == "\\" and i + 1 < len(text):
            i += 1
        out.append(text[i])
        i += 1
    return "".join(out)


def authserv_id_of(value: str) -> str | None:
    """The authserv-id of an A-R field value, or None when it has none."""
    try:
        i = skip_cfws(value)
        if i >= len(value):
            return None
        if value[i] == '"':
            return _quoted_string(value, i) or None
        j = i
        while j < len(value) and value[j] not in _TSPECIALS and not value[j].isspace() \
                and value[j].isprintable():
            j += 1
        return value[i:j] or None
    except Exception:  # robustness: never raise on hostile input
        return None


def _norm_id(text: str) -> str:
    return text.strip().rstrip(".").casefold()


def forged_indexes(headers: Iterable[tuple[str, str]], authserv_id: str | Iterable[str]) -> \
        list[int]:
    """1-based occurrences (among A-R fields) that claim one of our authserv-ids,
    highest first: delete them in this order and the others keep their numbers."""
    ids = [authserv_id] if isinstance(authserv_id, str) else list(authserv_id)
    ours = {_norm_id(i) for i in ids if i and i.strip()}
    found: list[int] = []
    n = 0
    for name, value in headers:
        if not isinstance(name, str) or name.strip().lower() != HEADER.lower():
            continue
        n += 1
        got = authserv_id_of(value) if isinstance(value, str) else None
        if got is not None and _norm_id(got) in ours:
            found.append(n)
    return sorted(found, reverse=True)


__all__ = ["HEADER", "authserv_id_of", "build", "default_authserv_id", "dkim_resinfo",
           "dkim_resinfos", "dmarc_resinfo", "forged_indexes", "pvalue", "short_b",
           "skip_cfws", "spf_resinfo"]
