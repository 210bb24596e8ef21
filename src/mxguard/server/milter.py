"""The asyncio server for the milter door.

One :class:`asyncio.Protocol` per MTA connection (Postfix opens one per SMTP
session). Commands are handled strictly in order; a
:class:`~mxguard.server.milter_session.MilterSession` accumulates what the MTA
tells us and a :class:`~mxguard.server.milter_session.MilterHandler` decides:

* ``on_connect``, ``on_helo``, ``on_mail``, ``on_rcpt`` may return ``None``
  (continue) or a :class:`MilterResult` (reject, tempfail, custom reply ...);
* ``on_end_of_message`` returns the final :class:`MilterResult` with header
  edits, an optional new body (``replace_body``, sent as ``SMFIR_REPLBODY``
  packets when the MTA granted ``SMFIF_CHGBODY``) and an optional quarantine.
  While it runs, ``SMFIR_PROGRESS`` is sent every ``progress_interval``
  seconds so Postfix's content timeout does not fire.

A handler that raises or runs out of time gets ``fail_action`` (tempfail by
default: Postfix keeps the mail and the client retries) and a log line. Abort
(``A``, sent by Postfix before every new message and on RSET) resets the
message and keeps connect/HELO; ``K`` resets everything. Bad input closes only
that connection. Bodies stay in memory up to ``max_body_memory`` and are
spooled to a temporary file beyond. A message past ``max_message_size``,
``max_headers`` or ``max_header_bytes`` is dropped as it arrives (Postfix is
told to skip the rest of its body when it understands SMFIR_SKIP and body
replies are on) and answered at end of message by ``limit_action`` -- 552 5.3.4
by default -- without running the handler, with a log line.

Memory per connection is bounded by ``max_packet`` (the largest packet taken;
the decoder holds at most one incomplete packet), ``MAX_QUEUED_BYTES`` of
decoded commands waiting for the handler, and the message limits above; all
connections together by ``max_buffered_total`` bytes of incomplete packets and
waiting commands: past it, the connection holding the most is closed (logged).
Idle sweeper, ``max_connections`` and graceful close work like the policy
server's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import typing
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from mxguard.core.transaction import HeaderChange, HeaderEdit, Stage
from mxguard.protocols import milter as m
from mxguard.server.milter_session import (
    BaseMilterHandler,
    MilterAction,
    MilterHandler,
    MilterResult,
    MilterSession,
)
from mxguard.server.policy import admit, listen

log = logging.getLogger("mxguard")

FAIL_ACTIONS = ("tempfail", "accept", "reject")
MAX_QUEUED = 64  # commands buffered per connection before we stop reading
MAX_QUEUED_BYTES = 256 * 1024
# What a message past a limit gets: the remote client reads it (Postfix's own
# wording for message_size_limit); the log line names the limit.
LIMIT_TEXT = {"max_message_size": "Message size exceeds fixed limit",
              "max_headers": "Message header exceeds fixed limit (too many lines)",
              "max_header_bytes": "Message header exceeds fixed limit"}
# Postfix writes milter commands with Nagle on; after a command that gets no reply
# (DATA with SMFIP_NR_DATA, headers, ABORT, macros) its next write waits for our ACK,
# which the kernel delays up to 40 ms when we have nothing to send: ACK at once.
_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


@dataclass(frozen=True)
class MilterServerSettings:
    """What ``[milter]`` in the config file will carry."""

    listen: str = "127.0.0.1:8894"
    max_body_memory: int = 1024 * 1024  # body bytes held in memory, then a temp file
    max_message_size: int = 64 * 1024 * 1024  # headers + body kept; past it: limit_action
    max_headers: int = 2000  # header lines per message; past it: limit_action
    max_header_bytes: int = 1024 * 1024  # header bytes per message; past it: limit_action
    limit_action: str = "reject"  # reject (552 5.3.4) | tempfail (452 4.3.4) | accept
    max_buffered_total: int = 32 * 1024 * 1024  # incomplete packets + queued, all connections
    idle_timeout: float = 3600.0  # > Postfix smtpd_timeout: a milter socket idles during DATA
    max_connections: int = 1000
    progress_interval: float = 5.0  # seconds between SMFIR_PROGRESS while EOM runs
    fail_action: str = "tempfail"  # tempfail | accept | reject, when a handler fails
    stage_timeout: float = 25.0  # connect..rcpt handlers (Postfix milter_command_timeout 30)
    eom_timeout: float = 240.0  # end-of-message handler, keep-alives meanwhile
    max_packet: int = m.DEFAULT_MAX_PACKET
    spool_dir: str = ""  # where big bodies go; empty: the system temp dir
    # Reply to body chunks, so a body past max_message_size can be answered with
    # SMFIR_SKIP (Postfix stops sending it). Off: no body replies are asked for
    # (SMFIP_NR_BODY), one round trip less per message; the excess is read and
    # dropped. With Postfix's default message_size_limit (10240000) below the
    # default max_message_size nothing is ever skipped, hence off in the daemon.
    skip_large_bodies: bool = True

    def __post_init__(self) -> None:
        if self.fail_action not in FAIL_ACTIONS:
            raise ValueError(f"milter fail_action must be one of {', '.join(FAIL_ACTIONS)}")
        if self.limit_action not in FAIL_ACTIONS:
            raise ValueError(f"milter limit_action must be one of {', '.join(FAIL_ACTIONS)}")
        for name in ("max_body_memory", "max_message_size", "idle_timeout", "max_connections",
                     "progress_interval", "stage_timeout", "eom_timeout", "max_packet",
                     "max_headers", "max_header_bytes", "max_buffered_total"):
            if getattr(self, name) <= 0:
                raise ValueError(f"milter {name} must be positive")


Hook = Callable[[MilterSession], Awaitable[MilterResult | None]]


def _checked(name: str, result: object) -> MilterResult | None:
    if result is not None and not isinstance(result, MilterResult):
        raise TypeError(f"{name} returned {type(result).__name__}, not MilterResult")
    return result


def _weight(cmd: m.Command) -> int:
    if isinstance(cmd, m.Body | m.EndOfMessage):
        return len(cmd.chunk)
    if isinstance(cmd, m.Header):
        return len(cmd.name) + len(cmd.value)
    return 64


class _Connection(asyncio.Protocol):
    def __init__(self, server: MilterServer) -> None:
        self.server = server
        s = server.settings
        self.decoder = m.CommandDecoder(s.max_packet)
        self.session = MilterSession(s.max_body_memory, s.max_message_size, s.spool_dir,
                                     max_headers=s.max_headers,
                                     max_header_bytes=s.max_header_bytes)
        self.queue: deque[m.Command] = deque()
        self.queued_bytes = 0
        self.counted = 0  # our share of server.buffered_total
        self.busy = False
        self.paused = False
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None
        self.peer = "-"
        self.last = 0.0
        self.negotiated: m.OptNegReply | None = None
        self.tcp: typing.Any = None  # the TCP socket, for TCP_QUICKACK

    # -- transport events -----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not admit(self, transport, self.server.connections,
                     self.server.settings.max_connections, "milter"):
            return
        sock = transport.get_extra_info("socket")
        if _QUICKACK is not None and sock is not None and sock.family in (
                socket.AF_INET, socket.AF_INET6):
            self.tcp = sock

    def data_received(self, data: bytes) -> None:
        if self.tcp is not None:  # not sticky in Linux: renewed after every read
            try:
                self.tcp.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
            except OSError:
                self.tcp = None
        self.last = self.server.loop.time()
        try:
            commands = self.decoder.feed(data)
        except m.MilterProtocolError as exc:
            self.protocol_error(str(exc))
            return
        for cmd in commands:
            if not self.busy and not self.queue:
                # fast path: answer in place what needs no handler hook (macros,
                # headers, body, stages nobody hooks); a task only for the rest
                if self.closed:
                    return
                try:
                    replies = self.handle_now(cmd)
                except m.MilterProtocolError as exc:
                    self.protocol_error(str(exc))
                    return
                except Exception:
                    log.exception("milter: internal error on connection from %s; closing it",
                                  self.peer)
                    self.close()
                    return
                if replies is not None:
                    self.send(replies)
                    continue
            self.queue.append(cmd)
            self.queued_bytes += _weight(cmd)
        self.account()
        if self.transport is not None and (len(self.queue) > MAX_QUEUED
                                           or self.queued_bytes > MAX_QUEUED_BYTES):
            self.transport.pause_reading()
            self.paused = True
        if self.queue and not self.busy:
            self.busy = True
            self.task = self.server.loop.create_task(self._work())

    def account(self) -> None:
        """Update our share of the buffered bytes of all connections; past
        ``max_buffered_total``, the server closes whoever holds the most."""
        held = 0 if self.closed else self.decoder.buffered + self.queued_bytes
        self.server.buffered_total += held - self.counted
        self.counted = held
        if held and self.server.buffered_total > self.server.settings.max_buffered_total:
            self.server.shed()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.decoder.pending or self.session.in_message:
            log.info("milter: %s disconnected in the middle of a %s", self.peer,
                     "packet" if self.decoder.pending else "message")
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self.session.reset_connection()
        self.queue.clear()
        self.queued_bytes = 0
        self.server.buffered_total -= self.counted
        self.counted = 0
        self.server.connections.discard(self)
        self.transport = None

    def protocol_error(self, reason: str) -> None:
        log.warning("milter: protocol error from %s: %s; closing connection", self.peer, reason)
        self.server.stats["protocol_errors"] += 1
        self.queue.clear()
        self.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    @property
    def closed(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    @property
    def idle(self) -> bool:
        return not self.busy and not self.queue

    # -- the command loop -------------------------------------------------------

    async def _work(self) -> None:
        try:
            while self.queue and not self.closed:
                cmd = self.queue.popleft()
                self.queued_bytes -= _weight(cmd)
                self.account()
                self.send(await self.handle(cmd))
                self.maybe_resume()
        except m.MilterProtocolError as exc:
            self.protocol_error(str(exc))
        except Exception:
            log.exception("milter: internal error on connection from %s; closing it", self.peer)
            self.close()
        finally:
            self.busy = False
            self.last = self.server.loop.time()
            if self.server.closing and not self.session.in_message:
                self.close()

    def maybe_resume(self) -> None:
        if (self.paused and self.transport is not None and len(self.queue) <= MAX_QUEUED // 2
                and self.queued_bytes <= MAX_QUEUED_BYTES // 2):
            self.transport.resume_reading()
            self.paused = False

    def send(self, replies: Sequence[m.Reply]) -> None:
        if replies and not self.closed:
            assert self.transport is not None
            self.transport.write(b"".join(r.encode() for r in replies))

    def has(self, flag: int) -> bool:
        """Whether protocol flag ``flag`` was negotiated."""
        return self.negotiated is not None and bool(self.negotiated.protocol & flag)

    def handle_now(self, cmd: m.Command) -> list[m.Reply] | None:
        """The replies to ``cmd`` when no handler hook has to run (state updated,
        no task, no await); None when it needs :meth:`handle`. Stage commands
        whose hook the handler does not override are answered here."""
        if self.negotiated is None and not isinstance(cmd, m.OptNeg):
            raise m.MilterProtocolError(f"{type(cmd).__name__} before option negotiation")
        s, hooks = self.session, self.server.hooks
        match cmd:
            case m.Macro():
                s.set_macros(cmd.for_command, cmd.macros)
            case m.Header():
                s.stage = Stage.DATA
                s.add_header(cmd.name, cmd.value)
                return self.simple(m.SMFIP_NR_HDR)
            case m.Body():
                return self.body(cmd.chunk)
            case m.Rcpt():
                s.stage = Stage.RCPT
                s.rcpts.append(cmd.address)
                s.rcpt_args.append(list(cmd.esmtp_args))
                return None if "on_rcpt" in hooks else self.simple(m.SMFIP_NR_RCPT)
            case m.Mail():
                s.start_message(cmd.address, cmd.esmtp_args)
                return None if "on_mail" in hooks else self.simple(m.SMFIP_NR_MAIL)
            case m.EndOfMessage():
                return None
            case m.Connect():
                s.client_hostname, s.client_family = cmd.hostname, cmd.family
                s.client_address, s.client_port = cmd.address, cmd.port
                s.stage = Stage.CONNECT
                return None if "on_connect" in hooks else self.simple(m.SMFIP_NR_CONN)
            case m.Helo():
                s.helo, s.stage = cmd.name, Stage.HELO
                return None if "on_helo" in hooks else self.simple(m.SMFIP_NR_HELO)
            case m.OptNeg():
                return self.optneg(cmd)
            case m.Abort():
                s.reset_message()
            case m.Quit():
                self.close()
            case m.QuitNewConnection():
                s.reset_connection()
            case m.Data() | m.EndOfHeaders() | m.Unknown():
                return self.simple(_NO_REPLY_FLAG[type(cmd)])
        return []

    async def handle(self, cmd: m.Command) -> list[m.Reply]:
        replies = self.handle_now(cmd)
        if replies is not None:
            return replies
        h = self.server.handler
        match cmd:
            case m.Connect():
                return await self.stage(h.on_connect, m.SMFIP_NR_CONN, connection=True)
            case m.Helo():
                return await self.stage(h.on_helo, m.SMFIP_NR_HELO, connection=True)
            case m.Mail():
                return await self.stage(h.on_mail, m.SMFIP_NR_MAIL)
            case m.Rcpt():
                return await self.rcpt()
            case m.EndOfMessage():
                return await self.end_of_message(cmd.chunk)
        raise AssertionError(f"{type(cmd).__name__} has no handler stage")  # pragma: no cover

    def optneg(self, cmd: m.OptNeg) -> list[m.Reply]:
        # no reply wanted for the stages whose hook is the base class's no-op:
        # Postfix then streams them without waiting (fewer round trips)
        reply = m.negotiate(cmd, protocol=m.DEFAULT_PROTOCOL | self.server.no_reply)
        self.negotiated = reply
        self.session.headers_exact = bool(reply.protocol & m.SMFIP_HDR_LEADSPC)
        log.debug("milter: %s negotiated version %d actions 0x%x protocol 0x%x", self.peer,
                  reply.version, reply.actions, reply.protocol)
        return [reply]

    def simple(self, flag: int) -> list[m.Reply]:
        return [] if self.has(flag) else [m.Continue()]

    def body(self, chunk: bytes) -> list[m.Reply]:
        kept = self.session.add_body(chunk)
        if self.has(m.SMFIP_NR_BODY):
            return []
        if not kept and self.has(m.SMFIP_SKIP):  # the MTA understands 's'
            return [m.Skip()]
        return [m.Continue()]

    async def rcpt(self) -> list[m.Reply]:
        """The on_rcpt hook for the recipient :meth:`handle_now` just added."""
        replies = await self.stage(self.server.handler.on_rcpt, m.SMFIP_NR_RCPT)
        if replies and not isinstance(replies[0], m.Continue | m.Accept):
            self.session.rcpts.pop()  # refused: it will not get the message
            self.session.rcpt_args.pop()
        return replies

    async def stage(self, hook: Hook, flag: int, connection: bool = False) -> list[m.Reply]:
        result = await self.run_hook(hook)
        if self.has(flag):
            return []
        return [self.early_reply(result, connection)]

    async def run_hook(self, hook: Hook) -> MilterResult | None:
        name = getattr(hook, "__name__", "hook")
        try:
            async with asyncio.timeout(self.server.settings.stage_timeout):  # no extra task
                result = await hook(self.session)
            return _checked(name, result)
        except Exception as exc:
            return self.failed(name, exc)

    def failed(self, name: str, exc: Exception) -> MilterResult:
        action = self.server.settings.fail_action
        timeout = isinstance(exc, TimeoutError)
        log.error("milter: handler %s %s queue_id=%s client=%s; answering %s "
                  "(milter.fail_action)", name, "timed out" if timeout else f"failed: {exc!r}",
                  self.session.queue_id or "-", self.session.client_address or "-", action,
                  exc_info=not timeout)
        self.server.stats["handler_errors"] += 1
        return MilterResult({"tempfail": MilterAction.TEMPFAIL, "reject": MilterAction.REJECT}
                            .get(action, MilterAction.CONTINUE))

    def early_reply(self, result: MilterResult | None, connection: bool) -> m.Reply:
        if result is None:
            return m.Continue()
        if result.headers or result.replace_body is not None:
            log.warning("milter: message edits before end of message are ignored")
        action = result.action
        if action in (MilterAction.REJECT, MilterAction.TEMPFAIL):
            return self.refusal(result)
        if action is MilterAction.ACCEPT:
            return m.Accept()
        if action is MilterAction.DISCARD and not connection:
            return m.Discard()
        if action is not MilterAction.CONTINUE:
            log.warning("milter: %s is not possible at this stage; continuing", action.value)
        return m.Continue()

    def refusal(self, result: MilterResult) -> m.Reply:
        if result.reply is not None:
            r = result.reply
            try:
                return m.ReplyCode.build(r.code, r.enhanced, r.text)
            except ValueError as exc:
                log.warning("milter: unusable reply %r: %s; sending a plain %s",
                            r.reply(), exc, result.action.value)
        return m.Reject() if result.action is MilterAction.REJECT else m.Tempfail()

    # -- end of message ---------------------------------------------------------

    async def end_of_message(self, chunk: bytes) -> list[m.Reply]:
        if chunk:
            self.session.add_body(chunk)
        self.session.stage = Stage.EOM
        try:
            result = self.over_limit() if self.session.over_limit else await self.eom_result()
            return self.eom_replies(result)
        finally:
            self.server.stats["messages"] += 1
            self.session.reset_message()

    def over_limit(self) -> MilterResult:
        """The answer to a message past one of its limits (the handler is not run)."""
        s, action = self.session, self.server.settings.limit_action
        text = LIMIT_TEXT[s.over_limit]
        result = {"reject": MilterResult.reject(text, 552, "5.3.4"),
                  "tempfail": MilterResult.tempfail(text, 452, "4.3.4")}.get(action)
        log.warning("milter: message over milter.%s (%d header lines, %d bytes) queue_id=%s "
                    "client=%s; answering %s (milter.limit_action)", s.over_limit,
                    s.header_count, s.received, s.queue_id or "-", s.client_address or "-",
                    result.reply.reply() if result and result.reply else "accept, unchecked")
        self.server.stats["over_limit"] += 1
        return result or MilterResult()

    async def eom_result(self) -> MilterResult:
        task = asyncio.ensure_future(self.server.handler.on_end_of_message(self.session))
        try:
            return _checked("on_end_of_message", await self.with_progress(task)) or MilterResult()
        except Exception as exc:
            return self.failed("on_end_of_message", exc)
        finally:
            if not task.done():
                task.cancel()

    async def with_progress(self, task: asyncio.Future[MilterResult]) -> MilterResult:
        """Wait for ``task``; send SMFIR_PROGRESS every ``progress_interval`` meanwhile."""
        s, loop = self.server.settings, self.server.loop
        deadline = loop.time() + s.eom_timeout
        while True:
            wait = min(s.progress_interval, deadline - loop.time())
            if wait <= 0:
                raise TimeoutError(f"no result after {s.eom_timeout} s")
            done, _ = await asyncio.wait({task}, timeout=wait)
            if done:
                return task.result()
            self.send([m.Progress()])

    def eom_replies(self, result: MilterResult) -> list[m.Reply]:
        action = result.action
        if action in (MilterAction.REJECT, MilterAction.TEMPFAIL):
            return [self.refusal(result)]
        if action is MilterAction.DISCARD:
            return [m.Discard()]
        out = self.header_edits(result.headers)
        if result.replace_body is not None and self.allowed(m.SMFIF_CHGBODY, "CHGBODY"):
            out += m.replace_body_packets(result.replace_body)
        reason = result.quarantine_reason or (
            "held by mxguard" if action is MilterAction.QUARANTINE else "")
        if reason and self.allowed(m.SMFIF_QUARANTINE, "quarantine"):
            out.append(m.Quarantine(" ".join(reason.replace("\0", " ").split())))
        out.append(m.Accept() if action is MilterAction.ACCEPT else m.Continue())
        return out

    def allowed(self, action_flag: int, what: str) -> bool:
        if self.negotiated is not None and self.negotiated.actions & action_flag:
            return True
        log.warning("milter: the MTA did not grant %s; edit dropped", what)
        return False

    def header_edits(self, edits: Sequence[HeaderEdit | HeaderChange]) -> list[m.Reply]:
        out: list[m.Reply] = []
        top = 0  # prepends keep their list order: insert at 0, 1, 2 ...
        for edit in edits:
            change = edit if isinstance(edit, HeaderChange) else (
                HeaderChange.insert(top, edit.name, edit.value) if edit.op == "prepend"
                else HeaderChange.add(edit.name, edit.value))
            try:
                packet = self.header_packet(change)
            except ValueError as exc:
                log.warning("milter: dropping header edit %s %s: %s", change.op, change.name, exc)
                continue
            if packet is not None:
                out.append(packet)
                top += isinstance(edit, HeaderEdit) and edit.op == "prepend"
        return out

    def header_packet(self, c: HeaderChange) -> m.Reply | None:
        value = m.wire_value(c.value, self.session.headers_exact)
        if c.op == "delete":
            return m.ChangeHeader(c.index, c.name, "") if self.allowed(
                m.SMFIF_CHGHDRS, "CHGHDRS") else None
        if c.op == "change":
            if not c.value:
                raise ValueError("an empty value would delete the header; use delete")
            return m.ChangeHeader(c.index, c.name, value) if self.allowed(
                m.SMFIF_CHGHDRS, "CHGHDRS") else None
        if not self.allowed(m.SMFIF_ADDHDRS, "ADDHDRS"):
            return None
        if c.op == "insert":
            return m.InsertHeader(c.index, c.name, value)
        if c.op in ("add", "append"):
            return m.AddHeader(c.name, value)
        raise ValueError(f"unknown header edit {c.op!r}")


_STAGE_FLAGS: dict[str, int] = {
    "on_connect": m.SMFIP_NR_CONN, "on_helo": m.SMFIP_NR_HELO, "on_mail": m.SMFIP_NR_MAIL,
    "on_rcpt": m.SMFIP_NR_RCPT,
}

_NO_REPLY_FLAG: dict[type, int] = {
    m.Data: m.SMFIP_NR_DATA, m.EndOfHeaders: m.SMFIP_NR_EOH, m.Unknown: m.SMFIP_NR_UNKN,
}


class MilterServer:
    def __init__(self, settings: MilterServerSettings, handler: MilterHandler) -> None:
        self.settings = settings
        self.handler = handler
        # the stage hooks the handler really implements (others are skipped and
        # negotiated as no-reply stages)
        self.hooks = frozenset(name for name in _STAGE_FLAGS
                               if getattr(type(handler), name, None)
                               is not getattr(BaseMilterHandler, name))
        self.no_reply = 0 if settings.skip_large_bodies else m.SMFIP_NR_BODY
        for name, flag in _STAGE_FLAGS.items():
            if name not in self.hooks:
                self.no_reply |= flag
        self.loop = asyncio.get_running_loop()
        self.connections: set[_Connection] = set()
        self.closing = False
        self.stats = {"messages": 0, "protocol_errors": 0, "handler_errors": 0,
                      "over_limit": 0, "shed": 0}
        self.buffered_total = 0  # incomplete packets + queued commands, all connections
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._server = await listen(self.settings.listen, lambda: _Connection(self))
        self._sweeper = self.loop.create_task(self._sweep())
        log.info("milter: listening on %s", self.settings.listen)

    @property
    def address(self) -> tuple[str, int] | str:
        """Where we listen: ``(host, port)`` (port 0 in ``listen`` resolved) or a path."""
        assert self._server is not None
        name = self._server.sockets[0].getsockname()
        return (str(name[0]), int(name[1])) if isinstance(name, tuple) else str(name)

    def shed(self) -> None:
        """Close connections, those holding the most first, until the buffered
        bytes of all are within ``max_buffered_total`` again."""
        limit = self.settings.max_buffered_total
        for conn in sorted(self.connections, key=lambda c: c.counted, reverse=True):
            if self.buffered_total <= limit or not conn.counted:
                return
            log.warning("milter: closing %s: it holds %d bytes of incomplete packets and "
                        "waiting commands, all connections %d (milter.max_buffered_total %d)",
                        conn.peer, conn.counted, self.buffered_total, limit)
            self.stats["shed"] += 1
            self.buffered_total -= conn.counted
            conn.counted = 0
            conn.queue.clear()
            conn.queued_bytes = 0
            if conn.transport is not None:
                conn.transport.abort()

    async def _sweep(self) -> None:
        timeout = self.settings.idle_timeout
        while True:
            await asyncio.sleep(min(1.0, timeout / 2))
            limit = self.loop.time() - timeout
            for conn in [c for c in self.connections if c.idle and c.last < limit]:
                log.info("milter: closing %s, idle for %.0f s (milter.idle_timeout)",
                         conn.peer, timeout)
                conn.close()

    async def close(self, grace: float) -> None:
        """Stop accepting; let messages in progress finish (up to ``grace`` s); close all."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conn in list(self.connections):
            if conn.idle and not conn.session.in_message:
                conn.close()
        deadline = self.loop.time() + grace
        while self.connections and self.loop.time() < deadline:
            if all(c.idle and not c.session.in_message for c in self.connections):
                break
            await asyncio.sleep(0.02)
        for conn in list(self.connections):
            conn.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
