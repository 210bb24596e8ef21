#!/usr/bin/env python3
"""Memory bombs against a real ``mxguard serve``: peak RSS, and whether other
mail was served meanwhile.

Each bomb gets a fresh daemon (so the kernel's high-water mark, ``VmHWM`` of
``/proc/PID/status``, is that bomb's peak) with default limits, listening on
loopback. While a bomb runs, a prober asks the policy door one request and
sends one small message through the milter door every 0.2 s; printed per bomb:
the daemon's peak RSS, probes answered / sent, the slowest probe, and the
bomb's own outcome (the reply to the bombing message, connections closed).

Bombs:

* ``headers``  -- one message with ``--headers`` (1,000,000) empty header
  lines (``X:``) through the milter door, as Postfix passes a 4 MB header
  of that shape on (one milter packet per header line);
* ``packets``  -- ``--conns`` (400) milter connections each negotiate and then
  send the first ``--packet`` - 1 bytes (1 MB) of one packet, never its end;
  then the same with 250 KB packets (below the default ``max_packet``);
* ``policy``   -- ``--conns`` policy connections each send a request of
  ``max_request_bytes`` - 1 KB without the blank line that ends it.

``--repo PATH`` runs the daemon from another checkout (``PATH/src`` first on
``PYTHONPATH``), e.g. the commit before these limits, to compare. Figures
only: it never fails on time or size.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from milter_client import Client, Message, MilterClient, MilterError

from mxguard.protocols import milter as m
from mxguard.testing.ports import free_port

POLICY_REQUEST = (b"request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\n"
                  b"client_address=198.51.100.7\nclient_name=unknown\nhelo_name=probe.test\n"
                  b"sender=a@probe.test\nrecipient=b@probe.test\ninstance=1\n\n")
SMALL = (b"From: a@probe.test\r\nTo: b@probe.test\r\nSubject: probe\r\n"
         b"Message-ID: <p@probe.test>\r\n\r\nhello\r\n")


class Daemon:
    def __init__(self, tmp: Path, repo: str | None) -> None:
        self.tmp = tmp
        self.policy_port, self.milter_port = free_port(), free_port()
        cfg = tmp / "mxguard.toml"
        cfg.write_text(f'[policy]\nlisten = "127.0.0.1:{self.policy_port}"\n'
                       f'[milter]\nlisten = "127.0.0.1:{self.milter_port}"\n'
                       f'[storage]\nurl = "sqlite:///{tmp}/mxguard.db"\n'
                       '[dns]\nnameservers = ["127.0.0.1:9"]\ntimeout = 0.2\n'
                       '[greylist]\nmode = "off"\n[helo]\nmode = "off"\n[spf]\nmode = "off"\n')
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if repo:
            env["PYTHONPATH"] = str(Path(repo) / "src")
        self.logf = open(tmp / "mxguard.log", "ab")  # noqa: SIM115 -- closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "mxguard", "serve", "--config",
                                      str(cfg)], stdout=self.logf, stderr=self.logf, env=env)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.milter_port), 0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mxguard did not start:\n" + self.log()[-2000:])

    def peak_rss_mb(self) -> float:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def log(self) -> str:
        return (self.tmp / "mxguard.log").read_text(errors="replace")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.logf.close()


@dataclass
class Probes:
    sent: int = 0
    answered: int = 0
    slowest: float = 0.0
    errors: list[str] = field(default_factory=list)


async def _policy_probe(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(POLICY_REQUEST)
        await reader.readuntil(b"\n\n")
    finally:
        writer.close()


async def _milter_probe(port: int) -> None:
    client = MilterClient(f"inet:127.0.0.1:{port}", timeout=60)
    try:
        await client.open(Client("198.51.100.9", helo="probe.test"))
        out = await client.message(Message.parse(SMALL, "a@probe.test", ["b@probe.test"]))
        if out.final is None:
            raise MilterError("no final reply")
    finally:
        await client.close()


async def probe(d: Daemon, stop: asyncio.Event, probes: Probes) -> None:
    while not stop.is_set():
        for kind, coro in (("policy", _policy_probe(d.policy_port)),
                           ("milter", _milter_probe(d.milter_port))):
            probes.sent += 1
            start = time.monotonic()
            try:
                await asyncio.wait_for(coro, 60)
                probes.answered += 1
            except (OSError, TimeoutError, MilterError, asyncio.IncompleteReadError) as exc:
                probes.errors.append(f"{kind}: {exc!r}")
            probes.slowest = max(probes.slowest, time.monotonic() - start)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.2)


async def bomb_headers(d: Daemon, n: int) -> str:
    client = MilterClient(f"inet:127.0.0.1:{d.milter_port}", timeout=300)
    try:
        await client.open(Client("198.51.100.8", helo="bomb.test"))
        msg = Message("a@bomb.test", ["b@bomb.test"], [("X", "")] * n, [("X", "")] * n,
                      [b"body\r\n"], 4 * n)
        out = await client.message(msg)
        return f"reply {out.final!r} at stage {out.stage}"
    except MilterError as exc:
        return f"connection ended: {exc}"
    finally:
        await client.close()


async def _closed(reader: asyncio.StreamReader) -> bool:
    """Whether mxguard closed (or reset) this connection."""
    try:
        while await asyncio.wait_for(reader.read(65536), 0.01):
            pass
    except TimeoutError:
        return False
    except OSError:
        return True
    return reader.at_eof()


async def bomb_packets(d: Daemon, conns: int, size: int) -> str:
    optneg = m.OptNeg(m.VERSION, 0x1FF, 0x1FFFFF).encode()
    partial = m.LEN.pack(size) + b"L" + b"X" * (size - 2)  # one byte short of the end
    writers = []
    closed = 0
    for _ in range(conns):
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", d.milter_port)
            writer.write(optneg + partial)
            writers.append((reader, writer))
        except OSError:
            closed += 1
    for _, w in writers:
        with contextlib.suppress(OSError):
            await w.drain()
    await asyncio.sleep(3)
    for reader, _ in writers:
        closed += await _closed(reader)
    for _, w in writers:
        w.close()
    return f"{closed} of {conns} connections closed by mxguard"


async def bomb_policy(d: Daemon, conns: int, size: int) -> str:
    line = b"x_filler=" + b"y" * (size - 2048) + b"\n"
    writers = []
    for _ in range(conns):
        reader, writer = await asyncio.open_connection("127.0.0.1", d.policy_port)
        writer.write(POLICY_REQUEST[:-1] + line)
        writers.append((reader, writer))
    for _, w in writers:
        with contextlib.suppress(OSError):
            await w.drain()
    await asyncio.sleep(3)
    closed = 0
    for reader, _ in writers:
        closed += await _closed(reader)
    for _, w in writers:
        w.close()
    return f"{closed} of {conns} connections closed by mxguard"


async def run_one(name: str, args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="mxg-bomb-") as tmp:
        d = Daemon(Path(tmp), args.repo)
        try:
            base = d.peak_rss_mb()
            stop, probes = asyncio.Event(), Probes()
            prober = asyncio.create_task(probe(d, stop, probes))
            await asyncio.sleep(0.5)
            if name == "headers":
                outcome = await bomb_headers(d, args.headers)
            elif name.startswith("packets"):
                outcome = await bomb_packets(d, args.conns, int(name.split(":")[1]))
            else:
                outcome = await bomb_policy(d, args.conns, 65536 - 1024)
            await asyncio.sleep(0.5)
            stop.set()
            await prober
            peak = d.peak_rss_mb()
            lines = [ln for ln in d.log().splitlines()
                     if "max_" in ln or "partial" in ln or "too many" in ln]
        finally:
            d.stop()
    print(f"{name:16} peak RSS {peak:7.1f} MB (idle {base:5.1f} MB); probes answered "
          f"{probes.answered}/{probes.sent}, slowest {probes.slowest:.2f} s; {outcome}")
    for err in probes.errors[:3]:
        print(f"{'':16} probe error: {err}")
    for ln in lines[:2]:
        print(f"{'':16} log: {ln[:160]}")


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repo", help="checkout to run the daemon from (default: this one)")
    ap.add_argument("--headers", type=int, default=1_000_000)
    ap.add_argument("--conns", type=int, default=400)
    ap.add_argument("--packet", type=int, default=1024 * 1024)
    ap.add_argument("bombs", nargs="*", default=["headers", "packets", "policy"])
    args = ap.parse_args()
    print(f"mxguard from {args.repo or Path(__file__).resolve().parents[1]}")
    for name in args.bombs:
        if name == "packets":
            for size in (args.packet, 250 * 1024):
                await run_one(f"packets:{size}", args)
        else:
            await run_one(name, args)


if __name__ == "__main__":
    asyncio.run(main())
