"""Body evals: the upper-case share counted with bytes.translate (ASCII) agrees with
the Unicode regex count it replaced, on ASCII and on non-ASCII text."""

from __future__ import annotations

import pytest

from mxguard.content.evals.body import _LETTER, _UPPER_LETTER, uppercase_ratio


def by_regex(body: str) -> float:
    letters = _LETTER.subn("", body)[1]
    return 0.0 if letters < 200 else 100.0 * _UPPER_LETTER.subn("", body)[1] / letters


@pytest.mark.parametrize("body, expected", [
    ("BUY NOW CHEAP PILLS!!! " * 40, 100.0),
    ("Hello there, see you at lunch tomorrow. " * 20, None),  # control: low share
    ("Short TEXT", 0.0),  # control: under 200 letters
    ("ÜBER GRÖSSE Ärger ÇA " * 30, None),  # non-ASCII: the regex path
    ("digits 1234567890 and_underscores___ ABC " * 20, None),
])
def test_uppercase_ratio_matches_the_regex_count(body: str, expected: float | None) -> None:
    got = uppercase_ratio(body)
    assert got == pytest.approx(by_regex(body))
    if expected is not None:
        assert got == pytest.approx(expected)
    if "lunch" in body:
        assert got < 5.0
