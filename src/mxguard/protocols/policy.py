"""Postfix SMTPD policy delegation protocol: a sans-I/O codec.

A request is ``name=value`` lines ended by an empty line; the reply is
``action=...`` and an empty line (Postfix SMTPD_POLICY_README). The codec
turns bytes into :class:`PolicyRequest` objects and a :class:`Verdict` back
into reply bytes. It knows nothing about greylisting or SPF.

Limits protect the daemon: a line or request longer than ``max_bytes``, a
line without ``=``, NUL bytes or too many attributes raise
:class:`PolicyProtocolError`; the server logs it and closes that connection.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import repeat

from mxguard.core.transaction import Action, Stage, Transaction, Verdict

# Every attribute Postfix 3.7 sends (SMTPD_POLICY_README, checked against
# conformance/postfix-3.7-capture/policy.jsonl). Others are kept but logged.
KNOWN_ATTRIBUTES = frozenset({
    "request", "protocol_state", "protocol_name", "helo_name", "queue_id", "sender",
    "recipient", "recipient_count", "client_address", "client_name", "client_port",
    "reverse_client_name", "server_address", "server_port", "instance", "sasl_method",
    "sasl_username", "sasl_sender", "size", "ccert_subject", "ccert_issuer",
    "ccert_fingerprint", "ccert_pubkey_fingerprint", "encryption_protocol",
    "encryption_cipher", "encryption_keysize", "etrn_domain", "stress", "policy_context",
    "compatibility_level", "mail_version", "client_ptr_name",
})

STAGES = {
    "CONNECT": Stage.CONNECT, "EHLO": Stage.HELO, "HELO": Stage.HELO, "MAIL": Stage.MAIL,
    "RCPT": Stage.RCPT, "DATA": Stage.DATA, "BDAT": Stage.DATA, "END-OF-MESSAGE": Stage.EOM,
    "VRFY": Stage.RCPT,
}


class PolicyProtocolError(Exception):
    """The peer broke the protocol; close the connection."""


@dataclass(slots=True)
class PolicyRequest:
    attrs: dict[str, str]
    unknown: tuple[str, ...] = ()

    def transaction(self) -> Transaction:
        a = self.attrs
        rcpt = a.get("recipient", "")
        try:
            size = int(a.get("size", "0") or 0)
        except ValueError:
            size = 0
        return Transaction(
            stage=STAGES.get(a.get("protocol_state", "").upper(), Stage.CONNECT),
            client_address=a.get("client_address", ""),
            client_name=a.get("client_name", "unknown") or "unknown",
            reverse_client_name=a.get("reverse_client_name", "unknown") or "unknown",
            client_port=a.get("client_port", ""),
            helo=a.get("helo_name", ""),
            sender=a.get("sender", ""),
            recipients=[rcpt] if rcpt else [],
            queue_id=a.get("queue_id", ""),
            instance=a.get("instance", ""),
            sasl_username=a.get("sasl_username", ""),
            sasl_method=a.get("sasl_method", ""),
            protocol_name=a.get("protocol_name", ""),
            server_address=a.get("server_address", ""),
            server_port=a.get("server_port", ""),
            size=size,
            attrs=a,
        )


class PolicyDecoder:
    """Feed bytes, get complete requests. Raises :class:`PolicyProtocolError`."""

    def __init__(self, max_bytes: int = 65536, max_attributes: int = 256) -> None:
        self.max_bytes = max_bytes
        self.max_attributes = max_attributes
        self._buf = bytearray()

    @property
    def pending(self) -> bool:
        """True when part of a request has arrived but not its end."""
        return bool(self._buf)

    @property
    def buffered(self) -> int:
        """Bytes held: the part of a request that has arrived (at most ``max_bytes``)."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[PolicyRequest]:
        if b"\0" in data:
            raise PolicyProtocolError("NUL byte in request")
        buf = self._buf
        buf += data
        if b"\r" in buf:
            buf[:] = buf.replace(b"\r\n", b"\n")
        out: list[PolicyRequest] = []
        while buf:
            if buf[0] == 0x0A:
                raise PolicyProtocolError("empty request")
            end = buf.find(b"\n\n")
            if end < 0:
                if len(buf) > self.max_bytes:
                    raise PolicyProtocolError(f"request longer than {self.max_bytes} bytes")
                break
            if end > self.max_bytes:
                raise PolicyProtocolError(f"request longer than {self.max_bytes} bytes")
            block = buf[:end].decode("utf-8", "surrogateescape")
            del buf[: end + 2]
            out.append(self._request(block.split("\n")))
        return out

    def _request(self, lines: list[str]) -> PolicyRequest:
        if len(lines) > self.max_attributes:
            raise PolicyProtocolError(f"more than {self.max_attributes} attributes")
        # The usual request: every line name=value, every name known. Split in C in
        # one go (a third of the cost of the loop below); anything else -- a line
        # without "=", an empty or unknown name -- takes the loop, which says why.
        try:
            attrs = dict(map(str.split, lines, repeat("="), repeat(1)))
        except ValueError:
            pass
        else:
            if attrs.keys() <= KNOWN_ATTRIBUTES:
                if attrs.get("request") != "smtpd_access_policy":
                    raise PolicyProtocolError(
                        f"unsupported request={attrs.get('request', '')!r}")
                return PolicyRequest(attrs)
        attrs = {}
        unknown: list[str] = []
        for line in lines:
            key, sep, value = line.partition("=")
            if not sep or not key:
                raise PolicyProtocolError(f"line without name=value: {line[:60]!r}")
            if key not in KNOWN_ATTRIBUTES:
                key = key.strip()
                unknown.append(key)
            attrs[key] = value
        if attrs.get("request") != "smtpd_access_policy":
            raise PolicyProtocolError(f"unsupported request={attrs.get('request', '')!r}")
        return PolicyRequest(attrs, tuple(unknown))


def _clean(text: str) -> str:
    """One line of printable text: a reply must never smuggle a newline."""
    return " ".join(text.replace("\r", " ").replace("\n", " ").split())


def encode_action(verdict: Verdict, *, prepend: bool = True, mta_prefix: bool = False) -> str:
    """The access(5) action for a verdict: ``DUNNO``, ``450 4.2.0 text`` ...

    ``mta_prefix``: Postfix writes the decision's prefix itself (HELO context).
    """
    d = verdict.decision
    if d is None or verdict.action is Action.ACCEPT:
        if prepend and verdict.headers:
            h = verdict.headers[0]
            return _clean(f"PREPEND {h.name}: {h.value}")
        return "DUNNO"
    text = _clean(d.text if mta_prefix else d.prefix + d.text)
    if verdict.action is Action.DEFER_IF_PERMIT:
        return f"DEFER_IF_PERMIT {d.enhanced} {text}"
    return f"{d.code} {d.enhanced} {text}"


def encode_reply(action: str) -> bytes:
    return f"action={_clean(action)}\n\n".encode("utf-8", "surrogateescape")
