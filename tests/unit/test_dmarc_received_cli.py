"""``mxguard dmarc ingest`` and ``mxguard dmarc summary`` through click's CliRunner:
files, standard input (the Postfix pipe transport), mbox, Maildir; exit codes
0 / 1 / 2 / 75; [dmarc] received_domains; summary text and JSON."""

from __future__ import annotations

import inspect
import json
import mailbox
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from mxguard.cli import main
from mxguard.cli.dmarc_received import EX_TEMPFAIL
from mxguard.testing.dns import DNSServer
from mxguard.testing.ports import free_port
from tests.support import DATA
from tests.unit.auth.dmarc_reports import Rec, gz, plain_mail, report_mail, report_xml, zipped

_RUNNER_KW: dict[str, Any] = ({"mix_stderr": False}
                              if "mix_stderr" in inspect.signature(CliRunner.__init__).parameters
                              else {})
TWILIGHT = DATA / "dmarc" / "received" / "twilight.eml"
END = int(time.time()) - 86400  # yesterday: within received_max_age_days


def report(rid: str = "r1", domain: str = "ours.example", records: list[Rec] | None = None,
           org: str = "Reporter Inc") -> bytes:
    return report_xml(report_id=rid, domain=domain, org=org, begin=END - 86399, end=END,
                      records=records)


def conf(tmp_path: Path, url: str | None = None, extra: str = "") -> str:
    path = tmp_path / "mxguard.toml"
    path.write_text(f'[storage]\nurl = "{url or f"sqlite:///{tmp_path}/state/mxguard.db"}"\n'
                    f"[dmarc]\n{extra}")
    return str(path)


def run(*args: str, stdin: bytes | None = None) -> tuple[int, str, str]:
    result = CliRunner(**_RUNNER_KW).invoke(main, ["dmarc", *args], input=stdin)
    return result.exit_code, result.stdout, result.stderr


def stored(tmp_path: Path, cfg: str) -> int:
    code, out, _ = run("summary", "-c", cfg, "--json")
    assert code == 0
    return sum(d["reports"] for d in json.loads(out)["domains"])


# ------------------------------------------------------------------ ingest


@pytest.mark.parametrize(("name", "data", "code", "reports", "said"), [
    ("report mail (gzip attachment)", report_mail(gz(report())), 0, 1, "1 reports stored"),
    ("control: mail without a report", plain_mail(), 0, 0, "1 without a report"),
    ("bare .zip file", zipped(report()), 0, 1, "1 reports stored"),
    ("refused report in a FILE exits 1", report_mail(b"<!DOCTYPE x []><feedback/>",
                                                     ctype="text/xml", filename="r.xml"),
     1, 0, "1 refused"),
])
def test_ingest_file(tmp_path: Path, name: str, data: bytes, code: int, reports: int,
                     said: str) -> None:
    cfg = conf(tmp_path)
    f = tmp_path / "in.eml"
    f.write_bytes(data)
    got, out, err = run("ingest", "-c", cfg, str(f))
    assert got == code, err
    assert said in out
    assert stored(tmp_path, cfg) == reports
    if code == 1:
        assert "report refused: XML with a DTD (<!DOCTYPE>) refused" in err
        assert "Traceback" not in err


def test_ingest_stdin_is_the_pipe_transport(tmp_path: Path) -> None:
    cfg = conf(tmp_path)
    mail = report_mail(gz(report()))
    assert run("ingest", "-c", cfg, "-", stdin=mail)[0] == 0
    code, out, _ = run("ingest", "-c", cfg, stdin=mail)  # no argument: stdin too
    assert code == 0 and "1 already stored" in out
    assert stored(tmp_path, cfg) == 1
    # a refused report on stdin is consumed, not bounced to the stranger who sent it
    bad = report_mail(b"<!DOCTYPE x []><feedback/>", ctype="text/xml", filename="r.xml")
    code, out, err = run("ingest", "-c", cfg, "-", stdin=bad)
    assert code == 0 and "1 refused" in out and "DTD" in err


def test_ingest_mbox_and_maildir_with_progress(tmp_path: Path) -> None:
    cfg = conf(tmp_path)
    box = mailbox.mbox(tmp_path / "reports.mbox")
    for data in (report_mail(gz(report("m1"))), plain_mail(1), report_mail(gz(report("m1"))),
                 report_mail(zipped(report("m2")), ctype="application/zip",
                             filename="r.zip")):
        box.add(data)
    box.flush()
    code, out, err = run("ingest", "-c", cfg, "--mbox", str(tmp_path / "reports.mbox"),
                         "--progress")
    assert code == 0, err
    assert out.strip() == ("4 messages: 2 reports stored, 1 already stored, 0 too old, "
                           "0 for other domains, 1 without a report, 0 refused, 0 unreadable")
    assert "\r" in err and "msgs/s" in err  # the progress line
    md = mailbox.Maildir(tmp_path / "Maildir")
    md.add(report_mail(gz(report("d1"))))
    md.add(TWILIGHT.read_bytes())
    code, out, _ = run("ingest", "-c", cfg, "--maildir", str(tmp_path / "Maildir"))
    # the 2019 sample is past received_max_age_days (400 by default)
    assert code == 0 and out.startswith("2 messages: 1 reports stored, 0 already stored, "
                                        "1 too old")
    assert stored(tmp_path, cfg) == 3


@pytest.mark.parametrize(("name", "args", "said"), [
    ("missing file", ["/nonexistent/x.eml"], "/nonexistent/x.eml: No such file"),
    ("a directory as FILE", ["{tmp}"], "is a directory (use --maildir DIR"),
    ("missing mbox", ["--mbox", "/nonexistent/box"], "no such mbox file"),
    ("not a Maildir", ["--maildir", "{tmp}"], "not a Maildir (no cur/ and new/)"),
    ("two sources", ["x", "--mbox", "y"], "give one of FILE"),
])
def test_unreadable_input_exits_2(tmp_path: Path, name: str, args: list[str],
                                  said: str) -> None:
    code, _, err = run("ingest", "-c", conf(tmp_path),
                       *[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert code == 2
    assert said in err and err.count("\n") == 1


@pytest.mark.parametrize(("name", "source", "code"), [
    ("store down on stdin: EX_TEMPFAIL so Postfix retries", "-", EX_TEMPFAIL),
    ("control: store down with a FILE: exit 2", "file", 2),
])
def test_store_down(tmp_path: Path, name: str, source: str, code: int) -> None:
    cfg = conf(tmp_path, url=f"redis://127.0.0.1:{free_port()}/0")  # nothing listens
    mail = report_mail(gz(report()))
    f = tmp_path / "in.eml"
    f.write_bytes(mail)
    got, _, err = run("ingest", "-c", cfg, "-" if source == "-" else str(f), stdin=mail)
    assert got == code
    assert "storing a report failed" in err and "Traceback" not in err
    assert ("Postfix retries" in err) == (code == EX_TEMPFAIL)


def test_sqlite_store_unopenable_on_stdin_is_tempfail(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = conf(tmp_path, url=f"sqlite:///{blocker}/sub/mxguard.db")
    code, _, err = run("ingest", "-c", cfg, "-", stdin=report_mail(gz(report())))
    assert code == EX_TEMPFAIL and "cannot open the received reports store" in err


@pytest.mark.parametrize(("name", "domains", "stored_n", "said"), [
    ("report for a domain not ours is skipped", '["other.example"]', 0,
     "1 for other domains"),
    ("control: our domain is kept", '["ours.example"]', 1, "1 reports stored"),
    ("control: a subdomain of ours is kept", '["example"]', 1, "1 reports stored"),
])
def test_received_domains(tmp_path: Path, name: str, domains: str, stored_n: int,
                          said: str) -> None:
    cfg = conf(tmp_path, extra=f"received_domains = {domains}\n")
    code, out, _ = run("ingest", "-c", cfg, "-", stdin=report_mail(gz(report())))
    assert code == 0 and said in out
    assert stored(tmp_path, cfg) == stored_n


def test_too_old_report_is_not_stored(tmp_path: Path) -> None:
    cfg = conf(tmp_path, extra="received_max_age_days = 2\n")
    old = report_xml(report_id="old", begin=END - 10 * 86400, end=END - 9 * 86400)
    code, out, _ = run("ingest", "-c", cfg, "-", stdin=old)
    assert code == 0 and "1 too old" in out
    code, out, _ = run("ingest", "-c", cfg, "-", stdin=report())  # control: yesterday's
    assert "1 reports stored" in out


# ------------------------------------------------------------------ summary


def test_summary_text_and_json(tmp_path: Path) -> None:
    cfg = conf(tmp_path)
    run("ingest", "-c", cfg, "-", stdin=report("a", records=[
        Rec("192.0.2.1", 10),
        Rec("198.51.100.7", 4, disposition="reject", dkim="fail", spf="fail",
            dkim_results=[], spf_results=[("spoof.example", "mfrom", "fail")])]))
    run("ingest", "-c", cfg, "-", stdin=report("b", domain="theirs.example",
                                               records=[Rec("192.0.2.99", 7)]))
    code, out, _ = run("summary", "-c", cfg, "--domain", "ours.example")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("ours.example: 1 reports from 1 reporters (Reporter Inc)")
    assert lines[1] == "  14 messages: 10 DMARC pass (71.4%), 4 fail"
    row = next(line for line in lines if "198.51.100.7" in line).split()
    assert row[:6] == ["198.51.100.7", "4", "0", "4", "0", "0"]
    assert "reject=4;" in row and "fail for spoof.example (4)" in " ".join(row)
    assert "192.0.2.99" not in out  # control: the other domain is filtered out
    code, out, _ = run("summary", "-c", cfg, "--json")
    doms = {d["domain"]: d for d in json.loads(out)["domains"]}
    assert set(doms) == {"ours.example", "theirs.example"}
    src = {s["source_ip"]: s for s in doms["ours.example"]["sources"]}
    assert src["192.0.2.1"] == {
        "source_ip": "192.0.2.1", "name": "", "messages": 10, "dmarc_pass": 10, "dmarc_fail": 0,
        "dkim_aligned": 10, "spf_aligned": 10, "dispositions": {"none": 10},
        "top_failures": [], "header_from": ["ours.example"], "reporters": ["Reporter Inc"]}
    assert src["198.51.100.7"]["top_failures"][0] == {"reason": "no DKIM signature",
                                                       "messages": 4}


@pytest.mark.parametrize(("name", "since", "found"), [
    ("--since after every report: none", "2999-01-01", False),
    ("control: --since before the report", "2000-01-01", True),
])
def test_summary_since(tmp_path: Path, name: str, since: str, found: bool) -> None:
    cfg = conf(tmp_path)
    run("ingest", "-c", cfg, "-", stdin=report())
    code, out, _ = run("summary", "-c", cfg, "--since", since)
    assert code == 0
    assert ("192.0.2.1" in out) == found
    if not found:
        assert out.strip() == f"no aggregate reports received since {since}"


def test_summary_bad_since_exits_2(tmp_path: Path) -> None:
    code, _, err = run("summary", "-c", conf(tmp_path), "--since", "yesterday")
    assert code == 2 and "'yesterday' is not a date YYYY-MM-DD" in err


def test_summary_resolve_names_sources(tmp_path: Path) -> None:
    zone = {"1.2.0.192.in-addr.arpa": [("PTR", "mail.ours.example")]}
    with DNSServer(zone) as srv:
        cfg = conf(tmp_path)
        Path(cfg).write_text(Path(cfg).read_text()
                             + f'[dns]\nnameservers = ["{srv.address}"]\ntimeout = 2.0\n')
        run("ingest", "-c", cfg, "-", stdin=report(records=[
            Rec("192.0.2.1", 2), Rec("192.0.2.2", 1)]))
        code, out, _ = run("summary", "-c", cfg, "--resolve")
        assert code == 0
        assert "192.0.2.1 (mail.ours.example)" in out
        row = next(line for line in out.splitlines() if "192.0.2.2" in line)
        assert row.split()[:2] == ["192.0.2.2", "1"]  # control: no PTR, no name
        code, out, _ = run("summary", "-c", cfg)  # control: without --resolve, no lookup
        assert "mail.ours.example" not in out
