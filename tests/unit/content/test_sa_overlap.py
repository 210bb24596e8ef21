"""The built-in rules SpamAssassin's own ruleset already scores score 0 when
both are loaded (``mxguard-sa-overlap.cf``), and only then."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from mxguard.config import Config
from mxguard.content.mime import parse_message
from mxguard.content.rules import BUILTIN_RULES, BUILTIN_SA_OVERLAP, build_ruleset, rule_paths

HTML_ONLY = (b"From: a@example.com\nTo: b@example.org\nSubject: x\n"
             b"Date: Mon, 01 Jan 2024 00:00:00 +0000\nMessage-Id: <1@example.com>\n"
             b"Content-Type: text/html\n\n<p>Hello there</p>\n")


def cfg(dirs: list[str], builtin: bool = True) -> Config:
    base = Config()
    return dataclasses.replace(base, content=dataclasses.replace(
        base.content, rules_dirs=dirs, builtin_rules=builtin))


def sa_dir(tmp_path: Path, scores: bool) -> str:
    d = tmp_path / ("sa" if scores else "other")
    d.mkdir()
    (d / "20_html_tests.cf").write_text("body MIME_HTML_ONLY eval:check_for_mime_html_only()\n")
    if scores:
        (d / "50_scores.cf").write_text("score MIME_HTML_ONLY 0.1\n")
    return str(d)


@pytest.mark.parametrize(("scores", "builtin", "overlap"), [
    (True, True, True),  # SpamAssassin's rules and the built-in ones: overlap loaded
    (False, True, False),  # control: some other rules directory
    (True, False, False),  # control: no built-in rules to adjust
])
def test_overlap_file_loaded_with_spamassassin_rules_only(
        tmp_path: Path, scores: bool, builtin: bool, overlap: bool) -> None:
    paths = rule_paths(cfg([sa_dir(tmp_path, scores)], builtin))
    assert (str(BUILTIN_SA_OVERLAP) in paths) is overlap
    if overlap:  # after the rules dirs, so it wins over them
        assert paths.index(str(BUILTIN_SA_OVERLAP)) == len(paths) - 1


def test_overlapping_rule_scores_zero_but_still_runs(tmp_path: Path) -> None:
    msg = parse_message(HTML_ONLY)
    alone = build_ruleset([BUILTIN_RULES]).scan(msg)
    both = build_ruleset(rule_paths(cfg([sa_dir(tmp_path, True)]))).scan(msg)
    assert "MXG_HTML_ONLY" in {h.name for h in alone.hits}
    assert "MXG_HTML_ONLY" not in {h.name for h in both.hits}
    assert "MXG_HTML_ONLY" in both.counts  # still counted for the metas
    assert "MIME_HTML_ONLY" in {h.name for h in both.hits}


def test_overlap_names_only_built_in_rules() -> None:
    builtin = build_ruleset([BUILTIN_RULES]).rules
    names = [line.split()[1] for line in BUILTIN_SA_OVERLAP.read_text().splitlines()
             if line.startswith("score")]
    assert names and all(n in builtin for n in names)
