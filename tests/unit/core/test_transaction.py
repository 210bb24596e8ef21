"""Transaction: the client address is parsed once and shared, bounded."""

from __future__ import annotations

from mxguard.core import transaction as t


def test_client_address_parse_is_shared_and_bounded() -> None:
    a = t.Transaction(client_address="192.0.2.7").client_ip
    assert a is t.Transaction(client_address="192.0.2.7").client_ip  # one parse, shared
    assert str(t.Transaction(client_address="::ffff:192.0.2.8").client_ip) == "192.0.2.8"
    before = t._parse_ip.cache_info().currsize
    assert t.Transaction(client_address="x" * 200).client_ip is None
    assert t._parse_ip.cache_info().currsize == before  # long junk is not remembered
    assert t._parse_ip.cache_info().maxsize == 8192
