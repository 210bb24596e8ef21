"""The dashboard's actions on real SQLite stores: greylist lookups, whitelisting,
the redacted config."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mxguard import config
from mxguard.checks.greylist import open_greylister
from mxguard.core.runtime import Runtime
from mxguard.core.transaction import Transaction
from mxguard.dns import Resolver
from mxguard.web import actions
from mxguard.web.actions import ActionError


def load(tmp: Path, extra: str = "") -> config.Config:
    path = tmp / "mxguard.toml"
    path.write_text(f'[storage]\nurl = "sqlite:///{tmp}/mx.db"\n{extra}')
    return config.load(str(path))


@pytest.fixture
async def rt(tmp_path: Path) -> AsyncIterator[Runtime]:
    cfg = load(tmp_path, "[greylist]\ndelay = 300\n")
    g = await open_greylister(cfg)
    yield Runtime(config=cfg, resolver=Resolver(cfg.dns), services={"greylist": g})
    await g.close()


async def test_greylist_lookup_finds_the_triplet(rt: Runtime) -> None:
    g = rt.services["greylist"]
    tx = Transaction(client_address="192.0.2.77", sender="Alice+tag@Sender.test",
                     recipients=["bob@example.test"])
    outcome = await g.decide(tx, 1_000_000.0)
    assert outcome is not None and outcome.symbol == "GREYLIST_DEFERRED"
    found = await actions.greylist_lookup(rt, "192.0.2.77", "alice+tag@sender.test",
                                          "bob@example.test")
    assert found.network == "192.0.2.0/24"
    assert found.triplet is not None and not found.triplet["passed"]
    assert [t["recipient"] for t in found.triplets] == ["bob@example.test"]
    other = await actions.greylist_lookup(rt, "198.51.100.1", "alice@sender.test",
                                          "bob@example.test")
    assert other.triplet is None and other.triplets == []  # control: another client
    partial = await actions.greylist_lookup(rt, "", "", "bob@example.test")
    assert len(partial.triplets) == 1 and partial.triplet is None


@pytest.mark.parametrize(("entry", "ok"), [
    ("192.0.2.0/24", True), ("2001:db8::/32", True), ("mail.example.com", True),
    ("", False), ("/[unclosed/", False),
])
async def test_whitelist_client(rt: Runtime, entry: str, ok: bool) -> None:
    if not ok:
        with pytest.raises(ActionError):
            await actions.whitelist_client(rt, entry, "")
        return
    assert await actions.whitelist_client(rt, entry, "partner") is True
    assert await actions.whitelist_client(rt, entry, "again") is False  # already there


async def test_whitelisted_client_shows(rt: Runtime) -> None:
    before = await actions.greylist_lookup(rt, "192.0.2.9", "", "")
    assert before.client_whitelisted == ""
    await actions.whitelist_client(rt, "192.0.2.0/24", "")
    after = await actions.greylist_lookup(rt, "192.0.2.9", "", "")
    assert after.client_whitelisted == "192.0.2.0/24"


def test_redacted_config(tmp_path: Path) -> None:
    cfg = load(tmp_path, '[web]\npassword_hash = "scrypt$16$1$1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA"'
               "\nkeep_messages = 7\n")
    text = actions.redacted_config(cfg)
    assert 'password_hash = "***"' in text and "aGFzaGhh" not in text
    assert "keep_messages = 7" in text  # control
    assert 'password_hash = "***"' in config.dump(cfg)  # config show too
    assert 'password_hash = ""' in config.dump(load(tmp_path))  # none set: nothing to hide


def test_redacted_config_storage_password(tmp_path: Path) -> None:
    path = tmp_path / "r.toml"
    path.write_text('[storage]\nurl = "redis://:s3cretpw@127.0.0.1:6390/0"\n')
    text = actions.redacted_config(config.load(str(path)))
    assert "s3cretpw" not in text and "redis://:***@127.0.0.1:6390/0" in text
