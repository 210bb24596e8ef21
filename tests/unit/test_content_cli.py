"""``mxguard scan`` and ``mxguard rules check`` through click's CliRunner."""

from __future__ import annotations

import email.utils
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from mxguard.cli.scan import rules, scan

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
HAM = (b"From: Ann <ann@example.com>\nTo: bob@example.org\nSubject: Lunch\n"
       b"Date: " + email.utils.formatdate().encode() + b"\nMessage-Id: <1@example.com>\n\n"
       b"Noon?\n")  # dated now: the scan compares Date with the clock
SPAM = HAM.replace(b"Noon?", GTUBE.encode())


def write(tmp_path: Path, name: str, data: bytes | str) -> str:
    path = tmp_path / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(path)


def test_scan_file_prints_rules_score_action_and_headers(tmp_path: Path) -> None:
    result = CliRunner().invoke(scan, [write(tmp_path, "spam.eml", SPAM)])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "Content analysis details:" in out
    assert "1000.0 GTUBE" in out and "anti-spam test string" in out
    assert "action=reject" in out
    assert "X-Spam-Flag: YES" in out
    assert "X-Spam-Status: Yes, score=1000.0 required=5.0 tests=GTUBE" in out


def test_scan_stdin_json_control_ham() -> None:
    result = CliRunner().invoke(scan, ["--json", "-"], input=HAM)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["spam"] is False and report["action"] == "no action"
    assert report["symbols"] == [] or all(s["score"] < 5 for s in report["symbols"])
    names = [name for name, _ in report["headers"]]
    assert "X-Spam-Status" in names and "X-Spam-Flag" not in names


def test_scan_uses_config_rules_and_actions(tmp_path: Path) -> None:
    local = write(tmp_path, "local.cf", "body LOCAL_NOON /noon/i\nscore LOCAL_NOON 6\n"
                                        "describe LOCAL_NOON Mentions noon\n")
    conf = write(tmp_path, "mxguard.toml", f'[content]\nlocal_rules = ["{local}"]\n'
                                           "[actions]\nreject = 0\n")
    result = CliRunner().invoke(scan, ["--json", "--config", conf, write(tmp_path, "h", HAM)])
    report = json.loads(result.output)
    assert [s["name"] for s in report["symbols"]] == ["LOCAL_NOON"]
    assert report["action"] == "add_header" and report["spam"] is True


def test_scan_errors_exit_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(scan, [str(tmp_path / "missing.eml")])
    assert result.exit_code == 2 and "cannot read" in result.output
    bad = write(tmp_path, "bad.toml", "[content]\nnope = 1\n")
    result = CliRunner().invoke(scan, ["--config", bad, "-"], input=HAM)
    assert result.exit_code == 2 and "config error" in result.output


def test_rules_check_reports_counts_evals_and_errors(tmp_path: Path) -> None:
    d = tmp_path / "rules"
    d.mkdir()
    (d / "10_a.cf").write_text("body A /a/\nheader B eval:not_implemented_here()\n"
                               "uri C m{^http://x}\nmeta D A && C\n")
    (d / "20_b.cf").write_text("body GOOD /g/\nbody BAD /unclosed\n")
    result = CliRunner().invoke(rules, ["check", "--no-builtin", str(d)])
    out = result.output
    assert result.exit_code == 1, out
    assert "files read: 2" in out
    assert "10_a.cf" in out and "20_b.cf" in out
    assert "not_implemented_here (1)" in out
    assert "unsupported eval functions: 1 rules, 1 functions" in out
    assert "20_b.cf:2:" in out and "regex not closed" in out
    assert "meta" in out and "body" in out


def test_rules_check_clean_builtin_exits_0() -> None:
    result = CliRunner().invoke(rules, ["check"])
    assert result.exit_code == 0, result.output
    assert "mxguard.cf" in result.output and "errors: 0" in result.output


# ------------------------------------------------------------------ scan = the milter

SPAMMY = "Subject: cheap pills {n}\n\nBuy cheap viagra pills now, best price online {n}\n"
HAMMY = "Subject: meeting notes {n}\n\nThe quarterly planning meeting moved to Tuesday {n}\n"


def _session_of(raw: bytes) -> Any:
    from mxguard.core.transaction import Message
    from mxguard.server.milter_session import MilterSession

    msg = Message.from_bytes(raw)
    s = MilterSession()
    s.headers_exact = True
    s.client_address, s.helo = "192.0.2.10", "mail.example.net"
    s.start_message("ann@example.com", [])
    s.rcpts.append("bob@example.org")
    for name, value in msg.headers:
        s.add_header(name, value)
    s.add_body(msg.body_file().read())
    return s


@pytest.mark.parametrize("kind", ["spam", "ham"])
def test_scan_scores_like_the_milter_with_a_trained_bayes_store(tmp_path: Path,
                                                                kind: str) -> None:
    """Same message, same config, trained Bayes: scan's X-Spam-Status and symbols
    equal what the milter door writes (spam, and a ham control)."""
    import asyncio
    from types import SimpleNamespace

    from mxguard import config
    from mxguard.cli.learn import learn
    from mxguard.core.runtime import Runtime
    from mxguard.server.daemon import close_services, open_content_services
    from mxguard.server.milter_door import MxguardMilter

    spam_dir, ham_dir = tmp_path / "spam", tmp_path / "ham"
    spam_dir.mkdir()
    ham_dir.mkdir()
    for n in range(6):
        (spam_dir / f"{n}.eml").write_text(f"From: s{n}@spam.example\n" + SPAMMY.format(n=n))
        (ham_dir / f"{n}.eml").write_text(f"From: h{n}@example.com\n" + HAMMY.format(n=n))
    conf = write(tmp_path, "mxguard.toml",
                 f'[storage]\nurl = "sqlite:///{tmp_path}/state/mxguard.db"\n'
                 "[bayes]\nmin_spam = 3\nmin_ham = 3\nautolearn = false\n"
                 '[spf]\nmode = "off"\n[dkim]\nmode = "off"\n[dmarc]\nmode = "off"\n'
                 "[content]\nadd_report = true\n")
    for what, where in (("--spam", spam_dir), ("--ham", ham_dir)):
        res = CliRunner().invoke(learn, ["--config", str(conf), what, "--no-progress",
                                         str(where)])
        assert res.exit_code == 0, res.output
    cfg = config.load(conf)
    body = SPAMMY if kind == "spam" else HAMMY
    raw = ("From: x@example.net\nTo: bob@example.org\nMessage-ID: <t@example.net>\n"
           + body.format(n=99)).encode()

    result = CliRunner().invoke(scan, ["--json", "--config", str(conf), "-"], input=raw)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)

    async def through_milter() -> Any:
        services = open_content_services(cfg)
        daemon = SimpleNamespace(runtime=Runtime(config=cfg, resolver=None,  # type: ignore[arg-type]
                                                 services=services))
        try:
            return await MxguardMilter(daemon).on_end_of_message(  # type: ignore[arg-type]
                _session_of(raw))
        finally:
            await close_services(services)

    milter = asyncio.run(through_milter())
    milter_headers = {h.name: h.value for h in milter.headers if hasattr(h, "op")
                      and h.name.startswith("X-Spam")}
    scan_headers = dict(report["headers"])
    assert milter_headers["X-Spam-Status"] == scan_headers["X-Spam-Status"]
    assert milter_headers["X-Spam-Report"] == scan_headers["X-Spam-Report"]
    bayes = [s["name"] for s in report["symbols"] if s["name"].startswith("BAYES_")]
    assert len(bayes) == 1  # Bayes was consulted
    assert bayes[0] in ({"BAYES_99", "BAYES_999", "BAYES_95"} if kind == "spam"
                        else {"BAYES_00", "BAYES_05"})
