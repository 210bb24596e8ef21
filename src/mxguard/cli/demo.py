"""``mxguard demo``: the whole product at work in under a minute, on loopback only.

On a machine with Debian's ``postfix`` package, as root::

    mxguard demo [--keep] [--delay 2]

starts, under a new ``/tmp/mxgdemo-*`` directory: a loopback DNS server with
three test domains, an SMTP sink as final hop, ``mxguard serve`` (a child
process with its own config) and a private Postfix wired to it by the same
code as ``mxguard postfix setup --apply``. Then it walks through the seed's
scenarios, printing the SMTP replies and mxguard's decision lines:

1. a bad HELO name is rejected;
2. a first delivery is greylisted, the retry after ``--delay`` seconds is
   accepted (X-Greylist, Received-SPF, Authentication-Results added);
3. a forged sender (SPF fail) is rejected;
4. mail from the server's own network leaves DKIM-signed (the header shown and
   verified against the demo DNS);
5. GTUBE is tagged -- or "skipped" while content scoring is not installed.

Everything is stopped and removed at the end (``--keep`` keeps the
directory: config, maillog, mxguard log). The machine's own Postfix,
/etc/postfix and the real DNS are never used. Exit code 0 when every step
behaved as described, 1 otherwise, 2 when the demo cannot run here.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import click

from mxguard import config
from mxguard.auth.dkim_keys import generate_private_key, public_key_record, write_private_key
from mxguard.testing.dns import DNSServer
from mxguard.testing.ports import free_port
from mxguard.testing.postfix import PostfixInstance, postfix_missing
from mxguard.testing.sink import Sink, SinkMessage
from mxguard.testing.smtp import send

OUR_DOMAIN = "example.test"
MX_NAME = f"mx.{OUR_DOMAIN}"
SELECTOR = "demo"
CLIENT = "127.1.0.5"  # an outside client: not in mynetworks
GOOD_HELO = "mail.good.test"
ZONE_TEMPLATE: dict[str, list[tuple[str, object]]] = {
    "good.test": [("TXT", "v=spf1 ip4:127.1.0.0/16 -all"), ("MX", (10, GOOD_HELO))],
    GOOD_HELO: [("A", CLIENT)],
    "5.0.1.127.in-addr.arpa": [("PTR", GOOD_HELO)],
    "bank.test": [("TXT", "v=spf1 ip4:192.0.2.0/24 -all")],
    "_dmarc.bank.test": [("TXT", "v=DMARC1; p=reject")],
    OUR_DOMAIN: [("TXT", "v=spf1 mx -all"), ("MX", (10, MX_NAME))],
    MX_NAME: [("A", "127.0.0.1")],
    f"_dmarc.{OUR_DOMAIN}": [("TXT", f"v=DMARC1; p=none; rua=mailto:dmarc-reports@{OUR_DOMAIN}")],
}
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def message(sender: str, rcpt: str, subject: str, body: str = "Hello from the demo.\n") -> bytes:
    return (f"From: <{sender}>\r\nTo: <{rcpt}>\r\nSubject: {subject}\r\n"
            f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n"
            f"Message-ID: <{time.time_ns()}@{sender.rpartition('@')[2]}>\r\n\r\n"
            + body.replace("\n", "\r\n")).encode()


class Demo:
    def __init__(self, workdir: Path, delay: int) -> None:
        self.workdir = workdir
        self.delay = delay
        self.failed: list[str] = []
        self.dns: DNSServer | None = None
        self.sink: Sink | None = None
        self.postfix: PostfixInstance | None = None
        self.mxguard: subprocess.Popen[bytes] | None = None
        self.log = workdir / "mxguard.log"
        self.log_seen = 0
        self.key_path = workdir / f"{OUR_DOMAIN}.{SELECTOR}.key"

    # ------------------------------------------------------------ output

    def say(self, text: str = "") -> None:
        click.echo(text)

    def expect(self, ok: bool, good: str, bad: str) -> None:
        self.say(f"   => {good}" if ok else f"   => UNEXPECTED: {bad}")
        if not ok:
            self.failed.append(bad)

    def decisions(self) -> None:
        """Print mxguard's new decision lines (the daemon writes them to its log)."""
        deadline = time.monotonic() + 1.0
        while True:
            try:
                text = self.log.read_text(errors="replace")
            except OSError:
                text = ""
            new = text[self.log_seen:]
            if new.endswith("\n") or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        self.log_seen += len(new)
        for line in new.splitlines():
            if "action=" in line:
                shown = line[line.index("action="):]
                self.say("   mxguard: " + (shown if len(shown) < 200 else shown[:197] + "..."))

    # ------------------------------------------------------------ start

    def start(self) -> None:
        key = generate_private_key("rsa", 2048)
        write_private_key(self.key_path, key)
        zone = dict(ZONE_TEMPLATE)
        zone[f"{SELECTOR}._domainkey.{OUR_DOMAIN}"] = [("TXT", public_key_record(key))]
        self.dns = DNSServer(zone, ttl=60).start()
        self.say(f"  DNS      {self.dns.address}: good.test, bank.test, {OUR_DOMAIN} "
                 "(SPF, DKIM, DMARC)")
        self.sink = Sink().start()
        self.say(f"  sink     127.0.0.1:{self.sink.port}: the final hop, keeps what Postfix "
                 "delivers")
        cfg_path = self.write_config()
        self.start_mxguard(cfg_path)
        self.start_postfix(cfg_path)

    def write_config(self) -> Path:
        self.policy_port, self.milter_port = free_port(), free_port()
        assert self.dns is not None
        text = f"""# mxguard demo
[server]
state_dir = "{self.workdir}/state"
[policy]
listen = "127.0.0.1:{self.policy_port}"
[web]
listen = "127.0.0.1:{free_port()}"
[milter]
listen = "127.0.0.1:{self.milter_port}"
authserv_id = "{MX_NAME}"
[storage]
url = "sqlite:///{self.workdir}/mxguard.db"
[dns]
nameservers = ["{self.dns.address}"]
timeout = 3
[helo]
exempt_networks = []   # the demo's outside clients are on loopback too
[greylist]
delay = {self.delay}
[dkim]
keys = ["{OUR_DOMAIN}:{SELECTOR}:{self.key_path}"]
internal_hosts = ["127.0.0.1/32"]
"""
        path = self.workdir / "mxguard.toml"
        path.write_text(text)
        config.load(path)  # a demo bug shows here, not as a silent daemon exit
        return path

    def start_mxguard(self, cfg_path: Path) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.log, "ab") as logf:
            self.mxguard = subprocess.Popen(
                [sys.executable, "-m", "mxguard", "serve", "--config", str(cfg_path)],
                stdout=logf, stderr=logf, env=env, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        ports = [self.policy_port, self.milter_port]
        while ports and time.monotonic() < deadline:
            if self.mxguard.poll() is not None:
                raise RuntimeError(f"mxguard exited:\n{self.log.read_text(errors='replace')}")
            try:
                socket.create_connection(("127.0.0.1", ports[0]), 0.2).close()
                ports.pop(0)
            except OSError:
                time.sleep(0.05)
        if ports:
            raise RuntimeError("mxguard did not listen within 20 s")
        self.log_seen = len(self.log.read_text(errors="replace"))
        self.say(f"  mxguard  policy 127.0.0.1:{self.policy_port}, milter "
                 f"127.0.0.1:{self.milter_port} (pid {self.mxguard.pid}, config {cfg_path})")

    def start_postfix(self, cfg_path: Path) -> None:
        from mxguard.cli.postfix_apply import apply
        from mxguard.cli.postfix_plan import make_plan

        assert self.sink is not None
        pf = PostfixInstance(self.workdir / "pf", self.sink.port,
                             relay_domains=[OUR_DOMAIN, "good.test", "bank.test"],
                             myhostname=MX_NAME)
        pf.write_config()
        plan = make_plan(config.load(cfg_path), pf.config_dir)
        apply(plan)
        self.postfix = pf
        pf.start()
        self.say(f"  Postfix  127.0.0.1:{pf.smtp_port} (config {pf.config_dir}), wired by "
                 f"`mxguard postfix setup --apply --config-dir {pf.config_dir}`:")
        for change in plan.changes:
            what = change.what.split(" (was")[0]
            self.say(f"           {what if len(what) < 110 else what[:107] + '...'}")

    # ------------------------------------------------------------ steps

    def deliver(self, *, helo: str, sender: str, rcpt: str, data: bytes,
                source: str = CLIENT) -> tuple[bool, str]:
        assert self.postfix is not None
        try:
            session = send(self.postfix.smtp_port, source_ip=source, helo=helo,
                           mail_from=sender, rcpts=[rcpt], data=data, timeout=20)
        except OSError as exc:
            self.say(f"   {source} > could not connect to Postfix: {exc}")
            return False, f"error: {exc}"
        self.say(f"   {source} > EHLO {helo} / MAIL FROM:<{sender}> / RCPT TO:<{rcpt}>"
                 + (" / DATA" if any(c == "DATA" for c, _ in session.log) else ""))
        self.say(f"   Postfix < {session.last}")
        self.decisions()
        return session.accepted, session.last

    def wait_message(self, count: int) -> SinkMessage | None:
        assert self.sink is not None
        try:
            return self.sink.wait_for(count, timeout=20)[count - 1]
        except TimeoutError:
            return None

    def show_headers(self, msg: SinkMessage, names: tuple[str, ...]) -> None:
        for name in names:
            for value in msg.headers(name):
                text = f"{name}: {value}"
                self.say("   | " + (text if len(text) < 160 else text[:157] + "..."))

    def step_bad_helo(self) -> None:
        self.say("\n1. A client greets with a bad HELO name (\"exchange\", not fully qualified)")
        ok, last = self.deliver(helo="exchange", sender="alice@good.test",
                                rcpt=f"bob@{OUR_DOMAIN}", data=message("alice@good.test",
                                                                       "bob", "hi"))
        self.expect(not ok and last.startswith("504"), "rejected, in Postfix's own words",
                    f"expected a 504 reply, got {last}")

    def step_greylist(self) -> None:
        self.say("\n2. A new sender: the first delivery is greylisted, the retry passes")
        data = message("alice@good.test", f"bob@{OUR_DOMAIN}", "greylisting")
        ok, last = self.deliver(helo=GOOD_HELO, sender="alice@good.test",
                                rcpt=f"bob@{OUR_DOMAIN}", data=data)
        self.expect(not ok and last.startswith("450"), "deferred: a real server retries",
                    f"expected 450, got {last}")
        self.say(f"   ... waiting {self.delay + 1} s, as the sending server's queue would")
        time.sleep(self.delay + 1)
        ok, last = self.deliver(helo=GOOD_HELO, sender="alice@good.test",
                                rcpt=f"bob@{OUR_DOMAIN}", data=data)
        msg = self.wait_message(1) if ok else None
        if msg is not None:
            self.say("   delivered to the sink with:")
            self.show_headers(msg, ("X-Greylist", "Received-SPF", "Authentication-Results"))
        self.expect(msg is not None, "accepted on retry", f"retry not delivered: {last}")

    def step_spf_fail(self) -> None:
        self.say("\n3. A forged sender: bank.test's SPF does not list this client")
        ok, last = self.deliver(helo=GOOD_HELO, sender="ceo@bank.test",
                                rcpt=f"bob@{OUR_DOMAIN}",
                                data=message("ceo@bank.test", f"bob@{OUR_DOMAIN}", "invoice"))
        self.expect(not ok and last.startswith("550"), "rejected: SPF fail",
                    f"expected 550, got {last}")

    def step_dkim_sign(self) -> None:
        self.say("\n4. Outgoing mail from the server's own network (127.0.0.1) is DKIM-signed")
        ok, last = self.deliver(helo="localhost", sender=f"carol@{OUR_DOMAIN}",
                                rcpt="dave@good.test", source="127.0.0.1",
                                data=message(f"carol@{OUR_DOMAIN}", "dave@good.test", "report"))
        msg = self.wait_message(2) if ok else None
        sigs = msg.headers("DKIM-Signature") if msg else []
        if msg is not None:
            self.show_headers(msg, ("DKIM-Signature",))
            self.say(f"   verified against the demo DNS: {self.verify(msg)}")
        self.expect(bool(sigs), f"signed with d={OUR_DOMAIN} s={SELECTOR}",
                    f"no DKIM-Signature ({last})")

    def verify(self, msg: SinkMessage) -> str:
        from mxguard.auth.dkim import parse_message, verify
        from mxguard.dns import Resolver

        assert self.dns is not None
        headers, body = parse_message(msg.data)
        cfg = config.DnsConfig(nameservers=[self.dns.address], timeout=3)
        results = asyncio.run(verify(headers, body, Resolver(cfg)))
        return ", ".join(f"dkim={r.result} (d={r.domain} s={r.selector})" for r in results) \
            or "no signature"

    def step_gtube(self) -> None:
        self.say("\n5. The GTUBE test string (content scoring)")
        count = len(self.sink.messages) if self.sink else 0
        ok, last = self.deliver(helo=GOOD_HELO, sender="alice@good.test",
                                rcpt=f"bob@{OUR_DOMAIN}",
                                data=message("alice@good.test", f"bob@{OUR_DOMAIN}", "gtube",
                                             f"This is spam.\n{GTUBE}\n"))
        msg = self.wait_message(count + 1) if ok else None
        if msg is not None and not msg.headers("X-Spam-Status"):
            self.say("   skipped: content scoring is not active in this build (the message "
                     "was not scanned)")
            return
        flagged = msg is not None and any(v.upper().startswith("YES")
                                          for v in msg.headers("X-Spam-Flag"))
        if msg is not None:
            self.show_headers(msg, ("X-Spam-Flag", "X-Spam-Status"))
        self.expect(flagged or last.startswith("5"), "tagged as spam" if ok else "rejected as spam",
                    f"GTUBE neither tagged nor rejected ({last})")

    # ------------------------------------------------------------ stop

    def stop(self) -> None:
        steps: list[Callable[[], None]] = []
        if self.postfix is not None:
            steps.append(self.postfix.stop)
        if self.mxguard is not None:
            steps.append(self.stop_mxguard)
        for srv in (self.sink, self.dns):
            if srv is not None:
                steps.append(srv.stop)
        for step in steps:
            try:
                step()
            except Exception as exc:  # keep cleaning up the rest
                click.echo(f"mxguard demo: cleanup: {exc}", err=True)

    def stop_mxguard(self) -> None:
        proc = self.mxguard
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@click.command("demo")
@click.option("--keep", is_flag=True, help="keep the work directory (configs, logs)")
@click.option("--delay", type=click.IntRange(1, 60), default=2, show_default=True,
              help="greylisting delay of the demo, in seconds")
def demo(keep: bool, delay: int) -> None:
    """Run a private Postfix + mxguard + DNS on loopback and walk through the checks."""
    problem = postfix_missing()
    if problem:
        click.echo(f"mxguard demo: {problem}", err=True)
        sys.exit(2)
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="mxgdemo-", dir="/tmp"))
    workdir.chmod(0o755)
    click.echo(f"mxguard demo: everything below runs on loopback under {workdir}; your own "
               "Postfix and DNS are not touched.")
    run = Demo(workdir, delay)
    try:
        run.start()
        for step in (run.step_bad_helo, run.step_greylist, run.step_spf_fail,
                     run.step_dkim_sign, run.step_gtube):
            step()
    except (RuntimeError, OSError) as exc:
        run.failed.append(str(exc))
        click.echo(f"mxguard demo: {exc}", err=True)
    except KeyboardInterrupt:
        run.failed.append("interrupted")
    finally:
        run.stop()
        if keep:
            click.echo(f"kept {workdir} (mxguard.log, pf/maillog, mxguard.toml)")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    took = time.monotonic() - started
    if run.failed:
        click.echo(f"\ndemo finished in {took:.0f} s with {len(run.failed)} unexpected "
                   "result(s)")
        sys.exit(1)
    click.echo(f"\ndemo finished in {took:.0f} s: every step behaved as described; all "
               "stopped and removed.")


__all__ = ["demo"]
