"""DKIM at the milter door: verify incoming mail, sign outgoing mail.

Verification (RFC 6376, 8301, 8463) of every signature, bounded by
``[dkim] max_signatures``; results go to ``CheckResult.data`` (a list of
:class:`mxguard.auth.dkim.DkimResult`) for DMARC and Authentication-Results.
Signing happens for clients in ``internal_hosts`` or SASL-authenticated ones,
with every key the KeyTable gives for the From address (two keys of one domain:
dual signing) -- and never twice: a message that already carries our own
signature (same d= and s=) is not signed again.

Config: ``[dkim]``. Symbols: DKIM_VALID, DKIM_INVALID, DKIM_NONE,
DKIM_TEMPFAIL, DKIM_PERMFAIL, DKIM_WEAK, DKIM_SIGNED.
"""

from __future__ import annotations

import email.utils
import ipaddress
import logging
from collections.abc import Sequence
from typing import Any

from mxguard.auth import dkim as dkimlib
from mxguard.auth.dkim_keys import KeyTable, SigningKey
from mxguard.auth.dkim_sign import sign
from mxguard.config import DkimConfig
from mxguard.core.runner import Runtime, symbol
from mxguard.core.transaction import CheckResult, HeaderEdit, Symbol, Transaction

NAME = "dkim"
KEYTABLE_SERVICE = "dkim_keys"
log = logging.getLogger("mxguard")

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


def is_outgoing(tx: Transaction, cfg: DkimConfig) -> bool:
    """Mail to sign: from an internal host or a SASL-authenticated client."""
    if tx.authenticated:
        return True
    ip = tx.client_ip
    if ip is None:
        return False
    for net in cfg.internal_hosts:
        network = ipaddress.ip_network(net, strict=False)
        if ip.version == network.version and ip in network:
            return True
    return False


def from_address(headers: Sequence[tuple[str, str]]) -> str:
    values = [v for n, v in headers if n.strip().lower() == "from"]
    if len(values) != 1:
        return ""
    addrs = email.utils.getaddresses([values[0]])
    return addrs[0][1] if len(addrs) == 1 else ""


async def verify(tx: Transaction, rt: Runtime) -> CheckResult:
    cfg = rt.config.dkim
    msg = tx.message
    body = msg.body_file()
    body.seek(0)
    results = await dkimlib.verify(message_headers(msg), body, rt.resolver,
                                   max_signatures=cfg.max_signatures,
                                   min_rsa_bits=cfg.min_rsa_bits, now=rt.clock())
    symbols = [symbol(rt, _SYMBOLS.get(r.result, "DKIM_PERMFAIL"),
                      f"{r.domain}:{r.result}{':' + r.reason if r.reason else ''}")
               for r in results]
    if not results:
        symbols = [symbol(rt, "DKIM_NONE")]
    reason = ",".join(f"{r.domain or '?'}={r.result}" for r in results) or "none"
    return CheckResult(NAME, symbols, reason=reason, data=results,
                       extra={"dkim": reason})


def _already_signed(headers: Sequence[tuple[str, str]], keys: Sequence[SigningKey]) -> bool:
    ours = {(k.domain.lower(), k.selector.lower()) for k in keys}
    for name, value in headers:
        if name.strip().lower() != "dkim-signature":
            continue
        tags = dict(part.strip().split("=", 1) for part in value.replace("\n", "").split(";")
                    if "=" in part)
        d, s = tags.get("d", "").strip().lower(), tags.get("s", "").strip().lower()
        if (d, s) in ours:
            return True
    return False


def sign_message(tx: Transaction, rt: Runtime) -> CheckResult:
    """DKIM-Signature headers for an outgoing message (none when no key applies)."""
    cfg = rt.config.dkim
    table: KeyTable | None = rt.services.get(KEYTABLE_SERVICE)
    msg = tx.message
    sender = from_address(msg.headers)
    keys = table.keys_for(sender) if table is not None and sender else []
    if not keys:
        return CheckResult(NAME, reason="sign:no-key")
    if _already_signed(msg.headers, keys):
        return CheckResult(NAME, reason="sign:already-signed")
    body = msg.body_file()
    body.seek(0)
    values = sign(message_headers(msg), body, keys, sign_headers=cfg.sign_headers,
                  oversign=cfg.oversign_headers, canonicalization=cfg.canonicalization,
                  ttl=cfg.signature_ttl, now=rt.clock())
    signed = ",".join(f"{k.domain}/{k.selector}" for k in keys)
    return CheckResult(NAME, [Symbol("DKIM_SIGNED", 0.0, signed)],
                       headers=[HeaderEdit("DKIM-Signature", v) for v in values],
                       reason=f"signed:{signed}")
