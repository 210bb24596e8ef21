"""Issue 14, item 1, through a real ``mxguard serve``: a crafted message must
not stop content scanning for everyone, a runaway scan ends as RULES_TIMEOUT,
and SIGTERM exits within ``[server] shutdown_grace`` even while a worker
thread is busy scanning.

The runaway scan is a stand-in eval (``test_sleep``, registered by a
``sitecustomize`` on the daemon's PYTHONPATH) that sleeps between calls: the
content path itself has no slow shape left to use.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.support.daemon import MxguardProcess

from mxguard.core.runtime import INLINE_BYTES
from mxguard.server.daemon import EXIT_MARGIN
from mxguard.testing.adversarial import SHAPES
from mxguard.testing.ports import free_port

pytestmark = pytest.mark.integration

GRACE = 2.0
SLEEP_EVAL = '''
import logging, time
from mxguard.content.evals import EVALS

def test_sleep(ctx, seconds="0.3"):
    logging.getLogger("mxguard").warning("test_sleep: scanning %s", ctx.msg.subject)
    time.sleep(float(seconds))
    return True

EVALS["test_sleep"] = test_sleep
'''


def _milter_client() -> Any:
    path = Path(__file__).resolve().parents[2] / "bench" / "milter_client.py"
    name = "mxguard_bench_milter_client"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def start(tmp: Path, *, check_timeout: float = 30.0, sleeps: int = 0,
          sleep_seconds: float = 0.3) -> MxguardProcess:
    proc = MxguardProcess(tmp)
    rules = ""
    if sleeps:
        (tmp / "site").mkdir()
        (tmp / "site" / "sitecustomize.py").write_text(SLEEP_EVAL)
        (tmp / "slow.cf").write_text("".join(
            f"body SLOW_{i} eval:test_sleep('{sleep_seconds}')\nscore SLOW_{i} 0.1\n"
            for i in range(sleeps)))
        rules = f'local_rules = ["{tmp / "slow.cf"}"]\n'
    proc.config.write_text(
        f'[server]\nstate_dir = "{tmp}"\nshutdown_grace = {GRACE}\n'
        f'[policy]\nlisten = "127.0.0.1:{proc.port}"\n'
        f'[milter]\nlisten = "127.0.0.1:{proc.milter_port}"\n'
        f'[dns]\nnameservers = ["127.0.0.1:{free_port()}"]\ntimeout = 1\n'
        f'[storage]\nurl = "sqlite:///{tmp}/mxguard.db"\n'
        f"[pipeline]\ncheck_timeout = {check_timeout}\n"
        f"[content]\n{rules}"
        '[helo]\nmode = "off"\n[spf]\nmode = "off"\n[greylist]\nmode = "off"\n'
        '[dkim]\nmode = "off"\ninternal_hosts = []\n[dmarc]\nmode = "off"\n'
        '[dnsbl]\nmode = "off"\n[bayes]\nenabled = false\n')
    if sleeps:
        old = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = str(tmp / "site") + (os.pathsep + old if old else "")
        try:
            return proc.start()
        finally:
            if old is None:
                del os.environ["PYTHONPATH"]
            else:
                os.environ["PYTHONPATH"] = old
    return proc.start()


@pytest.fixture
def procs() -> Iterator[list[MxguardProcess]]:
    started: list[MxguardProcess] = []
    yield started
    for proc in started:
        if proc.proc is not None and proc.proc.poll() is None:
            proc.proc.kill()
            proc.proc.wait(5)


def message(subject: str, size: int) -> bytes:
    line = b"the notes from Tuesday are attached and the build passes again\r\n"
    return (f"From: ann@sender.test\r\nTo: bob@example.test\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject}@sender.test>\r\n\r\n").encode() + line * (size // len(line))


async def status(port: int, raw: bytes, timeout: float = 60.0) -> str:
    """X-Spam-Status the daemon added to ``raw`` (within ``timeout`` s)."""
    mc = _milter_client()
    client = mc.MilterClient(f"inet:127.0.0.1:{port}", timeout=timeout)
    for _ in range(100):  # the milter door opens next to the policy door
        try:
            assert await client.open(mc.Client(address="198.51.100.7")) is None
            break
        except OSError:
            await client.close()
            client = mc.MilterClient(f"inet:127.0.0.1:{port}", timeout=timeout)
            await asyncio.sleep(0.1)
    try:
        outcome = await asyncio.wait_for(client.message(mc.Message.parse(
            raw, "ann@sender.test", ["bob@example.test"])), timeout)
    finally:
        await client.close()
    assert outcome.delivered, outcome
    (value,) = outcome.added("X-Spam-Status")
    return " ".join(value.split())


def symbols_in(value: str) -> set[str]:
    tests = value.partition("tests=")[2].partition(" autolearn=")[0]
    return set(tests.replace(" ", "").split(","))


async def test_crafted_message_does_not_stop_scanning(tmp_path: Path,
                                                      procs: list[MxguardProcess]) -> None:
    proc = start(tmp_path)
    procs.append(proc)
    # took hours (a quadratic label walk); CRLF as Postfix sends it
    crafted = SHAPES["many_labels_url"](1024 * 1024).replace(b"\n", b"\r\n")
    crafted_task = asyncio.ensure_future(status(proc.milter_port, crafted, timeout=90))
    others = [await status(proc.milter_port, message(f"n{i}", size))
              for i, size in enumerate((2000, INLINE_BYTES + 5000, 2000))]
    assert all(v.startswith("No, score=") for v in others)  # other mail still scanned
    crafted_status = await crafted_task  # the crafted one finishes too, scanned to the end
    assert "RULES_TIMEOUT" not in crafted_status and "RULES_ERROR" not in crafted_status
    assert proc.stop(timeout=GRACE + EXIT_MARGIN + 5) == 0


@pytest.mark.parametrize(("size", "check_timeout", "timed_out"), [
    (2000, 1.0, True),  # scanned on the loop: the scan stops itself at the budget
    (INLINE_BYTES + 5000, 1.0, True),  # in a worker thread: likewise
    (2000, 60.0, False),  # control: within the budget, every rule runs
])
async def test_runaway_scan_ends_as_rules_timeout(tmp_path: Path, procs: list[MxguardProcess],
                                                  size: int, check_timeout: float,
                                                  timed_out: bool) -> None:
    proc = start(tmp_path, check_timeout=check_timeout, sleeps=10, sleep_seconds=0.3)
    procs.append(proc)
    value = await status(proc.milter_port, message("slow", size))
    assert ("SLOW_9" in symbols_in(value)) is not timed_out, value  # every rule ran
    # RULES_TIMEOUT scores 0 (not in X-Spam-Status): the error line and the decision show it
    log = proc.wait_log("door=milter") if not timed_out else proc.wait_log("RULES_TIMEOUT")
    # on the loop the scan's own Overrun; in a thread the runner's budget may come first
    assert bool(re.search(r"check=rules error=(Overrun|TimeoutError) detail='timed out'",
                          log)) is timed_out, log[-2000:]
    assert proc.stop(timeout=GRACE + EXIT_MARGIN + 5) == 0


@pytest.mark.parametrize("size", [INLINE_BYTES + 5000, 2000])
async def test_sigterm_exits_within_grace_while_a_worker_scans(
        tmp_path: Path, procs: list[MxguardProcess], size: int) -> None:
    # one eval that sleeps 300 s, a budget longer still: the scan is busy at SIGTERM
    proc = start(tmp_path, check_timeout=600, sleeps=1, sleep_seconds=300)
    procs.append(proc)
    scan = asyncio.ensure_future(status(proc.milter_port, message("stuck", size), timeout=120))
    await asyncio.to_thread(proc.wait_log, "test_sleep: scanning stuck", 30)
    assert proc.proc is not None
    proc.signal(signal.SIGTERM)
    try:
        code = await asyncio.to_thread(proc.proc.wait, GRACE + EXIT_MARGIN + 3)
    except subprocess.TimeoutExpired:
        pytest.fail("mxguard did not exit within shutdown_grace after SIGTERM:\n"
                    + proc.log_text()[-2000:])
    scan.cancel()
    await asyncio.gather(scan, return_exceptions=True)
    assert code in (0, 1)
    assert "exiting now" in proc.log_text()
