"""``[web]`` checked before the daemon serves it: one line naming file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from mxguard import config
from mxguard.web.auth import hash_password
from mxguard.web.server import check_config

GOOD = hash_password("a-good-password", n=2**4, r=1, p=1)


@pytest.mark.parametrize(("web", "problem"), [
    ("", None),  # control: no password, defaults
    (f'password_hash = "{GOOD}"', None),  # control: a hash from mxguard web passwd
    ('password_hash = "plaintext"', "[web] password_hash: expected scrypt$N$r$p$salt$hash"),
    ('metrics_networks = ["10.0.0.0/8", "not-a-net"]',
     "[web] metrics_networks: 'not-a-net' is not a CIDR network"),
])
def test_check_config(tmp_path: Path, web: str, problem: str | None) -> None:
    path = tmp_path / "mxguard.toml"
    path.write_text(f"[web]\n{web}\n")
    found = check_config(config.load(str(path)))
    if problem is None:
        assert found is None
    else:
        assert found is not None and found.startswith(f"{path}: ") and problem in found
