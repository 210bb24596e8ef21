"""The history recorder: a decision observer that turns each decision into a
:class:`~mxguard.store.history.HistoryRecord` and writes it off the hot path.

* Milter messages are always recorded; policy requests only when their action
  is in ``[history] policy_actions`` (refused or deferred, by default).
* The observer keeps references to what it needs (a :class:`Pending`: the
  verdict's final lists, the message's header list; never the body) and
  appends them to a bounded queue (``[history] queue_size``; past it the oldest record is dropped,
  counted in :attr:`HistoryRecorder.dropped` and logged at most once per
  ``[storage] fail_open_log_interval``).
* A background task builds the records and writes the queue every
  ``[history] flush_interval`` seconds, :data:`FLUSH_CHUNK` records at a time,
  on the event loop (the SQLite store writes there too: a thread contending for
  the GIL cost the mail more than the work; Redis writes in a thread). The
  write-ahead log is checkpointed in a thread, and the store is pruned by
  ``max_age_days`` and ``max_records`` in small steps. A busy store keeps the
  records for the next round; another store error is counted and logged
  (rate-limited) and loses that chunk; mail is never affected.
* ``[web] keep_messages > 0``: the raw message (headers and at most
  ``[milter] max_scan_size`` body bytes) is copied at observe time and kept,
  with at most :data:`RAW_QUEUE_BYTES` waiting to be written.

Counters for the metrics: :attr:`~HistoryRecorder.written`,
:attr:`~HistoryRecorder.dropped`, :attr:`~HistoryRecorder.errors`,
:attr:`~HistoryRecorder.queued` (records waiting).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import email.header
import logging
import socket
import time
from typing import Any

from mxguard.config import Config
from mxguard.core.runner import log_failure
from mxguard.core.transaction import Edit, HeaderEdit, Symbol, Transaction, Verdict
from mxguard.store.history import HistoryRecord, HistoryStore, StoreBusy, new_id

log = logging.getLogger("mxguard")

SERVICE = "history"
STORE_SERVICE = "history_store"
MAX_FIELD = 998  # characters kept of a header value or a reply
MAX_SYMBOL_DETAIL = 300
RAW_QUEUE_BYTES = 64 * 1024 * 1024  # raw messages waiting to be written, at most
PRUNE_INTERVAL = 60.0  # seconds between prune rounds
PRUNE_BATCH = 1000
PRUNE_STEPS = 20  # batches per round at most
FLUSH_CHUNK = 200  # records built and written at a time on the loop
CHECKPOINT_RECORDS = 2000  # a WAL checkpoint (in a thread) after this many records ...
CHECKPOINT_INTERVAL = 10.0  # ... or seconds, whichever comes first
WANTED_HEADERS = frozenset({"from", "subject", "message-id"})
WANTED_LENGTHS = frozenset(len(n) for n in WANTED_HEADERS)


def _clip(text: str, limit: int = MAX_FIELD) -> str:
    return text if len(text) <= limit else text[:limit]


def decode_header(value: str) -> str:
    """A header value as one line of text (RFC 2047 words decoded, unfolded)."""
    text = " ".join(value.split())
    if "=?" not in text:
        return text
    try:
        return str(email.header.make_header(email.header.decode_header(text)))
    except (ValueError, LookupError, UnicodeError):
        return text


def raw_message(tx: Transaction, limit: int) -> bytes | None:
    """Headers and the first ``limit`` body bytes of the message (None: no message)."""
    msg = tx.message
    if msg is None:
        return None
    parts = []
    for name, value in msg.headers:
        if not msg.headers_exact:
            value = " " + value
        parts.append(f"{name}:{value}".replace("\n", "\r\n"))
    head = ("\r\n".join(parts) + "\r\n\r\n").encode("utf-8", "surrogateescape")
    body = msg.body_file().read(max(0, limit - len(head)))
    return head + body


class Pending:
    """What the observer keeps of one decision until the writer builds its record."""

    __slots__ = ("action", "client_address", "client_name", "decided_by", "door", "edits",
                 "headers", "helo", "id", "kept", "observed", "queue_id", "recipients",
                 "reply", "score", "sender", "size", "symbols", "time", "timings")

    def __init__(self, now: float, door: str, action: str, reply: str, queue_id: str,
                 client_address: str, client_name: str, helo: str, sender: str,
                 recipients: list[str], size: int, headers: list[tuple[str, str]] | None,
                 score: float, decided_by: str, symbols: list[Symbol],
                 timings: dict[str, float], edits: list[Edit], observed: list[str]) -> None:
        self.id = ""  # made by the writer (or for a kept raw message): not on the hot path
        self.time, self.door, self.action, self.reply = now, door, action, reply
        self.queue_id, self.client_address, self.client_name = queue_id, client_address, \
            client_name
        self.helo, self.sender, self.recipients, self.size = helo, sender, recipients, size
        self.headers, self.score, self.decided_by = headers, score, decided_by
        self.symbols, self.timings, self.edits, self.observed = symbols, timings, edits, \
            observed
        self.kept = False


class HistoryRecorder:
    """The observer (call it as ``recorder(door, tx, verdict, reply)``) and its writer."""

    __name__ = "history"  # named in the runner's observer-failure log line

    def __init__(self, cfg: Config, store: HistoryStore, host: str | None = None) -> None:
        self.cfg = cfg
        self.store = store
        self.host = host or socket.gethostname() or "localhost"
        self.policy_actions = frozenset(cfg.history.policy_actions)
        self.keep_raw = cfg.web.keep_messages > 0
        self.raw_limit = cfg.milter.max_scan_size
        self.log_interval = cfg.storage.fail_open_log_interval
        self._queue: collections.deque[Pending] = collections.deque()
        self._raw: collections.deque[tuple[Pending, bytes]] = collections.deque()
        self._raw_bytes = 0
        self.max_queue = cfg.history.queue_size
        self.written = 0
        self.dropped = 0
        self.errors = 0
        self.raw_dropped = 0
        self.pruned = 0
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._last_prune = 0.0
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()

    @property
    def queued(self) -> int:
        return len(self._queue)

    # ------------------------------------------------------------- the observer

    def __call__(self, door: str, tx: Transaction, verdict: Verdict, reply: str) -> None:
        action = verdict.action.value
        if door != "milter" and action not in self.policy_actions:
            return
        msg = tx.message
        # references only (the verdict's lists are final; a message's header list is
        # replaced, never changed, when its session moves on); built in the writer
        p = Pending(time.time(), door, action, reply, tx.queue_id, tx.client_address,
                    tx.client_name, tx.helo, tx.sender, list(tx.recipients),
                    msg.size or tx.size if msg is not None else tx.size,
                    msg.headers if msg is not None else None, verdict.score,
                    verdict.decided_by, verdict.symbols, verdict.timings, verdict.headers,
                    verdict.observed)
        queue = self._queue
        if len(queue) >= self.max_queue:
            queue.popleft()
            self.dropped += 1
            log_failure("history-queue", self.log_interval,
                        "history: write queue full (%d records): oldest record dropped "
                        "(%d dropped so far)", self.max_queue, self.dropped)
        queue.append(p)
        if self.keep_raw and door == "milter":
            self._keep(p, tx)

    def _keep(self, p: Pending, tx: Transaction) -> None:
        try:
            raw = raw_message(tx, self.raw_limit)
        except (OSError, ValueError) as exc:  # a closed spool file: the record stays
            log_failure("history-raw", self.log_interval, "history: message bytes not "
                        "kept: %s", exc)
            return
        if raw is None:
            return
        p.kept = True
        p.id = p.id or new_id(p.time)
        self._raw.append((p, raw))
        self._raw_bytes += len(raw)
        while self._raw_bytes > RAW_QUEUE_BYTES and len(self._raw) > 1:
            old, data = self._raw.popleft()
            self._raw_bytes -= len(data)
            old.kept = False  # still queued: its record says so
            self.raw_dropped += 1

    # ------------------------------------------------------------- the writer

    def finish(self, p: Pending) -> HistoryRecord:
        """The record of one decision: header values decoded, everything bounded."""
        p.id = p.id or new_id(p.time)
        reply = p.reply
        rec = HistoryRecord(
            id=p.id, time=p.time, host=self.host, door=p.door, queue_id=p.queue_id,
            client_address=p.client_address, client_name=p.client_name, helo=p.helo,
            sender=p.sender, recipients=p.recipients, size=p.size,
            score=round(p.score, 3), action=p.action, decided_by=p.decided_by,
            reply=reply if len(reply) <= MAX_FIELD else reply[:MAX_FIELD],
            symbols=[{"name": s.name, "score": round(s.score, 3),
                      "detail": s.detail if len(s.detail) <= MAX_SYMBOL_DETAIL
                      else s.detail[:MAX_SYMBOL_DETAIL]} for s in p.symbols],
            timings={k: round(v, 3) for k, v in p.timings.items()},
            observed=list(p.observed), kept=p.kept)
        if p.headers is not None:
            found: dict[str, str] = {}
            for name, value in p.headers:
                if len(name) in WANTED_LENGTHS:  # most names are skipped without lower()
                    key = name.lower()
                    if key in WANTED_HEADERS and key not in found:
                        found[key] = value
                        if len(found) == len(WANTED_HEADERS):
                            break
            if found:
                rec.from_ = _clip(decode_header(found.get("from", "")))
                rec.subject = _clip(decode_header(found.get("subject", "")))
                rec.message_id = _clip(" ".join(found.get("message-id", "").split()))
        spam = p.decided_by == "actions"
        added: list[list[str]] = []
        for edit in p.edits:
            if isinstance(edit, HeaderEdit) or edit.op in ("add", "insert", "change"):
                added.append([edit.name, _clip(edit.value)])
                if edit.name.lower() == "x-spam-flag":
                    spam = True
        rec.headers_added = added
        rec.spam = spam
        return rec

    async def flush(self) -> int:
        """Write what is queued, :data:`FLUSH_CHUNK` records at a time with the loop
        free in between; returns the records written.

        The records are built on the loop, not in a thread: Python work in a second
        thread contends for the GIL with the mail and cost it more than the work
        itself. A busy store (another process writing) keeps the records queued for
        the next round; any other store error loses that chunk (counted, logged)."""
        written = 0
        queue = self._queue
        while queue:
            pending = [queue.popleft() for _ in range(min(len(queue), FLUSH_CHUNK))]
            batch = [self.finish(p) for p in pending]
            try:
                await self.store.add_many(batch)
            except StoreBusy as exc:
                queue.extendleft(reversed(pending))
                while len(queue) > self.max_queue:
                    queue.pop()  # the newest go: the kept ones are waiting longest
                    self.dropped += 1
                log_failure("history-busy", self.log_interval,
                            "history: records wait for the next round: %s", exc)
                break
            except Exception as exc:  # a store outage: those records are lost, mail is not
                self.errors += len(batch)
                log_failure("history-store", self.log_interval,
                            "history: %d records not written: %s", len(batch), exc)
                break
            written += len(batch)
            self.written += len(batch)
            self._since_checkpoint += len(batch)
            await asyncio.sleep(0)  # the mail goes first between chunks
        while self._raw:
            p, raw = self._raw.popleft()
            self._raw_bytes -= len(raw)
            try:
                await self.store.keep_raw(p.id, raw)
            except Exception as exc:
                self.errors += 1
                log_failure("history-store", self.log_interval,
                            "history: message bytes not kept: %s", exc)
        return written

    async def prune(self) -> int:
        """One round of pruning in small steps."""
        h = self.cfg.history
        removed = 0
        try:
            for _ in range(PRUNE_STEPS):
                n = await self.store.prune(h.max_age_days * 86400.0, h.max_records,
                                           PRUNE_BATCH)
                removed += n
                if n < PRUNE_BATCH:
                    break
        except Exception as exc:
            self.errors += 1
            log_failure("history-store", self.log_interval, "history: pruning failed: %s", exc)
        self.pruned += removed
        return removed

    async def checkpoint(self) -> None:
        """The store's write-ahead-log checkpoint, in a thread (errors counted, logged)."""
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        try:
            await self.store.checkpoint()
        except Exception as exc:
            self.errors += 1
            log_failure("history-store", self.log_interval,
                        "history: checkpoint failed: %s", exc)

    async def maintain(self) -> None:
        """The store's upkeep after a write: a checkpoint after :data:`CHECKPOINT_RECORDS`
        records or :data:`CHECKPOINT_INTERVAL` seconds, pruning every
        :data:`PRUNE_INTERVAL` seconds."""
        now = time.monotonic()
        if self._since_checkpoint >= CHECKPOINT_RECORDS or (
                self._since_checkpoint and now - self._last_checkpoint >= CHECKPOINT_INTERVAL):
            await self.checkpoint()
        if now - self._last_prune >= PRUNE_INTERVAL:
            self._last_prune = now
            await self.prune()

    async def run(self) -> None:
        interval = self.cfg.history.flush_interval
        while True:
            await asyncio.sleep(interval)
            await self.flush()
            await self.maintain()

    def start(self) -> None:
        """Start the writer on the running loop."""
        if self._task is None:
            self._last_prune = time.monotonic() - PRUNE_INTERVAL + 5.0  # first prune soon
            self._task = asyncio.get_running_loop().create_task(self.run())

    async def close(self) -> None:
        """Stop the writer, write what is queued, close the store."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.flush()
        with contextlib.suppress(Exception):
            await self.store.close()

    def stats(self) -> dict[str, Any]:
        return {"written": self.written, "dropped": self.dropped, "errors": self.errors,
                "queued": self.queued, "pruned": self.pruned}


async def open_history(cfg: Config, services: dict[str, Any]) -> HistoryRecorder | None:
    """The recorder and its store in ``services`` when ``[history] enabled``, registered as
    a decision observer and writing in the background; None (logged) when the store
    cannot be opened: the daemon runs without history."""
    from mxguard.core.runner import add_observer
    from mxguard.store.backends import open_history_store
    from mxguard.store.base import StoreError

    if not cfg.history.enabled:
        return None
    try:
        store = open_history_store(cfg)
    except StoreError as exc:
        log.error("history: not recorded until mxguard is restarted: %s", exc)
        return None
    recorder: HistoryRecorder
    if cfg.history.writer == "process":
        from mxguard.core.history_writer import ProcessRecorder

        recorder = ProcessRecorder(cfg, store)
    else:
        recorder = HistoryRecorder(cfg, store)
    services[SERVICE] = recorder
    services[STORE_SERVICE] = store
    add_observer(services, recorder)
    recorder.start()
    return recorder


__all__ = ["SERVICE", "STORE_SERVICE", "HistoryRecorder", "decode_header", "open_history",
           "raw_message"]
