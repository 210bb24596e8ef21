"""Metrics: the observer's counters, the exposition parsed back, histogram bucket
edges, summing workers' snapshot files (a dead worker's too), counted store
calls, and the README table. Each positive case has a control that must not fire
(a symbol not hit is absent, a dead worker's gauges are not summed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mxguard import stats
from mxguard.core.transaction import Action, CheckResult, Symbol, Transaction, Verdict
from mxguard.web import metrics
from mxguard.web.metrics import BUCKETS, MetricsService, Recorder


@pytest.fixture(autouse=True)
def _clean() -> Any:
    stats.reset()
    yield
    stats.reset()
    metrics._active = None


def parse(body: bytes) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """sample name -> sorted labels -> value."""
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def verdict(action: Action = Action.ACCEPT, symbols: tuple[str, ...] = (),
            timings: dict[str, float] | None = None) -> Verdict:
    return Verdict(action=action, symbols=[Symbol(s, 1.0) for s in symbols],
                   timings=dict(timings or {}))


def tx(greylist_reason: str | None = None) -> Transaction:
    t = Transaction()
    if greylist_reason is not None:
        t.results["greylist"] = CheckResult("greylist", reason=greylist_reason)
    return t


def service(rec: Recorder | None = None) -> MetricsService:
    svc = MetricsService(None)
    if rec is not None:
        svc.recorder = rec
    return svc


# ---------------------------------------------------------------- observer -> exposition

@pytest.mark.parametrize(("door", "action", "family", "labels"), [
    ("policy", Action.DEFER_IF_PERMIT, "mxguard_requests_total",
     (("action", "defer_if_permit"), ("door", "policy"))),
    ("policy", Action.ACCEPT, "mxguard_requests_total",
     (("action", "accept"), ("door", "policy"))),
    ("milter", Action.REJECT, "mxguard_messages_total", (("action", "reject"),)),
    ("milter", Action.QUARANTINE, "mxguard_messages_total", (("action", "quarantine"),)),
])
def test_decisions_counted_by_door_and_action(door: str, action: Action, family: str,
                                              labels: tuple[tuple[str, str], ...]) -> None:
    rec = Recorder()
    rec.observe(door, tx(), verdict(action), "")
    rec.observe(door, tx(), verdict(action), "")
    got = parse(metrics.render(service(rec).samples()))
    assert got[family][labels] == 2
    other = "mxguard_messages_total" if family == "mxguard_requests_total" \
        else "mxguard_requests_total"
    assert other not in got  # control: the other door counted nothing


def test_symbol_hits_and_a_symbol_not_hit_is_absent() -> None:
    rec = Recorder()
    rec.observe("milter", tx(), verdict(symbols=("SPF_PASS", "BAYES_99")), "")
    rec.observe("milter", tx(), verdict(symbols=("SPF_PASS",)), "")
    got = parse(metrics.render(service(rec).samples()))["mxguard_symbols_total"]
    assert got[(("symbol", "SPF_PASS"),)] == 2
    assert got[(("symbol", "BAYES_99"),)] == 1
    assert (("symbol", "SPF_FAIL"),) not in got  # control


@pytest.mark.parametrize(("reason", "result"), [
    ("new", "new"), ("early", "early"), ("passed", "passed"), ("known", "known"),
    ("awl", "auto_whitelisted"), ("whitelist:client", "whitelisted"),
    ("spf-pass", "whitelisted"), ("error:StoreError", "error"), ("odd", "other"),
])
def test_greylist_outcomes(reason: str, result: str) -> None:
    rec = Recorder()
    rec.observe("policy", tx(reason), verdict(), "")
    rec.observe("policy", tx(None), verdict(), "")  # control: no greylist result, not counted
    got = parse(metrics.render(service(rec).samples()))["mxguard_greylist_triplets_total"]
    assert got == {(("result", result),): 1}


# ---------------------------------------------------------------- histogram edges

@pytest.mark.parametrize(("ms", "first_le"), [
    (0.1, 0.0001),  # exactly on an edge: in that bucket (le means <=)
    (0.1001, 0.00025),  # just above: the next one
    (1.0, 0.001),
    (1.0001, 0.0025),
    (10_000.0, 10.0),
    (10_001.0, float("inf")),  # past the last edge: only +Inf
])
def test_check_duration_bucket_edges(ms: float, first_le: float) -> None:
    rec = Recorder()
    rec.observe("policy", tx(), verdict(timings={"helo": ms}), "")
    rec.observe("policy", tx(), verdict(timings={"spf": 0.05}), "")  # control: another check
    got = parse(metrics.render(service(rec).samples()))
    buckets = {float(dict(k)["le"]): v for k, v in got["mxguard_check_duration_seconds_bucket"]
               .items() if dict(k)["check"] == "helo"}
    assert sorted(buckets) == [*BUCKETS, float("inf")]
    for le, n in buckets.items():
        assert n == (1 if le >= first_le else 0), le
    assert got["mxguard_check_duration_seconds_count"][(("check", "helo"),)] == 1
    assert got["mxguard_check_duration_seconds_sum"][(("check", "helo"),)] == \
        pytest.approx(ms / 1000)


# ---------------------------------------------------------------- other sources

class FakeStats:
    def __init__(self, hits: int, timeouts: int, servfail: int, by_type: dict[str, int]) -> None:
        self.cache_hits, self.timeouts, self.servfail, self.by_type = \
            hits, timeouts, servfail, by_type
        self.queries = sum(by_type.values())


class FakeRuntime:
    def __init__(self, resolver: Any, services: dict[str, Any] | None = None) -> None:
        self.resolver, self.services = resolver, services or {}


class FakeDaemon:
    def __init__(self, runtime: Any) -> None:
        self.runtime, self.policy, self.milter = runtime, None, None


def test_dns_figures_survive_a_resolver_swap_on_reload() -> None:
    from mxguard.dns import Resolver

    first, second = Resolver(), Resolver()
    first.stats.cache_hits, first.stats.timeouts, first.stats.by_type = 3, 1, {"A": 4}
    svc = service()
    svc.daemon = FakeDaemon(FakeRuntime(first))
    assert svc.samples()["mxguard_dns_cache_hits_total"] == {"": 3}
    second.stats.cache_hits, second.stats.servfail, second.stats.by_type = 2, 5, {"A": 1,
                                                                                   "TXT": 2}
    svc.daemon.runtime = FakeRuntime(second)
    s = svc.samples()
    assert s["mxguard_dns_cache_hits_total"] == {"": 5}
    assert s["mxguard_dns_timeouts_total"] == {"": 1}
    assert s["mxguard_dns_errors_total"] == {"": 5}
    assert s["mxguard_dns_queries_total"] == {"A": 5, "TXT": 2}
    assert "MX" not in s["mxguard_dns_queries_total"]  # control


class History:
    written, dropped, errors, queued = 7, 2, 1, 3


def test_history_and_connection_figures() -> None:
    svc = service()
    svc.daemon = FakeDaemon(FakeRuntime(None, {"history": History()}))
    svc.daemon.policy = type("S", (), {"connections": {1, 2, 3}})()
    stats.REFUSED["policy"] += 4
    got = parse(metrics.render(svc.samples()))
    assert got["mxguard_history_records_total"] == {
        (("result", "written"),): 7, (("result", "dropped"),): 2, (("result", "error"),): 1}
    assert got["mxguard_history_queue"] == {(): 3}
    assert got["mxguard_connections"] == {(("door", "policy"),): 3}  # no milter door: absent
    assert got["mxguard_connections_refused_total"] == {(("door", "policy"),): 4}
    assert got["mxguard_process_resident_memory_bytes"][()] > 1_000_000
    (labels, one), = got["mxguard_build_info"].items()
    assert one == 1 and dict(labels)["python"].startswith("3.")


def test_no_history_service_no_history_metric() -> None:
    got = parse(metrics.render(service().samples()))
    assert "mxguard_history_records_total" not in got


# ---------------------------------------------------------------- counted store calls

async def test_store_calls_and_errors_counted(tmp_path: Path) -> None:
    from mxguard.store.base import GreylistStore, StoreError
    from mxguard.store.sqlite import SqliteGreylistStore

    store = SqliteGreylistStore(str(tmp_path / "g.db"))
    assert stats.instrument(store, "greylist", GreylistStore) is store
    stats.instrument(store, "greylist", GreylistStore)  # twice: still counted once
    assert isinstance(store, GreylistStore)
    await store.record_first_seen("k", 1.0, 2.0)
    await store.lookup("k", "c")
    await store.lookup("k", "c")
    assert stats.STORE_OPS[("greylist", "lookup")] == 2
    assert stats.STORE_OPS[("greylist", "record_first_seen")] == 1
    assert ("greylist", "get_triplet") not in stats.STORE_OPS  # control: not called
    assert stats.STORE_ERRORS["greylist"] == 0
    await store.close()
    os.chmod(tmp_path, 0o500)  # the file cannot be reopened for writing
    try:
        (tmp_path / "g.db").unlink(missing_ok=True)
        with pytest.raises((StoreError, OSError)):
            await store.record_first_seen("k2", 1.0, 2.0)
    finally:
        os.chmod(tmp_path, 0o700)
    assert stats.STORE_ERRORS["greylist"] == 1


async def test_bayes_learned_and_totals_counted() -> None:
    from mxguard.store.bayes_store import BayesStore, LearnItem, MemoryBayesStore

    store = MemoryBayesStore()
    stats.instrument(store, "bayes", BayesStore)
    await store.learn([LearnItem("m1", [1, 2], True), LearnItem("m2", [3], False)], 10)
    await store.learn([LearnItem("m1", [1, 2], True)], 11)  # known: not counted again
    await store.lookup([1, 2, 3])
    assert stats.BAYES_LEARNED == {"spam": 1, "ham": 1}
    assert stats.BAYES_MESSAGES == {"spam": 1, "ham": 1}
    got = parse(metrics.render(service().samples()))
    assert got["mxguard_bayes_learned_total"] == {(("class", "ham"),): 1,
                                                  (("class", "spam"),): 1}
    assert got["mxguard_store_operations_total"][(("op", "learn"), ("store", "bayes"))] == 2


# ---------------------------------------------------------------- workers' files

def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def doc(pid: int, start: int | None, requests: int, rss: int) -> dict[str, Any]:
    return {"pid": pid, "start": start, "time": 0, "samples": {
        "mxguard_requests_total": {metrics._key("policy", "accept"): requests},
        "mxguard_symbols_total": {"SPF_PASS": requests},
        "mxguard_check_duration_seconds": {"helo": [1] + [0] * len(BUCKETS) + [0.00005]},
        "mxguard_process_resident_memory_bytes": {"": rss},
        "mxguard_bayes_messages": {"spam": requests},
        "mxguard_workers": {"": 1}}}


@pytest.fixture
def sleeper() -> Any:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def totals(directory: Path, live: tuple[int, Any] | None = None) -> dict[str, Any]:
    return parse(metrics.render(metrics.gather(str(directory), live)))


def test_workers_summed_and_a_dead_workers_counters_kept(tmp_path: Path,
                                                         sleeper: Any) -> None:
    d = tmp_path / "metrics"
    d.mkdir()
    alive_pid, gone = sleeper.pid, dead_pid()
    (d / f"{alive_pid}.json").write_text(json.dumps(
        doc(alive_pid, metrics._start_ticks(alive_pid), 5, 1000)))
    (d / f"{gone}.json").write_text(json.dumps(doc(gone, 12345, 3, 7000)))
    key = (("action", "accept"), ("door", "policy"))
    before = totals(d)
    assert before["mxguard_requests_total"][key] == 8  # both workers' counters
    assert before["mxguard_check_duration_seconds_count"][(("check", "helo"),)] == 2
    assert before["mxguard_process_resident_memory_bytes"][()] == 1000  # control: dead's RSS not
    assert before["mxguard_workers"][()] == 1
    assert before["mxguard_bayes_messages"][(("class", "spam"),)] == 5  # max of live, not sum
    assert metrics.fold_dead(str(d)) == 1
    assert not (d / f"{gone}.json").exists() and (d / "retired.json").exists()
    assert metrics.fold_dead(str(d)) == 0  # control: nothing left to fold
    after = totals(d)
    assert after["mxguard_requests_total"][key] == 8  # never backwards
    assert after["mxguard_symbols_total"][(("symbol", "SPF_PASS"),)] == 8
    # a live process reads its own numbers instead of its (older) file
    live = doc(alive_pid, None, 6, 2000)["samples"]
    mine = totals(d, (alive_pid, live))
    assert mine["mxguard_requests_total"][key] == 9
    assert mine["mxguard_process_resident_memory_bytes"][()] == 2000


def test_a_reused_pid_is_not_taken_for_the_writer(tmp_path: Path, sleeper: Any) -> None:
    pid = sleeper.pid
    start = metrics._start_ticks(pid)
    assert start is not None
    assert metrics.alive(pid, start)
    assert not metrics.alive(pid, start + 1)  # the same pid, another process
    assert not metrics.alive(dead_pid(), None)


def test_service_writes_its_file_and_folds_others(tmp_path: Path) -> None:
    svc = MetricsService(str(tmp_path))
    svc.daemon = FakeDaemon(FakeRuntime(None))
    svc.recorder.observe("policy", tx(), verdict(Action.REJECT, ("HELO_BARE_IP",)), "")
    d = tmp_path / "metrics"
    d.mkdir()
    gone = dead_pid()
    (d / f"{gone}.json").write_text(json.dumps(doc(gone, 1, 2, 10)))
    svc.write()
    own = json.loads((d / f"{os.getpid()}.json").read_text())
    assert own["samples"]["mxguard_symbols_total"] == {"HELO_BARE_IP": 1}
    assert not (d / f"{gone}.json").exists()
    got = parse(metrics.render(svc.gather()))
    assert got["mxguard_requests_total"][(("action", "accept"), ("door", "policy"))] == 2
    assert got["mxguard_requests_total"][(("action", "reject"), ("door", "policy"))] == 1
    assert got["mxguard_workers"][()] == 1
    fresh = MetricsService(str(tmp_path / "fresh"))
    fresh.daemon = svc.daemon
    fresh.write()  # makes its directory, not readable by others
    assert oct((tmp_path / "fresh" / "metrics").stat().st_mode & 0o777) == "0o750"


def test_snapshot_file_never_written_through_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.write_text("keep")
    path = tmp_path / "123.json"
    path.symlink_to(target)
    (tmp_path / f"123.json.{os.getpid()}.tmp").symlink_to(target)  # planted at the temp name
    metrics.write_atomic(str(path), b"{}")
    assert target.read_text() == "keep"
    assert not path.is_symlink() and path.read_bytes() == b"{}"
    link = tmp_path / "456.json"
    link.symlink_to(path)
    assert metrics.read_json(str(link)) is None  # a symlinked snapshot is not read


def test_broken_files_are_ignored(tmp_path: Path) -> None:
    (tmp_path / "1.json").write_text("{not json")
    (tmp_path / "x.json").write_text("{}")
    (tmp_path / "retired.json").write_text(json.dumps({"samples": {
        "mxguard_requests_total": {"policy\taccept": "many"},  # not a number: skipped
        "mxguard_check_duration_seconds": {"helo": [1, 2]},  # other buckets: skipped
        "no_such_metric": {"": 1}}}))
    got = totals(tmp_path)
    assert "mxguard_requests_total" not in got
    assert "mxguard_check_duration_seconds_count" not in got
    assert got["mxguard_workers"][()] == 0


# ---------------------------------------------------------------- API for the web

def test_api_without_a_daemon() -> None:
    body, ctype = metrics.exposition()
    assert ctype.startswith("text/plain")
    assert "mxguard_build_info" in parse(body)
    assert metrics.snapshot()["metrics"]["mxguard_requests_total"] == []


def test_snapshot_and_health_of_the_active_service(tmp_path: Path) -> None:
    from mxguard.config import Config

    services: dict[str, Any] = {}
    svc = metrics.install(services, str(tmp_path))
    assert services["metrics"] is svc and metrics.active() is svc
    runtime = FakeRuntime(None, services)
    runtime.config = Config()  # type: ignore[attr-defined]
    svc.daemon = FakeDaemon(runtime)
    for observer in services["decision_observers"]:
        observer("milter", tx(), verdict(Action.REJECT, ("BAYES_99",), {"bayes": 3.0}), "")
    snap = metrics.snapshot()
    assert snap["metrics"]["mxguard_messages_total"] == [
        {"labels": {"action": "reject"}, "value": 1}]
    (hist,) = snap["metrics"]["mxguard_check_duration_seconds"]
    assert hist["labels"] == {"check": "bayes"} and hist["value"]["count"] == 1
    assert hist["value"]["buckets"]["0.0025"] == 0 and hist["value"]["buckets"]["0.005"] == 1
    h = metrics.health(runtime)  # type: ignore[arg-type]
    assert h["store"]["reachable"] is True
    assert h["dns"]["timeouts_recent"] == 0
    assert h["workers"]["configured"] == 1 and h["workers"]["alive"] == 1
    assert json.loads(json.dumps(h)) == h  # plain JSON


def test_readme_lists_every_metric() -> None:
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    assert metrics.reference_table() in readme, "run scripts/gen_config_reference.py"
    for d in metrics.METRICS:
        assert d.name.startswith("mxguard_")
        assert (d.kind == "counter") == d.name.endswith("_total")


async def test_refused_connections_counted_per_door() -> None:
    import asyncio

    from mxguard.config import PolicyConfig
    from mxguard.server.policy import PolicyServer
    from mxguard.testing.ports import free_port

    async def handler(req: Any) -> bytes:
        return b"action=DUNNO\n\n"

    port = free_port()
    server = PolicyServer(PolicyConfig(listen=f"127.0.0.1:{port}", max_connections=1), handler)
    await server.start()
    try:
        _r1, w1 = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(100):  # the first is admitted once the loop has run its callback
            if server.connections:
                break
            await asyncio.sleep(0.01)
        assert stats.REFUSED["policy"] == 0  # control: the first one is admitted
        r2, w2 = await asyncio.open_connection("127.0.0.1", port)
        assert await r2.read() == b""  # refused: closed at once
        assert stats.REFUSED == {"policy": 1}
        svc = service()
        svc.daemon = FakeDaemon(FakeRuntime(None))
        svc.daemon.policy = server
        got = parse(metrics.render(svc.samples()))
        assert got["mxguard_connections"] == {(("door", "policy"),): 1}
        assert got["mxguard_connections_refused_total"] == {(("door", "policy"),): 1}
        w1.close()
        w2.close()
    finally:
        await server.close(0.1)


def test_folding_never_waits_for_a_held_lock(tmp_path: Path) -> None:
    import fcntl

    gone = dead_pid()
    (tmp_path / f"{gone}.json").write_text(json.dumps(doc(gone, 1, 2, 10)))
    fd = os.open(tmp_path / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another process folding, or stuck
        assert metrics.fold_dead(str(tmp_path)) == 0  # not now, and no wait
        assert (tmp_path / f"{gone}.json").exists()
        got = totals(tmp_path)  # a reader does not wait either
        assert got["mxguard_requests_total"][(("action", "accept"), ("door", "policy"))] == 2
    finally:
        os.close(fd)
    assert metrics.fold_dead(str(tmp_path)) == 1  # control: free again, folded


@pytest.mark.parametrize("as_json", [False, True])
def test_cli_prints_the_files_of_a_state_dir(tmp_path: Path, sleeper: Any,
                                             as_json: bool) -> None:
    from click.testing import CliRunner

    from mxguard.cli import main

    d = tmp_path / "metrics"
    d.mkdir()
    pid = sleeper.pid
    (d / f"{pid}.json").write_text(json.dumps(doc(pid, metrics._start_ticks(pid), 4, 100)))
    config = tmp_path / "c.toml"
    config.write_text(f'[server]\nstate_dir = "{tmp_path}"\n')
    result = CliRunner().invoke(main, ["metrics", "--config", str(config),
                                       *(["--json"] if as_json else [])])
    assert result.exit_code == 0, result.output
    if as_json:
        rows = json.loads(result.output)["metrics"]["mxguard_requests_total"]
        assert rows == [{"labels": {"door": "policy", "action": "accept"}, "value": 4}]
    else:
        got = parse(result.output.encode())
        assert got["mxguard_requests_total"] == {(("action", "accept"), ("door", "policy")): 4}
        assert "mxguard_messages_total" not in got  # control: nothing decided there
    empty = tmp_path / "e.toml"
    empty.write_text(f'[server]\nstate_dir = "{tmp_path}/none"\n')
    result = CliRunner().invoke(main, ["metrics", "--config", str(empty)])
    assert result.exit_code == 1 and "no metrics in" in result.output
