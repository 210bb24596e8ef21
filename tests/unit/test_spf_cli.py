"""``mxguard spf check`` and ``mxguard spf lint`` through click's CliRunner.

A loopback DNS server serves the zones; the config file's ``[dns]
nameservers`` points both commands at it. Each case has a control.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from mxguard.cli.spf import spf
from mxguard.testing.dns import DNSServer, Zone
from mxguard.testing.ports import free_port

_RUNNER_KW: dict[str, Any] = ({"mix_stderr": False}
                              if "mix_stderr" in inspect.signature(CliRunner.__init__).parameters
                              else {})

MX_IP = "192.0.2.25"
OTHER_IP = "203.0.113.9"

ZONE: Zone = {
    "example.com": [("TXT", "v=spf1 mx -all exp=why.example.com"),
                    ("TXT", "google-site-verification=abc"), ("MX", (10, "mx.example.com"))],
    "why.example.com": [("TXT", "%{i} is not one of %{d}'s mail servers")],
    "mx.example.com": [("A", MX_IP), ("TXT", "v=spf1 a -all")],
    "soft.example": [("TXT", "v=spf1 ip4:192.0.2.0/24 ~all")],
    "none.example": [("A", MX_IP), ("MX", (10, "mx.example.com"))],
    "two.example": [("TXT", "v=spf1 -all"), ("TXT", "v=spf1 mx -all")],
    "almost.example": [("TXT", "v=spf1mx -all"), ("MX", (10, "mx.example.com"))],
    "syntax.example": [("TXT", "v=spf1 ipv4:192.0.2.1 a/33 include:%{z}.x.example "
                               "colour=blue ip4:192.0.2.1 +all")],
    "dupe.example": [("TXT", "v=spf1 redirect=a.example redirect=b.example")],
    "many.example": [("TXT", "v=spf1 " + " ".join(f"include:p{i}.example" for i in range(4))
                             + " -all")],
    "nine.example": [("TXT", "v=spf1 include:p0.example include:p1.example include:p2.example "
                             "a -all"), ("A", MX_IP)],
    "void.example": [("TXT", "v=spf1 a:nx1.example a:nx2.example a:nx3.example mx -all"),
                     ("MX", (10, "mx.example.com"))],
    "void1.example": [("TXT", "v=spf1 a:nx1.example a:mx.example.com -all")],
    "loop.example": [("TXT", "v=spf1 include:loop2.example -all")],
    "loop2.example": [("TXT", "v=spf1 redirect=loop.example")],
    "badinc.example": [("TXT", "v=spf1 include:nospf.example include:broken.example -all")],
    "nospf.example": [("A", MX_IP)],
    "broken.example": [("TXT", "v=spf1 ip4:1.2.3.4/40 -all")],
    "ptr.example": [("TXT", "v=spf1 ptr -all ip4:192.0.2.1")],
    "open.example": [("TXT", "v=spf1 +all")],
    "neutral.example": [("TXT", "v=spf1 mx")],
    "redir.example": [("TXT", "v=spf1 redirect=example.com")],
    "xn--bcher-kva.example": [("TXT", "v=spf1 mx -all"), ("MX", (10, "mx.example.com"))],
    "slow.example": [("TIMEOUT", None)],
}
for _i in range(4):
    ZONE[f"p{_i}.example"] = [("TXT", "v=spf1 a mx -all"), ("A", "198.51.100.1"),
                              ("MX", (1, "mx.example.com"))]


@pytest.fixture(scope="module")
def dns() -> Iterator[DNSServer]:
    with DNSServer(ZONE) as srv:
        yield srv


@pytest.fixture
def conf(tmp_path: Path, dns: DNSServer) -> Path:
    path = tmp_path / "mxguard.toml"
    path.write_text(f'[dns]\nnameservers = ["{dns.address}"]\ntimeout = 0.5\n'
                    "[spf]\ntimeout = 3\n")
    return path


def run(conf: Path, *args: str) -> Result:
    result = CliRunner(**_RUNNER_KW).invoke(spf, [*args, "--config", str(conf)],
                                            prog_name="mxguard spf")
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        result.exception)
    return result


def fields(output: str) -> dict[str, str]:
    out = {}
    for line in output.splitlines():
        key, sep, value = line.partition(":")
        if sep and not line.startswith(" "):
            out.setdefault(key, value.strip())
    return out


# ------------------------------------------------------------------ check


def test_check_pass(conf: Path) -> None:
    r = run(conf, "check", "--ip", MX_IP, "--sender", "alice@example.com",
            "--helo", "mx.example.com")
    assert r.exit_code == 0, r.output
    f = fields(r.stdout)
    assert (f["result"], f["domain"], f["mechanism"]) == ("pass", "example.com", "mx")
    assert f["reply"].startswith("accept (symbol SPF_PASS")
    assert f["header"].startswith("Received-SPF: pass (")
    assert f["helo identity"].startswith("pass for 'mx.example.com' (mechanism a)")
    assert "trace" not in r.stdout  # only with --trace


def test_check_fail_with_explanation_and_trace(conf: Path) -> None:
    r = run(conf, "check", "--ip", OTHER_IP, "--sender", "alice@example.com",
            "--helo", "mail.example.org", "--trace")
    assert r.exit_code == 0, r.output  # a fail is a result, not an error
    f = fields(r.stdout)
    assert (f["result"], f["mechanism"]) == ("fail", "-all")
    assert f["explanation"] == (f"{OTHER_IP} is not one of example.com's mail servers "
                                "(from the domain's exp=)")
    assert f["reply"] == (f"550 5.7.23 SPF fail - not authorized: {OTHER_IP} is not one of "
                          "example.com's mail servers")
    trace = r.stdout.split("trace (mail from):\n", 1)[1].splitlines()
    assert trace[0].startswith("   1. TXT example.com: v=spf1 mx -all exp=why.example.com")
    assert trace[1:] == [
        "   2. MX example.com: (10, 'mx.example.com')",
        f"   3. A mx.example.com: {MX_IP}",
        "   4. TXT why.example.com: %{i} is not one of %{d}'s mail servers",
    ]
    assert "trace (helo identity):\n   1. TXT mail.example.org: NXDOMAIN" in r.stdout


@pytest.mark.parametrize(("sender", "result"), [
    ("bob@soft.example", "softfail"),
    ("bob@none.example", "none"),
    ("bob@neutral.example", "neutral"),
    ("bob@syntax.example", "permerror"),
    ("bob@bücher.example", "fail"),  # IDN: checked under its A-label
    ("bob@slow.example", "temperror"),
])
def test_check_other_results_exit_0(conf: Path, sender: str, result: str) -> None:
    r = run(conf, "check", "--ip", OTHER_IP, "--sender", sender)
    assert r.exit_code == 0, r.output
    assert fields(r.stdout)["result"] == result


def test_check_json(conf: Path) -> None:
    r = run(conf, "check", "--ip", OTHER_IP, "--sender", "<alice@example.com>", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["result"] == "fail" and doc["sender"] == "alice@example.com"
    assert doc["explanation_from_domain"] is True and doc["mechanism"] == "-all"
    assert doc["reply"].startswith("550 5.7.23 ") and doc["helo_result"] is None
    assert doc["received_spf"].startswith("fail (")
    assert "trace" not in doc  # control: the trace only with --trace
    r = run(conf, "check", "--ip", OTHER_IP, "--sender", "alice@example.com", "--json",
            "--trace", "--helo", "mx.example.com")
    doc = json.loads(r.stdout)
    assert doc["trace"][0].startswith("TXT example.com: v=spf1 mx -all exp=why.example.com")
    assert doc["helo_result"]["result"] == "fail"
    assert doc["helo_result"]["identity"] == "helo"


def test_null_sender_is_postmaster_at_helo(conf: Path) -> None:
    r = run(conf, "check", "--ip", MX_IP, "--sender", "<>", "--helo", "mx.example.com")
    assert r.exit_code == 0, r.output
    f = fields(r.stdout)
    assert f["result"] == "pass"
    assert f["identity"] == "mailfrom (postmaster@mx.example.com)"
    r = run(conf, "check", "--ip", MX_IP, "--sender", "")  # control: no HELO to check
    assert r.exit_code == 2 and "give --helo" in r.stderr


@pytest.mark.parametrize("args", [
    ["--ip", "192.0.2.300", "--sender", "a@example.com"],
    ["--ip", "example.com", "--sender", "a@example.com"],
    ["--sender", "a@example.com"],  # --ip missing
    ["--ip", MX_IP],  # --sender missing
    ["--ip", MX_IP, "--sender", "a@example.com", "--bogus"],
])
def test_check_bad_arguments_exit_2(conf: Path, args: list[str]) -> None:
    r = run(conf, "check", *args)
    assert r.exit_code == 2, r.output
    r = run(conf, "check", "--ip", MX_IP, "--sender", "a@example.com")  # control
    assert r.exit_code == 0


def test_bad_config_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[dns]\nnameservers = ["not-an-ip"]\n')
    r = run(bad, "check", "--ip", MX_IP, "--sender", "a@example.com")
    assert r.exit_code == 2 and "config error" in r.stderr
    r = run(bad, "lint", "example.com")
    assert r.exit_code == 2 and "config error" in r.stderr


def test_dns_down_is_a_temperror_not_an_error(tmp_path: Path) -> None:
    conf = tmp_path / "down.toml"
    conf.write_text(f'[dns]\nnameservers = ["127.0.0.1:{free_port()}"]\ntimeout = 0.3\n')
    r = run(conf, "check", "--ip", MX_IP, "--sender", "a@example.com")
    assert r.exit_code == 0 and fields(r.stdout)["result"] == "temperror"


# ------------------------------------------------------------------ lint


def lines(r: Result, level: str) -> list[str]:
    return [ln[6:] for ln in r.stdout.splitlines() if ln.startswith(level + " ")]


def test_lint_good_record(conf: Path) -> None:
    r = run(conf, "lint", "example.com", "--ip", MX_IP)
    assert r.exit_code == 0, r.output
    assert lines(r, "FAIL") == [] and lines(r, "WARN") == []
    assert lines(r, "PASS") == [
        "one SPF record found: v=spf1 mx -all exp=why.example.com",
        "syntax: 3 terms, no errors",
        "-all: mail from other hosts fails SPF",
        "DNS-querying terms (through include/redirect): 1 of 10",
        "void lookups: 0 of 2",
        f"{MX_IP} passes (mechanism mx)",
    ]
    assert '  example.com. IN TXT "v=spf1 mx -all"\n' in r.stdout
    assert r.stdout.rstrip().endswith("result: PASS (0 failed, 0 warnings)")


def test_lint_ip_that_does_not_pass(conf: Path) -> None:
    r = run(conf, "lint", "example.com", "--ip", OTHER_IP)
    assert r.exit_code == 1
    assert lines(r, "FAIL") == [f"{OTHER_IP} gets fail (mechanism -all)"]
    assert f"      fix: add ip4:{OTHER_IP} before the all term" in r.stdout
    assert f'  example.com. IN TXT "v=spf1 mx ip4:{OTHER_IP} -all"\n' in r.stdout


def test_lint_no_record(conf: Path) -> None:
    r = run(conf, "lint", "none.example")
    assert r.exit_code == 1
    assert lines(r, "FAIL") == ["no SPF record at none.example: receivers get none"]
    assert '  none.example. IN TXT "v=spf1 mx -all"\n' in r.stdout
    r = run(conf, "lint", "nothing-at-all.example")
    assert lines(r, "FAIL") == ["nothing-at-all.example does not exist in DNS (NXDOMAIN)"]


def test_lint_several_records_and_near_misses(conf: Path) -> None:
    r = run(conf, "lint", "two.example")
    assert r.exit_code == 1
    assert lines(r, "FAIL") == ["2 SPF records at two.example: receivers get permerror"]
    assert "      fix: merge them into one record and delete the others" in r.stdout
    r = run(conf, "lint", "almost.example")
    assert lines(r, "WARN") == ["TXT record 'v=spf1mx -all' is no SPF record: receivers "
                                "ignore it"]
    assert lines(r, "FAIL") == ["no SPF record at almost.example: receivers get none"]


def test_lint_syntax_errors_each_with_a_fix(conf: Path) -> None:
    r = run(conf, "lint", "syntax.example")
    assert r.exit_code == 1
    fails = lines(r, "FAIL")
    assert fails[:3] == [
        "term 'ipv4:192.0.2.1': unknown or malformed mechanism 'ipv4:192.0.2.1': receivers "
        "give permerror",
        "term 'a/33': invalid CIDR length in 'a/33': receivers give permerror",
        "term 'include:%{z}.x.example': invalid macro at '%{z}.x.examp': receivers give "
        "permerror",
    ]
    assert "+all: every host on the internet passes" in fails
    assert lines(r, "WARN") == ["unknown modifier colour=: receivers ignore it"]
    fixes = [ln for ln in r.stdout.splitlines() if ln.startswith("      fix: ")]
    assert any("the mechanisms are all, include:" in f for f in fixes)
    assert any("prefix lengths are /0../32" in f for f in fixes)
    assert any("macros are %{letter" in f for f in fixes)
    r = run(conf, "lint", "dupe.example")
    assert lines(r, "FAIL") == ["redirect= appears more than once: receivers give permerror"]


def test_lint_counts_lookups_through_includes(conf: Path) -> None:
    r = run(conf, "lint", "many.example")  # 4 includes x (1 + a + mx) = 12
    assert r.exit_code == 1
    assert lines(r, "FAIL")[0].startswith(
        "DNS-querying terms (through include/redirect): 12 of 10: ")
    assert "      p3.example: mx" in r.stdout
    r = run(conf, "lint", "nine.example")  # control: 3 x 3 + a = 10, at the limit
    assert r.exit_code == 0, r.output
    assert lines(r, "WARN") == [
        "DNS-querying terms (through include/redirect): 10 of 10: close to the limit"]


def test_lint_void_lookups(conf: Path) -> None:
    r = run(conf, "lint", "void.example")
    assert r.exit_code == 1
    assert lines(r, "FAIL") == ["void lookups: 3 of 2: receivers give permerror"]
    assert "      void.example: a:nx3.example (nx3.example A: NXDOMAIN)" in r.stdout
    r = run(conf, "lint", "void1.example")  # control: one void lookup is a warning
    assert r.exit_code == 0
    assert lines(r, "WARN") == ["void lookups: 1 of 2"]


def test_lint_loops_and_broken_includes(conf: Path) -> None:
    r = run(conf, "lint", "loop.example")
    assert r.exit_code == 1
    assert lines(r, "FAIL") == [
        "DNS-querying terms: no end: include/redirect loop loop.example -> loop2.example -> "
        "loop.example; receivers count to the limit and give permerror"]
    r = run(conf, "lint", "badinc.example")
    assert lines(r, "FAIL") == [
        "include:nospf.example: nospf.example has no SPF record: every receiver gets "
        "permerror",
        "include:broken.example: the record of broken.example is invalid: invalid CIDR "
        "length in 'ip4:1.2.3.4/40'",
    ]
    r = run(conf, "lint", "redir.example", "--ip", MX_IP)  # control: redirect is followed
    assert r.exit_code == 0, r.output
    assert "      redir.example: redirect=example.com" in r.stdout
    assert "      example.com: mx" in r.stdout


@pytest.mark.parametrize(("domain", "level", "text"), [
    ("open.example", "FAIL", "+all: every host on the internet passes"),
    ("soft.example", "WARN", "~all: mail from other hosts only softfails (most receivers "
                             "accept it)"),
    ("neutral.example", "WARN", "no all term and no redirect=: mail from other hosts gets "
                                "neutral"),
    ("ptr.example", "WARN", "terms after -all are never used: ip4:192.0.2.1"),
    ("example.com", "PASS", "-all: mail from other hosts fails SPF"),  # control
])
def test_lint_policy_findings(conf: Path, domain: str, level: str, text: str) -> None:
    r = run(conf, "lint", domain)
    assert text in lines(r, level), r.stdout


def test_lint_idn_domain_and_bad_arguments(conf: Path) -> None:
    r = run(conf, "lint", "bücher.example")
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("SPF lint of xn--bcher-kva.example ")
    assert run(conf, "lint", "not a domain").exit_code == 2
    assert run(conf, "lint", "example.com", "--ip", "nope").exit_code == 2
    assert run(conf, "lint").exit_code == 2
