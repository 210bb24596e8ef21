"""Fixtures for integration tests that drive a real Postfix on loopback.

* ``sink``            an SMTP sink (mxguard.testing.sink), per test.
* ``postfix_factory`` ``make(main_cf_extra=None, *, sink_port=None, **kw)``
                      builds and starts a private PostfixInstance relaying to
                      ``sink`` (or ``sink_port``); all are stopped after the
                      test, their maillog tails printed (pytest shows them
                      for failed tests) and kept as ``tmp_path/postfix-N.maillog``.
* ``postfix``         one default instance (``postfix_factory()``).

Without a usable Postfix (not installed, or not root) the tests that use
``postfix_factory`` are skipped, unless CI is set: then they fail, because
CI must run them (scripts/install-test-deps.sh installs Postfix).
Every test under tests/integration/ is marked ``integration``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.support.daemon import MxguardProcess

from mxguard.testing.dns import DNSServer
from mxguard.testing.postfix import PostfixInstance, policy_wiring, postfix_available
from mxguard.testing.sink import Sink

_HERE = Path(__file__).resolve().parent

PostfixFactory = Callable[..., PostfixInstance]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.integration)


def running_in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_postfix() -> None:
    """Skip (or, under CI, fail) when no private Postfix can be run here."""
    if not postfix_available():
        problem = "postfix is not installed (run scripts/install-test-deps.sh)"
    elif os.geteuid() != 0:
        problem = "a private Postfix instance must be started as root"
    else:
        return
    if running_in_ci():
        pytest.fail(f"CI must run the Postfix integration tests, but {problem}",
                    pytrace=False)
    pytest.skip(problem)


@pytest.fixture
def sink() -> Iterator[Sink]:
    s = Sink().start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def postfix_factory(sink: Sink, tmp_path: Path) -> Iterator[PostfixFactory]:
    require_postfix()
    made: list[PostfixInstance] = []

    def make(main_cf_extra: dict[str, str] | None = None, *, sink_port: int | None = None,
             **kwargs: Any) -> PostfixInstance:
        # short path under /tmp: UNIX socket names live below it, and the
        # postfix user must be able to reach it (pytest's tmp_path is 0700)
        workdir = Path(tempfile.mkdtemp(prefix="mxgpf-", dir="/tmp"))
        pf = PostfixInstance(workdir, sink_port or sink.port, main_cf_extra, **kwargs)
        made.append(pf)
        pf.start()
        return pf

    yield make

    errors: list[BaseException] = []
    for i, pf in enumerate(made):
        try:
            pf.stop()
        except BaseException as exc:  # keep cleaning the others
            errors.append(exc)
        log = pf.maillog_text()
        (tmp_path / f"postfix-{i}.maillog").write_text(log)
        print(f"--- postfix instance {i} ({pf.workdir}) maillog tail ---")
        print("\n".join(log.splitlines()[-80:]))
        if not os.environ.get("MXGUARD_KEEP_POSTFIX"):
            shutil.rmtree(pf.workdir, ignore_errors=True)
    if errors:
        raise errors[0]


@pytest.fixture
def postfix(postfix_factory: PostfixFactory) -> PostfixInstance:
    return postfix_factory()


Stack = tuple[MxguardProcess, PostfixInstance]


@pytest.fixture
def stack(tmp_path: Path, dns: DNSServer, sink: Sink,
          postfix_factory: PostfixFactory) -> Iterator[Callable[..., Stack]]:
    """``make(extra="", top="")``: a real ``mxguard serve`` using the test module's
    ``dns`` fixture, and a private Postfix wired to its policy door."""
    started: list[MxguardProcess] = []

    def make(extra: str = "", top: str = "") -> Stack:
        mx = MxguardProcess(tmp_path, top + f'[dns]\nnameservers = ["{dns.address}"]\n'
                                            "timeout = 2\n[helo]\nexempt_networks = []\n" + extra)
        mx.start()
        started.append(mx)
        return mx, postfix_factory(policy_wiring(mx.port))

    yield make
    for mx in started:
        assert mx.stop() == 0
