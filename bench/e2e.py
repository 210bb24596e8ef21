"""End to end through a real Postfix: bare Postfix vs Postfix + mxguard (everything on).

    sudo python bench/e2e.py [--quick] [--concurrency 10] [--duration 12] [--rounds 2]
                             [--no-seed] [--no-workers] [--keep] [--profile FILE]

Everything runs on loopback: a private Postfix (mxguard.testing.postfix)
relaying to a counting SMTP sink (its own process), a test DNS server
(mxguard.testing.dns) publishing the sender domains, and an asyncio
SMTP load generator sending real messages (generated, ~2.3 KB and ~52 KB) from
varying source addresses 127.0.x.y with ``--concurrency`` clients.

Sender mix: 80 % good.example (SPF pass, DKIM-signed, DMARC p=reject -> pass),
10 % soft.example (SPF softfail, unsigned, DMARC p=none), 5 % bad.example (SPF
fail -> rejected by mxguard, by design not delivered), 5 % outgoing from the
internal host 127.0.0.1 (mxguard DKIM-signs them).

Configurations, alternated in the same run (one Postfix, main.cf switched
with ``postfix reload``):

* ``bare``        Postfix alone.
* ``mxguard``     Postfix + mxguard, ``workers = 1``: HELO (exempt_networks
                  empty), greylisting (``delay = 0``: every triplet passes at
                  first sight, the store is still read and written per
                  recipient), SPF, DKIM verify and sign, DMARC, content rules
                  and Bayes (a few messages learned first with ``mxguard
                  learn``, ``min_spam = min_ham = 5``); wired as
                  ``mxguard postfix setup`` / README do (policy at HELO, RCPT
                  and DATA; milter for smtpd and non-smtpd mail).
* ``mxguard-w2``  the same with ``[server] workers = 2``.
* ``seed``        the seed's stack (../shared/seed/spam-resistant-postfix.txt),
                  when its Debian packages are installed: Postfix's HELO
                  restrictions, postgrey (``--delay=1``, senders pre-passed),
                  policyd-spf spawned by Postfix, OpenDKIM (sign + verify,
                  smtpd and non-smtpd milter) and spamd via the
                  ``content_filter`` pipe re-injecting with sendmail. It runs in
                  a private mount namespace (unshare -m) where /etc/resolv.conf
                  says ``nameserver 127.0.0.1`` (the bench DNS also answers on
                  127.0.0.1:53) and /etc/postfix is the private instance's
                  config (so the pipe's sendmail/postdrop queue into it): the
                  host's resolver and Postfix are never touched. ``--no-seed``
                  skips it.

Per configuration and size: msgs/s (messages delivered to the sink per second,
from the first connection to the last delivery), tx/s (completed SMTP
transactions), p50/p99 SMTP transaction latency (connect to the reply to the
final dot), CPU ms per message of mxguard (all its processes) and of Postfix
(master and every child, reaped ones included), peak RSS (mxguard; mxguard +
Postfix) sampled every 0.2 s, and ratios to bare of the same size. Timings
are reported, never asserted. Must run as root (Postfix).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

from tests.support.daemon import MxguardProcess  # noqa: E402

from mxguard.testing.dns import DNSServer  # noqa: E402
from mxguard.testing.ports import free_port  # noqa: E402
from mxguard.testing.postfix import PostfixInstance, postfix_available  # noqa: E402

CLK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
RCPT_DOMAIN = "example.test"
WORDS = [
    "the", "meeting", "report", "budget", "quarter", "project", "team", "review", "schedule",
    "invoice", "shipment", "customer", "order", "account", "update", "details", "attached",
    "please", "find", "below", "regards", "thanks", "office", "monday", "friday", "approval",
    "draft", "version", "change", "request", "server", "network", "release", "plan", "notes",
    "agenda", "minutes", "summary", "contract", "offer",
]
SPAM_WORDS = [
    "viagra", "cheap", "pills", "winner", "lottery", "prize", "claim", "urgent", "money",
    "transfer", "bitcoin", "investment", "guaranteed", "free", "offer", "click", "unsubscribe",
    "casino", "bonus", "million", "dollars", "bank", "account", "verify", "password", "limited",
]


# ------------------------------------------------------------------ messages

def body_text(rng: random.Random, size: int, words: list[str]) -> str:
    lines, n = [], 0
    while n < size:
        line = " ".join(rng.choice(words) for _ in range(rng.randint(8, 13))).capitalize() + "."
        lines.append(line)
        n += len(line) + 2
    return "\r\n".join(lines) + "\r\n"


def make_message(rng: random.Random, sender: str, size: int, n: int, *,
                 spam: bool = False) -> bytes:
    words = SPAM_WORDS + WORDS[:10] if spam else WORDS
    head = (f"From: Sender {n} <{sender}>\r\nTo: <user{n % 10}@{RCPT_DOMAIN}>\r\n"
            f"Subject: {' '.join(rng.choice(words) for _ in range(5))}\r\n"
            f"Date: Tue, 24 Nov 2026 10:{n % 60:02d}:00 +0000\r\n"
            f"Message-ID: <{n}.{rng.randrange(10**9)}@{sender.split('@')[1]}>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n")
    return (head + "\r\n" + body_text(rng, size - len(head), words)).encode()


def dkim_sign(key: Any, raw: bytes) -> bytes:
    from mxguard.auth.dkim_keys import SigningKey
    from mxguard.auth.dkim_sign import sign

    head, _, body = raw.partition(b"\r\n\r\n")
    headers = [tuple(line.split(b":", 1)) for line in head.split(b"\r\n")]
    (value,) = sign(headers, body, [SigningKey("good.example", "e2e", key)])  # type: ignore[arg-type]
    return b"DKIM-Signature: " + value.encode() + b"\r\n" + raw


def message_pool(key: Any, size: int, rng: random.Random) -> list[tuple[str, str, bytes]]:
    """(kind, sender, data) x 40, mixed as described in the module doc."""
    pool: list[tuple[str, str, bytes]] = []
    for n in range(40):
        r = n % 20
        if r < 16:
            kind, sender = "good", f"alice{n % 8}@good.example"
            data = dkim_sign(key, make_message(rng, sender, size, n))
        elif r < 18:
            kind, sender = "soft", f"bob{n % 4}@soft.example"
            data = make_message(rng, sender, size, n)
        elif r < 19:
            kind, sender = "bad", f"eve{n % 4}@bad.example"
            data = make_message(rng, sender, size, n)
        else:
            kind, sender = "out", f"staff{n % 4}@good.example"
            data = make_message(rng, sender, size, n)
        pool.append((kind, sender, data))
    return pool


def dot_stuff(data: bytes) -> bytes:
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data.replace(b"\r\n.", b"\r\n..") + b".\r\n"


# ------------------------------------------------------------------ sink

def _sink_main(port: int, count: Any, last: Any, ready: Any, keep: str = "") -> None:
    """A counting SMTP sink (its own process: it must not slow the generator).
    With ``keep`` (a directory), each message's headers overwrite ``keep/last-<from
    domain>.txt``, to see what each configuration added."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 sink.test ESMTP\r\n")
        mail_from = ""
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                verb = line[:4].upper()
                if verb == b"DATA":
                    writer.write(b"354 go\r\n")
                    msg = await reader.readuntil(b"\r\n.\r\n")
                    if keep:
                        head = msg.partition(b"\r\n\r\n")[0]
                        dom = mail_from.rpartition("@")[2].strip("<> \r\n") or "null"
                        Path(keep, f"last-{dom}.txt").write_bytes(head + b"\r\n")
                    with count.get_lock():
                        count.value += 1
                    last.value = time.monotonic()
                    writer.write(b"250 2.0.0 Ok\r\n")
                elif verb == b"MAIL":
                    mail_from = line.decode("latin-1").split(":", 1)[-1].split()[0]
                    writer.write(b"250 Ok\r\n")
                elif verb in (b"EHLO", b"HELO"):
                    writer.write(b"250-sink.test\r\n250-8BITMIME\r\n250 PIPELINING\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    await writer.drain()
                    return
                else:
                    writer.write(b"250 Ok\r\n")
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=512,
                                            limit=1 << 22)
        ready.set()
        async with server:
            await server.serve_forever()

    asyncio.run(main())


# ------------------------------------------------------------------ load generator

class Result:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.codes: dict[str, int] = {}
        self.accepted = 0
        self.errors = 0


async def smtp_one(port: int, source: str, helo: str, sender: str, rcpt: str,
                   data: bytes) -> tuple[bool, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))

    async def reply() -> str:
        while True:
            line = await reader.readline()
            if not line:
                raise ConnectionError("closed")
            if line[3:4] != b"-":
                return line.decode("latin-1")

    try:
        r = await reply()
        for cmd in (f"EHLO {helo}", f"MAIL FROM:<{sender}>", f"RCPT TO:<{rcpt}>", "DATA"):
            if not r.startswith(("2", "3")):
                break
            writer.write(cmd.encode() + b"\r\n")
            r = await reply()
        else:
            writer.write(dot_stuff(data))
            r = await reply()
            writer.write(b"QUIT\r\n")
            return r.startswith("250"), r[:3]
        writer.write(b"QUIT\r\n")
        return False, r[:3]
    finally:
        writer.close()


async def generate(port: int, pool: list[tuple[str, str, bytes]], concurrency: int,
                   duration: float, seed: int) -> Result:
    res = Result()
    deadline = time.monotonic() + duration

    async def client(n: int) -> None:
        rng = random.Random(seed * 1000 + n)
        while time.monotonic() < deadline:
            kind, sender, data = rng.choice(pool)
            if kind == "out":
                source, helo = "127.0.0.1", "mx.example.test"
            else:
                source = f"127.0.{rng.randint(1, 8)}.{rng.randint(1, 250)}"
                helo = f"mail.{sender.split('@')[1]}"
            rcpt = f"user{rng.randrange(10)}@{RCPT_DOMAIN}"
            t = time.monotonic()
            try:
                ok, code = await smtp_one(port, source, helo, sender, rcpt, data)
            except (OSError, ConnectionError):
                res.errors += 1
                await asyncio.sleep(0.05)
                continue
            res.latencies.append(time.monotonic() - t)
            res.codes[code] = res.codes.get(code, 0) + 1
            res.accepted += ok

    await asyncio.gather(*(client(n) for n in range(concurrency)))
    return res


# ------------------------------------------------------------------ /proc

def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(name))
    return kids


def tree(roots: list[int]) -> list[int]:
    kids, out, todo = _children(), [], list(roots)
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def cpu_ticks(pids: list[int]) -> int:
    """utime+stime+cutime+cstime over a process tree: reaped children stay counted."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                f = fh.read().rsplit(")", 1)[1].split()
            total += sum(int(x) for x in f[11:15])
        except (OSError, IndexError, ValueError):
            pass
    return total


def thread_ticks(pids: list[int]) -> tuple[int, int, int]:
    """(event-loop threads user, all threads system, other threads user) CPU ticks:
    each process's main thread runs the event loop, the others are the
    to_thread pool (SQLite, RSA, hyperscan)."""
    loop = other = system = 0
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as fh:
                    f = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(tid) == pid:
                loop += int(f[11])
            else:
                other += int(f[11])
            system += int(f[12])
    return loop, system, other


def pss_bytes(pids: list[int]) -> int:
    """Proportional set size: pages shared after fork() counted once in all."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as fh:
                for line in fh:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except (OSError, IndexError, ValueError):
            pass
    return total


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as fh:
                total += int(fh.read().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            pass
    return total


class RssSampler(threading.Thread):
    def __init__(self, groups: dict[str, Callable[[], list[int]]]) -> None:
        super().__init__(daemon=True)
        self.groups = groups
        self.peak = dict.fromkeys(groups, 0)
        self.peak["mx_pss"] = 0
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            for name, pids in self.groups.items():
                self.peak[name] = max(self.peak[name], rss_bytes(pids()))
            self.peak["mx_pss"] = max(self.peak["mx_pss"], pss_bytes(self.groups["mx"]()))
            self.stop_event.wait(0.2)

    def stop(self) -> dict[str, int]:
        self.stop_event.set()
        self.join()
        return self.peak


# ------------------------------------------------------------------ set-up

def zone(key: Any) -> dict[str, list[tuple[str, Any]]]:
    from mxguard.auth.dkim_keys import public_key_record

    z: dict[str, list[tuple[str, Any]]] = {
        "good.example": [("TXT", "v=spf1 ip4:127.0.0.0/8 -all")],
        "_dmarc.good.example": [("TXT", "v=DMARC1; p=reject")],
        "e2e._domainkey.good.example": [("TXT", public_key_record(key))],
        "soft.example": [("TXT", "v=spf1 ip4:192.0.2.0/24 ~all")],
        "_dmarc.soft.example": [("TXT", "v=DMARC1; p=none")],
        "bad.example": [("TXT", "v=spf1 ip4:192.0.2.0/24 -all")],
        "_dmarc.bad.example": [("TXT", "v=DMARC1; p=reject")],
    }
    for d in ("good.example", "soft.example", "bad.example", "example.test"):
        z[f"mail.{d}"] = [("A", "127.0.0.1")]
        z[f"mx.{d}"] = [("A", "127.0.0.1")]
    return z


def mxguard_config(dns: DNSServer, keyfile: Path, workers: int) -> str:
    return (f"[server]\nworkers = {workers}\n"
            f'[dns]\nnameservers = ["{dns.address}"]\n'
            "[helo]\nexempt_networks = []\n"
            "[greylist]\ndelay = 0\n"
            f'[dkim]\ninternal_hosts = ["127.0.0.1/32"]\nkeys = ["good.example:e2e:{keyfile}"]\n'
            '[log]\nlevel = "warning"\n'
            "[bayes]\nmin_spam = 5\nmin_ham = 5\n")


def start_mxguard(tmp: Path, dns: DNSServer, keyfile: Path, workers: int,
                  learn_dir: Path) -> MxguardProcess:
    tmp.mkdir(parents=True, exist_ok=True)
    mx = MxguardProcess(tmp, mxguard_config(dns, keyfile, workers))
    mx.config.write_text(mx.config.read_text().replace(
        "[milter]\n", '[milter]\nauthserv_id = "mx.example.test"\n'))
    for kind in ("spam", "ham"):
        subprocess.run([sys.executable, "-m", "mxguard", "learn", "-c", str(mx.config),
                        f"--{kind}", "--no-progress", str(learn_dir / kind)],
                       check=True, capture_output=True)
    return mx.start()


def mxguard_main_cf(mx: MxguardProcess) -> dict[str, str]:
    milter = f"inet:127.0.0.1:{mx.milter_port}"
    policy = f"check_policy_service inet:127.0.0.1:{mx.port}"
    return {
        "smtpd_helo_restrictions":
            f"check_policy_service {{ inet:127.0.0.1:{mx.port}, policy_context=helo }}",
        "smtpd_recipient_restrictions": f"permit_mynetworks, reject_unauth_destination, {policy}",
        "smtpd_data_restrictions": policy,
        "smtpd_milters": milter, "non_smtpd_milters": milter,
        "milter_default_action": "tempfail", "milter_protocol": "6",
        "seed_content_filter": "",
    }


BARE_CF = {"smtpd_helo_restrictions": "", "smtpd_recipient_restrictions": "",
           "smtpd_data_restrictions": "", "smtpd_milters": "", "non_smtpd_milters": "",
           "seed_content_filter": ""}


# ------------------------------------------------------------------ the seed's stack

SEED_RESOLV = "nameserver 127.0.0.1\noptions attempts:1 timeout:1\n"


class SeedPostfix(PostfixInstance):
    """The smtpd line carries ``-o content_filter=$seed_content_filter`` (empty
    unless the seed configuration is on), so only mail from SMTP goes through
    the SpamAssassin pipe, as in the seed (mail re-injected by sendmail does not)."""

    def master_cf(self) -> list[str]:
        lines = super().master_cf()
        return [line + " -o content_filter=$seed_content_filter"
                if line.endswith(" smtpd") and " inet " in line else line for line in lines]


def in_private_resolv_namespace() -> bool:
    """True when /etc/resolv.conf is our loopback-only file (see main())."""
    try:
        return Path("/etc/resolv.conf").read_text() == SEED_RESOLV
    except OSError:
        return False


class SeedStack:
    """postgrey + policyd-spf (spawned by Postfix) + OpenDKIM + spamd, as the seed
    wires them. Only started inside the private mount namespace whose
    /etc/resolv.conf says ``nameserver 127.0.0.1`` (the bench's DNS on port 53)."""

    def __init__(self, work: Path, keyfile: Path) -> None:
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        os.chmod(work, 0o755)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.grey_port, self.dkim_port, self.spamd_port = free_port(), free_port(), free_port()
        self.keyfile = keyfile
        self.postfix_config = Path("/etc/postfix")
        self.spf_conf = work / "policyd-spf.conf"

    def start(self) -> SeedStack:
        w = self.work
        log = open(w / "seed.log", "ab")  # noqa: SIM115 - lives with the processes
        grey = w / "postgrey"
        grey.mkdir()
        shutil.chown(grey, "nobody", "nogroup")
        self.procs.append(subprocess.Popen(
            ["postgrey", f"--inet=127.0.0.1:{self.grey_port}", f"--dbdir={grey}",
             "--delay=1", "--user=nobody", "--group=nogroup",
             "--whitelist-clients=/dev/null", "--whitelist-recipients=/dev/null"],
            stdout=log, stderr=log))
        # Debian's policyd-spf.conf with skip_addresses narrowed from 127.0.0.0/8
        # (the bench's clients) to the internal host, as mxguard's SPF sees them.
        self.spf_conf.write_text(
            "debugLevel = 1\nTestOnly = 1\nHELO_reject = Fail\nMail_From_reject = Fail\n"
            "PermError_reject = False\nTempError_Defer = False\n"
            "skip_addresses = 127.0.0.1/32,::1\n")
        os.chmod(self.spf_conf, 0o644)
        dk = w / "opendkim"
        dk.mkdir()
        key = dk / "key.pem"
        shutil.copy(self.keyfile, key)
        os.chmod(key, 0o600)
        conf = dk / "opendkim.conf"
        conf.write_text("\n".join([
            "Mode sv", f"Socket inet:{self.dkim_port}@127.0.0.1", "Background no",
            f"PidFile {dk}/opendkim.pid", "Domain good.example", "Selector e2e",
            f"KeyFile {key}", "InternalHosts 127.0.0.1", "Canonicalization relaxed/relaxed",
            "Nameservers 127.0.0.1", "QueryCache yes", "RequireSafeKeys no", "Syslog no",
            "DNSTimeout 5", "UserID opendkim" if _user("opendkim") else ""]) + "\n")
        if _user("opendkim"):
            for path in (dk, key):
                shutil.chown(path, "opendkim")
        self.procs.append(subprocess.Popen(["opendkim", "-f", "-x", str(conf)],
                                           stdout=log, stderr=log))
        home = w / "spamd-home"
        home.mkdir()
        shutil.chown(home, "nobody", "nogroup")
        self.procs.append(subprocess.Popen(
            ["spamd", "-L", f"--listen=127.0.0.1:{self.spamd_port}", "--allowed-ips=127.0.0.1",
             "-u", "nobody", "-g", "nogroup", "-x", f"--helper-home-dir={home}",
             "--min-children=2", "--max-children=5", f"--pidfile={w}/spamd.pid"],
            stdout=log, stderr=log))
        for port, what in ((self.grey_port, "postgrey"), (self.dkim_port, "opendkim"),
                           (self.spamd_port, "spamd")):
            deadline = time.monotonic() + 60
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), 0.2).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{what} did not listen; see {w}/seed.log") from None
                    time.sleep(0.1)
        return self

    def pids(self) -> list[int]:
        return tree([p.pid for p in self.procs if p.poll() is None])

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()

    def master_cf_extra(self) -> list[str]:
        return [
            "policy-spf unix - n n - 0 spawn user=nobody argv=/usr/bin/policyd-spf "
            f"{self.spf_conf}",
            "spamassassin unix - n n - - pipe user=nobody argv=/usr/bin/spamc -d 127.0.0.1 "
            f"-p {self.spamd_port} -f -e /usr/sbin/sendmail -oi "
            "-f ${sender} ${recipient}",
        ]

    def use_postfix_config(self, config_dir: Path) -> None:
        """The pipe's ``sendmail`` (and its setgid ``postdrop``) read /etc/postfix:
        bind-mount the private instance's config there, in this private mount
        namespace only, so re-injected mail lands in the private queue."""
        subprocess.run(["mount", "--bind", str(config_dir), "/etc/postfix"], check=True,
                       capture_output=True)
        self.postfix_config = config_dir

    def prepass(self, pool: list[tuple[str, str, bytes]]) -> int:
        """postgrey defers every unseen triplet (and reads --delay=0 as the default
        300 s, hence --delay=1): ask it for every (client /24, sender, recipient)
        the load generator can send, wait past the delay and ask again, so its
        senders are pre-passed as mxguard's are by ``delay = 0``."""
        senders = sorted({s for kind, s, _ in pool if kind != "out"})
        reqs: list[bytes] = []
        for net in range(1, 9):
            for sender in senders:
                for r in range(10):
                    text = (f"request=smtpd_access_policy\nprotocol_state=RCPT\n"
                            f"client_address=127.0.{net}.1\nclient_name=unknown\n"
                            f"sender={sender}\nrecipient=user{r}@{RCPT_DOMAIN}\n\n")
                    reqs.append(text.encode())
        with socket.create_connection(("127.0.0.1", self.grey_port), 10) as s:
            f = s.makefile("rb")
            for rnd in range(2):
                if rnd:
                    time.sleep(1.2)
                for req in reqs:
                    s.sendall(req)
                    while f.readline() not in (b"\n", b""):
                        pass
        return len(reqs)

    def main_cf(self) -> dict[str, str]:
        milter = f"inet:127.0.0.1:{self.dkim_port}"
        return {
            "smtpd_helo_restrictions": "reject_invalid_helo_hostname, "
            "reject_non_fqdn_helo_hostname, reject_unknown_helo_hostname",
            "smtpd_recipient_restrictions": "permit_mynetworks, reject_unauth_destination, "
            "check_policy_service unix:private/policy-spf, "
            f"check_policy_service inet:127.0.0.1:{self.grey_port}",
            "smtpd_data_restrictions": "",
            "smtpd_milters": milter, "non_smtpd_milters": milter,
            "milter_default_action": "accept", "milter_protocol": "6",
            "seed_content_filter": "spamassassin:dummy",
            # the pipe exports MAIL_CONFIG=<private dir>; postdrop checks it here
            "alternate_config_directories": str(self.postfix_config),
        }


def _user(name: str) -> bool:
    import pwd
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


# ------------------------------------------------------------------ one run

def run_one(pf: PostfixInstance, mx: MxguardProcess | None, pool: list[tuple[str, str, bytes]],
            args: argparse.Namespace, count: Any, last: Any, seed: int,
            profile: Path | None = None,
            filter_pids: Callable[[], list[int]] | None = None) -> dict[str, Any]:
    mx_proc = mx.proc if mx is not None else None
    mx_pids: Callable[[], list[int]] = filter_pids or (
        (lambda: tree([mx_proc.pid])) if mx_proc is not None else list)
    pf_pids: Callable[[], list[int]] = lambda: tree([pf.master_pid or 0])  # noqa: E731
    both: Callable[[], list[int]] = lambda: mx_pids() + pf_pids()  # noqa: E731
    pf.wait_queue_empty(60)
    count.value = 0
    sampler = RssSampler({"mx": mx_pids, "all": both})
    sampler.start()
    cpu0 = (cpu_ticks(mx_pids()), cpu_ticks(pf_pids()))
    threads0 = thread_ticks(mx_pids())
    spy = None
    if profile is not None and mx is not None:
        def serving(pid: int) -> bool:  # not the history writer process
            try:
                return b"history_writer" not in Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                return False
        target = max(p for p in mx_pids() if serving(p))  # a worker, or the only process
        # --gil: only the thread holding the GIL (where Python time goes);
        # --native: C frames too (syscalls made with the GIL held show up)
        mode = [] if os.environ.get("MXG_E2E_ALL_THREADS") else ["--gil"]
        spy = subprocess.Popen([PY_SPY, "record", *mode, "--native", "-p", str(target),
                                "-f", "raw", "-o", str(profile), "-d", str(int(args.duration)),
                                "-r", "200"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    res = asyncio.run(generate(pf.smtp_port, pool, args.concurrency, args.duration, seed))
    drain_deadline = time.monotonic() + 60
    while count.value < res.accepted and time.monotonic() < drain_deadline:
        time.sleep(0.05)
    delivered = count.value
    t_end = last.value if delivered else time.monotonic()
    left = 0
    if not pf.queue_empty():
        # a stack slower than its SMTP intake (the seed's spamd pipe): what did
        # not arrive within the drain window is counted as not delivered and
        # deleted, so the next configuration starts from an empty queue
        left = len(pf.queue())
        for _ in range(5):  # pipes in flight re-inject a few more: delete those too
            pf.delete_queue()
            time.sleep(2)
            if pf.queue_empty():
                break
    cpu1 = (cpu_ticks(mx_pids()), cpu_ticks(pf_pids()))
    threads1 = thread_ticks(mx_pids())
    peak = sampler.stop()
    if spy is not None:
        spy.wait(60)
    elapsed = max(1e-6, t_end - t0)
    lat = sorted(res.latencies) or [0.0]
    n = max(1, delivered)
    return {
        "msgs": delivered / elapsed, "tx": len(res.latencies) / elapsed,
        "p50": statistics.median(lat) * 1000, "p99": lat[int(0.99 * (len(lat) - 1))] * 1000,
        "mx_cpu": (cpu1[0] - cpu0[0]) * 1000 / CLK / n,
        "pf_cpu": (cpu1[1] - cpu0[1]) * 1000 / CLK / n,
        "mx_split": tuple((b - a) * 1000 / CLK / n for a, b in zip(threads0, threads1,
                                                                  strict=True)),
        "mx_pss": peak["mx_pss"] / 2**20,
        "mx_rss": peak["mx"] / 2**20, "all_rss": peak["all"] / 2**20,
        "delivered": delivered, "accepted": res.accepted, "codes": res.codes, "left": left,
        "errors": res.errors,
    }


PY_SPY = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))


def summarise_profile(path: Path, top: int = 12) -> str:
    """py-spy raw (collapsed) stacks: top self frames and top inclusive frames."""
    self_n: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, num = line.rpartition(" ")
        if not num.isdigit():
            continue
        k = int(num)
        total += k
        frames = [f.split(" (")[0] + " (" + f.split(" (")[-1].split(":")[0].rsplit("/", 1)[-1]
                  + ")" if " (" in f else f for f in stack.split(";")]
        self_n[frames[-1]] = self_n.get(frames[-1], 0) + k
        for f in set(frames):
            incl[f] = incl.get(f, 0) + k
    out = [f"profile: {total} samples"]
    out.append("  self time:")
    for f, k in sorted(self_n.items(), key=lambda x: -x[1])[:top]:
        out.append(f"    {100 * k / max(1, total):5.1f}%  {f}")
    out.append("  inclusive:")
    skip = ("<module>", "run (", "_run_once", "run_forever", "main (", "serve (", "invoke (",
            "_run (")
    for f, k in sorted(incl.items(), key=lambda x: -x[1]):
        if any(s in f for s in skip):
            continue
        out.append(f"    {100 * k / max(1, total):5.1f}%  {f}")
        if len(out) > 2 * top + 4:
            break
    return "\n".join(out)


# ------------------------------------------------------------------ main

def seed_stack_installed() -> bool:
    return all(shutil.which(p) for p in ("postgrey", "policyd-spf", "opendkim", "spamd"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 round of 5 s per configuration")
    ap.add_argument("--concurrency", type=int, default=10)
    ap.add_argument("--duration", type=float, default=12.0, help="seconds of load per run")
    ap.add_argument("--rounds", type=int, default=2, help="alternations of the configurations")
    ap.add_argument("--sizes", default="2300,52000", help="message sizes in bytes")
    ap.add_argument("--no-workers", action="store_true", help="skip the workers=2 runs")
    ap.add_argument("--no-seed", action="store_true",
                    help="skip the seed's stack (postgrey, policyd-spf, OpenDKIM, spamd)")
    ap.add_argument("--keep", action="store_true",
                    help="keep the work directories (logs, and the sink's last message "
                         "headers per sender domain)")
    ap.add_argument("--profile", type=Path,
                    help="py-spy raw profile of one mxguard worker (extra 2.3 KB run; the "
                         "GIL holder only, env MXG_E2E_ALL_THREADS=1 for every thread); "
                         "its summary is printed")
    args = ap.parse_args()
    if args.quick:
        args.duration, args.rounds = 5.0, 1
    if not postfix_available() or os.geteuid() != 0:
        print("e2e: needs Postfix installed and root", file=sys.stderr)
        return 2
    seed_note = "not installed, skipped"
    if seed_stack_installed() and not args.no_seed:
        if os.environ.get("MXG_E2E_RESOLV") is None:
            # Re-run in a private mount namespace whose /etc/resolv.conf says
            # "nameserver 127.0.0.1": policyd-spf, spamd, postgrey, opendkim and
            # everything else started below resolve through the bench's DNS only.
            resolv = Path(tempfile.mkdtemp(prefix="mxgns-", dir="/tmp")) / "resolv.conf"
            resolv.write_text(SEED_RESOLV)
            os.chmod(resolv.parent, 0o755)
            os.chmod(resolv, 0o644)
            env = dict(os.environ, MXG_E2E_RESOLV=str(resolv))
            unshare = shutil.which("unshare")
            if unshare:
                os.execve(unshare, [unshare, "--mount", "--propagation", "private",
                                    sys.executable, str(Path(__file__).resolve()),
                                    *sys.argv[1:]], env)
            seed_note = "installed, skipped: unshare(1) not found"
        else:
            resolv = Path(os.environ["MXG_E2E_RESOLV"])
            res = subprocess.run(["mount", "--bind", str(resolv), "/etc/resolv.conf"],
                                 capture_output=True, text=True, check=False)
            shutil.rmtree(resolv.parent, ignore_errors=True)
            if res.returncode != 0 or not in_private_resolv_namespace():
                seed_note = ("installed, skipped: could not bind-mount a loopback-only "
                             f"/etc/resolv.conf ({res.stderr.strip()[:120]})")
            else:
                seed_note = ""
    elif args.no_seed:
        seed_note = "skipped (--no-seed)"
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    rng = random.Random(8)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    work = Path(tempfile.mkdtemp(prefix="mxge2e-", dir="/tmp"))
    os.chmod(work, 0o755)
    keyfile = work / "good.example.e2e.key"
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    os.chmod(keyfile, 0o600)
    learn = work / "learn"
    for kind in ("spam", "ham"):
        (learn / kind).mkdir(parents=True)
        for i in range(8):
            (learn / kind / f"{i}.eml").write_bytes(
                make_message(rng, f"x{i}@soft.example", 1500, i, spam=kind == "spam"))
    sizes = [int(s) for s in args.sizes.split(",")]
    pools = {s: message_pool(key, s, rng) for s in sizes}

    count, last, ready = mp.Value("q", 0), mp.Value("d", 0.0), mp.Event()
    sink_port = free_port()
    sink = mp.Process(target=_sink_main, args=(sink_port, count, last, ready,
                                                   str(work) if args.keep else ""),
                    daemon=True)
    sink.start()
    ready.wait(10)
    mxs: dict[str, MxguardProcess] = {}
    pf: PostfixInstance | None = None
    seed_stack: SeedStack | None = None
    dns53: DNSServer | None = None
    results: dict[tuple[str, int], list[dict[str, Any]]] = {}
    t_start = time.monotonic()
    try:
        with DNSServer(zone(key)) as dns:
            mxs["mxguard"] = start_mxguard(work / "mx1", dns, keyfile, 1, learn)
            if not args.no_workers:
                mxs["mxguard-w2"] = start_mxguard(work / "mx2", dns, keyfile, 2, learn)
            pfdir = Path(tempfile.mkdtemp(prefix="mxgpf-", dir="/tmp"))
            if not seed_note:
                try:
                    dns53 = DNSServer(zone(key), port=53).start()
                except OSError as exc:
                    seed_note = f"installed, skipped: 127.0.0.1:53 busy ({exc})"
            if not seed_note:
                seed_stack = SeedStack(work / "seed", keyfile).start()
            pf = SeedPostfix(pfdir, sink_port, {
                **BARE_CF, "default_process_limit": "200",
                "smtpd_client_connection_count_limit": "0",
                "smtpd_client_connection_rate_limit": "0",
                "policy-spf_time_limit": "3600s"},
                master_cf_extra=seed_stack.master_cf_extra()
                if seed_stack else ())
            pf.start()
            if seed_stack is not None:
                seed_stack.use_postfix_config(pf.config_dir)
                for size in sizes:
                    seed_stack.prepass(pools[size])
            configs = ["bare", *mxs] + (["seed"] if seed_stack else [])
            seed = 0
            for rnd in range(args.rounds):
                for size in sizes:
                    order = configs if rnd % 2 == 0 else configs[::-1]
                    for name in order:
                        mx = mxs.get(name)
                        if name == "seed" and seed_stack is not None:
                            pf.update_main_cf(seed_stack.main_cf())
                        else:
                            pf.update_main_cf(mxguard_main_cf(mx) if mx else BARE_CF)
                        time.sleep(0.5)
                        seed += 1
                        r = run_one(pf, mx, pools[size], args, count, last, seed,
                                    filter_pids=seed_stack.pids
                                    if name == "seed" and seed_stack else None)
                        results.setdefault((name, size), []).append(r)
                        print(f"  [{time.monotonic() - t_start:5.0f}s] round {rnd + 1} "
                              f"{name:<11} {size / 1000:>4.1f} KB: {r['msgs']:6.1f} msgs/s "
                              f"codes={r['codes']} errors={r['errors']}"
                              + (f" ({r['left']} still queued after the 60 s drain: deleted)"
                                 if r["left"] else ""), file=sys.stderr)
            profile_text = ""
            if args.profile and "mxguard" in mxs:
                mx = mxs["mxguard"]
                pf.update_main_cf(mxguard_main_cf(mx))
                time.sleep(0.5)
                run_one(pf, mx, pools[sizes[0]], args, count, last, 999, profile=args.profile)
                if args.profile.exists():
                    profile_text = summarise_profile(args.profile)
    finally:
        for mx in mxs.values():
            mx.stop()
        if seed_stack is not None:
            seed_stack.stop()
        if dns53 is not None:
            dns53.stop()
        if pf is not None:
            pf.stop()
            if not args.keep:
                shutil.rmtree(pf.workdir, ignore_errors=True)
        sink.terminate()
        if args.keep:
            print(f"kept: {work} {pf.workdir if pf else ''}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    ncpu = len(os.sched_getaffinity(0))
    print(f"e2e: {ncpu} cores, concurrency {args.concurrency}, {args.rounds} round(s) x "
          f"{args.duration:g} s per configuration and size; medians over rounds")
    print("mix: 80% good.example (SPF pass, DKIM signed, DMARC pass), 10% soft.example (softfail), "
          "5% bad.example (SPF fail: rejected with mxguard), 5% outgoing from 127.0.0.1 (signed)")
    hdr = (f"{'config':<12}{'size':>7}{'msgs/s':>9}{'tx/s':>8}{'p50 ms':>8}{'p99 ms':>8}"
           f"{'mx cpu':>8}{'pf cpu':>8}{'cpu/msg':>9}{'mx RSS':>8}{'mx PSS':>8}{'all RSS':>8}"
           f"{'x bare':>8}")
    print(hdr)
    print(f"{'':<12}{'':>7}{'':>9}{'':>8}{'':>8}{'':>8}{'ms/msg':>8}{'ms/msg':>8}{'ms':>9}"
          f"{'MB':>8}{'MB':>8}{'MB':>8}{'msgs/s':>8}")
    splits: list[str] = []
    for size in sizes:
        bare = statistics.median(r["msgs"] for r in results[("bare", size)])
        for name in ["bare", *mxs, *(["seed"] if seed_stack else [])]:
            rs = results[(name, size)]

            def med(k: str, rs: list[dict[str, Any]] = rs) -> float:
                return float(statistics.median(r[k] for r in rs))
            split = rs[len(rs) // 2]["mx_split"]
            if name.startswith("mxguard"):
                splits.append(f"  {name} {size / 1000:.1f} KB: event loop {split[0]:.2f} + "
                              f"system {split[1]:.2f} + thread pool {split[2]:.2f} ms/msg")
            print(f"{name:<12}{size / 1000:>5.1f}KB{med('msgs'):>9.1f}{med('tx'):>8.1f}"
                  f"{med('p50'):>8.1f}{med('p99'):>8.1f}{med('mx_cpu'):>8.2f}"
                  f"{med('pf_cpu'):>8.2f}{med('mx_cpu') + med('pf_cpu'):>9.2f}"
                  f"{med('mx_rss'):>8.0f}{med('mx_pss'):>8.0f}{med('all_rss'):>8.0f}"
                  f"{med('msgs') / bare if bare else 0:>8.2f}")
    if splits:
        print("mxguard CPU per message by thread (one round's figures):")
        print("\n".join(splits))
    if seed_stack is not None:
        print("seed = postgrey + policyd-spf (spawned) + OpenDKIM + spamd -L via content_filter "
              "pipe, in a private mount namespace (/etc/resolv.conf -> nameserver 127.0.0.1, "
              "the bench DNS on port 53); its 'mx' columns are those four daemons' processes")
    else:
        print(f"seed stack: {seed_note}")
    if profile_text:
        print(profile_text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
