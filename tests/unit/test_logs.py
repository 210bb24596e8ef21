"""Log values: quoted exactly when the documented pattern says so."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mxguard import logs


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
