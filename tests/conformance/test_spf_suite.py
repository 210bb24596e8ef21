"""The openspf RFC 7208 and RFC 4408 test suites, through real DNS.

Each scenario's zonedata is served by the loopback DNS server
(:mod:`mxguard.testing.dns`, one server per scenario) and every case runs
:func:`mxguard.auth.spf.check_mailfrom` through a fresh
:class:`mxguard.dns.Resolver` (no cache shared between cases). ``TIMEOUT``
names really time out (resolver timeout ``RESOLVER_TIMEOUT``).

A case passes when the result is one of the suite's accepted results and,
where the suite gives an explanation, ours matches: ``DEFAULT`` means "not
taken from the domain's exp=", any other text must be equal (compared
without regard to case: RFC 7208 §7.4 writes the IPv6 nibbles of ``%{i}``
in lower case, the suite's ``v-macro-ip6`` expects upper case).

``test_suite_counts`` runs each whole suite concurrently and prints
``SPF rfc7208: N/203`` and ``SPF rfc4408: N/191``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from mxguard.auth.spf import SpfResult, check_mailfrom
from mxguard.config import DnsConfig
from mxguard.dns import Resolver
from mxguard.testing.dns import DNSServer
from tests.conformance.spf_zones import EXPECTED_COUNTS, SUITES, Case, Scenario, load_suite

RESOLVER_TIMEOUT = 0.4
SPF_TIMEOUT = 20.0
SUITE_CONCURRENCY = 8


SCENARIOS: dict[str, list[Scenario]] = {suite: load_suite(suite) for suite in SUITES}
CASES: list[Case] = [c for scs in SCENARIOS.values() for sc in scs for c in sc.cases]


def _case_id(case: Case) -> str:
    return case.id


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[tuple[str, int], DNSServer]]:
    """One running DNS server per scenario, serving its zonedata."""
    running: dict[tuple[str, int], DNSServer] = {}
    try:
        for suite, scenarios in SCENARIOS.items():
            for sc in scenarios:
                running[(suite, sc.index)] = DNSServer(sc.zone, ttl=300).start()
        yield running
    finally:
        for srv in running.values():
            srv.stop()


async def evaluate(case: Case, srv: DNSServer) -> SpfResult:
    resolver = Resolver(DnsConfig(nameservers=[srv.address], timeout=RESOLVER_TIMEOUT))
    return await check_mailfrom(resolver, case.host, case.mailfrom, case.helo,
                                receiver="receiver.test", timeout=SPF_TIMEOUT)


def mismatch(case: Case, res: SpfResult) -> str:
    """Why ``res`` does not satisfy ``case`` ("" when it does)."""
    if res.result not in case.results:
        return (f"result {res.result!r} not in {list(case.results)} "
                f"(problem: {res.problem or '-'}; mechanism: {res.mechanism or '-'})")
    if case.explanation is None or res.result != "fail":
        return ""
    if case.explanation == "DEFAULT":
        if res.explanation_from_domain:
            return f"explanation {res.explanation!r} should be the default"
        return ""
    if res.explanation.lower() != case.explanation.lower():
        return f"explanation {res.explanation!r} != {case.explanation!r}"
    return ""


@pytest.mark.parametrize("case", CASES, ids=_case_id)
async def test_case(case: Case, servers: dict[tuple[str, int], DNSServer]) -> None:
    res = await evaluate(case, servers[(case.suite, case.scenario)])
    problem = mismatch(case, res)
    assert not problem, f"{case.id}: {problem}\ntrace: {res.trace}"


async def _run_suite(suite: str, servers: dict[tuple[str, int], DNSServer]) -> list[str]:
    cases = [c for sc in SCENARIOS[suite] for c in sc.cases]
    # a few at a time: hundreds of lookups at once against the in-process DNS servers
    # ran past the short resolver timeout on a busy machine (temperror, not a bug)
    gate = asyncio.Semaphore(SUITE_CONCURRENCY)

    async def one(c: Case) -> SpfResult:
        async with gate:
            return await evaluate(c, servers[(suite, c.scenario)])

    results = await asyncio.gather(*(one(c) for c in cases))
    return [f"{c.id}: {why}" for c, r in zip(cases, results, strict=True)
            if (why := mismatch(c, r))]


async def test_suite_counts(servers: dict[tuple[str, int], DNSServer],
                            capsys: pytest.CaptureFixture[str]) -> None:
    """Run each whole suite at once and print how many cases pass."""
    failures: list[str] = []
    for suite in SUITES:
        total = sum(len(sc.cases) for sc in SCENARIOS[suite])
        assert total == EXPECTED_COUNTS[suite], f"{suite}: {total} cases loaded"
        failed = await _run_suite(suite, servers)
        with capsys.disabled():
            print(f"\nSPF {suite}: {total - len(failed)}/{total}")
        failures += failed
    assert not failures, "\n".join(failures)
