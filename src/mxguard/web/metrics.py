"""Prometheus metrics: cheap counters in each worker, summed when read.

Hot path: one decision observer (:meth:`Recorder.observe`, registered with
:func:`mxguard.core.runner.add_observer`) adds to plain ``Counter`` s and
histogram lists; no prometheus_client object is touched per request. The other
numbers are read where they are kept anyway: the resolver's
:class:`~mxguard.dns.ResolverStats`, :mod:`mxguard.stats` (store calls, refused
connections, Bayes), the doors' connection sets, the history recorder.

Workers: every process of ``mxguard serve`` writes its snapshot (JSON) to
``<state_dir>/metrics/<pid>.json`` every :data:`WRITE_INTERVAL` seconds and
at exit, atomically (a new file opened ``O_EXCL|O_NOFOLLOW``, then renamed).
A reader (``/metrics`` in any worker, ``mxguard metrics``) sums the files and
``retired.json``; the writer that finds the file of a process that is gone
folds its counters into ``retired.json`` (under ``.lock``), so totals never go
backwards when a worker is restarted. Gauges (connections, memory) count only
live processes. prometheus_client's own multiprocess mode was not used: it
needs its value classes on the hot path (an mmap write per increment) and an
environment variable set before import.

:data:`METRICS` defines every metric (name, type, labels, help); the README's
table is generated from it (:func:`reference_table`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import platform
import time
from bisect import bisect_right
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mxguard import __version__, stats
from mxguard.core.transaction import Symbol, Transaction, Verdict

if TYPE_CHECKING:
    from prometheus_client.core import Metric

    from mxguard.core.runtime import Runtime

log = logging.getLogger("mxguard")

SERVICE = "metrics"  # rt.services key of the MetricsService
WRITE_INTERVAL = 2.0  # seconds between snapshot files of a worker
RECENT = 60.0  # seconds health() looks back for DNS timeouts and store errors
DIR_NAME = "metrics"
RETIRED = "retired.json"
LOCK = ".lock"

# Check durations, seconds (le). Policy checks take well under a millisecond;
# content checks up to seconds; the check budgets end at 10 s or so.
BUCKETS: tuple[float, ...] = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                              0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
NB = len(BUCKETS)
BUCKETS_MS = tuple(b * 1000.0 for b in BUCKETS)  # the edges in verdict.timings' unit
DRAIN_AT = 256  # decisions observed before they are counted (and whenever they are read)

SEP = "\t"  # label values joined into one JSON key


@dataclass(frozen=True)
class MetricDef:
    name: str
    kind: str  # counter | gauge | histogram
    labels: tuple[str, ...]
    doc: str
    merge: str = "sum"  # across workers: sum | max
    retire: bool = True  # kept (in retired.json) after its process is gone

    @property
    def live_only(self) -> bool:
        return self.kind == "gauge" and not self.retire


def _c(name: str, labels: tuple[str, ...], doc: str) -> MetricDef:
    return MetricDef(name, "counter", labels, doc)


def _g(name: str, labels: tuple[str, ...], doc: str, merge: str = "sum") -> MetricDef:
    return MetricDef(name, "gauge", labels, doc, merge, retire=False)


METRICS: tuple[MetricDef, ...] = (
    _c("mxguard_requests_total", ("door", "action"),
       "policy requests decided (HELO, MAIL, RCPT), by door and action (accept, "
       "defer_if_permit, defer, reject)"),
    _c("mxguard_messages_total", ("action",),
       "milter messages decided, by action (accept, quarantine, defer, reject)"),
    _c("mxguard_symbols_total", ("symbol",),
       "decisions in which a symbol fired (a symbol that never fired is absent)"),
    MetricDef("mxguard_check_duration_seconds", "histogram", ("check",),
              "time each check of the pipeline took per request or message"),
    _c("mxguard_dns_queries_total", ("type",), "DNS queries sent (cache misses), by record type"),
    _c("mxguard_dns_cache_hits_total", (), "DNS lookups answered from mxguard's cache"),
    _c("mxguard_dns_timeouts_total", (), "DNS queries that timed out ([dns] timeout)"),
    _c("mxguard_dns_errors_total", (), "DNS queries that failed otherwise (SERVFAIL, no server)"),
    _c("mxguard_store_operations_total", ("store", "op"),
       "calls of a state store (greylist, bayes, dmarc_results), by method"),
    _c("mxguard_store_errors_total", ("store",),
       "store calls that failed (locked, unreachable, full disk)"),
    _c("mxguard_bayes_learned_total", ("class",),
       "messages newly learned (autolearn and learning through the daemon), spam or ham"),
    _g("mxguard_bayes_messages", ("class",),
       "messages learned in the Bayes store, as last read by this daemon", merge="max"),
    _c("mxguard_greylist_triplets_total", ("result",),
       "greylist outcomes: new, early, passed, known, auto_whitelisted, whitelisted, error"),
    _g("mxguard_connections", ("door",), "connections open now (Postfix smtpd processes)"),
    _c("mxguard_connections_refused_total", ("door",),
       "connections refused at [policy]/[milter] max_connections"),
    _c("mxguard_history_records_total", ("result",),
       "history records written, dropped (queue full) or failed (store error)"),
    _g("mxguard_history_queue", (), "history records waiting to be written"),
    _g("mxguard_process_resident_memory_bytes", (),
       "resident memory of all mxguard worker processes"),
    _g("mxguard_build_info", ("version", "python"), "always 1; the labels name the build",
       merge="max"),
    _g("mxguard_workers", (), "mxguard processes serving (snapshot files of live processes)"),
)
BY_NAME = {d.name: d for d in METRICS}

Samples = dict[str, dict[str, Any]]  # metric -> joined label values -> number (histogram: list)


def _key(*values: str) -> str:
    return SEP.join(v.replace(SEP, " ") for v in values)


def _labels(key: str, n: int) -> list[str]:
    return key.split(SEP) if n else []


# ---------------------------------------------------------------- the hot path

# greylist check reasons (mxguard.checks.greylist) -> mxguard_greylist_triplets_total result
GREYLIST_RESULTS = {"new": "new", "early": "early", "passed": "passed", "known": "known",
                    "awl": "auto_whitelisted", "whitelist:client": "whitelisted",
                    "whitelist:recipient": "whitelisted", "spf-pass": "whitelisted",
                    "authenticated": "whitelisted", "error:StoreError": "error"}


class Recorder:
    """What one process decided; :meth:`observe` runs after every decision log line.

    Kept as cheap as it can be: :meth:`observe` only appends the few fields it
    needs (never the transaction: a milter message may hold its body) and every
    :data:`DRAIN_AT` decisions, or when read, :meth:`drain` counts them in bulk
    (``Counter.update`` counts in C; durations are sorted once per check and
    bucketed by bisection). Raw keys (the greylist reason, milliseconds) become
    metric labels and seconds in :meth:`MetricsService.samples`."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str]] = Counter()
        self.messages: Counter[str] = Counter()
        self.symbols: Counter[str] = Counter()
        self.greylist: Counter[str] = Counter()  # greylist check reason -> decisions
        # check -> NB+1 bucket counts (the last is +Inf, not cumulative), then the sum in ms
        self.durations: dict[str, list[float]] = {}
        self.pending: list[tuple[str, str, list[Symbol], dict[str, float], str | None]] = []

    def observe(self, door: str, tx: Transaction, verdict: Verdict, reply: str) -> None:
        grey = tx.results.get("greylist")
        pending = self.pending
        # action._value_, not .value (a property): measurably cheaper per call
        pending.append((door, verdict.action._value_, verdict.symbols, verdict.timings,
                        grey.reason if grey is not None else None))
        if len(pending) >= DRAIN_AT:
            self.drain()

    def drain(self) -> None:
        """Count the decisions observed since the last drain."""
        pending, self.pending = self.pending, []
        if not pending:
            return
        self.requests.update((p[0], p[1]) for p in pending if p[0] != "milter")
        self.messages.update(p[1] for p in pending if p[0] == "milter")
        self.symbols.update(sym.name for p in pending for sym in p[2])
        self.greylist.update(p[4] for p in pending if p[4] is not None)
        by_check: dict[str, list[float]] = {}
        for p in pending:
            for check, ms in p[3].items():
                values = by_check.get(check)
                if values is None:
                    by_check[check] = [ms]
                else:
                    values.append(ms)
        durations = self.durations
        for check, values in by_check.items():
            hist = durations.get(check)
            if hist is None:
                hist = durations[check] = [0] * (NB + 2)
            values.sort()
            below = 0
            for i, edge in enumerate(BUCKETS_MS):
                upto = bisect_right(values, edge)  # le: values <= edge
                hist[i] += upto - below
                below = upto
            hist[NB] += len(values) - below
            hist[-1] += sum(values)

    def greylist_results(self) -> Counter[str]:
        out: Counter[str] = Counter()
        for reason, n in self.greylist.items():
            out[GREYLIST_RESULTS.get(reason, "other")] += n
        return out

    def durations_seconds(self) -> dict[str, list[float]]:
        return {check: [*h[:-1], h[-1] / 1000.0] for check, h in self.durations.items()}



# ---------------------------------------------------------------- snapshots

def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # pragma: no cover - not Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _start_ticks(pid: int) -> int | None:
    """The start time of ``pid`` (``/proc/<pid>/stat`` field 22); None: no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    except OSError:  # pragma: no cover - /proc hidden: fall back to kill(0)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return 0
    fields = data[data.rfind(b")") + 2:].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):  # pragma: no cover - unexpected format
        return 0


def alive(pid: int, start: int | None) -> bool:
    """Is the process that wrote a snapshot still running (and not a reused pid)?"""
    now = _start_ticks(pid)
    if now is None:
        return False
    return start is None or now == 0 or start == 0 or now == start


def build_info() -> dict[str, Any]:
    return {_key(__version__, platform.python_version()): 1}


class MetricsService:
    """One process's numbers: the :class:`Recorder` plus what the daemon keeps."""

    def __init__(self, state_dir: str | None = None) -> None:
        self.recorder = Recorder()
        self.daemon: Any = None  # the Daemon, for its runtime and doors
        self.directory = os.path.join(state_dir, DIR_NAME) if state_dir else None
        self.pid = os.getpid()
        self.start = _start_ticks(self.pid)
        self._resolver: Any = None
        self._dns_base: Counter[str] = Counter()  # figures of resolvers replaced by a reload
        self._dns_types_base: Counter[str] = Counter()
        self.recent: deque[tuple[float, int, int]] = deque()  # (monotonic, timeouts, errors)
        self._task: asyncio.Task[None] | None = None
        self._write_failed = False

    # -- what this process knows now
    def _dns(self) -> tuple[Counter[str], Counter[str]]:
        rt = getattr(self.daemon, "runtime", None)
        res = getattr(rt, "resolver", None)
        if res is not self._resolver:
            old = getattr(self._resolver, "stats", None)
            if old is not None:  # a reload brought a new resolver: keep the old counts
                self._dns_base.update(_dns_figures(old))
                self._dns_types_base.update(old.by_type)
            self._resolver = res
        figures, types = Counter(self._dns_base), Counter(self._dns_types_base)
        st = getattr(res, "stats", None)
        if st is not None:
            figures.update(_dns_figures(st))
            types.update(st.by_type)
        return figures, types

    def samples(self) -> Samples:
        """This process's figures in the snapshot form (:data:`Samples`)."""
        r = self.recorder
        r.drain()
        out: Samples = {
            "mxguard_requests_total": {_key(d, a): n for (d, a), n in r.requests.items()},
            "mxguard_messages_total": {_key(a): n for a, n in r.messages.items()},
            "mxguard_symbols_total": {_key(s): n for s, n in r.symbols.items()},
            "mxguard_check_duration_seconds": {_key(c): h
                                               for c, h in r.durations_seconds().items()},
            "mxguard_greylist_triplets_total": {_key(k): n
                                                for k, n in r.greylist_results().items()},
        }
        figures, types = self._dns()
        out["mxguard_dns_queries_total"] = {_key(t): n for t, n in types.items()}
        out["mxguard_dns_cache_hits_total"] = {"": figures["cache_hits"]}
        out["mxguard_dns_timeouts_total"] = {"": figures["timeouts"]}
        out["mxguard_dns_errors_total"] = {"": figures["errors"]}
        out["mxguard_store_operations_total"] = {_key(s, o): n
                                                 for (s, o), n in stats.STORE_OPS.items()}
        out["mxguard_store_errors_total"] = {_key(s): n for s, n in stats.STORE_ERRORS.items()}
        out["mxguard_bayes_learned_total"] = {_key(c): n for c, n in stats.BAYES_LEARNED.items()}
        out["mxguard_bayes_messages"] = {_key(c): n for c, n in stats.BAYES_MESSAGES.items()}
        out["mxguard_connections_refused_total"] = {_key(d): n
                                                    for d, n in stats.REFUSED.items()}
        out["mxguard_connections"] = {_key(door): n for door, n in self.connections().items()}
        rt = getattr(self.daemon, "runtime", None)
        history = getattr(rt, "services", {}).get("history") if rt is not None else None
        if history is not None:
            out["mxguard_history_records_total"] = {
                _key(result): int(getattr(history, attr, 0) or 0)
                for result, attr in (("written", "written"), ("dropped", "dropped"),
                                     ("error", "errors"))}
            out["mxguard_history_queue"] = {"": int(getattr(history, "queued", 0) or 0)}
        out["mxguard_process_resident_memory_bytes"] = {"": _rss_bytes()}
        out["mxguard_build_info"] = build_info()
        out["mxguard_workers"] = {"": 1}
        return out

    def connections(self) -> dict[str, int]:
        doors: dict[str, int] = {}
        for door in ("policy", "milter"):
            server = getattr(self.daemon, door, None)
            conns = getattr(server, "connections", None)
            if conns is not None:
                doors[door] = len(conns)
        return doors

    def document(self) -> dict[str, Any]:
        return {"pid": self.pid, "start": self.start, "time": time.time(),
                "samples": self.samples()}

    # -- the snapshot file
    def write(self) -> None:
        """Write this process's snapshot; fold the files of processes that are gone."""
        if self.directory is None:
            return
        doc = self.document()
        self._note_recent(doc["samples"])
        try:
            os.makedirs(self.directory, mode=0o750, exist_ok=True)
            write_atomic(os.path.join(self.directory, f"{self.pid}.json"),
                         json.dumps(doc, separators=(",", ":")).encode())
            fold_dead(self.directory, keep=self.pid)
        except OSError as exc:
            if not self._write_failed:
                log.warning("metrics: cannot write %s: %s (totals of other workers and "
                            "`mxguard metrics` miss this one)", self.directory, exc)
            self._write_failed = True
        else:
            self._write_failed = False

    def _note_recent(self, s: Samples) -> None:
        now = time.monotonic()
        self.recent.append((now, int(s["mxguard_dns_timeouts_total"][""]),
                            sum(s["mxguard_store_errors_total"].values())))
        while self.recent and now - self.recent[0][0] > 5 * RECENT:
            self.recent.popleft()

    def close(self) -> None:
        """At exit (:func:`~mxguard.server.daemon.close_services`): the last snapshot;
        its counters stay until the next writer folds them into ``retired.json``."""
        if self._task is not None:
            self._task.cancel()
        if self.daemon is not None:
            self.write()

    def attach(self, daemon: Any) -> None:
        """Called by ``Daemon.start``: the doors and runtime to read, the writer task."""
        self.daemon = daemon
        if self.directory is not None and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run())
            self.write()

    async def run(self) -> None:
        from mxguard.core.runner import log_failure

        while True:
            await asyncio.sleep(WRITE_INTERVAL)
            try:
                self.write()
            except Exception as exc:  # a bug here must not end the writer (nor the daemon)
                log_failure("metrics-write", 60.0, "metrics: snapshot failed: %s: %s",
                            type(exc).__name__, exc)

    # -- what a reader in this process sees
    def gather(self) -> Samples:
        """Totals across workers: the other processes' files plus our live figures."""
        if self.directory is None:
            return self.samples()
        return gather(self.directory, live=(self.pid, self.samples()))


def _dns_figures(st: Any) -> Counter[str]:
    return Counter({"cache_hits": st.cache_hits, "timeouts": st.timeouts,
                    "errors": st.servfail})


# ---------------------------------------------------------------- files

def write_atomic(path: str, data: bytes) -> None:
    """``path`` replaced by ``data``: a new temporary file (``O_EXCL|O_NOFOLLOW``:
    never through a planted symlink), then renamed over it."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o640)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_json(path: str) -> dict[str, Any] | None:
    """A snapshot file, or None when it is gone, unreadable, a symlink or not JSON."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            doc = json.loads(f.read())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("samples"), dict) else None


@contextlib.contextmanager
def _locked(directory: str, mode: int) -> Iterator[bool]:
    """``.lock`` of ``directory`` taken without waiting (a stuck process must never
    hold up a daemon's event loop); yields whether it was taken."""
    fd = os.open(os.path.join(directory, LOCK), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o640)
    try:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
        else:
            yield True
    finally:
        os.close(fd)


def _snapshots(directory: str) -> Iterator[tuple[int, str]]:
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return
    for name in names:
        stem, _, ext = name.partition(".")
        if ext == "json" and stem.isdigit():
            yield int(stem), os.path.join(directory, name)


def fold_dead(directory: str, keep: int | None = None) -> int:
    """Add the counters of snapshot files whose process is gone to ``retired.json``
    and remove those files; returns how many were folded."""
    dead: list[str] = []
    for pid, path in _snapshots(directory):
        if pid == keep:
            continue
        doc = read_json(path)
        if doc is None or not alive(pid, doc.get("start")):
            dead.append(path)
    if not dead:
        return 0
    with _locked(directory, fcntl.LOCK_EX) as taken:
        if not taken:  # another writer is folding: next time
            return 0
        retired_path = os.path.join(directory, RETIRED)
        retired = read_json(retired_path)
        total: Samples = retired["samples"] if retired else {}
        folded = 0
        for path in dead:
            again = read_json(path)  # another writer may have folded it meanwhile
            if again is None and not os.path.lexists(path):
                continue
            if again is not None:
                merge_into(total, again["samples"], retired_only=True)
            folded += 1
        write_atomic(retired_path, json.dumps({"pid": 0, "time": time.time(),
                                               "samples": total}).encode())
        for path in dead:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    return folded


def merge_into(total: Samples, samples: dict[str, Any], *, retired_only: bool = False) -> None:
    """Add ``samples`` to ``total`` by each metric's rule (sum; max for shared gauges);
    with ``retired_only`` only what outlives its process (counters, histograms)."""
    for name, values in samples.items():
        d = BY_NAME.get(name)
        if d is None or not isinstance(values, dict) or (retired_only and not d.retire):
            continue
        into = total.setdefault(name, {})
        for key, value in values.items():
            have = into.get(key)
            if d.kind == "histogram":
                if not isinstance(value, list) or len(value) != NB + 2:
                    continue  # written with other buckets: not comparable
                into[key] = value if have is None else [a + b for a, b in zip(have, value,
                                                                              strict=True)]
            elif not isinstance(value, int | float):
                continue
            elif have is None:
                into[key] = value
            else:
                into[key] = max(have, value) if d.merge == "max" else have + value


def gather(directory: str, live: tuple[int, Samples] | None = None) -> Samples:
    """The totals of ``directory``: retired counters, the files of live processes
    (counters of dead ones not folded yet, too) and ``live`` (pid, samples) in place
    of that process's own file."""
    total: Samples = {}
    workers = 0
    with contextlib.ExitStack() as stack:
        if os.path.isdir(directory):
            with contextlib.suppress(OSError):
                stack.enter_context(_locked(directory, fcntl.LOCK_SH))
        retired = read_json(os.path.join(directory, RETIRED))
        if retired is not None:
            merge_into(total, retired["samples"], retired_only=True)
        for pid, path in _snapshots(directory):
            if live is not None and pid == live[0]:
                continue
            doc = read_json(path)
            if doc is None:
                continue
            running = alive(pid, doc.get("start"))
            merge_into(total, doc["samples"], retired_only=not running)
            workers += running
    if live is not None:
        merge_into(total, live[1])
        workers += 1
    total["mxguard_workers"] = {"": workers}
    total["mxguard_build_info"] = build_info()
    return total


def workers_of(directory: str) -> list[dict[str, Any]]:
    """Per live process: pid, seconds since its last snapshot, memory, connections."""
    rows = []
    for pid, path in sorted(_snapshots(directory)):
        doc = read_json(path)
        if doc is None or not alive(pid, doc.get("start")):
            continue
        s = doc["samples"]
        rows.append({"pid": pid, "age": round(max(0.0, time.time() - float(doc["time"])), 1),
                     "rss_bytes": s.get("mxguard_process_resident_memory_bytes", {}).get("", 0),
                     "connections": {k: v for k, v in s.get("mxguard_connections", {}).items()}})
    return rows


# ---------------------------------------------------------------- exposition

class SamplesCollector:
    """Metric families of one :data:`Samples` (in :data:`METRICS` order), for a
    prometheus_client registry (imported only when ``/metrics`` is first read:
    a worker that is never scraped does not load it)."""

    def __init__(self, samples: Samples) -> None:
        self._samples = samples

    def collect(self) -> Iterable[Metric]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        for d in METRICS:
            values = self._samples.get(d.name, {})
            fam: Metric
            if d.kind == "histogram":
                hist = HistogramMetricFamily(d.name, d.doc, labels=list(d.labels))
                for key, v in sorted(values.items()):
                    running = 0.0
                    buckets = []
                    for le, n in zip((*map(_le, BUCKETS), "+Inf"), v[:NB + 1], strict=True):
                        running += n
                        buckets.append((le, running))
                    hist.add_metric(_labels(key, len(d.labels)), buckets, v[-1])
                fam = hist
            elif d.kind == "counter":
                counter = CounterMetricFamily(d.name, d.doc, labels=list(d.labels))
                for key, v in sorted(values.items()):
                    counter.add_metric(_labels(key, len(d.labels)), v)
                fam = counter
            else:
                gauge = GaugeMetricFamily(d.name, d.doc, labels=list(d.labels))
                for key, v in sorted(values.items()):
                    gauge.add_metric(_labels(key, len(d.labels)), v)
                fam = gauge
            yield fam


def _le(bound: float) -> str:
    return repr(float(bound))


def render(samples: Samples) -> bytes:
    """The Prometheus text format of ``samples``."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(SamplesCollector(samples))
    return generate_latest(registry)


# ---------------------------------------------------------------- the API

_active: MetricsService | None = None


def install(services: dict[str, Any], state_dir: str | None) -> MetricsService:
    """Create this process's service, register its observer and instrument the
    stores in ``services`` (called by :func:`mxguard.server.daemon.open_services`)."""
    global _active
    from mxguard.core.runner import add_observer

    svc = MetricsService(state_dir)
    services[SERVICE] = svc
    add_observer(services, svc.recorder.observe)
    instrument_stores(services)
    _active = svc
    return svc


def instrument_stores(services: dict[str, Any]) -> None:
    from mxguard.store.base import GreylistStore
    from mxguard.store.bayes_store import BayesStore
    from mxguard.store.results import ResultsStore

    greylister = services.get("greylist")
    if greylister is not None and getattr(greylister, "store", None) is not None:
        stats.instrument(greylister.store, "greylist", GreylistStore)
    if services.get("bayes_store") is not None:
        stats.instrument(services["bayes_store"], "bayes", BayesStore)
    results = services.get("dmarc_results")
    if results is not None:
        stats.instrument(results, "dmarc_results", ResultsStore)


def active() -> MetricsService | None:
    return _active


def snapshot() -> dict[str, Any]:
    """The totals as plain JSON: ``{"time", "metrics": {name: [{"labels", "value"}]}}``
    (histograms: ``value`` is ``{"buckets": {le: cumulative}, "sum", "count"}``)."""
    return to_json(_active.gather() if _active is not None else {})


def to_json(samples: Samples) -> dict[str, Any]:
    metrics: dict[str, list[dict[str, Any]]] = {}
    for d in METRICS:
        rows = []
        for key, v in sorted(samples.get(d.name, {}).items()):
            labels = dict(zip(d.labels, _labels(key, len(d.labels)), strict=True))
            if d.kind == "histogram":
                cumulative, running = {}, 0.0
                for le, n in zip((*map(_le, BUCKETS), "+Inf"), v[:NB + 1], strict=True):
                    running += n
                    cumulative[le] = running
                rows.append({"labels": labels, "value": {"buckets": cumulative, "sum": v[-1],
                                                         "count": running}})
            else:
                rows.append({"labels": labels, "value": v})
        metrics[d.name] = rows
    return {"time": time.time(), "metrics": metrics}


def exposition() -> tuple[bytes, str]:
    """``/metrics``: (body, content type) of the totals across workers."""
    from prometheus_client import CONTENT_TYPE_LATEST

    return render(_active.gather() if _active is not None else
                  {"mxguard_build_info": build_info()}), CONTENT_TYPE_LATEST


def exposition_of(state_dir: str) -> bytes:
    """What ``mxguard metrics`` prints: the snapshot files under ``state_dir``."""
    return render(gather(os.path.join(state_dir, DIR_NAME)))


def health(runtime: Runtime | None = None) -> dict[str, Any]:
    """For the dashboard: store, DNS, workers, connections, in plain JSON."""
    svc = _active
    rt = runtime if runtime is not None else getattr(getattr(svc, "daemon", None), "runtime",
                                                     None)
    out: dict[str, Any] = {"time": time.time(), "version": __version__}
    services = getattr(rt, "services", {}) if rt is not None else {}
    stores: dict[str, Any] = {}
    greylister = services.get("greylist")
    recent_timeouts = recent_errors = 0
    if svc is not None:
        svc._note_recent(svc.samples())
        first = next((r for r in svc.recent if time.monotonic() - r[0] <= RECENT), None)
        last = svc.recent[-1]
        if first is not None:
            recent_timeouts, recent_errors = last[1] - first[1], last[2] - first[2]
    if greylister is not None:
        stores["greylist"] = {"ready": bool(getattr(greylister, "ready", False)),
                              "where": str(getattr(greylister, "where", "")),
                              "failed_requests": int(getattr(greylister, "store_errors", 0))}
    for name in ("bayes_store", "dmarc_results", "history_store"):
        if services.get(name) is not None:
            stores[name.removesuffix("_store")] = {"ready": True}
    out["store"] = {"reachable": all(s.get("ready", True) for s in stores.values())
                    and recent_errors == 0, "errors_recent": recent_errors,
                    "errors_total": sum(stats.STORE_ERRORS.values()), "stores": stores}
    resolver = getattr(rt, "resolver", None)
    st = getattr(resolver, "stats", None)
    out["dns"] = {"timeouts_recent": recent_timeouts, "window_seconds": RECENT,
                  "queries": getattr(st, "queries", 0), "cache_hits": getattr(st, "cache_hits", 0),
                  "timeouts": getattr(st, "timeouts", 0), "errors": getattr(st, "servfail", 0)}
    cfg = getattr(rt, "config", None)
    configured = 1
    if cfg is not None:
        from mxguard.server.workers import worker_count

        configured = worker_count(cfg.server.workers)
    rows = workers_of(svc.directory) if svc is not None and svc.directory else []
    out["workers"] = {"configured": configured, "alive": max(len(rows), 1 if svc else 0),
                      "processes": rows}
    conns = svc.connections() if svc is not None else {}
    limits = {}
    if cfg is not None:
        limits = {"policy": cfg.policy.max_connections, "milter": cfg.milter.max_connections}
    out["connections"] = {door: {"open": n, "max": limits.get(door),
                                 "refused": stats.REFUSED.get(door, 0)}
                          for door, n in conns.items()}
    return out


def reference_table() -> str:
    """The README's table of metrics (a test keeps README equal to it)."""
    lines = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    for d in METRICS:
        labels = ", ".join(f"`{x}`" for x in d.labels) or "-"
        lines.append(f"| `{d.name}` | {d.kind} | {labels} | {d.doc} |")
    return "\n".join(lines) + "\n"


__all__ = ["BUCKETS", "METRICS", "MetricDef", "MetricsService", "Recorder", "exposition",
           "exposition_of", "gather", "health", "install", "reference_table", "snapshot"]
