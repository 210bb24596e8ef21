"""What a milter handler sees and answers: the session, the result, the handler protocol.

A :class:`MilterSession` holds what the MTA told us on one milter connection
(client, HELO, macros; sender, recipients, headers and body of the current
message). Bodies stay in memory up to ``max_body_memory`` and are spooled to a
temporary file beyond. A message past one of its limits -- ``max_message_size``
bytes of headers and body, ``max_headers`` header lines, ``max_header_bytes``
bytes of headers -- is marked (``session.over_limit`` names the limit,
``session.truncated`` is set) and everything kept of it so far is dropped, as is
the rest as it arrives: the server answers it without running the handler. A
:class:`MilterHandler` decides at each stage and answers ``None`` (continue)
or a :class:`MilterResult`; :class:`BaseMilterHandler` continues everywhere.
The server that feeds them is :mod:`mxguard.server.milter`.
"""

from __future__ import annotations

import enum
import io
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO, Protocol

from mxguard.core.transaction import (
    Action,
    Decision,
    HeaderChange,
    HeaderEdit,
    Message,
    Stage,
    Transaction,
)

_CONN_STAGES = "CH"  # macros of these commands live for the whole SMTP session
_STAGE_ORDER = "CHMRTLNBEU"


class MilterAction(enum.StrEnum):
    CONTINUE = "continue"  # no objection (at EOM: deliver)
    ACCEPT = "accept"  # deliver; no more events for this message (connection, at connect)
    REJECT = "reject"  # 5xx (``reply`` gives code and text)
    TEMPFAIL = "tempfail"  # 4xx (``reply`` gives code and text)
    DISCARD = "discard"  # accept and drop silently (not at connect/HELO)
    QUARANTINE = "quarantine"  # deliver to Postfix's hold queue (EOM only)


@dataclass(slots=True)
class MilterResult:
    """What a handler answers. ``reply`` (code, enhanced code, text) is used with
    REJECT / TEMPFAIL; the SMTP client sees exactly that reply. ``headers`` (in
    order; ``HeaderEdit`` prepend = insert at the top, append = add),
    ``replace_body`` (the whole new body, CRLF line ends; a file is read from
    its current position) and ``quarantine_reason`` apply at end of message
    only."""

    action: MilterAction = MilterAction.CONTINUE
    reply: Decision | None = None
    headers: list[HeaderEdit | HeaderChange] = field(default_factory=list)
    quarantine_reason: str = ""
    replace_body: bytes | IO[bytes] | None = None

    @classmethod
    def reject(cls, text: str, code: int = 550, enhanced: str = "5.7.1") -> MilterResult:
        return cls(MilterAction.REJECT, Decision(Action.REJECT, code, enhanced, text))

    @classmethod
    def tempfail(cls, text: str, code: int = 451, enhanced: str = "4.7.1") -> MilterResult:
        return cls(MilterAction.TEMPFAIL, Decision(Action.DEFER, code, enhanced, text))

    @classmethod
    def from_decision(cls, decision: Decision | None,
                      headers: Sequence[HeaderEdit | HeaderChange] = ()) -> MilterResult:
        """A verdict's decision as a milter answer (no decision / ACCEPT: continue)."""
        if decision is None or decision.action is Action.ACCEPT:
            return cls(headers=list(headers))
        action = MilterAction.REJECT if decision.action is Action.REJECT else MilterAction.TEMPFAIL
        return cls(action, decision)


class MilterSession:
    """Everything the MTA told us on one milter connection, for the current message.

    Connection state (client, HELO, connect/HELO macros) lives until ``K`` or
    disconnect; message state (sender, recipients, headers, body, other
    macros) is reset after end of message and on abort. ``headers`` holds
    ``(name, value)`` exactly as received: with ``headers_exact`` (HDR_LEADSPC
    negotiated) the value keeps its leading whitespace, folded lines are joined
    by ``\\n``.
    """

    def __init__(self, max_body_memory: int = 1024 * 1024,
                 max_message_size: int = 64 * 1024 * 1024, spool_dir: str = "", *,
                 max_headers: int = 2000, max_header_bytes: int = 1024 * 1024) -> None:
        self.max_body_memory = max_body_memory
        self.max_message_size = max_message_size
        self.max_headers = max_headers
        self.max_header_bytes = max_header_bytes
        self.spool_dir = spool_dir or None
        self.headers_exact = False
        self._body: tempfile.SpooledTemporaryFile[bytes] | None = None
        self._macros: dict[str, dict[str, str]] = {}
        self.reset_connection()

    # -- state changes (called by the server) --------------------------------

    def reset_connection(self) -> None:
        self.client_hostname = ""
        self.client_family = ""
        self.client_address = ""
        self.client_port = 0
        self.helo = ""
        self.stage = Stage.CONNECT
        self._macros = {}
        self.reset_message()

    def reset_message(self) -> None:
        self.close_body()
        for stage in [s for s in self._macros if s not in _CONN_STAGES]:
            del self._macros[stage]
        self.in_message = False
        if self.stage > Stage.HELO:
            self.stage = Stage.HELO
        self.mail_from = ""
        self.mail_args: list[str] = []
        self.rcpts: list[str] = []
        self.rcpt_args: list[list[str]] = []
        self.headers: list[tuple[str, str]] = []
        self.header_bytes = 0
        self.header_count = 0  # header lines received, kept or not
        self.body_size = 0
        self.received = 0  # header and body bytes received, kept or not
        self.truncated = False
        self.over_limit = ""  # the limit the message went past: "max_headers" ...
        self._on_disk = False

    def set_macros(self, stage: str, macros: dict[str, str]) -> None:
        """Macros sent before command ``stage``; replaces that stage's earlier ones."""
        self._macros[stage] = dict(macros)

    def start_message(self, sender: str, args: Sequence[str]) -> None:
        self.in_message = True
        self.stage = Stage.MAIL
        self.mail_from, self.mail_args = sender, list(args)

    def add_header(self, name: str, value: str) -> bool:
        """Store a header; False once the message is past a limit (nothing kept)."""
        size = len(name) + len(value) + 3
        self.header_count += 1
        self.received += size
        if self.over_limit:
            return False
        if self.header_count > self.max_headers:
            return self.exceeded("max_headers")
        if self.header_bytes + size > self.max_header_bytes:
            return self.exceeded("max_header_bytes")
        if self.message_size + size > self.max_message_size:
            return self.exceeded("max_message_size")
        self.headers.append((name, value))
        self.header_bytes += size
        return True

    def add_body(self, chunk: bytes) -> bool:
        """Store a body chunk; False once the message is past a limit (nothing kept)."""
        self.received += len(chunk)
        if self.over_limit:
            return False
        if len(chunk) > self.max_message_size - self.message_size:
            return self.exceeded("max_message_size")
        if self._body is None:
            self._body = tempfile.SpooledTemporaryFile(  # noqa: SIM115 -- lives per message
                max_size=self.max_body_memory, prefix="mxguard-body-", dir=self.spool_dir)
        self._body.write(chunk)
        self.body_size += len(chunk)
        if self.body_size > self.max_body_memory and not self._on_disk:
            self._body.rollover()
            self._on_disk = True
        return True

    def exceeded(self, limit: str) -> bool:
        """Mark the message as past ``limit`` and drop what was kept of it: it will
        be refused unread, so neither headers nor body need to stay. False."""
        self.over_limit, self.truncated = limit, True
        self.headers = []
        self.header_bytes = self.body_size = 0
        self.close_body()
        return False

    def close_body(self) -> None:
        if self._body is not None:
            self._body.close()
            self._body = None

    # -- what handlers read ---------------------------------------------------

    @property
    def macros(self) -> dict[str, str]:
        """All macros in force, later stages winning (``i`` arrives late)."""
        merged: dict[str, str] = {}
        for stage in sorted(self._macros, key=lambda s: _STAGE_ORDER.find(s)):
            merged.update(self._macros[stage])
        return merged

    def macro(self, name: str, default: str = "") -> str:
        """A macro by name, with or without braces: ``macro("auth_authen")``."""
        bare = name.strip("{}")
        merged = self.macros
        for key in (bare, "{" + bare + "}"):
            if key in merged:
                return merged[key]
        return default

    @property
    def queue_id(self) -> str:
        return self.macro("i")

    @property
    def auth_user(self) -> str:
        return self.macro("auth_authen")

    @property
    def client_name(self) -> str:
        """Verified client name, ``unknown`` if none (Postfix sends ``[addr]`` then)."""
        name = self.macro("client_name") or self.client_hostname
        return "unknown" if not name or name.startswith("[") else name

    @property
    def message_size(self) -> int:
        return self.header_bytes + self.body_size

    @property
    def body_on_disk(self) -> bool:
        return self._on_disk

    def body_file(self) -> IO[bytes]:
        """The body (CRLF line ends), positioned at its start. Do not close it."""
        if self._body is None:
            return io.BytesIO()
        self._body.seek(0)
        return self._body

    def read_body(self) -> bytes:
        """The whole body in memory: only for callers that know it is small."""
        return self.body_file().read()

    def raw_headers(self) -> list[bytes]:
        """``b"Name:value\\r\\n"`` per header; byte-exact when ``headers_exact``."""
        out = []
        for name, value in self.headers:
            if not self.headers_exact:
                value = " " + value  # Postfix ate one space (we cannot know it was there)
            text = f"{name}:{value}".replace("\n", "\r\n") + "\r\n"
            out.append(text.encode("utf-8", "surrogateescape"))
        return out

    def transaction(self) -> Transaction:
        """The session as the core model sees it (attribute names as in policy)."""
        return Transaction(
            stage=self.stage,
            client_address=self.client_address, client_name=self.client_name,
            reverse_client_name=self.macro("client_ptr", "unknown") or "unknown",
            client_port=str(self.client_port) if self.client_port else "",
            helo=self.helo, sender=self.mail_from, recipients=list(self.rcpts),
            queue_id=self.queue_id, sasl_username=self.auth_user,
            sasl_method=self.macro("auth_type"), protocol_name="ESMTP",
            server_address=self.macro("daemon_addr"), server_port=self.macro("daemon_port"),
            size=self.message_size, attrs=self.macros,
        )

    def message(self) -> Message:
        """The message as checks see it (no session, no wire)."""
        return Message(self.headers, self.body_file, self.message_size,
                       headers_exact=self.headers_exact, truncated=self.truncated)


class MilterHandler(Protocol):
    """The decisions; see :class:`BaseMilterHandler` for do-nothing defaults."""

    async def on_connect(self, session: MilterSession) -> MilterResult | None: ...
    async def on_helo(self, session: MilterSession) -> MilterResult | None: ...
    async def on_mail(self, session: MilterSession) -> MilterResult | None: ...
    async def on_rcpt(self, session: MilterSession) -> MilterResult | None: ...
    async def on_end_of_message(self, session: MilterSession) -> MilterResult: ...


class BaseMilterHandler:
    """Continue at every stage, deliver unchanged at end of message."""

    async def on_connect(self, session: MilterSession) -> MilterResult | None:
        return None

    async def on_helo(self, session: MilterSession) -> MilterResult | None:
        return None

    async def on_mail(self, session: MilterSession) -> MilterResult | None:
        return None

    async def on_rcpt(self, session: MilterSession) -> MilterResult | None:
        return None

    async def on_end_of_message(self, session: MilterSession) -> MilterResult:
        return MilterResult()


__all__ = ["BaseMilterHandler", "MilterAction", "MilterHandler", "MilterResult", "MilterSession"]
