"""``[milter] explain_header``: X-Mxguard-Reason on incoming mail when enabled
(controls: off by default, not on outgoing mail), its wording, ASCII and folding,
and a forged one removed."""

from __future__ import annotations

import dataclasses
import io

import pytest

from mxguard.checks import PIPELINE, explain_header
from mxguard.config import Config, MilterConfig
from mxguard.core import runner
from mxguard.core.runner import CheckSpec, Pipeline
from mxguard.core.runtime import Runtime
from mxguard.core.transaction import (
    Action,
    CheckResult,
    HeaderChange,
    HeaderEdit,
    Message,
    Mode,
    Stage,
    Symbol,
    Transaction,
    Verdict,
)

ROW = next(r for r in PIPELINE.rows if r.name == explain_header.NAME)


def cfg(on: bool) -> Config:
    return dataclasses.replace(Config(), milter=dataclasses.replace(MilterConfig(),
                                                                     explain_header=on))


async def scores(tx: Transaction, rt: Runtime) -> CheckResult:
    return CheckResult("rules", [Symbol("BAYES_99", 5.0), Symbol("HTML_ONLY", 2.25),
                                 Symbol("SPF_PASS", 0.0)])


def tx(authenticated: bool = False, headers: list[tuple[str, str]] | None = None) -> Transaction:
    t = Transaction(sasl_username="u" if authenticated else "")
    t.message = Message(headers or [("Subject", " hi")], lambda: io.BytesIO(b""), 10)
    return t


PIPE = Pipeline(rows=(CheckSpec("rules", Stage.EOM, None, scores), ROW),
                outgoing=lambda t, c: t.authenticated, actions_mode="content")


@pytest.mark.parametrize(("on", "authenticated", "added"), [
    (True, False, True),
    (False, False, False),  # control: off (the default)
    (True, True, False),  # control: outgoing mail
])
async def test_header_only_when_enabled_on_incoming_mail(on: bool, authenticated: bool,
                                                         added: bool) -> None:
    runtime = Runtime(config=cfg(on), resolver=None)  # type: ignore[arg-type]
    verdict = await runner.run_message(tx(authenticated), runtime, PIPE)
    values = [h.value for h in verdict.headers
              if isinstance(h, HeaderEdit) and h.name == "X-Mxguard-Reason"]
    if not added:
        assert values == []
        return
    (value,) = values
    assert value.replace("\r\n\t", " ") == \
        "accept by actions; score 7.25; top symbols BAYES_99(5), HTML_ONLY(2.25)"


def test_row_is_off_by_default() -> None:
    assert ROW.mode(Config()) is Mode.OFF and ROW.mode(cfg(True)) is Mode.ENFORCE
    assert ROW.stage is Stage.DONE


def test_value_is_ascii_folded_and_bounded() -> None:
    v = Verdict(action=Action.REJECT, decided_by="dmarc", score=40.0,
                symbols=[Symbol(f"RULE_Ü_{i:02d}_" + "X" * 30, float(i + 1)) for i in range(30)])
    value = explain_header.reason_value(v)
    assert value.isascii() and value.startswith("reject by dmarc; score 40;")
    lines = value.split("\r\n\t")
    assert len(lines) > 1 and all(len(ln) <= 78 for ln in lines)
    assert value.count("RULE_") == explain_header.MAX_SYMBOLS  # the strongest only
    assert "RULE___29_" in value and "RULE___00_" not in value


def test_no_scored_symbols() -> None:
    value = explain_header.reason_value(Verdict(symbols=[Symbol("SPF_PASS", 0.0)]))
    assert value == "accept by actions; score 0; no scored symbols"


async def test_forged_header_is_removed() -> None:
    t = tx(headers=[("X-Mxguard-Reason", " accept by nobody"), ("x-mxguard-reason", " again"),
                    ("Subject", " hi")])
    t.verdict = Verdict()
    runtime = Runtime(config=cfg(True), resolver=None)  # type: ignore[arg-type]
    result = await explain_header.check(t, runtime)
    assert result is not None
    assert result.edits == [HeaderChange.delete("X-Mxguard-Reason", 2),
                            HeaderChange.delete("X-Mxguard-Reason", 1)]
    clean = tx()  # control: nothing to remove
    clean.verdict = Verdict()
    result = await explain_header.check(clean, runtime)
    assert result is not None and result.edits == []
