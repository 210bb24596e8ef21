"""``mxguard history`` and ``mxguard explain`` through click's CliRunner over a
history store filled here (SQLite, and a real Redis for the fleet case)."""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from mxguard.cli import main
from mxguard.cli.history import parse_when
from mxguard.store.history import HistoryRecord, SqliteHistoryStore, new_id
from mxguard.store.redis_history import RedisHistoryStore
from tests.support.redis import redis_url  # noqa: F401

_RUNNER_KW: dict[str, Any] = ({"mix_stderr": False}
              if "mix_stderr" in inspect.signature(CliRunner.__init__).parameters else {})
NOW = time.time()


def rec(age: float, **kw: Any) -> HistoryRecord:
    t = NOW - age
    base: dict[str, Any] = dict(id=new_id(t), time=t, host="mx1", client_address="192.0.2.7",
                                sender="alice@example.com", recipients=["bob@example.org"],
                                subject="Hello", action="accept", score=1.0)
    base.update(kw)
    return HistoryRecord(**base)


RECORDS = [
    rec(3 * 86400, queue_id="OLD1", action="accept"),
    rec(3 * 3600, queue_id="SPF1", door="policy", action="reject", decided_by="spf",
        reply="550 5.7.23 SPF fail", score=5.0,
        symbols=[{"name": "SPF_FAIL", "score": 5.0,
                  "detail": "example.com from 192.0.2.7 (matched -all)"}]),
    rec(60, queue_id="HAM1", sender="carol@example.net", subject="Lunch",
        symbols=[{"name": "BAYES_00", "score": -1.9, "detail": ""}]),
]


def conf(tmp_path: Path, url: str | None = None, extra: str = "") -> Path:
    path = tmp_path / "mxguard.toml"
    url = url or f"sqlite:///{tmp_path}/mx.db"
    path.write_text(f'[server]\nstate_dir = "{tmp_path}"\n[storage]\nurl = "{url}"\n{extra}')
    return path


def fill(store: Any) -> None:
    async def go() -> None:
        await store.add_many(RECORDS)
        await store.close()
    asyncio.run(go())


@pytest.fixture
def sqlite_conf(tmp_path: Path) -> Path:
    fill(SqliteHistoryStore(str(tmp_path / "mx-history.db")))
    return conf(tmp_path)


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner(**_RUNNER_KW).invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


FILTERS: list[tuple[list[str], list[str]]] = [
    ([], ["HAM1", "SPF1", "OLD1"]),  # newest first
    (["--queue-id", "SPF1"], ["SPF1"]),
    (["--queue-id", "NONE"], []),  # control
    (["--action", "reject"], ["SPF1"]),
    (["--action", "defer"], []),  # control
    (["--sender", "carol@example.net"], ["HAM1"]),
    (["--sender", "dave@example.net"], []),  # control
    (["--recipient", "bob@example.org"], ["HAM1", "SPF1", "OLD1"]),
    (["--client", "192.0.2.7", "--limit", "1"], ["HAM1"]),
    (["--symbol", "spf_fail"], ["SPF1"]),
    # ages are hours apart: a slow suite (minutes between import and test) keeps them apart
    (["--since", "1d"], ["HAM1", "SPF1"]),
    (["--since", "2h"], ["HAM1"]),
    (["--text", "lunch"], ["HAM1"]),
]


@pytest.mark.parametrize(("args", "queue_ids"), FILTERS, ids=[" ".join(f[0]) or "all"
                                                               for f in FILTERS])
def test_history_filters(sqlite_conf: Path, args: list[str], queue_ids: list[str]) -> None:
    code, out, err = run("history", "--config", str(sqlite_conf), "--json", *args)
    assert code == 0, err
    assert [r["queue_id"] for r in json.loads(out)] == queue_ids


def test_history_lines(sqlite_conf: Path) -> None:
    code, out, _ = run("history", "--config", str(sqlite_conf))
    lines = out.splitlines()
    assert code == 0 and len(lines) == 3
    fields = lines[1].split("\t")
    assert fields[2:7] == ["policy", "SPF1", "reject", "5", "spf"]
    assert fields[8] == "<alice@example.com>" and fields[-1] == RECORDS[1].id


def test_explain_by_queue_id_and_id(sqlite_conf: Path) -> None:
    code, out, _ = run("explain", "--config", str(sqlite_conf), "SPF1")
    assert code == 0
    assert out.splitlines()[0] == ("rejected: SPF fail for example.com from 192.0.2.7; the "
                                   "domain allows only the hosts its SPF record lists "
                                   "(matched -all)")
    code, out2, _ = run("explain", "-c", str(sqlite_conf), RECORDS[1].id)
    assert code == 0 and out2 == out


def test_explain_unknown_id_exits_1(sqlite_conf: Path) -> None:
    code, out, err = run("explain", "--config", str(sqlite_conf), "NOPE")
    assert code == 1 and out == ""
    assert "no history record with id or queue id 'NOPE'" in err and "Traceback" not in err


def test_missing_history_is_one_line(tmp_path: Path) -> None:
    code, _, err = run("history", "--config", str(conf(tmp_path)))
    assert code == 1 and "no history was written yet" in err and "Traceback" not in err
    assert not (tmp_path / "mx-history.db").exists()  # read-only: nothing created


def test_bad_since_is_a_usage_error(sqlite_conf: Path) -> None:
    code, _, err = run("history", "--config", str(sqlite_conf), "--since", "yesterday")
    assert code == 2 and "expected an age like 30m" in err


def test_parse_when() -> None:
    assert parse_when("2h", now=10000.0) == 10000.0 - 7200
    assert parse_when("1.5d", now=200000.0) == 200000.0 - 1.5 * 86400
    assert parse_when("2026-03-01") == 1772323200.0
    assert parse_when("2026-03-01T01:00:00+01:00") == 1772323200.0


def test_privacy_query_by_sender(tmp_path: Path) -> None:
    fill(SqliteHistoryStore(str(tmp_path / "mx-history.db"), privacy=True))
    path = conf(tmp_path, extra="[history]\nprivacy = true\n")
    code, out, _ = run("history", "--config", str(path), "--json", "--sender",
                       "carol@example.net")
    (found,) = json.loads(out)
    assert code == 0 and found["queue_id"] == "HAM1" and found["sender"].startswith("h:")
    assert found["subject"] == ""


def test_redis_fleet_history(tmp_path: Path, redis_url: str) -> None:  # noqa: F811
    fill(RedisHistoryStore(redis_url))
    code, out, _ = run("history", "--config", str(conf(tmp_path, redis_url)), "--json",
                       "--action", "reject")
    assert code == 0 and [r["queue_id"] for r in json.loads(out)] == ["SPF1"]
    code, out, _ = run("explain", "--config", str(conf(tmp_path, redis_url)), "HAM1")
    assert code == 0 and out.startswith("accepted, score 1")
