"""The core model: what we know about one SMTP transaction, what checks say
about it, and the one verdict that comes out.

* :class:`Transaction` -- everything known about a session/message at a stage.
* :class:`Symbol` -- a named finding with a score (``HELO_NOT_FQDN``, 1.5).
* :class:`Decision` -- a hard decision (reject / defer ...) with SMTP code,
  RFC 3463 enhanced status code and a text a remote admin can act on.
* :class:`CheckResult` -- what one check returns: symbols, an optional
  decision, header edits.
* :class:`Verdict` -- the merge of all results for one request.

Nothing here does I/O and nothing here knows a wire protocol.
"""

from __future__ import annotations

import enum
import functools
import io
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any


class Stage(enum.IntEnum):
    """SMTP stages in protocol order; checks are registered for one stage."""

    CONNECT = 1
    HELO = 2
    MAIL = 3
    RCPT = 4
    DATA = 5
    EOM = 6
    DONE = 7  # after the verdict: checks that read it (spam headers, autolearn)


class Mode(enum.StrEnum):
    """How a check's findings are used (the ``mode`` key of every check section)."""

    ENFORCE = "enforce"  # the hard decision is sent
    SCORE = "score"  # only adds its symbols to the score
    OBSERVE = "observe"  # logs what it would have done, changes nothing
    OFF = "off"  # not run


class Action(enum.StrEnum):
    """Outcomes, ordered by :data:`ACTION_RANK` (the strongest wins)."""

    ACCEPT = "accept"  # no objection (policy DUNNO)
    QUARANTINE = "quarantine"  # deliver to the MTA's hold queue (end of message only)
    DEFER_IF_PERMIT = "defer_if_permit"  # temporary failure unless later restrictions reject
    DEFER = "defer"  # temporary failure (4xx)
    REJECT = "reject"  # permanent failure (5xx)


ACTION_RANK = {Action.ACCEPT: 0, Action.QUARANTINE: 1, Action.DEFER_IF_PERMIT: 2,
               Action.DEFER: 3, Action.REJECT: 4}


@dataclass(frozen=True, slots=True)
class Symbol:
    name: str
    score: float = 0.0
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Decision:
    """``prefix`` is the part an MTA adds itself in some contexts, e.g.
    ``"<name>: Helo command rejected: "`` which Postfix writes when the policy
    runs in smtpd_helo_restrictions; the door leaves it out there."""

    action: Action
    code: int
    enhanced: str
    text: str
    prefix: str = ""

    def reply(self, *, with_prefix: bool = True) -> str:
        """``"450 4.2.0 Greylisted ..."`` -- the full SMTP reply line."""
        prefix = self.prefix if with_prefix else ""
        return f"{self.code} {self.enhanced} {prefix}{self.text}"


@dataclass(frozen=True, slots=True)
class HeaderEdit:
    """A header a check wants on the message; ``op`` is ``prepend`` or ``append``."""

    name: str
    value: str
    op: str = "prepend"


@dataclass(frozen=True, slots=True)
class HeaderChange:
    """A header edit beyond add/prepend.

    ``op``: ``add`` (append), ``insert`` (at 0-based ``index``, 0 = top),
    ``change`` / ``delete`` (the ``index``-th, 1-based, header called ``name``).
    """

    op: str
    name: str
    value: str = ""
    index: int = 0

    @classmethod
    def add(cls, name: str, value: str) -> HeaderChange:
        return cls("add", name, value)

    @classmethod
    def insert(cls, index: int, name: str, value: str) -> HeaderChange:
        return cls("insert", name, value, index)

    @classmethod
    def change(cls, name: str, value: str, occurrence: int = 1) -> HeaderChange:
        return cls("change", name, value, occurrence)

    @classmethod
    def delete(cls, name: str, occurrence: int = 1) -> HeaderChange:
        return cls("delete", name, "", occurrence)


Edit = HeaderEdit | HeaderChange


@dataclass(slots=True)
class Message:
    """The message at end of data, as checks see it: no wire, no session.

    ``headers``: ``(name, value)`` in order; with ``headers_exact`` the value
    keeps its leading whitespace (``"Subject: x"`` -> ``" x"``), folded lines
    joined by ``\n``. ``body()`` opens the body (CRLF line ends) at its start;
    ``size`` counts header and body bytes; ``truncated``: bytes past the
    size limit were not kept.
    """

    headers: list[tuple[str, str]] = field(default_factory=list)
    body: Callable[[], IO[bytes]] = io.BytesIO
    size: int = 0
    headers_exact: bool = True
    truncated: bool = False

    def body_file(self) -> IO[bytes]:
        """The body, positioned at its start. Do not close it."""
        fh = self.body()
        fh.seek(0)
        return fh

    @classmethod
    def from_bytes(cls, raw: bytes) -> Message:
        """A message file (``mxguard scan``) as the milter door would have seen it."""
        text = raw.replace(b"\r\n", b"\n")
        head, sep, body = text.partition(b"\n\n")
        if not sep and not head.startswith((b" ", b"\t")) and b":" not in head.split(b"\n")[0]:
            head, body = b"", text
        headers: list[tuple[str, str]] = []
        for line in head.decode("utf-8", "surrogateescape").split("\n"):
            if line[:1] in (" ", "\t") and headers:
                name, value = headers[-1]
                headers[-1] = (name, value + "\n" + line)
            elif ":" in line:
                name, _, value = line.partition(":")
                headers.append((name, value))
        crlf = body.replace(b"\n", b"\r\n")
        size = len(head) + len(crlf)
        return cls(headers, lambda: io.BytesIO(crlf), size)


@dataclass(slots=True)
class CheckResult:
    check: str
    symbols: list[Symbol] = field(default_factory=list)
    decision: Decision | None = None
    headers: list[HeaderEdit] = field(default_factory=list)
    reason: str = ""  # short key=value friendly reason for logs
    extra: dict[str, str] = field(default_factory=dict)  # e.g. {"delay": "287"}
    data: Any = None  # structured result for later checks (e.g. DKIM results for DMARC)
    edits: list[Edit] = field(default_factory=list)  # header changes beyond prepend/append
    replace_body: Any = None  # a new body (bytes or a file) at end of message


def _ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    # checks ask several times a request; addresses are immutable, so one parse is
    # shared. Only address-sized text is remembered (bounded in bytes, not just count).
    return _parse_ip(value) if len(value) <= 100 else _parse_ip.__wrapped__(value)


@functools.lru_cache(maxsize=8192)
def _parse_ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


@dataclass(slots=True)
class Transaction:
    """One SMTP transaction as seen at some stage.

    Attribute names follow Postfix's policy attributes where one exists.
    ``client_name`` is the verified (forward-confirmed) name or ``unknown``.
    """

    stage: Stage = Stage.RCPT
    client_address: str = ""
    client_name: str = "unknown"
    reverse_client_name: str = "unknown"
    client_port: str = ""
    helo: str = ""
    sender: str = ""
    recipients: list[str] = field(default_factory=list)
    queue_id: str = ""
    instance: str = ""
    sasl_username: str = ""
    sasl_method: str = ""
    protocol_name: str = ""
    server_address: str = ""
    server_port: str = ""
    size: int = 0
    attrs: dict[str, str] = field(default_factory=dict)  # every raw attribute received
    results: dict[str, CheckResult] = field(default_factory=dict)
    message: Message | None = None  # at end of message
    outgoing: bool = False  # mail to sign (internal or authenticated client), set by the runner
    parsed: Any = None  # the parsed MIME message, once a check needed it
    verdict: Verdict | None = None  # after the verdict: what the result checks see

    @property
    def recipient(self) -> str:
        return self.recipients[-1] if self.recipients else ""

    @property
    def client_ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        return _ip(self.client_address)

    @property
    def authenticated(self) -> bool:
        return bool(self.sasl_username)


@dataclass(slots=True)
class Verdict:
    """What we answer for one request: the merged result of every check run."""

    action: Action = Action.ACCEPT
    decision: Decision | None = None
    decided_by: str = ""
    score: float = 0.0
    symbols: list[Symbol] = field(default_factory=list)
    headers: list[Edit] = field(default_factory=list)
    replace_body: Any = None
    timings: dict[str, float] = field(default_factory=dict)  # check -> milliseconds
    observed: list[str] = field(default_factory=list)  # "check:reply" that observe mode held back
    reasons: list[str] = field(default_factory=list)
    extra: dict[str, str] = field(default_factory=dict)

    def add(self, result: CheckResult, mode: Mode) -> None:
        """Merge one check's result under its effective mode."""
        if result.reason:
            self.reasons.append(f"{result.check}:{result.reason}")
        self.extra.update(result.extra)
        if mode is Mode.OBSERVE:
            self.symbols.extend(Symbol(s.name, 0.0, s.detail) for s in result.symbols)
            if result.decision is not None:
                self.observed.append(f"{result.check}:{result.decision.reply()}")
            return
        self.symbols.extend(result.symbols)
        self.score += sum(s.score for s in result.symbols)
        self.headers.extend(result.headers)
        self.headers.extend(result.edits)
        if result.replace_body is not None:
            self.replace_body = result.replace_body
        if mode is Mode.ENFORCE and result.decision is not None:
            d = result.decision
            if self.decision is None or ACTION_RANK[d.action] > ACTION_RANK[self.action]:
                self.decision = d
                self.action = d.action
                self.decided_by = result.check
