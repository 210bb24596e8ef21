"""The DMARC check: actions from [dmarc], symbols, extras, results stored,
the Authentication-Results header. Real DNS on loopback; each case has a control."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest

from mxguard.auth.dmarc import DkimAuth, OrgDomains, SpfAuth
from mxguard.auth.spf import SpfResult
from mxguard.checks import dmarc
from mxguard.config import Config, DmarcConfig, DnsConfig, MilterConfig
from mxguard.core.runtime import Runtime
from mxguard.core.transaction import Action, Mode, Transaction
from mxguard.dns import Resolver
from mxguard.store.results import ResultRecord, SqliteResultsStore
from mxguard.testing.dns import DNSServer, Zone
from tests.support import DATA

PSL_FILE = str(DATA / "psl" / "public_suffix_list.dat")
ORG = OrgDomains(PSL_FILE)
NOW = 1_780_000_000.0

ZONE: Zone = {
    "_dmarc.rej.example": [("TXT", "v=DMARC1; p=reject; rua=mailto:agg@rej.example")],
    "_dmarc.quar.example": [("TXT", "v=DMARC1; p=quarantine")],
    "_dmarc.none.example": [("TXT", "v=DMARC1; p=none")],
    "_dmarc.half.example": [("TXT", "v=DMARC1; p=reject; pct=50")],
    "_dmarc.trial.example": [("TXT", "v=DMARC1; p=reject; t=y")],
    "_dmarc.bad.example": [("TXT", "v=DMARC1; p=none; reject")],
    "_dmarc.temp.example": [("TIMEOUT", None)],
}


@pytest.fixture(scope="module")
def dns() -> Iterator[DNSServer]:
    with DNSServer(ZONE) as srv:
        yield srv


def runtime(dns: DNSServer, mode: Mode = Mode.ENFORCE, **opts: Any) -> Runtime:
    cfg = Config(dmarc=DmarcConfig(mode=mode, **opts),
                 dns=DnsConfig(nameservers=[dns.address], timeout=0.3),
                 milter=MilterConfig(authserv_id="mx.receiver.test"))
    resolver = Resolver(DnsConfig(nameservers=[dns.address], timeout=0.3, cache_size=0))
    return Runtime(cfg, resolver, services={dmarc.ORG_SERVICE: ORG}, clock=lambda: NOW)


def headers(frm: str) -> list[tuple[str, str]]:
    return [("Received", "from x"), ("from", frm), ("Subject", "hi")]


FAIL = SpfAuth("fail", "elsewhere.invalid")


async def run(rt: Runtime, frm: str, spf: SpfAuth | None = FAIL,
              dkim: list[DkimAuth] | None = None, **kw: Any) -> dmarc.DmarcOutcome:
    kw.setdefault("sample", lambda pct: True)
    return await dmarc.evaluate_message(headers(frm), spf, dkim or [], rt, **kw)


ACTION_CASES: list[tuple[str, str, dict[str, Any], str, str, bool]] = [
    # id, From, [dmarc] options, symbol, action, has reject decision
    ("pass", "a@rej.example", {"dkim": True}, "DMARC_PASS", "none", False),  # control
    ("reject", "a@rej.example", {}, "DMARC_REJECT", "reject", True),
    ("reject-as-quarantine", "a@rej.example", {"reject_action": "quarantine"},
     "DMARC_REJECT", "quarantine", False),
    ("reject-as-score", "a@rej.example", {"reject_action": "score"},
     "DMARC_REJECT", "score", False),
    ("quarantine-default-score", "a@quar.example", {}, "DMARC_QUARANTINE", "score", False),
    ("quarantine", "a@quar.example", {"quarantine_action": "quarantine"},
     "DMARC_QUARANTINE", "quarantine", False),
    ("quarantine-as-reject", "a@quar.example", {"quarantine_action": "reject"},
     "DMARC_QUARANTINE", "reject", True),
    ("p-none", "a@none.example", {}, "DMARC_NONE_FAIL", "score", False),
    ("no-record", "a@nowhere.example", {}, "DMARC_NO_POLICY", "none", False),
    ("permerror", "a@bad.example", {}, "DMARC_PERMERROR", "none", False),
    ("temperror", "a@temp.example", {}, "DMARC_TEMPERROR", "none", False),
]


@pytest.mark.parametrize("case", ACTION_CASES, ids=[c[0] for c in ACTION_CASES])
async def test_actions(dns: DNSServer, case: tuple[Any, ...]) -> None:
    _, frm, opts, sym, action, rejects = case
    signed = opts.pop("dkim", False)
    rt = runtime(dns, **opts)
    sigs = [DkimAuth("pass", frm.split("@")[1], "s")] if signed else []
    out = await run(rt, frm, dkim=sigs)
    assert [s.name for s in out.check.symbols] == [sym]
    assert out.check.symbols[0].score == rt.config.score(sym)
    assert out.action == out.check.extra["dmarc_action"] == action
    assert (out.check.decision is not None) is rejects
    if rejects:
        d = out.check.decision
        assert d is not None and (d.action, d.code, d.enhanced) == (Action.REJECT, 550, "5.7.1")
        assert frm.split("@")[1] in d.text


async def test_extra_carries_result_policy_and_domain(dns: DNSServer) -> None:
    out = await run(runtime(dns), "User <u@rej.example>")
    extra = out.check.extra
    assert (extra["dmarc"], extra["dmarc_policy"], extra["dmarc_disposition"]) == \
        ("fail", "reject", "reject")
    assert (extra["dmarc_from"], extra["dmarc_org"], extra["dmarc_aligned"]) == \
        ("rej.example", "rej.example", "-")
    assert out.check.check == "dmarc" and out.check.reason.startswith("fail:p=reject")
    passed = await run(runtime(dns), "u@rej.example", SpfAuth("pass", "rej.example"))
    assert passed.check.extra["dmarc_aligned"] == "spf"  # control


async def test_pct_sampled_out_reject_becomes_quarantine(dns: DNSServer) -> None:
    """RFC 7489 §6.6.4 (rfc = "7489" only)."""
    rt = runtime(dns, quarantine_action="quarantine", rfc="7489")
    out = await run(rt, "a@half.example", sample=lambda pct: False)
    assert (out.result.disposition, out.action, out.check.decision) == \
        ("quarantine", "quarantine", None)
    inside = await run(rt, "a@half.example", sample=lambda pct: True)  # control
    assert inside.action == "reject"


async def test_honour_pct_off(dns: DNSServer) -> None:
    out = await run(runtime(dns, honour_pct=False, rfc="7489"), "a@half.example",
                    sample=lambda p: False)
    assert out.action == "reject"


@pytest.mark.parametrize(("rfc", "frm", "action", "testing"), [
    # RFC 9989 §4.7: t=y applies reject as quarantine
    ("9989", "a@trial.example", "quarantine", "y"),
    ("9989", "a@half.example", "reject", "n"),  # control: pct= removed, never sampled
    ("7489", "a@trial.example", "reject", "n"),  # control: t= unknown to RFC 7489
])
async def test_rfc_option_reaches_evaluation(dns: DNSServer, rfc: str, frm: str, action: str,
                                             testing: str) -> None:
    rt = runtime(dns, quarantine_action="quarantine", rfc=rfc)
    out = await run(rt, frm, sample=lambda pct: pct >= 100)  # pct=50 would be outside
    assert (out.action, out.check.extra["dmarc_testing"], out.check.extra["dmarc_rfc"]) == \
        (action, testing, rfc)


async def test_test_mode_is_recorded_as_override(dns: DNSServer) -> None:
    """RFC 9989 t=y: the weakened disposition is stored with its reason."""
    rt = runtime(dns, quarantine_action="quarantine")
    store = with_store(rt)
    await run(rt, "a@trial.example", tx=tx())
    await run(rt, "a@rej.example", tx=tx())  # control: no t=, no override
    rows = {r.header_from: r for r in store.query("2026-05-28")}
    assert (rows["trial.example"].disposition, rows["trial.example"].override) == \
        ("quarantine", "policy_test_mode")
    assert (rows["rej.example"].disposition, rows["rej.example"].override) == ("reject", "")


@pytest.mark.parametrize(("text", "want"), [
    ("DMARC says no for {domain}", "DMARC says no for rej.example"),
    ("bad {placeholder}", DmarcConfig().reject_text.format(domain="rej.example")),
    ("ctl\x00chars {domain}\r\n", "ctl chars rej.example"),
])
async def test_reject_text(dns: DNSServer, text: str, want: str) -> None:
    out = await run(runtime(dns, reject_text=text), "a@rej.example")
    assert out.check.decision is not None and out.check.decision.text == want


async def test_evaluate_message_returns_the_check_result(dns: DNSServer) -> None:
    res = (await dmarc.evaluate_message(headers("a@rej.example"), FAIL, [], runtime(dns))).check
    assert res.decision is not None and res.symbols[0].name == "DMARC_REJECT"


def test_from_values() -> None:
    hs = [("FROM", "a@x.example"), ("Reply-To", "b@y.example"), (" From ", "c@z.example")]
    assert dmarc.from_values(hs) == ["a@x.example", "c@z.example"]
    assert dmarc.from_values([("Sender", "a@x.example")]) == []  # control


@pytest.mark.parametrize(("res", "null", "want"), [
    (SpfResult("pass", "ex.org", sender="u@ex.org"), False,
     SpfAuth("pass", "ex.org", "mailfrom", "u@ex.org")),
    (SpfResult("pass", "mx.ex.org", sender="postmaster@mx.ex.org"), True,
     SpfAuth("pass", "mx.ex.org", "helo", "")),
    (SpfResult("fail", "mx.ex.org", identity="helo"), False, SpfAuth("fail", "mx.ex.org",
                                                                     "helo", "")),
    (None, False, None),
])
def test_spf_auth(res: SpfResult | None, null: bool, want: SpfAuth | None) -> None:
    assert dmarc.spf_auth(res, null_sender=null) == want


# ------------------------------------------------------------------ stored results


def tx() -> Transaction:
    return Transaction(client_address="192.0.2.7", sender="bounce@Mail.Rej.example",
                       recipients=["x@dest.example"], queue_id="ABC123")


def with_store(rt: Runtime) -> SqliteResultsStore:
    store = SqliteResultsStore(":memory:")
    rt.services[dmarc.RESULTS_SERVICE] = store
    return store


async def test_result_stored_for_reports(dns: DNSServer) -> None:
    rt = runtime(dns)
    store = with_store(rt)
    sigs = [DkimAuth("fail", "Rej.example", "sel")]
    await run(rt, "a@rej.example", SpfAuth("pass", "mail.other.example"), sigs, tx=tx())
    rows = store.query("2026-05-28")
    assert len(rows) == 1
    want = ResultRecord(
        ts=NOW, source_ip="192.0.2.7", header_from="rej.example",
        envelope_from="mail.rej.example", envelope_to="dest.example",
        dkim=(("rej.example", "sel", "fail"),), spf_domain="mail.other.example",
        spf_result="pass", policy_domain="rej.example", p="reject",
        rua=("mailto:agg@rej.example",), dmarc_result="fail", policy="reject",
        disposition="reject")
    assert rows[0] == want


@pytest.mark.parametrize(("mode", "opts", "disposition", "override"), [
    (Mode.ENFORCE, {}, "reject", ""),  # control
    (Mode.OBSERVE, {}, "none", "local_policy"),
    (Mode.SCORE, {}, "none", "local_policy"),
    (Mode.ENFORCE, {"reject_action": "quarantine"}, "quarantine", "local_policy"),
])
async def test_stored_disposition_is_what_was_applied(dns: DNSServer, mode: Mode,
                                                      opts: dict[str, Any], disposition: str,
                                                      override: str) -> None:
    rt = runtime(dns, mode, **opts)
    store = with_store(rt)
    await run(rt, "a@rej.example", tx=tx())
    row = store.query("2026-05-28")[0]
    assert (row.disposition, row.override) == (disposition, override)


async def test_sampled_out_is_recorded(dns: DNSServer) -> None:
    rt = runtime(dns, rfc="7489")
    store = with_store(rt)
    await run(rt, "a@half.example", tx=tx(), sample=lambda pct: False)
    row = store.query("2026-05-28")[0]
    assert (row.policy, row.disposition, row.override, row.pct) == \
        ("reject", "none", "sampled_out", 50)  # quarantine_action=score: nothing applied


async def test_nothing_stored_without_record_or_when_disabled(dns: DNSServer) -> None:
    rt = runtime(dns)
    store = with_store(rt)
    await run(rt, "a@nowhere.example", tx=tx())
    assert store.query("2026-05-28") == []
    off = runtime(dns, store_results=False)
    off_store = with_store(off)
    await run(off, "a@rej.example", tx=tx())
    assert off_store.query("2026-05-28") == []


async def test_store_failure_is_logged_not_raised(dns: DNSServer,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    rt = runtime(dns)
    store = with_store(rt)
    store.close()
    store.max_pending = 1
    out = await run(rt, "a@rej.example", tx=tx())
    assert out.action == "reject"
    assert "store_error" in caplog.text and "ABC123" in caplog.text


# ------------------------------------------------------------------ A-R header


async def test_authentication_results_header(dns: DNSServer) -> None:
    rt = runtime(dns)
    spf = SpfAuth("pass", "other.example", sender="b@other.example")
    sigs = [DkimAuth("fail", "rej.example", "sel", "AAAABBBBCCCC")]
    out = await run(rt, "a@rej.example", spf, sigs)
    h = dmarc.authentication_results(rt, spf=spf, dkim=sigs, dmarc=out, fold=False)
    assert h.name == "Authentication-Results"
    assert h.value == ("mx.receiver.test; spf=pass smtp.mailfrom=b@other.example; "
                       "dkim=fail header.d=rej.example header.s=sel header.b=AAAABBBB; "
                       "dmarc=fail (p=reject dis=reject) header.from=rej.example")
    observe = dataclasses.replace(rt, config=dataclasses.replace(
        rt.config, dmarc=dataclasses.replace(rt.config.dmarc, mode=Mode.OBSERVE)))
    h2 = dmarc.authentication_results(observe, spf=spf, dkim=sigs, dmarc=out, fold=False)
    assert "dmarc=fail (p=reject dis=none)" in h2.value  # not applied in observe mode


def test_dkim_auths_from_the_verifier_results() -> None:
    @dataclasses.dataclass(frozen=True)
    class Verified:
        result: str
        domain: str
        selector: str = ""
        identity: str = ""
        header_b: str = ""
        reason: str = ""

    got = dmarc.dkim_auths([Verified("pass", "a.example", "s1", "@a.example", "AbCdEfGh"),
                            Verified("fail", "b.example", reason="bad sig")])
    assert got == [DkimAuth("pass", "a.example", "s1", "AbCdEfGh", "@a.example"),
                   DkimAuth("fail", "b.example", reason="bad sig")]
    assert dmarc.dkim_auths([]) == []  # control


# ------------------------------------------------------------------ temperror_action

TEMP_ZONE: Zone = {
    "_dmarc.seen.example": [("TXT", "v=DMARC1; p=reject")],
    "_dmarc.seenq.example": [("TXT", "v=DMARC1; p=quarantine")],
    "_dmarc.np.example": [("TXT", "v=DMARC1; p=reject; np=none")],
    "sub.np.example": [("TIMEOUT", None)],  # the np= existence check cannot finish
    "_dmarc.temp.example": [("TIMEOUT", None)],
}

TEMPERROR_CASES: list[tuple[str, str, str, bool, bool]] = [
    # id, From, temperror_action, seen its record before the outage, deferred
    ("never-seen-default", "a@temp.example", "defer_reject", False, False),  # control
    ("never-seen-defer", "a@temp.example", "defer", False, True),
    ("seen-reject-default", "a@seen.example", "defer_reject", True, True),
    ("seen-quarantine-default", "a@seenq.example", "defer_reject", True, False),  # control
    ("seen-reject-accept", "a@seen.example", "accept", True, False),  # control
    ("np-lookup-fails-reject-record", "a@sub.np.example", "defer_reject", False, True),
]


@pytest.mark.parametrize("case", TEMPERROR_CASES, ids=[c[0] for c in TEMPERROR_CASES])
async def test_temperror_action(case: tuple[str, str, str, bool, bool]) -> None:
    _, frm, how, seen, deferred = case
    with DNSServer(TEMP_ZONE) as srv:
        rt = runtime(srv, temperror_action=how)
        if seen:
            before = await run(rt, frm)
            assert before.result.result == "fail"
            domain = frm.split("@")[1]
            srv.set_zone({**TEMP_ZONE, f"_dmarc.{domain}": [("TIMEOUT", None)]})
        out = await run(rt, frm)
    assert out.result.result == "temperror"
    assert [s.name for s in out.check.symbols] == ["DMARC_TEMPERROR"]
    d = out.check.decision
    assert (d is not None) is deferred
    if d is not None:
        assert (d.action, d.code, d.enhanced) == (Action.DEFER, 451, "4.7.5")
        assert frm.split("@")[1] in d.text and out.action == "defer"
