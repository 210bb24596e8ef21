"""Reading SpamAssassin ``.cf`` rule files.

:func:`parse_paths` reads files and directories (``*.cf`` in name order, as
SpamAssassin does) into a :class:`ParsedRules`: rule definitions, scores,
descriptions, tflags, and the few list settings rules depend on
(``url_shortener``, ``freemail_domains``, ``enlist_uri_host``,
``replace_tag``/``replace_rules`` of the ReplaceTags plugin). Everything else
(``def_welcomelist_*``, DNS settings, report templates ...) is counted in
``ignored`` and otherwise skipped.

Conditionals: ``ifplugin X`` is true for the plugins in
:data:`IMPLEMENTED_PLUGINS` (whose rules we can run, at least in part);
``if EXPR`` understands ``version`` (:data:`SA_VERSION`), ``plugin(X)``,
``can(X)`` (true only for the features in :data:`FEATURES`), numbers,
comparisons, ``! && || and or not`` and parentheses; ``else``/``endif`` nest.
``lang xx ...`` lines (translations) are skipped. ``include FILE`` is
relative to the including file.

A malformed line is recorded in ``errors`` as ``file:line: message`` and the
rest still loads -- never an exception for a rule file's content.

Regexes are checked and translated by :mod:`mxguard.content.rules_regex`.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from mxguard.content.rules_regex import RegexError, split_perl_regex

SA_VERSION = 4.000001  # the SpamAssassin version ``if (version >= ...)`` compares to

# Plugins whose rules we read (their evals are implemented at least in part,
# or their directives are understood). Blocks of other plugins are skipped.
IMPLEMENTED_PLUGINS = frozenset(
    "Mail::SpamAssassin::Plugin::" + name for name in (
        "HeaderEval", "BodyEval", "MIMEEval", "HTMLEval", "FreeMail", "SPF", "DKIM", "DMARC",
        "ReplaceTags", "Bayes", "URIDetail", "WLBLEval", "FromNameSpoof", "URLShortener",
        "Check", "RelayEval", "URIEval", "DNSEval", "VBounce", "AskDNS", "URIDNSBL",
    ))
# Plugins whose rules are network tests (DNS): read, marked ``net``, never fire here.
NET_PLUGINS = frozenset(
    "Mail::SpamAssassin::Plugin::" + name for name in ("DNSEval", "AskDNS", "URIDNSBL"))
FEATURES = frozenset((
    "Mail::SpamAssassin::Conf::feature_bug6558_free",
    "Mail::SpamAssassin::Conf::feature_welcomelist_blocklist",
    "Mail::SpamAssassin::Conf::feature_yesno_takes_args",
    "Mail::SpamAssassin::Conf::perl_min_version_5010000",
    "Mail::SpamAssassin::Plugin::BodyEval::has_check_body_length",
))

RULE_TYPES = ("header", "body", "rawbody", "full", "uri", "meta", "mimeheader", "uri_detail")
_NAME = re.compile(r"^[A-Za-z0-9_]+$")


@dataclass(slots=True)
class RuleDef:
    name: str
    kind: str  # one of RULE_TYPES
    source: str  # "file:line"
    pattern: str = ""  # the Perl regex with delimiters and flags
    header: str = ""  # header rules: "From:addr", "ALL", "ToCc" ...
    negate: bool = False  # "!~"
    if_unset: str | None = None
    exists: str = ""  # "exists:Name" header rules
    eval_name: str = ""
    eval_args: tuple[str, ...] = ()
    meta: str = ""  # meta expression
    net: bool = False  # defined inside a network plugin's block


@dataclass(slots=True)
class ParsedRules:
    rules: dict[str, RuleDef] = field(default_factory=dict)
    scores: dict[str, tuple[float, float, float, float]] = field(default_factory=dict)
    describe: dict[str, str] = field(default_factory=dict)
    tflags: dict[str, str] = field(default_factory=dict)
    priority: dict[str, int] = field(default_factory=dict)
    replace_tags: dict[str, dict[str, str]] = field(
        default_factory=lambda: {"tag": {}, "pre": {}, "post": {}, "inter": {}})
    replace_rules: set[str] = field(default_factory=set)
    url_shorteners: set[str] = field(default_factory=set)
    freemail_domains: set[str] = field(default_factory=set)
    uri_host_lists: dict[str, set[str]] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    ignored: Counter[str] = field(default_factory=Counter)  # settings we skip, by name


# ------------------------------------------------------------------ files


def parse_paths(paths: list[str | os.PathLike[str]], into: ParsedRules | None = None
                ) -> ParsedRules:
    """Read every path (a ``.cf`` file, or a directory of them) in order."""
    out = into if into is not None else ParsedRules()
    for path in paths:
        p = Path(path)
        if p.is_dir():
            for f in sorted(p.glob("*.cf")):
                parse_file(f, out)
        elif p.exists():
            parse_file(p, out)
        else:
            out.errors.append(f"{p}: no such file or directory")
    return out


def parse_file(path: str | os.PathLike[str], out: ParsedRules, depth: int = 0) -> None:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        out.errors.append(f"{path}: cannot read: {exc.strerror or exc}")
        return
    out.files.append(str(path))
    parse_text(data.decode("latin-1"), str(path), out, depth)


def parse_text(text: str, filename: str, out: ParsedRules, depth: int = 0) -> None:
    """Parse rule text (latin-1 view of the file's bytes)."""
    stack: list[tuple[bool, bool, int]] = []  # (active, net, line) per open if/ifplugin
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = _strip_comment(raw)
        if not line:
            continue
        where = f"{filename}:{lineno}"
        word, _, rest = _split1(line)
        word = word.lower()
        if word in ("ifplugin", "if", "else", "endif"):
            _conditional(word, rest, stack, where, lineno, out)
            continue
        if not all(active for active, _, _ in stack):
            continue
        net = any(n for _, n, _ in stack)
        try:
            _directive(word, rest, where, out, net, filename, depth)
        except RegexError as exc:
            out.errors.append(f"{where}: {exc}")
    for _, _, lineno in stack:
        out.errors.append(f"{filename}:{lineno}: if/ifplugin without endif")


def _split1(text: str) -> tuple[str, str, str]:
    parts = text.split(None, 1)
    return parts[0], " ", (parts[1].strip() if len(parts) > 1 else "")


def _strip_comment(raw: str) -> str:
    line = re.sub(r"(?<!\\)#.*$", "", raw)
    return line.replace("\\#", "#").strip()


def _conditional(word: str, rest: str, stack: list[tuple[bool, bool, int]], where: str,
                 lineno: int, out: ParsedRules) -> None:
    if word == "ifplugin":
        name = rest.split()[0] if rest else ""
        stack.append((name in IMPLEMENTED_PLUGINS, name in NET_PLUGINS, lineno))
    elif word == "if":
        try:
            value = eval_if(rest)
        except ValueError as exc:
            out.errors.append(f"{where}: cannot evaluate 'if {rest}': {exc}")
            value = False
        stack.append((value, False, lineno))
    elif word == "else":
        if not stack:
            out.errors.append(f"{where}: else without if")
            return
        active, net, start = stack.pop()
        stack.append((not active, net, start))
    elif not stack:
        out.errors.append(f"{where}: endif without if")
    else:
        stack.pop()


_IF_TOKEN = re.compile(r"\s*(?:(plugin|can|has)\s*\(\s*([\w:]+)\s*\)|(perl_version|version)"
                       r"|(\d+(?:\.\d+)?)|(&&|\|\||and\b|or\b|not\b|>=|<=|==|!=|[()<>!]))")


def eval_if(expr: str) -> bool:
    """Evaluate an ``if`` condition of a .cf file (see module docstring)."""
    pos, out = 0, []
    expr = expr.strip()
    while pos < len(expr):
        m = _IF_TOKEN.match(expr, pos)
        if m is None:
            if expr[pos:].strip():
                raise ValueError(f"unexpected {expr[pos:pos + 20]!r}")
            break
        pos = m.end()
        func, arg, var, num, op = m.groups()
        if func == "plugin":
            out.append(str(arg in IMPLEMENTED_PLUGINS))
        elif func in ("can", "has"):
            out.append(str(arg in FEATURES))
        elif var:
            out.append(repr(SA_VERSION) if var == "version" else "5.036")
        elif num:
            out.append(num)
        else:
            out.append({"&&": "and", "||": "or", "!": "not"}.get(op, op))
    try:
        return bool(eval(" ".join(out), {"__builtins__": {}}, {}))
    except Exception as exc:
        raise ValueError(type(exc).__name__) from None


# ------------------------------------------------------------------ directives

_LIST_DIRECTIVES = {"url_shortener": "url_shorteners", "freemail_domains": "freemail_domains"}


def _directive(word: str, rest: str, where: str, out: ParsedRules, net: bool, filename: str,
               depth: int) -> None:
    if word in ("header", "body", "rawbody", "full", "uri", "meta", "mimeheader"):
        _rule(word, rest, where, out, net)
    elif word == "score":
        _score(rest, where, out)
    elif word in ("describe", "tflags", "priority"):
        name, _, value = _split1(rest) if rest else ("", "", "")
        if not _NAME.match(name):
            out.errors.append(f"{where}: {word}: bad rule name {name!r}")
        elif word == "describe":
            out.describe[name] = value.strip()
        elif word == "tflags":
            out.tflags[name] = value.strip()
        else:
            try:
                out.priority[name] = int(value.strip())
            except ValueError:
                out.errors.append(f"{where}: priority {name}: not an integer")
    elif word in ("replace_tag", "replace_pre", "replace_post", "replace_inter"):
        parts = rest.split(None, 1)
        if len(parts) != 2:
            out.errors.append(f"{where}: {word} needs a name and a value")
        else:
            out.replace_tags[word[8:]][parts[0]] = parts[1].strip()
    elif word == "replace_rules":
        out.replace_rules.update(rest.split())
    elif word in _LIST_DIRECTIVES:
        getattr(out, _LIST_DIRECTIVES[word]).update(d.lower() for d in rest.split())
    elif word == "enlist_uri_host":
        m = re.match(r"\(([^)]+)\)\s*(.*)", rest)
        if m is None:
            out.errors.append(f"{where}: enlist_uri_host (LIST) host...")
        else:
            out.uri_host_lists.setdefault(m.group(1), set()).update(
                h.lower() for h in m.group(2).split())
    elif word == "include":
        target = Path(filename).parent / rest
        if depth > 10:
            out.errors.append(f"{where}: include nested too deep")
        else:
            parse_file(target, out, depth + 1)
    elif word == "lang":
        out.ignored["lang"] += 1
    else:
        out.ignored[word] += 1


def _rule(kind: str, rest: str, where: str, out: ParsedRules, net: bool) -> None:
    parts = rest.split(None, 1)
    if len(parts) != 2:
        out.errors.append(f"{where}: {kind}: needs a rule name and a definition")
        return
    name, body = parts[0], parts[1].strip()
    if not _NAME.match(name):
        out.errors.append(f"{where}: {kind}: bad rule name {name!r}")
        return
    rule = RuleDef(name, kind, where, net=net)
    if kind == "meta":
        rule.meta = body
    elif body.startswith("eval:"):
        rule.eval_name, rule.eval_args = parse_eval(body[5:], where)
    elif kind in ("header", "mimeheader"):
        _header_rule(rule, body, where)
    else:
        rule.pattern = body
        split_perl_regex(body)  # syntax check now: errors name the line
    out.rules[name] = rule


def _header_rule(rule: RuleDef, body: str, where: str) -> None:
    if body.startswith("exists:"):
        rule.exists = body[7:].strip()
        if not rule.exists:
            raise RegexError(f"header {rule.name}: exists: needs a header name")
        return
    m = re.match(r"(\S+?)\s*([=!]~)\s*(.*)$", body)
    if m is None:
        raise RegexError(f"header {rule.name}: expected 'Header =~ /regex/'")
    rule.header, rule.negate = m.group(1), m.group(2) == "!~"
    _, _, trailer = split_perl_regex(m.group(3))
    rule.pattern = m.group(3)[: len(m.group(3)) - len(trailer)].strip()
    unset = re.match(r"\s*\[if-unset:\s?(.*)\]\s*$", trailer)
    if unset is not None:
        rule.if_unset = unset.group(1)
    elif trailer.strip():
        raise RegexError(f"header {rule.name}: unexpected text after the regex: "
                         f"{trailer.strip()[:40]!r}")


_EVAL = re.compile(r"^\s*([A-Za-z_]\w*)\s*\((.*)\)\s*$", re.S)
_EVAL_ARG = re.compile(r"""\s*(?:'((?:[^'\\]|\\.)*)'|"((?:[^"\\]|\\.)*)"|([^,'"\s][^,]*?))"""
                       r"""\s*(?:,|$)""")


def parse_eval(text: str, where: str) -> tuple[str, tuple[str, ...]]:
    m = _EVAL.match(text)
    if m is None:
        raise RegexError(f"eval: expected name(args), got {text[:40]!r}")
    args: list[str] = []
    inner, pos = m.group(2).strip(), 0
    while pos < len(inner):
        a = _EVAL_ARG.match(inner, pos)
        if a is None or a.end() == pos:
            raise RegexError(f"eval {m.group(1)}: cannot read arguments {inner[:40]!r}")
        args.append(next(g for g in a.groups() if g is not None))
        pos = a.end()
    return m.group(1), tuple(args)


def _score(rest: str, where: str, out: ParsedRules) -> None:
    parts = rest.split()
    if len(parts) < 2 or not _NAME.match(parts[0]):
        out.errors.append(f"{where}: score: expected 'score NAME n [n n n]'")
        return
    try:
        values = [float(v.strip("()")) for v in parts[1:5]]
    except ValueError:
        out.errors.append(f"{where}: score {parts[0]}: not a number: {' '.join(parts[1:])!r}")
        return
    while len(values) < 4:
        values.append(values[-1] if len(values) > 1 else values[0])
    out.scores[parts[0]] = (values[0], values[1], values[2], values[3])


# ------------------------------------------------------------------ ReplaceTags


def apply_replace_tags(pattern: str, tags: dict[str, dict[str, str]]) -> str:
    """Expand ``<TAG>`` with its definition; ``<pre X>``, ``<post X>`` and
    ``<inter X>`` set what goes before/after each tag and between two."""
    chosen = {"pre": "", "post": "", "inter": ""}
    for kind in chosen:
        for m in re.finditer(rf"<{kind}\s+([^>]+)>", pattern):
            chosen[kind] = tags[kind].get(m.group(1).strip(), "")
        pattern = re.sub(rf"<{kind}\s+[^>]+>", "", pattern)
    names = tags["tag"]
    tag = re.compile(r"<([A-Za-z0-9_]+)>")

    def expand(m: re.Match[str]) -> str:
        if m.group(1) not in names:
            return m.group(0)
        text = chosen["pre"] + names[m.group(1)] + chosen["post"]
        following = tag.match(pattern, m.end())
        if chosen["inter"] and following is not None and following.group(1) in names:
            text += chosen["inter"]
        return text

    return tag.sub(expand, pattern)


__all__ = ["FEATURES", "IMPLEMENTED_PLUGINS", "ParsedRules", "RuleDef", "apply_replace_tags",
           "eval_if", "parse_eval", "parse_file", "parse_paths", "parse_text"]
