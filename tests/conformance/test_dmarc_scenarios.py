"""authheaders' DMARC scenarios (tests/data/dmarc/authheaders/scenarios.yaml)
through the loopback DNS server and :func:`mxguard.auth.dmarc.evaluate`.

The scenario answers are one implementation's (authheaders 0.16.3), not RFC
text. Every case runs under both ``rfc`` modes (RFC 9989, the default, and
RFC 7489); where the RFC of that mode says otherwise we follow the RFC and
write the reason in :data:`RFC_OVERRIDES`. Mapping of the fixture's DNS notation to the zone:

* a string: a TXT record; ``"@file X"``: the TXT record read from file X;
* ``""``: the name exists without TXT records (NOERROR, NODATA);
* ``null``: the name does not exist (not in the zone: NXDOMAIN);
* ``sub2.example.biz: "host.example.biz"`` is "a name that exists": served as
  an MX record pointing there (RFC 9091 §2.1 counts A, AAAA and MX).

DKIM: where a case lists the ``dkim`` check, the message's signature is
verified with dkimpy used as a test oracle (the key from the fixture); where a
case gives ``prior_ar``, its ``dkim=`` results are the DKIM input. SPF is not
part of any scenario (input: none).

``authheaders`` reasons map onto ours: "Used From Domain Record" = the record
was found at the From domain; "Used Org Domain Record" = at the
organizational domain; "Used Tree Walk, org one level below PSD" = a psd=y
record, the organizational domain one label below its name.

``test_scenario_count`` prints ``DMARC scenarios: N/N``.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from email.parser import BytesHeaderParser
from typing import Any

import dkim
import pytest
import yaml

from mxguard.auth.dmarc import DkimAuth, DmarcResult, OrgDomains, evaluate
from mxguard.config import DnsConfig
from mxguard.dns import Resolver
from mxguard.testing.dns import DNSServer, Zone
from tests.support import DATA

AUTHHEADERS = DATA / "dmarc" / "authheaders"
PSL_FILE = str(DATA / "psl" / "public_suffix_list.dat")
SPEC: dict[str, Any] = yaml.safe_load((AUTHHEADERS / "scenarios.yaml").read_text())
CASES: list[dict[str, Any]] = SPEC["cases"]

# Where we follow the RFC instead of authheaders' answer:
# rfc mode -> message -> (expect, why).
RFC_OVERRIDES: dict[str, dict[str, tuple[dict[str, str], str]]] = {"9989": {
    "test_nop.message": (
        {"dmarc": "fail", "policy": "none"},
        "RFC 9989 §4.7: a record without p= is read as p=none, so the record at "
        "nop.example.org applies (monitoring): the unaligned message fails with policy "
        "none. authheaders (and RFC 7489 §6.6.3 step 6, no rua=) ignore the record.",
    ),
}, "7489": {
    "test.gov.message": (
        {"dmarc": "none", "header_from": "example.gov", "policy": "none"},
        "authheaders runs the DMARCbis tree walk (opt-in `dmarcbis`), which treats "
        "_dmarc.gov's psd=y as a public-suffix-domain policy. Under RFC 7489 §3.2 the "
        "organizational domain of example.gov is example.gov itself (gov is a public "
        "suffix), _dmarc.example.gov has no record, so no policy is found: dmarc=none. "
        "RFC 9091's PSD lookup needs an out-of-band list of participating PSDs; we "
        "implement only its np= tag. (RFC 9989 mode follows authheaders here.)",
    ),
}}
RFCS = ("9989", "7489")


def _txt(value: str) -> str:
    if value.startswith("@file "):
        return "".join((AUTHHEADERS / value[6:]).read_text().split("\n")).strip()
    return value


def build_zone(dns: dict[str, Any]) -> Zone:
    zone: Zone = {}
    for name, value in dns.items():
        name = name.rstrip(".")
        if value is None:
            continue  # NXDOMAIN
        if value == "":
            zone[name] = []  # exists, no TXT (NODATA)
        elif name == "sub2.example.biz":
            zone[name] = [("MX", (10, value))]
        else:
            zone[name] = [("TXT", _txt(value))]
    return zone


ZONE = build_zone(SPEC["dns"])
ORG = OrgDomains(PSL_FILE)


@pytest.fixture(scope="module")
def dns() -> Iterator[DNSServer]:
    with DNSServer(ZONE) as srv:
        yield srv


def _dkim_dns(name: Any, timeout: float = 5) -> bytes:
    key = (name.decode() if isinstance(name, bytes) else name).rstrip(".").lower()
    for rtype, value in ZONE.get(key, []):
        if rtype == "TXT":
            return str(value).encode()
    return b""


def dkim_by_oracle(raw: bytes) -> list[DkimAuth]:
    verifier = dkim.DKIM(raw)
    ok = verifier.verify(dnsfunc=_dkim_dns)
    domain = (verifier.domain or b"").decode()
    return [DkimAuth("pass" if ok else "fail", domain)]


_RESINFO = re.compile(r"dkim=(\w+)[^;]*?header\.d=([^\s;]+)")


def dkim_from_ar(ar: str) -> list[DkimAuth]:
    return [DkimAuth(r, d) for r, d in _RESINFO.findall(ar)]


def from_values(raw: bytes) -> list[str]:
    msg = BytesHeaderParser().parsebytes(raw)
    return [str(v) for v in msg.get_all("From", [])]


def expected(case: dict[str, Any], rfc: str) -> dict[str, str]:
    if case["message"] in RFC_OVERRIDES[rfc]:
        return RFC_OVERRIDES[rfc][case["message"]][0]
    return {k: str(v) for k, v in case["expect"].items()}


async def run_case(case: dict[str, Any], dns: DNSServer,
                   rfc: str) -> tuple[DmarcResult, list[DkimAuth]]:
    raw = (AUTHHEADERS / case["message"]).read_bytes()
    sigs = dkim_by_oracle(raw) if "dkim" in case["checks"] else []
    if case.get("prior_ar"):
        sigs = dkim_from_ar(case["prior_ar"])
    resolver = Resolver(DnsConfig(nameservers=[dns.address], timeout=1.0, cache_size=0))
    res = await evaluate(resolver, from_values(raw), None, sigs, org=ORG,
                         sample=lambda pct: True, rfc=rfc)
    return res, sigs


def mismatches(case: dict[str, Any], res: DmarcResult, sigs: list[DkimAuth],
               rfc: str) -> list[str]:
    exp = expected(case, rfc)
    got = {"dmarc": res.result, "header_from": res.from_domain or "none",
           "policy": res.policy, "dkim": sigs[0].result if sigs else "none",
           "dkim_d": sigs[0].domain if sigs else "none"}
    reason = exp.get("dmarc_reason", "")
    if reason == "Used From Domain Record":
        got["dmarc_reason"] = reason if res.record_domain == res.from_domain else res.reason
    elif reason == "Used Org Domain Record":
        used_org = res.record_domain == res.org_domain != res.from_domain
        got["dmarc_reason"] = reason if used_org else res.reason
    elif reason == "Used Tree Walk, org one level below PSD":  # RFC 9989 §4.10.2
        below = res.record is not None and res.record.psd == "y" and \
            res.org_domain.partition(".")[2] == res.record_domain
        got["dmarc_reason"] = reason if below else res.reason
    return [f"{k}: expected {v!r}, got {got.get(k)!r}" for k, v in exp.items()
            if got.get(k) != v]


@pytest.mark.parametrize("rfc", RFCS)
@pytest.mark.parametrize("case", CASES, ids=[c["message"] for c in CASES])
async def test_scenario(case: dict[str, Any], dns: DNSServer, rfc: str) -> None:
    res, sigs = await run_case(case, dns, rfc)
    assert mismatches(case, res, sigs, rfc) == [], res


@pytest.mark.parametrize("rfc", RFCS)
async def test_scenario_count(dns: DNSServer, rfc: str) -> None:
    gate = asyncio.Semaphore(8)  # all at once can queue past the timeout on a busy machine

    async def one(case: dict[str, Any]) -> Any:
        async with gate:
            return await run_case(case, dns, rfc)

    results = await asyncio.gather(*(one(c) for c in CASES))
    good = sum(not mismatches(c, *r, rfc) for c, r in zip(CASES, results, strict=True))
    overridden = sum(c["message"] in RFC_OVERRIDES[rfc] for c in CASES)
    print(f"\nDMARC scenarios (RFC {rfc}): {good}/{len(CASES)} "
          f"({overridden} with an RFC {rfc} expectation instead of authheaders')")
    assert good == len(CASES)


def test_overrides_name_real_cases() -> None:
    """Control: every RFC override names a scenario, and differs from authheaders."""
    names = {c["message"]: c for c in CASES}
    for overrides in RFC_OVERRIDES.values():
        for message, (exp, why) in overrides.items():
            assert message in names and why
            assert exp["dmarc"] != names[message]["expect"]["dmarc"]
