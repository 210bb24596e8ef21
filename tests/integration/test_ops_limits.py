"""Small operational faults of issue 14, item 9, through the real ``mxguard serve``:

* the file-descriptor limit is raised at start and a warning gives the numbers
  when the hard limit cannot cover ``max_connections`` (control: one that can);
* a policy client that half-closes after its request still gets the reply
  (control: one that keeps its side open).
"""

from __future__ import annotations

import functools
import re
import resource
import socket
from pathlib import Path

import pytest
from tests.support.daemon import MxguardProcess, policy_request

from mxguard.testing.dns import DNSServer


def limit_nofile(soft: int, hard: int) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def soft_nofile(pid: int) -> int:
    text = Path(f"/proc/{pid}/limits").read_text()
    m = re.search(r"^Max open files\s+(\d+)\s+(\d+)", text, re.M)
    assert m, text
    return int(m.group(1))


@pytest.mark.parametrize(("max_connections", "warned"), [
    (100, False),  # control: 2 x 100 + reserve fits in the hard limit of 1024
    (20000, True),  # the defaults need 40256 descriptors
])
def test_fd_limit_raised_and_checked_against_max_connections(
        tmp_path: Path, max_connections: int, warned: bool) -> None:
    proc = MxguardProcess(tmp_path)
    text = proc.config.read_text()
    text = text.replace("[milter]\n", f"max_connections = {max_connections}\n[milter]\n", 1)
    text = text.replace("[storage]\n", f"max_connections = {max_connections}\n[storage]\n", 1)
    proc.config.write_text(text)
    proc.start(preexec_fn=functools.partial(limit_nofile, 256, 1024))
    try:
        proc.wait_log(" started ")
        assert proc.proc is not None
        assert soft_nofile(proc.proc.pid) == 1024  # raised from 256 to the hard limit
        lines = [ln for ln in proc.log_text().splitlines() if "file descriptor limit" in ln]
        if warned:
            assert len(lines) == 1, lines
            assert "1024" in lines[0] and "40256" in lines[0], lines[0]
            assert "policy.max_connections = 20000" in lines[0], lines[0]
        else:
            assert lines == []
    finally:
        assert proc.stop() == 0


@pytest.mark.parametrize("half_close", [False, True], ids=["control-open", "half-close"])
def test_policy_reply_reaches_a_client_that_half_closes(tmp_path: Path,
                                                        half_close: bool) -> None:
    # SPF's DNS stays silent for a moment: the reply is written after the EOF came in
    with DNSServer({"sender.test": [("TIMEOUT", "TXT")]}) as dns:
        proc = MxguardProcess(tmp_path, f'[greylist]\nmode = "off"\n[helo]\nmode = "off"\n'
                              f'[dns]\nnameservers = ["{dns.address}"]\ntimeout = 0.3\n')
        proc.start()
        try:
            with socket.create_connection(("127.0.0.1", proc.port), 10) as s:
                s.sendall(policy_request() + policy_request(recipient="other@dest.test"))
                if half_close:
                    s.shutdown(socket.SHUT_WR)  # old code: closed before writing the reply
                got = b""
                while got.count(b"\n\n") < 2:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    got += chunk
                assert got.count(b"action=") == 2, got
                if half_close:
                    assert s.recv(1) == b""  # and then closed by mxguard
        finally:
            assert proc.stop() == 0
