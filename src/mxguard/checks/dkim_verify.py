"""DKIM verification of incoming mail (RFC 6376, 8301, 8463), end of message.

Every signature, bounded by ``[dkim] max_signatures``; results go to
``CheckResult.data`` (a list of :class:`mxguard.auth.dkim.DkimResult`) for
DMARC and Authentication-Results.

Config: ``[dkim] mode, verify, max_signatures, min_rsa_bits``.
"""

from __future__ import annotations

from typing import Any

from mxguard.auth import dkim as dkimlib
from mxguard.core.runtime import Runtime, symbol
from mxguard.core.transaction import CheckResult, Transaction

NAME = "dkim_verify"
SYMBOLS = ("DKIM_VALID", "DKIM_INVALID", "DKIM_NONE", "DKIM_TEMPFAIL", "DKIM_PERMFAIL",
           "DKIM_WEAK")
_SYMBOLS = {"pass": "DKIM_VALID", "fail": "DKIM_INVALID", "temperror": "DKIM_TEMPFAIL",
            "permerror": "DKIM_PERMFAIL", "policy": "DKIM_WEAK", "neutral": "DKIM_PERMFAIL"}


def message_headers(message: Any) -> list[tuple[bytes, bytes]]:
    """The message's header fields as DKIM needs them: raw bytes, CRLF folding."""
    exact = getattr(message, "headers_exact", True)
    out = []
    for name, value in message.headers:
        if not exact:
            value = " " + value
        raw = value.replace("\r\n", "\n").replace("\n", "\r\n")
        out.append((name.encode("utf-8", "surrogateescape"),
                    raw.encode("utf-8", "surrogateescape")))
    return out


async def check(tx: Transaction, rt: Runtime) -> CheckResult | None:
    msg = tx.message
    if msg is None:
        return None
    cfg = rt.config.dkim
    results = await dkimlib.verify(message_headers(msg), msg.body_file(), rt.resolver,
                                   max_signatures=cfg.max_signatures,
                                   min_rsa_bits=cfg.min_rsa_bits, now=rt.clock())
    symbols = [symbol(rt, _SYMBOLS.get(r.result, "DKIM_PERMFAIL"),
                      f"{r.domain}:{r.result}{':' + r.reason if r.reason else ''}")
               for r in results]
    if not results:
        symbols = [symbol(rt, "DKIM_NONE")]
    reason = ",".join(f"{r.domain or '?'}={r.result}" for r in results) or "none"
    return CheckResult(NAME, symbols, reason=reason, data=results, extra={"dkim": reason})


verify = check  # the name callers used before the split


__all__ = ["NAME", "SYMBOLS", "check", "message_headers", "verify"]
