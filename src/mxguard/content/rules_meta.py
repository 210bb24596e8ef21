"""Meta rules: SpamAssassin's Perl-style expressions over rule hit counts
(``&& || ! + - * / < > <= >= == !=`` and parentheses), compiled once to a
Python function of the :class:`HitMap`."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, ClassVar


class HitMap(dict[str, int]):
    """Rule name -> hit count; a rule that did not hit reads as 0 in metas."""

    def __missing__(self, key: str) -> int:
        return 0


_META_TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d+)?)|([A-Za-z_][A-Za-z0-9_]*)|(&&|\|\||[<>=!]=|"
                         r"[-+*/()<>!]))")


class MetaError(ValueError):
    pass


class _MetaCompiler:
    """Perl precedence (``!`` binds tightest) to a fully parenthesised Python expression."""

    BINARY = (("||",), ("&&",), ("==", "!="), ("<", ">", "<=", ">="), ("+", "-"), ("*", "/"))
    PY: ClassVar[dict[str, str]] = {"||": "or", "&&": "and"}

    def __init__(self, expr: str) -> None:
        self.tokens: list[tuple[str, str]] = []
        pos = 0
        while pos < len(expr):
            m = _META_TOKEN.match(expr, pos)
            if m is None:
                if expr[pos:].strip():
                    raise MetaError(f"unexpected {expr[pos:pos + 15]!r}")
                break
            pos = m.end()
            num, name, op = m.groups()
            self.tokens.append(("num", num) if num else ("name", name) if name else ("op", op))
        self.pos = 0
        self.names: list[str] = []

    def compile(self) -> str:
        code = self._level(0)
        if self.pos != len(self.tokens):
            raise MetaError(f"unexpected {self.tokens[self.pos][1]!r}")
        return code

    def _peek(self) -> tuple[str, str]:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else ("end", "")

    def _level(self, n: int) -> str:
        if n == len(self.BINARY):
            return self._unary()
        left = self._level(n + 1)
        while self._peek()[0] == "op" and self._peek()[1] in self.BINARY[n]:
            op = self.tokens[self.pos][1]
            self.pos += 1
            right = self._level(n + 1)
            if op == "/":
                left = f"_div({left}, {right})"
            else:
                left = f"({left} {self.PY.get(op, op)} {right})"
        return left

    def _unary(self) -> str:
        kind, value = self._peek()
        if kind == "op" and value in ("!", "-"):
            self.pos += 1
            inner = self._unary()
            return f"(not {inner})" if value == "!" else f"(-{inner})"
        if kind == "op" and value == "(":
            self.pos += 1
            inner = self._level(0)
            if self._peek() != ("op", ")"):
                raise MetaError("missing )")
            self.pos += 1
            return inner
        if kind == "num":
            self.pos += 1
            return value
        if kind == "name":
            self.pos += 1
            self.names.append(value)
            return f"h[{value!r}]"
        raise MetaError("expression ends early" if kind == "end" else f"unexpected {value!r}")


def _div(a: float, b: float) -> float:
    return a / b if b else 0.0


def compile_meta(expr: str) -> tuple[Callable[[HitMap], Any], tuple[str, ...]]:
    """(function of the hit map, rule names used); raises MetaError."""
    comp = _MetaCompiler(expr)
    code = comp.compile()
    fn = eval(f"lambda h: {code}", {"__builtins__": {}, "_div": _div})
    return fn, tuple(dict.fromkeys(comp.names))


__all__ = ["HitMap", "MetaError", "compile_meta"]
