"""The dashboard of a real ``mxguard serve`` behind a real Postfix: mail goes in
through the milter door, the history (kept messages on) shows it at
``/api/history`` and on the pages, ``/metrics`` counts it, login and logout
work, and learn-as-spam through the API updates the Bayes store, as the real
``mxguard bayes stats`` reads it."""

from __future__ import annotations

import base64
import http.cookiejar
import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from tests.support.daemon import MxguardProcess

from mxguard.testing.dns import DNSServer
from mxguard.testing.postfix import PostfixInstance, milter_wiring
from mxguard.testing.sink import Sink
from mxguard.testing.smtp import Transcript, send
from mxguard.web.auth import hash_password

OUTSIDE = "127.1.0.5"
PASSWORD = "integration-pass-1"
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def message(subject: str, body: str) -> bytes:
    return (f"From: Alice <alice@sender.test>\r\nTo: bob@example.test\r\nSubject: {subject}"
            f"\r\nMessage-ID: <{subject}@sender.test>\r\n"
            f"Date: Thu, 03 Dec 2026 10:00:00 +0000\r\n\r\n{body}\r\n").encode()


def deliver(pf: PostfixInstance, data: bytes) -> Transcript:
    return send(pf.smtp_port, helo="mail.sender.test", mail_from="alice@sender.test",
                rcpts=["bob@example.test"], data=data, source_ip=OUTSIDE)


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


@dataclass
class Web:
    base: str
    mx: MxguardProcess

    def request(self, path: str, *, data: bytes | None = None, auth: bool = False,
                headers: dict[str, str] | None = None,
                opener: urllib.request.OpenerDirector | None = None) -> tuple[int, str, Any]:
        req = urllib.request.Request(self.base + path, data=data, headers=headers or {})
        if auth:
            token = base64.b64encode(f"admin:{PASSWORD}".encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        opener = opener or urllib.request.build_opener(NoRedirect)
        try:
            with opener.open(req, timeout=10) as resp:
                return resp.status, resp.read().decode(), resp.headers
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(), exc.headers

    def api(self, path: str, **kw: Any) -> Any:
        status, body, _ = self.request(path, auth=True, **kw)
        assert status == 200, (status, body)
        return json.loads(body)


@pytest.fixture
def dns() -> Iterator[DNSServer]:
    zone = {"mail.sender.test": [("A", "192.0.2.10")],
            "sender.test": [("TXT", "v=spf1 ip4:127.0.0.0/8 -all")]}
    with DNSServer(zone) as srv:
        yield srv


@pytest.fixture
def stack(tmp_path: Path, dns: DNSServer, postfix_factory: Callable[..., PostfixInstance]
          ) -> Iterator[tuple[Web, PostfixInstance]]:
    mx = MxguardProcess(tmp_path, (
        f'[server]\nstate_dir = "{tmp_path}/state"\n'
        f'[dns]\nnameservers = ["{dns.address}"]\ntimeout = 2\n'
        "[helo]\nexempt_networks = []\n"
        "[dkim]\ninternal_hosts = []\n"
        "[history]\nflush_interval = 0.1\n"
        "[bayes]\nautolearn = false\n"  # every count below comes from the dashboard
        f'[web]\npassword_hash = "{hash_password(PASSWORD)}"\nkeep_messages = 20\n'))
    mx.start()
    try:
        pf = postfix_factory(milter_wiring(mx.milter_port))
        yield Web(f"http://127.0.0.1:{mx.web_port}", mx), pf
    finally:
        assert mx.stop() == 0


def wait_records(web: Web, want: int) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        records = web.api("/api/history?limit=10")
        if len(records) >= want:
            break
        time.sleep(0.1)
    return records


def bayes_stats(web: Web) -> dict[str, str]:
    """``mxguard bayes stats`` (the real command) on the daemon's store."""
    done = subprocess.run([sys.executable, "-m", "mxguard", "bayes", "stats", "--config",
                           str(web.mx.config)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return dict(line.split("\t", 1) for line in done.stdout.splitlines())


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_dashboard_through_postfix(stack: tuple[Web, PostfixInstance], sink: Sink) -> None:
    web, pf = stack
    ham = deliver(pf, message("lunch", "Lunch tomorrow at noon?"))
    assert ham.accepted, ham.end_of_data
    spam = deliver(pf, message("prize", GTUBE))
    assert spam.end_of_data is not None and spam.end_of_data.code == 550

    # --- JSON API
    records = wait_records(web, 2)
    by_subject = {r["subject"]: r for r in records}
    assert set(by_subject) == {"lunch", "prize"}, records
    h, s = by_subject["lunch"], by_subject["prize"]
    for r in (h, s):
        assert {"queue_id", "time", "action", "score", "symbols"} <= set(r)
        assert all({"name", "score"} <= set(sym) for sym in r["symbols"])
    assert h["queue_id"] == ham.queue_id and h["action"] == "accept"
    assert s["action"] == "reject" and any(x["name"] == "GTUBE" for x in s["symbols"])
    only = web.api(f"/api/history?queue_id={ham.queue_id}")
    assert [r["id"] for r in only] == [h["id"]]
    assert web.api("/api/history?queue_id=NOSUCHQID") == []  # control
    one = web.api(f"/api/history/{h['id']}")
    assert one["queue_id"] == ham.queue_id and one["explanation"]

    # --- without login: pages redirect, API asks for Basic; /metrics from loopback is open
    status, _, headers = web.request("/")
    assert status == 303 and headers["Location"].startswith("/login")
    status, _, headers = web.request("/api/history")
    assert status == 401 and "Basic" in headers["WWW-Authenticate"]
    status, text, headers = web.request("/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert metric(text, "mxguard_messages_total", action="accept") >= 1
    assert metric(text, "mxguard_messages_total", action="reject") >= 1
    assert metric(text, "mxguard_symbols_total", symbol="GTUBE") >= 1
    assert 'symbol="BAYES_99"' not in text  # control: a symbol that did not fire is absent
    status, body, _ = web.request("/healthz")
    assert status == 200 and json.loads(body)["store"]["reachable"] is True

    # --- login form, pages, logout
    jar = http.cookiejar.CookieJar()
    browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar), NoRedirect)
    form = urllib.parse.urlencode({"user": "admin", "password": "wrong-one", "next": "/"})
    status, body, _ = web.request("/login", data=form.encode(), opener=browser)
    assert status == 401 and "Wrong user name or password" in body
    assert "wrong-one" not in web.mx.log_text()
    form = urllib.parse.urlencode({"user": "admin", "password": PASSWORD, "next": "/"})
    status, _, headers = web.request("/login", data=form.encode(), opener=browser)
    assert status == 303 and "HttpOnly" in headers["Set-Cookie"]
    status, page, _ = web.request("/", opener=browser)
    assert status == 200 and "GTUBE" in page and 'id="timeline"' in page
    status, page, _ = web.request(f"/history?queue_id={ham.queue_id}", opener=browser)
    assert status == 200 and "lunch" in page and "prize" not in page
    status, page, _ = web.request(f"/message/{h['id']}", opener=browser)
    assert status == 200 and 'id="learn-spam"' in page and ham.queue_id in page
    status, page, _ = web.request("/config", opener=browser)
    assert status == 200 and "keep_messages = 20" in page and "scrypt$" not in page
    status, page, _ = web.request("/greylist?client=127.1.0.5", opener=browser)
    assert status == 200 and "client-whitelisted" in page
    m = re.search(r'name="csrf" value="([0-9a-f]+)"', page)
    assert m
    status, _, _ = web.request("/logout", data=urllib.parse.urlencode(
        {"csrf": m.group(1)}).encode(), opener=browser)
    assert status == 303
    status, _, _ = web.request("/", opener=browser)
    assert status == 303  # logged out

    # --- learn-as-spam through the API updates the Bayes store
    assert bayes_stats(web)["nspam"] == "0"  # control: nothing learned before
    out = web.api("/api/learn", data=json.dumps({"id": h["id"], "kind": "spam"}).encode(),
                  headers={"Content-Type": "application/json"})
    assert out["outcome"] == "learned as spam" and out["nspam"] == 1
    stats = bayes_stats(web)
    assert stats["nspam"] == "1" and stats["nham"] == "0"
    assert "learned as spam by admin" in web.mx.log_text()
    log = web.mx.log_text()
    assert PASSWORD not in log and "scrypt$" not in log  # neither password nor hash
    assert "Traceback" not in log
    sink.wait_for(1)


def test_dashboard_with_workers(tmp_path: Path) -> None:
    """``[server] workers = 2``: the master binds the web socket, both workers serve
    it, and a session one worker issued is valid in the other (the key comes from
    the shared store): every request with the cookie is answered, none redirected."""
    mx = MxguardProcess(tmp_path, (
        f'[server]\nworkers = 2\nshutdown_grace = 3\nstate_dir = "{tmp_path}/state"\n'
        f'[web]\npassword_hash = "{hash_password(PASSWORD)}"\n'))
    mx.start()
    try:
        web = Web(f"http://127.0.0.1:{mx.web_port}", mx)
        mx.wait_log("dashboard on http://", timeout=15)
        deadline = time.monotonic() + 15
        while mx.log_text().count("dashboard on http://") < 2:  # both workers serve it
            assert time.monotonic() < deadline, mx.log_text()
            time.sleep(0.1)
        jar = http.cookiejar.CookieJar()
        browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar),
                                              NoRedirect)
        form = urllib.parse.urlencode({"user": "admin", "password": PASSWORD, "next": "/"})
        status, _, _ = web.request("/login", data=form.encode(), opener=browser)
        assert status == 303
        pids = set()
        for _ in range(30):  # new connections: the kernel spreads them over both workers
            status, body, _ = web.request("/api/overview?hours=1", opener=browser)
            assert status == 200, body
            pids.update(str(p["pid"]) for p in json.loads(body)["health"]["workers"]
                        ["processes"])
        assert len(pids) == 2
        status, _, _ = web.request("/api/overview")  # control: no cookie, no answer
        assert status == 401
    finally:
        assert mx.stop() == 0
