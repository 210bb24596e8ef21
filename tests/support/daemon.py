"""Run a real ``mxguard serve`` process for tests, and talk policy to it."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

from mxguard.testing.ports import free_port


def policy_request(**attrs: str) -> bytes:
    base = {
        "request": "smtpd_access_policy", "protocol_state": "RCPT", "protocol_name": "ESMTP",
        "client_address": "198.51.100.7", "client_name": "unknown",
        "reverse_client_name": "unknown", "helo_name": "[198.51.100.7]",
        "sender": "someone@sender.test", "recipient": "user@dest.test", "queue_id": "",
        "instance": "1.1", "size": "100", "sasl_username": "",
    }
    base.update(attrs)
    return "".join(f"{k}={v}\n" for k, v in base.items()).encode() + b"\n"


class PolicyClient:
    """One policy connection, like one Postfix smtpd process keeps."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout)
        self.buf = b""

    def ask(self, **attrs: str) -> str:
        self.sock.sendall(policy_request(**attrs))
        return self.read_reply()

    def read_reply(self) -> str:
        while b"\n\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed by mxguard")
            self.buf += chunk
        reply, _, self.buf = self.buf.partition(b"\n\n")
        assert reply.startswith(b"action=")
        return reply[len(b"action="):].decode()

    def closed_by_peer(self, timeout: float = 5.0) -> bool:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()


class MxguardProcess:
    def __init__(self, tmp: Path, config_text: str = "", port: int | None = None) -> None:
        self.tmp = tmp
        self.port = port or free_port()
        self.milter_port = free_port()
        self.web_port = free_port()  # every daemon its own dashboard port (default 11380)
        self.config = tmp / "mxguard.toml"
        self.log = tmp / "mxguard.log"
        self.write_config(config_text)
        self.proc: subprocess.Popen[bytes] | None = None

    def write_config(self, extra: str) -> None:
        top, sep, rest = extra.partition("[")
        extra = sep + rest
        text = top + (f'[policy]\nlisten = "127.0.0.1:{self.port}"\n'
                      f'[milter]\nlisten = "127.0.0.1:{self.milter_port}"\n'
                      f'[storage]\nurl = "sqlite:///{self.tmp}/mxguard.db"\n')
        web_listen = f'listen = "127.0.0.1:{self.web_port}"\n'
        if re.search(r"(?m)^\[web\]", extra):  # a caller's [web]: our port unless it has one
            if not re.search(r"(?ms)^\[web\][^\[]*^listen\s*=", extra):
                extra = re.sub(r"(?m)^\[web\]\n", lambda m: m.group(0) + web_listen, extra,
                               count=1)
        else:
            text += "[web]\n" + web_listen
        # Later sections for [policy]/[storage] in extra are merged by hand by callers.
        self.config.write_text(text + extra)

    def start(self, preexec_fn: Callable[[], object] | None = None) -> MxguardProcess:
        """Start ``mxguard serve``; ``preexec_fn`` runs in the child first (limits)."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        logf = open(self.log, "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mxguard", "serve", "--config", str(self.config)],
            stdout=logf, stderr=logf, env=env, preexec_fn=preexec_fn)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mxguard exited {self.proc.returncode}:\n{self.log_text()}")
            try:
                for port in self._ports():
                    socket.create_connection(("127.0.0.1", port), 0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mxguard did not listen:\n{self.log_text()}")

    def _ports(self) -> list[int]:
        """The policy port, and the milter port when the milter door is on (it opens
        just after the policy door: a test must not talk to it before)."""
        try:
            milter = tomllib.loads(self.config.read_text()).get("milter", {})
        except (OSError, tomllib.TOMLDecodeError):
            return [self.port]
        host, _, port = str(milter.get("listen", "")).rpartition(":")
        if milter.get("enabled", True) is False or host != "127.0.0.1" or not port.isdigit():
            return [self.port]
        return [self.port, int(port)]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_log(self, needle: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_text()
            if needle in text:
                return text
            time.sleep(0.05)
        raise AssertionError(f"{needle!r} not logged:\n{self.log_text()[-3000:]}")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise

    def client(self) -> PolicyClient:
        return PolicyClient(self.port)
