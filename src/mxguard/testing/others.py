"""Run this checkout's mxguard as another user (tests): the mail user of a
Dovecot pipe program, the ``user=`` of a Postfix pipe transport.

Those programs run as ``nobody``, who must reach the interpreter, the package
and its dependencies. A checkout under a directory only root may enter (pytest's
``tmp_path``, ``mktemp -d``, ``/root``, pyenv's interpreters) is out of reach:
the package and site-packages directories that are go into a mirror under
``/tmp`` (mode 0755; hard links where the file system allows, copies
otherwise), removed when the test process exits, and the system Python of the
same minor version runs them (its ABI matches the compiled dependencies).
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

NOBODY = 65534
_MIRROR: Path | None = None
_ARGV: dict[int, list[str] | None] = {}


def others_can_reach(path: Path) -> bool:
    """Every directory above ``path`` searchable and ``path`` readable by others."""
    try:
        real = path.resolve()
        if not real.stat().st_mode & 0o004:
            return False
        return all(p.stat().st_mode & 0o001 for p in real.parents)
    except OSError:
        return False


def _mirror_root() -> Path:
    global _MIRROR
    if _MIRROR is None:
        _MIRROR = Path(tempfile.mkdtemp(prefix="mxguard-others-", dir="/tmp"))
        _MIRROR.chmod(0o755)
        atexit.register(shutil.rmtree, _MIRROR, True)
    return _MIRROR


def _mirrored(path: Path, index: int) -> Path:
    """``path`` itself when others reach it, else a copy of it in the mirror."""
    if others_can_reach(path):
        return path
    dest = _mirror_root() / str(index) / path.name
    if not dest.exists():
        dest.parent.mkdir(mode=0o755)
        linked = subprocess.run(["cp", "-al", str(path), str(dest)], capture_output=True,
                                check=False)
        if linked.returncode != 0:  # another file system: copy
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(path, dest, symlinks=True)
        for root, dirs, files in os.walk(dest):  # readable and searchable by others
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o755)
            for name in files:
                full = os.path.join(root, name)
                if not os.path.islink(full):
                    os.chmod(full, os.stat(full).st_mode | 0o444)
    return dest


def mxguard_argv_for(uid: int = NOBODY, gid: int = NOBODY) -> list[str] | None:
    """argv prefix that runs ``python -m mxguard`` as ``uid``, checked by running
    ``--version`` as that user; None when no interpreter works."""
    if uid in _ARGV:
        return _ARGV[uid]
    import mxguard

    source = Path(mxguard.__file__).resolve().parent.parent
    sites = {Path(sysconfig.get_paths()["purelib"]), Path(sysconfig.get_paths()["platlib"])}
    sites |= {Path(p) for p in sys.path if p.endswith(("site-packages", "dist-packages"))}
    paths = [_mirrored(p, i) for i, p in enumerate([source, *sorted(sites)]) if p.is_dir()]
    pythonpath = ":".join(str(p) for p in paths)
    system = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")
    found: list[str] | None = None
    for python in (Path(sys.executable), system):
        argv = ["/usr/bin/env", f"PYTHONPATH={pythonpath}", str(python), "-m", "mxguard"]
        try:
            probe = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={gid}",
                                    "--clear-groups", *argv, "--version"],
                                   capture_output=True, cwd="/", timeout=60, check=False)
        except (OSError, subprocess.SubprocessError):
            continue
        if probe.returncode == 0:
            found = argv
            break
    _ARGV[uid] = found
    return found


__all__ = ["NOBODY", "mxguard_argv_for", "others_can_reach"]
