"""Log values: quoted exactly when the documented pattern says so."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mxguard import logs
from mxguard.core.transaction import Action, Stage, Symbol, Transaction, Verdict


@given(st.text())
def test_kv_quotes_exactly_what_the_pattern_names(value: str) -> None:
    quoted = logs.kv(value)
    if not value:
        assert quoted == "-"
    elif logs._NEEDS_QUOTES.search(value):
        assert quoted.startswith('"') and quoted.endswith('"')
    else:
        assert quoted == value  # control: a plain token stays as it is


def test_kv_examples() -> None:
    assert logs.kv("mail.example.org") == "mail.example.org"
    assert logs.kv("a b") == '"a b"'
    assert logs.kv("x=y") == '"x=y"'
    assert logs.kv("tab\there") == '"tab\there"'
    assert logs.kv("é") == '"é"'


def test_kv_memo_is_bounded_and_answers_alike() -> None:
    logs._KV.clear()
    for i in range(logs.KV_MEMO + 10):
        assert logs.kv(f"v{i} x") == f'"v{i} x"'
    assert len(logs._KV) <= logs.KV_MEMO
    long = "y" * (logs.KV_MEMO_LEN + 1)
    assert logs.kv(long) == long and long not in logs._KV  # a long value is not kept
    assert logs.kv("a b") == logs.kv("a b") == '"a b"'  # remembered: the same answer


def _reference_line(tx: Transaction, verdict: Verdict, action: str) -> str:
    """The decision line as documented (README "Logs"), field by field."""
    symbols = ",".join(f"{s.name}({s.score:g})" if s.score else s.name for s in verdict.symbols)
    parts = [f"action={logs._kv(verdict.action.value)}", f"reply={logs._kv(action)}",
             f"stage={tx.stage.name}",
             f"client={logs._kv(tx.client_address)}[{logs._kv(tx.client_name)}]",
             f"helo={logs._kv(tx.helo)}", f"sender={logs._kv(tx.sender or '<>')}",
             f"recipient={logs._kv(tx.recipient)}", f"queue_id={logs._kv(tx.queue_id)}",
             f"reason={logs._kv(';'.join(verdict.reasons))}", f"symbols={logs._kv(symbols)}",
             f"score={verdict.score:g}"]
    if tx.sasl_username:
        parts.append(f"sasl_username={logs._kv(tx.sasl_username)}")
    parts += [f"{k}={logs._kv(v)}" for k, v in verdict.extra.items()]
    if verdict.observed:
        parts.append(f"observe={logs._kv('; '.join(verdict.observed))}")
    if verdict.timings:
        parts.append("checks_ms=" + ",".join(f"{k}:{v:.2f}" for k, v in verdict.timings.items()))
    return " ".join(parts)


@pytest.mark.parametrize(("tx", "verdict", "action"), [
    (Transaction(client_address="192.0.2.1", helo="mail.example.org", sender="a@b.example",
                 recipients=["c@d.example"]),
     Verdict(action=Action.DEFER_IF_PERMIT, symbols=[Symbol("GREYLIST_DEFERRED", 0.0)],
             reasons=["greylist:new"], extra={"delay": "300"}, timings={"greylist": 0.0123}),
     "DEFER_IF_PERMIT 4.2.0 Greylisted"),
    (Transaction(client_address="", helo="", sender="", sasl_username="u s",
                 stage=Stage.HELO),
     Verdict(symbols=[Symbol("SPF_PASS", -0.5), Symbol("X", 1.25)], score=0.75,
             observed=["helo:504 no"], reasons=["a:b", "c:d"]), "DUNNO"),
    (Transaction(client_address="198.51.100.9", client_name='we"ird', helo="x=y"),
     Verdict(), ""),  # control: quoting in every field
])
def test_decision_line_is_the_documented_one(tx: Transaction, verdict: Verdict,
                                             action: str) -> None:
    for _ in range(2):  # the second time from the memo
        assert logs.decision_line(tx, verdict, action) == _reference_line(tx, verdict, action)
