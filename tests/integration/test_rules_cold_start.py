"""Issue 18 (rules at speed), through a real ``mxguard serve``: on a cold
start (no compiled-rules cache for the configured rule files) the daemon
answers mail at once with the built-in rules while a separate process
compiles the rest, then puts the full set in service; a warm start listens
at once too, reads the full set from the cache in a thread, and the first
message waits for it: its verdict has the full rule set's hits."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.integration.test_content_worst import status, symbols_in
from tests.support import DATA
from tests.support.daemon import MxguardProcess

from mxguard.testing.ports import free_port

pytestmark = pytest.mark.integration

MARKER_RULES = "body SX_COLD_MARKER /cold-start-marker/\nscore SX_COLD_MARKER 0.5\n"


@pytest.fixture
def procs() -> Iterator[list[MxguardProcess]]:
    started: list[MxguardProcess] = []
    yield started
    for proc in started:
        if proc.proc is not None and proc.proc.poll() is None:
            proc.proc.kill()
            proc.proc.wait(5)


def start(tmp: Path, rules_dir: Path) -> MxguardProcess:
    proc = MxguardProcess(tmp)
    proc.write_config(
        f'[server]\nstate_dir = "{tmp}"\n'
        f'[dns]\nnameservers = ["127.0.0.1:{free_port()}"]\ntimeout = 1\n'
        f'[content]\nrules_dirs = ["{rules_dir}"]\n'
        '[helo]\nmode = "off"\n[spf]\nmode = "off"\n[greylist]\nmode = "off"\n'
        '[dkim]\nmode = "off"\ninternal_hosts = []\n[dmarc]\nmode = "off"\n'
        '[dnsbl]\nmode = "off"\n[bayes]\nenabled = false\n')
    return proc.start()


def message(subject: str, body: str) -> bytes:
    return (f"From: ann@sender.test\r\nTo: bob@example.test\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject}@sender.test>\r\n\r\n{body}\r\n").encode()


async def test_cold_start_answers_at_once_then_uses_the_full_rule_set(
        tmp_path: Path, procs: list[MxguardProcess]) -> None:
    rules_dir = tmp_path / "sa-rules"
    rules_dir.mkdir()
    (rules_dir / "20_sample.cf").write_text((DATA / "rules-sample" / "sample.cf").read_text())
    (rules_dir / "30_marker.cf").write_text(MARKER_RULES)
    state = tmp_path / "state"
    state.mkdir()
    proc = start(state, rules_dir)
    procs.append(proc)
    proc.wait_log("not compiled yet")
    assert "serving with the built-in rules" in proc.log_text()
    first = await status(proc.milter_port, message("first", "hello cold-start-marker"))
    assert first.startswith(("No, score=", "Yes, score=")), first  # answered meanwhile
    proc.wait_log("full rule set in use", timeout=180)
    hit = await status(proc.milter_port, message("second", "hello cold-start-marker"))
    miss = await status(proc.milter_port, message("third", "hello nothing here"))
    assert "SX_COLD_MARKER" in symbols_in(hit), hit
    assert "SX_COLD_MARKER" not in symbols_in(miss), miss  # control
    assert list((state / "rules-cache").glob("rules-*.bin"))
    assert proc.stop() == 0
    # warm start: read from the cache, the marker from the first message on
    proc.log.write_text("")
    proc.start()
    warm = await status(proc.milter_port, message("fourth", "hello cold-start-marker"))
    assert "SX_COLD_MARKER" in symbols_in(warm), warm
    proc.wait_log("read from the cache")
    assert "not compiled yet" not in proc.log_text()
    assert proc.stop() == 0
