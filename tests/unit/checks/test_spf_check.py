"""The SPF check at the policy door: actions, HELO identity, skips, memory.

Real DNS on loopback, a Runtime built from Config(). Each case has a control.
"""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from mxguard.auth.spf import SpfResult
from mxguard.checks import spf
from mxguard.config import Config, DnsConfig, SpfConfig
from mxguard.core.runtime import Runtime
from mxguard.core.transaction import Action, CheckResult, Transaction
from mxguard.dns import Resolver
from mxguard.testing.dns import DNSServer, Zone

CLIENT = "192.0.2.10"
OTHER = "198.51.100.7"
RECEIVER = "mx.receiver.test"

ZONE: Zone = {
    "pass.example": [("TXT", "v=spf1 ip4:192.0.2.10 -all")],
    "fail.example": [("TXT", "v=spf1 ip4:203.0.113.0/24 -all exp=why.fail.example")],
    "why.fail.example": [("TXT", "%{i} is not an outbound server of %{d}, "
                                 "see https://fail.example/mail")],
    "plainfail.example": [("TXT", "v=spf1 -all")],
    "soft.example": [("TXT", "v=spf1 ~all")],
    "neutral.example": [("TXT", "v=spf1 ?all")],
    "nospf.example": [("A", "192.0.2.99")],
    "perm.example": [("TXT", "v=spf1 ip4:192.0.2.300 -all")],
    "temp.example": [("TIMEOUT", None)],
    "sub.listed.example": [("TXT", "v=spf1 -all")],
    "listed.example": [("TXT", "v=spf1 -all")],
    "mx.good.example": [("TXT", "v=spf1 a -all"), ("A", CLIENT)],
    "mx.bad.example": [("TXT", "v=spf1 -all"), ("A", OTHER)],
}


@pytest.fixture(scope="module")
def dns() -> Iterator[DNSServer]:
    with DNSServer(ZONE) as srv:
        yield srv


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def runtime(dns: DNSServer, cache: int = 20000, **opts: Any) -> Runtime:
    cfg = Config(spf=SpfConfig(**opts), dns=DnsConfig(nameservers=[dns.address], timeout=0.3))
    resolver = Resolver(DnsConfig(nameservers=[dns.address], timeout=0.3, cache_size=cache))
    return Runtime(config=cfg, resolver=resolver, clock=Clock())


def tx(sender: str, helo: str = "mx.good.example", client: str = CLIENT,
       **kw: Any) -> Transaction:
    return Transaction(client_address=client, helo=helo, sender=sender,
                       recipients=["rcpt@receiver.test"], attrs={"server_name": RECEIVER}, **kw)


async def run(dns: DNSServer, t: Transaction, **opts: Any) -> CheckResult:
    result = await spf.check(t, runtime(dns, **opts))
    assert result is not None
    return result


def names(result: CheckResult) -> list[str]:
    return [s.name for s in result.symbols]


# ------------------------------------------------------------------ results


async def test_pass(dns: DNSServer) -> None:
    res = await run(dns, tx("user@pass.example"))
    assert res.decision is None and "SPF_PASS" in names(res)
    assert res.extra["spf"] == "pass" and res.extra["spf_domain"] == "pass.example"
    (header,) = res.headers
    assert header.name == "Received-SPF" and header.value.startswith("pass (mx.receiver.test: ")
    assert "client-ip=192.0.2.10;" in header.value and "identity=mailfrom;" in header.value
    # control: another client is not permitted
    res = await run(dns, tx("user@pass.example", client=OTHER, helo="mx.bad.example"))
    assert res.extra["spf"] == "fail" and "SPF_PASS" not in names(res)


async def test_fail_rejects_with_the_domains_explanation(dns: DNSServer) -> None:
    res = await run(dns, tx("user@fail.example"))
    assert res.decision is not None and res.decision.action is Action.REJECT
    assert res.decision.reply() == (
        "550 5.7.23 SPF fail - not authorized: 192.0.2.10 is not an outbound server of "
        "fail.example, see https://fail.example/mail")
    assert "SPF_FAIL" in names(res) and res.extra["spf"] == "fail"
    # control: fail_action = score gives the symbol, no decision
    res = await run(dns, tx("user@fail.example"), fail_action="score")
    assert res.decision is None and "SPF_FAIL" in names(res)


async def test_fail_without_exp_has_an_actionable_default_text(dns: DNSServer) -> None:
    res = await run(dns, tx("user@plainfail.example"))
    assert res.decision is not None
    assert res.decision.reply() == (
        "550 5.7.23 SPF fail - not authorized: 192.0.2.10 is not allowed to send mail for "
        "plainfail.example: see the SPF record of plainfail.example")
    res = await run(dns, tx("user@plainfail.example"), fail_action="defer")  # control
    assert res.decision is not None and res.decision.reply().startswith("451 4.7.23 ")


@pytest.mark.parametrize(("sender", "sym", "key", "reply"), [
    ("user@soft.example", "SPF_SOFTFAIL", "softfail_action", "550 5.7.23 SPF softfail: "),
    ("user@neutral.example", "SPF_NEUTRAL", "neutral_action", "550 5.7.23 SPF neutral: "),
    ("user@nospf.example", "SPF_NONE", "neutral_action", "550 5.7.23 SPF none: "),
    ("user@perm.example", "SPF_PERMERROR", "permerror_action", "550 5.7.24 SPF permerror: "),
])
async def test_scored_results(dns: DNSServer, sender: str, sym: str, key: str,
                              reply: str) -> None:
    res = await run(dns, tx(sender))
    assert res.decision is None and sym in names(res)
    assert res.headers and res.headers[0].value.startswith(sym[4:].lower() + " (")
    # control: the matching *_action = reject rejects
    res = await run(dns, tx(sender), **{key: "reject"})
    assert res.decision is not None and res.decision.reply().startswith(reply)


async def test_temperror_scores_by_default_and_defers_when_asked(dns: DNSServer) -> None:
    res = await run(dns, tx("user@temp.example"))
    assert res.decision is None and "SPF_TEMPERROR" in names(res)
    assert res.extra["spf"] == "temperror"
    res = await run(dns, tx("user@temp.example"), temperror_action="defer")
    assert res.decision is not None and res.decision.action is Action.DEFER
    assert res.decision.reply().startswith("451 4.4.3 Temporary SPF error checking temp.example")
    # control: a passing domain is not deferred with the same setting
    res = await run(dns, tx("user@pass.example"), temperror_action="defer")
    assert res.decision is None


# ------------------------------------------------------------------ HELO identity


async def test_helo_fail_is_rejected_first(dns: DNSServer) -> None:
    res = await run(dns, tx("user@pass.example", helo="mx.bad.example"))
    assert res.decision is not None and res.decision.reply().startswith("550 5.7.23 ")
    assert "mx.bad.example" in res.decision.text
    assert "SPF_HELO_FAIL" in names(res) and "SPF_PASS" in names(res)
    assert res.extra["spf"] == "pass" and res.extra["spf_helo"] == "fail"
    assert "identity=helo;" in res.headers[0].value
    # control: without helo_check the sender's pass stands
    res = await run(dns, tx("user@pass.example", helo="mx.bad.example"), helo_check=False)
    assert res.decision is None and "SPF_HELO_FAIL" not in names(res)


async def test_null_sender_is_postmaster_at_helo(dns: DNSServer) -> None:
    res = await run(dns, tx("", helo="mx.good.example"))
    assert res.extra["spf"] == "pass" and res.extra["spf_domain"] == "mx.good.example"
    assert 'envelope-from="postmaster@mx.good.example"' in res.headers[0].value
    res = await run(dns, tx("", helo="mx.good.example", client=OTHER))  # control
    assert res.extra["spf"] == "fail" and res.decision is not None


# ------------------------------------------------------------------ skips


@pytest.mark.parametrize(("opts", "t", "why"), [
    ({}, tx("user@plainfail.example", sasl_username="alice"), "authenticated"),
    ({"skip_networks": ["192.0.2.0/24"]}, tx("user@plainfail.example"), "network"),
    ({"skip_networks": ["::ffff:192.0.2.0/120", "192.0.2.0/24"]},
     tx("user@plainfail.example", client="::ffff:192.0.2.10"), "network"),
    ({"skip_sender_domains": ["listed.example"]}, tx("user@listed.example"), "sender-domain"),
    ({"skip_sender_domains": ["*.listed.example"]}, tx("user@sub.listed.example"),
     "sender-domain"),
    ({"skip_helo_covers_client": True}, tx("user@plainfail.example"), "helo-covers-client"),
])
async def test_skips(dns: DNSServer, opts: dict[str, Any], t: Transaction, why: str) -> None:
    res = await run(dns, t, **opts)
    assert res.decision is None and names(res) == ["SPF_SKIPPED"]
    assert res.reason == f"skipped:{why}" and res.extra["spf"] == "skipped"


@pytest.mark.parametrize(("opts", "t"), [
    ({"skip_authenticated": False}, tx("user@plainfail.example", sasl_username="alice")),
    ({"skip_networks": ["198.51.100.0/24"]}, tx("user@plainfail.example")),
    ({"skip_sender_domains": ["listed.example"]}, tx("user@sub.listed.example")),
    ({"skip_sender_domains": ["*.listed.example"]}, tx("user@listed.example")),
    ({"skip_helo_covers_client": True}, tx("user@plainfail.example", helo="mx.bad.example")),
])
async def test_skip_controls(dns: DNSServer, opts: dict[str, Any], t: Transaction) -> None:
    res = await run(dns, t, **opts)
    assert res.decision is not None and "SPF_SKIPPED" not in names(res)


# ------------------------------------------------------------------ once per message


def _txt_queries(dns: DNSServer, name: str) -> int:
    return sum(1 for q in dns.queries if q == (name, "TXT"))


async def test_evaluated_once_per_message(dns: DNSServer) -> None:
    rt = runtime(dns, cache=0)  # no DNS cache: every evaluation shows in the queries
    before = _txt_queries(dns, "pass.example")
    results = [await spf.check(tx("once@pass.example"), rt) for _ in range(5)]
    assert _txt_queries(dns, "pass.example") == before + 1
    assert all(r is not None and r.extra["spf"] == "pass" for r in results)
    verdict = spf.remembered(rt, CLIENT, "mx.good.example", "once@pass.example")
    assert verdict is not None and verdict.result == "pass"
    # control: another sender is another message
    await spf.check(tx("twice@pass.example"), rt)
    assert _txt_queries(dns, "pass.example") == before + 2


async def test_memory_expires_after_result_cache_ttl(dns: DNSServer) -> None:
    rt = runtime(dns, cache=0, result_cache_ttl=100)
    clock = rt.clock
    assert isinstance(clock, Clock)
    before = _txt_queries(dns, "pass.example")
    await spf.check(tx("ttl@pass.example"), rt)
    clock.now += 99  # control: still remembered
    await spf.check(tx("ttl@pass.example"), rt)
    assert _txt_queries(dns, "pass.example") == before + 1
    clock.now += 2
    await spf.check(tx("ttl@pass.example"), rt)
    assert _txt_queries(dns, "pass.example") == before + 2


def test_memory_is_bounded() -> None:
    mem = spf.SpfMemory(size=2)
    verdict = spf.SpfVerdict(None, SpfResult("pass"))
    for i in range(3):
        mem.put((str(i), "h", "s"), verdict, 10.0)
    assert len(mem) == 2 and mem.get(("0", "h", "s"), 0.0) is None
    assert mem.get(("2", "h", "s"), 0.0) is verdict  # control: the newest stays


async def test_receiver_falls_back_to_our_host_name(dns: DNSServer,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "fqdn.receiver.test")
    monkeypatch.setattr(spf, "_FQDN", [])
    t = tx("user@pass.example")
    t.attrs = {}
    res = await run(dns, t)
    assert "receiver=fqdn.receiver.test;" in res.headers[0].value
    res = await run(dns, tx("user@pass.example"))  # control: server_name wins
    assert "receiver=mx.receiver.test;" in res.headers[0].value


async def test_no_header_when_disabled(dns: DNSServer) -> None:
    assert (await run(dns, tx("user@pass.example"), header=False)).headers == []
    assert (await run(dns, tx("user@pass.example"))).headers  # control


@pytest.mark.parametrize(("res", "detail"), [
    (SpfResult("fail", "example.com", mechanism="-all", client_ip="192.0.2.7"),
     "example.com from 192.0.2.7 (matched -all)"),
    (SpfResult("pass", "example.com", mechanism="ip4:192.0.2.0/24", client_ip="192.0.2.7"),
     "example.com from 192.0.2.7 (matched ip4:192.0.2.0/24)"),
    (SpfResult("permerror", "example.com", mechanism="default", problem="two records",
               client_ip="192.0.2.7"), "example.com from 192.0.2.7 (two records)"),
    (SpfResult("none", "example.com"), "example.com"),  # control: nothing more to say
])
def test_symbol_detail_says_what_explain_words(res: SpfResult, detail: str) -> None:
    assert spf.symbol_detail(res) == detail


async def test_helo_identity_is_evaluated_once_per_client_and_helo(dns: DNSServer) -> None:
    """A new sender from a known (client, HELO) evaluates MAIL FROM only; the HELO
    result and the answer are those of a fresh evaluation."""
    rt = runtime(dns, cache=0)  # no DNS cache: every evaluation shows in the queries
    before = _txt_queries(dns, "mx.good.example")
    first = await spf.check(tx("a@pass.example"), rt)
    second = await spf.check(tx("b@pass.example"), rt)
    fresh = await spf.check(tx("b@pass.example"), runtime(dns, cache=0))
    assert _txt_queries(dns, "mx.good.example") == before + 2  # rt once, the fresh one once
    assert first is not None and second is not None and fresh is not None
    assert second.extra == fresh.extra and second.extra["spf_helo"] == "pass"
    assert [s.name for s in second.symbols] == [s.name for s in fresh.symbols]
    assert second.headers == fresh.headers
    # control: another HELO from the same client is evaluated anew
    await spf.check(tx("c@pass.example", helo="mx.bad.example"), rt)
    assert _txt_queries(dns, "mx.bad.example") >= 1


async def test_helo_memory_expires_and_is_bounded(dns: DNSServer) -> None:
    rt = runtime(dns, cache=0, result_cache_ttl=100)
    clock = rt.clock
    assert isinstance(clock, Clock)
    before = _txt_queries(dns, "mx.good.example")
    await spf.check(tx("d@pass.example"), rt)
    clock.now += 99
    await spf.check(tx("e@pass.example"), rt)  # control: still remembered
    assert _txt_queries(dns, "mx.good.example") == before + 1
    clock.now += 2
    await spf.check(tx("f@pass.example"), rt)
    assert _txt_queries(dns, "mx.good.example") == before + 2
    mem = spf.HeloMemory(size=2)
    for i in range(3):
        mem.put((str(i), "h", "r"), SpfResult("pass"), 0.0, 10.0)
    assert len(mem) == 2 and mem.get(("0", "h", "r"), 0.0) is None
    mem.put(("t", "h", "r"), SpfResult("temperror"), 0.0, 600.0)
    assert mem.get(("t", "h", "r"), 61.0) is None  # a temperror: 60 s at most


async def test_built_result_is_a_fresh_copy_and_follows_a_reload(dns: DNSServer) -> None:
    rt = runtime(dns)
    first = await spf.check(tx("g@pass.example"), rt)
    assert first is not None
    first.symbols.clear()
    first.headers.clear()
    again = await spf.check(tx("g@pass.example"), rt)  # the remembered verdict, built before
    assert again is not None and names(again) == ["SPF_HELO_PASS", "SPF_PASS"] and again.headers
    rt.config = dataclasses.replace(rt.config, scores={"SPF_PASS": -3.0})  # a reload
    reloaded = await spf.check(tx("g@pass.example"), rt)
    assert reloaded is not None and [s.score for s in reloaded.symbols][-1] == -3.0
    assert [s.score for s in again.symbols][-1] != -3.0  # control: the old config's score
    for _ in range(spf.MAX_BUILT + 10):  # bounded
        spf.build_result(rt, spf.SpfVerdict(None, SpfResult("pass")), RECEIVER)
    assert len(spf._BUILT) <= spf.MAX_BUILT
