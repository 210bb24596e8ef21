"""The history writer process (``[history] writer = "process"``, the default).

The daemon's observer keeps each decision (:class:`~mxguard.core.history.Pending`);
every ``[history] flush_interval`` the daemon packs what is queued into plain
tuples and sends them, ``marshal``-ed, over a pipe to a child process
(``python -m mxguard.core.history_writer``). The child builds the records, writes
them to the history store, checkpoints and prunes it: the daemon's own cost is
a few microseconds a record, and the writing runs on another core. Building and
writing a record costs ~30-60 us of Python and SQLite; in the daemon's process
that was 5-12 % of a DKIM-only milter message (bench/milter_bench.py
``--history-ab``).

Wire format, both ways: frames of a 4-byte big-endian length and a ``marshal``
payload (the child trusts only its parent; the settings frame is a pickled
:class:`~mxguard.config.Config`):

* parent -> child: ``("r", [record tuples])``, ``("k", id, bytes)`` (a kept raw
  message), ``("s", token)`` (write everything you have, then answer).
* child -> parent: ``("t", written, errors, pruned, dropped)`` after every write,
  ``("s", token, ...)`` answering a sync.

The child runs in its own session and ignores SIGINT and SIGTERM (a signal to
the daemon's process group or its whole cgroup must not cost the records still
queued); it exits when its input closes (the daemon stopping or dying), after
writing what it has. If it exits otherwise, the daemon
logs it, counts the records it had not confirmed as errors and starts a new one
(at most once per :data:`RESTART_DELAY` seconds); while none runs, records wait
in the bounded queue. A child that cannot start leaves the daemon writing on
its own loop (``writer = "loop"``), logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import marshal
import os
import pickle
import signal
import struct
import sys
import time
from typing import Any

from mxguard.config import Config
from mxguard.core.history import WANTED_LENGTHS, HistoryRecorder, Pending
from mxguard.core.runner import log_failure
from mxguard.core.transaction import HeaderChange, HeaderEdit, Symbol
from mxguard.store.history import HistoryStore, new_id

log = logging.getLogger("mxguard")

FRAME = struct.Struct("!I")
MAX_FRAME = 256 * 1024 * 1024
PIPE_LIMIT = 32 * 1024 * 1024  # bytes waiting in the pipe at most; past it a batch is dropped
SYNC_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
RESTART_DELAY = 5.0
SEND_CHUNK = 500  # records per frame


# ----------------------------------------------------------------- the wire form

def pack(p: Pending) -> tuple[Any, ...]:
    """One decision as plain values (what ``marshal`` carries)."""
    headers = None
    if p.headers is not None:
        headers = [(n, v) for n, v in p.headers if len(n) in WANTED_LENGTHS]
    return (p.id, p.time, p.door, p.action, p.reply, p.queue_id, p.client_address,
            p.client_name, p.helo, p.sender, p.recipients, p.size, headers, p.score,
            p.decided_by, [(s.name, s.score, s.detail) for s in p.symbols], p.timings,
            [(isinstance(e, HeaderEdit), e.op, e.name, e.value) for e in p.edits],
            list(p.observed), p.kept)


def unpack(t: tuple[Any, ...] | list[Any]) -> Pending:
    (rid, now, door, action, reply, queue_id, client_address, client_name, helo, sender,
     recipients, size, headers, score, decided_by, symbols, timings, edits, observed,
     kept) = t
    p = Pending(now, door, action, reply, queue_id, client_address, client_name, helo,
                sender, list(recipients), size,
                None if headers is None else [(str(n), str(v)) for n, v in headers],
                score, decided_by, [Symbol(n, s, d) for n, s, d in symbols], dict(timings),
                [HeaderEdit(n, v, op) if plain else HeaderChange(op, n, v)
                 for plain, op, n, v in edits], list(observed))
    p.id, p.kept = rid, kept
    return p


def frame(obj: Any) -> bytes:
    data = marshal.dumps(obj)
    return FRAME.pack(len(data)) + data


async def read_frame(reader: asyncio.StreamReader) -> Any:
    """The next frame's object; None at the end of the stream."""
    try:
        head = await reader.readexactly(FRAME.size)
    except asyncio.IncompleteReadError:
        return None
    (size,) = FRAME.unpack(head)
    if size > MAX_FRAME:
        raise ValueError(f"history writer: frame of {size} bytes")
    try:
        return marshal.loads(await reader.readexactly(size))
    except asyncio.IncompleteReadError:
        return None


# ----------------------------------------------------------------- the daemon's side

class ProcessRecorder(HistoryRecorder):
    """The observer of :class:`HistoryRecorder`; its writing is done by a child process.

    ``store`` stays the daemon's for reading (the dashboard, the API) and for
    writing on the loop when no child can be started."""

    def __init__(self, cfg: Config, store: HistoryStore, host: str | None = None) -> None:
        super().__init__(cfg, store, host)
        self._proc: asyncio.subprocess.Process | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._syncs: dict[int, asyncio.Future[bool]] = {}
        self._token = 0
        self._sent = 0  # records sent to the current child
        self._base = [0, 0, 0, 0]  # written, errors, pruned, dropped of earlier children
        self._child = [0, 0, 0, 0]  # the same, of the current child
        self._local_dropped = 0
        self._started_at = -RESTART_DELAY
        self._closing = False
        self.inline = False  # no child: written on the loop (the parent class's flush)
        self.restarts = 0

    # counters: the child's plus ours (the parent class writes them when inline)
    def _total(self, i: int) -> int:
        return self._base[i] + self._child[i]

    @property
    def queued(self) -> int:
        unconfirmed = max(0, self._sent - self._child[0] - self._child[1])
        return len(self._queue) + unconfirmed

    async def _spawn(self) -> bool:
        self._started_at = time.monotonic()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "mxguard.core.history_writer",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                start_new_session=True,  # a Ctrl-C or a signal to the daemon's group
                env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                    p for p in [os.path.dirname(os.path.dirname(os.path.dirname(
                        os.path.abspath(__file__)))), os.environ.get("PYTHONPATH", "")] if p)))
        except OSError as exc:
            log.error("history: writer process not started (%s): writing on the daemon's "
                      "own loop", exc)
            self.inline = True
            return False
        assert proc.stdin is not None and proc.stdout is not None
        settings = pickle.dumps((self.cfg, self.host))
        proc.stdin.write(FRAME.pack(len(settings)) + settings)
        self._proc = proc
        self._sent = 0
        self._child = [0, 0, 0, 0]
        self._reader_task = asyncio.get_running_loop().create_task(self._read(proc))
        log.info("history: writer process started (pid %d)", proc.pid)
        return True

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        try:
            while True:
                msg = await read_frame(proc.stdout)
                if msg is None:
                    break
                if msg[0] in ("t", "s"):
                    self._child = [int(x) for x in msg[-4:]]
                    self._sync_counters()
                if msg[0] == "s":
                    fut = self._syncs.pop(int(msg[1]), None)
                    if fut is not None and not fut.done():
                        fut.set_result(True)
        except (ValueError, OSError, EOFError, TypeError) as exc:
            log.error("history: writer process sent garbage (%s): stopping it", exc)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        code = await proc.wait()
        self._gone(proc, code)

    def _gone(self, proc: asyncio.subprocess.Process, code: int) -> None:
        if self._proc is not proc:
            return
        self._proc = None
        lost = max(0, self._sent - self._child[0] - self._child[1])
        self._base = [b + c for b, c in zip(self._base, self._child, strict=True)]
        self._base[1] += lost
        self._child = [0, 0, 0, 0]
        self._sent = 0
        for fut in self._syncs.values():
            if not fut.done():
                fut.set_result(False)
        self._syncs.clear()
        if not self._closing:
            self.restarts += 1
            log.error("history: writer process %d exited with code %s; %d records not "
                      "confirmed are lost; a new one starts within %g s", proc.pid, code,
                      lost, RESTART_DELAY)

    def _sync_counters(self) -> None:
        if not self.inline:
            self.written, self.errors, self.pruned = (self._total(0), self._total(1),
                                                      self._total(2))
            self.dropped = self._local_dropped + self._total(3)

    def __call__(self, door: str, tx: Any, verdict: Any, reply: str) -> None:
        before = self.dropped
        super().__call__(door, tx, verdict, reply)
        if self.dropped != before:
            self._local_dropped += self.dropped - before

    def _send(self) -> bool:
        """Send what is queued; False when there is no child to send to."""
        proc = self._proc
        if proc is None or proc.stdin is None or proc.returncode is not None:
            return False
        out = proc.stdin
        queue = self._queue
        while queue:
            if out.transport.get_write_buffer_size() > PIPE_LIMIT:
                n = len(queue)
                queue.clear()
                self._local_dropped += n
                log_failure("history-pipe", self.log_interval, "history: writer process "
                            "behind (%d bytes waiting): %d records dropped",
                            out.transport.get_write_buffer_size(), n)
                break
            batch = [pack(queue.popleft()) for _ in range(min(len(queue), SEND_CHUNK))]
            out.write(frame(("r", batch)))
            self._sent += len(batch)
        while self._raw:
            p, raw = self._raw.popleft()
            self._raw_bytes -= len(raw)
            out.write(frame(("k", p.id, raw)))
        return True

    async def _ensure_child(self) -> None:
        if self._proc is None and not self.inline and not self._closing and \
                time.monotonic() - self._started_at >= RESTART_DELAY:
            await self._spawn()

    async def flush(self) -> int:
        """Send what is queued and wait until the child wrote it (or wrote on the loop
        when there is no child); returns the records written meanwhile."""
        await self._ensure_child()
        if self.inline:
            return await super().flush()
        before = self._total(0)
        if not self._send():
            return 0
        proc = self._proc
        assert proc is not None and proc.stdin is not None
        self._token += 1
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._syncs[self._token] = fut
        proc.stdin.write(frame(("s", self._token)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(fut), SYNC_TIMEOUT)
        self._syncs.pop(self._token, None)
        self._sync_counters()
        return self._total(0) - before

    async def run(self) -> None:
        interval = self.cfg.history.flush_interval
        while True:
            await asyncio.sleep(interval)
            await self._ensure_child()
            if self.inline:
                await super().flush()
                await self.maintain()
            else:
                self._send()
                self._sync_counters()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._start())

    async def _start(self) -> None:
        await self._spawn()
        await self.run()

    async def close(self) -> None:
        """Send what is queued, let the child write it and exit, close the store."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.inline or self._proc is None:
            await super().flush()
        else:
            await self.flush()
        self._closing = True
        proc = self._proc
        if proc is not None and proc.stdin is not None:
            proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
            except TimeoutError:
                log.error("history: writer process %d did not stop: killed", proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self._reader_task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader_task, STOP_TIMEOUT)
        self._sync_counters()
        with contextlib.suppress(Exception):
            await self.store.close()

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid


# ----------------------------------------------------------------- the child

async def child_main(cfg: Config, host: str, reader: asyncio.StreamReader,
                     out: asyncio.WriteTransport) -> None:
    from mxguard.store.backends import open_history_store

    rec = HistoryRecorder(cfg, open_history_store(cfg), host)

    def report(*head: Any) -> None:
        if out.is_closing():  # the daemon is gone: nobody to tell
            return
        with contextlib.suppress(OSError, RuntimeError):
            out.write(frame((*head, rec.written, rec.errors, rec.pruned, rec.dropped)))

    maintainer = asyncio.get_running_loop().create_task(maintain_forever(rec))
    try:
        while True:
            msg = await read_frame(reader)
            if msg is None:
                break
            kind = msg[0]
            if kind == "r":
                for t in msg[1]:
                    if len(rec._queue) >= rec.max_queue:
                        rec._queue.popleft()
                        rec.dropped += 1
                    rec._queue.append(unpack(t))
                await rec.flush()
                report("t")
            elif kind == "k":
                p = Pending(time.time(), "milter", "", "", "", "", "", "", "", [], 0, None,
                            0.0, "", [], {}, [], [])
                p.id = str(msg[1]) or new_id()
                rec._raw.append((p, bytes(msg[2])))
                rec._raw_bytes += len(msg[2])
            elif kind == "s":
                await rec.flush()
                report("s", int(msg[1]))
    finally:
        maintainer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await maintainer
        await rec.close()
        report("t")


async def maintain_forever(rec: HistoryRecorder) -> None:
    interval = rec.cfg.history.flush_interval
    rec._last_prune = time.monotonic() - 55.0  # the first prune soon after the start
    while True:
        await asyncio.sleep(interval)
        await rec.flush()
        await rec.maintain()


async def _child() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_FRAME)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out, _ = await loop.connect_write_pipe(asyncio.Protocol, sys.stdout)
    head = await reader.readexactly(FRAME.size)
    cfg, host = pickle.loads(await reader.readexactly(FRAME.unpack(head)[0]))
    from mxguard import logs

    logs.setup(cfg.log)
    try:
        await child_main(cfg, host, reader, out)
    finally:
        with contextlib.suppress(Exception):
            out.close()


def main() -> int:
    """``python -m mxguard.core.history_writer``: started by the daemon, never by hand."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # the daemon stops us by closing our input
    if sys.stdin.isatty():
        print("mxguard.core.history_writer is started by `mxguard serve`, not by hand",
              file=sys.stderr)
        return 2
    try:
        import uvloop
    except ImportError:  # pragma: no cover - a dependency on Linux
        asyncio.run(_child())
    else:
        uvloop.run(_child())
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["ProcessRecorder", "child_main", "frame", "main", "pack", "read_frame", "unpack"]
