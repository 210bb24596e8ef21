"""The private servers ``mxguard demo`` runs on loopback, and nothing else.

* :class:`PrivatePostfix` -- a real Postfix (Debian package ``postfix``) with
  its own config, queue and data directories under one work directory,
  every service chroot=n, SMTP on ``127.0.0.1:PORT`` only, all mail relayed
  to a sink. Every command gets ``-c WORKDIR/etc``: the machine's own Postfix
  and /etc/postfix are never touched. Needs root (Postfix daemons switch to
  the ``postfix`` user).
* :class:`DemoDNS` -- a tiny authoritative DNS server (UDP and TCP) serving
  a zone dict, built on dnspython's message API.
* :class:`Sink` -- an SMTP server that accepts and keeps every message: the
  final hop of the private Postfix.
* :func:`send` -- one SMTP session from a chosen 127.x.y.z address; returns
  every reply instead of raising.

The same shape as the integration tests' harness (tests/support/), kept
small so it works from an installed package.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import smtplib
import socket
import socketserver
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field
from email import message_from_bytes
from email.policy import compat32
from pathlib import Path
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from mxguard.cli.postfix_conf import find_command

Zone = dict[str, list[tuple[str, Any]]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------ Postfix

_PR_SET_CHILD_SUBREAPER = 36
# (queue|data, subdirectory, owner, group, mode): Postfix 3.7's postfix-files
_LAYOUT: list[tuple[str, str, str, str, int]] = [
    ("data", "", "postfix", "root", 0o700), ("queue", "", "root", "root", 0o755),
    *(("queue", d, "postfix", "root", 0o700) for d in (
        "active", "bounce", "corrupt", "defer", "deferred", "flush", "hold", "incoming",
        "private", "saved", "trace")),
    ("queue", "maildrop", "postfix", "postdrop", 0o730),
    ("queue", "public", "postfix", "postdrop", 0o710), ("queue", "pid", "root", "root", 0o755),
]
MASTER_CF = """\
# private demo instance: loopback only, every service chroot=n
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
tlsmgr    unix  - - n 1000? 1 tlsmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
proxywrite unix - - n - 1 proxymap
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


def postfix_available() -> str | None:
    """None when a private Postfix can run here, else what is missing."""
    if not all(find_command(n) for n in ("postfix", "postconf")):
        return "Postfix is not installed (Debian: apt-get install postfix)"
    if os.geteuid() != 0:
        return "a private Postfix must be started as root"
    return None


def _proc_stat(pid: int) -> tuple[str, int, int, str] | None:
    """(state, parent pid, session, command name) of ``pid``, or None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = raw[raw.rfind(")") + 2:].split()
    return fields[0], int(fields[1]), int(fields[3]), raw[raw.find("(") + 1:raw.rfind(")")]


def _alive(pid: int) -> bool:
    st = _proc_stat(pid)
    return st is not None and st[0] not in ("Z", "X")


class PrivatePostfix:
    """A Postfix instance under ``workdir`` (keep it short: socket paths < 108 bytes)."""

    def __init__(self, workdir: Path, sink_port: int, *, domains: list[str],
                 myhostname: str, mynetworks: str = "127.0.0.1/32") -> None:
        self.workdir = workdir
        self.config_dir = workdir / "etc"
        self.queue_dir = workdir / "spool"
        self.data_dir = workdir / "data"
        self.maillog = workdir / "maillog"
        self.smtp_port = free_port()
        self.sink_port = sink_port
        self.domains = domains
        self.myhostname = myhostname
        self.mynetworks = mynetworks
        self.master_pid: int | None = None

    def main_cf(self) -> dict[str, str]:
        return {
            "compatibility_level": "3.6", "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir), "mail_owner": "postfix",
            "setgid_group": "postdrop", "maillog_file": str(self.maillog),
            "maillog_file_prefixes": str(self.workdir), "myhostname": self.myhostname,
            "mydomain": self.domains[0], "myorigin": "$mydomain", "mydestination": "",
            "local_recipient_maps": "", "alias_maps": "", "alias_database": "",
            "local_transport": "error:5.1.1 local delivery is disabled in the demo",
            "relay_domains": ", ".join(self.domains),
            "relayhost": f"[127.0.0.1]:{self.sink_port}", "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4", "mynetworks": self.mynetworks,
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            # never talk DNS to the machine's resolver: mxguard does the lookups
            "smtpd_peername_lookup": "no", "smtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native", "smtpd_error_sleep_time": "0s",
            "in_flow_delay": "0s", "smtp_tls_security_level": "none",
            "smtpd_tls_security_level": "none", "queue_run_delay": "1s",
            "minimal_backoff_time": "2s", "maximal_backoff_time": "4s", "notify_classes": "",
            "biff": "no", "smtputf8_enable": "no",
        }

    def write_config(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.workdir.chmod(0o755)
        self.config_dir.mkdir(exist_ok=True)
        self.config_dir.chmod(0o755)
        lines = [f"{k} = {v}" for k, v in self.main_cf().items()]
        (self.config_dir / "main.cf").write_text("\n".join(lines) + "\n")
        (self.config_dir / "master.cf").write_text(MASTER_CF.format(port=self.smtp_port))
        self.backdate()

    def backdate(self) -> None:
        """Postfix waits until main.cf is 2 s old before trusting it; skip the wait."""
        old = time.time() - 10
        for name in ("main.cf", "master.cf"):
            os.utime(self.config_dir / name, (old, old))

    def run(self, cmd: str, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        exe = find_command(cmd)
        if exe is None:
            raise RuntimeError(f"{cmd} not found")
        env = {k: v for k, v in os.environ.items() if k not in ("MAIL_CONFIG", "MAIL_DEBUG")}
        res = subprocess.run([exe, "-c", str(self.config_dir), *args], capture_output=True,
                             text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL,
                             check=False)
        if res.returncode != 0:
            raise RuntimeError(f"{cmd} {' '.join(args)} failed: {res.stdout}{res.stderr}\n"
                               f"{self.log_tail()}")
        return res

    def start(self) -> None:
        with contextlib.suppress(Exception):  # reap the orphaned master ourselves
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        for kind, sub, owner, group, mode in _LAYOUT:
            base = self.queue_dir if kind == "queue" else self.data_dir
            d = base / sub if sub else base
            d.mkdir(exist_ok=True)
            shutil.chown(d, owner, group)
            d.chmod(mode)
        self.backdate()
        self.run("postfix", "start")
        with contextlib.suppress(OSError, ValueError, IndexError):
            self.master_pid = int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                with smtplib.SMTP("127.0.0.1", self.smtp_port, local_hostname="localhost",
                                  timeout=2) as s:
                    s.docmd("QUIT")
                return
            except (OSError, smtplib.SMTPException):
                time.sleep(0.05)
        raise RuntimeError(f"the private Postfix did not answer\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.maillog.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _session_pids(self) -> list[int]:
        if self.master_pid is None:
            return []
        found = []
        for name in os.listdir("/proc"):
            if name.isdigit() and int(name) != os.getpid():
                st = _proc_stat(int(name))
                if st is not None and st[0] not in "ZX" and st[2] == self.master_pid:
                    found.append(int(name))
        return found

    def _reap(self, master: int) -> None:
        """Reap this instance's zombies re-parented to us (we are a subreaper)."""
        me = os.getpid()
        for name in os.listdir("/proc"):
            st = _proc_stat(int(name)) if name.isdigit() else None
            if st and st[0] == "Z" and st[1] == me and (st[2] == master or st[3] == "master"):
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(int(name), os.WNOHANG)

    def stop(self) -> None:
        """Stop the master (SIGTERM ends its children), then kill leftovers, reap zombies."""
        master = self.master_pid
        if master is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(master, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while _alive(master) and time.monotonic() < deadline:
            self._reap(master)
            time.sleep(0.05)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            left = self._session_pids()
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            if left:
                time.sleep(0.2)
        for _ in range(20):
            self._reap(master)
            time.sleep(0.02)
        self.master_pid = None


# ------------------------------------------------------------------ DNS


def _rdatas(rtype: str, values: list[Any]) -> list[dns.rdata.Rdata]:
    out = []
    for value in values:
        if rtype == "TXT":
            raw = value.encode()
            text = " ".join('"' + raw[i:i + 255].decode().replace('"', '\\"') + '"'
                            for i in range(0, len(raw), 255))
        elif rtype == "MX":
            text = f"{value[0]} {value[1]}."
        elif rtype in ("PTR", "CNAME", "NS"):
            text = f"{value}."
        else:
            text = str(value)
        out.append(dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.from_text(rtype), text))
    return out


class DemoDNS:
    """Serves ``{name: [(type, value), ...]}`` on 127.0.0.1 (UDP and TCP, one port).
    Unknown names: NXDOMAIN; known names without the type: NODATA."""

    def __init__(self, zone: Zone, ttl: int = 60) -> None:
        self.zone = {k.lower().rstrip("."): v for k, v in zone.items()}
        self.ttl = ttl
        handler = self

        class Udp(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data, sock = self.request
                out = handler.answer(data, 512)
                if out is not None:
                    sock.sendto(out, self.client_address)

        class Tcp(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                conn: socket.socket = self.request
                conn.settimeout(5)
                with contextlib.suppress(OSError, struct.error):
                    head = conn.recv(2)
                    (length,) = struct.unpack("!H", head)
                    data = b""
                    while len(data) < length:
                        chunk = conn.recv(length - len(data))
                        if not chunk:
                            return
                        data += chunk
                    out = handler.answer(data, 65535)
                    if out is not None:
                        conn.sendall(struct.pack("!H", len(out)) + out)

        self._udp = socketserver.ThreadingUDPServer(("127.0.0.1", 0), Udp)
        port = self._udp.server_address[1]
        self._tcp = socketserver.ThreadingTCPServer(("127.0.0.1", port), Tcp)
        for srv in (self._udp, self._tcp):
            srv.daemon_threads = True
        self.address = f"127.0.0.1:{port}"

    def answer(self, data: bytes, size: int) -> bytes | None:
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:
            return None
        reply = dns.message.make_response(query)
        reply.flags |= dns.flags.AA
        if not query.question:
            return None
        q = query.question[0]
        name = q.name.to_text().rstrip(".").lower()
        records = self.zone.get(name)
        qtype = dns.rdatatype.to_text(q.rdtype)
        if records is None:
            reply.set_rcode(dns.rcode.NXDOMAIN)
        else:
            values = [v for t, v in records if t == qtype]
            if values:
                reply.answer.append(dns.rrset.from_rdata_list(q.name, self.ttl,
                                                              _rdatas(qtype, values)))
        if not reply.answer:
            reply.authority.append(dns.rrset.from_text(
                "test.", 30, "IN", "SOA", "ns.test. hostmaster.test. 1 3600 600 86400 30"))
        try:
            return reply.to_wire(max_size=size)
        except dns.exception.TooBig:
            trunc = dns.message.make_response(query)
            trunc.flags |= dns.flags.AA | dns.flags.TC
            return trunc.to_wire()

    def start(self) -> DemoDNS:
        for srv in (self._udp, self._tcp):
            threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1},
                             daemon=True).start()
        return self

    def stop(self) -> None:
        for srv in (self._udp, self._tcp):
            srv.shutdown()
            srv.server_close()


# ------------------------------------------------------------------ SMTP sink

_PATH = re.compile(r"^(?:FROM|TO):\s*<([^>]*)>", re.IGNORECASE)


@dataclass
class SinkMessage:
    mail_from: str
    rcpts: list[str]
    data: bytes

    def headers(self, name: str) -> list[str]:
        msg = message_from_bytes(self.data, policy=compat32)
        return [re.sub(r"\r?\n[ \t]+", " ", str(v)).strip() for v in msg.get_all(name) or []]


class Sink:
    """Accepts every message on 127.0.0.1 (``sink.port``) and keeps it."""

    def __init__(self) -> None:
        self.messages: list[SinkMessage] = []
        self._cond = threading.Condition()
        sink = self

        class Handler(socketserver.StreamRequestHandler):
            timeout = 30

            def say(self, text: str) -> None:
                self.wfile.write(text.encode() + b"\r\n")

            def handle(self) -> None:
                mail_from, rcpts = "", list[str]()
                self.say("220 sink.test ESMTP demo sink")
                with contextlib.suppress(OSError):
                    for raw in self.rfile:
                        line = raw.decode("utf-8", "replace").rstrip("\r\n")
                        verb, _, arg = line.partition(" ")
                        verb = verb.upper()
                        m = _PATH.match(arg)
                        if verb in ("EHLO", "HELO"):
                            self.say("250-sink.test\r\n250 8BITMIME" if verb == "EHLO"
                                     else "250 sink.test")
                        elif verb == "MAIL" and m:
                            mail_from, rcpts = m.group(1), []
                            self.say("250 2.1.0 Ok")
                        elif verb == "RCPT" and m:
                            rcpts.append(m.group(1))
                            self.say("250 2.1.5 Ok")
                        elif verb == "DATA":
                            self.say("354 End data with <CR><LF>.<CR><LF>")
                            sink.add(SinkMessage(mail_from, rcpts, self.read_data()))
                            self.say("250 2.0.0 Ok: kept by the sink")
                        elif verb == "QUIT":
                            self.say("221 2.0.0 Bye")
                            return
                        else:
                            self.say("250 2.0.0 Ok")

            def read_data(self) -> bytes:
                chunks = []
                for raw in self.rfile:
                    if raw in (b".\r\n", b".\n"):
                        break
                    chunks.append(raw[1:] if raw.startswith(b".") else raw)
                return b"".join(chunks)

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])

    def add(self, msg: SinkMessage) -> None:
        with self._cond:
            self.messages.append(msg)
            self._cond.notify_all()

    def wait_for(self, count: int, timeout: float = 20.0) -> list[SinkMessage]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.messages) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"the sink got {len(self.messages)} of {count} "
                                       "messages")
                self._cond.wait(left)
            return list(self.messages)

    def start(self) -> Sink:
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                         daemon=True).start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


# ------------------------------------------------------------------ SMTP client


@dataclass
class Session:
    """Every reply of one SMTP session, as ``(command, "code text")``."""

    log: list[tuple[str, str]] = field(default_factory=list)
    accepted: bool = False

    @property
    def last(self) -> str:
        return self.log[-1][1] if self.log else "(no reply)"


def send(port: int, *, source: str, helo: str, mail_from: str, rcpt: str,
         data: bytes) -> Session:
    """One session from ``source`` (any 127.x.y.z); stops at the first 4xx/5xx."""
    s = Session()
    smtp = smtplib.SMTP(local_hostname="localhost", timeout=20, source_address=(source, 0))
    try:
        code, msg = smtp.connect("127.0.0.1", port)
        for verb, arg in (("EHLO", helo), ("MAIL", f"FROM:<{mail_from}>"),
                          ("RCPT", f"TO:<{rcpt}>"), ("DATA", "")):
            code, msg = smtp.docmd(verb, arg)
            s.log.append((f"{verb} {arg}".strip(), f"{code} {msg.decode(errors='replace')}"))
            if code >= 400:
                return s
        body = re.sub(rb"(?m)^\.", b"..", data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
        smtp.send(body + (b"" if body.endswith(b"\r\n") else b"\r\n") + b".\r\n")
        code, msg = smtp.getreply()
        s.log.append(("<message>", f"{code} {msg.decode(errors='replace')}"))
        s.accepted = 200 <= code < 300
        return s
    except (OSError, smtplib.SMTPException) as exc:
        s.log.append(("<connection>", f"error: {exc}"))
        return s
    finally:
        with contextlib.suppress(OSError, smtplib.SMTPException):
            smtp.quit()
        smtp.close()


__all__ = ["DemoDNS", "PrivatePostfix", "Session", "Sink", "SinkMessage", "free_port",
           "postfix_available", "send"]
