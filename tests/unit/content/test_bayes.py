"""Bayes classifier: Robinson probabilities, chi-square combining, learn/forget,
the min-learned threshold, symbols, autolearn, maintenance.

The tests that learn and classify run on every store (``stores``: in memory,
SQLite, Redis on a loopback redis-server -- tests/support/redis.py)."""

from __future__ import annotations

import itertools
import math
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from mxguard.config import BayesConfig
from mxguard.content import bayes
from mxguard.content.bayes import (
    BAYES_SCORES,
    BayesClassifier,
    BayesParams,
    autolearn_decision,
    chi2_survival,
    combine,
    message_key,
    message_key_of,
    symbol_for,
    token_probability,
)
from mxguard.content.mime import parse_message
from mxguard.store.bayes_store import (
    BayesStore,
    MemoryBayesStore,
    SqliteBayesStore,
    token_hash,
)
from tests.support.redis import shared_server

T0 = 1_795_000_000.0
SPAM_WORDS = ["viagra", "cheap", "winner", "prize", "unsubscribe", "offer"]
HAM_WORDS = ["meeting", "patch", "kernel", "review", "lunch", "thanks"]


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


StoreFactory = Callable[[], BayesStore]


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def stores(request: pytest.FixtureRequest, tmp_path: Path
                 ) -> AsyncIterator[StoreFactory]:
    """Makes empty, independent stores of one backend; closes them after the test."""
    made: list[BayesStore] = []
    numbers = itertools.count()
    url = ""
    if request.param == "redis":
        server = shared_server()
        server.flush()
        url = server.url(0)

    def make() -> BayesStore:
        n = next(numbers)
        s: BayesStore
        if request.param == "redis":
            from mxguard.store.redis_bayes import RedisBayesStore

            s = RedisBayesStore(url, timeout=5.0, prefix=f"t{n}:")
        elif request.param == "sqlite":
            s = SqliteBayesStore(str(tmp_path / f"bayes{n}.db"))
        else:
            s = MemoryBayesStore()
        made.append(s)
        return s

    yield make
    for s in made:
        await s.close()


def classifier(stores: StoreFactory, min_spam: int = 3, min_ham: int = 3,
               **kw: object) -> BayesClassifier:
    cfg = BayesConfig(min_spam=min_spam, min_ham=min_ham, **kw)  # type: ignore[arg-type]
    return BayesClassifier(stores(), cfg, clock=Clock())


async def trained(stores: StoreFactory, n: int = 10) -> BayesClassifier:
    c = classifier(stores)
    for i in range(n):
        await c.learn(f"s{i}", [*SPAM_WORDS, f"uniq-s{i}", "common"], True)
        await c.learn(f"h{i}", [*HAM_WORDS, f"uniq-h{i}", "common"], False)
    return c


# ------------------------------------------------------------ the maths


@pytest.mark.parametrize(("spam", "ham", "nspam", "nham", "lo", "hi"), [
    (0, 0, 10, 10, 0.5, 0.5),  # unknown: x
    (10, 0, 10, 10, 0.95, 1.0),  # only in spam
    (0, 10, 10, 10, 0.0, 0.05),  # only in ham
    (5, 5, 10, 10, 0.5, 0.5),  # equally common
    (1, 0, 10, 10, 0.6, 0.95),  # one sighting: pulled toward x by s
    (5, 5, 10, 100, 0.85, 0.95),  # same count, but ham is 10x as frequent
])
def test_token_probability(spam: int, ham: int, nspam: int, nham: int, lo: float,
                           hi: float) -> None:
    assert lo <= token_probability(spam, ham, nspam, nham) <= hi


def test_more_evidence_means_stronger_probability() -> None:
    p1 = token_probability(1, 0, 100, 100)
    p10 = token_probability(10, 0, 100, 100)
    assert 0.5 < p1 < p10 < 1


def test_robinson_formula() -> None:
    params = BayesParams(s=0.4, x=0.5)
    # p = (2/10) / (2/10 + 1/20) = 0.8 ; f = (0.4*0.5 + 3*0.8) / (0.4 + 3)
    assert token_probability(2, 1, 10, 20, params) == pytest.approx((0.2 + 2.4) / 3.4)


@pytest.mark.parametrize(("x2", "dof", "expected"), [
    (0.0, 2, 1.0),
    (2.0, 2, math.exp(-1)),  # dof 2: survival is e^(-x/2)
    (10.0, 4, math.exp(-5) * (1 + 5)),
    (5000.0, 300, 0.0),  # far tail: no underflow error, just ~0
])
def test_chi2_survival(x2: float, dof: int, expected: float) -> None:
    assert chi2_survival(x2, dof) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("probs", "lo", "hi"), [
    ([], 0.5, 0.5),  # no evidence
    ([0.99] * 20, 0.99, 1.0),
    ([0.01] * 20, 0.0, 0.01),
    ([0.99] * 10 + [0.01] * 10, 0.4, 0.6),  # contradictory: unsure
    ([0.6] * 3, 0.5, 0.9),
])
def test_combine(probs: list[float], lo: float, hi: float) -> None:
    assert lo <= combine(probs) <= hi


def test_combine_extremes_do_not_crash() -> None:
    assert 0.99 < combine([1.0] * 150) <= 1.0
    assert 0.0 <= combine([0.0] * 150) < 0.01


@pytest.mark.parametrize(("prob", "name"), [
    (0.0, "BAYES_00"), (0.0099, "BAYES_00"), (0.01, "BAYES_05"), (0.1, "BAYES_20"),
    (0.3, "BAYES_40"), (0.5, "BAYES_50"), (0.7, "BAYES_60"), (0.9, "BAYES_80"),
    (0.97, "BAYES_95"), (0.995, "BAYES_99"), (0.9995, "BAYES_999"), (1.0, "BAYES_999"),
])
def test_symbol_ranges(prob: float, name: str) -> None:
    assert symbol_for(prob) == name
    assert name in BAYES_SCORES and name in bayes.BAYES_DESCRIPTIONS


def test_scores_are_monotonic() -> None:
    scores = [BAYES_SCORES[name] for _, name in bayes.RANGES]
    assert scores == sorted(scores)
    assert scores[0] < 0 < scores[-1]


# ------------------------------------------------------------ classify


async def test_spammy_high_hammy_low_unknown_half(stores: StoreFactory) -> None:
    c = await trained(stores)
    spam = await c.classify(["cheap", "winner", "prize", "offer", "brand-new-token"])
    ham = await c.classify(["meeting", "patch", "review", "thanks"])
    unknown = await c.classify(["never", "seen", "before"])
    assert spam.ready and spam.prob > 0.99 and spam.symbol in ("BAYES_99", "BAYES_999")
    assert ham.prob < 0.01 and ham.symbol == "BAYES_00"
    assert unknown.prob == 0.5 and unknown.used == 0 and unknown.symbol == "BAYES_50"
    assert spam.used == 4  # the unknown token is not significant


async def test_neutral_tokens_are_ignored(stores: StoreFactory) -> None:
    c = await trained(stores)
    r = await c.classify(["common"])  # in every message: p = 0.5
    assert r.used == 0 and r.prob == 0.5


async def test_at_most_max_tokens_combined(stores: StoreFactory) -> None:
    c = await trained(stores)
    c.params = BayesParams(max_tokens=2)
    r = await c.classify([*SPAM_WORDS, *HAM_WORDS])
    assert r.used == 2


@pytest.mark.parametrize(("nspam", "nham", "ready"), [
    (2, 5, False), (5, 2, False), (3, 3, True), (0, 0, False),
])
async def test_min_learned_before_scoring(stores: StoreFactory, nspam: int, nham: int,
                                          ready: bool) -> None:
    c = classifier(stores, min_spam=3, min_ham=3)
    for i in range(nspam):
        await c.learn(f"s{i}", SPAM_WORDS, True)
    for i in range(nham):
        await c.learn(f"h{i}", HAM_WORDS, False)
    r = await c.classify(SPAM_WORDS)
    assert r.ready is ready
    if not ready:
        assert r.symbol == "" and r.prob == 0.5


def test_default_threshold_is_200_each() -> None:
    assert (BayesConfig().min_spam, BayesConfig().min_ham) == (200, 200)


# ------------------------------------------------------------ learn / forget


async def test_learn_is_idempotent_and_forget_undoes(stores: StoreFactory) -> None:
    c = await trained(stores)
    before = await c.classify(["cheap"])
    assert await c.learn("extra", ["cheap", "meeting"], False) == "learned"
    assert await c.learn("extra", ["cheap", "meeting"], False) == "known"
    st = await c.stats()
    assert st.nham == 11
    assert await c.forget("extra", ["cheap", "meeting"]) == "forgotten"
    assert await c.forget("extra", ["cheap", "meeting"]) == "unknown"
    after = await c.classify(["cheap"])
    assert after.prob == pytest.approx(before.prob)
    assert (await c.stats()).nham == 10


async def test_relearn_moves_message(stores: StoreFactory) -> None:
    c = await trained(stores)
    await c.learn("m", ["oddword"], True)
    assert await c.learn("m", ["oddword"], False) == "relearned"
    st = await c.stats()
    assert (st.nspam, st.nham) == (10, 11)


def test_message_key() -> None:
    body = b"Hello\r\nworld  \r\n\r\n"
    assert message_key("<a@b>", body) == message_key("<a@b>", b"Hello\nworld\n")
    assert message_key("<a@b>", body) != message_key("<c@d>", body)
    assert message_key("", body) != message_key("", b"Hello\nthere\n")
    raw1 = b"Received: from x\r\nMessage-ID: <k@example>\r\nSubject: s\r\n\r\nbody\r\n"
    raw2 = b"X-Spam-Flag: YES\nMessage-ID: <k@example>\nSubject: s\n\nbody\n"
    # a delivered copy (more headers, other line ends) has the same key
    assert message_key_of(parse_message(raw1)) == message_key_of(parse_message(raw2))


# ------------------------------------------------------------ autolearn


@pytest.mark.parametrize(("score", "bayes_score", "prob", "spam", "status"), [
    (14.0, 0.0, None, True, "spam"),
    (15.0, 4.0, 0.999, False, "no"),  # 11 without Bayes: below 12, Bayes does not count
    (16.5, 4.0, 0.999, True, "spam"),
    (0.0, 0.0, None, False, "ham"),
    (-1.9, -1.9, 0.001, False, "ham"),
    (2.0, -1.9, 0.001, None, "no"),  # 3.9 without Bayes: neither
    (13.0, -1.0, 0.01, None, "no"),  # Bayes strongly disagrees: a human should judge
    (-1.0, 0.0, 0.99, None, "no"),
])
def test_autolearn_decision(score: float, bayes_score: float, prob: float | None,
                            spam: bool | None, status: str) -> None:
    d = autolearn_decision(score, bayes_score, BayesConfig(), bayes_prob=prob)
    assert d.status == status
    if status in ("spam", "ham"):
        assert d.spam is spam
    else:
        assert d.spam is None


@pytest.mark.parametrize("kw", [{"autolearn": False}, {"enabled": False}])
def test_autolearn_disabled(kw: dict[str, bool]) -> None:
    d = autolearn_decision(30.0, 0.0, BayesConfig(**kw))  # type: ignore[arg-type]
    assert (d.spam, d.status) == (None, "disabled")


# ------------------------------------------------------------ maintenance


async def test_touch_is_batched_and_expiry_runs_in_batches(
        stores: StoreFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    c = await trained(stores)
    clock = c.clock
    assert isinstance(clock, Clock)
    clock.now = T0 + 2 * 86400
    await c.classify(["cheap"])
    store = c.store
    cheap = token_hash("cheap")

    async def atime() -> int:
        return (await store.lookup([cheap])).counts[cheap][2]

    assert await atime() == int(T0)  # not yet written
    assert await c.maintenance() == 0
    assert await atime() == int(T0 + 2 * 86400)
    # expiry: only "cheap" is recent; a ttl of one day removes the rest, batch by batch
    c.cfg = BayesConfig(min_spam=3, min_ham=3, token_ttl=86400)
    monkeypatch.setattr(bayes, "EXPIRE_BATCH", 5)
    assert await c.maintenance() == 0  # rate-limited: ran less than a minute ago
    assert await c.maintenance(force=True) == 5
    while await c.maintenance(force=True):
        pass
    learned = [*SPAM_WORDS, *HAM_WORDS, "common", *(f"uniq-{k}{i}" for k in "sh"
                                                   for i in range(10))]
    assert list((await store.lookup([token_hash(t) for t in learned])).counts) == [cheap]
    assert (await store.stats()).tokens == 1


async def test_result_symbols_with_overrides(stores: StoreFactory) -> None:
    c = await trained(stores)
    r = await c.classify(["cheap", "winner", "prize", "offer"])
    (sym,) = r.symbols()
    assert sym.name == r.symbol and sym.score == BAYES_SCORES[r.symbol]
    assert "prob=" in sym.detail
    (over,) = r.symbols({r.symbol: 0.25})
    assert over.score == 0.25
    not_ready = await classifier(stores, min_spam=1000).classify(["cheap"])
    assert not_ready.symbols() == []  # control: nothing before min_spam / min_ham
