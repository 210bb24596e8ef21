"""A private, real Postfix (3.7) instance on loopback: the integration
tests, the benchmarks and ``mxguard demo`` all run this one. SMTP clients
for it are in :mod:`mxguard.testing.smtp`, its final hop is
:class:`mxguard.testing.sink.Sink`.

    sink = Sink().start()
    with PostfixInstance(Path("/tmp/mxgpf-x"), sink.port,
                         {"smtpd_recipient_restrictions": "reject"}) as pf:
        t = send(pf.smtp_port, helo="client.test", mail_from="a@b.test",
                 rcpts=["u@example.test"], source_ip="127.0.0.7")
        assert t.rcpts[0].code == 554

How the instance is built (no change to /etc/postfix, works as root on a
fresh Debian machine with the postfix package installed and *no*
/etc/postfix/main.cf, i.e. debconf "No configuration"):

* ``WORKDIR/etc``   main.cf + master.cf; passed as ``postfix -c WORKDIR/etc``.
  Postfix only requires ``alternate_config_directories`` for non-root
  callers of set-gid commands; root may use any ``-c`` directory.
* ``WORKDIR/spool`` queue_directory and ``WORKDIR/data`` data_directory:
  created by us with the owner/group/mode listed in Postfix's own
  ``/etc/postfix/postfix-files`` (queue root-owned 0755, subdirectories
  owned by ``mail_owner`` postfix / ``setgid_group`` postdrop, data owned
  by postfix). ``postfix start`` would create them itself (post-install
  create-missing), just slower. WORKDIR is made 0755 and every ancestor
  must be searchable by the postfix user (``/tmp/...`` is; pytest's
  tmp_path is not).
* main.cf/master.cf are back-dated 5 s: Postfix otherwise waits until
  main.cf is 2 s old before trusting it (~2 s per start).
* every service in master.cf runs with chroot off (``n``), the SMTP server
  listens on ``127.0.0.1:smtp_port`` only, logging goes to
  ``WORKDIR/maillog`` through the ``postlog`` service.
* all mail is relayed to the sink: ``relayhost = [127.0.0.1]:sink_port``,
  ``mydestination`` empty, ``relay_domains`` = the given domains.
  ``smtp_dns_support_level = disabled``, ``smtpd_peername_lookup = no``
  and an explicit ``myhostname``: this Postfix never sends a DNS query
  (the machine's resolver is not on loopback). Use XCLIENT NAME=... to
  give a client a name.
* :func:`policy_wiring` / :func:`milter_wiring`: the main.cf lines that wire
  it to mxguard's policy and milter doors (or let ``mxguard postfix setup
  --config-dir WORKDIR/etc`` edit the files written by :meth:`write_config`
  before :meth:`start`, as the demo does).

Keep ``workdir`` short (e.g. ``/tmp/mxgpf-XXXX``): Postfix's UNIX-domain
sockets live under it and socket paths are limited to 107 bytes.

``postfix start`` leaves the master daemon orphaned; on machines whose
PID 1 does not reap orphans (containers) it would stay a zombie after
``stop()``. The instance therefore makes the calling process a child
subreaper (Linux prctl) and reaps its own Postfix processes on stop.
Needs root (the daemons switch to the ``postfix`` user): :func:`postfix_missing`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import smtplib
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mxguard.testing import procs
from mxguard.testing.ports import free_port
from mxguard.testing.smtp import DEFAULT_DOMAIN

MASTER_CF = """\
# private instance: loopback only, every service chroot=n
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
tlsmgr    unix  - - n 1000? 1 tlsmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
proxywrite unix - - n - 1 proxymap
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


class PostfixError(RuntimeError):
    """A postfix command failed; the message includes its output and the maillog tail."""


def find_command(name: str) -> str | None:
    """Absolute path of a Postfix command, as ``mxguard postfix setup`` finds it."""
    # imported here: mxguard.cli registers `mxguard demo`, which imports this module
    from mxguard.cli.postfix_conf import find_command as find

    return find(name)


def postfix_available() -> bool:
    """The Postfix commands this module runs are installed."""
    return all(find_command(n) for n in ("postfix", "postqueue", "postconf"))


def postfix_missing() -> str | None:
    """None when a private Postfix can run here, else what is missing."""
    if not postfix_available():
        return "Postfix is not installed (Debian: apt-get install postfix)"
    if os.geteuid() != 0:
        return "a private Postfix must be started as root"
    return None


def _check_traversable(path: Path) -> None:
    """Postfix daemons (user postfix) open files under ``path`` by absolute
    name: every ancestor must be searchable by others (pytest's own
    tmp_path, under a 0700 directory, is not)."""
    for parent in path.parents:
        if not parent.stat().st_mode & 0o001:
            raise ValueError(
                f"{parent} is not searchable by the postfix user (mode "
                f"{parent.stat().st_mode & 0o777:o}); put the instance under /tmp")


# (("queue"|"data", relative dir), owner, group, mode): Postfix 3.7's postfix-files
_FALLBACK_LAYOUT: list[tuple[tuple[str, str], str, str, int]] = [
    (("data", ""), "postfix", "root", 0o700),
    (("queue", ""), "root", "root", 0o755),
    *((("queue", d), "postfix", "root", 0o700) for d in (
        "active", "bounce", "corrupt", "defer", "deferred", "flush", "hold",
        "incoming", "private", "saved", "trace")),
    (("queue", "maildrop"), "postfix", "postdrop", 0o730),
    (("queue", "public"), "postfix", "postdrop", 0o710),
    (("queue", "pid"), "root", "root", 0o755),
]


def _queue_layout() -> list[tuple[tuple[str, str], str, str, int]]:
    """The queue/data directory layout from ``$meta_directory/postfix-files``
    (falls back to the Postfix 3.7 layout)."""
    meta = Path("/etc/postfix/postfix-files")
    try:
        lines = meta.read_text().splitlines()
    except OSError:
        return _FALLBACK_LAYOUT
    subst = {"$mail_owner": "postfix", "$setgid_group": "postdrop", "-": "root"}
    layout = []
    for line in lines:
        parts = line.split(":")
        if len(parts) < 5 or parts[1] != "d":
            continue
        path = parts[0]
        for var, kind in (("$queue_directory", "queue"), ("$data_directory", "data")):
            if path == var or path.startswith(var + "/"):
                rel = path[len(var) + 1:]
                layout.append(((kind, rel), subst.get(parts[2], parts[2]),
                               subst.get(parts[3], parts[3]), int(parts[4], 8)))
    if not any(k == ("queue", "") for k, *_ in layout):
        return _FALLBACK_LAYOUT
    layout.sort(key=lambda e: (e[0][0], e[0][1].count("/"), e[0][1]))
    return layout


# ---------------------------------------------------------------------------


class PostfixInstance:
    """A private Postfix instance under ``workdir`` relaying everything to a sink.

    ``main_cf_extra`` overrides/extends the generated main.cf (see
    :meth:`main_cf`), e.g. ``{"smtpd_recipient_restrictions":
    "permit_mynetworks, reject_unauth_destination, check_policy_service
    inet:127.0.0.1:PORT"}``. ``master_cf_extra`` lines are appended to
    master.cf verbatim.
    """

    def __init__(
        self,
        workdir: Path,
        sink_port: int,
        main_cf_extra: Mapping[str, str] | None = None,
        *,
        mynetworks: str = "127.0.0.1/32",
        relay_domains: Sequence[str] = (DEFAULT_DOMAIN,),
        myhostname: str = f"mx.{DEFAULT_DOMAIN}",
        smtp_port: int | None = None,
        master_cf_extra: Sequence[str] = (),
    ) -> None:
        self.workdir = Path(workdir).absolute()
        self.sink_port = sink_port
        self.main_cf_extra: dict[str, str] = dict(main_cf_extra or {})
        self.mynetworks = mynetworks
        self.relay_domains = list(relay_domains)
        self.myhostname = myhostname
        self.smtp_port = smtp_port or free_port()
        self.master_cf_extra = list(master_cf_extra)
        self.config_dir = self.workdir / "etc"
        self.queue_dir = self.workdir / "spool"
        self.data_dir = self.workdir / "data"
        self.maillog = self.workdir / "maillog"
        self.master_pid: int | None = None
        self._started = False
        self._written = False
        if len(str(self.queue_dir / "public" / "postlog")) > 100:
            raise ValueError(f"workdir too long for UNIX socket paths: {self.workdir}")

    # configuration -------------------------------------------------------
    def main_cf(self) -> dict[str, str]:
        """The effective main.cf parameters (base settings + main_cf_extra)."""
        wd = str(self.workdir)
        base: dict[str, str] = {
            "compatibility_level": "3.6", "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir), "mail_owner": "postfix",
            "setgid_group": "postdrop", "maillog_file": str(self.maillog),
            "maillog_file_prefixes": wd, "myhostname": self.myhostname,
            "mydomain": self.relay_domains[0] if self.relay_domains else DEFAULT_DOMAIN,
            "myorigin": "$mydomain", "mydestination": "", "local_recipient_maps": "",
            "local_transport": "error:5.1.1 local delivery is disabled in this private instance",
            "alias_maps": "", "alias_database": "",
            "relay_domains": ", ".join(self.relay_domains),
            "relayhost": f"[127.0.0.1]:{self.sink_port}",
            "default_transport": "smtp", "relay_transport": "relay",
            "inet_interfaces": "127.0.0.1", "inet_protocols": "ipv4",
            "mynetworks": self.mynetworks,
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "smtpd_authorized_xclient_hosts": "127.0.0.0/8",
            # never talk DNS: the machine's resolver is not on loopback
            "smtpd_peername_lookup": "no", "smtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            "smtpd_delay_reject": "yes", "smtpd_helo_required": "yes",
            "smtpd_error_sleep_time": "0s", "smtpd_soft_error_limit": "100",
            "smtpd_hard_error_limit": "100", "in_flow_delay": "0s",
            "smtp_connection_cache_on_demand": "no", "smtp_connect_timeout": "5s",
            "smtp_tls_security_level": "none", "smtpd_tls_security_level": "none",
            "queue_run_delay": "1s", "minimal_backoff_time": "2s",
            "maximal_backoff_time": "4s", "notify_classes": "", "biff": "no",
            "smtputf8_enable": "no",
        }
        base.update(self.main_cf_extra)
        return base

    def master_cf(self) -> list[str]:
        return MASTER_CF.format(port=self.smtp_port).splitlines() + self.master_cf_extra

    def write_config(self) -> None:
        """Create WORKDIR and write WORKDIR/etc/main.cf + master.cf. :meth:`start`
        does this unless it was done before (then the files may have been
        edited in between, e.g. by ``mxguard postfix setup``)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.workdir.chmod(0o755)
        self.config_dir.mkdir(exist_ok=True)
        self.config_dir.chmod(0o755)
        lines = []
        for key, value in self.main_cf().items():
            if "\n" in value or "\n" in key:
                raise ValueError(f"main.cf {key}: newlines are not allowed")
            lines.append(f"{key} = {value}")
        (self.config_dir / "main.cf").write_text("\n".join(lines) + "\n")
        (self.config_dir / "master.cf").write_text("\n".join(self.master_cf()) + "\n")
        self._written = True
        self._backdate()

    def _backdate(self) -> None:
        # Postfix waits (in 300 ms steps) until main.cf is >= 2 s old before
        # it trusts it ("file may still be being edited"); back-date instead.
        old = time.time() - 5
        for name in ("main.cf", "master.cf"):
            os.utime(self.config_dir / name, (old, old))

    # commands ------------------------------------------------------------
    def _run(self, cmd: str, *args: str, timeout: float = 30.0,
             check: bool = True) -> subprocess.CompletedProcess[str]:
        exe = find_command(cmd)
        if exe is None:
            raise PostfixError(f"{cmd} not found (Debian: apt-get install postfix)")
        argv = [exe, "-c", str(self.config_dir), *args]
        env = {k: v for k, v in os.environ.items() if k not in ("MAIL_CONFIG", "MAIL_DEBUG")}
        try:
            res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                 env=env, stdin=subprocess.DEVNULL, check=False)
        except subprocess.TimeoutExpired as exc:
            raise PostfixError(f"{' '.join(argv)} timed out after {timeout}s\n"
                               f"{self._log_tail()}") from exc
        if check and res.returncode != 0:
            raise PostfixError(
                f"{' '.join(argv)} exited {res.returncode}\nstdout: {res.stdout}\n"
                f"stderr: {res.stderr}\n{self._log_tail()}")
        return res

    def _log_tail(self, lines: int = 40) -> str:
        text = self.maillog_text()
        return "maillog tail:\n" + "\n".join(text.splitlines()[-lines:])

    def postconf(self, name: str) -> str:
        """The effective value of main.cf parameter ``name`` (``postconf -h``)."""
        return self._run("postconf", "-h", name).stdout.rstrip("\n")

    # lifecycle -----------------------------------------------------------
    def start(self, timeout: float = 30.0) -> PostfixInstance:
        if self._started:
            return self
        procs.become_subreaper()
        if not self._written:
            self.write_config()
        _check_traversable(self.workdir)
        self._make_queue_dirs()
        self._backdate()
        self._started = True  # from here on stop() has something to clean
        try:
            self._run("postfix", "start", timeout=timeout)
            self.master_pid = self._read_master_pid()
            self._wait_banner(timeout=10.0)
        except BaseException:
            self.stop()
            raise
        return self

    def _make_queue_dirs(self) -> None:
        """Create queue_directory/data_directory and their subdirectories with
        the owner/group/mode that Postfix's own postfix-files lists. ``postfix
        start`` would create them too (post-install create-missing) but
        takes ~2 s longer doing so."""
        for rel, owner, group, mode in _queue_layout():
            base = self.queue_dir if rel[0] == "queue" else self.data_dir
            d = base / rel[1] if rel[1] else base
            d.mkdir(exist_ok=True)
            shutil.chown(d, owner, group)
            d.chmod(mode)

    def _read_master_pid(self) -> int | None:
        try:
            return int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _wait_banner(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                with smtplib.SMTP("127.0.0.1", self.smtp_port, local_hostname="localhost",
                                  timeout=2) as s:
                    s.docmd("QUIT")
                return
            except (OSError, smtplib.SMTPException) as exc:
                last = exc
                time.sleep(0.05)
        raise PostfixError(f"no SMTP banner on 127.0.0.1:{self.smtp_port} ({last})\n"
                           f"{self._log_tail()}")

    def pids(self) -> list[int]:
        """Live processes of this instance: the master's session, plus anything
        whose environment names this config dir (MAIL_CONFIG)."""
        entry = b"MAIL_CONFIG=" + str(self.config_dir).encode()
        me = os.getpid()
        found = []
        for pid in procs.all_pids():
            if pid == me:
                continue
            st = procs.proc_stat(pid)
            if st is None or st[0] in ("Z", "X"):
                continue
            if (self.master_pid is not None and st[2] == self.master_pid) or \
                    procs.environ_has(pid, entry):
                found.append(pid)
        return found

    def _our_zombies(self) -> list[int]:
        """Zombies of this instance (or Postfix helper commands) that were
        re-parented to this process; only we can reap them."""
        me = os.getpid()
        found = []
        for pid in procs.all_pids():
            st = procs.proc_stat(pid)
            if st is None or st[0] != "Z" or st[1] != me:
                continue
            if (self.master_pid is not None and st[2] == self.master_pid) or \
                    st[3] in ("master", "postsuper"):
                found.append(pid)
        return found

    def _reap(self) -> None:
        for pid in self._our_zombies():
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)

    def _wait_gone(self, pids: Sequence[int], timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        left = [p for p in pids if procs.alive(p)]
        while left and time.monotonic() < deadline:
            time.sleep(0.05)
            self._reap()
            left = [p for p in left if procs.alive(p)]
        return left

    def stop(self) -> None:
        """Stop the instance and kill anything of it that is left. Idempotent."""
        if not self._started:
            return
        master = self.master_pid or self._read_master_pid()
        self.master_pid = master
        if master is not None and procs.alive(master):
            # what "postfix stop" does, minus its 1 s polling: SIGTERM makes
            # the master terminate its children and exit
            with contextlib.suppress(ProcessLookupError):
                os.kill(master, signal.SIGTERM)
            self._wait_gone([master], 10.0)
        for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0)):
            left = self.pids()
            if not left:
                break
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            self._wait_gone(left, wait)
        # children die just after the master: reap those re-parented to us
        deadline = time.monotonic() + 3.0
        while True:
            self._reap()
            if not self._our_zombies() or time.monotonic() >= deadline:
                break
            time.sleep(0.02)
        self._started = False

    def __enter__(self) -> PostfixInstance:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._started and self.master_pid is not None and procs.alive(self.master_pid)

    def reload(self) -> None:
        """``postfix reload``: re-read main.cf/master.cf (new smtpd processes
        pick up the change; waits a moment for the old ones to go)."""
        before = self.maillog_text().count("reload -- version")
        self._run("postfix", "reload")
        deadline = time.monotonic() + 10.0
        while self.maillog_text().count("reload -- version") <= before:
            if time.monotonic() >= deadline:
                raise PostfixError(f"master did not log its reload\n{self._log_tail()}")
            time.sleep(0.05)
        self._reap()

    def update_main_cf(self, params: Mapping[str, str], reload: bool = True) -> None:
        """Merge ``params`` into main_cf_extra, rewrite main.cf and reload."""
        self.main_cf_extra.update(params)
        self.write_config()
        if reload and self._started:
            self.reload()

    # logs and queue --------------------------------------------------------
    def maillog_text(self) -> str:
        try:
            return self.maillog.read_text(errors="replace")
        except OSError:
            return ""

    def wait_for_log(self, pattern: str | re.Pattern[str], timeout: float = 10.0) -> str:
        """Wait until a maillog line matches ``pattern`` (regex); return that line."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            for line in self.maillog_text().splitlines():
                if rx.search(line):
                    return line
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no maillog line matching {rx.pattern!r} within "
                                   f"{timeout}s\n{self._log_tail()}")
            time.sleep(0.1)

    def flush(self) -> None:
        """``postqueue -f``: attempt delivery of all queued mail now."""
        self._run("postqueue", "-f")

    def queue(self) -> list[dict[str, Any]]:
        """The queue as ``postqueue -j`` reports it (one dict per message)."""
        out = self._run("postqueue", "-j").stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def queue_ids(self) -> list[str]:
        return [str(m["queue_id"]) for m in self.queue()]

    def queue_empty(self) -> bool:
        return not self.queue()

    def wait_queue_empty(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.queue_empty():
            if time.monotonic() >= deadline:
                raise TimeoutError(f"queue not empty after {timeout}s: {self.queue()}")
            time.sleep(0.1)

    def delete_queue(self) -> None:
        """``postsuper -d ALL``."""
        self._run("postsuper", "-d", "ALL")


def policy_wiring(port: int) -> dict[str, str]:
    """main.cf lines that wire Postfix to mxguard's policy door, as README says."""
    policy = f"check_policy_service inet:127.0.0.1:{port}"
    return {
        "smtpd_helo_restrictions":
            f"check_policy_service {{ inet:127.0.0.1:{port}, policy_context=helo }}",
        "smtpd_recipient_restrictions": f"permit_mynetworks, reject_unauth_destination, {policy}",
        "smtpd_data_restrictions": policy,
        "smtpd_policy_service_default_action": "DUNNO",
    }


def milter_wiring(port: int, *, non_smtpd: bool = True) -> dict[str, str]:
    """main.cf lines that wire Postfix to mxguard's milter door (and, with
    ``non_smtpd``, local submissions too); a milter failure tempfails."""
    milter = f"inet:127.0.0.1:{port}"
    lines = {"smtpd_milters": milter, "milter_default_action": "tempfail",
             "milter_protocol": "6"}
    if non_smtpd:
        lines["non_smtpd_milters"] = milter
    return lines
