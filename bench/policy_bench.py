#!/usr/bin/env python3
"""Policy-door benchmark: greylist decisions per second, new and known triplets.

Starts ``mxguard serve`` (and, when Debian's ``postgrey`` is installed, postgrey
as the anchor, same workload, same session) on loopback, then drives it with
``--conns`` concurrent connections (default 10), one request in flight per
connection as Postfix does. Prints the median of ``--runs`` runs, peak RSS of
the server, and ratios to postgrey. Never fails on time.

    python bench/policy_bench.py [--runs 5] [--seconds 3] [--conns 10] [--no-anchor]
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
        f"recipient=rcpt{n % 50}@dest.test\nrecipient_count=0\nqueue_id=\ninstance=b{i}\n"
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
        f"recipient=rcpt{n % 50}@dest.test\nrecipient_count=0\nqueue_id=\ninstance=b{i}\n"
        "size=2300\nsasl_method=\nsasl_username=\nsasl_sender=\nccert_subject=\n"
        "ccert_issuer=\nccert_fingerprint=\nencryption_protocol=\nencryption_cipher=\n"
        "encryption_keysize=0\netrn_domain=\nstress=\npolicy_context=\n"
        "server_address=127.0.0.1\nserver_port=25\nserver_name=mx.dest.test\n\n"
    ).encode()


async def client(port: int, conn: int, kind: str, deadline: float, start: int,
                 counts: list[int], replies: dict[str, int], limit: int | None) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    i = start
    try:
        while time.perf_counter() < deadline and (limit is None or i - start < limit):
            writer.write(request(i, conn, kind))
            line = await reader.readuntil(b"\n\n")
            action = line.split(b"=", 1)[1].split(b" ", 1)[0].strip().decode()
            replies[action] = replies.get(action, 0) + 1
            counts[conn] += 1
            i += 1
    finally:
        writer.close()


async def drive(port: int, kind: str, seconds: float, conns: int, offset: int,
                limit: int | None = None) -> tuple[float, dict[str, int]]:
    counts = [0] * conns
    replies: dict[str, int] = {}
    t0 = time.perf_counter()
    deadline = t0 + seconds
    await asyncio.gather(*(client(port, c, kind, deadline, offset, counts, replies, limit)
                           for c in range(conns)))
    return sum(counts) / (time.perf_counter() - t0), replies


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
    return status_mb(pid, "VmHWM")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (and its reaped children, e.g. postgrey's)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


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


def start_mxguard(tmp: Path, port: int) -> subprocess.Popen[bytes]:
    cfg = tmp / "mxguard.toml"
    cfg.write_text(
        f'[policy]\nlisten = "127.0.0.1:{port}"\n'
        f'[storage]\nurl = "sqlite:///{tmp}/mxguard.db"\n'
        '[helo]\nmode = "off"\n[spf]\nmode = "off"\n[milter]\nenabled = false\n'
        "[greylist]\ndelay = 1\nauto_whitelist_clients = 0\n"
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
        rates, cpus = [], []
        for run in range(args.runs):
            cpu0 = cpu_seconds(pid)
            rate, replies = asyncio.run(drive(port, kind, args.seconds, args.conns,
                                              offset=(run + 1) * 10_000_000))
            total = sum(replies.values())
            rates.append(rate)
            cpus.append((cpu_seconds(pid) - cpu0) / max(total, 1) * 1e6)
        out[kind] = statistics.median(rates)
        cpu = statistics.median(cpus)
        out[kind + "_cpu"] = cpu
        print(f"  {name:9s} {kind:5s} triplets: median {out[kind]:8.0f} req/s "
              f"(runs: {', '.join(f'{r:.0f}' for r in rates)}); server CPU {cpu:.0f} us/req "
              f"= {1e6 / cpu:,.0f} req/s per core; replies {replies}", flush=True)
    out["rss"] = peak_rss_mb(pid)
    print(f"  {name:9s} peak RSS {out['rss']:.1f} MB", flush=True)
    return out


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
    ap.add_argument("--no-anchor", action="store_true", help="skip postgrey")
    args = ap.parse_args()
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    print(f"policy benchmark: {args.conns} connections, {args.runs} runs x {args.seconds:g} s, "
          f"{os.cpu_count()} cores (load generator shares the machine)")
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="mxguard-bench-") as d:
        tmp = Path(d)
        os.chmod(tmp, 0o755)
        port = free_port()
        proc = start_mxguard(tmp, port)
        try:
            results["mxguard"] = measure("mxguard", port, proc.pid, args)
        finally:
            stop(proc)
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
    if "postgrey" in results:
        for kind in ("new", "known"):
            ratio = results["mxguard"][kind] / results["postgrey"][kind]
            cpu_ratio = results["postgrey"][kind + "_cpu"] / results["mxguard"][kind + "_cpu"]
            print(f"  ratio mxguard/postgrey, {kind} triplets: {ratio:.1f} x req/s, "
                  f"{cpu_ratio:.1f} x less CPU per request")
    print("  target (issue #2): >= 25,000 req/s in one process; postgrey anchor 2,400-2,700")


if __name__ == "__main__":
    main()
