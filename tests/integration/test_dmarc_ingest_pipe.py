"""``mxguard dmarc ingest`` as a real Postfix pipe transport.

Two pipe services in one private Postfix, as an admin would wire the rua
address (transport_maps routes the address to the service):

* ``dmarcrua`` stores into a SQLite file: the report mail is delivered
  (``status=sent ... delivered via dmarcrua service``) and the report is in
  the store;
* ``dmarcdown`` points at a store the pipe user cannot open: ingest exits 75
  (EX_TEMPFAIL) and Postfix keeps the mail queued (``status=deferred``)
  instead of bouncing it.

Postfix's pipe(8) never runs a command as root, so the command runs as
``nobody``: with this interpreter when nobody may run it, else with the
system python3 of the same version and this environment's site-packages
(mirrored under /tmp when they sit in a directory only root may enter).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tests.unit.auth.dmarc_reports import gz, report_mail, report_xml

from mxguard.store.received_reports import SqliteReceivedReports
from mxguard.testing.others import mxguard_argv_for
from mxguard.testing.postfix import PostfixInstance
from mxguard.testing.smtp import send

PIPE_USER = "nobody"


def _wait_for(pf: PostfixInstance, pattern: str, deadline: float = 60.0) -> str:
    """The first maillog line matching ``pattern`` (bounded wait)."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        for line in pf.maillog_text().splitlines():
            if re.search(pattern, line):
                return line
        time.sleep(0.2)
    raise AssertionError(f"no maillog line matching {pattern!r}:\n"
                         + "\n".join(pf.maillog_text().splitlines()[-30:]))


@pytest.fixture
def work() -> Iterator[Path]:
    """A directory the pipe user can reach (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="mxgrua-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_report_mail_through_the_pipe_transport(
        postfix_factory: Callable[..., PostfixInstance], work: Path) -> None:
    prefix = mxguard_argv_for(65534)
    if prefix is None:
        pytest.skip("no Python interpreter that the pipe user 'nobody' may run mxguard with")
    state = work / "state"
    state.mkdir()
    os.chown(state, 65534, 65534)
    good = work / "good.toml"
    good.write_text(f'[storage]\nurl = "sqlite:///{state}/mxguard.db"\n')
    locked = work / "locked"  # root's, 0755: nobody cannot create the store in it
    locked.mkdir(mode=0o755)
    down = work / "down.toml"
    down.write_text(f'[storage]\nurl = "sqlite:///{locked}/mxguard.db"\n')
    argv = " ".join(prefix)
    master = [
        "dmarcrua  unix - n n - - pipe",
        f"  user={PIPE_USER} argv={argv} dmarc ingest --config {good} -",
        "dmarcdown unix - n n - - pipe",
        f"  user={PIPE_USER} argv={argv} dmarc ingest --config {down} -",
    ]
    pf = postfix_factory({
        "transport_maps": "inline:{ rua@example.test=dmarcrua: , rua-down@example.test="
                          "dmarcdown: }",
        "dmarcrua_destination_recipient_limit": "1",
        "dmarcdown_destination_recipient_limit": "1",
    }, master_cf_extra=master)
    end = int(time.time()) - 86400
    mail = report_mail(gz(report_xml(report_id="pipe-1", begin=end - 86399, end=end)))
    for rcpt in ("rua@example.test", "rua-down@example.test"):
        t = send(pf.smtp_port, helo="reporter.test", mail_from="dmarc@reporter.test",
                 rcpts=[rcpt], data=mail)
        assert t.accepted, t

    line = _wait_for(pf, r"to=<rua@example\.test>.*status=")
    assert "status=sent" in line and "delivered via dmarcrua service" in line
    store = SqliteReceivedReports(str(state / "mxguard-received.db"))
    try:
        assert [r.report_id for r in store.reports()] == ["pipe-1"]
    finally:
        store.close()

    line = _wait_for(pf, r"to=<rua-down@example\.test>.*status=")
    assert "status=deferred" in line  # EX_TEMPFAIL: kept and retried, not bounced
    assert "Postfix retries" in line or "temporary failure" in line
