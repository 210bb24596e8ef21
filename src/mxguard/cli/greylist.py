"""``mxguard greylist ...``: look at and maintain the greylist store.

Subcommands: ``list``, ``stats``, ``purge``, ``whitelist add|remove|list``.
Each takes ``--config FILE`` (the same TOML file as ``mxguard serve``) and
works on the store it names, safely beside a running daemon (SQLite WAL:
reads never block it; writes are done in small transactions). A dynamic
whitelist change is picked up by the daemon within a second.

Output is plain text, tab-separated, one record per line.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import click

from mxguard import config
from mxguard.checks.greylist_lists import WhitelistError, classify_entry, validate_entry
from mxguard.cli.common import config_option, fail
from mxguard.store.backends import open_store
from mxguard.store.base import GreylistStore, StoreError, WhitelistEntry

T = TypeVar("T")

_with_config = config_option("mxguard TOML config file (default: built-in)", short=False,
                             metavar=None)


def _run(config_path: str | None, action: Callable[[GreylistStore], Awaitable[T]]) -> T:
    """Load the config, open its store, run ``action``, close; errors -> one line."""
    try:
        cfg = config.load(config_path)
    except config.ConfigError as exc:
        fail(str(exc), 2)

    async def go() -> T:
        store = open_store(cfg)
        try:
            return await action(store)
        finally:
            await store.close()

    try:
        return asyncio.run(go())
    except StoreError as exc:
        fail(str(exc), 1)


def _when(ts: float) -> str:
    if ts <= 0:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@click.group("greylist")
def greylist() -> None:
    """Inspect and maintain the greylist store."""


@greylist.command("list")
@_with_config
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True,
              help="most triplets shown (most recently seen first)")
def list_cmd(config_path: str | None, limit: int) -> None:
    """Triplets: client, sender, recipient, first seen, last seen, passed, expires."""
    records = _run(config_path, lambda store: store.list_triplets(limit))
    click.echo("client\tsender\trecipient\tfirst_seen\tlast_seen\tpassed\texpires")
    for r in records:
        parts = r.key.split("\t")
        if len(parts) != 3:  # privacy mode: only a keyed hash is stored
            parts = [r.key, "-", "-"]
        client, sender, recipient = parts
        click.echo("\t".join([client, sender or "<>", recipient, _when(r.first_seen),
                              _when(r.last_seen), _when(r.passed_at), _when(r.expires)]))


@greylist.command("stats")
@_with_config
def stats_cmd(config_path: str | None) -> None:
    """Counts of triplets, clients and whitelist entries."""
    st = _run(config_path, lambda store: store.stats())
    rows: list[tuple[str, Any]] = [
        ("triplets", st.triplets), ("passed", st.passed), ("pending", st.pending),
        ("clients", st.clients), ("whitelist_entries", st.whitelist),
        ("oldest_first_seen", _when(st.oldest_seen)),
    ]
    for name, value in rows:
        click.echo(f"{name}\t{value}")


@greylist.command("purge")
@_with_config
@click.option("--older-than", type=click.IntRange(min=0), default=None, metavar="SECONDS",
              help="delete triplets and clients not seen for this many seconds")
@click.option("--all", "purge_all", is_flag=True, help="delete every triplet and client")
def purge_cmd(config_path: str | None, older_than: int | None, purge_all: bool) -> None:
    """Delete triplets and auto-whitelist clients (not the whitelist)."""
    if (older_than is None) == (not purge_all):
        fail("purge: give exactly one of --older-than SECONDS or --all", 2)
    cutoff = None if purge_all else time.time() - (older_than or 0)
    n = _run(config_path, lambda store: store.purge(cutoff))
    click.echo(f"purged\t{n}")


@greylist.group("whitelist")
def whitelist() -> None:
    """The dynamic whitelist kept in the store (used beside the files)."""


def _kind(entry: str, as_client: bool, as_recipient: bool) -> str:
    if as_client and as_recipient:
        fail("whitelist: give at most one of --client or --recipient", 2)
    if as_client:
        return "client"
    return "recipient" if as_recipient else classify_entry(entry)


@whitelist.command("add")
@_with_config
@click.argument("entry")
@click.option("--client", "as_client", is_flag=True,
              help="a client entry: IP, CIDR, domain of the verified name, /regex/")
@click.option("--recipient", "as_recipient", is_flag=True,
              help="a recipient entry: user@domain, local@, domain, /regex/")
@click.option("--comment", default="", help="why the entry is there")
def whitelist_add(config_path: str | None, entry: str, as_client: bool, as_recipient: bool,
                  comment: str) -> None:
    """Add ENTRY (an entry with @ is a recipient, anything else a client)."""
    kind = _kind(entry, as_client, as_recipient)
    try:
        validate_entry(entry, kind)
    except WhitelistError as exc:
        fail(str(exc), 2)
    item = WhitelistEntry(entry, kind, time.time(), comment)
    added = _run(config_path, lambda store: store.add_whitelist(item))
    click.echo(f"{'added' if added else 'exists'}\t{kind}\t{entry}")


@whitelist.command("remove")
@_with_config
@click.argument("entry")
def whitelist_remove(config_path: str | None, entry: str) -> None:
    """Remove ENTRY from the dynamic whitelist."""
    removed = _run(config_path, lambda store: store.remove_whitelist(entry))
    if not removed:
        fail(f"whitelist: no entry {entry!r}", 1)
    click.echo(f"removed\t{entry}")


@whitelist.command("list")
@_with_config
def whitelist_list(config_path: str | None) -> None:
    """Dynamic whitelist entries: kind, entry, added, comment."""
    for e in _run(config_path, lambda store: store.list_whitelist()):
        click.echo(f"{e.kind}\t{e.entry}\t{_when(e.added)}\t{e.comment}")


__all__ = ["greylist"]
