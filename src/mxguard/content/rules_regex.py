"""Perl regexes of SpamAssassin rules as Python ones.

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

import re
import warnings


class RegexError(ValueError):
    """A Perl regex we cannot translate or compile (also raised by the rule-file
    parser for a malformed rule line)."""


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


__all__ = ["RegexError", "compile_regex", "split_perl_regex", "translate_regex"]
