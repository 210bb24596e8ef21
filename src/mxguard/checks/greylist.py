"""Greylisting (RFC 6647), at least at parity with postgrey 1.37.

A request is keyed by the triplet (client network, normalised sender,
recipient). A new triplet is deferred with ``450 4.2.0``; a retry after
``delay`` seconds and within ``retry_window`` of the first sight passes, and
the triplet is then remembered for ``max_age`` seconds after its last use. A
client (network) with ``auto_whitelist_clients`` deliveries, counted at most
once per ``auto_whitelist_interval``, is no longer greylisted.

Never greylisted: SASL-authenticated clients, mail that SPF rejects anyway,
whitelisted clients (IP, CIDR, verified-name domain, /regex/) and recipients
(files, the shipped defaults, and the dynamic whitelist kept in the store),
sender domains in ``skip_spf_pass_domains`` when SPF passes.

Config: ``[greylist]`` (see :class:`mxguard.config.GreylistConfig`).
Symbols: GREYLIST_DEFERRED, GREYLIST_PASSED, GREYLIST_WHITELISTED,
GREYLIST_AUTO_WHITELISTED. Reasons: new, early, passed, known,
whitelist:client, whitelist:recipient, spf-pass, awl, authenticated.
Services: ``rt.services["greylist"]`` is a :class:`Greylister`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime

from mxguard import __version__
from mxguard.checks.greylist_lists import (
    DomainSet,
    WhitelistError,
    Whitelists,
    client_network,
    hashed_key,
    load_whitelists,
    normalize_recipient,
    normalize_sender,
    parse_ip,
    triplet_text,
    validate_entry,
)
from mxguard.config import Config, GreylistConfig
from mxguard.core.runner import FAIL_ACTIONS, log_failure
from mxguard.core.runtime import Runtime, symbol
from mxguard.core.transaction import Action, CheckResult, Decision, HeaderEdit, Transaction
from mxguard.store.backends import open_store
from mxguard.store.base import (
    ClientRecord,
    GreylistStore,
    StoreError,
    TripletRecord,
    WhitelistEntry,
)

NAME = "greylist"
log = logging.getLogger("mxguard")

TOUCH_INTERVAL = 60.0  # a known triplet's / client's last-seen is rewritten at most this often
DYNAMIC_REFRESH = 1.0  # seconds between checks of the dynamic whitelist's version
EXPIRY_CATCH_UP = 1.0  # pause between expiry steps while a backlog remains
PRIVACY_SECRET = "privacy_key"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the greylister concluded, before scores and modes are applied."""

    symbol: str | None
    reason: str
    detail: str = ""
    decision: Decision | None = None
    header: HeaderEdit | None = None
    extra: dict[str, str] = field(default_factory=dict)


class LookupCache:
    """What the store answered for passed triplets and for clients, reused for
    ``[greylist] lookup_cache`` seconds (and at most until the record expires), at
    most ``size`` of each, least recently used dropped first.

    Only answers that need no write to be right are kept: a passed triplet (a new or
    a waiting one always goes to the store) and, with it, its client's record
    (None: not seen yet). Every write this process makes about a key drops that key, so the next
    request reads what the store now holds; another process's writes (a second
    worker, a second host on one Redis, the CLI) are seen within the lifetime.
    The store stays the one truth: a delivery is still counted there, at most once
    per interval, whatever an older copy here says."""

    def __init__(self, lifetime: float, size: int = 10000) -> None:
        self.lifetime = lifetime
        self.size = size
        self.hits = 0
        self._triplets: OrderedDict[str, tuple[float, TripletRecord]] = OrderedDict()
        self._clients: OrderedDict[str, tuple[float, ClientRecord | None]] = OrderedDict()

    def get(self, key: str, ckey: str,
            now: float) -> tuple[TripletRecord, ClientRecord | None] | None:
        """Both the passed triplet and the client, or None (then ask the store)."""
        t = self._triplets.get(key)
        c = self._clients.get(ckey)
        if t is None or c is None:
            return None
        if t[0] <= now:
            del self._triplets[key]
            return None
        if c[0] <= now:
            del self._clients[ckey]
            return None
        self._triplets.move_to_end(key)
        self._clients.move_to_end(ckey)
        self.hits += 1
        return t[1], c[1]

    def put(self, key: str, record: TripletRecord | None, ckey: str,
            client: ClientRecord | None, now: float) -> None:
        if self.lifetime <= 0 or record is None or not record.passed:
            return  # a new or waiting triplet: the next request asks the store anyway
        until = now + self.lifetime
        self._clients[ckey] = (min(until, client.expires) if client else until, client)
        self._clients.move_to_end(ckey)
        self._triplets[key] = (min(until, record.expires), record)
        self._triplets.move_to_end(key)
        for table in (self._triplets, self._clients):
            while len(table) > self.size:
                table.popitem(last=False)

    def drop_triplet(self, key: str) -> None:
        self._triplets.pop(key, None)

    def drop_client(self, ckey: str) -> None:
        self._clients.pop(ckey, None)

    def clear(self) -> None:
        self._triplets.clear()
        self._clients.clear()

    def __len__(self) -> int:
        return len(self._triplets) + len(self._clients)


@dataclass(frozen=True, slots=True)
class _Settings:
    """Config and lists swapped as one object on reload."""

    cfg: GreylistConfig
    lists: Whitelists
    spf_skip: DomainSet


def _settings(cfg: Config) -> _Settings:
    g = cfg.greylist
    lists = load_whitelists(g.client_whitelist_files, g.recipient_whitelist_files,
                            g.default_whitelist)
    try:
        spf_skip = DomainSet.of(g.skip_spf_pass_domains)
    except ValueError as exc:
        raise WhitelistError(f"greylist.skip_spf_pass_domains: {exc}") from None
    return _Settings(g, lists, spf_skip)


class Greylister:
    """The greylisting service: lists, store, decisions, expiry."""

    def __init__(self, cfg: Config, store: GreylistStore, secret: bytes | None,
                 clock: Callable[[], float] = time.time,
                 settings: _Settings | None = None) -> None:
        self._s = settings if settings is not None else _settings(cfg)
        self._fail_log_interval = cfg.storage.fail_open_log_interval
        self.store = store
        self.clock = clock
        self._secret = secret
        self.hostname = socket.gethostname()
        self.dynamic = Whitelists()
        self._dynamic_size = 0
        self._dynamic_version = -1
        self._dynamic_checked = -math.inf
        self.store_errors = 0  # requests the store failed (answered with [policy] fail_action)
        self._store_failed_since = 0  # of them, since the store last worked
        self._store_logged = -math.inf
        self.where = getattr(getattr(store, "conn", None), "where", type(store).__name__)
        self.cache = LookupCache(cfg.greylist.lookup_cache)

    def store_failed(self, interval: float) -> bool:
        """Count a request the store failed; True if it is to be logged (once per interval)."""
        self.store_errors += 1
        self._store_failed_since += 1
        mono = time.monotonic()
        if mono - self._store_logged < interval:
            return False
        self._store_logged = mono
        return True

    def store_ok(self) -> None:
        """A request was decided with the store: log the end of an outage once."""
        if self._store_failed_since:
            log.warning("greylist: store available again; %d requests were answered with "
                        "[policy] fail_action meanwhile", self._store_failed_since)
            self._store_failed_since = 0
            self._store_logged = -math.inf

    @property
    def ready(self) -> bool:
        """False while the store was never reached (Redis down at start)."""
        return self._secret is not None

    async def ensure_ready(self) -> None:
        """Read the privacy key if start-up could not (raises StoreError while the
        store is still away); logs the recovery once."""
        if self._secret is not None:
            return
        self._secret = await self.store.secret(PRIVACY_SECRET)
        log.warning("greylist: store %s recovered; greylisting again", self.where)

    @property
    def cfg(self) -> GreylistConfig:
        return self._s.cfg

    @property
    def lists(self) -> Whitelists:
        return self._s.lists

    def reload(self, cfg: Config) -> None:
        """Build new lists from ``cfg``; swap them in only if all of them load."""
        self._s = _settings(cfg)
        self._fail_log_interval = cfg.storage.fail_open_log_interval
        self.cache = LookupCache(cfg.greylist.lookup_cache)  # the lists or the keys may differ

    async def close(self) -> None:
        await self.store.close()

    # ------------------------------------------------------------ decisions

    async def decide(self, tx: Transaction, now: float) -> Outcome | None:
        """The greylisting outcome of one RCPT request (None: not greylisting it)."""
        return (await self.decide_noting_cache(tx, now))[0]

    async def decide_noting_cache(self, tx: Transaction,
                                  now: float) -> tuple[Outcome | None, bool]:
        """:meth:`decide`, and whether the lookup cache answered instead of the store
        (then the answer says nothing about the store being back after an outage)."""
        if not tx.recipient:
            return None, False
        if tx.sasl_username:
            return Outcome(None, "authenticated"), False
        spf = tx.results.get("spf")
        if spf is not None and spf.decision is not None and spf.decision.action is Action.REJECT:
            return None, False
        s = self._s
        await self.ensure_ready()
        await self.refresh_dynamic()
        listed = self._whitelisted(tx, s)
        if listed is not None:
            return listed, False
        g = s.cfg
        net = client_network(tx.client_address, g.ipv4_prefix, g.ipv6_prefix, g.lookup_by_host)
        text = triplet_text(net, normalize_sender(tx.sender), normalize_recipient(tx.recipient))
        key, ckey = (self._key(text), self._key("client\t" + net)) if g.privacy else (text, net)
        hit = self.cache.get(key, ckey, now)
        if hit is None:
            record, client = await self.store.lookup(key, ckey)
            self.cache.put(key, record, ckey, client, now)
        else:
            record, client = hit
        cached = hit is not None
        if g.auto_whitelist_clients and client and client.count >= g.auto_whitelist_clients:
            await self._touch_client(ckey, client, now, g)
            return Outcome("GREYLIST_AUTO_WHITELISTED", "awl",
                           f"{net} count={client.count}"), cached
        return await self._triplet(tx, g, key, record, (ckey, client), now), cached

    def _key(self, text: str) -> str:
        assert self._secret is not None  # decide() made sure
        return hashed_key(self._secret, text)

    def _whitelisted(self, tx: Transaction, s: _Settings) -> Outcome | None:
        ip = parse_ip(tx.client_address)
        name = tx.client_name.lower()
        rcpt = normalize_recipient(tx.recipient)
        for lists in (s.lists, self.dynamic) if self._dynamic_size else (s.lists,):
            hit = lists.clients.match(ip, name)
            if hit is not None:
                return Outcome("GREYLIST_WHITELISTED", "whitelist:client", hit)
            hit = lists.recipients.match(rcpt)
            if hit is not None:
                return Outcome("GREYLIST_WHITELISTED", "whitelist:recipient", hit)
        spf = tx.results.get("spf")
        if spf is not None and spf.extra.get("spf") == "pass" and s.spf_skip.match(
                tx.sender.rpartition("@")[2]):
            return Outcome("GREYLIST_WHITELISTED", "spf-pass", tx.sender.rpartition("@")[2])
        return None

    async def _triplet(self, tx: Transaction, g: GreylistConfig, key: str,
                       record: TripletRecord | None, client: tuple[str, ClientRecord | None],
                       now: float) -> Outcome:
        if record is None or (not record.passed and now - record.first_seen > g.retry_window):
            self.cache.drop_triplet(key)
            await self.store.record_first_seen(key, now, now + max(g.retry_window, g.delay))
            self.cache.drop_triplet(key)
            if g.delay > 0:
                return self._defer(tx, g, "new", g.delay)
            record = TripletRecord(key, now, now, 0.0, now)
        if not record.passed:
            waited = now - record.first_seen
            if waited < g.delay:
                return self._defer(tx, g, "early", min(g.delay, g.delay - waited))
            self.cache.drop_triplet(key)
            first = await self.store.mark_passed(key, now, now + g.max_age)
            self.cache.drop_triplet(key)
            await self._count_delivery(client, now, g)
            header = self._header(waited, now) if first and g.header and g.delay else None
            return Outcome("GREYLIST_PASSED", "passed", f"delayed {int(waited)}s",
                           header=header, extra={"delay": str(int(waited))})
        if now - record.last_seen >= TOUCH_INTERVAL:
            self.cache.drop_triplet(key)
            await self.store.touch_triplet(key, now, now + g.max_age)
            self.cache.drop_triplet(key)
        await self._count_delivery(client, now, g)
        return Outcome("GREYLIST_PASSED", "known")

    def _defer(self, tx: Transaction, g: GreylistConfig, reason: str, left: float) -> Outcome:
        seconds = max(1, math.ceil(left))
        text = g.text.format(url=g.url, seconds=seconds, recipient=tx.recipient,
                             sender=tx.sender, client=tx.client_address)
        action = Action.DEFER if g.action == "DEFER" else Action.DEFER_IF_PERMIT
        return Outcome("GREYLIST_DEFERRED", reason, f"{reason}, {seconds}s left",
                       decision=Decision(action, 450, "4.2.0", text),
                       extra={"delay": str(seconds)})

    def _header(self, waited: float, now: float) -> HeaderEdit:
        date = format_datetime(datetime.fromtimestamp(now, UTC))
        return HeaderEdit("X-Greylist", f"delayed {int(waited)} seconds by "
                          f"mxguard-{__version__} at {self.hostname}; {date}")

    async def _count_delivery(self, client: tuple[str, ClientRecord | None], now: float,
                              g: GreylistConfig) -> None:
        """Count one delivery for the auto-whitelist (at most once per interval)."""
        ckey, rec = client
        if not g.auto_whitelist_clients:
            return
        if rec is not None and now - rec.last_counted < g.auto_whitelist_interval:
            await self._touch_client(ckey, rec, now, g)
            return
        self.cache.drop_client(ckey)
        await self.store.count_client(ckey, now, now + g.max_age, g.auto_whitelist_interval)
        self.cache.drop_client(ckey)

    async def _touch_client(self, ckey: str, rec: ClientRecord, now: float,
                            g: GreylistConfig) -> None:
        if now - rec.last_seen >= TOUCH_INTERVAL:
            self.cache.drop_client(ckey)
            await self.store.touch_client(ckey, now, now + g.max_age)
            self.cache.drop_client(ckey)

    # ------------------------------------------------------------ dynamic whitelist

    async def refresh_dynamic(self, force: bool = False) -> None:
        """Reload the store's whitelist table when its version changed (≤ 1/s)."""
        mono = time.monotonic()
        if not force and mono - self._dynamic_checked < DYNAMIC_REFRESH:
            return
        self._dynamic_checked = mono
        version = await self.store.whitelist_version()
        if version == self._dynamic_version and not force:
            return
        lists = Whitelists()
        for entry in await self.store.list_whitelist():
            target = lists.clients if entry.kind == "client" else lists.recipients
            try:
                target.add(entry.entry)
            except ValueError as exc:
                log.warning("greylist: dynamic whitelist entry %r ignored: %s", entry.entry, exc)
        self.dynamic, self._dynamic_version = lists, version
        self._dynamic_size = len(lists.clients) + len(lists.recipients)

    async def add_whitelist(self, entry: str, kind: str, comment: str = "") -> bool:
        """Add a dynamic whitelist entry (validated) and use it at once."""
        validate_entry(entry, kind)
        added = await self.store.add_whitelist(WhitelistEntry(entry, kind, self.clock(), comment))
        await self.refresh_dynamic(force=True)
        return added

    async def remove_whitelist(self, entry: str) -> bool:
        removed = await self.store.remove_whitelist(entry)
        await self.refresh_dynamic(force=True)
        return removed

    # ------------------------------------------------------------ expiry

    async def expire_once(self, now: float | None = None) -> int:
        """Delete one batch of expired rows; return how many."""
        return await self.store.expire_batch(self.clock() if now is None else now,
                                             self.cfg.expiry_batch)

    async def run_expiry(self) -> None:
        """Background task: one small batch per ``expiry_interval`` (sooner while
        a backlog remains), so expiry never stalls requests."""
        while True:
            try:
                n = await self.expire_once()
            except StoreError as exc:
                log_failure("greylist-expiry", self._fail_log_interval,
                            "greylist expiry failed: %s", exc)
                n = 0
            if n:
                log.debug("greylist expiry removed %d rows", n)
            full = n >= self.cfg.expiry_batch
            await asyncio.sleep(min(EXPIRY_CATCH_UP, self.cfg.expiry_interval) if full
                                else self.cfg.expiry_interval)


async def open_greylister(cfg: Config, store: GreylistStore | None = None,
                          clock: Callable[[], float] = time.time, *,
                          fail_open: bool = False) -> Greylister:
    """Load the lists (raising WhitelistError first), open the store, read the key.

    ``fail_open`` (the daemon): a store that cannot be reached now (Redis down)
    does not raise; the greylister starts without its key, answers each request
    with the fail mode (:meth:`Greylister.ensure_ready` raises StoreError) and
    reads the key once the store is back."""
    settings = _settings(cfg)  # fail on a bad whitelist before touching the store
    store = store if store is not None else open_store(cfg, connect=not fail_open)
    try:
        secret: bytes | None = await store.secret(PRIVACY_SECRET)
    except StoreError as exc:
        if not fail_open:
            await store.close()
            raise
        log.warning("greylist: store unavailable at start: %s; answering [policy] "
                    "fail_action %s until it is back (reconnecting in the background)",
                    exc, cfg.policy.fail_action)
        secret = None
    except BaseException:
        await store.close()
        raise
    return Greylister(cfg, store, secret, clock, settings)


_warned_missing = False


async def check(tx: Transaction, rt: Runtime) -> CheckResult | None:
    """The pipeline entry point (stage RCPT, after SPF)."""
    greylister = rt.services.get(NAME)
    if greylister is None:
        global _warned_missing
        if not _warned_missing:
            log.warning("greylist: no greylist service configured; not greylisting")
            _warned_missing = True
        return None
    try:
        outcome, cached = await greylister.decide_noting_cache(tx, rt.clock())
    except StoreError:
        # Store unavailable (e.g. Redis down): the first failure of each
        # [storage] fail_open_log_interval goes to the pipeline, which logs it and
        # answers [policy] fail_action; the others get that answer without a log line.
        if greylister.store_failed(rt.config.storage.fail_open_log_interval):
            raise
        return CheckResult(NAME, reason="error:StoreError",
                           decision=FAIL_ACTIONS.get(rt.config.policy.fail_action))
    if not cached:  # a cached answer during an outage is no sign the store is back
        greylister.store_ok()
    if outcome is None:
        return None
    return CheckResult(
        NAME,
        symbols=[symbol(rt, outcome.symbol, outcome.detail)] if outcome.symbol else [],
        decision=outcome.decision,
        headers=[outcome.header] if outcome.header is not None else [],
        reason=outcome.reason,
        extra=dict(outcome.extra),
    )


__all__ = ["Greylister", "Outcome", "check", "open_greylister"]
