"""The set-up commands against real parts: a private Postfix, a real ``mxguard
serve``, a loopback DNS server.

* ``postfix setup --apply`` wires a running private Postfix (postfix check +
  reload included): a real SMTP session then shows the policy door and the
  milter are consulted; ``--revert`` unwires it again (control).
* ``dns records`` / ``dns check``: good, missing, broken and timing-out domains.
* ``dkim rotate``: new key pending until its record is published, then active;
  the old record listed for removal after the grace period.
* ``doctor``: a working set-up passes; a closed policy port and an unwired
  Postfix give the right "fix" lines.
* ``demo`` runs to completion, bounded.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from tests.support.daemon import MxguardProcess

from mxguard import config
from mxguard.auth.dkim_keys import KeyTable, public_key_record, read_private_key
from mxguard.auth.dkim_rotation import active_keys
from mxguard.cli.dkim import rotate
from mxguard.cli.dns import dns as dns_group
from mxguard.cli.doctor import doctor
from mxguard.cli.postfix import postfix
from mxguard.testing.dns import DNSServer, Zone
from mxguard.testing.ports import free_port
from mxguard.testing.postfix import PostfixInstance, postfix_available
from mxguard.testing.sink import Sink
from mxguard.testing.smtp import send

_RUNNER_KW: dict[str, Any] = ({"mix_stderr": False}
                              if "mix_stderr" in inspect.signature(CliRunner.__init__).parameters
                              else {})
OUTSIDE = "127.1.0.5"


def invoke(cmd: Any, *args: str) -> Result:
    return CliRunner(**_RUNNER_KW).invoke(cmd, list(args), catch_exceptions=False)


def pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_key(path: Path, key: rsa.RSAPrivateKey) -> Path:
    path.write_bytes(pem(key))
    os.chmod(path, 0o600)
    return path


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=1024)


def good_zone(key: rsa.RSAPrivateKey) -> Zone:
    return {
        "example.test": [("TXT", "v=spf1 mx -all"), ("MX", (10, "mx.example.test"))],
        "mx.example.test": [("A", "127.0.0.1")],
        "1.0.0.127.in-addr.arpa": [("PTR", "mx.example.test")],
        "sel._domainkey.example.test": [("TXT", public_key_record(key))],
        "_dmarc.example.test": [("TXT", "v=DMARC1; p=reject; rua=mailto:d@example.test")],
        # an outside sender for the SMTP sessions
        "mail.sender.test": [("A", OUTSIDE)],
        "sender.test": [("TXT", "v=spf1 ip4:127.0.0.0/8 -all")],
    }


@pytest.fixture
def dns(key: rsa.RSAPrivateKey, other_key: rsa.RSAPrivateKey) -> Iterator[DNSServer]:
    zone = good_zone(key)
    zone.update({
        "broken.test": [("TXT", "v=spf1 ip4:1.2.3.4/40 +all"), ("TXT", "v=spf1 mx"),
                        ("MX", (10, "nomx.broken.test"))],
        "sel._domainkey.broken.test": [("TXT", public_key_record(other_key))],
        "_dmarc.broken.test": [("TXT", "v=DMARC1; p=bogus")],
        "slow.test": [("TIMEOUT", None)],
        "_dmarc.slow.test": [("TIMEOUT", None)],
        "sel._domainkey.slow.test": [("TIMEOUT", None)],
    })
    with DNSServer(zone) as srv:
        yield srv


def mx_config(tmp_path: Path, dns: DNSServer, extra: str = "") -> str:
    return (f'[dns]\nnameservers = ["{dns.address}"]\ntimeout = 1\n'
            f'[server]\nstate_dir = "{tmp_path}/state"\n' + extra)


# ------------------------------------------------------------------ postfix setup


def _reloads(pf: PostfixInstance) -> int:
    return pf.maillog_text().count("reload -- version")


def _wait_reloads(pf: PostfixInstance, count: int) -> None:
    deadline = time.monotonic() + 10
    while _reloads(pf) < count:
        assert time.monotonic() < deadline, pf.maillog_text()[-2000:]
        time.sleep(0.05)
    time.sleep(0.3)  # the old smtpd processes finish their idle wait


def test_setup_apply_wires_a_running_postfix_and_revert_unwires_it(
        tmp_path: Path, dns: DNSServer, sink: Sink,
        postfix_factory: Callable[..., PostfixInstance]) -> None:
    mx = MxguardProcess(tmp_path, mx_config(tmp_path, dns, '[helo]\nexempt_networks = []\n'
                                                           '[greylist]\nmode = "off"\n'
                                                           '[dkim]\ninternal_hosts = '
                                                           '["127.0.0.1/32"]\n'))
    mx.config.write_text(mx.config.read_text().replace(
        "[milter]\n", '[milter]\nauthserv_id = "mx.example.test"\n'))
    mx.start()
    try:
        pf = postfix_factory()
        before = send(pf.smtp_port, helo="exchange", mail_from="alice@sender.test",
                      rcpts=["bob@example.test"], source_ip=OUTSIDE)
        assert before.accepted, str(before)  # control: nobody checks HELO yet
        reloads = _reloads(pf)
        result = invoke(postfix, "setup", "--apply", "--config-dir", str(pf.config_dir),
                        "--config", str(mx.config))
        assert result.exit_code == 0, result.output
        assert "backup: " in result.output
        assert "postfix check: OK" in result.output
        assert "postfix reload: done" in result.output
        _wait_reloads(pf, reloads + 1)
        # the policy door is consulted: mxguard's HELO check, worded by Postfix
        t = send(pf.smtp_port, helo="exchange", mail_from="alice@sender.test",
                 rcpts=["bob@example.test"], source_ip=OUTSIDE)
        assert str(t.rcpts[0]) == ("504 5.5.2 <exchange>: Helo command rejected: need "
                                   "fully-qualified hostname"), str(t)
        # ... and the milter: one Authentication-Results from mxguard
        t = send(pf.smtp_port, helo="mail.sender.test", mail_from="alice@sender.test",
                 rcpts=["bob@example.test"], source_ip=OUTSIDE)
        assert t.accepted, str(t)
        msg = sink.wait_for(2)[-1]
        ar = msg.header("Authentication-Results") or ""
        assert ar.startswith("mx.example.test;") and "spf=pass" in ar, ar
        assert msg.header("Received-SPF") is not None
        # second run: nothing to change
        again = invoke(postfix, "setup", "--config-dir", str(pf.config_dir), "--config",
                       str(mx.config))
        assert "nothing to change" in again.output
        # revert: mxguard is no longer asked (control)
        result = invoke(postfix, "setup", "--revert", "--config-dir", str(pf.config_dir))
        assert result.exit_code == 0, result.output
        _wait_reloads(pf, reloads + 2)
        after = send(pf.smtp_port, helo="exchange", mail_from="alice@sender.test",
                     rcpts=["bob@example.test"], source_ip=OUTSIDE)
        assert after.accepted, str(after)
    finally:
        assert mx.stop() == 0


def test_setup_apply_does_not_reload_while_mxguard_is_down(
        tmp_path: Path, dns: DNSServer, postfix_factory: Callable[..., PostfixInstance]) -> None:
    cfg = tmp_path / "mxguard.toml"
    cfg.write_text(f'[policy]\nlisten = "127.0.0.1:{free_port()}"\n'
                   f'[milter]\nlisten = "127.0.0.1:{free_port()}"\n')
    pf = postfix_factory()
    reloads = _reloads(pf)
    result = invoke(postfix, "setup", "--apply", "--config-dir", str(pf.config_dir),
                    "--config", str(cfg))
    assert result.exit_code == 0, result.output
    assert "postfix check: OK" in result.output
    assert "NOT reloaded: policy door" in result.output
    assert "start mxguard first" in result.output
    time.sleep(0.5)
    assert _reloads(pf) == reloads
    # mail still flows on the old configuration
    t = send(pf.smtp_port, helo="mail.sender.test", mail_from="alice@sender.test",
             rcpts=["bob@example.test"], source_ip=OUTSIDE)
    assert t.accepted, str(t)


# ------------------------------------------------------------------ dns records / check


@pytest.fixture
def dns_cfg(tmp_path: Path, dns: DNSServer, key: rsa.RSAPrivateKey) -> Path:
    path = write_key(tmp_path / "k.key", key)
    cfg = tmp_path / "mxguard.toml"
    cfg.write_text(mx_config(tmp_path, dns, "[dkim]\nkeys = [" + ", ".join(
        f'"{d}:sel:{path}"' for d in ("example.test", "broken.test", "slow.test")) + "]\n"))
    return cfg


def test_dns_records_prints_the_zone_lines(dns_cfg: Path, key: rsa.RSAPrivateKey) -> None:
    r = invoke(dns_group, "records", "example.test", "--ip", "127.0.0.1", "--helo",
               "mx.example.test", "--config", str(dns_cfg))
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert 'example.test. IN TXT "v=spf1 mx -all"' in lines
    assert ('_dmarc.example.test. IN TXT "v=DMARC1; p=none; '
            'rua=mailto:dmarc-reports@example.test"') in lines
    (dkim,) = [line for line in lines if line.startswith("sel._domainkey.example.test. IN TXT")]
    strings = re.findall(r'"([^"]*)"', dkim)
    assert len(strings) > 1 and all(len(s.encode()) <= 255 for s in strings)
    assert "".join(strings) == public_key_record(key)
    assert ";   1.0.0.127.in-addr.arpa. IN PTR mx.example.test." in lines
    assert "mx.example.test. IN A 127.0.0.1" in lines
    # --from-mx: the MX hosts' addresses instead of "mx"
    r = invoke(dns_group, "records", "example.test", "--from-mx", "--config", str(dns_cfg))
    assert 'example.test. IN TXT "v=spf1 ip4:127.0.0.1 -all"' in r.output.splitlines()
    # a selector without a key: said so, exit 1
    r = invoke(dns_group, "records", "example.test", "-s", "nope", "--config", str(dns_cfg))
    assert r.exit_code == 1
    assert "DKIM: no key with selector nope for example.test" in r.output


def test_dns_check_of_a_good_domain_passes(dns_cfg: Path) -> None:  # control
    r = invoke(dns_group, "check", "example.test", "--ip", "127.0.0.1", "--helo",
               "mx.example.test", "--config", str(dns_cfg))
    assert r.exit_code == 0, r.output
    assert "FAIL" not in r.output and "WARN" not in r.output
    for line in ("PASS  127.0.0.1 passes (mechanism mx)",
                 "PASS  sel._domainkey.example.test: published, matches the local key "
                 "(rsa, 2048 bits)",
                 "PASS  policy reject: receivers reject mail that fails DMARC",
                 "PASS  MX 10 mx.example.test -> 127.0.0.1",
                 "PASS  forward-confirmed reverse DNS: 127.0.0.1 -> mx.example.test -> "
                 "127.0.0.1",
                 "PASS  HELO name mx.example.test resolves to 127.0.0.1",
                 "result: PASS (0 failed, 0 warnings)"):
        assert line in r.output.splitlines(), r.output


def test_dns_check_of_a_broken_domain_says_what_to_fix(dns_cfg: Path) -> None:
    r = invoke(dns_group, "check", "broken.test", "--ip", "192.0.2.9", "--helo",
               "x.broken.test", "--config", str(dns_cfg))
    assert r.exit_code == 1
    out = r.output
    assert "FAIL  2 SPF records at broken.test: receivers get permerror" in out
    assert "the published key is not the public half of the local private key" in out
    assert "fix: publish the record of the local key: mxguard dns records broken.test -s sel" \
        in out
    assert "_dmarc.broken.test: ignored: no valid p= and no rua=" in out
    assert "MX 10 nomx.broken.test has no A/AAAA record" in out
    assert "192.0.2.9 has no PTR record" in out
    assert "HELO name x.broken.test does not resolve" in out
    lines = out.splitlines()
    fails = [i for i, line in enumerate(lines) if line.startswith("FAIL  ")]
    assert len(fails) == 7
    assert all(lines[i + 1].startswith("      fix: ") for i in fails)  # each with its fix


def test_dns_check_of_a_missing_domain(dns_cfg: Path) -> None:
    r = invoke(dns_group, "check", "missing.test", "--config", str(dns_cfg))
    assert r.exit_code == 1
    assert "missing.test does not exist in DNS (NXDOMAIN)" in r.output
    assert "no DKIM key for missing.test" in r.output
    assert ('publish _dmarc.missing.test. IN TXT "v=DMARC1; p=none; '
            'rua=mailto:dmarc-reports@missing.test"') in r.output
    assert "Traceback" not in r.output


def test_dns_check_with_timeouts_is_a_report_not_a_traceback(dns_cfg: Path) -> None:
    started = time.monotonic()
    r = invoke(dns_group, "check", "slow.test", "--ip", "127.0.0.1", "--config", str(dns_cfg))
    assert r.exit_code == 1
    assert time.monotonic() - started < 20  # sections run side by side
    for section in ("SPF", "DKIM", "DMARC", "MX"):
        assert section in r.output.splitlines()
    assert "FAIL  DNS error: timeout looking up slow.test/TXT" in r.output
    assert "timeout looking up _dmarc.slow.test/TXT" in r.output
    assert "timeout looking up sel._domainkey.slow.test/TXT" in r.output
    assert "Traceback" not in r.output


# ------------------------------------------------------------------ dkim rotate


def test_rotation_waits_for_dns_then_switches_and_lists_the_old_record(
        tmp_path: Path, dns: DNSServer, key: rsa.RSAPrivateKey) -> None:
    old_path = write_key(tmp_path / "old.key", key)
    cfg_path = tmp_path / "mxguard.toml"
    cfg_path.write_text(mx_config(tmp_path, dns, f'[dkim]\nkeys = ["example.test:sel:'
                                                 f'{old_path}"]\n'))
    cfg = config.load(cfg_path)
    args = ("example.test", "--config", str(cfg_path))
    r = invoke(rotate, *args, "--selector", "s2")
    assert r.exit_code == 0, r.output
    new_path = tmp_path / "state" / "dkim" / "example.test.s2.key"
    assert stat.S_IMODE(new_path.stat().st_mode) == 0o600
    new_record = public_key_record(read_private_key(str(new_path)))
    assert "s2._domainkey.example.test. IN TXT" in r.output
    assert active_keys(cfg) == [f"example.test:sel:{old_path}"]  # pending: not signing yet
    # running it again does not make a third key
    again = invoke(rotate, *args)
    assert "already pending" in again.output
    # dns records lists the pending key too, so it can be published
    rec = invoke(dns_group, "records", *args, "-s", "s2")
    assert "pending rotation" in rec.output and rec.exit_code == 0
    # --advance before the record is published: refused
    r = invoke(rotate, *args, "--advance")
    assert r.exit_code == 1
    assert "not switching to s2" in r.output and "not published" in r.output
    assert active_keys(cfg) == [f"example.test:sel:{old_path}"]
    # publish it, then advance
    zone = good_zone(key)
    zone["s2._domainkey.example.test"] = [("TXT", new_record)]
    dns.set_zone(zone)
    r = invoke(rotate, *args, "--advance")
    assert r.exit_code == 0, r.output
    assert "signing switches to s2 when mxguard reloads" in r.output
    assert "sel retired; remove sel._domainkey.example.test TXT after" in r.output
    assert active_keys(cfg) == [f"example.test:s2:{new_path}"]
    # the daemon's KeyTable built from it signs with the new selector only
    table = KeyTable.from_config(dataclasses.replace(cfg.dkim, keys=active_keys(cfg)))
    assert [(k.domain, k.selector) for k in table.keys_for("a@example.test")] == \
        [("example.test", "s2")]
    status = invoke(rotate, *args, "--status")
    assert "keep sel._domainkey.example.test until" in status.output
    # once the grace period is over: remove now; once removed from DNS: done
    state_file = tmp_path / "state" / "dkim-rotation.json"
    data = json.loads(state_file.read_text())
    for k in data["domains"]["example.test"]:
        if k["selector"] == "sel":
            k["remove_after"] = time.time() - 1
    state_file.write_text(json.dumps(data))
    status = invoke(rotate, *args, "--status")
    assert "remove now: sel._domainkey.example.test TXT" in status.output
    del zone["sel._domainkey.example.test"]
    dns.set_zone(zone)
    status = invoke(rotate, *args, "--status")
    assert "record removed from DNS: done" in status.output


def test_active_keys_without_rotation_is_the_config(tmp_path: Path) -> None:  # control
    cfg = config.load(None)
    cfg = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server,
                                                             state_dir=str(tmp_path)),
                              dkim=dataclasses.replace(cfg.dkim, keys=["a.test:s:/k"]))
    assert active_keys(cfg) == ["a.test:s:/k"]


def test_corrupt_rotation_state_is_one_clear_line(tmp_path: Path) -> None:
    (tmp_path / "dkim-rotation.json").write_text("{not json")
    r = invoke(rotate, "example.test", "--state-dir", str(tmp_path))
    assert r.exit_code == 2
    text = r.stderr if hasattr(r, "stderr") else r.output
    assert "is not a DKIM rotation state file" in text


# ------------------------------------------------------------------ doctor


def test_doctor_passes_a_working_setup_and_names_the_fixes_of_a_broken_one(
        tmp_path: Path, dns: DNSServer, key: rsa.RSAPrivateKey,
        postfix_factory: Callable[..., PostfixInstance]) -> None:
    path = write_key(tmp_path / "k.key", key)
    mx = MxguardProcess(tmp_path, mx_config(tmp_path, dns,
                                            f'[dkim]\nkeys = ["example.test:sel:{path}"]\n'))
    mx.start()
    pf = postfix_factory()
    args = ("--config", str(mx.config), "--postfix-config-dir", str(pf.config_dir),
            "--ip", "127.0.0.1", "--timeout", "2")
    try:
        # Postfix not wired yet: the fix is `mxguard postfix setup --apply`
        r = invoke(doctor, *args)
        assert r.exit_code == 1
        assert "FAIL  main.cf needs smtpd_recipient_restrictions" in r.output
        assert f"fix: mxguard postfix setup --apply --config-dir {pf.config_dir}" in r.output
        setup = invoke(postfix, "setup", "--apply", "--config-dir", str(pf.config_dir),
                       "--config", str(mx.config))
        assert setup.exit_code == 0, setup.output
        r = invoke(doctor, *args)
        assert r.exit_code == 0, r.output
        for line in (f"PASS  policy door 127.0.0.1:{mx.port} answers a policy request "
                     "(action=DUNNO)",
                     f"PASS  milter door 127.0.0.1:{mx.milter_port} answers milter OPTNEG "
                     "(protocol version 6)",
                     f"PASS  main.cf calls the policy door inet:127.0.0.1:{mx.port} and the "
                     f"milter inet:127.0.0.1:{mx.milter_port}",
                     f"PASS  Postfix ({pf.config_dir}) is running",
                     "PASS  sel._domainkey.example.test: published, matches the local key "
                     "(rsa, 2048 bits)",
                     "PASS  HELO name mx.example.test resolves to 127.0.0.1"):
            assert line in r.output.splitlines(), r.output
        assert "result: PASS" in r.output
        # broken: the daemon is gone (policy port closed) and a key is readable by others
        assert mx.stop() == 0
        os.chmod(path, 0o644)
        r = invoke(doctor, *args)
        assert r.exit_code == 1
        assert f"FAIL  policy door 127.0.0.1:{mx.port}: cannot connect" in r.output
        assert "fix: start mxguard (systemctl start mxguard" in r.output
        assert f"FAIL  milter door 127.0.0.1:{mx.milter_port}: cannot connect" in r.output
        assert "is accessible by group or others (mode 0644)" in r.output
        assert f"fix: chmod 600 {path}" in r.output
    finally:
        mx.stop()


def test_doctor_with_a_bad_config_stops_there(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[policy]\nlisten = 5\n")
    r = invoke(doctor, "--config", str(bad), "--no-dns")
    assert r.exit_code == 1
    assert "FAIL  " in r.output and "policy.listen" in r.output
    assert "Traceback" not in r.output


def test_doctor_reports_a_foreign_program_on_the_policy_port(tmp_path: Path) -> None:
    import socket
    import threading

    port = free_port()
    srv = socket.create_server(("127.0.0.1", port))

    def answer() -> None:
        conn, _ = srv.accept()
        conn.recv(4096)
        conn.sendall(b"HTTP/1.0 400 Bad Request\n\n")
        conn.close()

    threading.Thread(target=answer, daemon=True).start()
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[policy]\nlisten = "127.0.0.1:{port}"\n[milter]\nenabled = false\n'
                   f'[server]\nstate_dir = "{tmp_path}"\n')
    try:
        r = invoke(doctor, "--config", str(cfg), "--no-dns", "--timeout", "2",
                   "--postfix-config-dir", str(tmp_path / "none"))
    finally:
        srv.close()
    assert r.exit_code == 1
    assert "not a policy reply" in r.output
    assert "cannot read the Postfix configuration" in r.output


# ------------------------------------------------------------------ demo


def test_demo_runs_to_completion() -> None:
    if not postfix_available() or os.geteuid() != 0:
        pytest.skip("the demo needs Debian's postfix and root")
    started = time.monotonic()
    res = subprocess.run([sys.executable, "-c", "from mxguard.cli.demo import demo; demo()"],
                         capture_output=True, text=True, timeout=90, check=False)
    out = res.stdout
    assert res.returncode == 0, out + res.stderr
    assert time.monotonic() - started < 90
    assert "Helo command rejected: need fully-qualified hostname" in out
    assert "450 4.2.0" in out and "accepted on retry" in out
    assert "550 5.7.23" in out
    assert "DKIM-Signature: v=1; a=rsa-sha256" in out and "dkim=pass" in out
    assert "5. The GTUBE test string" in out
    assert "all stopped and removed" in out
    workdir = out.split("under ", 1)[1].split(";", 1)[0]
    assert not Path(workdir).exists()
