"""``mxguard serve`` as a real process: many connections, signals, reload, bad input.

No Postfix here: these drive the policy door directly, as Postfix's smtpd would.
"""

from __future__ import annotations

import resource
import signal
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.support.daemon import MxguardProcess, PolicyClient, policy_request

from mxguard.testing.dns import DNSServer

pytestmark = pytest.mark.integration

ZONE = {"mail.sender.test": [("A", "192.0.2.10")], "slow.sender.test": [("TIMEOUT", None)]}


@pytest.fixture
def dns() -> Iterator[DNSServer]:
    with DNSServer(ZONE) as srv:
        yield srv


@pytest.fixture
def daemon(tmp_path: Path, dns: DNSServer) -> Iterator[MxguardProcess]:
    proc = MxguardProcess(tmp_path, f'[dns]\nnameservers = ["{dns.address}"]\ntimeout = 2\n'
                                    '[helo]\nexempt_networks = []\n')
    proc.start()
    yield proc
    proc.stop()


def test_version_and_requests_on_many_connections(daemon: MxguardProcess) -> None:
    results: list[str] = []
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            c = daemon.client()
            for i in range(20):
                results.append(c.ask(client_address=f"198.51.{n}.{i + 1}",
                                     sender=f"s{i}@sender.test", helo_name="mail.sender.test"))
            c.close()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert len(results) == 600
    assert all(r.startswith("DEFER_IF_PERMIT 4.2.0 Greylisted") for r in results)


def test_non_rcpt_states_answer_dunno(daemon: MxguardProcess) -> None:
    c = daemon.client()
    for state in ("CONNECT", "DATA", "END-OF-MESSAGE"):
        assert c.ask(protocol_state=state, helo_name="nonsense") == "DUNNO"
    # control: the same HELO at RCPT is checked
    assert c.ask(helo_name="nonsense").startswith("504 5.5.2 <nonsense>")


def test_one_log_line_per_decision(daemon: MxguardProcess) -> None:
    c = daemon.client()
    c.ask(sender="logme@sender.test", recipient="who@dest.test", queue_id="ABC123",
          helo_name="mail.sender.test")
    text = daemon.wait_log("sender=logme@sender.test")
    (line,) = [ln for ln in text.splitlines() if "sender=logme@sender.test" in ln]
    for part in ("action=defer_if_permit", "client=198.51.100.7[unknown]",
                 "helo=mail.sender.test", "recipient=who@dest.test", "queue_id=ABC123",
                 "reason=", "GREYLIST_DEFERRED", "symbols=", "delay="):
        assert part in line, part


@pytest.mark.parametrize(("junk", "what"), [
    (b"request=smtpd_access_policy\nthis line has no equals sign\n\n", "name=value"),
    (b"\x00\xff\xfe binary junk \x01\n\n", "NUL"),
    (b"request=smtpd_access_policy\nsender=" + b"a" * 70000 + b"\n\n", "longer than"),
    (b"request=something_else\n\n", "unsupported request"),
])
def test_bad_input_closes_only_that_connection(daemon: MxguardProcess, junk: bytes,
                                               what: str) -> None:
    good = daemon.client()
    assert good.ask(helo_name="mail.sender.test")
    bad = PolicyClient(daemon.port)
    bad.sock.sendall(junk)
    assert bad.closed_by_peer()
    daemon.wait_log(what)
    assert good.ask(helo_name="mail.sender.test", sender="after@sender.test")
    assert daemon.client().ask(helo_name="mail.sender.test")


def test_half_request_then_disconnect_is_logged(daemon: MxguardProcess) -> None:
    s = socket.create_connection(("127.0.0.1", daemon.port))
    s.sendall(policy_request()[:40])
    time.sleep(0.2)
    s.close()
    daemon.wait_log("disconnected in the middle of a request")
    assert daemon.client().ask(helo_name="mail.sender.test")


def test_unknown_attributes_are_logged_and_served(daemon: MxguardProcess) -> None:
    c = daemon.client()
    assert c.ask(helo_name="mail.sender.test", some_future_attribute="x")
    daemon.wait_log("ignoring unknown attribute 'some_future_attribute'")


def test_a_thousand_idle_connections_do_not_block_others(daemon: MxguardProcess) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    idle = [socket.create_connection(("127.0.0.1", daemon.port)) for _ in range(1000)]
    try:
        for s in idle[:100]:
            s.sendall(b"request=smtpd_access_policy\n")  # half a request, then silence
        c = daemon.client()
        for i in range(50):
            assert c.ask(sender=f"busy{i}@sender.test", helo_name="mail.sender.test")
    finally:
        for s in idle:
            s.close()


def test_sighup_reloads_without_dropping_connections(daemon: MxguardProcess,
                                                     dns: DNSServer) -> None:
    c = daemon.client()
    assert c.ask(helo_name="mail.sender.test").startswith("DEFER_IF_PERMIT")
    daemon.write_config(f'[dns]\nnameservers = ["{dns.address}"]\n'
                        '[greylist]\nmode = "observe"\ntext = "Come back later"\n')
    daemon.signal(signal.SIGHUP)
    daemon.wait_log("reloaded configuration")
    # same connection, new behaviour: observe mode answers DUNNO and logs
    assert c.ask(helo_name="mail.sender.test", sender="new@sender.test") == "DUNNO"
    daemon.wait_log("observe=")


def test_bad_config_on_sighup_keeps_the_old_one(daemon: MxguardProcess) -> None:
    c = daemon.client()
    daemon.config.write_text(daemon.config.read_text() + "[greylist]\ndelay = \"soon\"\n")
    daemon.signal(signal.SIGHUP)
    daemon.wait_log("reload refused")
    assert "greylist.delay" in daemon.log_text()
    assert c.ask(helo_name="mail.sender.test").startswith("DEFER_IF_PERMIT 4.2.0")


def test_sigterm_finishes_in_flight_requests_and_exits_0(daemon: MxguardProcess) -> None:
    c = daemon.client()
    # The HELO name's DNS times out after 2 s: the request is in flight when we signal.
    c.sock.sendall(policy_request(helo_name="slow.sender.test"))
    time.sleep(0.5)
    daemon.signal(signal.SIGTERM)
    reply = c.read_reply()
    assert reply.startswith("450 4.7.1 <slow.sender.test>")
    assert daemon.proc is not None
    assert daemon.proc.wait(15) == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", daemon.port), 1)


def test_locked_storage_answers_the_fail_mode(tmp_path: Path, dns: DNSServer) -> None:
    proc = MxguardProcess(tmp_path, f'[dns]\nnameservers = ["{dns.address}"]\n'
                                    "[storage]\nbusy_timeout = 0.2\n")
    # [storage] appears twice in the file otherwise: write it in one table
    proc.config.write_text(
        f'[policy]\nlisten = "127.0.0.1:{proc.port}"\n'
        f'[milter]\nlisten = "127.0.0.1:{proc.milter_port}"\n'
        f'[storage]\nurl = "sqlite:///{tmp_path}/mxguard.db"\nbusy_timeout = 0.2\n'
        f'[dns]\nnameservers = ["{dns.address}"]\n')
    proc.start()
    try:
        c = proc.client()
        assert c.ask(helo_name="mail.sender.test").startswith("DEFER_IF_PERMIT")
        locker = sqlite3.connect(tmp_path / "mxguard.db", timeout=0)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            reply = c.ask(helo_name="mail.sender.test", sender="locked@sender.test")
            assert reply == "DUNNO"
            proc.wait_log("error=")
        finally:
            locker.rollback()
            locker.close()
        # recovered: greylisting works again on the same connection
        assert c.ask(helo_name="mail.sender.test", sender="again@sender.test").startswith(
            "DEFER_IF_PERMIT")
    finally:
        assert proc.stop() == 0


def test_decision_lines_go_to_syslog_when_configured(tmp_path: Path, dns: DNSServer) -> None:
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(10)
    port = receiver.getsockname()[1]
    proc = MxguardProcess(tmp_path, f'[dns]\nnameservers = ["{dns.address}"]\n'
                                    '[log]\ntarget = "syslog"\n'
                                    f'syslog_address = "127.0.0.1:{port}"\n'
                                    'syslog_facility = "mail"\n')
    proc.start()
    try:
        proc.client().ask(helo_name="mail.sender.test", sender="syslogged@sender.test")
        seen = b""
        while b"syslogged@sender.test" not in seen:
            seen = receiver.recv(65536)
        # <PRI>: facility mail (2) * 8 + severity info (6) = 22
        assert seen.startswith(b"<22>mxguard[")
        assert b"action=defer_if_permit" in seen
        assert "syslogged" not in proc.log_text()  # control: not also on stderr
    finally:
        receiver.close()
        assert proc.stop() == 0


@pytest.mark.parametrize(("mode", "starts"), [(0o644, False), (0o600, True)])
def test_readable_dkim_key_stops_start_up_with_the_fix(tmp_path: Path, mode: int,
                                                       starts: bool) -> None:
    from click.testing import CliRunner

    from mxguard.cli.dkim import dkim

    out = CliRunner().invoke(dkim, ["genkey", "-d", "example.test", "-s", "sel",
                                    "--type", "ed25519", "--dir", str(tmp_path)])
    assert out.exit_code == 0, out.output
    (key,) = tmp_path.glob("*.key")
    key.chmod(mode)
    proc = MxguardProcess(tmp_path, f'[dkim]\nkeys = ["example.test:sel:{key}"]\n')
    if starts:  # control: a private key is fine
        proc.start()
        assert proc.stop() == 0
        return
    with pytest.raises(RuntimeError) as err:
        proc.start()
    text = str(err.value)
    assert "exited 2" in text and "cannot start" in text
    assert f"chmod 600 {key}" in text
    assert "Traceback" not in text


def _held_open(socks: list[socket.socket]) -> int:
    """How many of ``socks`` mxguard has not closed (or reset)."""
    open_ = 0
    for s in socks:
        s.setblocking(False)
        try:
            while s.recv(65536):  # replies sent before (the milter's OPTNEG answer)
                pass
        except BlockingIOError:
            open_ += 1
        except OSError:
            pass
    return open_


@pytest.mark.parametrize(("door", "conns", "size", "shed"), [
    ("milter", 8, 200_000, True),
    ("milter", 3, 200_000, False),  # control: within [milter] max_buffered_total
    ("policy", 30, 60_000, True),
    ("policy", 10, 60_000, False),  # control: within [policy] max_buffered_total
])
def test_incomplete_input_of_all_connections_is_bounded(tmp_path: Path, dns: DNSServer,
                                                        door: str, conns: int, size: int,
                                                        shed: bool) -> None:
    mx = MxguardProcess(tmp_path, f'[dns]\nnameservers = ["{dns.address}"]\ntimeout = 2\n')
    mx.config.write_text(mx.config.read_text()
                         .replace("[milter]\n", "[milter]\nmax_buffered_total = 1048576\n")
                         .replace("[policy]\n", "[policy]\nmax_buffered_total = 1048576\n"))
    mx.start()
    try:
        from mxguard.protocols import milter as m

        port = mx.milter_port if door == "milter" else mx.port
        start = (m.OptNeg(6, 0x1FF, 0x1FFFFF).encode() + m.LEN.pack(size + 100) + b"L"
                 if door == "milter" else policy_request()[:-1])
        mx.wait_log("milter: listening")
        socks = []
        for _ in range(conns):
            s = socket.create_connection(("127.0.0.1", port), 5)
            s.sendall(start + b"x" * size)  # never the end of the packet / request
            socks.append(s)
        if shed:
            mx.wait_log(f"{door}.max_buffered_total")
        time.sleep(0.5)
        held = _held_open(socks)
        assert (held < conns) == shed, held
        assert (f"{door}.max_buffered_total" in mx.log_text()) == shed
        assert mx.client().ask(helo_name="mail.sender.test")  # the daemon keeps serving
        for s in socks:
            s.close()
    finally:
        assert mx.stop() == 0


def wait_for_log(proc: MxguardProcess, text: str, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while text not in proc.log_text():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.parametrize("workers", [1, 2])
def test_dashboard_port_taken_mail_is_still_served(tmp_path: Path, workers: int) -> None:
    """A taken [web] listen port (another program, a second daemon after an upgrade) costs
    the dashboard, never the mail: the doors serve, one error line says what is off."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    proc = MxguardProcess(tmp_path, f"[server]\nworkers = {workers}\n"
                                    f'[web]\nlisten = "127.0.0.1:{port}"\n'
                                    '[helo]\nmode = "off"\n[spf]\nmode = "off"\n'
                                    '[greylist]\nmode = "off"\n')
    try:
        proc.start()
        assert PolicyClient(proc.port).ask() == "DUNNO"
        assert wait_for_log(proc, f"dashboard: cannot listen on 127.0.0.1:{port}")
    finally:
        proc.stop()
        holder.close()


def test_dashboard_port_free_is_served(tmp_path: Path) -> None:  # control
    proc = MxguardProcess(tmp_path)
    try:
        proc.start()
        assert wait_for_log(proc, f"dashboard on http://127.0.0.1:{proc.web_port}/")
        assert "dashboard: cannot listen" not in proc.log_text()
    finally:
        proc.stop()
