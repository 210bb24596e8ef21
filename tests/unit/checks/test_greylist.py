"""Greylisting: triplets, timing, whitelists, auto-whitelist, SPF interplay, store
errors. Every positive case has a control case that must not fire.

One suite for both stores: every test that builds a greylister (``env``,
``env_factory``) runs once on SQLite and once on Redis (a real redis-server on
loopback, tests/support/redis.py). ``@sqlite_only`` marks the few that poke at
the SQLite file itself.
"""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from mxguard.checks import evaluate
from mxguard.checks.greylist import Greylister, LookupCache, check, open_greylister
from mxguard.checks.greylist_lists import (
    DEFAULT_CLIENT_FILE,
    WhitelistError,
    client_network,
    load_whitelists,
    normalize_sender,
)
from mxguard.config import Config, GreylistConfig, ServerConfig, StorageConfig
from mxguard.core.runtime import Runtime
from mxguard.core.transaction import Action, CheckResult, Decision, Mode, Stage, Transaction
from mxguard.store.backends import open_store
from mxguard.store.base import StoreError, TripletRecord
from mxguard.store.sqlite import SqliteGreylistStore
from tests.support.redis import shared_server

T0 = 1_795_000_000.0  # a fixed "now" (Nov 2026)
HOUR = 3600.0
DAY = 86400.0


class FakeClock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


BACKENDS = ["sqlite", "redis"]
# Only the SQLite store: `@sqlite_only` narrows the backend parameter.
sqlite_only = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def storage_url(backend: str, tmp_path: Path) -> str:
    """The store of this test: a temp SQLite file, or the shared Redis flushed."""
    if backend == "redis":
        server = shared_server()
        server.flush()
        return server.url(0)
    return f"sqlite:///{tmp_path}/mxguard.db"


def make_config(tmp_path: Path, storage_url: str | None = None, **greylist: Any) -> Config:
    base = Config(server=ServerConfig(state_dir=str(tmp_path)),
                  storage=StorageConfig(url=storage_url or f"sqlite:///{tmp_path}/mxguard.db",
                                        redis_timeout=5.0))
    return dataclasses.replace(base, greylist=dataclasses.replace(GreylistConfig(), **greylist))


class Env:
    """One greylister on a temp store, a fake clock and a runtime."""

    def __init__(self, cfg: Config, gl: Greylister, clock: FakeClock) -> None:
        self.cfg, self.gl, self.clock = cfg, gl, clock
        self.rt = Runtime(config=cfg, resolver=None,  # type: ignore[arg-type]
                          services={"greylist": gl}, clock=clock)

    async def run(self, tx: Transaction) -> CheckResult | None:
        return await check(tx, self.rt)

    async def deliver(self, tx: Transaction) -> CheckResult:
        """First attempt, wait the delay, retry: the retry's result (must pass)."""
        first = await self.run(tx)
        if first is not None and first.decision is not None:
            self.clock.advance(self.cfg.greylist.delay + 1)
        res = await self.run(tx)
        assert res is not None and res.decision is None, res
        return res


EnvFactory = Callable[..., Any]


@pytest.fixture
async def env_factory(tmp_path: Path, storage_url: str) -> AsyncIterator[EnvFactory]:
    made: list[Env] = []

    async def factory(**greylist: Any) -> Env:
        cfg = make_config(tmp_path, storage_url, **greylist)
        clock = FakeClock()
        gl = await open_greylister(cfg, clock=clock)
        env = Env(cfg, gl, clock)
        made.append(env)
        return env

    yield factory
    for env in made:
        await env.gl.close()


@pytest.fixture
async def env(env_factory: EnvFactory) -> Env:
    e: Env = await env_factory()
    return e


def tx(client: str = "192.0.2.10", sender: str = "alice@sender.example",
       rcpt: str = "bob@rcpt.example", name: str = "unknown", **kw: Any) -> Transaction:
    return Transaction(stage=Stage.RCPT, client_address=client, client_name=name,
                       sender=sender, recipients=[rcpt] if rcpt else [], **kw)


def names(res: CheckResult | None) -> list[str]:
    return [s.name for s in res.symbols] if res is not None else []


def is_deferred(res: CheckResult | None) -> bool:
    return res is not None and res.decision is not None


# ---------------------------------------------------------------- basic triplet cycle


async def test_new_triplet_is_deferred_with_450_420(env: Env) -> None:
    res = await env.run(tx())
    assert res is not None
    assert res.decision == Decision(Action.DEFER_IF_PERMIT, 450, "4.2.0",
                                    "Greylisted, see https://en.wikipedia.org/wiki/Greylisting")
    assert names(res) == ["GREYLIST_DEFERRED"]
    assert res.reason == "new"
    assert res.extra == {"delay": "300"}
    assert res.headers == []


async def test_action_defer_and_text_placeholders(env_factory: EnvFactory) -> None:
    env = await env_factory(action="DEFER",
                            text="Try again in {seconds}s ({client} {sender} {recipient}) {url}",
                            url="https://mx.example/greylist")
    res = await env.run(tx())
    assert res is not None and res.decision is not None
    assert res.decision.action is Action.DEFER
    assert res.decision.text == ("Try again in 300s (192.0.2.10 alice@sender.example "
                                 "bob@rcpt.example) https://mx.example/greylist")
    env.clock.advance(120)
    res = await env.run(tx())
    assert res is not None and res.decision is not None
    assert res.decision.text.startswith("Try again in 180s")


async def test_retry_before_delay_still_deferred_with_seconds_left(env: Env) -> None:
    await env.run(tx())
    env.clock.advance(100)
    res = await env.run(tx())
    assert is_deferred(res) and res is not None
    assert res.reason == "early"
    assert res.extra == {"delay": "200"}
    # control: at exactly the delay the retry passes
    env.clock.advance(200)
    res = await env.run(tx())
    assert not is_deferred(res) and names(res) == ["GREYLIST_PASSED"]


async def test_retry_after_delay_passes_with_header_once(env: Env) -> None:
    await env.run(tx())
    env.clock.advance(312)
    res = await env.run(tx())
    assert res is not None and res.decision is None
    assert names(res) == ["GREYLIST_PASSED"] and res.reason == "passed"
    assert res.extra == {"delay": "312"}
    assert [h.name for h in res.headers] == ["X-Greylist"]
    value = res.headers[0].value
    assert value.startswith("delayed 312 seconds by mxguard-0.1.0 at ")
    assert value.endswith("+0000") and "2026" in value
    # control: the second message of the same triplet gets no header
    env.clock.advance(10)
    res = await env.run(tx())
    assert res is not None and res.decision is None and res.headers == []
    assert res.reason == "known" and names(res) == ["GREYLIST_PASSED"]


async def test_delay_zero_passes_at_once_without_header(env_factory: EnvFactory) -> None:
    env = await env_factory(delay=0)
    res = await env.run(tx())
    assert res is not None and res.decision is None and res.reason == "passed"
    assert res.headers == []
    res = await env.run(tx())
    assert res is not None and res.reason == "known"


async def test_header_off(env_factory: EnvFactory) -> None:
    env = await env_factory(header=False)
    res = await env.deliver(tx())
    assert res.reason == "passed" and res.headers == []


async def test_retry_after_retry_window_starts_over(env: Env) -> None:
    await env.run(tx())
    env.clock.advance(2 * DAY + 1)
    res = await env.run(tx())
    assert is_deferred(res) and res is not None and res.reason == "new"
    # control: a retry inside the window passes
    env.clock.advance(301)
    assert not is_deferred(await env.run(tx()))


async def test_passed_triplet_remembered_until_max_age(env: Env) -> None:
    await env.deliver(tx())
    env.clock.advance(34 * DAY)
    res = await env.run(tx())
    assert res is not None and res.reason == "known"
    env.clock.advance(34 * DAY)  # still known: the last use refreshed it
    res = await env.run(tx())
    assert res is not None and res.reason == "known"
    # control: after max_age without use the row expires and greylisting starts over
    env.clock.advance(36 * DAY)
    await env.gl.expire_once()
    assert is_deferred(await env.run(tx()))


@pytest.mark.parametrize(("first", "retry", "same"), [
    ("192.0.2.10", "192.0.2.200", True),        # same /24
    ("192.0.2.10", "192.0.3.10", False),        # control: other /24
    ("2001:db8:1:2::1", "2001:db8:1:2:ffff::9", True),   # same /64
    ("2001:db8:1:2::1", "2001:db8:1:3::1", False),       # control: other /64
    ("::ffff:192.0.2.10", "192.0.2.99", True),  # IPv4-mapped is IPv4
])
async def test_client_network_of_the_triplet(env: Env, first: str, retry: str,
                                             same: bool) -> None:
    await env.run(tx(client=first))
    env.clock.advance(301)
    res = await env.run(tx(client=retry))
    assert is_deferred(res) is not same


@pytest.mark.parametrize(("by_host", "retry", "same"), [
    (True, "192.0.2.10", True),
    (True, "192.0.2.11", False),
    (False, "192.0.2.11", True),  # control: by network
])
async def test_lookup_by_host(env_factory: EnvFactory, by_host: bool, retry: str,
                              same: bool) -> None:
    env = await env_factory(lookup_by_host=by_host)
    await env.run(tx(client="192.0.2.10"))
    env.clock.advance(301)
    assert is_deferred(await env.run(tx(client=retry))) is not same


@pytest.mark.parametrize(("v4", "v6", "addr", "net"), [
    (24, 64, "198.51.100.77", "198.51.100.0/24"),
    (16, 48, "198.51.100.77", "198.51.0.0/16"),
    (32, 128, "2001:db8::1", "2001:db8::1/128"),
    (24, 64, "2001:db8:a:b:c::1", "2001:db8:a:b::/64"),
])
def test_client_network_prefixes(v4: int, v6: int, addr: str, net: str) -> None:
    assert client_network(addr, v4, v6, False) == net


@pytest.mark.parametrize(("sender", "normalised"), [
    ("Alice@Example.ORG", "alice@example.org"),
    ("alice+list-123@example.org", "alice@example.org"),
    ("alice+tag@example.org", "alice@example.org"),
    ("prvs=1234abcdef=alice@example.org", "alice@example.org"),
    ("PRVS=0123456789=alice@example.org", "alice@example.org"),
    ("msprvs1=17abcdefgh=alice@example.org", "alice@example.org"),
    ("btv1==0a1b2c3d4e5==alice@example.org", "alice@example.org"),
    ("SRS0=HHH=TT=orig.example=alice@forwarder.example", "alice@orig.example"),
    ("srs0+abcd=x7=orig.example=alice@forwarder.example", "alice@orig.example"),
    ("SRS1=HHH=fwd1.example==HHH=TT=orig.example=alice@fwd2.example", "alice@orig.example"),
    ("user123456@example.org", "user#@example.org"),
    ("bounce-42-7781@lists.example.org", "bounce-#-#@lists.example.org"),
    ("<Bob@Example.org>", "bob@example.org"),
    ("", ""),
    ("<>", ""),
    # controls: nothing to strip
    ("alice@example.org", "alice@example.org"),
    ("prvs@example.org", "prvs@example.org"),
    ("srs0@example.org", "srs#@example.org"),  # not SRS: only digits folded
    ("+alice@example.org", "+alice@example.org"),
])
def test_sender_normalisation(sender: str, normalised: str) -> None:
    assert normalize_sender(sender) == normalised


async def test_verp_senders_share_one_triplet(env: Env) -> None:
    await env.run(tx(sender="bounce-1001@lists.example.org"))
    env.clock.advance(301)
    assert not is_deferred(await env.run(tx(sender="Bounce-2002@lists.example.org")))
    # control: another sender is another triplet
    assert is_deferred(await env.run(tx(sender="other@lists.example.org")))


async def test_recipient_is_lower_cased(env: Env) -> None:
    await env.run(tx(rcpt="Bob@Rcpt.Example"))
    env.clock.advance(301)
    assert not is_deferred(await env.run(tx(rcpt="bob@rcpt.example")))
    assert is_deferred(await env.run(tx(rcpt="carol@rcpt.example")))  # control


async def test_null_sender_is_greylisted(env: Env) -> None:
    res = await env.run(tx(sender=""))
    assert is_deferred(res)
    env.clock.advance(301)
    assert not is_deferred(await env.run(tx(sender="")))


# ---------------------------------------------------------------- auto-whitelist


async def _deliveries(env: Env, count: int, gap: float) -> None:
    """``count`` delivered messages of one client (network), ``gap`` seconds apart."""
    await env.deliver(tx(client="192.0.2.10", rcpt="r0@rcpt.example"))
    for i in range(1, count):
        env.clock.advance(gap)
        await env.run(tx(client=f"192.0.2.{10 + i}", rcpt="r0@rcpt.example"))


async def test_auto_whitelist_after_five_deliveries_hours_apart(env: Env) -> None:
    await _deliveries(env, 5, HOUR + 1)
    res = await env.run(tx(client="192.0.2.99", sender="new@x.example", rcpt="new@rcpt.example"))
    assert res is not None and res.decision is None
    assert names(res) == ["GREYLIST_AUTO_WHITELISTED"] and res.reason == "awl"
    # control: another network is still greylisted
    assert is_deferred(await env.run(tx(client="198.51.100.1", sender="new@x.example")))


async def test_five_deliveries_within_an_hour_do_not_whitelist(env: Env) -> None:
    await _deliveries(env, 5, 60)
    res = await env.run(tx(client="192.0.2.99", sender="new@x.example", rcpt="new@rcpt.example"))
    assert is_deferred(res)


async def test_four_deliveries_do_not_whitelist(env: Env) -> None:
    await _deliveries(env, 4, HOUR + 1)
    assert is_deferred(await env.run(tx(sender="new@x.example", rcpt="new@rcpt.example")))


async def test_auto_whitelist_disabled(env_factory: EnvFactory) -> None:
    env = await env_factory(auto_whitelist_clients=0)
    await _deliveries(env, 6, HOUR + 1)
    assert is_deferred(await env.run(tx(sender="new@x.example", rcpt="new@rcpt.example")))


# ---------------------------------------------------------------- whitelists


CLIENT_FILE = """\
# clients never greylisted
203.0.113.7            # one host
198.51.100.0/24        # a network
2001:db8:77::/48
partner.example        # domain of the verified name, with subdomains
/^mx[0-9]+\\.regex\\.example$/
"""


@pytest.mark.parametrize(("client", "name", "listed"), [
    ("203.0.113.7", "unknown", True),
    ("203.0.113.8", "unknown", False),                 # control: neighbour host
    ("198.51.100.200", "unknown", True),
    ("198.51.101.1", "unknown", False),                # control
    ("2001:db8:77:5::1", "unknown", True),
    ("2001:db8:78::1", "unknown", False),              # control
    ("192.0.2.1", "partner.example", True),
    ("192.0.2.1", "mail.out.Partner.Example", True),
    ("192.0.2.1", "partner.example.evil.example", False),  # control: suffix only
    ("192.0.2.1", "notpartner.example", False),        # control: label boundary
    ("192.0.2.1", "unknown", False),                   # control: unverified name
    ("192.0.2.1", "mx12.regex.example", True),
    ("192.0.2.1", "mx12.regex.example.net", False),    # control
])
async def test_client_whitelist_file(env_factory: EnvFactory, tmp_path: Path, client: str,
                                     name: str, listed: bool) -> None:
    path = tmp_path / "clients.txt"
    path.write_text(CLIENT_FILE)
    env = await env_factory(client_whitelist_files=[str(path)])
    res = await env.run(tx(client=client, name=name))
    if listed:
        assert res is not None and res.decision is None
        assert names(res) == ["GREYLIST_WHITELISTED"] and res.reason == "whitelist:client"
    else:
        assert is_deferred(res)


async def test_unverified_name_does_not_match_domain(env_factory: EnvFactory,
                                                     tmp_path: Path) -> None:
    """The reverse name is not the verified name: only client_name counts."""
    path = tmp_path / "clients.txt"
    path.write_text("partner.example\n")
    env = await env_factory(client_whitelist_files=[str(path)])
    res = await env.run(tx(name="unknown", reverse_client_name="mx.partner.example"))
    assert is_deferred(res)


RECIPIENT_FILE = """\
postmaster@
help@support.example
open.example
*.wild.example
/^list-[a-z]+@lists\\.example$/
"""


@pytest.mark.parametrize(("rcpt", "listed"), [
    ("postmaster@anything.example", True),
    ("PostMaster@Other.Example", True),
    ("postmaster2@anything.example", False),       # control
    ("help@support.example", True),
    ("help@other.example", False),                 # control
    ("anyone@open.example", True),
    ("anyone@sub.open.example", False),            # control: exact domain only
    ("anyone@wild.example", True),
    ("anyone@a.b.wild.example", True),
    ("list-dev@lists.example", True),
    ("list-42@lists.example", False),              # control
])
async def test_recipient_whitelist_file(env_factory: EnvFactory, tmp_path: Path, rcpt: str,
                                        listed: bool) -> None:
    path = tmp_path / "rcpts.txt"
    path.write_text(RECIPIENT_FILE)
    env = await env_factory(recipient_whitelist_files=[str(path)], default_whitelist=False)
    res = await env.run(tx(rcpt=rcpt))
    if listed:
        assert res is not None and res.reason == "whitelist:recipient"
        assert names(res) == ["GREYLIST_WHITELISTED"]
    else:
        assert is_deferred(res)


@pytest.mark.parametrize(("name", "rcpt", "default", "listed"), [
    ("mail-yw1-f170.google.com", "bob@rcpt.example", True, True),
    ("a48-93.smtp-out.amazonses.com", "bob@rcpt.example", True, True),
    ("mail-db8eur05on2071.outbound.protection.outlook.com", "bob@rcpt.example", True, True),
    ("o1.ptr1234.sendgrid.net", "bob@rcpt.example", True, True),
    ("mail-yw1-f170.google.com", "bob@rcpt.example", False, False),  # control: list off
    ("google.com.evil.example", "bob@rcpt.example", True, False),    # control
    ("unknown", "bob@rcpt.example", True, False),                    # control
    ("unknown", "postmaster@rcpt.example", True, True),              # shipped recipients
    ("unknown", "abuse@rcpt.example", True, True),
    ("unknown", "postmaster@rcpt.example", False, False),            # control
])
async def test_shipped_default_whitelist(env_factory: EnvFactory, name: str, rcpt: str,
                                         default: bool, listed: bool) -> None:
    env = await env_factory(default_whitelist=default)
    res = await env.run(tx(name=name, rcpt=rcpt))
    assert (names(res) == ["GREYLIST_WHITELISTED"]) is listed
    assert is_deferred(res) is not listed


def test_shipped_client_list_entries_each_have_a_reason() -> None:
    from importlib import resources

    text = resources.files("mxguard").joinpath("data").joinpath(DEFAULT_CLIENT_FILE).read_text()
    entries = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    assert len(entries) >= 20
    for line in entries:
        entry, sep, reason = line.partition("#")
        assert sep and reason.strip(), line
        assert len(entry.split()) == 1
    assert len(load_whitelists([], [], True).clients) == len(entries)


async def test_dynamic_whitelist_add_remove(env: Env) -> None:
    assert is_deferred(await env.run(tx(client="203.0.113.5")))
    assert await env.gl.add_whitelist("203.0.113.0/24", "client", "partner")
    res = await env.run(tx(client="203.0.113.5"))
    assert res is not None and res.reason == "whitelist:client"
    assert await env.gl.add_whitelist("carol@rcpt.example", "recipient")
    res = await env.run(tx(rcpt="carol@rcpt.example"))
    assert res is not None and res.reason == "whitelist:recipient"
    assert await env.gl.remove_whitelist("203.0.113.0/24")
    assert is_deferred(await env.run(tx(client="203.0.113.5")))  # control: removed
    assert not await env.gl.remove_whitelist("203.0.113.0/24")
    with pytest.raises(WhitelistError):
        await env.gl.add_whitelist("/unbalanced(/", "client")


async def test_dynamic_whitelist_from_another_process(env: Env, tmp_path: Path) -> None:
    """A change by the CLI (another connection) is seen after the refresh."""
    from mxguard.store.base import WhitelistEntry

    await env.run(tx(client="203.0.113.5"))
    other = open_store(env.cfg)  # a second store object: the CLI's
    await other.add_whitelist(WhitelistEntry("203.0.113.5", "client", T0))
    await other.close()
    await env.gl.refresh_dynamic(force=True)
    res = await env.run(tx(client="203.0.113.5"))
    assert res is not None and res.reason == "whitelist:client"


# ---------------------------------------------------------------- reload


async def test_reload_swaps_lists_and_keeps_old_on_error(env_factory: EnvFactory,
                                                         tmp_path: Path) -> None:
    path = tmp_path / "clients.txt"
    path.write_text("203.0.113.7\n")
    env = await env_factory(client_whitelist_files=[str(path)])
    assert not is_deferred(await env.run(tx(client="203.0.113.7")))
    path.write_text("# new list\n198.51.100.0/24\n")
    env.gl.reload(env.cfg)
    assert not is_deferred(await env.run(tx(client="198.51.100.4")))
    assert is_deferred(await env.run(tx(client="203.0.113.7")))  # old entry gone
    path.write_text("198.51.100.0/24\n\n/bad(regex/\n")
    with pytest.raises(WhitelistError, match=r"clients\.txt:3: bad regular expression"):
        env.gl.reload(env.cfg)
    assert not is_deferred(await env.run(tx(client="198.51.100.4")))  # old lists kept


@pytest.mark.parametrize(("content", "message"), [
    ("192.0.2.300\n", r"f\.txt:1: '192\.0\.2\.300' is not an IP address"),
    ("ok.example\nnot a domain\n", r"f\.txt:2: one entry per line"),
    ("# c\nbad_dom!ain\n", r"f\.txt:2: 'bad_dom!ain' is not a domain"),
])
def test_bad_whitelist_file_names_file_and_line(tmp_path: Path, content: str,
                                                message: str) -> None:
    path = tmp_path / "f.txt"
    path.write_text(content)
    with pytest.raises(WhitelistError, match=message):
        load_whitelists([str(path)], [], False)


def test_missing_whitelist_file(tmp_path: Path) -> None:
    with pytest.raises(WhitelistError, match=r"nope\.txt: cannot read"):
        load_whitelists([str(tmp_path / "nope.txt")], [], False)


# ---------------------------------------------------------------- SPF, auth, stage


def spf_result(result: str, decision: Decision | None = None) -> CheckResult:
    return CheckResult("spf", decision=decision, extra={"spf": result})


REJECT = Decision(Action.REJECT, 550, "5.7.23", "SPF fail")


@pytest.mark.parametrize(("spf", "sender", "expect"), [
    (spf_result("fail", REJECT), "a@skip.example", None),           # rejected anyway
    (spf_result("pass"), "a@skip.example", "spf-pass"),
    (spf_result("pass"), "a@mail.parent.example", "spf-pass"),      # *.parent
    (spf_result("pass"), "a@parent.example", "spf-pass"),
    (spf_result("pass"), "a@other.example", "new"),                 # control: not listed
    (spf_result("pass"), "a@sub.skip.example", "new"),              # control: exact only
    (spf_result("softfail"), "a@skip.example", "new"),              # control: no pass
    (spf_result("fail", Decision(Action.DEFER, 451, "4.4.3", "x")), "a@o.example", "new"),
])
async def test_spf_interplay(env_factory: EnvFactory, spf: CheckResult, sender: str,
                             expect: str | None) -> None:
    env = await env_factory(skip_spf_pass_domains=["skip.example", "*.parent.example"])
    t = tx(sender=sender)
    t.results["spf"] = spf
    res = await env.run(t)
    if expect is None:
        assert res is None
    else:
        assert res is not None and res.reason == expect


async def test_authenticated_clients_are_never_greylisted(env: Env) -> None:
    res = await env.run(tx(sasl_username="alice"))
    assert res is not None and res.decision is None and res.reason == "authenticated"
    assert is_deferred(await env.run(tx()))  # control: same request unauthenticated


async def test_request_without_recipient_is_not_checked(env: Env) -> None:
    assert await env.run(tx(rcpt="")) is None


async def test_no_service_means_no_greylisting(tmp_path: Path) -> None:
    rt = Runtime(config=make_config(tmp_path), resolver=None)  # type: ignore[arg-type]
    assert await check(tx(), rt) is None


# ---------------------------------------------------------------- privacy


def stored_keys(env: Env, tmp_path: Path) -> list[tuple[str]]:
    """The keys of every triplet and client record, read from the store's backend."""
    if env.cfg.storage_url.startswith("redis://"):
        client = shared_server().client()
        try:
            return [(k.decode().split(":", 3)[3],)
                    for pattern in ("mxguard:gl:t:*", "mxguard:gl:c:*")
                    for k in client.scan_iter(match=pattern)]
        finally:
            client.close()
    conn = sqlite3.connect(tmp_path / "mxguard.db")
    rows = conn.execute("SELECT key FROM greylist_triplets UNION ALL "
                        "SELECT key FROM greylist_clients").fetchall()
    conn.close()
    return rows


async def test_privacy_stores_only_keyed_hashes(env_factory: EnvFactory,
                                                tmp_path: Path) -> None:
    env = await env_factory(privacy=True)
    assert is_deferred(await env.run(tx()))
    env.clock.advance(301)
    assert not is_deferred(await env.run(tx()))
    rows = stored_keys(env, tmp_path)
    assert len(rows) == 2
    for (key,) in rows:
        assert key.startswith("h:") and len(key) == 34
        assert "192.0.2" not in key and "alice" not in key and "bob" not in key
    assert is_deferred(await env.run(tx(rcpt="carol@rcpt.example")))  # control


async def test_privacy_key_is_kept_across_restarts(env_factory: EnvFactory) -> None:
    env = await env_factory(privacy=True)
    await env.run(tx())
    await env.gl.close()
    env2 = await env_factory(privacy=True)
    env2.clock.advance(301)
    assert not is_deferred(await env2.run(tx()))


# ---------------------------------------------------------------- expiry, store errors


async def test_expiry_removes_old_rows_in_batches(env_factory: EnvFactory) -> None:
    env = await env_factory(expiry_batch=7)
    for i in range(20):
        await env.run(tx(rcpt=f"r{i}@rcpt.example"))
    await env.deliver(tx(rcpt="kept@rcpt.example"))
    env.clock.advance(2 * DAY + 400)  # the pending triplets are past the retry window
    assert [await env.gl.expire_once() for _ in range(4)] == [7, 7, 6, 0]
    stats = await env.gl.store.stats()
    assert stats.triplets == 1 and stats.passed == 1  # control: the passed triplet stays


async def test_run_expiry_task_runs_and_cancels(env_factory: EnvFactory) -> None:
    import asyncio

    env = await env_factory(expiry_batch=5, expiry_interval=1)
    for i in range(3):
        await env.run(tx(rcpt=f"r{i}@rcpt.example"))
    env.clock.advance(3 * DAY)
    task = asyncio.create_task(env.gl.run_expiry())
    for _ in range(50):
        await asyncio.sleep(0.01)
        if (await env.gl.store.stats()).triplets == 0:
            break
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (await env.gl.store.stats()).triplets == 0


# SQLite only: a corrupt file
async def test_corrupt_store_file_raises_store_error(tmp_path: Path) -> None:
    db = tmp_path / "mxguard.db"
    db.write_bytes(b"this is not a database" * 100)
    cfg = make_config(tmp_path)
    with pytest.raises(StoreError, match=r"mxguard\.db"):
        await open_greylister(cfg)


@sqlite_only
async def test_store_error_mid_run_and_recovery(env: Env, tmp_path: Path) -> None:
    store = env.gl.store
    assert isinstance(store, SqliteGreylistStore)
    await env.run(tx(rcpt="warm@rcpt.example"))
    conn = store._connection()
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count={pages}")  # "disk full"
    with pytest.raises(StoreError, match="full"):
        for i in range(200):
            await env.run(tx(rcpt=f"{'x' * 200}{i}@rcpt.example"))
    conn.execute("PRAGMA max_page_count=1073741823")  # the disk has room again
    assert is_deferred(await env.run(tx(rcpt="after@rcpt.example")))
    env.clock.advance(301)
    assert not is_deferred(await env.run(tx(rcpt="after@rcpt.example")))


async def test_store_error_answers_the_fail_action(env_factory: EnvFactory) -> None:
    """Through the pipeline: a store failure becomes [policy] fail_action, logged."""
    env = await env_factory()
    cfg = dataclasses.replace(
        env.cfg, policy=dataclasses.replace(env.cfg.policy, fail_action="DEFER_IF_PERMIT"),
        helo=dataclasses.replace(env.cfg.helo, mode=Mode.OFF),
        spf=dataclasses.replace(env.cfg.spf, mode=Mode.OFF))
    rt = Runtime(config=cfg, resolver=None, services={"greylist": env.gl},  # type: ignore[arg-type]
                 clock=env.clock)
    verdict = await evaluate(tx(), rt, Stage.RCPT)
    assert verdict.decision is not None and verdict.decision.code == 450
    await env.gl.store.close()  # now every store call fails
    verdict = await evaluate(tx(rcpt="other@rcpt.example"), rt, Stage.RCPT)
    assert verdict.decision is not None and verdict.decision.code == 451
    assert verdict.reasons == ["greylist:error:StoreError"]


# ---------------------------------------------------------------- the lookup cache


def count_lookups(env: Env) -> list[int]:
    """Wrap the store's lookup: the list's one element counts the calls."""
    calls = [0]
    lookup = env.gl.store.lookup

    async def counted(key: str, ckey: str) -> Any:
        calls[0] += 1
        return await lookup(key, ckey)

    env.gl.store.lookup = counted  # type: ignore[method-assign,assignment]
    return calls


async def test_known_triplet_is_answered_from_the_cache(env: Env) -> None:
    await env.deliver(tx())
    calls = count_lookups(env)
    for _ in range(3):
        res = await env.run(tx())
        assert res is not None and res.reason == "known" and names(res) == ["GREYLIST_PASSED"]
    assert calls[0] == 1  # the first read; the next two from the cache
    # control: a new triplet is never answered from the cache, each sight asks the store
    for _ in range(2):
        assert is_deferred(await env.run(tx(sender="carol@other.example")))
    assert calls[0] == 3


async def test_cached_triplet_still_refreshes_the_store(env: Env, tmp_path: Path) -> None:
    """The last use reaches the store (TOUCH_INTERVAL), so the row does not expire
    while the cache answers; the touch drops the copy, the next request rereads."""
    await env.deliver(tx())
    await env.run(tx())
    calls = count_lookups(env)
    env.clock.advance(5)
    await env.run(tx())
    assert calls[0] == 0  # within the lifetime: no read
    env.clock.advance(30 * DAY)  # past the lifetime too: read, then touched
    assert (await env.run(tx())).reason == "known"  # type: ignore[union-attr]
    assert calls[0] == 1
    env.clock.advance(30 * DAY)  # 60 days after the delivery: known, as the store was touched
    await env.gl.expire_once()
    res = await env.run(tx())
    assert res is not None and res.reason == "known"


async def test_cache_lifetime_and_off(env_factory: EnvFactory) -> None:
    env = await env_factory(lookup_cache=10)
    await env.deliver(tx())
    calls = count_lookups(env)
    await env.run(tx())
    env.clock.advance(9)
    await env.run(tx())
    assert calls[0] == 1
    env.clock.advance(2)  # past 10 s: read again
    await env.run(tx())
    assert calls[0] == 2
    off = await env_factory(lookup_cache=0)
    await off.deliver(tx(sender="dave@else.example"))
    calls = count_lookups(off)
    for _ in range(3):
        await off.run(tx(sender="dave@else.example"))
    assert calls[0] == 3  # control: lookup_cache = 0 asks the store every time


async def test_deleted_triplet_is_greylisted_again_after_the_lifetime(env: Env) -> None:
    """Another process (a second worker, the CLI) changed the store: seen within the
    cache's lifetime, never later."""
    await env.deliver(tx())
    await env.run(tx())
    assert await env.gl.store.purge(None) > 0  # every row gone (mxguard greylist purge)
    res = await env.run(tx())
    assert res is not None and res.reason == "known"  # within the lifetime: the copy
    env.clock.advance(env.cfg.greylist.lookup_cache + 1)
    assert is_deferred(await env.run(tx()))


async def test_client_count_writes_drop_the_cached_client(env_factory: EnvFactory) -> None:
    env = await env_factory(auto_whitelist_clients=2, auto_whitelist_interval=3600)
    await env.deliver(tx())  # counted once
    env.clock.advance(3601)
    await env.run(tx())  # counted twice: the client is auto-whitelisted from now on
    res = await env.run(tx(sender="erin@new.example"))  # a new triplet, same network
    assert names(res) == ["GREYLIST_AUTO_WHITELISTED"]
    assert names(await env.run(tx())) == ["GREYLIST_AUTO_WHITELISTED"]


def test_lookup_cache_is_bounded() -> None:
    cache = LookupCache(60, size=3)
    for i in range(10):
        rec = TripletRecord(f"t{i}", 0.0, 0.0, 1.0, 1e12)
        cache.put(f"t{i}", rec, f"c{i}", None, 100.0)
    assert len(cache) == 6  # three of each kind: the oldest went first
    assert cache.get("t0", "c0", 100.0) is None
    assert cache.get("t9", "c9", 100.0) is not None
    unpassed = TripletRecord("w", 0.0, 0.0, 0.0, 1e12)
    cache.put("w", unpassed, "c9", None, 100.0)
    assert cache.get("w", "c9", 100.0) is None  # control: a waiting triplet is never kept


async def test_cached_answer_during_an_outage_is_no_recovery(
        env: Env, caplog: pytest.LogCaptureFixture) -> None:
    """The store fails (Redis away): a known triplet is still answered from the
    cache, and that is not logged as the store being back; a real answer is."""
    await env.deliver(tx())
    await env.run(tx())  # cached now
    lookup = env.gl.store.lookup

    async def down(key: str, ckey: str) -> Any:
        raise StoreError("redis: connection refused")

    env.gl.store.lookup = down  # type: ignore[method-assign,assignment]
    with caplog.at_level(logging.WARNING, logger="mxguard"):
        with pytest.raises(StoreError):  # the first failure goes to the pipeline
            await env.run(tx(sender="new@else.example"))
        res = await env.run(tx())
        assert res is not None and res.reason == "known"  # from the cache
        assert not [r for r in caplog.records if "available again" in r.getMessage()]
        env.gl.store.lookup = lookup  # type: ignore[method-assign]
        await env.run(tx(sender="new@else.example"))  # control: the store answers
    assert [r for r in caplog.records if "available again" in r.getMessage()]
