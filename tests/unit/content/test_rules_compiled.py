"""The compiled rule engine: identical hits to one regex per rule (Hyperscan
databases and the literal prefilter against ``compiled=False``), Hyperscan
prefilter patterns never narrower than the regex, the on-disk cache, and
``rules_dirs = "auto"``."""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest

from mxguard import config as mxconfig
from mxguard.content import rules as rules_mod
from mxguard.content import rules_compiled as rc
from mxguard.content.mime import ParsedMessage, parse_message
from mxguard.content.rules import BUILTIN_RULES, RuleSet, build_ruleset
from mxguard.content.rules_hs import Unsupported, hs_pattern, padded
from mxguard.content.rules_prefilter import hyperscan_available
from mxguard.content.rules_regex import compile_regex
from tests.support import DATA

SAMPLE = DATA / "corpus-sample"
SAMPLE_RULES = DATA / "rules-sample" / "sample.cf"
ANCHORED_RULES = DATA / "rules-sample" / "anchored.cf"
needs_hs = pytest.mark.skipif(not hyperscan_available(), reason="hyperscan not installed "
                              "(the fast extra, x86_64 only)")


def _messages() -> list[tuple[str, ParsedMessage]]:
    return [(p.name, parse_message(p.read_bytes())) for p in sorted(SAMPLE.iterdir())]


_CACHE: dict[str, Any] = {}


def messages() -> list[tuple[str, ParsedMessage]]:
    if "msgs" not in _CACHE:
        _CACHE["msgs"] = _messages()
    result: list[tuple[str, ParsedMessage]] = _CACHE["msgs"]
    return result


def engines(paths: list[Path]) -> dict[str, RuleSet]:
    out = {"reference": build_ruleset(paths, compiled=False),
           "prefilter": build_ruleset(paths, use_hyperscan=False)}
    if hyperscan_available():
        out["hyperscan"] = build_ruleset(paths, use_hyperscan=True)
    return out


# ------------------------------------------------------------------ identical hits

@pytest.mark.parametrize("rules", [[BUILTIN_RULES], [SAMPLE_RULES], [ANCHORED_RULES]],
                         ids=["builtin", "sample", "anchored"])
def test_compiled_engines_hit_exactly_what_one_regex_per_rule_hits(rules: list[Path]) -> None:
    sets = engines(rules)
    assert len(messages()) >= 44
    for name, msg in messages():
        ref = sets["reference"].scan(msg, now=0.0)
        for engine, rs in sets.items():
            got = rs.scan(msg, now=0.0)
            assert got.counts == ref.counts, (engine, name)
            assert got.score == ref.score, (engine, name)


# (rule, message in corpus-sample/): hits Vectorscan lost when the patterns
# reached it with anchors and class repeats (bench/README.md "rules")
LOST_BEFORE = [
    ("SX_A_HREF", "hard_ham.00195"),  # "^[^>].*?<a href=" with "...<img src=['\"]data"
    ("SX_A_HREF_CASE", "hard_ham.00195"),
    ("SX_A_IMG", "spam.00364"),
]


@needs_hs
@pytest.mark.parametrize("rule,message", LOST_BEFORE)
def test_hyperscan_finds_what_vectorscan_lost_and_the_control_stays_out(rule: str,
                                                                        message: str) -> None:
    rs = build_ruleset([ANCHORED_RULES], use_hyperscan=True)
    assert rs.stats.engine == "hyperscan+re" and rs.stats.hs_rules >= 10
    msg = dict(messages())[message]
    got = rs.scan(msg, now=0.0).counts
    assert got == build_ruleset([ANCHORED_RULES], compiled=False).scan(msg, now=0.0).counts
    assert rule in got
    assert "SX_A_NEVER" not in got and "SX_A_QUOTED_HREF" not in got  # controls
    # the rawbody candidates named by the databases alone include the rule
    target = rs.targets["rawbody"]
    assert target.fast is not None and target.fast[1] is None  # every rule in a database
    text = b"\n".join(p.raw.encode("utf-8", "replace") for p in msg.parts)
    named = {target.rules[i].name for i in target.fast[0].matches(text)}
    assert rule in named and "SX_A_NEVER" not in named


def test_hyperscan_patterns_have_no_anchors_and_no_wide_class_repeats() -> None:
    """What Vectorscan mishandled never reaches it: anchors become newlines of
    the padded text, unbounded repeats of wide classes a run of any bytes;
    control: a narrow class keeps its repeat."""
    cases = [
        ("/^[^>].*?<a href=/im", "\\x0a[\\x00-\\x3d\\x3f-\\xff][\\x00-\\xff]*\\x3c"),
        ("/(?:>$|>,)/", "\\x3e(?:\\x0a|\\x2c)"),
        ("/^\\s*$/", "\\x0a(?:[\\x09-\\x0d\\x20])*\\x0a"),
        ("/a\\n^b/m", "\\x61\\x0a\\x62"),  # an anchor inside the match is dropped
        ("/a\\S+b/", "\\x61(?:[\\x00-\\x08\\x0e-\\x1f\\x21-\\xff])[\\x00-\\xff]*\\x62"),
        ("/x{3,}y/", "(?:\\x78){3,}\\x79"),  # control: narrow class
    ]
    for perl, expected in cases:
        pattern = hs_pattern(compile_regex(perl))
        assert pattern.startswith(expected), (perl, pattern)
        assert "^" not in pattern.replace("[^", "") and "$" not in pattern
    assert padded(b"abc") == b"\nabc\n"


@needs_hs
def test_hyperscan_engine_really_uses_databases() -> None:
    rs = build_ruleset([SAMPLE_RULES], use_hyperscan=True)
    assert rs.stats.engine == "hyperscan+re"
    assert build_ruleset([SAMPLE_RULES]).stats.engine == "hyperscan+re"  # the default
    assert rs.stats.hs_rules >= 30
    assert all(rs.targets[k].fast is not None for k in ("body", "rawbody", "full", "uri"))
    ref = build_ruleset([SAMPLE_RULES], compiled=False)
    assert ref.stats.hs_rules == 0 and all(t.fast is None for t in ref.targets.values())


def test_sample_rules_exercise_every_type_and_the_control_never_fires() -> None:
    rs = build_ruleset([SAMPLE_RULES], compiled=False)
    fired: set[str] = set()
    for _, msg in messages():
        fired |= set(rs.scan(msg, now=0.0).counts)
    kinds = {rs.rules[n].kind for n in fired if n in rs.rules}
    assert kinds >= {"header", "body", "rawbody", "full", "uri", "meta", "eval"}
    for name in ("SX_B_MANY_CAPS", "SX_M_NO_HEADERS", "SX_NO_XMAILER", "SX_EXISTS_LIST",
                 "SX_B_FUZZY_FREE", "SX_U_CGI", "SX_ALL_ORDER", "SX_B_BACKREF", "SX_B_ATOMIC",
                 "SX_R_FONT", "SX_M_NESTED", "SX_TO_NONE", "SX_FROM_RAW_ENC"):
        assert name in fired, name
    assert "SX_B_NOT_MATCHING" not in fired  # control (and pruned: score 0)
    assert "SX_M_UNDEF" not in fired  # disabled: undefined rule


# ------------------------------------------------------------------ Hyperscan patterns

SUPERSET_CASES = [
    # (perl regex, text the regex matches, text it does not)
    ("/\\bfree\\b/i", b"it is FREE now", b"freedom"),
    ("/^hello$/m", b"x\nhello\ny", b"hello there"),
    ("/(?<!\\w)viagra/i", b" ViAgRa", b"pills"),
    ("/\\b(\\w{3,})\\s+\\1\\b/", b"the the", b"a b"),
    ("/(?>\\d{3}-)\\d{4}/", b"555-1234", b"55-12"),
    ("/a[^.]{0,200}b/", b"a" + b"x" * 150 + b"b", b"a.b"),
    ("/(?s)begin.{1,80}end/", b"begin\n\nend", b"nothing"),
    ("/\\Aabc\\Z/", b"abc", b"xabc"),
    ("/x{20,}/", b"x" * 25, b"x" * 3),
    ("/(?i:AB)c/", b"abc", b"abC"),
    ("/[[:alpha:]]{3}\\d/", b"abc1", b"ab1"),
    ("/caf\\xc3\\xa9/", "café".encode(), b"cafe"),
    ("/\\s\\S\\w\\W\\d\\D/", b" a_!1x", b"abcdef"),
    ("/(?:[yY]|\\xc3\\xbd|\\xc3[\\xbf\\xbe])(?:[oO0]|\\xc3\\xb6)u/", "ýöu".encode(), b"zzz"),
]


@pytest.mark.parametrize("perl,hit,miss", SUPERSET_CASES)
def test_hyperscan_pattern_matches_wherever_the_regex_does(perl: str, hit: bytes,
                                                          miss: bytes) -> None:
    regex = compile_regex(perl)
    assert regex.search(hit) and not regex.search(miss)
    for coarse in (False, True):
        pattern = hs_pattern(regex, coarse=coarse)
        widened = re.compile(pattern.encode("latin-1"))  # the same syntax as Python's
        assert widened.search(padded(hit)), (coarse, pattern)
        if hyperscan_available():
            dbs, refused = rc.compile_target([(0, pattern.encode("latin-1"))])
            assert not refused
            matcher = rc.HsMatcher(dbs)
            assert matcher.matches(hit) == [0]


def test_hyperscan_pattern_stays_selective_for_plain_words() -> None:
    """Control: widening keeps literals, so a text without them is not a candidate."""
    pattern = hs_pattern(compile_regex("/\\bclick\\s+here\\b/i"))
    assert not re.search(pattern.encode("latin-1"), padded(b"nothing to see"))


def test_unsupported_constructs_fall_back() -> None:
    with pytest.raises(Unsupported):
        hs_pattern(re.compile(b"x" * 30_000))  # too long for Hyperscan
    rs = build_ruleset_text("body LONG /" + "ab" * 15_000 + "/\n")
    msg = parse_message(b"Subject: x\n\n" + b"ab" * 15_000 + b"\n")
    assert rs.scan(msg).counts.get("LONG") == 1  # literal prefilter, still a hit


def build_ruleset_text(text: str, **kw: Any) -> RuleSet:
    from mxguard.content.rules_parser import ParsedRules, parse_text

    parsed = ParsedRules()
    parse_text(text, "test.cf", parsed)
    return RuleSet(parsed, **kw)


# ------------------------------------------------------------------ the disk cache

def test_cache_is_written_then_read_with_identical_hits(tmp_path: Path) -> None:
    first = build_ruleset([SAMPLE_RULES], cache_dir=tmp_path)
    files = list(tmp_path.glob("rules-*.bin"))
    assert first.stats.cache == "written" and len(files) == 1
    assert oct(files[0].stat().st_mode & 0o777) == "0o640"
    second = build_ruleset([SAMPLE_RULES], cache_dir=tmp_path)
    assert second.stats.cache == ("hit" if hyperscan_available() else "")
    assert second.stats.hs_rules == first.stats.hs_rules
    # rules read from the cache compile their regex on first use
    assert any(r.compiled_re is None for r in second.rules.values() if r.pattern)
    for _, msg in messages()[:15]:
        assert second.scan(msg, now=0.0).counts == first.scan(msg, now=0.0).counts


def test_changed_rule_file_misses_the_cache(tmp_path: Path) -> None:
    cf = tmp_path / "r.cf"
    cf.write_text("body A /alpha/\n")
    build_ruleset([cf], cache_dir=tmp_path / "c")
    cf.write_text("body A /beta/\n")
    rs = build_ruleset([cf], cache_dir=tmp_path / "c")
    assert rs.stats.cache == "written"
    msg = parse_message(b"Subject: x\n\nbeta\n")
    assert rs.scan(msg).counts == {"A": 1}
    assert len(list((tmp_path / "c").glob("rules-*.bin"))) == 1  # the old one is removed


def test_damaged_cache_is_ignored(tmp_path: Path) -> None:
    build_ruleset([SAMPLE_RULES], cache_dir=tmp_path)
    (path,) = tmp_path.glob("rules-*.bin")
    path.write_bytes(path.read_bytes()[:1000])
    rs = build_ruleset([SAMPLE_RULES], cache_dir=tmp_path)
    assert rs.stats.cache == "written"
    assert rc.read_cache(path) is not None


def test_cache_never_written_or_read_through_a_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    key = rc.cache_key([str(SAMPLE_RULES)], f"hs={hyperscan_available()}")
    assert key is not None
    path = rc.cache_path(tmp_path / "c", key)
    path.parent.mkdir()
    path.symlink_to(victim)
    assert rc.read_cache(path) is None
    rs = build_ruleset([SAMPLE_RULES], cache_dir=tmp_path / "c")
    assert rs.stats.cache == "written"
    assert victim.read_bytes() == b"keep" and not path.is_symlink()


def test_background_compile_serves_meanwhile_with_identical_hits(tmp_path: Path) -> None:
    rs = build_ruleset([SAMPLE_RULES], cache_dir=tmp_path, background=True)
    ref = build_ruleset([SAMPLE_RULES], compiled=False)
    name, msg = messages()[0]
    assert rs.scan(msg, now=0.0).counts == ref.scan(msg, now=0.0).counts
    assert rs.wait_compiled(120)
    for name, msg in messages()[:10]:
        assert rs.scan(msg, now=0.0).counts == ref.scan(msg, now=0.0).counts, name


# ------------------------------------------------------------------ rules_dirs = "auto"

@pytest.fixture
def sa_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """Temporary stand-ins for /var/lib/spamassassin and /usr/share/spamassassin."""
    updates, share = tmp_path / "var-lib-sa", tmp_path / "usr-share-sa"
    monkeypatch.setattr(rules_mod, "SA_UPDATES_DIR", updates)
    monkeypatch.setattr(rules_mod, "SA_SHARE_DIR", share)
    monkeypatch.delenv(rules_mod.SA_SEARCH_ENV, raising=False)
    return updates, share


def _cf(directory: Path, text: str = "body SA_RULE /sa-marker/\n") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "10_test.cf").write_text(text)
    return directory


def content(**kw: Any) -> mxconfig.Config:
    return mxconfig.Config(content=mxconfig.ContentConfig(**kw))


AUTO_CASES = [
    # (what is installed, expected directory relative to tmp, or None)
    ("nothing", None),
    ("share", "usr-share-sa"),
    ("updates", "var-lib-sa/4.000001/updates_spamassassin_org"),
    ("share+updates", "var-lib-sa/4.000001/updates_spamassassin_org"),
    ("share+empty-updates", "usr-share-sa"),  # control: a version dir without .cf files
]


@pytest.mark.parametrize("installed,expected", AUTO_CASES)
def test_auto_finds_spamassassin_rules(sa_dirs: tuple[Path, Path], tmp_path: Path,
                                       installed: str, expected: str | None) -> None:
    updates, share = sa_dirs
    if "share" in installed:
        _cf(share)
    if installed in ("updates", "share+updates"):
        _cf(updates / "3.004006" / "updates_spamassassin_org")
        _cf(updates / "4.000001" / "updates_spamassassin_org")
    if installed == "share+empty-updates":
        (updates / "4.000001" / "updates_spamassassin_org").mkdir(parents=True)
    dirs, how = rules_mod.rules_dirs(content())
    assert how == "auto"
    assert dirs == ([] if expected is None else [str(tmp_path / expected)])


def test_auto_loads_them_and_says_so(sa_dirs: tuple[Path, Path], tmp_path: Path,
                                     caplog: pytest.LogCaptureFixture) -> None:
    _cf(sa_dirs[1])
    cfg = mxconfig.Config(server=mxconfig.ServerConfig(state_dir=str(tmp_path / "state")))
    with caplog.at_level(logging.INFO, logger="mxguard"):
        rs = rules_mod.load_rules(cfg)
    assert "SA_RULE" in rs.rules
    line = next(r.getMessage() for r in caplog.records if "content rules:" in r.getMessage())
    assert line.endswith(f"from built-in, {sa_dirs[1]} (auto)")
    assert list((tmp_path / "state" / "rules-cache").glob("rules-*.bin"))


def test_auto_without_spamassassin_says_so(sa_dirs: tuple[Path, Path],
                                           caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="mxguard"):
        rs = rules_mod.load_rules(mxconfig.Config())
    assert "SA_RULE" not in rs.rules
    assert any("from built-in (auto: SpamAssassin's rules not installed)" in r.getMessage()
               for r in caplog.records)


@pytest.mark.parametrize("value,expected", [
    ([], []),
    (["/somewhere/else"], ["/somewhere/else"]),
])
def test_a_list_keeps_its_meaning(sa_dirs: tuple[Path, Path], value: list[str],
                                  expected: list[str]) -> None:
    _cf(sa_dirs[1])  # installed, but not asked for
    assert rules_mod.rules_dirs(content(rules_dirs=value)) == (expected, "configured")


def test_environment_overrides_the_search(sa_dirs: tuple[Path, Path], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    _cf(sa_dirs[1])
    monkeypatch.setenv(rules_mod.SA_SEARCH_ENV, "")
    assert rules_mod.rules_dirs(content()) == ([], "auto")
    other = _cf(tmp_path / "other")
    monkeypatch.setenv(rules_mod.SA_SEARCH_ENV, f"/nonexistent:{other}")
    assert rules_mod.rules_dirs(content()) == ([str(other)], "auto")


def test_the_test_suite_hides_installed_spamassassin_rules() -> None:
    assert os.environ.get(rules_mod.SA_SEARCH_ENV) == ""


@pytest.mark.parametrize("toml,ok", [
    ('rules_dirs = "auto"', True),
    ("rules_dirs = []", True),
    ('rules_dirs = ["/usr/share/spamassassin"]', True),
    ('rules_dirs = "sometimes"', False),
    ("rules_dirs = 5", False),
    ('rules_dirs = ["/a", 5]', False),
])
def test_rules_dirs_validation(tmp_path: Path, toml: str, ok: bool) -> None:
    path = tmp_path / "mxguard.toml"
    path.write_text(f"[content]\n{toml}\n")
    if ok:
        mxconfig.load(path)
        return
    with pytest.raises(mxconfig.ConfigError) as err:
        mxconfig.load(path)
    msg = str(err.value)
    assert str(path) in msg and "content.rules_dirs" in msg and '"auto"' in msg


ENGINE_CASES = [
    # (environment, engine): the databases are the default with hyperscan
    ({}, "hyperscan+re"),
    ({"MXGUARD_RULES_HYPERSCAN": "0"}, "literals+re"),
    ({"MXGUARD_NO_HYPERSCAN": "1"}, "literals+re"),  # as without the package: exact too
]


@needs_hs
@pytest.mark.parametrize("env,engine", ENGINE_CASES)
def test_engine_choice(env: dict[str, str], engine: str,
                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MXGUARD_RULES_HYPERSCAN", raising=False)
    monkeypatch.delenv("MXGUARD_NO_HYPERSCAN", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    rs = build_ruleset([ANCHORED_RULES])
    assert rs.stats.engine == engine
    assert (rs.stats.hs_rules > 0) == (engine == "hyperscan+re")
    ref = build_ruleset([ANCHORED_RULES], compiled=False)
    for _, msg in messages():
        assert rs.scan(msg, now=0.0).counts == ref.scan(msg, now=0.0).counts


# ------------------------------------------------------------------ cold start

def _cold_config(tmp_path: Path) -> mxconfig.Config:
    rules_dir = tmp_path / "sa"
    rules_dir.mkdir()
    (rules_dir / "20_sample.cf").write_text(SAMPLE_RULES.read_text())
    return mxconfig.Config(server=mxconfig.ServerConfig(state_dir=str(tmp_path / "state")),
                           content=mxconfig.ContentConfig(rules_dirs=[str(rules_dir)]))


def test_cold_start_serves_builtin_rules_until_a_process_has_compiled_the_rest(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from mxguard.checks.rules import RULES_SERVICE, ruleset

    cfg = _cold_config(tmp_path)
    paths = rules_mod.rule_paths(cfg)
    assert not rules_mod.is_cached(paths, rules_mod.rules_cache_dir(cfg))
    with caplog.at_level(logging.INFO, logger="mxguard"):
        interim = rules_mod.load_rules(cfg, background=True, interim=True)
    assert "not compiled yet" in caplog.text and "serving with the built-in" in caplog.text
    assert not any(n.startswith("SX_") for n in interim.rules)  # built-in rules only
    assert any(n.startswith("MXG_") for n in interim.rules)
    rt = type("Rt", (), {"services": {RULES_SERVICE: interim}, "config": cfg})()
    for _ in range(1200):  # the compile runs in another process
        if interim.replacement is not None:
            break
        time.sleep(0.1)
    full = interim.replacement
    assert full is not None and full.stats.cache in ("hit", "written")
    assert any(n.startswith("SX_") for n in full.rules)
    assert ruleset(rt) is full and rt.services[RULES_SERVICE] is full  # swapped in on use
    assert rules_mod.is_cached(paths, rules_mod.rules_cache_dir(cfg))
    ref = build_ruleset(paths, compiled=False)
    for _, msg in messages()[:10]:
        assert full.scan(msg, now=0.0).counts == ref.scan(msg, now=0.0).counts
    if not hyperscan_available():
        return  # no databases, no cache: every start is a cold one
    # a warm start: the built-in set at once, the full one read from the cache in a
    # thread; the rules check waits for it (test below)
    with caplog.at_level(logging.INFO, logger="mxguard"):
        warm = rules_mod.load_rules(cfg, background=True, interim=True)
        assert warm.loading is not None and warm.loading.wait(120)
    assert "from the compiled-rules cache" in caplog.text
    assert not any(n.startswith("SX_") for n in warm.rules)
    assert warm.replacement is not None and warm.replacement.stats.cache == "hit"
    assert any(n.startswith("SX_") for n in warm.replacement.rules)
    # control: without interim (a reload, mxguard scan) the full set comes at once
    direct = rules_mod.load_rules(cfg, background=True)
    assert direct.loading is None and direct.replacement is None
    assert any(n.startswith("SX_") for n in direct.rules)


async def test_a_warm_start_scans_with_the_full_rules_once_they_are_read(
        tmp_path: Path) -> None:
    """Messages that reach the rules check while a warm start reads the cache wait
    for the full set (the same hits as after it); a set not loading is used as is."""
    from mxguard.checks.rules import RULES_SERVICE, loaded_ruleset

    if not hyperscan_available():
        pytest.skip("no Hyperscan: no compiled-rules cache, so no warm start")
    cfg = _cold_config(tmp_path)
    rules_mod.build_ruleset(rules_mod.rule_paths(cfg),
                            cache_dir=rules_mod.rules_cache_dir(cfg)).wait_compiled(120)
    assert rules_mod.is_cached(rules_mod.rule_paths(cfg), rules_mod.rules_cache_dir(cfg))
    warm = rules_mod.load_rules(cfg, background=True, interim=True)
    assert warm.loading is not None
    rt = type("Rt", (), {"services": {RULES_SERVICE: warm}, "config": cfg})()
    used = await loaded_ruleset(rt)  # type: ignore[arg-type]
    assert used is warm.replacement and rt.services[RULES_SERVICE] is used
    assert any(n.startswith("SX_") for n in used.rules)
    # control: a rule set that is not loading anything is used at once
    plain = build_ruleset([SAMPLE_RULES])
    rt.services[RULES_SERVICE] = plain
    assert await loaded_ruleset(rt) is plain  # type: ignore[arg-type]


def test_closing_the_interim_rules_stops_the_background_compile(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The daemon stopping during a cold start leaves no compiling process behind,
    no half-written cache, and does not fall back to compiling in the daemon."""
    cfg = _cold_config(tmp_path)
    paths = rules_mod.rule_paths(cfg)
    with caplog.at_level(logging.INFO, logger="mxguard"):
        interim = rules_mod.load_rules(cfg, background=True, interim=True)
        for _ in range(600):
            if interim._builder is not None:
                break
            time.sleep(0.01)
        proc = interim._builder
        assert proc is not None and proc.poll() is None  # still starting up
        interim.close()
        assert proc.poll() is not None  # gone, not orphaned
        time.sleep(0.3)  # the thread notices and returns
    assert interim.replacement is None
    assert not rules_mod.is_cached(paths, rules_mod.rules_cache_dir(cfg))
    assert "background compile stopped" in caplog.text
    assert "compiling in the daemon" not in caplog.text
    interim.close()  # twice is harmless
    # control: a rule set with nothing compiling closes quietly
    plain = build_ruleset([SAMPLE_RULES])
    caplog.clear()
    plain.close()
    assert "stopped" not in caplog.text


def test_without_the_hyperscan_package_the_literal_prefilter_is_exact() -> None:
    """A plain ``pip install .`` (no ``fast`` extra): the import fails, the
    literal prefilter runs, hits unchanged."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['hyperscan'] = None\n"
        "from pathlib import Path\n"
        "from mxguard.content.mime import parse_message\n"
        "from mxguard.content.rules import build_ruleset\n"
        f"paths = [{str(ANCHORED_RULES)!r}, {str(SAMPLE_RULES)!r}]\n"
        "rs, ref = build_ruleset(paths), build_ruleset(paths, compiled=False)\n"
        f"msgs = [parse_message(p.read_bytes()) for p in sorted(Path({str(SAMPLE)!r}).iterdir())]\n"
        "same = sum(rs.scan(m, now=0.0).counts == ref.scan(m, now=0.0).counts for m in msgs)\n"
        "print(rs.stats.engine, rs.stats.hs_rules, same, len(msgs))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("MXGUARD_NO_HYPERSCAN",
                                                            "MXGUARD_RULES_HYPERSCAN")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, check=True).stdout.split()
    assert out[:2] == ["literals+re", "0"]
    assert out[2] == out[3] and int(out[3]) >= 44
