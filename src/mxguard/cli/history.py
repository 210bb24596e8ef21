"""``mxguard history`` and ``mxguard explain``: the message history the daemon
keeps (``[history]``), read from the configured store without changing it.

``history`` prints matching records newest first, one line each (tab-separated:
time, host, door, queue id, action, score, deciding check, client, sender,
recipients, subject, record id), or with ``--json`` one JSON list of records.
``explain ID`` prints one record's verdict in plain words
(:func:`mxguard.core.explain.explain`); ID is a record id or a queue id.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click

from mxguard import config
from mxguard.cli.common import config_option, fail
from mxguard.store.base import StoreError
from mxguard.store.history import ACTIONS, HistoryRecord, HistoryStore

T = TypeVar("T")

_with_config = config_option("mxguard TOML config file (the daemon's; default: built-in)")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_when(text: str, now: float | None = None) -> float:
    """``2h``, ``30m``, ``1d``, ``1w`` ago, or an ISO date/time (UTC unless it says)."""
    now = time.time() if now is None else now
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if m:
        return now - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        when = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected an age like 30m, 2h, 1d, 1w or an ISO "
                                 "date/time like 2026-03-01 or 2026-03-01T12:00") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def _when_option(_ctx: click.Context, _param: click.Parameter, value: str | None) -> float | None:
    return None if value is None else parse_when(value)


def _run(config_path: str | None, action: Callable[[HistoryStore, config.Config],
                                                   Awaitable[T]]) -> T:
    """Load the config, open its history store read-only, run ``action``, close."""
    from mxguard.store.backends import open_history_store

    try:
        cfg = config.load(config_path)
    except config.ConfigError as exc:
        fail(f"config error: {exc}", 2)

    async def go() -> T:
        store = open_history_store(cfg, readonly=True)
        try:
            return await action(store, cfg)
        finally:
            await store.close()

    try:
        return asyncio.run(go())
    except StoreError as exc:
        fail(str(exc), 1)


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _clean(text: str) -> str:
    return " ".join(text.replace("\t", " ").split()) or "-"


def line(rec: HistoryRecord) -> str:
    """One record as one tab-separated line."""
    client = rec.client_address or "-"
    if rec.client_name and rec.client_name not in ("unknown", rec.client_address):
        client += f"({rec.client_name})"
    fields = [_iso(rec.time), rec.host, rec.door, rec.queue_id or "-", rec.action,
              f"{rec.score:g}", rec.decided_by or "-", client, f"<{rec.sender}>",
              ",".join(rec.recipients) or "-", rec.subject, rec.id]
    return "\t".join(_clean(f) for f in fields)


@click.command("history")
@click.option("--queue-id", metavar="ID", help="only this Postfix queue id")
@click.option("--sender", metavar="ADDR", help="only this envelope sender")
@click.option("--recipient", metavar="ADDR", help="only mail to this recipient")
@click.option("--client", metavar="IP|NAME", help="only this client address or name")
@click.option("--action", type=click.Choice(ACTIONS), help="only this action")
@click.option("--symbol", metavar="NAME", help="only records with this symbol")
@click.option("--text", metavar="TEXT", help="only records containing TEXT anywhere")
@click.option("--since", metavar="WHEN", callback=_when_option,
              help="from this time on: 30m, 2h, 1d, 1w ago or an ISO date/time")
@click.option("--until", metavar="WHEN", callback=_when_option, help="up to this time")
@click.option("--limit", type=click.IntRange(1, 100000), default=50, show_default=True,
              help="records printed at most")
@click.option("--json", "as_json", is_flag=True, help="one JSON list of records")
@_with_config
def history(queue_id: str | None, sender: str | None, recipient: str | None,
            client: str | None, action: str | None, symbol: str | None, text: str | None,
            since: float | None, until: float | None, limit: int, as_json: bool,
            config_path: str | None) -> None:
    """Show the recorded decisions, newest first (milter messages; refused or
    deferred policy requests)."""
    if symbol:
        symbol = symbol.upper()

    async def go(store: HistoryStore, cfg: config.Config) -> list[HistoryRecord]:
        return await store.query(queue_id=queue_id, sender=sender, recipient=recipient,
                                 client=client, action=action, symbol=symbol, text=text,
                                 since=since, until=until, limit=limit)

    records = _run(config_path, go)
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in records], ensure_ascii=False, indent=1))
        return
    for rec in records:
        click.echo(line(rec))


@click.command("explain")
@click.argument("record_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="the record as JSON after the words")
@_with_config
def explain(record_id: str, as_json: bool, config_path: str | None) -> None:
    """Say in plain words why one message or request got its answer (ID: a record
    id or a Postfix queue id; the newest record of that queue id)."""
    from mxguard.core.explain import explain as words

    async def go(store: HistoryStore, cfg: config.Config) -> tuple[HistoryRecord | None, Any]:
        return await store.get(record_id), cfg

    rec, cfg = _run(config_path, go)
    if rec is None:
        fail(f"no history record with id or queue id {record_id!r} (records are kept "
             f"{cfg.history.max_age_days} days; policy requests only when "
             f"{'/'.join(cfg.history.policy_actions) or 'never'})", 1)
    click.echo(words(rec, cfg.actions))
    if as_json:
        click.echo(json.dumps(rec.to_dict(), ensure_ascii=False, indent=1))


__all__ = ["explain", "history", "line", "parse_when"]
