"""DKIM rotation state: saved atomically, and a planted symlink at the temporary
file is never followed (the state is written as root into a directory the
daemon user may write)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mxguard.auth.dkim_rotation import STATE_FILE, KeyState, RotationState


def state(tmp_path: Path) -> RotationState:
    st = RotationState.load(tmp_path / STATE_FILE)
    st.keys("example.com").append(KeyState(selector="202612", path=str(tmp_path / "k.key"),
                                           state="pending", created=1.0))
    return st


@pytest.mark.parametrize("planted", [True, False])  # False: the control, plain save
def test_save_never_follows_a_planted_symlink(tmp_path: Path, planted: bool) -> None:
    victim = tmp_path / "victim"
    victim.write_text("untouched\n")
    st = state(tmp_path)
    tmp = (tmp_path / STATE_FILE).with_name(f".{STATE_FILE}.tmp")
    if planted:
        tmp.symlink_to(victim)
    st.save()
    assert victim.read_text() == "untouched\n"
    saved = json.loads((tmp_path / STATE_FILE).read_text())
    assert saved["domains"]["example.com"][0]["selector"] == "202612"
    assert not (tmp_path / STATE_FILE).is_symlink() and not tmp.exists()
    assert RotationState.load(tmp_path / STATE_FILE).find("example.com", "202612") is not None
