"""Applying a ``mxguard postfix setup`` plan to a Postfix config dir, and
reverting it.

:func:`apply` backs up main.cf/master.cf (``main.cf.mxguard-<UTC time>``,
same mode and owner) and runs the plan's postconf commands on the config dir,
restoring the backup when one fails; :func:`check_and_reload` runs ``postfix
-c DIR check`` and ``postfix reload`` when Postfix runs (not while mxguard's
doors do not answer); :func:`revert` restores the newest backup set.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mxguard.cli.postfix_conf import SetupError, postconf, postfix_running, run_postfix_command
from mxguard.cli.postfix_plan import Plan

if TYPE_CHECKING:
    from mxguard.config import Config

BACKUP_TAG = ".mxguard-"
RESTORED_SUFFIX = ".restored"


def backup(config_dir: Path, files: Sequence[str] = ("main.cf", "master.cf")) -> list[Path]:
    """Copy the files to ``NAME.mxguard-<UTC time>`` (same mode and owner)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    n = 0
    while any((config_dir / f"{f}{BACKUP_TAG}{stamp}{f'-{n}' if n else ''}").exists()
              for f in files):
        n += 1
    suffix = f"{BACKUP_TAG}{stamp}{f'-{n}' if n else ''}"
    made = []
    for name in files:
        src = config_dir / name
        if src.exists():
            dst = config_dir / f"{name}{suffix}"
            shutil.copy2(src, dst)
            st = src.stat()
            os.chown(dst, st.st_uid, st.st_gid)
            made.append(dst)
    return made


def _stamp_key(stamp: str) -> tuple[str, int]:
    base, _, n = stamp.partition("-")
    return base, int(n) if n.isdigit() else 0


def latest_backup(config_dir: Path) -> list[Path]:
    """The newest backup set (main.cf and/or master.cf of one run) not yet restored."""
    stamps: dict[str, list[Path]] = {}
    for path in config_dir.iterdir():
        for name in ("main.cf", "master.cf"):
            prefix = f"{name}{BACKUP_TAG}"
            if path.name.startswith(prefix) and not path.name.endswith(RESTORED_SUFFIX):
                stamps.setdefault(path.name[len(prefix):], []).append(path)
    if not stamps:
        return []
    return sorted(stamps[max(stamps, key=_stamp_key)])


def _replace_file(src: Path, dst: Path) -> None:
    """Atomically put ``src``'s content at ``dst`` keeping ``dst``'s mode/owner."""
    ref = dst if dst.exists() else src
    st = ref.stat()
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", dir=dst.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(src.read_bytes())
        os.chmod(tmp, st.st_mode & 0o7777)
        os.chown(tmp, st.st_uid, st.st_gid)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def revert(config_dir: str | Path) -> list[tuple[Path, Path]]:
    """Restore the newest backup set; it is renamed ``...restored`` so the next
    revert goes one step further back. Returns (restored file, backup) pairs."""
    cdir = Path(config_dir).absolute()
    found = latest_backup(cdir)
    done = []
    for bak in found:
        target = cdir / bak.name.split(BACKUP_TAG)[0]
        _replace_file(bak, target)
        kept = bak.with_name(bak.name + RESTORED_SUFFIX)
        bak.rename(kept)
        done.append((target, kept))
    return done


def doors_down(cfg: Config, timeout: float = 3.0) -> list[str]:
    """Why mxguard's policy door / milter do not answer (empty: both answer)."""
    import asyncio

    from mxguard.auth.spf_lint import Lint
    from mxguard.cli.doctor import check_milter, check_policy

    async def probe() -> Lint:
        lint = Lint()
        await check_policy(cfg.policy.listen, timeout, lint)
        if cfg.milter.enabled:
            await check_milter(cfg.milter.listen, timeout, lint)
        return lint

    return [line[6:] for line in asyncio.run(probe()).lines if line.startswith("FAIL")]


def check_and_reload(config_dir: Path, cfg: Config | None = None) -> list[str]:
    """``postfix check``, then ``postfix reload`` if it runs -- unless ``cfg`` is given
    and mxguard does not answer (a reload would make Postfix defer all mail through
    the milter). Lines to print; SetupError when the check fails."""
    out: list[str] = []
    res = run_postfix_command("postfix", config_dir, "check")
    problems = (res.stdout + res.stderr).strip()
    if res.returncode != 0:
        raise SetupError(f"postfix -c {config_dir} check failed:\n{problems}\nundo: mxguard "
                         f"postfix setup --revert --config-dir {config_dir}")
    out.append("postfix check: OK" + (f" (warnings:\n{problems})" if problems else ""))
    down = doors_down(cfg) if cfg is not None and postfix_running(config_dir) else []
    if down:
        out += [f"NOT reloaded: {problem}" for problem in down]
        out.append("start mxguard first (systemctl start mxguard), then: postfix -c "
                   f"{config_dir} reload -- with milter_default_action = tempfail, Postfix "
                   "would defer all mail while mxguard does not answer")
    elif postfix_running(config_dir):
        res = run_postfix_command("postfix", config_dir, "reload")
        if res.returncode != 0:
            raise SetupError(f"postfix -c {config_dir} reload failed: "
                             f"{(res.stdout + res.stderr).strip()}")
        out.append("postfix reload: done")
    else:
        out.append(f"Postfix is not running: start it (postfix -c {config_dir} start, or "
                   "systemctl start postfix) to use the new settings")
    return out


def apply(plan: Plan) -> list[Path]:
    """Back up, then run the plan's postconf commands on its config dir."""
    if not plan.changes:
        return []
    files = sorted({c.file for c in plan.changes})
    made = backup(plan.config_dir, files)
    try:
        for args in plan.commands():
            postconf(plan.config_dir, *args)
    except SetupError:
        for bak in made:
            _replace_file(bak, plan.config_dir / bak.name.split(BACKUP_TAG)[0])
        raise
    return made


__all__ = ["BACKUP_TAG", "RESTORED_SUFFIX", "apply", "backup", "check_and_reload",
           "doors_down", "latest_backup", "revert"]
