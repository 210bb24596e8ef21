#!/usr/bin/env python3
"""Policy-door benchmark: greylist decisions per second, new and known triplets.

Starts ``mxguard serve`` (and, when Debian's ``postgrey`` is installed, postgrey
as the anchor, same workload, same session) on loopback, then drives it with
``--conns`` concurrent connections (default 10), one request in flight per
connection as Postfix does. Prints the median of ``--runs`` runs, peak RSS of
the server, and ratios to postgrey. Never fails on time.

    python bench/policy_bench.py [--runs 5] [--seconds 3] [--conns 10] [--no-anchor]
        [--checks greylist|full] [--workers N|auto] [--ceiling] [--profile DIR]

``--checks full`` turns HELO and SPF on too, with a loopback DNS server (TTL 300,
from bench/spf_bench.py); ``--ceiling`` also drives a trivial server that answers
DUNNO to everything (the load client's own ceiling, same machine, same client).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def letters(n: int) -> str:
    """Digit runs in senders are folded by the greylist normaliser: count in letters."""
    out = ""
    while True:
        n, r = divmod(n, 26)
        out += chr(97 + r)
        if not n:
            return out


def request(i: int, conn: int, kind: str) -> bytes:
    # "new": every request a new triplet; "known": a fixed set of passed triplets.
    n = i if kind == "new" else i % 1000
    tag = f"{kind}{letters(conn)}x{letters(n)}"
    client = f"198.{18 + conn % 2}.{(n // 250) % 250}.{n % 250 + 1}" if kind == "new" \
        else f"198.51.{conn}.{n % 250 + 1}"
    return (
        "request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\n"
        f"client_address={client}\nclient_name=unknown\nreverse_client_name=unknown\n"
        f"helo_name=mail{conn}.bench.test\nsender=sender-{tag}@bench.test\n"
        f"recipient=rcpt{n % 50}@dest.test\nrecipient_count=0\nqueue_id=\n"
        f"instance=b{conn}.{kind}.{i}\n"
        "size=2300\nsasl_method=\nsasl_username=\nsasl_sender=\nccert_subject=\n"
        "ccert_issuer=\nccert_fingerprint=\nencryption_protocol=\nencryption_cipher=\n"
        "encryption_keysize=0\netrn_domain=\nstress=\npolicy_context=\n"
        "server_address=127.0.0.1\nserver_port=25\n\n"
    ).encode()


def request_full(i: int, conn: int, kind: str) -> bytes:
    """``--checks full``: HELO, SPF and greylisting all decide. The HELO name and the
    sender domain resolve through the benchmark's loopback DNS (TTL 300: cached after
    the first sight); the client passes SPF (ip4: for most, include: for every 4th), so
    greylisting decides as in the greylist-only workload. A known triplet repeats its
    sender, so the SPF result of that (client, HELO, sender) is remembered, as for a
    message with several recipients; a new one is a new SPF evaluation."""
    n = i if kind == "new" else i % 1000
    tag = f"{kind}{letters(conn)}x{letters(n)}"
    net = "203.0.113" if n % 4 == 3 else "198.51.100"
    return (
        "request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\n"
        f"client_address={net}.{n % 250 + 1}\nclient_name=unknown\n"
        f"reverse_client_name=unknown\nhelo_name=mail{conn}.d{letters(conn)}.bench.test\n"
        f"sender=sender-{tag}@d{letters(n % 200)}.bench.test\n"
        f"recipient=rcpt{n % 50}@dest.test\nrecipient_count=0\nqueue_id=\n"
        f"instance=b{conn}.{kind}.{i}\n"
        "size=2300\nsasl_method=\nsasl_username=\nsasl_sender=\nccert_subject=\n"
        "ccert_issuer=\nccert_fingerprint=\nencryption_protocol=\nencryption_cipher=\n"
        "encryption_keysize=0\netrn_domain=\nstress=\npolicy_context=\n"
        "server_address=127.0.0.1\nserver_port=25\n\n"  # the attributes of Postfix 3.7
    ).encode()


REQUEST = {"greylist": request, "full": request_full}
MAKE = [request]  # the workload of this run (--checks)


class _Load(asyncio.Protocol):
    """One Postfix-like connection: a request, wait for its reply, the next. A bare
    protocol (no streams): the client's own cost per request is what bounds the
    figures on a small machine (see --ceiling)."""

    def __init__(self, conn: int, kind: str, deadline: float, start: int, limit: int | None,
                 counts: list[int], replies: dict[bytes, int],
                 done: asyncio.Future[None]) -> None:
        self.conn, self.kind, self.deadline, self.i = conn, kind, deadline, start
        self.end = start + limit if limit is not None else None
        self.counts, self.replies, self.done = counts, replies, done
        self.make = MAKE[0]
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.send()

    def send(self) -> None:
        assert self.transport is not None
        if time.perf_counter() >= self.deadline or self.i == self.end:
            self.transport.close()
            return
        self.transport.write(self.make(self.i, self.conn, self.kind))
        self.i += 1

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        end = buf.find(b"\n\n")
        if end < 0:
            self.buf = buf
            return
        self.buf = buf[end + 2:]
        action = buf[7:end].split(b" ", 1)[0]  # after "action="
        self.replies[action] = self.replies.get(action, 0) + 1
        self.counts[self.conn] += 1
        self.send()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def client(port: int, conn: int, kind: str, deadline: float, start: int,
                 counts: list[int], replies: dict[bytes, int], limit: int | None) -> None:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    await loop.create_connection(
        lambda: _Load(conn, kind, deadline, start, limit, counts, replies, done),
        "127.0.0.1", port)
    await done


CLIENT_PROCS = [1]  # --client-procs: load processes sharing the connections


async def drive(port: int, kind: str, seconds: float, conns: int, offset: int,
                limit: int | None = None) -> tuple[float, dict[str, int]]:
    procs = min(CLIENT_PROCS[0], conns)
    if procs > 1:
        import multiprocessing
        parts = [list(range(conns))[p::procs] for p in range(procs)]
        with multiprocessing.get_context("fork").Pool(procs) as pool:
            done = pool.starmap(_drive_part, [(port, kind, seconds, part, offset, limit)
                                              for part in parts])
        replies: dict[str, int] = {}
        for _, _, got in done:
            for k, v in got.items():
                replies[k] = replies.get(k, 0) + v
        return sum(n for n, _, _ in done) / max(t for _, t, _ in done), replies
    n, elapsed, replies = await _drive(port, kind, seconds, list(range(conns)), offset, limit)
    return n / elapsed, replies


def _drive_part(port: int, kind: str, seconds: float, conns: list[int], offset: int,
                limit: int | None) -> tuple[int, float, dict[str, int]]:
    try:
        import uvloop
        return uvloop.run(_drive(port, kind, seconds, conns, offset, limit))
    except ImportError:
        return asyncio.run(_drive(port, kind, seconds, conns, offset, limit))


async def _drive(port: int, kind: str, seconds: float, conns: list[int], offset: int,
                 limit: int | None) -> tuple[int, float, dict[str, int]]:
    counts = [0] * (max(conns) + 1)
    replies: dict[bytes, int] = {}
    t0 = time.perf_counter()
    deadline = t0 + seconds
    await asyncio.gather(*(client(port, c, kind, deadline, offset, counts, replies, limit)
                           for c in conns))
    return (sum(counts), time.perf_counter() - t0,
            {k.decode(): v for k, v in replies.items()})


def status_mb(pid: int, key: str) -> float:
    """A memory line of /proc/PID/status (VmHWM, VmRSS, ...) in MB; NaN when gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def peak_rss_mb(pid: int) -> float:
    """Peak RSS of the process plus, for a master, the peaks of its workers."""
    return status_mb(pid, "VmHWM") + sum(status_mb(c, "VmHWM") for c in descendants(pid))


def pss_mb(pid: int) -> float:
    """Proportional set size of the process and its workers: what they take together
    (a forked worker shares the master's pages; RSS counts them in each)."""
    total = 0.0
    for p in (pid, *descendants(pid)):
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            pass
    return total


def rollup_mb(pid: int) -> dict[str, float]:
    """/proc/PID/smaps_rollup of the process and its workers, summed, in MB."""
    total: dict[str, float] = {}
    for p in (pid, *descendants(pid)):
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines()[1:]:
                key, _, rest = line.partition(":")
                total[key] = total.get(key, 0.0) + int(rest.split()[0]) / 1024
        except (OSError, ValueError, IndexError):
            pass
    return total


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


def descendants(pid: int) -> list[int]:
    out, todo = [], children(pid)
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children(p)
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, its reaped children (e.g. postgrey's) and its live
    descendants (a master's workers, mxguard's history writer process)."""
    total = 0.0
    for p in (pid, *descendants(pid)):  # live ones are not in cstime yet
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    return total


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    for _ in range(200):
        if proc.poll() is not None:
            sys.exit(f"{what} exited early with status {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"{what} did not start listening on {port}")


def start_mxguard(tmp: Path, port: int, checks: str = "greylist", workers: str = "1",
                  dns_port: int = 0, storage: str = "", extra: str = "") -> subprocess.Popen[bytes]:
    """``checks``: "greylist" (HELO and SPF off, as postgrey) or "full" (HELO, SPF and
    greylisting on, DNS from the benchmark's loopback server)."""
    cfg = tmp / "mxguard.toml"
    workers_value = f'"{workers}"' if workers == "auto" else workers
    only = ('[helo]\nmode = "off"\n[spf]\nmode = "off"\n' if checks == "greylist"
            else f'[dns]\nnameservers = ["127.0.0.1:{dns_port}"]\ntimeout = 2\n')
    cfg.write_text(
        f'[policy]\nlisten = "127.0.0.1:{port}"\n'
        f'[server]\nworkers = {workers_value}\n'
        f'[storage]\nurl = "{storage or f"sqlite:///{tmp}/mxguard.db"}"\n'
        f'{only}[milter]\nenabled = false\n'
        "[greylist]\ndelay = 1\nauto_whitelist_clients = 0\n" + extra.replace("\\n", "\n")
    )
    log = open(tmp / "mxguard.log", "wb")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen([sys.executable, "-m", "mxguard", "serve", "--config", str(cfg)],
                            stdout=log, stderr=log)
    wait_port(port, proc, "mxguard")
    return proc


def start_postgrey(tmp: Path, port: int) -> subprocess.Popen[bytes] | None:
    exe = shutil.which("postgrey") or ("/usr/sbin/postgrey" if os.path.exists(
        "/usr/sbin/postgrey") else None)
    if exe is None:
        return None
    dbdir = tmp / "postgrey"
    dbdir.mkdir()
    if os.geteuid() == 0:
        shutil.chown(dbdir, "postgrey" if _user_exists("postgrey") else "nobody")
    cmd = [exe, f"--inet=127.0.0.1:{port}", f"--dbdir={dbdir}", "--delay=1",
           "--auto-whitelist-clients=0", "--whitelist-clients=/dev/null",
           "--whitelist-recipients=/dev/null"]
    if os.geteuid() == 0:
        cmd.append(f"--user={'postgrey' if _user_exists('postgrey') else 'nobody'}")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, proc, "postgrey")
    return proc


def _user_exists(name: str) -> bool:
    import pwd
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def measure(name: str, port: int, pid: int, args: argparse.Namespace) -> dict[str, float]:
    # Warm the known set: first sight (deferred), then the retry that passes it.
    for _ in range(2):
        asyncio.run(drive(port, "known", 60, args.conns, 0, limit=1000))
        time.sleep(1.5)  # past the 1 s greylist delay: the second round passes them
    out: dict[str, float] = {}
    for kind in ("new", "known"):
        if kind == "known":  # seen again just now (the new runs pushed them out of caches)
            asyncio.run(drive(port, "known", 60, args.conns, 0, limit=1000))
        rates, cpus = [], []
        spy = profile_start(args, name, kind, pid)
        for run in range(args.runs):
            cpu0 = cpu_seconds(pid)
            rate, replies = asyncio.run(drive(port, kind, args.seconds, args.conns,
                                              offset=(run + 1) * 10_000_000))
            total = sum(replies.values())
            rates.append(rate)
            cpus.append((cpu_seconds(pid) - cpu0) / max(total, 1) * 1e6)
        profile_stop(spy)
        out[kind] = statistics.median(rates)
        cpu = statistics.median(cpus)
        out[kind + "_cpu"] = cpu
        print(f"  {name:9s} {kind:5s} triplets: median {out[kind]:8.0f} req/s "
              f"(runs: {', '.join(f'{r:.0f}' for r in rates)}); server CPU {cpu:.0f} us/req "
              f"= {1e6 / cpu:,.0f} req/s per core; replies {replies}", flush=True)
    out["rss"] = peak_rss_mb(pid)
    out["pss"] = pss_mb(pid)
    each = ", ".join(f"{status_mb(p, 'VmHWM'):.1f}" for p in (pid, *descendants(pid)))
    print(f"  {name:9s} peak RSS {out['rss']:.1f} MB summed over "
          f"{1 + len(descendants(pid))} process(es) ({each}); PSS now {out['pss']:.1f} MB "
          "(shared pages counted once)", flush=True)
    roll = rollup_mb(pid)
    print(f"  {name:9s} now: RSS {roll.get('Rss', 0):.1f} MB = anonymous "
          f"{roll.get('Anonymous', 0):.1f} (heap, caches) + file-backed "
          f"{roll.get('Rss', 0) - roll.get('Anonymous', 0):.1f} (program, libraries); "
          f"PSS anonymous {roll.get('Pss_Anon', 0):.1f}, file {roll.get('Pss_File', 0):.1f}",
          flush=True)
    return out


def profile_start(args: argparse.Namespace, name: str, kind: str,
                  pid: int) -> tuple[subprocess.Popen[bytes], Path] | None:
    """``--profile DIR``: py-spy samples the server (and its workers) during the runs."""
    if not args.profile or name != "mxguard":
        return None
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out = Path(args.profile) / f"{name}-{args.checks}-{kind}.raw"
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([spy, "record", "-p", str(pid), "--subprocesses", "-r", "200",
                             "-f", "raw", "-o", str(out), "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    return proc, out


def profile_stop(spy: tuple[subprocess.Popen[bytes], Path] | None) -> None:
    if spy is None:
        return
    proc, out = spy
    proc.send_signal(signal.SIGINT)
    proc.wait(30)
    own: dict[str, int] = {}
    total = 0
    for line in out.read_text().splitlines() if out.exists() else []:
        stack, _, n = line.rpartition(" ")
        total += int(n)
        frame = stack.split(";")[-1]
        own[frame] = own.get(frame, 0) + int(n)
    print(f"  py-spy: {total} samples in {out}; most time of its own:")
    for frame, n in sorted(own.items(), key=lambda kv: -kv[1])[:12]:
        print(f"    {n * 100 / max(total, 1):5.1f} % {frame}")


def serve_trivial(port: int) -> None:
    """``--trivial PORT``: answers DUNNO to every request, nothing else; what the
    load client reaches against it is the client's own ceiling."""
    class Trivial(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport
            self.buf = b""

        def data_received(self, data: bytes) -> None:
            self.buf += data
            n = self.buf.count(b"\n\n")
            if n:
                self.buf = self.buf[self.buf.rindex(b"\n\n") + 2:]
                self.transport.write(b"action=DUNNO\n\n" * n)  # type: ignore[attr-defined]

    async def serve() -> None:
        server = await asyncio.get_running_loop().create_server(Trivial, "127.0.0.1", port)
        await server.serve_forever()

    import uvloop
    uvloop.run(serve())


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--conns", type=int, default=10)
    ap.add_argument("--checks", choices=("greylist", "full"), default="greylist",
                    help="greylist: HELO and SPF off (as postgrey); full: HELO + SPF + "
                         "greylist, loopback DNS (TTL 300)")
    ap.add_argument("--workers", default="1", help='[server] workers: a number or "auto"')
    ap.add_argument("--storage", default="", help="[storage] url (default: a temp SQLite)")
    ap.add_argument("--no-anchor", action="store_true", help="skip postgrey")
    ap.add_argument("--extra", default="", help='more config for mxguard, e.g. '
                    '"[history]\\nenabled = false" (\\n for new lines)')
    ap.add_argument("--ceiling", action="store_true",
                    help="also drive a trivial server: the load client's own ceiling")
    ap.add_argument("--profile", metavar="DIR", default="",
                    help="py-spy the server during the runs (raw stacks into DIR)")
    ap.add_argument("--client-procs", type=int, default=1,
                    help="load processes sharing the connections (default 1)")
    ap.add_argument("--trivial", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    CLIENT_PROCS[0] = args.client_procs
    if args.trivial:
        serve_trivial(args.trivial)
        return
    MAKE[0] = REQUEST[args.checks]
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    print(f"policy benchmark: checks {args.checks}, workers {args.workers}, {args.conns} "
          f"connections from {args.client_procs} load process(es), {args.runs} runs x "
          f"{args.seconds:g} s, {os.cpu_count()} cores (load generator shares the machine)")
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="mxguard-bench-") as d:
        tmp = Path(d)
        os.chmod(tmp, 0o755)
        dns: subprocess.Popen[bytes] | None = None
        dns_port = 0
        if args.checks == "full":
            sys.path.insert(0, str(ROOT / "bench"))
            from spf_bench import start_dns
            dns, dns_port = start_dns(tmp)
        try:
            port = free_port()
            proc = start_mxguard(tmp, port, args.checks, args.workers, dns_port, args.storage,
                                 args.extra)
            try:
                results["mxguard"] = measure("mxguard", port, proc.pid, args)
            finally:
                stop(proc)
        finally:
            if dns is not None:
                stop(dns)
        if not args.no_anchor:
            port = free_port()
            anchor = start_postgrey(tmp, port)
            if anchor is None:
                print("  postgrey not installed (apt-get install postgrey): no anchor run")
            else:
                try:
                    results["postgrey"] = measure("postgrey", port, anchor.pid, args)
                finally:
                    stop(anchor)
        if args.ceiling:
            port = free_port()
            trivial = subprocess.Popen([sys.executable, __file__, "--trivial", str(port)])
            wait_port(port, trivial, "trivial server")
            try:
                results["trivial"] = measure("trivial", port, trivial.pid, args)
            finally:
                stop(trivial)
    if "postgrey" in results:
        for kind in ("new", "known"):
            ratio = results["mxguard"][kind] / results["postgrey"][kind]
            cpu_ratio = results["postgrey"][kind + "_cpu"] / results["mxguard"][kind + "_cpu"]
            print(f"  ratio mxguard/postgrey, {kind} triplets: {ratio:.1f} x req/s, "
                  f"{cpu_ratio:.1f} x less CPU per request")
    print("  targets (issue 17): full >= 10 x postgrey (28,000 req/s); greylist only "
          ">= 25,000 req/s")


if __name__ == "__main__":
    main()
