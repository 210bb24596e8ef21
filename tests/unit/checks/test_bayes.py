"""checks/bayes.py: autolearn during Bayes' cold start (fewer than min_spam /
min_ham learned): only the clearest cases under ``cold_start = "strict"``, the
usual thresholds under ``"normal"``, nothing under ``"off"``; the log says so
once per interval, and once when Bayes is ready."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path

import pytest

from mxguard import config
from mxguard.checks import bayes as bayes_check
from mxguard.checks import run_message
from mxguard.checks.rules import RULES_SERVICE
from mxguard.config import BayesConfig, Config
from mxguard.content.bayes import Autolearn, BayesClassifier, BayesResult
from mxguard.content.rules import build_ruleset
from mxguard.core.runtime import Runtime
from mxguard.core.transaction import Symbol
from mxguard.dns import Resolver
from mxguard.server.milter_session import MilterSession
from mxguard.store.bayes_store import LearnItem, MemoryBayesStore

SPAM, HAM, NO = Autolearn(True, "spam"), Autolearn(False, "ham"), Autolearn(None, "no")
DMARC = Symbol("DMARC_PASS", -0.5)
SPF = Symbol("SPF_PASS", -0.5)
AGAINST = Symbol("HTML_ONLY", 0.4)


@pytest.mark.parametrize(("policy", "decision", "rest", "symbols", "want"), [
    # strict: spam only at autolearn_spam (12) + cold_start_margin (3)
    ("strict", SPAM, 15.0, [], True),
    ("strict", SPAM, 14.9, [], None),  # control: clear spam, not clear enough yet
    # strict: ham only with DMARC_PASS and nothing scoring against it
    ("strict", HAM, -1.0, [DMARC, SPF], False),
    ("strict", HAM, -0.1, [DMARC, SPF, AGAINST], None),  # control: one rule against it
    ("strict", HAM, -0.5, [SPF], None),  # control: no DMARC_PASS
    ("strict", NO, 5.0, [DMARC], None),  # nothing to learn stays so
    # normal: what autolearn_decision said
    ("normal", SPAM, 12.0, [], True),
    ("normal", HAM, 0.0, [], False),
    # off: nothing
    ("off", SPAM, 40.0, [], None),
    ("off", HAM, -1.0, [DMARC], None),
])
def test_cold_start_autolearn(policy: str, decision: Autolearn, rest: float,
                              symbols: list[Symbol], want: bool | None) -> None:
    cfg = BayesConfig(cold_start=policy)
    got = bayes_check.cold_start_autolearn(decision, rest=rest, symbols=symbols, cfg=cfg)
    assert got.spam is want
    if want is None and decision.spam is not None:
        assert got.status == "no" and got.reason.startswith("cold start")


def test_cold_start_margin_is_configurable() -> None:
    cfg = BayesConfig(cold_start_margin=0.0)
    assert bayes_check.cold_start_autolearn(SPAM, rest=12.0, symbols=[], cfg=cfg).spam is True
    cfg = BayesConfig(cold_start_margin=10.0)
    assert bayes_check.cold_start_autolearn(SPAM, rest=21.9, symbols=[], cfg=cfg).spam is None


# ------------------------------------------------------------ the log line


def test_cold_start_log_once_per_interval_then_ready(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    cold = bayes_check.ColdStartLog(interval=3600.0, clock=lambda: now[0])
    cfg = BayesConfig()
    with caplog.at_level(logging.INFO, logger="mxguard"):
        for t in (0.0, 10.0, 3599.0):  # one line for the first hour
            now[0] = t
            cold.note(False, 3, 40, cfg)
        assert len(caplog.records) == 1
        now[0] = 3600.0
        cold.note(False, 150, 200, cfg)  # the next hour: the next line
        cold.note(True, 200, 200, cfg)
        cold.note(True, 201, 200, cfg)  # "ready" is said once
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    assert lines[0].startswith("bayes: cold start: 3 of 200 spam and 40 of 200 ham learned")
    assert "only spam scoring >= 15 without Bayes and ham with DMARC_PASS" in lines[0]
    assert lines[1].startswith("bayes: cold start: 150 of 200 spam")
    assert lines[2].startswith("bayes: ready: 200 spam and 200 ham learned")


def test_cold_start_log_silent_when_ready_from_the_start(
        caplog: pytest.LogCaptureFixture) -> None:
    cold = bayes_check.ColdStartLog()
    with caplog.at_level(logging.INFO, logger="mxguard"):
        cold.note(True, 500, 500, BayesConfig())
    assert caplog.records == []


@pytest.mark.parametrize(("kw", "phrase"), [
    ({}, "only spam scoring >= 15"),
    ({"cold_start": "normal"}, "usual thresholds: spam >= 12, ham < 0.1"),
    ({"cold_start": "off"}, "learns nothing until then"),
    ({"autolearn": False}, "autolearn is off"),
])
def test_cold_start_policy_phrase(kw: dict[str, object], phrase: str) -> None:
    assert phrase in bayes_check.cold_start_policy(BayesConfig(**kw))  # type: ignore[arg-type]


# ------------------------------------------------------------ through the pipeline


def runtime(store: MemoryBayesStore, **bayes: object) -> Runtime:
    cfg = Config()
    cfg = dataclasses.replace(
        cfg, spf=dataclasses.replace(cfg.spf, mode="off"),
        dkim=dataclasses.replace(cfg.dkim, mode="off"),
        dmarc=dataclasses.replace(cfg.dmarc, mode="off"),
        bayes=dataclasses.replace(cfg.bayes, min_spam=2, min_ham=2, **bayes))
    clf = BayesClassifier(store, cfg.bayes)
    return Runtime(config=cfg, resolver=None,  # type: ignore[arg-type]
                   services={bayes_check.SERVICE: clf}, clock=lambda: 1704067200.0)


def ham(i: int) -> MilterSession:
    s = MilterSession()
    s.start_message("ann@example.com", [])
    for name, value in [("From", "Ann <ann@example.com>"), ("To", "bob@example.org"),
                        ("Subject", f"Lunch {i}"), ("Message-Id", f"<{i}@example.com>"),
                        ("Date", "Mon, 01 Jan 2024 00:00:00 +0000")]:
        s.add_header(name, value)
    s.add_body(b"Lunch at noon? The usual place, then the review of the minutes.\r\n")
    return s


async def scan(rt: Runtime, s: MilterSession) -> str:
    tx = s.transaction()
    tx.message = s.message()
    await run_message(tx, rt)
    while bayes_check._learning:
        await asyncio.sleep(0)
    return tx.results[bayes_check.AUTOLEARN].extra["autolearn"]


@pytest.mark.parametrize(("bayes", "learned", "status"), [
    ({}, 0, "no"),  # strict: no DMARC_PASS (DMARC is off here): not learned
    ({"cold_start": "normal"}, 1, "ham"),  # control: the usual threshold learns it
    ({"cold_start": "off"}, 0, "no"),
])
async def test_cold_start_in_the_pipeline(caplog: pytest.LogCaptureFixture,
                                          monkeypatch: pytest.MonkeyPatch,
                                          bayes: dict[str, object], learned: int,
                                          status: str) -> None:
    monkeypatch.setattr(bayes_check, "COLD_START_LOG", bayes_check.ColdStartLog())
    store = MemoryBayesStore()
    rt = runtime(store, **bayes)
    with caplog.at_level(logging.INFO, logger="mxguard"):
        assert await scan(rt, ham(1)) == status
        assert await scan(rt, ham(2)) == status
    assert (await store.stats()).nham == 2 * learned
    said = [r.getMessage() for r in caplog.records if "bayes: cold start" in r.getMessage()]
    assert len(said) == 1 and "0 of 2 spam" in said[0]  # once, not per message


async def test_ready_bayes_uses_the_usual_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bayes_check, "COLD_START_LOG", bayes_check.ColdStartLog())
    store = MemoryBayesStore()
    await store.learn([LearnItem(f"s{i}", [1000 + i], True) for i in range(2)]
                      + [LearnItem(f"h{i}", [2000 + i], False) for i in range(2)], 1)
    rt = runtime(store)  # strict, but Bayes is ready: the strict bar is not applied
    assert await scan(rt, ham(1)) == "ham"
    assert (await store.stats()).nham == 3


@pytest.mark.parametrize(("text", "needle"), [
    ('[bayes]\ncold_start = "lenient"\n', "bayes.cold_start' = 'lenient' is not allowed"),
    ("[bayes]\ncold_start_margin = -1\n", "bayes.cold_start_margin' = -1 is not allowed"),
    ('[bayes]\ncold_start = "off"\ncold_start_margin = 0\n', ""),  # control: loads
])
def test_cold_start_config(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    if not needle:
        assert config.load(str(path)).bayes.cold_start == "off"
        return
    with pytest.raises(config.ConfigError) as err:
        config.load(str(path))
    assert needle in str(err.value) and str(path) in str(err.value)


SA_SCORES = ("score BAYES_50 0 0 2.0 0.8\nscore BAYES_99 0 0 3.8 3.5\n"
             "score BAYES_999 0 0 0.2 0.2\n")


@pytest.mark.parametrize(("cf", "overrides", "want"), [
    # SpamAssassin's score lines loaded: its set 2 (Bayes, no network rules);
    # its BAYES_999 adds to BAYES_99 (both fire in SpamAssassin)
    (SA_SCORES, {}, {"BAYES_50": 2.0, "BAYES_99": 3.8, "BAYES_999": 4.0,
                    "BAYES_80": config.SYMBOL_SCORES["BAYES_80"]}),
    # [scores] wins over the rule files
    (SA_SCORES, {"BAYES_99": 3.0}, {"BAYES_99": 3.0, "BAYES_999": 4.0}),
    # control: rules without BAYES_* score lines keep the built-in defaults
    ("score SOME_RULE 1.0\n", {}, {"BAYES_99": config.SYMBOL_SCORES["BAYES_99"],
                                   "BAYES_999": config.SYMBOL_SCORES["BAYES_999"]}),
])
def test_bayes_scores_follow_the_loaded_rule_files(
        tmp_path: Path, cf: str, overrides: dict[str, float], want: dict[str, float]) -> None:
    (tmp_path / "50_scores.cf").write_text(cf)
    cfg = dataclasses.replace(Config(), scores=overrides)
    rt = Runtime(config=cfg, resolver=Resolver(cfg.dns),
                 services={RULES_SERVICE: build_ruleset([tmp_path])})
    scores = bayes_check.bayes_scores(rt)
    for name, value in want.items():
        result = BayesResult(True, 0.5, name, 10, 10, 300, 300)
        assert result.symbols(scores)[0].score == pytest.approx(value), name
