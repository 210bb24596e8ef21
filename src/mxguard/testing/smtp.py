"""SMTP client helpers for the private servers on loopback: one session from
a chosen 127.x.y.z address that returns every reply instead of raising.

    t = send(pf.smtp_port, helo="client.test", mail_from="a@b.test",
             rcpts=["u@example.test"], source_ip="127.0.0.7")
    assert t.rcpts[0].code == 554
"""

from __future__ import annotations

import re
import smtplib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import formatdate, make_msgid
from typing import NamedTuple

DEFAULT_DOMAIN = "example.test"

class Reply(NamedTuple):
    """One SMTP reply. ``str(reply)`` is ``"250 2.1.0 Ok"``; multi-line text
    is joined with newlines."""

    code: int
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


@dataclass
class Transcript:
    """Every reply of one ``send()`` session. A stage that was not reached is
    None (rcpts: fewer entries). ``data`` is the reply to the DATA command
    (354 when Postfix accepts it), ``end_of_data`` the reply after the final
    dot."""

    banner: Reply | None = None
    xclient: Reply | None = None
    helo: Reply | None = None
    mail: Reply | None = None
    rcpts: list[Reply] = field(default_factory=list)
    data: Reply | None = None
    end_of_data: Reply | None = None
    quit: Reply | None = None
    disconnected: bool = False
    log: list[tuple[str, Reply]] = field(default_factory=list)

    @property
    def accepted(self) -> bool:
        """The message was queued (2xx after the final dot)."""
        return self.end_of_data is not None and 200 <= self.end_of_data.code < 300

    @property
    def queue_id(self) -> str | None:
        if self.end_of_data is None:
            return None
        m = re.search(r"queued as (\S+)", self.end_of_data.text)
        return m.group(1) if m else None

    @property
    def last(self) -> str:
        """The last reply before QUIT, as ``"code text"`` (where the session ended)."""
        for cmd, reply in reversed(self.log):
            if cmd != "QUIT":
                return str(reply)
        return "(no reply)"

    def __str__(self) -> str:
        return "\n".join(f"{cmd} -> {reply}" for cmd, reply in self.log)


def xtext(value: str) -> str:
    """RFC 3461 xtext encoding, as XCLIENT attribute values need."""
    out = []
    for ch in value.encode("utf-8"):
        if 33 <= ch <= 126 and ch not in (ord("+"), ord("=")):
            out.append(chr(ch))
        else:
            out.append(f"+{ch:02X}")
    return "".join(out)


def smtp_session(port: int, source_ip: str = "127.0.0.1", *, host: str = "127.0.0.1",
                 timeout: float = 10.0) -> smtplib.SMTP:
    """A connected smtplib.SMTP from ``source_ip`` (any 127.0.0.0/8 address);
    the banner has been read, nothing else sent (send EHLO yourself, e.g.
    ``smtp_cmd(s, "EHLO", "name")``)."""
    return _open(port, source_ip, host, timeout)[0]


def _open(port: int, source_ip: str, host: str, timeout: float) -> tuple[smtplib.SMTP, Reply]:
    # local_hostname given: smtplib would otherwise call socket.getfqdn() (DNS)
    s = smtplib.SMTP(local_hostname="localhost", timeout=timeout,
                     source_address=(source_ip, 0))
    try:
        code, msg = s.connect(host, port)
    except BaseException:
        s.close()
        raise
    return s, Reply(code, msg.decode("utf-8", "replace"))


def smtp_cmd(smtp: smtplib.SMTP, verb: str, arg: str = "") -> Reply:
    """Send one command and return its reply; never raises on 4xx/5xx."""
    code, msg = smtp.docmd(verb, arg)
    return Reply(code, msg.decode("utf-8", "replace"))


def _dot_stuff(data: bytes) -> bytes:
    data = re.sub(rb"\r\n|\r|\n", b"\r\n", data)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return re.sub(rb"(?m)^\.", b"..", data) + b".\r\n"


def make_message(*, mail_from: str = "sender@client.test",
                 to: Sequence[str] = (f"user@{DEFAULT_DOMAIN}",),
                 subject: str = "harness test", body: str = "Hello.\n",
                 headers: Mapping[str, str] | None = None) -> bytes:
    """A small RFC 5322 message (From, To, Subject, Date, Message-ID + extras)."""
    hdrs = {
        "From": f"<{mail_from}>" if mail_from else "<>",
        "To": ", ".join(f"<{r}>" for r in to),
        "Subject": subject,
        "Date": formatdate(localtime=False),
        "Message-ID": make_msgid(domain="client.test"),
    }
    hdrs.update(headers or {})
    head = "".join(f"{k}: {v}\r\n" for k, v in hdrs.items())
    return (head + "\r\n" + body.replace("\r\n", "\n").replace("\n", "\r\n")).encode()


def send(
    port: int,
    *,
    helo: str | None,
    mail_from: str,
    rcpts: Sequence[str],
    data: bytes | str | None = None,
    source_ip: str = "127.0.0.1",
    xclient: Mapping[str, str] | None = None,
    esmtp: bool = True,
    mail_params: str = "",
    host: str = "127.0.0.1",
    timeout: float = 10.0,
) -> Transcript:
    """One SMTP session; returns every reply, never raises on 4xx/5xx.

    Order: banner, [XCLIENT attrs (its reply is the new 220 banner)],
    EHLO/HELO ``helo`` (skipped when None, e.g. after XCLIENT HELO=...),
    MAIL FROM:<mail_from> [mail_params], RCPT TO for each of ``rcpts``,
    DATA + ``data`` (default: make_message()) when a recipient was accepted,
    QUIT. A failed (>= 400) XCLIENT, HELO or MAIL ends the session there.
    """
    t = Transcript()

    def cmd(s: smtplib.SMTP, verb: str, arg: str = "") -> Reply:
        r = smtp_cmd(s, verb, arg)
        t.log.append((f"{verb} {arg}".strip(), r))
        return r

    s, t.banner = _open(port, source_ip, host, timeout)
    t.log.append(("<connect>", t.banner))
    try:
        if t.banner.code >= 400:
            return t
        if xclient:
            attrs = " ".join(f"{k.upper()}={xtext(v)}" for k, v in xclient.items())
            t.xclient = cmd(s, "XCLIENT", attrs)
            if t.xclient.code >= 400:
                return t
        if helo is not None:
            t.helo = cmd(s, "EHLO" if esmtp else "HELO", helo)
            if t.helo.code >= 400:
                return t
        t.mail = cmd(s, "MAIL", f"FROM:<{mail_from}>" + (f" {mail_params}" if mail_params
                                                           else ""))
        if t.mail.code >= 400:
            return t
        for rcpt in rcpts:
            t.rcpts.append(cmd(s, "RCPT", f"TO:<{rcpt}>"))
        if not any(200 <= r.code < 300 for r in t.rcpts):
            return t
        t.data = cmd(s, "DATA")
        if t.data.code != 354:
            return t
        if data is None:
            data = make_message(mail_from=mail_from, to=rcpts)
        elif isinstance(data, str):
            data = data.encode("utf-8")
        s.send(_dot_stuff(data))
        code, msg = s.getreply()
        t.end_of_data = Reply(code, msg.decode("utf-8", "replace"))
        t.log.append(("<message>", t.end_of_data))
        return t
    except (smtplib.SMTPServerDisconnected, OSError):
        t.disconnected = True
        return t
    finally:
        if not t.disconnected:
            try:
                t.quit = cmd(s, "QUIT")
            except (smtplib.SMTPServerDisconnected, OSError):
                t.disconnected = True
        s.close()
