"""The dashboard's aiohttp application: pages, JSON API, /metrics, /healthz.

Access (see README "Dashboard"):

* ``/metrics`` and ``/healthz`` from ``[web] metrics_networks``: no login.
* No ``[web] password_hash``: read-only pages and API for loopback clients
  only; others get 403; every write (POST) gets 403.
* A hash set: every page and API needs a session (login form, cookie) or HTTP
  Basic auth; a write with a session needs its CSRF token (form field
  ``csrf`` or header ``X-CSRF-Token``). Failed logins are counted per client
  (``[web] login_attempts`` a minute, then 429) and logged without the password.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2
from aiohttp import web

from mxguard import __version__
from mxguard.core.runtime import Runtime
from mxguard.store.base import StoreError
from mxguard.store.history import ACTIONS
from mxguard.web import actions
from mxguard.web.actions import ActionError, call
from mxguard.web.auth import LoginLimiter, Sessions, csrf_ok, session_key, verify_password

log = logging.getLogger("mxguard")

HERE = Path(__file__).parent
COOKIE = "mxguard_session"
PAGE_SIZE = 50
MAX_LIMIT = 500
BASIC_CACHE_SECONDS = 60.0
BASIC_CACHE_MAX = 256
OVERVIEW_HOURS = (1, 3, 6, 12, 24, 48)
FILTERS = ("queue_id", "sender", "recipient", "client", "action", "symbol", "text")
MAX_FIELD = 500  # characters of a filter value
_RECORD_ID = re.compile(r"^[0-9a-f]{1,64}$")
_RELATIVE = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

RUNTIME_KEY: web.AppKey[Callable[[], Runtime]] = web.AppKey("mxguard_runtime")
STATE_KEY: web.AppKey[WebState] = web.AppKey("mxguard_web_state")
AUTH_KEY: web.RequestKey[Auth] = web.RequestKey("mxguard_auth")


@dataclass(frozen=True)
class Auth:
    """Who is asking: ``kind`` is "session", "basic", "open" (no hash, loopback,
    read-only) or "network" (/metrics from metrics_networks)."""

    kind: str
    user: str = ""
    nonce: str = ""  # of the session (for the CSRF token)
    csrf: str = ""

    @property
    def can_write(self) -> bool:
        return self.kind in ("session", "basic")


class WebState:
    """Per-process state of the dashboard: the session key, the limiter, caches."""

    def __init__(self, store_secret: bytes, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.store_secret = store_secret
        self.clock = clock
        self.monotonic = monotonic
        self._sessions: dict[tuple[str, str, int], Sessions] = {}
        self.limiter: LoginLimiter | None = None
        self._basic_ok: dict[bytes, float] = {}

    def sessions(self, rt: Runtime) -> Sessions:
        w = rt.config.web
        k = (w.user, w.password_hash, w.session_ttl)
        s = self._sessions.get(k)
        if s is None:  # a reload changed the password: old sessions end
            self._sessions.clear()
            s = Sessions(session_key(self.store_secret, w.password_hash, w.user),
                         w.session_ttl, self.clock)
            self._sessions[k] = s
        return s

    def login_limiter(self, rt: Runtime) -> LoginLimiter:
        n = rt.config.web.login_attempts
        if self.limiter is None or self.limiter.attempts != n:
            self.limiter = LoginLimiter(n, self.monotonic)
        return self.limiter

    def basic_cached(self, digest: bytes) -> bool:
        exp = self._basic_ok.get(digest)
        return exp is not None and exp > self.monotonic()

    def remember_basic(self, digest: bytes) -> None:
        now = self.monotonic()
        if len(self._basic_ok) >= BASIC_CACHE_MAX:
            for k, exp in list(self._basic_ok.items()):
                if exp <= now or len(self._basic_ok) >= BASIC_CACHE_MAX:
                    del self._basic_ok[k]
        self._basic_ok[digest] = now + BASIC_CACHE_SECONDS


# ------------------------------------------------------------ helpers


def _addr(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not text:
        return None
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_loopback(peer: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 and a UNIX socket peer (no address)."""
    if peer is None or peer == "":
        return True
    ip = _addr(peer)
    return ip is not None and ip.is_loopback


def in_networks(peer: str | None, networks: list[str]) -> bool:
    ip = _addr(peer)
    if ip is None:
        return peer in (None, "")
    for net in networks:
        try:
            if ip in ipaddress.ip_network(net, strict=False):
                return True
        except ValueError:
            continue
    return False


def fmt_time(ts: Any) -> str:
    try:
        return datetime.fromtimestamp(float(ts), UTC).strftime("%Y-%m-%d %H:%M:%S")
    except (TypeError, ValueError, OverflowError, OSError):
        return "-"


def parse_when(text: str, now: float) -> float | None:
    """``"2h"`` (ago), an epoch number or an ISO date/time (UTC unless it says);
    None for empty; ValueError for anything else."""
    text = text.strip()
    if not text:
        return None
    m = _RELATIVE.match(text)
    if m:
        return now - int(m.group(1)) * _UNITS[m.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{text!r}: give e.g. 2h, 3d, 2026-01-31 or 2026-01-31T08:00") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def record_dict(rec: Any) -> dict[str, Any]:
    d = rec.to_dict() if hasattr(rec, "to_dict") else dict(rec)
    return dict(d)


def make_env() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(HERE / "templates")),
                             autoescape=jinja2.select_autoescape(["html"], default=True),
                             undefined=jinja2.StrictUndefined)
    env.filters["when"] = fmt_time
    env.filters["score"] = lambda v: f"{float(v):+.2f}" if v is not None else "-"
    env.globals["version"] = __version__
    return env


ENV = make_env()


def render(request: web.Request, name: str, status: int = 200, **ctx: Any) -> web.Response:
    auth: Auth = request.get(AUTH_KEY) or Auth("none")
    ctx.setdefault("auth", auth)
    ctx.setdefault("path", request.path)
    html = ENV.get_template(name).render(**ctx)
    resp = web.Response(text=html, content_type="text/html", status=status)
    resp.headers["Cache-Control"] = "no-store"
    return resp


def json_response(data: Any, status: int = 200) -> web.Response:
    resp = web.json_response(data, status=status, dumps=lambda o: json.dumps(o, default=str))
    resp.headers["Cache-Control"] = "no-store"
    return resp


def _is_api(path: str) -> bool:
    return path.startswith("/api/") or path in ("/metrics", "/healthz")


def _deny(request: web.Request, status: int, message: str) -> web.Response:
    if _is_api(request.path):
        return json_response({"error": message}, status)
    return render(request, "error.html", status=status, message=message,
                  auth=Auth("none"))


def _runtime(request: web.Request) -> Runtime:
    return request.app[RUNTIME_KEY]()


def _state(request: web.Request) -> WebState:
    return request.app[STATE_KEY]


def _history(rt: Runtime) -> Any:
    store = rt.services.get("history_store")
    if store is None:
        raise ActionError("history is off ([history] enabled = false)", 409)
    return store


# ------------------------------------------------------------ auth middleware


async def _basic_auth(request: web.Request, rt: Runtime, state: WebState) -> Auth | None:
    header = request.headers.get("Authorization", "")
    if not header.lower().startswith("basic "):
        return None
    w = rt.config.web
    peer = request.remote or "-"
    limiter = state.login_limiter(rt)
    if limiter.blocked(peer):
        raise web.HTTPTooManyRequests(
            text='{"error": "too many failed logins; wait a minute"}',
            content_type="application/json",
            headers={"Retry-After": str(limiter.retry_after(peer))})
    digest = hashlib.sha256(state.store_secret + w.password_hash.encode() +
                            header.encode()).digest()
    if state.basic_cached(digest):
        return Auth("basic", w.user)
    try:
        user, _, password = base64.b64decode(header[6:].strip(), validate=True).decode(
            "utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        user, password = "", ""
    ok = hmac.compare_digest(user.encode(), w.user.encode())
    ok = await asyncio.to_thread(verify_password, password, w.password_hash) and ok
    if not ok:
        n = limiter.failed(peer)
        log.warning("web: failed login (HTTP Basic) from %s (%d in the last minute)", peer, n)
        return None
    state.remember_basic(digest)
    return Auth("basic", w.user)


def _session_auth(request: web.Request, rt: Runtime, state: WebState) -> Auth | None:
    token = request.cookies.get(COOKIE, "")
    if not token:
        return None
    sessions = state.sessions(rt)
    nonce = sessions.check(token)
    if nonce is None:
        return None
    return Auth("session", rt.config.web.user, nonce, sessions.csrf(nonce))


@web.middleware
async def guard(request: web.Request,
                handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                ) -> web.StreamResponse:
    rt = _runtime(request)
    state = _state(request)
    w = rt.config.web
    path = request.path
    peer = request.remote
    if path.startswith("/static/"):
        return await handler(request)
    if path in ("/metrics", "/healthz") and in_networks(peer, w.metrics_networks):
        request[AUTH_KEY] = Auth("network")
        return await handler(request)
    if not w.password_hash:
        if not is_loopback(peer):
            return _deny(request, 403, "the dashboard without [web] password_hash answers "
                         "loopback clients only")
        if request.method not in ("GET", "HEAD"):
            return _deny(request, 403, "read-only: set [web] password_hash (mxguard web "
                         "passwd) to learn or whitelist from the dashboard")
        request[AUTH_KEY] = Auth("open")
        return await handler(request)
    if path == "/login":
        request[AUTH_KEY] = _session_auth(request, rt, state) or Auth("none")
        return await handler(request)
    auth = _session_auth(request, rt, state) or await _basic_auth(request, rt, state)
    if auth is None:
        if _is_api(path):
            resp = json_response({"error": "login required (session cookie or HTTP Basic)"},
                                 401)
            resp.headers["WWW-Authenticate"] = 'Basic realm="mxguard", charset="UTF-8"'
            return resp
        target = path + (f"?{request.query_string}" if request.query_string else "")
        raise web.HTTPSeeOther("/login?" + urlencode({"next": target}))
    if request.method not in ("GET", "HEAD") and auth.kind == "session":
        given = request.headers.get("X-CSRF-Token", "")
        if not given and request.content_type in ("application/x-www-form-urlencoded",
                                                  "multipart/form-data"):
            given = str((await request.post()).get("csrf", ""))
        if not csrf_ok(state.sessions(rt).key, auth.nonce, given):
            log.warning("web: %s %s from %s refused: missing or wrong CSRF token",
                        request.method, path, peer or "-")
            return _deny(request, 403, "missing or wrong CSRF token: reload the page and "
                         "try again")
    request[AUTH_KEY] = auth
    return await handler(request)


@web.middleware
async def errors(request: web.Request,
                 handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                 ) -> web.StreamResponse:
    """An action that cannot be done: its words; anything else: logged, a plain 500."""
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except ActionError as exc:
        return _deny(request, exc.status, str(exc))
    except StoreError as exc:
        log.warning("web: %s %s: store unavailable: %s", request.method, request.path, exc)
        return _deny(request, 503, "the store is unavailable right now (logged); try again")
    except Exception as exc:
        log.error("web: %s %s failed: %s: %s", request.method, request.path,
                  type(exc).__name__, exc)
        return _deny(request, 500, "internal error (logged)")


@web.middleware
async def headers(request: web.Request,
                  handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                  ) -> web.StreamResponse:
    resp = await handler(request)
    resp.headers.setdefault("X-Content-Type-Options", "nosniff")
    resp.headers.setdefault("X-Frame-Options", "DENY")
    resp.headers.setdefault("Referrer-Policy", "same-origin")
    resp.headers.setdefault("Content-Security-Policy",
                            "default-src 'self'; img-src 'self' data:; style-src 'self'; "
                            "frame-ancestors 'none'; form-action 'self'")
    return resp


# ------------------------------------------------------------ login


def _safe_next(target: str) -> str:
    """A local path to go to after the login; anything else (another site) is "/"."""
    ok = target.startswith("/") and not target.startswith("//") and "\\" not in target
    return target if ok and len(target) <= MAX_FIELD else "/"


async def login_page(request: web.Request) -> web.StreamResponse:
    rt = _runtime(request)
    if not rt.config.web.password_hash:
        return render(request, "login.html", message="No [web] password_hash is set: the "
                      "pages are open, read-only, to loopback clients.", next="/",
                      open_mode=True)
    return render(request, "login.html", message="", open_mode=False,
                  next=_safe_next(request.query.get("next", "/")))


async def login_post(request: web.Request) -> web.StreamResponse:
    rt = _runtime(request)
    state = _state(request)
    w = rt.config.web
    if not w.password_hash:
        raise web.HTTPSeeOther("/")
    form = await request.post()
    peer = request.remote or "-"
    nxt = _safe_next(str(form.get("next", "/")))
    limiter = state.login_limiter(rt)
    if limiter.blocked(peer):
        log.warning("web: login from %s refused: too many failed logins", peer)
        resp = render(request, "login.html", status=429, open_mode=False, next=nxt,
                      message="Too many failed logins: wait a minute and try again.")
        resp.headers["Retry-After"] = str(limiter.retry_after(peer))
        return resp
    user = str(form.get("user", ""))
    password = str(form.get("password", ""))
    ok = hmac.compare_digest(user.encode(), w.user.encode())
    ok = await asyncio.to_thread(verify_password, password, w.password_hash) and ok
    if not ok:
        n = limiter.failed(peer)
        log.warning("web: failed login from %s (%d in the last minute)", peer, n)
        return render(request, "login.html", status=401, open_mode=False, next=nxt,
                      message="Wrong user name or password.")
    token = state.sessions(rt).issue()
    log.info("web: %s logged in from %s", w.user, peer)
    resp = web.HTTPSeeOther(nxt)
    resp.set_cookie(COOKIE, token, max_age=w.session_ttl, httponly=True, samesite="Strict",
                    path="/", secure=request.secure)
    raise resp


async def logout(request: web.Request) -> web.StreamResponse:
    rt = _runtime(request)
    token = request.cookies.get(COOKIE, "")
    if token:
        _state(request).sessions(rt).revoke(token)
    log.info("web: logout from %s", request.remote or "-")
    resp = web.HTTPSeeOther("/login")
    resp.del_cookie(COOKIE, path="/")
    raise resp


# ------------------------------------------------------------ overview


async def overview_data(rt: Runtime, hours: int) -> dict[str, Any]:
    now = rt.clock()
    since = now - hours * 3600
    bucket = 60 if hours <= 6 else 300 if hours <= 24 else 600
    data: dict[str, Any] = {"hours": hours, "bucket": bucket, "since": since, "now": now}
    store = rt.services.get("history_store")
    if store is not None:
        rows = await call(store.timeline, since, bucket=bucket)
        first = int(since // bucket * bucket)
        starts = list(range(first, int(now // bucket * bucket) + 1, bucket))
        index = {s: i for i, s in enumerate(starts)}
        series: dict[str, list[float]] = {}
        totals: dict[str, int] = {}
        for start, action, count in rows:
            i = index.get(int(start))
            if i is None:
                continue
            series.setdefault(str(action), [0.0] * len(starts))[i] += count * 60 / bucket
            totals[str(action)] = totals.get(str(action), 0) + int(count)
        data["timeline"] = {"starts": starts, "series": series}
        data["totals"] = totals

        def pairs(rows: Any) -> list[list[Any]]:
            return [[str(v), int(c)] for v, c in rows]

        data["top_symbols"] = pairs(await call(store.top, "symbol", since, 10))
        data["top_senders"] = pairs(await call(store.top, "sender", since, 10, action="reject"))
        data["top_clients"] = pairs(await call(store.top, "client", since, 10, action="reject"))
    else:
        data.update(timeline={"starts": [], "series": {}}, totals={}, top_symbols=[],
                    top_senders=[], top_clients=[])
    data["health"] = await health(rt)
    return data


async def health(rt: Runtime) -> dict[str, Any]:
    from mxguard.web import metrics

    result = metrics.health(rt)
    if asyncio.iscoroutine(result):
        result = await result
    return dict(result)


def flat_health(h: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """The health dict as (dotted key, value) rows for the page."""
    rows: list[tuple[str, str]] = []
    for key in sorted(h):
        value = h[key]
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows.extend(flat_health(value, name + "."))
        elif isinstance(value, list):
            rows.append((name, f"{len(value)} entries"))
        elif key == "time":
            rows.append((name, fmt_time(value) + " UTC"))
        else:
            rows.append((name, str(value)))
    return rows


def _hours(request: web.Request) -> int:
    try:
        h = int(request.query.get("hours", "6"))
    except ValueError:
        h = 6
    return min(OVERVIEW_HOURS, key=lambda x: abs(x - h))


async def overview(request: web.Request) -> web.StreamResponse:
    rt = _runtime(request)
    data = await overview_data(rt, _hours(request))
    rows = []
    starts = data["timeline"]["starts"]
    for i in range(len(starts) - 1, -1, -1):
        per = {a: s[i] for a, s in data["timeline"]["series"].items() if s[i]}
        if per:
            rows.append((starts[i], per))
    return render(request, "overview.html", data=data, recent=rows[:30],
                  health_rows=flat_health(data["health"]),
                  hour_choices=OVERVIEW_HOURS,
                  data_json=json.dumps(data, default=str).replace("<", "\\u003c")
                  .replace(">", "\\u003e").replace("&", "\\u0026"))


async def api_overview(request: web.Request) -> web.StreamResponse:
    return json_response(await overview_data(_runtime(request), _hours(request)))


# ------------------------------------------------------------ history


def history_filters(query: Any, now: float) -> tuple[dict[str, Any], dict[str, str]]:
    """The store's query arguments from a request's query string, and the form values."""
    form = {k: str(query.get(k, ""))[:MAX_FIELD].strip() for k in (*FILTERS, "since", "until",
                                                                     "limit", "before_id")}
    args: dict[str, Any] = {k: form[k] for k in FILTERS if form[k]}
    if "action" in args and args["action"] not in ACTIONS:
        raise ActionError(f"action must be one of {', '.join(ACTIONS)}")
    for k in ("since", "until"):
        try:
            v = parse_when(form[k], now)
        except ValueError as exc:
            raise ActionError(f"{k}: {exc}") from None
        if v is not None:
            args[k] = v
    try:
        limit = int(form["limit"]) if form["limit"] else PAGE_SIZE
    except ValueError:
        raise ActionError("limit must be a number") from None
    args["limit"] = max(1, min(MAX_LIMIT, limit))
    if form["before_id"]:
        if not _RECORD_ID.match(form["before_id"]):
            raise ActionError("before_id must be a record id")
        args["before_id"] = form["before_id"]
    return args, form


async def history_page(request: web.Request) -> web.StreamResponse:
    rt = _runtime(request)
    store = _history(rt)
    args, form = history_filters(request.query, rt.clock())
    records = [record_dict(r) for r in await call(store.query, **args)]
    more = ""
    if len(records) == args["limit"] and records:
        q = {k: v for k, v in form.items() if v and k != "before_id"}
        q["before_id"] = str(records[-1]["id"])
        more = "/history?" + urlencode(q)
    return render(request, "history.html", records=records, form=form, actions=ACTIONS,
                  more=more)


async def api_history(request: web.Request) -> web.StreamResponse:
    rt = _runtime(request)
    store = _history(rt)
    args, _ = history_filters(request.query, rt.clock())
    return json_response([record_dict(r) for r in await call(store.query, **args)])


async def _record(rt: Runtime, ident: str) -> Any:
    store = _history(rt)
    rec = await call(store.get, ident[:MAX_FIELD])
    if rec is None:
        raise ActionError(f"no message {ident!r} in the history", 404)
    return rec


async def api_record(request: web.Request) -> web.StreamResponse:
    rt = _runtime(request)
    rec = await _record(rt, request.match_info["ident"])
    d = record_dict(rec)
    d["explanation"] = _explain(rec)
    return json_response(d)


def _explain(rec: Any) -> str:
    from mxguard.core.explain import explain

    try:
        return str(explain(rec))
    except Exception as exc:  # a record from an older version must not break the page
        log.warning("web: explain(%s) failed: %s", getattr(rec, "id", "?"), exc)
        return ""


async def message_page(request: web.Request) -> web.StreamResponse:
    rt = _runtime(request)
    rec = await _record(rt, request.match_info["ident"])
    d = record_dict(rec)
    store = _history(rt)
    raw = await call(store.get_raw, str(d["id"]))
    counts = await actions.bayes_counts(rt)
    return render(request, "message.html", r=d, explanation=_explain(rec),
                  raw_kept=bool(raw), raw_size=len(raw or b""), bayes=counts,
                  bayes_on=rt.services.get("bayes") is not None,
                  keep_messages=rt.config.web.keep_messages,
                  done=request.query.get("done", "")[:200])


async def message_learn(request: web.Request) -> web.StreamResponse:
    rt = _runtime(request)
    form = await request.post()
    kind = str(form.get("kind", ""))
    rec = await _record(rt, request.match_info["ident"])
    outcome = await actions.learn(rt, str(rec.id), kind)
    auth: Auth = request[AUTH_KEY]
    log.info("web: message %s %s by %s from %s", rec.id, outcome, auth.user,
             request.remote or "-")
    raise web.HTTPSeeOther(f"/message/{rec.id}?" + urlencode({"done": outcome}))


async def api_learn(request: web.Request) -> web.StreamResponse:
    rt = _runtime(request)
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise ActionError('send JSON: {"id": "...", "kind": "spam|ham|forget"}') from None
    if not isinstance(body, dict):
        raise ActionError('send JSON: {"id": "...", "kind": "spam|ham|forget"}')
    rec = await _record(rt, str(body.get("id", "")))
    outcome = await actions.learn(rt, str(rec.id), str(body.get("kind", "")))
    auth: Auth = request[AUTH_KEY]
    log.info("web: message %s %s by %s from %s (API)", rec.id, outcome, auth.user,
             request.remote or "-")
    counts = await actions.bayes_counts(rt)
    return json_response({"id": rec.id, "outcome": outcome,
                          "nspam": counts[0] if counts else None,
                          "nham": counts[1] if counts else None})


# ------------------------------------------------------------ greylist


async def greylist_page(request: web.Request) -> web.StreamResponse:
    rt = _runtime(request)
    q = {k: request.query.get(k, "")[:MAX_FIELD] for k in ("client", "sender", "recipient")}
    result = None
    if any(q.values()):
        result = await actions.greylist_lookup(rt, q["client"], q["sender"], q["recipient"])
    return render(request, "greylist.html", q=q, result=result,
                  done=request.query.get("done", "")[:200])


async def greylist_whitelist(request: web.Request) -> web.StreamResponse:
    rt = _runtime(request)
    form = await request.post()
    entry = str(form.get("entry", ""))[:MAX_FIELD]
    added = await actions.whitelist_client(rt, entry, str(form.get("comment", "")))
    auth: Auth = request[AUTH_KEY]
    log.info("web: greylist whitelist %s client %s by %s from %s",
             "added" if added else "kept", entry, auth.user, request.remote or "-")
    done = f"{entry}: {'added to' if added else 'already on'} the client whitelist"
    raise web.HTTPSeeOther("/greylist?" + urlencode({"client": entry, "done": done}))


async def api_greylist(request: web.Request) -> web.StreamResponse:
    rt = _runtime(request)
    q = {k: request.query.get(k, "")[:MAX_FIELD] for k in ("client", "sender", "recipient")}
    return json_response(asdict(await actions.greylist_lookup(rt, **q)))


async def api_whitelist(request: web.Request) -> web.StreamResponse:
    rt = _runtime(request)
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        body = None
    if not isinstance(body, dict):
        raise ActionError('send JSON: {"entry": "192.0.2.0/24", "comment": "..."}')
    entry = str(body.get("entry", ""))[:MAX_FIELD]
    added = await actions.whitelist_client(rt, entry, str(body.get("comment", "")))
    auth: Auth = request[AUTH_KEY]
    log.info("web: greylist whitelist %s client %s by %s from %s (API)",
             "added" if added else "kept", entry, auth.user, request.remote or "-")
    return json_response({"entry": entry, "added": added})


# ------------------------------------------------------------ config, metrics, health


async def config_page(request: web.Request) -> web.StreamResponse:
    rt = _runtime(request)
    return render(request, "config.html", text=actions.redacted_config(rt.config),
                  source=rt.config.source)


async def metrics_endpoint(request: web.Request) -> web.StreamResponse:
    from mxguard.web import metrics

    body, content_type = metrics.exposition()
    resp = web.Response(body=body)
    resp.headers["Content-Type"] = content_type
    return resp


async def healthz(request: web.Request) -> web.StreamResponse:
    h = await health(_runtime(request))
    ok = bool(h.get("store", {}).get("reachable", True))
    return json_response(h, 200 if ok else 503)


# ------------------------------------------------------------ the app


def make_app(get_runtime: Callable[[], Runtime], state: WebState | None = None) -> web.Application:
    """The dashboard; ``get_runtime`` returns the daemon's current Runtime (it is
    swapped on reload)."""
    app = web.Application(middlewares=[headers, errors, guard], client_max_size=1024 * 1024)
    app[RUNTIME_KEY] = get_runtime
    app[STATE_KEY] = state if state is not None else WebState(secrets.token_bytes(32))
    r = app.router
    r.add_get("/", overview)
    r.add_get("/login", login_page)
    r.add_post("/login", login_post)
    r.add_post("/logout", logout)
    r.add_get("/history", history_page)
    r.add_get("/message/{ident}", message_page)
    r.add_post("/message/{ident}/learn", message_learn)
    r.add_get("/greylist", greylist_page)
    r.add_post("/greylist/whitelist", greylist_whitelist)
    r.add_get("/config", config_page)
    r.add_get("/api/overview", api_overview)
    r.add_get("/api/history", api_history)
    r.add_get("/api/history/{ident}", api_record)
    r.add_post("/api/learn", api_learn)
    r.add_get("/api/greylist", api_greylist)
    r.add_post("/api/greylist/whitelist", api_whitelist)
    r.add_get("/metrics", metrics_endpoint)
    r.add_get("/healthz", healthz)
    r.add_static("/static/", HERE / "static", append_version=False)
    return app


__all__ = ["COOKIE", "Auth", "WebState", "history_filters", "in_networks", "is_loopback",
           "make_app", "overview_data", "parse_when"]
