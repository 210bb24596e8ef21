"""Reading SpamAssassin ``.cf`` rule files, and Perl regexes as Python ones.

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

:func:`translate_regex` turns ``/re/flags`` or ``m{re}flags`` into a Python
bytes pattern (rules run on UTF-8 octets, like SpamAssassin 4). Translated:
``\\z \\Z \\h \\H \\v \\V \\R \\N \\e \\x{...} \\Q..\\E \\k<n>``, named groups
``(?<n>...)``, POSIX classes ``[:alpha:]``, mid-pattern ``(?i)`` (scoped to
its group), the ``i m s x`` flags, unknown letter escapes (a literal letter,
as Perl reads them). Possessive quantifiers and atomic groups are native in
Python 3.11. ``\\K \\G``, recursion, branch reset and code blocks cannot be
translated: the rule is reported as unsupported.
"""

from __future__ import annotations

import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

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


class RegexError(ValueError):
    """A Perl regex we cannot translate or compile."""


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


# ------------------------------------------------------------------ Perl regexes

_CLOSERS = {"{": "}", "(": ")", "[": "]", "<": ">"}


def split_perl_regex(text: str) -> tuple[str, str, str]:
    """``/re/flags rest`` or ``m{re}flags rest`` -> (re, flags, rest)."""
    text = text.lstrip()
    if text.startswith("/"):
        delim, i = "/", 1
    elif len(text) > 1 and text[0] == "m" and not text[1].isalnum() and not text[1].isspace():
        delim, i = text[1], 2
    else:
        raise RegexError(f"expected /regex/ or m{{regex}}, got {text[:40]!r}")
    close = _CLOSERS.get(delim, delim)
    depth, j = 0, i
    while j < len(text):
        ch = text[j]
        if ch == "\\":
            j += 2
            continue
        if close != delim and ch == delim:
            depth += 1
        elif ch == close:
            if depth == 0:
                break
            depth -= 1
        j += 1
    else:
        raise RegexError(f"regex not closed: {text[:60]!r}")
    m = re.match(r"[a-zA-Z]*", text[j + 1:])
    flags = m.group(0) if m else ""
    return text[i:j], flags, text[j + 1 + len(flags):]


_POSIX = {"alpha": "a-zA-Z", "digit": "0-9", "alnum": "a-zA-Z0-9", "upper": "A-Z",
          "lower": "a-z", "space": r"\s", "blank": r" \t", "punct": r"!-/:-@\[-`{-~",
          "xdigit": "0-9A-Fa-f", "word": r"\w", "cntrl": r"\x00-\x1f\x7f",
          "print": r"\x20-\x7e", "graph": r"\x21-\x7e", "ascii": r"\x00-\x7f"}
_NEG_POSIX = {"alpha": r"\W\d_", "digit": r"\D", "space": r"\S", "word": r"\W"}
_PY_ESCAPES = set("abBdDfnrsStwWAZ0123456789")
_UNSUPPORTED_ESC = {"K": r"\K", "G": r"\G", "X": r"\X", "C": r"\C", "l": r"\l", "u": r"\u",
                    "L": r"\L", "U": r"\U"}
_PROPS = {"L": r"a-zA-Z\x80-\xff", "Lu": "A-Z", "Ll": "a-z", "N": "0-9", "Nd": "0-9",
          "P": r"!-/:-@\[-`{-~", "Z": r" \xa0", "Zs": r" \xa0", "S": r"$+<=>^`|~",
          "Alpha": "a-zA-Z", "Digit": "0-9", "Space": r"\s", "Word": r"\w",
          "Punct": r"!-/:-@\[-`{-~",
          "Upper": "A-Z", "Lower": "a-z", "Alnum": "a-zA-Z0-9", "XPosixSpace": r"\s"}


def _hex_bytes(value: int) -> str:
    if value < 0x100:
        return f"\\x{value:02x}"
    try:
        encoded = chr(value).encode("utf-8")
    except (ValueError, UnicodeEncodeError):
        raise RegexError(f"bad code point {value:#x}") from None
    return "(?:" + "".join(f"\\x{b:02x}" for b in encoded) + ")"


class _Translator:
    def __init__(self, src: str) -> None:
        self.src, self.i = src, 0
        self.out: list[str] = []
        self.in_class = False
        self.class_start = 0
        self.groups: list[int] = []  # extra ")" to emit when each open group closes
        self.top_close = 0  # ")" closing scoped flags at the top level

    def run(self) -> str:
        src = self.src
        while self.i < len(src):
            ch = src[self.i]
            if ch == "\\":
                self._escape()
            elif self.in_class:
                self._class_char(ch)
            elif ch == "[":
                self.in_class, self.class_start = True, len(self.out) + 1
                self.out.append("[")
                self.i += 1
                if src.startswith("^", self.i):
                    self.out.append("^")
                    self.i += 1
                    self.class_start += 1
                if src.startswith("]", self.i):
                    self.out.append(r"\]")
                    self.i += 1
            elif ch == "(":
                self._open_group()
            elif ch == ")":
                self.out.append(")" * (1 + (self.groups.pop() if self.groups else 0)))
                self.i += 1
            else:
                self.out.append(ch)
                self.i += 1
        self.out.append(")" * self.top_close)
        return "".join(self.out)

    def _class_char(self, ch: str) -> None:
        src = self.src
        if ch == "[" and src.startswith("[:", self.i):
            end = src.find(":]", self.i + 2)
            if end > 0:
                name = src[self.i + 2:end]
                neg = name.startswith("^")
                name = name.lstrip("^")
                if neg and name in _NEG_POSIX:
                    self.out.append(_NEG_POSIX[name])
                elif not neg and name in _POSIX:
                    self.out.append(_POSIX[name])
                else:
                    raise RegexError(f"unsupported POSIX class [:{src[self.i + 2:end]}:]")
                self.i = end + 2
                return
        if ch == "[":
            self.out.append(r"\[")
        elif ch == "]":
            self.in_class = False
            self.out.append("]")
        elif ch in "&~|-" and src.startswith(ch * 2, self.i):
            self.out.append("\\" + ch)  # Python reserves doubled set operators
        else:
            self.out.append(ch)
        self.i += 1

    def _open_group(self) -> None:
        src = self.src
        rest = src[self.i:]
        if not rest.startswith("(?"):
            self.groups.append(0)
            self.out.append("(")
            self.i += 1
            return
        m = re.match(r"\(\?([a-zA-Z^]*)(?:-([a-zA-Z]*))?([:)])", rest)
        if m is not None and (m.group(1) or m.group(2) is not None or m.group(3) == ":"):
            on = "".join(c for c in m.group(1) if c in "imsx")
            off = "".join(c for c in (m.group(2) or "") if c in "imsx")
            flags = on + ("-" + off if off else "")
            if m.group(3) == ":":
                self.groups.append(0)
                self.out.append(f"(?{flags}:" if flags else "(?:")
            elif not flags:
                pass
            elif not "".join(self.out).strip() and not off and not self.groups:
                self.out.append(f"(?{on})")  # global flags at the very start
            else:
                self.out.append(f"(?{flags}:")  # scoped to the end of the enclosing group
                if self.groups:
                    self.groups[-1] += 1
                else:
                    self.top_close += 1
            self.i += m.end()
            return
        for perl, py in (("(?<=", "(?<="), ("(?<!", "(?<!"), ("(?P<", "(?P<"),
                         ("(?P=", "(?P="), ("(?>", "(?>"), ("(?#", "(?#"), ("(?=", "(?="),
                         ("(?!", "(?!"), ("(?(", "(?(")):
            if rest.startswith(perl):
                if perl != "(?P=":
                    self.groups.append(0)
                self.out.append(py)
                self.i += len(perl)
                return
        named = re.match(r"\(\?(?:<([A-Za-z_]\w*)>|'([A-Za-z_]\w*)')", rest)
        if named is not None:
            self.groups.append(0)
            self.out.append(f"(?P<{named.group(1) or named.group(2)}>")
            self.i += named.end()
            return
        raise RegexError(f"unsupported group construct {rest[:6]!r}")

    def _escape(self) -> None:
        src = self.src
        nxt = src[self.i + 1] if self.i + 1 < len(src) else ""
        self.i += 2
        cls = self.in_class
        simple = {"z": r"\Z", "Z": r"(?=\n?\Z)", "h": r"[ \t\xa0]", "H": r"[^ \t\xa0]",
                  "v": r"[\n\x0b\f\r\x85]", "V": r"[^\n\x0b\f\r\x85]",
                  "R": r"(?:\r\n|[\n\x0b\f\r\x85])", "e": r"\x1b"}
        in_class = {"h": r" \t\xa0", "v": r"\n\x0b\f\r\x85", "e": r"\x1b"}
        if cls and nxt in in_class:
            self.out.append(in_class[nxt])
        elif not cls and nxt in simple:
            self.out.append(simple[nxt])
        elif nxt == "N" and not src.startswith("{", self.i):
            self.out.append(r"[^\n]" if not cls else r"\n")
        elif nxt == "Q":
            end = src.find(r"\E", self.i)
            end = len(src) if end < 0 else end
            self.out.append(re.escape(src[self.i:end]))
            self.i = end + 2
        elif nxt == "E":
            pass
        elif nxt == "x":
            self._hex()
        elif nxt == "o" and src.startswith("{", self.i):
            end = src.find("}", self.i)
            self.out.append(_hex_bytes(int(src[self.i + 1:end] or "0", 8)))
            self.i = end + 1
        elif nxt == "c" and self.i < len(src):
            self.out.append(f"\\x{ord(src[self.i].upper()) ^ 0x40:02x}")
            self.i += 1
        elif nxt in "pP":
            self._property(nxt == "P")
        elif nxt in "kg":
            self._backref(nxt)
        elif nxt in _UNSUPPORTED_ESC:
            raise RegexError(f"unsupported escape {_UNSUPPORTED_ESC[nxt]}")
        elif nxt in _PY_ESCAPES or not nxt.isascii() or not nxt.isalpha():
            if cls and nxt == "b":
                self.out.append(r"\x08")
            else:
                self.out.append("\\" + nxt)
        else:
            self.out.append(nxt)  # Perl reads an unknown letter escape as the letter

    def _hex(self) -> None:
        src = self.src
        if src.startswith("{", self.i):
            end = src.find("}", self.i)
            if end < 0:
                raise RegexError(r"unterminated \x{")
            digits = src[self.i + 1:end].strip() or "0"
            self.i = end + 1
        else:
            m = re.match(r"[0-9a-fA-F]{0,2}", src[self.i:])
            digits = m.group(0) if m and m.group(0) else "0"
            self.i += len(m.group(0)) if m else 0
        try:
            value = int(digits, 16)
        except ValueError:
            raise RegexError(rf"bad \x{{{digits}}}") from None
        text = _hex_bytes(value)
        if self.in_class and text.startswith("(?:"):
            raise RegexError(r"multi-byte \x{...} in a character class")
        self.out.append(text)

    def _property(self, negated: bool) -> None:
        src = self.src
        if src.startswith("{", self.i):
            end = src.find("}", self.i)
            name = src[self.i + 1:end]
            self.i = end + 1
        else:
            name = src[self.i:self.i + 1]
            self.i += 1
        neg = negated ^ name.startswith("^")
        name = name.lstrip("^").replace("IsAlpha", "Alpha").replace("Is", "")
        if name not in _PROPS:
            raise RegexError(f"unsupported Unicode property \\p{{{name}}}")
        body = _PROPS[name]
        if self.in_class:
            if neg:
                raise RegexError(r"negated \P{...} inside a character class")
            self.out.append(body)
        else:
            self.out.append(f"[{'^' if neg else ''}{body}]")

    def _backref(self, kind: str) -> None:
        src = self.src
        m = re.match(r"(?:<(\w+)>|\{(-?\w+)\}|'(\w+)'|(\d+))", src[self.i:])
        if m is None:
            raise RegexError(f"bad \\{kind} reference")
        name = next(g for g in m.groups() if g is not None)
        self.i += m.end()
        if name.lstrip("-").isdigit():
            if name.startswith("-"):
                raise RegexError("relative back-references are not supported")
            self.out.append(f"(?:\\{name})" if len(name) < 3 else f"(?P={name})")
        else:
            self.out.append(f"(?P={name})")


_FLAG_BITS = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "x": re.VERBOSE}


def translate_regex(text: str) -> tuple[str, int]:
    """``/re/flags`` -> (Python pattern as str of latin-1 octets, re flags)."""
    body, flag_chars, trailer = split_perl_regex(text)
    if trailer.strip():
        raise RegexError(f"unexpected text after the regex: {trailer.strip()[:40]!r}")
    flags = 0
    for ch in flag_chars:
        flags |= _FLAG_BITS.get(ch, 0)
    if "(?{" in body or "(??{" in body or "(?|" in body or re.search(r"\(\?[R&+-]?\d*\)",
                                                                     body):
        raise RegexError("code blocks, recursion and branch reset are not supported")
    return _Translator(body).run(), flags


def compile_regex(text: str, extra_flags: int = 0) -> re.Pattern[bytes]:
    """Translate and compile; raises :class:`RegexError` with the reason."""
    pattern, flags = translate_regex(text)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return re.compile(pattern.encode("latin-1", "replace"), flags | extra_flags)
    except re.error as exc:
        raise RegexError(f"cannot compile regex: {exc}") from None
    except (OverflowError, RecursionError, ValueError) as exc:
        raise RegexError(f"cannot compile regex: {type(exc).__name__}") from None


__all__ = ["FEATURES", "IMPLEMENTED_PLUGINS", "ParsedRules", "RegexError", "RuleDef",
           "apply_replace_tags", "compile_regex", "eval_if", "parse_eval", "parse_file",
           "parse_paths", "parse_text", "split_perl_regex", "translate_regex"]
