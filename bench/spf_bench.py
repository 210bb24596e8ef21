#!/usr/bin/env python3
"""SPF benchmark: SPF policy decisions per second through the policy door.

Starts a loopback DNS server (mxguard.testing.dns's zone logic, served
over UDP from its own process) with SPF records for any ``*.bench.test``
sender domain (ip4, include, a and mx mechanisms), then ``mxguard serve``
with ``[spf]`` on and ``[helo]``/``[greylist]`` off, and drives it with
``--conns`` connections (default 10), one request in flight per connection as
Postfix does:

* **cached**: 200 sender domains, repeated (the DNS answers are cached; a new
  local part per request, so every request is a new SPF evaluation);
* **uncached**: a new sender domain per request (cold DNS for it).

A quarter of the clients match ip4:, a quarter include:, a quarter a, and a
quarter nothing (fail after a and mx: ``550 5.7.23``). Printed: median req/s
of ``--runs`` runs, server CPU per request (/proc/PID/stat), DNS queries per
request, the first answer of a fresh daemon, and peak RSS. Never fails on time.

The anchor (when installed: ``apt-get install postfix-policyd-spf-python``):
Debian's policyd-spf, spawned once per connection as Postfix's spawn(8) does,
behind a small loopback TCP front started by this script, ``--anchor-conns``
(default 20) connections = 20 processes. Its resolver (pydns) is pointed at
the loopback DNS server inside its own process (``DNS.defaults``), so no
system file is touched.

    python bench/spf_bench.py [--runs 5] [--seconds 3] [--conns 10] [--no-anchor]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
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

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(ROOT / "bench") not in sys.path:
    sys.path.insert(0, str(ROOT / "bench"))

from policy_bench import free_port, wait_port  # noqa: E402

CACHED_DOMAINS = 200
STATS_NAME = "stats.bench-control"
POLICYD_SPF = "/usr/bin/policyd-spf"
SYSTEM_PYTHON = "/usr/bin/python3"


def bench_zone() -> dict[str, list[tuple[str, Any]]]:
    return {
        "*.bench.test": [
            ("TXT", "v=spf1 ip4:198.51.100.0/24 include:_spf.provider.test a mx -all"),
            ("A", "192.0.2.10"),
            ("MX", (10, "mx.provider.test")),
        ],
        "_spf.provider.test": [("TXT", "v=spf1 ip4:203.0.113.0/24 -all")],
        "mx.provider.test": [("A", "192.0.2.20")],
        "*.helo.test": [("TXT", "v=spf1 ip4:198.51.100.0/24 ip4:203.0.113.0/24 "
                                "ip4:192.0.2.0/24 ?all")],
    }


# ------------------------------------------------------------------ DNS server process


def serve_dns(port_file: str) -> None:
    """The DNS server process: the zone logic of mxguard.testing.dns over UDP.

    One asyncio loop instead of a thread per datagram, so the server keeps up
    with uncached runs. ``stats.bench-control TXT`` answers the query count.
    """
    import dns.exception
    import dns.message
    import dns.rrset

    from mxguard.testing.dns import ZoneData, respond

    zonedata = ZoneData(bench_zone(), ttl=300, negative_ttl=60)
    count = [0]

    class Proto(asyncio.DatagramProtocol):
        transport: asyncio.DatagramTransport

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport  # type: ignore[assignment]

        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            try:
                req = dns.message.from_wire(data)
            except (dns.exception.DNSException, ValueError):
                return
            if req.question and req.question[0].name.to_text().rstrip(".") == STATS_NAME:
                reply = dns.message.make_response(req)
                reply.answer.append(dns.rrset.from_text(STATS_NAME + ".", 0, "IN", "TXT",
                                                        f'"{count[0]}"'))
                self.transport.sendto(reply.to_wire(), addr)
                return
            count[0] += 1
            out = respond(zonedata, data, udp=True)
            if len(zonedata.queries) > 10000:
                zonedata.queries.clear()
            if out is not None:
                self.transport.sendto(out, addr)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(Proto, local_addr=("127.0.0.1", 0))
        port = transport.get_extra_info("sockname")[1]
        Path(port_file).write_text(str(port))
        await asyncio.Event().wait()

    _use_uvloop()
    asyncio.run(main())


def dns_query_count(port: int) -> int:
    import dns.message
    import dns.query

    q = dns.message.make_query(STATS_NAME + ".", "TXT")
    r = dns.query.udp(q, "127.0.0.1", port=port, timeout=5)
    return int(b"".join(r.answer[0][0].strings))


# ------------------------------------------------------------------ policyd-spf front

LAUNCHER = """
import sys
import DNS  # pydns, pyspf's resolver on Debian: it read /etc/resolv.conf on import
DNS.defaults['server'] = ['127.0.0.1']  # ... replaced here, in this process only
DNS.defaults['port'] = {port}
sys.argv = ['policyd-spf', {conf!r}]
from spf_engine.policyd_spf import main
main()
"""


def front(listen_port: int, dns_port: int, conf: str) -> None:
    """Like Postfix's spawn(8): one policyd-spf process per connection, the
    connection as its stdin and stdout."""
    code = LAUNCHER.format(port=dns_port, conf=conf)

    def reap() -> None:
        while True:
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                time.sleep(0.02)

    threading.Thread(target=reap, daemon=True).start()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", listen_port))
    sock.listen(128)
    while True:
        conn, _ = sock.accept()
        fd = conn.fileno()
        os.posix_spawn(SYSTEM_PYTHON, [SYSTEM_PYTHON, "-c", code], os.environ,
                       file_actions=[(os.POSIX_SPAWN_DUP2, fd, 0),
                                     (os.POSIX_SPAWN_DUP2, fd, 1)])
        conn.close()


def write_policyd_conf(tmp: Path) -> Path:
    conf = tmp / "policyd-spf.conf"
    conf.write_text("debugLevel = 0\nTestOnly = 1\nHELO_reject = Fail\n"
                    "Mail_From_reject = Fail\nPermError_reject = False\n"
                    "TempError_Defer = False\n"
                    "skip_addresses = 127.0.0.0/8,::ffff:127.0.0.0/104,::1\n")
    return conf


# ------------------------------------------------------------------ load


def request(kind: str, tag: str, conn: int, i: int) -> bytes:
    n = i % CACHED_DOMAINS
    domain = (f"d{n}.bench.test" if kind == "cached"
              else f"u{tag}c{conn}n{i}.bench.test")
    client = [f"198.51.100.{i % 250 + 1}", f"203.0.113.{i % 250 + 1}", "192.0.2.10",
              f"192.0.2.{100 + i % 100}"][i % 4]
    return (
        "request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\n"
        f"client_address={client}\nclient_name=unknown\nreverse_client_name=unknown\n"
        f"helo_name=mail{conn}.helo.test\nsender=user{tag}x{i}@{domain}\n"
        f"recipient=rcpt{n % 50}@dest.test\nrecipient_count=0\nqueue_id=\n"
        f"instance={tag}.{conn}.{i}\nsize=2300\nsasl_method=\nsasl_username=\nsasl_sender=\n"
        "ccert_subject=\nccert_issuer=\nccert_fingerprint=\nencryption_protocol=\n"
        "encryption_cipher=\nencryption_keysize=0\netrn_domain=\nstress=\npolicy_context=\n"
        "server_address=127.0.0.1\nserver_port=25\n\n"  # the attributes of Postfix 3.7
    ).encode()


def action_word(reply: bytes) -> str:
    action = reply.split(b"=", 1)[1].strip().decode(errors="replace")
    word = action.split(" ", 1)[0].upper()
    return word if not word[:1].isdigit() else action[:10]


async def client(port: int, conn: int, kind: str, tag: str, deadline: float,
                 counts: list[int], replies: dict[str, int], limit: int | None) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    i = 0
    try:
        while time.perf_counter() < deadline and (limit is None or i < limit):
            writer.write(request(kind, tag, conn, i))
            reply = await reader.readuntil(b"\n\n")
            word = action_word(reply)
            replies[word] = replies.get(word, 0) + 1
            counts[conn] += 1
            i += 1
    finally:
        writer.close()


async def drive(port: int, kind: str, tag: str, seconds: float, conns: int,
                limit: int | None = None) -> tuple[float, int, dict[str, int]]:
    counts = [0] * conns
    replies: dict[str, int] = {}
    t0 = time.perf_counter()
    await asyncio.gather(*(client(port, c, kind, tag, t0 + seconds, counts, replies, limit)
                           for c in range(conns)))
    return sum(counts) / (time.perf_counter() - t0), sum(counts), replies


async def first_answer(port: int, tag: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request("uncached", tag, 0, 3))  # a new domain, a fail: every lookup
    reply = await reader.readuntil(b"\n\n")
    elapsed = time.perf_counter() - t0
    writer.close()
    return elapsed, action_word(reply)


# ------------------------------------------------------------------ processes


def proc_stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def children(pid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if int(proc_stat(int(name))[1]) == pid:
                    out.append(int(name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def cpu_seconds(pid: int, with_children: bool = False) -> float:
    """utime + stime (+ cutime + cstime of reaped children, + live children)."""
    try:
        fields = proc_stat(pid)
    except OSError:
        return 0.0
    ticks = sum(int(f) for f in fields[11:15 if with_children else 13])
    total = ticks / os.sysconf("SC_CLK_TCK")
    if with_children:
        total += sum(cpu_seconds(c) for c in children(pid))
    return total


def rss_mb(pid: int, key: str = "VmRSS:") -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def start_dns(tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    port_file = tmp / "dns.port"
    proc = subprocess.Popen([sys.executable, __file__, "--serve-dns", str(port_file)])
    for _ in range(400):
        if port_file.exists() and port_file.read_text():
            return proc, int(port_file.read_text())
        if proc.poll() is not None:
            break
        time.sleep(0.025)
    sys.exit("the benchmark DNS server did not start")


def start_mxguard(tmp: Path, port: int, dns_port: int) -> subprocess.Popen[bytes]:
    cfg = tmp / "mxguard.toml"
    cfg.write_text(
        f'[policy]\nlisten = "127.0.0.1:{port}"\n'
        f'[storage]\nurl = "sqlite:///{tmp}/mxguard.db"\n'
        f'[dns]\nnameservers = ["127.0.0.1:{dns_port}"]\ntimeout = 2\n'
        '[helo]\nmode = "off"\n[greylist]\nmode = "off"\n[spf]\nmode = "enforce"\n'
    )
    log = open(tmp / "mxguard.log", "ab")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen([sys.executable, "-m", "mxguard", "serve", "--config", str(cfg)],
                            stdout=log, stderr=log)
    wait_port(port, proc, "mxguard")
    return proc


def start_front(tmp: Path, port: int, dns_port: int) -> subprocess.Popen[bytes]:
    conf = write_policyd_conf(tmp)
    log = open(tmp / "policyd-spf.log", "ab")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen([sys.executable, __file__, "--front", str(port), str(dns_port),
                             str(conf)], stdout=log, stderr=log)
    wait_port(port, proc, "policyd-spf front")
    return proc


# ------------------------------------------------------------------ measuring


class RssSampler:
    """Peak of the summed RSS of a process and its children, sampled."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            total = rss_mb(self.pid) + sum(rss_mb(c) for c in children(self.pid))
            self.peak = max(self.peak, total)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak


def settle(pid: int, timeout: float = 10.0) -> None:
    """Wait until the front's per-connection processes have exited."""
    deadline = time.monotonic() + timeout
    while children(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def measure(name: str, port: int, pid: int, conns: int, args: argparse.Namespace,
            dns_port: int, with_children: bool) -> dict[str, float]:
    out: dict[str, float] = {}
    tag = name[0]

    def run(kind: str, run_tag: str, seconds: float,
            limit: int | None = None) -> tuple[float, float, float, dict[str, int]]:
        cpu0, q0 = cpu_seconds(pid, with_children), dns_query_count(dns_port)
        rate, total, replies = asyncio.run(drive(port, kind, run_tag, seconds, conns, limit))
        if with_children:
            settle(pid)
        cpu = (cpu_seconds(pid, with_children) - cpu0) / max(total, 1) * 1e6
        queries = (dns_query_count(dns_port) - q0) / max(total, 1)
        return rate, cpu, queries, replies

    # warm the cached set: every domain once per connection
    run("cached", f"{tag}w", 120, limit=CACHED_DOMAINS)
    for kind in ("cached", "uncached"):
        rates, cpus, queries = [], [], []
        replies: dict[str, int] = {}
        for r in range(args.runs):
            rate, cpu, q, replies = run(kind, f"{tag}{kind[0]}{r}", args.seconds)
            rates.append(rate)
            cpus.append(cpu)
            queries.append(q)
        out[kind] = statistics.median(rates)
        out[kind + "_cpu"] = statistics.median(cpus)
        print(f"  {name:11s} {kind:8s}: median {out[kind]:7,.0f} req/s (runs: "
              f"{', '.join(f'{x:.0f}' for x in rates)}); server CPU {out[kind + '_cpu']:,.0f} "
              f"us/req; {statistics.median(queries):.2f} DNS queries/req; replies "
              f"{dict(sorted(replies.items()))}", flush=True)
    return out


def first_answers(samples: int, start: Callable[[], subprocess.Popen[bytes]], port: int,
                  tag: str, fresh_each: bool) -> tuple[list[float], list[str],
                                                       subprocess.Popen[bytes]]:
    """First-answer latencies; returns the last started process, still running."""
    times, words = [], []
    proc = start()
    for i in range(samples):
        if i and fresh_each:
            stop(proc)
            proc = start()
        elapsed, word = asyncio.run(first_answer(port, f"{tag}f{i}"))
        times.append(elapsed)
        words.append(word)
    return times, words, proc


def _use_uvloop() -> None:
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--serve-dns":
        serve_dns(sys.argv[2])
        return
    if len(sys.argv) > 4 and sys.argv[1] == "--front":
        front(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
        return
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--conns", type=int, default=10)
    ap.add_argument("--anchor-conns", type=int, default=20,
                    help="connections (= processes) for the policyd-spf anchor")
    ap.add_argument("--first", type=int, default=3, help="first-answer samples")
    ap.add_argument("--no-anchor", action="store_true", help="skip policyd-spf")
    args = ap.parse_args()
    _use_uvloop()
    print(f"SPF benchmark: {args.runs} runs x {args.seconds:g} s, {os.cpu_count()} cores "
          "(load generator and DNS server share the machine)")
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="mxguard-spfbench-") as d:
        tmp = Path(d)
        os.chmod(tmp, 0o755)
        dns_proc, dns_port = start_dns(tmp)
        try:
            port = free_port()
            times, words, proc = first_answers(
                args.first, lambda: start_mxguard(tmp, port, dns_port), port, "m", True)
            try:
                print(f"  mxguard     first answer of a fresh daemon: median "
                      f"{statistics.median(times) * 1000:.1f} ms (samples: "
                      f"{', '.join(f'{t * 1000:.1f}' for t in times)} ms; {words[0]})",
                      flush=True)
                results["mxguard"] = measure("mxguard", port, proc.pid, args.conns, args,
                                             dns_port, False)
                results["mxguard"]["rss"] = rss_mb(proc.pid, "VmHWM:")
                results["mxguard"]["first"] = statistics.median(times)
                print(f"  mxguard     {args.conns} connections, one process; peak RSS "
                      f"{results['mxguard']['rss']:.1f} MB", flush=True)
            finally:
                stop(proc)
            if not args.no_anchor:
                anchor(tmp, dns_port, args, results)
        finally:
            stop(dns_proc)
    if "policyd-spf" in results:
        a, m = results["policyd-spf"], results["mxguard"]
        for kind in ("cached", "uncached"):
            print(f"  ratio mxguard/policyd-spf, {kind}: {m[kind] / a[kind]:.1f} x req/s, "
                  f"{a[kind + '_cpu'] / m[kind + '_cpu']:.1f} x less CPU per request")
        print(f"  ratio policyd-spf/mxguard: {a['rss'] / m['rss']:.1f} x the memory, "
              f"{a['first'] / m['first']:.0f} x the first-answer time")
    print("  target (issue #3): >= 15,000 req/s in one process, first answer < 50 ms; "
          "anchor policyd-spf (20 processes): 1,700-1,900 req/s, ~590 MB RSS, 1.1 s first "
          "answer")


def anchor(tmp: Path, dns_port: int, args: argparse.Namespace,
           results: dict[str, dict[str, float]]) -> None:
    if not (os.path.exists(POLICYD_SPF) and os.path.exists(SYSTEM_PYTHON)):
        print("  policyd-spf not installed (apt-get install postfix-policyd-spf-python): "
              "no anchor run")
        return
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import DNS, spf_engine"],
                           capture_output=True)
    if probe.returncode != 0:
        print("  policyd-spf's resolver (pydns) cannot be pointed at the loopback DNS "
              "server from inside its process: no anchor run (system files are not "
              "touched)")
        return
    port = free_port()
    proc = start_front(tmp, port, dns_port)
    sampler = RssSampler(proc.pid)
    try:
        # every connection spawns a fresh policyd-spf: each one's first answer
        times, words, _ = first_answers(args.first, lambda: proc, port, "p", False)
        settle(proc.pid)
        print(f"  policyd-spf first answer of a fresh process: median "
              f"{statistics.median(times) * 1000:.1f} ms (samples: "
              f"{', '.join(f'{t * 1000:.1f}' for t in times)} ms; {words[0]})", flush=True)
        res = measure("policyd-spf", port, proc.pid, args.anchor_conns, args, dns_port, True)
        res["rss"] = sampler.stop()
        res["first"] = statistics.median(times)
        print(f"  policyd-spf {args.anchor_conns} connections = {args.anchor_conns} processes; "
              f"peak RSS (sum) {res['rss']:.1f} MB", flush=True)
        results["policyd-spf"] = res
    finally:
        sampler.stop()
        for pid in children(proc.pid):  # connections are closed: they exit anyway
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
        stop(proc)


if __name__ == "__main__":
    main()
