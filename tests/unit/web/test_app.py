"""The dashboard app against real stores (SQLite history, greylist and Bayes) over
real HTTP on loopback: access rules, login, sessions, CSRF, learning, greylist,
config redaction, the JSON API. A peer other than loopback is simulated by a
test-only middleware (``X-Test-Peer``); everything else is the real app."""

from __future__ import annotations

import base64
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from mxguard import config
from mxguard.checks.greylist import open_greylister
from mxguard.content.bayes import BayesClassifier
from mxguard.core.runtime import Runtime
from mxguard.dns import Resolver
from mxguard.store.backends import open_bayes_store, open_history_store
from mxguard.store.history import HistoryRecord, new_id
from mxguard.web.app import COOKIE, WebState, make_app
from mxguard.web.auth import hash_password
from mxguard.web.server import store_secret
from tests.support.redis import redis_url  # noqa: F401

PASSWORD = "correct-horse-battery"
HASH = hash_password(PASSWORD, n=2**4, r=1, p=1)
SPAM = (b"From: Spammer <win@prize.test>\r\nTo: bob@example.test\r\nSubject: You won\r\n"
        b"Message-ID: <won@prize.test>\r\n\r\nClaim your prize now, click here\r\n")


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@web.middleware
async def fake_peer(request: web.Request,
                    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                    ) -> web.StreamResponse:
    peer = request.headers.get("X-Test-Peer")
    return await handler(request.clone(remote=peer) if peer else request)


@dataclass
class Site:
    client: TestClient[Any, Any]
    rt: Runtime
    clock: Clock
    ids: dict[str, str]
    set_cookie: str = ""

    async def login(self, password: str = PASSWORD, peer: str | None = None) -> int:
        headers = {"X-Test-Peer": peer} if peer else {}
        resp = await self.client.post("/login", data={"user": "admin", "password": password,
                                                      "next": "/"},
                                      allow_redirects=False, headers=headers)
        self.set_cookie = resp.headers.get("Set-Cookie", "")
        return resp.status

    async def csrf(self, path: str = "/greylist") -> str:
        html = await (await self.client.get(path)).text()
        m = re.search(r'name="csrf" value="([0-9a-f]+)"', html)
        assert m, html
        return m.group(1)


def write_config(tmp: Path, extra: str, url: str = "") -> config.Config:
    path = tmp / "mxguard.toml"
    path.write_text(f'[storage]\nurl = "{url or f"sqlite:///{tmp}/mx.db"}"\n'
                    f'[server]\nstate_dir = "{tmp}/state"\n{extra}')
    return config.load(str(path))


async def make_site(tmp: Path, web_extra: str, url: str = "") -> AsyncIterator[Site]:
    cfg = write_config(tmp, "[web]\nkeep_messages = 10\n" + web_extra, url)
    history = open_history_store(cfg)
    bayes_store = open_bayes_store(cfg)
    greylister = await open_greylister(cfg)
    services = {"history_store": history, "bayes_store": bayes_store,
                "bayes": BayesClassifier(bayes_store, cfg.bayes), "greylist": greylister}
    clock = Clock()
    rt = Runtime(config=cfg, resolver=Resolver(cfg.dns), services=services, clock=clock)
    now = clock.now
    kept = HistoryRecord(id=new_id(now - 60), time=now - 60, host="mx1", queue_id="4ABCDEF01",
                         client_address="192.0.2.7", client_name="mail.prize.test",
                         helo="mail.prize.test", sender="win@prize.test",
                         recipients=["bob@example.test"], from_="Spammer <win@prize.test>",
                         subject="You won", message_id="<won@prize.test>", size=len(SPAM),
                         score=7.5, action="quarantine", spam=True, decided_by="actions",
                         symbols=[{"name": "MXG_PRIZE", "score": 7.5, "detail": "prize"}],
                         timings={"rules": 1.25}, headers_added=[["X-Spam-Flag", "YES"]],
                         kept=True)
    evil = HistoryRecord(id=new_id(now - 30), time=now - 30, host="mx1", queue_id="4EVIL0002",
                         client_address="198.51.100.4", sender="eve@evil.test",
                         recipients=["bob@example.test"],
                         subject="<script>alert('x')</script>", score=0.5, action="accept",
                         symbols=[{"name": "DKIM_NONE", "score": 0.1, "detail": ""}])
    await history.add_many([kept, evil])
    await history.keep_raw(kept.id, SPAM)
    app = make_app(lambda: rt, WebState(await store_secret(services), clock=clock))
    app.middlewares.insert(0, fake_peer)
    client: TestClient[Any, Any] = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        yield Site(client, rt, clock, {"kept": kept.id, "evil": evil.id})
    finally:
        await client.close()
        for svc in (history, bayes_store, greylister):
            await svc.close()


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    async for s in make_site(tmp_path, f'password_hash = "{HASH}"\nlogin_attempts = 3\n'
                             "session_ttl = 600\n"):
        yield s


@pytest.fixture(params=["sqlite", "redis"])
async def fleet(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[list[Site]]:
    """Two dashboards (two worker processes or MX hosts) on one store."""
    url = request.getfixturevalue("redis_url") if request.param == "redis" else ""
    extra = f'password_hash = "{HASH}"\n'
    async for a in make_site(tmp_path, extra, url):
        async for b in make_site(tmp_path, extra, url):
            yield [a, b]


@pytest.fixture
async def open_site(tmp_path: Path) -> AsyncIterator[Site]:
    async for s in make_site(tmp_path, ""):
        yield s


# ------------------------------------------------------------ no password: loopback, read-only


@pytest.mark.parametrize(("peer", "status"), [
    (None, 200), ("::1", 200), ("127.0.0.9", 200),  # loopback
    ("192.0.2.9", 403), ("2001:db8::1", 403),  # not loopback
])
async def test_open_mode_is_loopback_only(open_site: Site, peer: str | None,
                                          status: int) -> None:
    headers = {"X-Test-Peer": peer} if peer else {}
    for path in ("/", "/history", "/api/history?limit=5"):
        resp = await open_site.client.get(path, headers=headers)
        assert resp.status == status, path


async def test_open_mode_refuses_writes(open_site: Site) -> None:
    resp = await open_site.client.post("/api/learn", json={"id": open_site.ids["kept"],
                                                           "kind": "spam"})
    assert resp.status == 403
    assert "password_hash" in (await resp.json())["error"]
    page = await (await open_site.client.get(f"/message/{open_site.ids['kept']}")).text()
    assert 'id="read-only"' in page and "learn-spam" not in page
    assert (await open_site.rt.services["bayes"].stats()).nspam == 0


# ------------------------------------------------------------ password set


async def test_login_required(site: Site) -> None:
    resp = await site.client.get("/history?sender=a", allow_redirects=False)
    assert resp.status == 303
    assert resp.headers["Location"].startswith("/login?next=")
    resp = await site.client.get("/api/history")
    assert resp.status == 401 and "Basic" in resp.headers["WWW-Authenticate"]


async def test_login_logout(site: Site, caplog: pytest.LogCaptureFixture) -> None:
    assert await site.login("wrong-password") == 401
    assert "failed login from 127.0.0.1" in caplog.text
    assert "wrong-password" not in caplog.text  # never the password
    assert await site.login() == 303
    cookie = site.client.session.cookie_jar.filter_cookies(site.client.make_url("/"))[COOKIE]
    assert "HttpOnly" in site.set_cookie and "SameSite=Strict" in site.set_cookie
    assert "Max-Age=600" in site.set_cookie
    token = cookie.value
    assert (await site.client.get("/", allow_redirects=False)).status == 200
    csrf = await site.csrf()
    resp = await site.client.post("/logout", data={"csrf": csrf}, allow_redirects=False)
    assert resp.status == 303
    assert (await site.client.get("/", allow_redirects=False)).status == 303
    # the old token, replayed, is refused too
    site.client.session.cookie_jar.update_cookies({COOKIE: token})
    assert (await site.client.get("/", allow_redirects=False)).status == 303


async def test_session_expires(site: Site) -> None:
    assert await site.login() == 303
    site.clock.now += 599
    assert (await site.client.get("/", allow_redirects=False)).status == 200
    site.clock.now += 2  # past session_ttl = 600
    assert (await site.client.get("/", allow_redirects=False)).status == 303


async def test_failed_logins_rate_limited(site: Site, caplog: pytest.LogCaptureFixture
                                          ) -> None:
    for _ in range(3):
        assert await site.login("nope-nope", peer="192.0.2.50") == 401
    assert await site.login(peer="192.0.2.50") == 429  # even the right password now
    assert await site.login(peer="192.0.2.51") == 303  # control: another client
    assert "too many failed logins" in caplog.text


async def test_basic_auth(site: Site) -> None:
    ok = await site.client.get("/api/history?limit=1", headers=basic("admin", PASSWORD))
    assert ok.status == 200 and len(await ok.json()) == 1
    bad = await site.client.get("/api/history?limit=1", headers=basic("admin", "nope"))
    assert bad.status == 401
    other = await site.client.get("/api/history?limit=1", headers=basic("root", PASSWORD))
    assert other.status == 401


async def test_csrf_needed_for_session_writes(site: Site) -> None:
    assert await site.login() == 303
    body = {"id": site.ids["kept"], "kind": "spam"}
    resp = await site.client.post("/api/learn", json=body)
    assert resp.status == 403 and "CSRF" in (await resp.json())["error"]
    resp = await site.client.post("/api/learn", json=body,
                                  headers={"X-CSRF-Token": "0" * 64})
    assert resp.status == 403
    assert (await site.rt.services["bayes"].stats()).nspam == 0
    resp = await site.client.post("/api/learn", json=body,
                                  headers={"X-CSRF-Token": await site.csrf()})
    assert resp.status == 200, await resp.text()
    data = await resp.json()
    assert data["outcome"] == "learned as spam" and data["nspam"] == 1


async def test_learn_buttons(site: Site) -> None:
    assert await site.login() == 303
    kept = site.ids["kept"]
    csrf = await site.csrf(f"/message/{kept}")
    bayes = site.rt.services["bayes"]
    for kind, spam, ham, words in [("spam", 1, 0, "learned as spam"),
                                   ("spam", 1, 0, "already learned as spam"),
                                   ("ham", 0, 1, "moved from the other class"),
                                   ("forget", 0, 0, "forgotten")]:
        resp = await site.client.post(f"/message/{kept}/learn",
                                      data={"kind": kind, "csrf": csrf})
        assert resp.status == 200
        assert words in await resp.text()
        st = await bayes.stats()
        assert (st.nspam, st.nham) == (spam, ham), kind
    # a form without the token is refused
    resp = await site.client.post(f"/message/{kept}/learn", data={"kind": "spam"})
    assert resp.status == 403


async def test_learn_needs_the_kept_message(site: Site) -> None:
    auth = basic("admin", PASSWORD)
    page = await (await site.client.get(f"/message/{site.ids['evil']}", headers=auth)).text()
    assert 'id="not-kept"' in page and "learn-spam" not in page
    resp = await site.client.post("/api/learn", json={"id": site.ids["evil"], "kind": "spam"},
                                  headers=auth)
    assert resp.status == 409 and "keep_messages" in (await resp.json())["error"]
    resp = await site.client.post("/api/learn", json={"id": "nosuch", "kind": "spam"},
                                  headers=auth)
    assert resp.status == 404
    page = await (await site.client.get(f"/message/{site.ids['kept']}", headers=auth)).text()
    assert 'id="learn-spam"' in page  # control: kept, buttons shown


async def test_pages_escape_record_text(site: Site) -> None:
    assert await site.login() == 303
    for path in ("/history", f"/message/{site.ids['evil']}"):
        html = await (await site.client.get(path)).text()
        assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in html, path
        assert "<script>alert" not in html
    html = await (await site.client.get(f"/message/{site.ids['kept']}")).text()
    assert "You won" in html and "MXG_PRIZE" in html and "X-Spam-Flag" in html


async def test_api_history_filters(site: Site) -> None:
    assert await site.login() == 303
    records = await (await site.client.get("/api/history?limit=10")).json()
    assert [r["queue_id"] for r in records] == ["4EVIL0002", "4ABCDEF01"]  # newest first
    first = records[1]
    assert {"queue_id", "time", "action", "score", "symbols"} <= set(first)
    assert first["symbols"][0]["name"] == "MXG_PRIZE" and first["symbols"][0]["score"] == 7.5
    one = await (await site.client.get("/api/history?queue_id=4ABCDEF01")).json()
    assert [r["queue_id"] for r in one] == ["4ABCDEF01"]
    none = await (await site.client.get("/api/history?queue_id=4NOSUCH")).json()
    assert none == []
    by_action = await (await site.client.get("/api/history?action=quarantine")).json()
    assert [r["queue_id"] for r in by_action] == ["4ABCDEF01"]
    bad = await site.client.get("/api/history?action=explode")
    assert bad.status == 400
    rec = await (await site.client.get("/api/history/4ABCDEF01")).json()
    assert rec["id"] == site.ids["kept"] and rec["explanation"]
    page = await site.client.get("/api/history?limit=1")
    older = await site.client.get(f"/api/history?limit=1&before_id={site.ids['evil']}")
    assert [r["id"] for r in await page.json()] == [site.ids["evil"]]
    assert [r["id"] for r in await older.json()] == [site.ids["kept"]]


async def test_greylist_lookup_and_whitelist(site: Site) -> None:
    assert await site.login() == 303
    html = await (await site.client.get("/greylist?client=192.0.2.77")).text()
    assert 'id="client-whitelisted">no<' in html
    csrf = await site.csrf()
    resp = await site.client.post("/greylist/whitelist",
                                  data={"entry": "192.0.2.0/24", "comment": "partner",
                                        "csrf": csrf})
    assert resp.status == 200
    html = await resp.text()
    assert "added to the client whitelist" in html
    html = await (await site.client.get("/greylist?client=192.0.2.77")).text()
    assert 'id="client-whitelisted">yes, by 192.0.2.0/24<' in html
    resp = await site.client.post("/greylist/whitelist", data={"entry": "/[/", "csrf": csrf})
    assert resp.status == 400


async def test_config_page_redacts(site: Site) -> None:
    assert await site.login() == 303
    html = await (await site.client.get("/config")).text()
    assert "password_hash = &#34;***&#34;" in html or 'password_hash = "***"' in html
    assert HASH not in html
    assert "keep_messages = 10" in html  # control: other keys as they are


async def test_metrics_networks(site: Site) -> None:
    assert (await site.client.get("/metrics")).status == 200  # loopback: no login
    assert (await site.client.get("/metrics", headers={"X-Test-Peer": "192.0.2.9"})
            ).status == 401
    resp = await site.client.get("/metrics",
                                 headers={"X-Test-Peer": "192.0.2.9",
                                          **basic("admin", PASSWORD)})
    assert resp.status == 200


async def test_overview_json(site: Site) -> None:
    assert await site.login() == 303
    data = await (await site.client.get("/api/overview?hours=1")).json()
    assert data["hours"] == 1
    assert data["totals"] == {"quarantine": 1, "accept": 1}
    assert ["MXG_PRIZE", 1] in data["top_symbols"]
    assert "store" in data["health"]
    html = await (await site.client.get("/")).text()
    assert "MXG_PRIZE" in html and 'id="timeline"' in html


@pytest.mark.parametrize(("target", "location"), [
    ("/history?action=reject", "/history?action=reject"),  # control: a local page
    ("//evil.test/x", "/"), ("https://evil.test/", "/"), ("/\\evil.test", "/"),
])
async def test_login_goes_back_only_to_local_pages(site: Site, target: str,
                                                   location: str) -> None:
    resp = await site.client.post("/login", data={"user": "admin", "password": PASSWORD,
                                                  "next": target}, allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == location


async def test_overview_escapes_senders(site: Site) -> None:
    evil = "</script><script>alert(1)</script>@evil.test"
    now = site.clock.now
    await site.rt.services["history_store"].add_many([HistoryRecord(
        id=new_id(now - 5), time=now - 5, queue_id="4REJ", sender=evil,
        client_address="203.0.113.5", action="reject", score=20.0,
        symbols=[{"name": "GTUBE", "score": 1000.0, "detail": ""}])])
    assert await site.login() == 303
    html = await (await site.client.get("/")).text()
    assert evil not in html and "<script>alert" not in html
    assert "&lt;/script&gt;&lt;script&gt;alert(1)&lt;/script&gt;@evil.test" in html  # table
    assert "\\u003c/script\\u003e" in html  # the chart's JSON
    data = await (await site.client.get("/api/overview?hours=1")).json()
    assert [evil, 1] in data["top_senders"]  # control: the API has the text as it is


async def test_session_valid_on_every_dashboard_of_a_store(fleet: list[Site]) -> None:
    a, b = fleet
    assert await a.login() == 303
    token = a.client.session.cookie_jar.filter_cookies(a.client.make_url("/"))[COOKIE].value
    b.client.session.cookie_jar.update_cookies({COOKIE: token})
    assert (await b.client.get("/", allow_redirects=False)).status == 200
    # both see the records of the shared history; learning on one counts for both
    records = await (await b.client.get("/api/history?limit=10")).json()
    assert {r["queue_id"] for r in records} >= {"4ABCDEF01", "4EVIL0002"}
    kept = next(r["id"] for r in records if r["queue_id"] == "4ABCDEF01")
    resp = await b.client.post("/api/learn", json={"id": kept, "kind": "spam"},
                               headers={"X-CSRF-Token": await b.csrf()})
    assert resp.status == 200, await resp.text()
    assert (await a.rt.services["bayes"].stats()).nspam == 1
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    b.client.session.cookie_jar.update_cookies({COOKIE: forged})
    assert (await b.client.get("/", allow_redirects=False)).status == 303  # control


async def test_greylist_api(site: Site) -> None:
    auth = basic("admin", PASSWORD)
    before = await (await site.client.get("/api/greylist?client=192.0.2.33",
                                          headers=auth)).json()
    assert before["client_whitelisted"] == "" and before["network"] == "192.0.2.0/24"
    resp = await site.client.post("/api/greylist/whitelist", headers=auth,
                                  json={"entry": "192.0.2.33", "comment": "api"})
    assert resp.status == 200 and (await resp.json()) == {"entry": "192.0.2.33",
                                                          "added": True}
    after = await (await site.client.get("/api/greylist?client=192.0.2.33",
                                         headers=auth)).json()
    assert after["client_whitelisted"] == "192.0.2.33"
    other = await (await site.client.get("/api/greylist?client=192.0.2.34",
                                         headers=auth)).json()
    assert other["client_whitelisted"] == ""  # control: the neighbour is not
    bad = await site.client.post("/api/greylist/whitelist", headers=auth, data=b"not json")
    assert bad.status == 400


async def test_api_learn_and_forget(site: Site) -> None:
    auth = basic("admin", PASSWORD)
    for kind, outcome, nspam in [("spam", "learned as spam", 1), ("forget", "forgotten", 0),
                                 ("forget", "was not learned", 0)]:
        resp = await site.client.post("/api/learn", headers=auth,
                                      json={"id": "4ABCDEF01", "kind": kind})
        data = await resp.json()
        assert resp.status == 200 and data["outcome"] == outcome and data["nspam"] == nspam
    resp = await site.client.post("/api/learn", headers=auth,
                                  json={"id": "4ABCDEF01", "kind": "maybe"})
    assert resp.status == 400
