"""What every check may use: the config and the shared services, swapped as one
object on reload (SIGHUP); and the one rule for CPU-heavy work off the loop.

CPU-bound work has a deadline: the runner sets :data:`CHECK_DEADLINE` (a
``time.monotonic()`` value) to the end of the running check's budget, and
long loops (the rule scan) call :func:`past_deadline` between steps and
raise :class:`Overrun`, a :class:`TimeoutError` the runner turns into
``NAME_TIMEOUT``. A thread cannot be killed, so this is how a runaway scan
ends instead of pinning its worker thread.

:func:`off_loop` runs big messages on :data:`WORKERS`, a pool of daemon
threads of its own (not the loop's default executor): at most
:data:`WORKER_THREADS` scans at once, a job whose caller gave up (its budget
ran out while it was queued) is dropped unstarted, and a busy worker never
holds up the interpreter's exit (SIGTERM).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from mxguard.config import Config
from mxguard.core.transaction import Symbol

if TYPE_CHECKING:
    from mxguard.dns import Resolver

T = TypeVar("T")
log = logging.getLogger("mxguard")

# The end of the running check's time budget (time.monotonic()); None: no budget.
CHECK_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "mxguard_check_deadline", default=None)


class Overrun(TimeoutError):
    """CPU-bound work went past its check's deadline (:data:`CHECK_DEADLINE`)."""


def check_deadline() -> float | None:
    """The running check's deadline (``time.monotonic()``), None outside a check."""
    return CHECK_DEADLINE.get()


def past_deadline(deadline: float | None, what: str = "scan") -> None:
    """Raise :class:`Overrun` once ``time.monotonic()`` is past ``deadline``."""
    if deadline is not None and time.monotonic() > deadline:
        raise Overrun(f"{what} ran past its check's time budget")

# Messages up to this size are parsed and scanned on the event loop itself.
# Both are mostly Python (they hold the GIL), so a worker thread gains no
# parallelism for them, only two thread hops and GIL hand-overs that the loop
# waits through (up to the 5 ms switch interval) while other mail is in flight.
# Bigger messages still go to a thread, so a big message never stalls the loop
# for long. Measured with bench/e2e.py (2 cores, 10 clients): at 2.3 KB inline
# gave +7-23% msgs/s and -0.4 ms CPU per message; at 52 KB it was a wash
# (worse with one worker, better with two), hence the bound.
INLINE_BYTES = 32 * 1024


@dataclass
class Runtime:
    """Everything a check may use; swapped as one object on reload (SIGHUP).

    ``dry_run``: a check must not change state (``mxguard scan``: no autolearn,
    no stored results)."""

    config: Config
    resolver: Resolver
    services: dict[str, Any] = field(default_factory=dict)  # e.g. "greylist" -> Greylister
    clock: Callable[[], float] = time.time
    dry_run: bool = False


class HasRuntime(Protocol):
    """What a door needs of the daemon: the current Runtime (swapped on reload)."""

    @property
    def runtime(self) -> Runtime: ...


def symbol(rt: Runtime, name: str, detail: str = "") -> Symbol:
    """A symbol with its score from config (``[scores]`` or the built-in default)."""
    return Symbol(name, rt.config.score(name), detail)


# Scans of big messages at once: they hold the GIL, so more threads add no
# throughput; a few let a small message through while a big one runs.
WORKER_THREADS = max(2, min(8, (os.cpu_count() or 1) + 1))


class _Job:
    __slots__ = ("args", "cancelled", "context", "fn", "future", "kwargs", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any],
                 fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.loop, self.future, self.fn, self.args, self.kwargs = loop, future, fn, args, kwargs
        self.context = contextvars.copy_context()  # CHECK_DEADLINE travels with the job
        self.cancelled = False


class WorkerPool:
    """A bounded pool of daemon threads for CPU-bound work off the event loop.

    Unlike ``asyncio.to_thread`` (the default executor: non-daemon threads,
    joined at exit), a busy worker does not keep the process alive, so SIGTERM
    exits within ``[server] shutdown_grace`` whatever a scan is doing; and the
    pool is its own, so the default executor (reload, report_safe) is never
    starved by scans."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._pending = 0  # jobs queued or running
        self.busy = 0  # jobs running now

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        job = _Job(loop, future, fn, args, kwargs)
        self._submit(job)
        try:
            return await future
        except asyncio.CancelledError:
            job.cancelled = True  # still queued: dropped unstarted; running: ends at its deadline
            raise

    def _submit(self, job: _Job) -> None:
        with self._lock:
            self._pending += 1
            if self._pending > len(self._threads) and len(self._threads) < self.size:
                thread = threading.Thread(target=self._work, daemon=True,
                                          name=f"mxguard-scan-{len(self._threads) + 1}")
                self._threads.append(thread)
                thread.start()
        self._queue.put(job)

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                deadline = job.context.get(CHECK_DEADLINE)
                if not job.cancelled and deadline is not None and time.monotonic() > deadline:
                    self._deliver(job, None, Overrun("queued past its check's time budget"))
                elif not job.cancelled:
                    with self._lock:
                        self.busy += 1
                    result: Any = None
                    error: BaseException | None = None
                    try:
                        result = job.context.run(job.fn, *job.args, **job.kwargs)
                    except BaseException as exc:  # handed to the awaiting check
                        error = exc
                    finally:
                        with self._lock:  # not busy once the caller can see the result
                            self.busy -= 1
                    self._deliver(job, result, error)
            finally:
                with self._lock:
                    self._pending -= 1

    @staticmethod
    def _deliver(job: _Job, result: Any, exc: BaseException | None) -> None:
        def settle() -> None:
            if job.future.done():
                return
            if exc is not None:
                job.future.set_exception(exc)
            else:
                job.future.set_result(result)
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            job.loop.call_soon_threadsafe(settle)


WORKERS = WorkerPool(WORKER_THREADS)


async def off_loop(size: int, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in place for a message of ``size`` bytes up to
    :data:`INLINE_BYTES`, else on :data:`WORKERS` (daemon threads, bounded)."""
    if size <= INLINE_BYTES:
        return fn(*args, **kwargs)
    return await WORKERS.run(fn, *args, **kwargs)


__all__ = ["CHECK_DEADLINE", "INLINE_BYTES", "WORKERS", "WORKER_THREADS", "HasRuntime", "Overrun",
           "Runtime", "WorkerPool", "check_deadline", "off_loop", "past_deadline", "symbol"]
