"""``mxguard doctor``: check the running set-up end to end and say what to fix.

    mxguard doctor [--config FILE] [--postfix-config-dir /etc/postfix] [--ip IP] [--helo NAME]

One ``PASS`` / ``WARN`` / ``FAIL`` line per finding, each problem followed by
its fix, in this order:

* **config**: the mxguard config loads (else nothing else is checked);
* **daemon**: the policy door answers a real policy request (an
  ``END-OF-MESSAGE`` request, which runs no check and stores nothing) and
  the milter door answers a milter ``OPTNEG`` (the codec of
  :mod:`mxguard.protocols.milter`), both within ``--timeout``;
* **Postfix**: main.cf calls both doors as ``mxguard postfix setup`` would
  wire them (its plan must be empty), and Postfix runs;
* **DKIM keys**: each signing key (rotation applied) loads and only its
  owner may read it;
* **DNS** of each signing domain: the checks of ``mxguard dns check``, with
  ``--ip`` and the HELO name (default: Postfix's ``myhostname``).

Exit code 0 without FAIL lines, 1 with some.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import stat
import sys
from pathlib import Path

import click

from mxguard import config
from mxguard.auth.dkim_keys import (
    DkimKeyError,
    check_key_permissions,
    key_type,
    parse_key_entry,
    read_private_key,
)
from mxguard.auth.dkim_rotation import RotationError, active_keys
from mxguard.auth.spf_lint import Lint
from mxguard.cli.common import config_option, ip_option
from mxguard.cli.dns import Section, check_domain, print_sections
from mxguard.cli.postfix_conf import (
    DEFAULT_CONFIG_DIR,
    SetupError,
    postconf_value,
    postfix_running,
)
from mxguard.cli.postfix_plan import make_plan
from mxguard.protocols import milter as m

DOCTOR_INSTANCE = "mxguard-doctor"


def _start_fix(door: str) -> str:
    return ("start mxguard (systemctl start mxguard; journalctl -u mxguard says why it "
            f"stopped), or make [{door}] listen match what it listens on")


async def _open(listen: str, timeout: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if listen.startswith("unix:"):
        return await asyncio.wait_for(asyncio.open_unix_connection(listen[5:]), timeout)
    if listen.startswith("["):
        host, _, port = listen[1:].partition("]")
        port = port.lstrip(":")
    else:
        host, _, port = listen.rpartition(":")
    if host in ("", "0.0.0.0", "*"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return await asyncio.wait_for(asyncio.open_connection(host, int(port)), timeout)


def policy_request() -> bytes:
    """A harmless request: END-OF-MESSAGE runs no check and stores nothing."""
    attrs = {
        "request": "smtpd_access_policy", "protocol_state": "END-OF-MESSAGE",
        "protocol_name": "ESMTP", "client_address": "127.0.0.1", "client_name": "localhost",
        "reverse_client_name": "localhost", "helo_name": "localhost", "sender": "",
        "recipient": "", "recipient_count": "0", "queue_id": "",
        "instance": f"{DOCTOR_INSTANCE}.{os.getpid()}", "size": "0",
    }
    return "".join(f"{k}={v}\n" for k, v in attrs.items()).encode() + b"\n"


async def check_policy(listen: str, timeout: float, lint: Lint) -> None:
    where = f"policy door {listen}"
    try:
        reader, writer = await _open(listen, timeout)
    except (OSError, TimeoutError) as exc:
        lint.say("FAIL", f"{where}: cannot connect ({_why(exc)})", _start_fix("policy"))
        return
    try:
        writer.write(policy_request())
        await writer.drain()
        reply = await asyncio.wait_for(reader.readuntil(b"\n\n"), timeout)
    except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        lint.say("FAIL", f"{where}: no policy reply ({_why(exc)})",
                 "is another program listening there? (ss -ltnp) mxguard's log says more")
        return
    finally:
        writer.close()
    text = reply.decode("utf-8", "replace").strip()
    if text.startswith("action="):
        lint.say("PASS", f"{where} answers a policy request ({text})")
    else:
        lint.say("FAIL", f"{where} answered {text[:60]!r}, not a policy reply",
                 "another program listens there (ss -ltnp): stop it or move [policy] listen")


async def check_milter(listen: str, timeout: float, lint: Lint) -> None:
    where = f"milter door {listen}"
    try:
        reader, writer = await _open(listen, timeout)
    except (OSError, TimeoutError) as exc:
        lint.say("FAIL", f"{where}: cannot connect ({_why(exc)})", _start_fix("milter"))
        return
    decoder = m.ReplyDecoder()
    try:
        writer.write(m.OptNeg(m.VERSION, 0x1FF, 0x1FFFFF).encode())
        await writer.drain()
        replies: list[object] = []
        while not replies:
            chunk = await asyncio.wait_for(reader.read(65536), timeout)
            if not chunk:
                raise ConnectionResetError("closed by the peer")
            replies = list(decoder.feed(chunk))
        writer.write(m.Quit().encode())
        await writer.drain()
    except (OSError, TimeoutError, m.MilterProtocolError) as exc:
        lint.say("FAIL", f"{where}: no milter negotiation ({_why(exc)})",
                 "is another program listening there? (ss -ltnp) mxguard's log says more")
        return
    finally:
        writer.close()
    reply = replies[0]
    if isinstance(reply, m.OptNegReply):
        lint.say("PASS", f"{where} answers milter OPTNEG (protocol version {reply.version})")
    else:
        lint.say("FAIL", f"{where} answered {type(reply).__name__} to OPTNEG",
                 "another program listens there: stop it or move [milter] listen")


def _why(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused: nothing listens there"
    if isinstance(exc, FileNotFoundError):
        return f"no socket at {exc.filename}" if exc.filename else "no such socket"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def check_postfix(cfg: config.Config, config_dir: Path, lint: Lint) -> str | None:
    """Postfix wiring; returns its myhostname (None when Postfix cannot be read)."""
    fix = f"mxguard postfix setup --apply --config-dir {config_dir}"
    try:
        plan = make_plan(cfg, config_dir)
    except SetupError as exc:
        lint.say("FAIL", f"cannot read the Postfix configuration: {exc}",
                 "install Postfix, or give --postfix-config-dir")
        return None
    if plan.changes:
        for change in plan.main_cf_changes:
            lint.say("FAIL", f"main.cf needs {change.what}", fix)
        if not plan.main_cf_changes:
            lint.say("WARN", f"master.cf: {len(plan.changes)} change(s) pending",
                     fix + " (see its diff)")
    else:
        lint.say("PASS", f"main.cf calls the policy door {plan.policy} and the milter "
                 f"{plan.milter}" if cfg.milter.enabled else
                 f"main.cf calls the policy door {plan.policy}")
    for note in plan.notes:
        lint.note(f"note: {note}")
    try:
        running = postfix_running(config_dir)
        hostname = postconf_value(config_dir, "myhostname")
    except SetupError as exc:
        lint.say("WARN", f"cannot ask Postfix: {exc}", "")
        return None
    if running:
        lint.say("PASS", f"Postfix ({config_dir}) is running")
    else:
        lint.say("FAIL", f"Postfix ({config_dir}) is not running",
                 "systemctl start postfix (or postfix -c DIR start)")
    return hostname or None


def check_keys(cfg: config.Config, lint: Lint) -> list[str]:
    """Every signing key: loads, not readable by others. Returns the signing domains."""
    try:
        entries = active_keys(cfg)
    except (RotationError, DkimKeyError) as exc:
        lint.say("FAIL", str(exc), "fix [dkim] keys or the rotation state file")
        return []
    if not entries:
        lint.say("WARN", "no DKIM key: outgoing mail is not signed",
                 "mxguard dkim rotate YOUR-DOMAIN, publish the record, then --advance")
        return []
    domains: list[str] = []
    for entry in entries:
        domain, selector, path = parse_key_entry(entry)
        if domain not in domains:
            domains.append(domain)
        try:
            check_key_permissions(path)
            key = read_private_key(path)
        except DkimKeyError as exc:
            lint.say("FAIL", f"{domain} {selector}: {exc}",
                     f"chmod 600 {path}; chown it to the user mxguard runs as")
            continue
        st = os.stat(path)
        try:
            owner = pwd.getpwuid(st.st_uid).pw_name
        except KeyError:
            owner = str(st.st_uid)
        bits = getattr(key, "key_size", 256)
        lint.say("PASS", f"{domain} {selector}: {path} ({key_type(key)} {bits}, mode "
                 f"{stat.S_IMODE(st.st_mode):04o}, owner {owner})")
    return domains


async def run_doctor(cfg: config.Config, config_dir: Path, ip: str | None, helo: str | None,
                     timeout: float, dns: bool) -> list[Section]:
    daemon, postfix, keys = Section("mxguard daemon"), Section(f"Postfix ({config_dir})"), \
        Section("DKIM keys")
    await check_policy(cfg.policy.listen, timeout, daemon.lint)
    if cfg.milter.enabled:
        await check_milter(cfg.milter.listen, timeout, daemon.lint)
    else:
        daemon.lint.say("WARN", "[milter] enabled = false: no DKIM signing or verification",
                        "set [milter] enabled = true")
    hostname = await asyncio.to_thread(check_postfix, cfg, config_dir, postfix.lint)
    domains = check_keys(cfg, keys.lint)
    sections = [daemon, postfix, keys]
    if dns:
        for domain in domains:
            found = await check_domain(cfg, domain, ip, helo or hostname)
            for s in found:
                s.title = f"DNS {domain}: {s.title}"
            sections += found
    return sections


@click.command("doctor")
@config_option("mxguard TOML config (default: embedded defaults)")
@click.option("--postfix-config-dir", default=DEFAULT_CONFIG_DIR, show_default=True,
              type=click.Path(file_okay=False), help="Postfix configuration directory")
@click.option("--ip", callback=ip_option, default=None,
              help="the server's outbound address (SPF, reverse DNS)")
@click.option("--helo", default=None, help="HELO name to check (default: Postfix myhostname)")
@click.option("--timeout", type=click.FloatRange(0.1, 60), default=5.0, show_default=True,
              help="seconds to wait for each door")
@click.option("--no-dns", is_flag=True, help="skip the DNS checks of the signing domains")
def doctor(config_path: str | None, postfix_config_dir: str, ip: str | None, helo: str | None,
           timeout: float, no_dns: bool) -> None:
    """Check the set-up end to end (daemon, Postfix, keys, DNS) and print what to fix."""
    cdir = Path(postfix_config_dir).absolute()
    click.echo(f"mxguard doctor (config {config_path or '(defaults)'}, Postfix {cdir})")
    click.echo("config")
    try:
        cfg = config.load(config_path)
    except config.ConfigError as exc:
        click.echo(f"FAIL  {exc}")
        click.echo("      fix: mxguard config check FILE shows the same; correct the key")
        click.echo("result: FAIL (1 failed, 0 warnings)")
        sys.exit(1)
    click.echo(f"PASS  {cfg.source} loads")
    sections = asyncio.run(run_doctor(cfg, cdir, ip, helo, timeout, not no_dns))
    fails, warns = print_sections(sections)
    verdict = "FAIL" if fails else ("WARN" if warns else "PASS")
    click.echo(f"result: {verdict} ({fails} failed, {warns} warnings)")
    sys.exit(1 if fails else 0)


__all__ = ["check_milter", "check_policy", "doctor", "run_doctor"]
