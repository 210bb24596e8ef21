"""Metrics through the real daemon: ``[server] workers = 2``, a private Postfix
wired to the policy and milter doors, loopback DNS.

Mail is sent through Postfix; ``mxguard metrics`` (the CLI, reading the
workers' snapshot files) must show the decisions, symbol hits, check times,
DNS and store calls; a symbol that did not fire is absent. A killed worker's
counters stay in the totals (never backwards), and so do all of them once the
daemon stopped. The same numbers at ``/metrics`` on ``[web] listen`` need the
dashboard's web app (branch ``web``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from tests.support.daemon import MxguardProcess

from mxguard.testing.dns import DNSServer
from mxguard.testing.ports import free_port
from mxguard.testing.postfix import PostfixInstance, milter_wiring, policy_wiring
from mxguard.testing.sink import Sink
from mxguard.testing.smtp import send

OUTSIDE = "127.1.0.5"
ZONE = {
    "mail.sender.test": [("A", OUTSIDE)],
    "sender.test": [("TXT", "v=spf1 ip4:127.0.0.0/8 -all")],
}

Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


@pytest.fixture
def dns() -> Iterator[DNSServer]:
    with DNSServer(ZONE) as srv:
        yield srv


def parse(text: str) -> Samples:
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def cli(mx: MxguardProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mxguard", "metrics", "--config",
                           str(mx.config), *args], capture_output=True, text=True, timeout=30)


def read(mx: MxguardProcess) -> Samples:
    done = cli(mx)
    assert done.returncode == 0, done.stderr
    return parse(done.stdout)


def total(s: Samples, name: str, **labels: str) -> float:
    return sum(v for k, v in s.get(name, {}).items()
               if all(dict(k).get(a) == b for a, b in labels.items()))


def wait_until(mx: MxguardProcess, pred: Callable[[Samples], bool],
               timeout: float = 20.0) -> Samples:
    deadline = time.monotonic() + timeout
    s = read(mx)
    while not pred(s):
        if time.monotonic() > deadline:
            raise AssertionError(f"metrics never got there: {s}")
        time.sleep(0.3)
        s = read(mx)
    return s


Stack = tuple[MxguardProcess, PostfixInstance]


@pytest.fixture
def stack(tmp_path: Path, dns: DNSServer, sink: Sink,
          postfix_factory: Callable[..., PostfixInstance]) -> Iterator[Stack]:
    mx = MxguardProcess(tmp_path, (
        f'[server]\nworkers = 2\nshutdown_grace = 3\nstate_dir = "{tmp_path}/state"\n'
        f'[dns]\nnameservers = ["{dns.address}"]\ntimeout = 2\n'
        '[helo]\nexempt_networks = []\n'
        '[greylist]\ndelay = 1\nauto_whitelist_clients = 0\n'
        f'[web]\nlisten = "127.0.0.1:{free_port()}"\n'))
    mx.start()
    pf = postfix_factory({**policy_wiring(mx.port), **milter_wiring(mx.milter_port)})
    try:
        yield mx, pf
    finally:
        mx.stop()


def deliver(pf: PostfixInstance, subject: str) -> Any:
    data = (f"From: alice@sender.test\r\nTo: bob@example.test\r\nSubject: {subject}\r\n"
            "Date: Thu, 03 Dec 2026 10:00:00 +0000\r\nMessage-ID: "
            f"<{subject}@sender.test>\r\n\r\nHello Bob, see you at lunch.\r\n").encode()
    return send(pf.smtp_port, helo="mail.sender.test", mail_from="alice@sender.test",
                rcpts=["bob@example.test"], data=data, source_ip=OUTSIDE)


def worker_files(mx: MxguardProcess) -> list[int]:
    d = mx.tmp / "state" / "metrics"
    return sorted(int(p.name.split(".")[0]) for p in d.glob("[0-9]*.json"))


def test_cli_counts_mail_through_postfix_across_two_workers(stack: Stack, sink: Sink) -> None:
    mx, pf = stack
    first = deliver(pf, "first")
    assert not first.accepted  # greylisted: a new triplet, deferred
    time.sleep(1.2)  # [greylist] delay = 1
    second = deliver(pf, "second")
    assert second.accepted, second.rcpts
    sink.wait_for(1)

    s = wait_until(mx, lambda s: total(s, "mxguard_messages_total") >= 1
                   and total(s, "mxguard_requests_total") >= 2)
    assert total(s, "mxguard_requests_total", door="policy", action="defer_if_permit") >= 1
    assert total(s, "mxguard_requests_total", door="policy", action="accept") >= 1
    assert total(s, "mxguard_messages_total", action="accept") == 1
    assert total(s, "mxguard_messages_total", action="reject") == 0  # control
    assert total(s, "mxguard_greylist_triplets_total", result="new") >= 1
    assert total(s, "mxguard_greylist_triplets_total", result="passed") >= 1
    assert total(s, "mxguard_symbols_total", symbol="GREYLIST_DEFERRED") >= 1
    assert total(s, "mxguard_symbols_total", symbol="SPF_PASS") >= 1
    assert total(s, "mxguard_symbols_total", symbol="SPF_FAIL") == 0  # control: did not fire
    assert not any(dict(k)["symbol"] == "SPF_FAIL" for k in s["mxguard_symbols_total"])
    assert total(s, "mxguard_check_duration_seconds_count", check="spf") >= 2
    assert total(s, "mxguard_check_duration_seconds_bucket", check="spf", le="+Inf") == \
        total(s, "mxguard_check_duration_seconds_count", check="spf")
    assert total(s, "mxguard_dns_queries_total", type="TXT") >= 1
    assert total(s, "mxguard_store_operations_total", store="greylist", op="lookup") >= 2
    assert total(s, "mxguard_store_errors_total") == 0
    assert total(s, "mxguard_workers") == 2
    assert total(s, "mxguard_process_resident_memory_bytes") > 10_000_000
    assert total(s, "mxguard_build_info") == 1

    # JSON: the same numbers
    done = cli(mx, "--json")
    assert done.returncode == 0, done.stderr
    import json

    rows = json.loads(done.stdout)["metrics"]["mxguard_messages_total"]
    assert {"labels": {"action": "accept"}, "value": 1} in rows

    # a worker killed: the master restarts it; its counters stay in the totals
    before = total(s, "mxguard_requests_total")
    pids = worker_files(mx)
    assert len(pids) == 2
    os.kill(pids[0], signal.SIGKILL)
    s = wait_until(mx, lambda s: total(s, "mxguard_workers") == 2
                   and pids[0] not in worker_files(mx))
    assert total(s, "mxguard_requests_total") >= before
    assert (mx.tmp / "state" / "metrics" / "retired.json").exists()

    # stopped: the counters are still there, no worker runs
    assert mx.stop() == 0
    s = read(mx)
    assert total(s, "mxguard_requests_total") >= before
    assert total(s, "mxguard_messages_total", action="accept") == 1
    assert total(s, "mxguard_workers") == 0
    assert total(s, "mxguard_connections") == 0  # gauges of stopped processes: none


def test_cli_without_a_daemon_says_so(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[server]\nstate_dir = "{tmp_path}/nowhere"\n')
    done = subprocess.run([sys.executable, "-m", "mxguard", "metrics", "--config", str(config)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert "no metrics in" in done.stderr and "Traceback" not in done.stderr


def test_metrics_endpoint_on_web_listen(stack: Stack, sink: Sink) -> None:
    """``/metrics`` of the dashboard's listener (needs the web app: branch ``web``)."""
    pytest.importorskip("mxguard.web.app", reason="the web app (branch web) is not merged yet")
    import tomllib

    mx, pf = stack
    listen = tomllib.loads(mx.config.read_text())["web"]["listen"]
    assert not deliver(pf, "first").accepted
    deadline = time.monotonic() + 20
    while True:
        try:
            with urllib.request.urlopen(f"http://{listen}/metrics", timeout=5) as resp:
                ctype = resp.headers["Content-Type"]
                s = parse(resp.read().decode())
        except OSError:
            s, ctype = {}, ""
        # each worker writes its counters every 2 s: wait until the one that served the
        # request has written its greylist count too, not only the first worker's file
        if (total(s, "mxguard_requests_total") >= 1 and total(s, "mxguard_workers") == 2
                and total(s, "mxguard_greylist_triplets_total", result="new") >= 1):
            break
        assert time.monotonic() < deadline, s
        time.sleep(0.3)
    assert ctype.startswith("text/plain")
    assert total(s, "mxguard_greylist_triplets_total", result="new") >= 1
    assert total(s, "mxguard_symbols_total", symbol="SPF_FAIL") == 0  # control
