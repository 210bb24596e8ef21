"""DKIM signing of outgoing mail, end of message.

Outgoing: a client in ``[dkim] internal_hosts`` or a SASL-authenticated one.
Signs with every key the KeyTable gives for the From address (two keys of one
domain: dual signing) -- and never twice: a message that already carries our
own signature (same d= and s=) is not signed again.

Config: ``[dkim] mode, sign, keys, signing_table, internal_hosts, sign_headers,
oversign_headers, canonicalization, signature_ttl``. Symbol: DKIM_SIGNED.
"""

from __future__ import annotations

import email.utils
import ipaddress
from collections.abc import Sequence

from mxguard.auth.dkim_keys import KeyTable, SigningKey
from mxguard.auth.dkim_sign import sign
from mxguard.checks.dkim_verify import message_headers
from mxguard.config import Config, DkimConfig
from mxguard.core.runtime import Runtime
from mxguard.core.transaction import CheckResult, HeaderEdit, Symbol, Transaction

NAME = "dkim_sign"
SYMBOLS = ("DKIM_SIGNED",)
KEYTABLE_SERVICE = "dkim_keys"


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


def outgoing(tx: Transaction, cfg: Config) -> bool:
    """The pipeline's direction test: outgoing mail is signed, incoming checked."""
    return is_outgoing(tx, cfg.dkim)


def from_address(headers: Sequence[tuple[str, str]]) -> str:
    values = [v for n, v in headers if n.strip().lower() == "from"]
    if len(values) != 1:
        return ""
    addrs = email.utils.getaddresses([values[0]])
    return addrs[0][1] if len(addrs) == 1 else ""


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
    if msg is None:
        return CheckResult(NAME, reason="sign:no-message")
    sender = from_address(msg.headers)
    keys = table.keys_for(sender) if table is not None and sender else []
    if not keys:
        return CheckResult(NAME, reason="sign:no-key")
    if _already_signed(msg.headers, keys):
        return CheckResult(NAME, reason="sign:already-signed")
    values = sign(message_headers(msg), msg.body_file(), keys, sign_headers=cfg.sign_headers,
                  oversign=cfg.oversign_headers, canonicalization=cfg.canonicalization,
                  ttl=cfg.signature_ttl, now=rt.clock())
    signed = ",".join(f"{k.domain}/{k.selector}" for k in keys)
    return CheckResult(NAME, [Symbol("DKIM_SIGNED", 0.0, signed)],
                       headers=[HeaderEdit("DKIM-Signature", v) for v in values],
                       reason=f"signed:{signed}")


async def check(tx: Transaction, rt: Runtime) -> CheckResult | None:
    return sign_message(tx, rt)


__all__ = ["KEYTABLE_SERVICE", "NAME", "SYMBOLS", "check", "from_address", "is_outgoing",
           "outgoing", "sign_message"]
