"""An SMTP sink on loopback: the final hop of a private Postfix
(:mod:`mxguard.testing.postfix`).

It speaks just enough ESMTP for Postfix's smtp client (EHLO/HELO, MAIL,
RCPT, DATA, RSET, NOOP, QUIT), answers 250 to everything by default and
records every accepted message: envelope sender, recipients and the raw
bytes as received (headers included, dot-unstuffed, CRLF line ends).

    with Sink() as sink:
        ...  # point Postfix's relayhost at [127.0.0.1]:sink.port
        (msg,) = sink.wait_for(1, timeout=10)
        assert msg.header("Subject") == "hello"

Its greeting/EHLO name (``sink.test``) must differ from the private Postfix's
``myhostname``, or Postfix refuses to deliver ("greeted me with my own
hostname").
"""

from __future__ import annotations

import email
import email.message
import email.policy
import re
import socket
import socketserver
import threading
import time
from dataclasses import dataclass, field

_FOLD = re.compile(r"\r?\n[ \t]+")
_PATH = re.compile(r"^(?:FROM|TO):\s*<([^>]*)>\s*(.*)$", re.IGNORECASE)


@dataclass
class SinkMessage:
    """One message the sink accepted."""

    mail_from: str
    rcpts: list[str]
    data: bytes
    helo: str = ""
    peer: tuple[str, int] = ("", 0)
    mail_params: str = ""
    received_at: float = field(default_factory=time.time)

    @property
    def message(self) -> email.message.Message:
        """The message parsed with the compat32 policy (raw header values)."""
        return email.message_from_bytes(self.data, policy=email.policy.compat32)

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", "replace")

    def headers(self, name: str) -> list[str]:
        """All values of header ``name``, in order, unfolded."""
        values = self.message.get_all(name) or []
        return [_FOLD.sub(" ", str(v)).strip() for v in values]

    def header(self, name: str) -> str | None:
        """The first (topmost) value of header ``name``, unfolded, or None."""
        values = self.headers(name)
        return values[0] if values else None

    @property
    def body(self) -> bytes:
        _head, sep, body = self.data.partition(b"\r\n\r\n")
        return body if sep else b""


def header_value(msg: SinkMessage, name: str) -> str | None:
    """The first value of header ``name`` in ``msg`` (unfolded), or None."""
    return msg.header(name)


class _Handler(socketserver.StreamRequestHandler):
    server: _Server
    timeout = 60

    def reply(self, code: int, text: str) -> None:
        lines = text.split("\n")
        out = b"".join(
            f"{code}{'-' if i < len(lines) - 1 else ' '}{line}\r\n".encode()
            for i, line in enumerate(lines)
        )
        self.wfile.write(out)
        self.wfile.flush()

    def readline(self) -> bytes | None:
        line = self.rfile.readline(65536)
        return line if line else None

    def handle(self) -> None:
        sink = self.server.sink
        peer = self.client_address[0], int(self.client_address[1])
        helo = ""
        mail_from: str | None = None
        params = ""
        rcpts: list[str] = []
        self.reply(220, f"{sink.hostname} ESMTP test sink")
        try:
            while True:
                raw = self.readline()
                if raw is None:
                    return
                line = raw.rstrip(b"\r\n").decode("utf-8", "surrogateescape")
                sink._log(f"{peer[0]} > {line}")
                verb, _, arg = line.partition(" ")
                verb = verb.upper()
                if verb == "EHLO":
                    helo, mail_from, rcpts = arg.strip(), None, []
                    self.reply(250, f"{sink.hostname}\n8BITMIME\nENHANCEDSTATUSCODES")
                elif verb == "HELO":
                    helo, mail_from, rcpts = arg.strip(), None, []
                    self.reply(250, sink.hostname)
                elif verb == "MAIL":
                    m = _PATH.match(arg)
                    if not m:
                        self.reply(501, "5.5.4 Syntax: MAIL FROM:<address>")
                        continue
                    code, text = sink._reply_for("MAIL", (250, "2.1.0 Ok"))
                    if code < 300:
                        mail_from, params, rcpts = m.group(1), m.group(2), []
                    self.reply(code, text)
                elif verb == "RCPT":
                    m = _PATH.match(arg)
                    if mail_from is None:
                        self.reply(503, "5.5.1 Error: need MAIL command")
                    elif not m:
                        self.reply(501, "5.5.4 Syntax: RCPT TO:<address>")
                    else:
                        code, text = sink._reply_for("RCPT", (250, "2.1.5 Ok"))
                        if code < 300:
                            rcpts.append(m.group(1))
                        self.reply(code, text)
                elif verb == "DATA":
                    if mail_from is None or not rcpts:
                        self.reply(503, "5.5.1 Error: need RCPT command")
                        continue
                    self.reply(354, "End data with <CR><LF>.<CR><LF>")
                    data = self._read_data()
                    if data is None:
                        return
                    code, text = sink._reply_for("DATA", (250, "2.0.0 Ok: queued by sink"))
                    if code < 300:
                        sink._add(SinkMessage(mail_from, list(rcpts), data, helo, peer, params))
                    mail_from, params, rcpts = None, "", []
                    self.reply(code, text)
                elif verb == "RSET":
                    mail_from, params, rcpts = None, "", []
                    self.reply(250, "2.0.0 Ok")
                elif verb == "NOOP":
                    self.reply(250, "2.0.0 Ok")
                elif verb == "QUIT":
                    self.reply(221, "2.0.0 Bye")
                    return
                elif verb == "VRFY":
                    self.reply(252, "2.0.0 Cannot VRFY")
                else:
                    self.reply(502, "5.5.2 Error: command not recognized")
        except (OSError, TimeoutError):
            return

    def _read_data(self) -> bytes | None:
        chunks: list[bytes] = []
        while True:
            raw = self.readline()
            if raw is None:
                return None
            if raw in (b".\r\n", b".\n"):
                return b"".join(chunks)
            if raw.startswith(b"."):
                raw = raw[1:]
            if not raw.endswith(b"\r\n"):
                raw = raw.rstrip(b"\n") + b"\r\n"
            chunks.append(raw)


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    sink: Sink


class Sink:
    """A recording SMTP server on ``host`` (loopback), in a background thread."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0,
                 hostname: str = "sink.test") -> None:
        self.host = host
        self.hostname = hostname
        self._requested_port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._cond = threading.Condition()
        self._messages: list[SinkMessage] = []
        self._replies: dict[str, tuple[int, str]] = {}
        self.transcript: list[str] = []

    # lifecycle -----------------------------------------------------------
    def start(self) -> Sink:
        if self._server is not None:
            return self
        server = _Server((self.host, self._requested_port), _Handler)
        server.sink = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1},
            name=f"smtp-sink-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> Sink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("sink not started")
        return int(self._server.server_address[1])

    @property
    def address(self) -> str:
        """``[host]:port``, as Postfix's relayhost wants it."""
        return f"[{self.host}]:{self.port}"

    # replies -------------------------------------------------------------
    def set_reply(self, stage: str, code: int, text: str) -> None:
        """Answer ``stage`` ("MAIL", "RCPT" or "DATA" = after the final dot)
        with ``code text`` instead of 250. Non-2xx replies record nothing."""
        stage = stage.upper()
        if stage not in ("MAIL", "RCPT", "DATA"):
            raise ValueError(f"unknown stage {stage!r}")
        with self._cond:
            self._replies[stage] = (code, text)

    def reset_replies(self) -> None:
        with self._cond:
            self._replies.clear()

    def _reply_for(self, stage: str, default: tuple[int, str]) -> tuple[int, str]:
        with self._cond:
            return self._replies.get(stage, default)

    # messages ------------------------------------------------------------
    def _add(self, msg: SinkMessage) -> None:
        with self._cond:
            self._messages.append(msg)
            self._cond.notify_all()

    def _log(self, line: str) -> None:
        with self._cond:
            self.transcript.append(line)

    @property
    def messages(self) -> list[SinkMessage]:
        """A snapshot of the messages received so far, in arrival order."""
        with self._cond:
            return list(self._messages)

    def clear(self) -> None:
        with self._cond:
            self._messages.clear()
            self.transcript.clear()

    def wait_for(self, count: int = 1, timeout: float = 10.0) -> list[SinkMessage]:
        """Wait until at least ``count`` messages arrived; return them all.

        Raises TimeoutError (with what did arrive) after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._messages) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    got = [(m.mail_from, m.rcpts) for m in self._messages]
                    raise TimeoutError(
                        f"sink got {len(self._messages)} message(s), wanted {count} "
                        f"within {timeout}s: {got}")
                self._cond.wait(min(left, 0.2))
            return list(self._messages)

    def wait_quiet(self, seconds: float = 1.0) -> list[SinkMessage]:
        """Sleep ``seconds`` (for asserting that nothing more arrives) and
        return the messages received so far."""
        time.sleep(seconds)
        return self.messages


def smtp_probe(host: str, port: int, timeout: float = 2.0) -> bool:
    """True when something at host:port answers with an SMTP 220 banner."""
    try:
        with socket.create_connection((host, port), timeout) as s:
            s.settimeout(timeout)
            return s.recv(4).startswith(b"220")
    except OSError:
        return False
