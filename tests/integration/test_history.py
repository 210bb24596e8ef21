"""Through a real Postfix and a real ``mxguard serve``: a greylisted policy
request, a ham and a spam message end up in the history, and the real
``mxguard history --json`` / ``mxguard explain`` commands show them with their
queue ids; with ``[milter] explain_header`` the delivered ham carries
X-Mxguard-Reason.

Postfix is wired to both doors (policy for greylisting, milter for content);
outside clients connect from 127.1.0.5; a loopback DNS server publishes SPF.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.support.daemon import MxguardProcess

from mxguard.testing.dns import DNSServer
from mxguard.testing.postfix import PostfixInstance, milter_wiring, policy_wiring
from mxguard.testing.sink import Sink
from mxguard.testing.smtp import Transcript, send

OUTSIDE = "127.1.0.5"
DELAY = 2
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


@pytest.fixture
def dns() -> Iterator[DNSServer]:
    zone = {"mail.sender.test": [("A", "192.0.2.10")],
            "sender.test": [("TXT", "v=spf1 ip4:127.0.0.0/8 -all")]}
    with DNSServer(zone) as srv:
        yield srv


def message(subject: str, body: str) -> bytes:
    return (f"From: Alice <alice@sender.test>\r\nTo: bob@example.test\r\nSubject: {subject}"
            f"\r\nMessage-ID: <{subject}@sender.test>\r\n"
            f"Date: Tue, 24 Nov 2026 10:00:00 +0000\r\n\r\n{body}\r\n").encode()


def deliver(pf: PostfixInstance, data: bytes) -> Transcript:
    return send(pf.smtp_port, helo="mail.sender.test", mail_from="alice@sender.test",
                rcpts=["bob@example.test"], data=data, source_ip=OUTSIDE)


def cli(mx: MxguardProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mxguard", *args, "--config", str(mx.config)],
                          capture_output=True, text=True, timeout=60)


def history(mx: MxguardProcess, want: int) -> list[dict[str, Any]]:
    """``mxguard history --json`` once ``want`` records were written (or what there is)."""
    records: list[dict[str, Any]] = []
    for _ in range(100):
        done = cli(mx, "history", "--json")
        if done.returncode == 0:
            records = json.loads(done.stdout)
            if len(records) >= want:
                break
        time.sleep(0.1)
    return records


def test_history_and_explain_through_postfix(tmp_path: Path, dns: DNSServer, sink: Sink,
                                             postfix_factory: Callable[..., PostfixInstance]
                                             ) -> None:
    mx = MxguardProcess(tmp_path, (
        f'[dns]\nnameservers = ["{dns.address}"]\ntimeout = 2\n'
        "[helo]\nexempt_networks = []\n"
        f"[greylist]\ndelay = {DELAY}\n"
        "[dkim]\ninternal_hosts = []\n"
        "[history]\nflush_interval = 0.1\n"))
    mx.config.write_text(mx.config.read_text().replace("[milter]\n",
                                                       "[milter]\nexplain_header = true\n"))
    mx.start()
    try:
        pf = postfix_factory({**policy_wiring(mx.port), **milter_wiring(mx.milter_port)})
        first = deliver(pf, message("ham", "Lunch tomorrow?"))
        assert str(first.rcpts[0]).startswith("450 4.2.0"), first.rcpts[0]  # greylisted
        time.sleep(DELAY + 0.5)
        ham = deliver(pf, message("ham", "Lunch tomorrow?"))
        assert ham.accepted, ham.end_of_data
        ham_qid = ham.queue_id
        spam = deliver(pf, message("spam", GTUBE))
        assert spam.end_of_data is not None and spam.end_of_data.code == 550

        records = history(mx, 3)
        by_kind = {("policy" if r["door"] == "policy" else r["subject"]): r for r in records}
        assert set(by_kind) == {"policy", "ham", "spam"}, records
        assert [r["time"] for r in records] == sorted((r["time"] for r in records),
                                                      reverse=True)  # newest first
        grey = by_kind["policy"]
        assert grey["action"] in ("defer", "defer_if_permit") and grey["decided_by"] == "greylist"
        assert grey["sender"] == "alice@sender.test" and grey["recipients"] == ["bob@example.test"]
        assert grey["reply"].startswith("450 4.2.0") or "4.2.0" in grey["reply"]
        h = by_kind["ham"]
        assert h["queue_id"] == ham_qid and h["action"] == "accept" and not h["spam"]
        assert h["from"] == "Alice <alice@sender.test>" and h["message_id"] == "<ham@sender.test>"
        assert h["client_address"] == OUTSIDE and h["helo"] == "mail.sender.test"
        assert any(s["name"].startswith("DMARC_") for s in h["symbols"]) and h["timings"]["rules"]
        assert ["X-Mxguard-Reason", h["headers_added"][-1][1]] in h["headers_added"]
        s = by_kind["spam"]
        assert s["action"] == "reject" and s["spam"] and s["decided_by"] == "actions"
        assert s["queue_id"] and s["queue_id"] != ham_qid
        assert any(x["name"] == "GTUBE" for x in s["symbols"])

        # the filters of the real command, with a control
        done = cli(mx, "history", "--json", "--queue-id", ham_qid or "-")
        assert [r["id"] for r in json.loads(done.stdout)] == [h["id"]]
        done = cli(mx, "history", "--json", "--action", "quarantine")
        assert json.loads(done.stdout) == []

        done = cli(mx, "explain", s["queue_id"])
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("rejected, spam score ")
        assert "GTUBE" in done.stdout.splitlines()[0]
        done = cli(mx, "explain", grey["id"])
        assert done.returncode == 0 and done.stdout.startswith("deferred: greylisted, first "
                                                               "time this client network")
        done = cli(mx, "explain", "NOSUCHID")
        assert done.returncode == 1 and "no history record" in done.stderr

        (delivered,) = sink.wait_for(1)
        reason = " ".join((delivered.header("X-Mxguard-Reason") or "").split())
        assert reason.startswith("accept by actions; score "), reason
        assert "MXG_DATE_PAST(0.8)" in reason  # the old Date: header of message()
    finally:
        assert mx.stop() == 0
    # the daemon's last records were flushed on stop; the store is still readable
    assert cli(mx, "history", "--json").returncode == 0
