"""mxguard.testing.others: running this checkout's mxguard as nobody from a
checkout only root may enter (a fresh clone in ``mktemp -d``, pytest's tmp_path)."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from mxguard.testing import others


@pytest.fixture
def tree() -> Iterator[Path]:
    """/tmp/X (mode set by the test) / pkg / mod.py (0600) and sub/data.txt."""
    root = Path(tempfile.mkdtemp(prefix="mxg-others-test-", dir="/tmp"))
    pkg = root / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "mod.py").write_text("X = 1\n")
    (pkg / "mod.py").chmod(0o600)
    (pkg / "sub" / "data.txt").write_text("data\n")
    pkg.chmod(0o755)
    try:
        yield root
    finally:
        root.chmod(0o700)
        subprocess.run(["rm", "-rf", str(root)], check=False)


@pytest.mark.parametrize(("root_mode", "reachable"), [
    (0o700, False),   # only root may enter the directory above
    (0o755, True),    # control: everyone may
    (0o711, True),    # searchable without listing is enough
])
def test_others_can_reach_follows_every_directory_above(
        tree: Path, root_mode: int, reachable: bool) -> None:
    tree.chmod(root_mode)
    assert others.others_can_reach(tree / "pkg") is reachable


def test_a_reachable_directory_is_used_where_it_is(tree: Path) -> None:
    tree.chmod(0o755)
    assert others._mirrored(tree / "pkg", 900) == tree / "pkg"


@pytest.mark.skipif(os.geteuid() != 0, reason="reading as nobody needs root")
def test_an_unreachable_directory_is_mirrored_readable_by_nobody(tree: Path) -> None:
    tree.chmod(0o700)
    mirror = others._mirrored(tree / "pkg", 901)
    assert mirror != tree / "pkg"
    assert others.others_can_reach(mirror)
    for rel in ("mod.py", "sub/data.txt"):
        read = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                               "cat", str(mirror / rel)], capture_output=True, check=False)
        assert read.returncode == 0, read.stderr
        assert read.stdout == (tree / "pkg" / rel).read_bytes()


@pytest.mark.skipif(os.geteuid() != 0, reason="running as nobody needs root")
def test_nobody_runs_this_checkouts_mxguard() -> None:
    argv = others.mxguard_argv_for()
    assert argv is not None
    run = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                          *argv, "--version"], capture_output=True, text=True, cwd="/",
                         check=False)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip()
