"""``mxguard dmarc report`` / ``status`` on a SQLite results store, with a
sendmail that is a real executable (a script keeping what it was given, or
refusing). RFC 9990 §3: one report per policy domain with rua=; never twice."""

from __future__ import annotations

import dataclasses
import datetime as dt
import email
import gzip
from pathlib import Path

import pytest
import xmlschema
from click.testing import CliRunner

from mxguard.cli import main
from mxguard.store.report_log import SqliteReportLog, report_log_path
from mxguard.store.results import ResultRecord, SqliteResultsStore, results_path
from tests.support import DATA

SCHEMA = xmlschema.XMLSchema(str(DATA / "dmarc" / "rfc9990.xsd"))
YESTERDAY = (dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)).isoformat()
T = dt.datetime.fromisoformat(YESTERDAY).replace(tzinfo=dt.UTC).timestamp() + 3600


def rec(domain: str, rua: tuple[str, ...], **kw: object) -> ResultRecord:
    base = ResultRecord(ts=T, source_ip="192.0.2.7", header_from=domain,
                        envelope_from=domain, spf_domain=domain, spf_result="pass",
                        policy_domain=domain, p="none", rua=rua, dmarc_result="pass",
                        spf_aligned=True)
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path]:
    db = tmp_path / "state" / "mxguard.db"
    store = SqliteResultsStore(results_path(f"sqlite:///{db}"))
    for _ in range(3):
        store.add(rec("a.test", ("mailto:rua@a.test",)))
    store.add(rec("a.test", ("mailto:rua@a.test",), header_from="news.a.test"))
    store.add(rec("b.test", ("mailto:rua@b.test",)))
    store.add(rec("norua.test", ()))  # control: no rua=, no report
    store.close()
    spool = tmp_path / "spool"
    spool.mkdir()
    sendmail = tmp_path / "sendmail"
    sendmail.write_text(f"#!/bin/sh\nn=$(ls {spool} | wc -l)\n"
                        f'cat > {spool}/$n.eml\necho "$@" > {spool}/$n.args\n')
    sendmail.chmod(0o755)
    cfg = tmp_path / "mxguard.toml"
    cfg.write_text(f'[storage]\nurl = "sqlite:///{db}"\n[dmarc]\n'
                   f'report_email = "dmarc@mx.test"\nsendmail = "{sendmail}"\n')
    return cfg, spool


def run(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(main, list(args))
    return res.exit_code, res.output


def counts(xml: bytes) -> dict[str, int]:
    data = SCHEMA.to_dict(xml.decode())
    assert isinstance(data, dict)
    out: dict[str, int] = {}
    for r in data["record"]:
        hf = r["identifiers"]["header_from"]
        out[hf] = out.get(hf, 0) + int(r["row"]["count"])
    return out


def test_out_writes_one_report_per_domain_with_rua(setup: tuple[Path, Path],
                                                  tmp_path: Path) -> None:
    cfg, spool = setup
    out = tmp_path / "out"
    code, text = run("dmarc", "report", "-c", str(cfg), "--out", str(out))
    assert code == 0, text
    names = sorted(p.name for p in out.iterdir())
    assert [n for n in names if n.endswith(".xml.gz")] == [
        n for n in names if n.endswith(".xml.gz") and ("!a.test!" in n or "!b.test!" in n)]
    assert len([n for n in names if n.endswith(".xml.gz")]) == 2  # not norua.test
    assert len([n for n in names if n.endswith(".eml")]) == 2
    a = next(out.glob("mx.test!a.test!*.xml.gz"))
    assert counts(gzip.decompress(a.read_bytes())) == {"a.test": 3, "news.a.test": 1}
    assert list(spool.iterdir()) == []  # --out sends nothing


def test_send_twice_sends_once_and_status_shows_it(setup: tuple[Path, Path]) -> None:
    cfg, spool = setup
    code, text = run("dmarc", "report", "-c", str(cfg), "--send")
    assert code == 0, text
    mails = sorted(spool.glob("*.eml"))
    assert len(mails) == 2
    rcpts = sorted((spool / f"{m.stem}.args").read_text().split()[-1] for m in mails)
    assert rcpts == ["rua@a.test", "rua@b.test"]
    msg = email.message_from_bytes(mails[0].read_bytes())
    assert str(msg["Subject"]).startswith("Report Domain: ")
    code, text = run("dmarc", "report", "-c", str(cfg), "--send")
    assert code == 0 and "2 already sent" in text
    assert len(list(spool.glob("*.eml"))) == 2  # not again
    code, text = run("dmarc", "status", "-c", str(cfg))
    assert code == 0 and text.count(": sent at ") == 2 and "norua.test" not in text


def test_refused_report_is_retried_later_then_given_up(setup: tuple[Path, Path],
                                                       tmp_path: Path) -> None:
    cfg, _spool = setup
    refuse = tmp_path / "refuse"
    refuse.write_text("#!/bin/sh\necho 'sendmail: fatal: queue file write error' >&2\n"
                      "exit 75\n")
    refuse.chmod(0o755)
    text = cfg.read_text().replace(str(tmp_path / "sendmail"), str(refuse))
    cfg.write_text(text + "report_retries = 2\n")
    code, out = run("dmarc", "report", "-c", str(cfg), "--send", "--domain", "a.test")
    assert code == 1 and "retry a.test" in out and "queue file write error" in out
    log = SqliteReportLog(report_log_path(f"sqlite:///{tmp_path / 'state' / 'mxguard.db'}"))
    (entry,) = log.entries()
    assert entry.state == "retry" and entry.attempts == 1 and entry.next_try > entry.updated
    # not due yet: the next run does not try again (back-off) ...
    code, out = run("dmarc", "report", "-c", str(cfg), "--send", "--domain", "a.test")
    assert "1 already sent or not due" in out
    # ... once due, the second attempt is the last (report_retries = 2)
    log.finish(dataclasses.replace(entry, next_try=0.0))
    code, out = run("dmarc", "report", "-c", str(cfg), "--send", "--domain", "a.test")
    assert code == 1 and "failed a.test" in out
    (entry,) = log.entries()
    assert entry.state == "failed" and entry.attempts == 2
    log.close()


def test_errors_are_one_line(setup: tuple[Path, Path], tmp_path: Path) -> None:
    cfg, _ = setup
    code, out = run("dmarc", "report", "-c", str(cfg))
    assert code == 2 and "either --out DIR" in out
    today = dt.datetime.now(dt.UTC).date().isoformat()
    code, out = run("dmarc", "report", "-c", str(cfg), "--send", "--period", today)
    assert code == 2 and "has not ended" in out
    bare = tmp_path / "bare.toml"
    bare.write_text(cfg.read_text().replace('report_email = "dmarc@mx.test"\n', ""))
    code, out = run("dmarc", "report", "-c", str(bare), "--send")
    assert code == 2 and "report_email is not set" in out and "Traceback" not in out
