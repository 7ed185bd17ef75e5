"""Label selectors in Calico's syntax, parsed once and evaluated against node labels.

Grammar (a subset of Calico's, enough for node and peer selection)::

    expr   := term ('||' term)*
    term   := factor ('&&' factor)*
    factor := '!' factor | '(' expr ')' | 'all()' | 'has(' KEY ')'
            | KEY ('==' | '!=') VALUE | KEY ('in' | 'not in') '{' VALUE (',' VALUE)* '}'
    VALUE  := quoted string ('...' or "...")

The empty selector selects everything, as ``all()`` does.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache

from ipam.errors import ValidationError

Labels = Mapping[str, str]
Predicate = Callable[[Labels], bool]

_TOKEN = re.compile(
    r"""\s*(?:(?P<op>&&|\|\||==|!=|!|\(|\)|\{|\}|,)
          |(?P<str>'[^']*'|"[^"]*")
          |(?P<word>[A-Za-z0-9_./\-]+(?:\(\))?))""",
    re.VERBOSE,
)


def _tokenize(text: str, field: str) -> list[str]:
    tokens: list[str] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise ValidationError(field, f"cannot parse selector at {text[pos:]!r}")
        tokens.append(m.group(m.lastgroup or "op"))
        pos = m.end()
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return tokens


@dataclass(frozen=True, slots=True)
class Selector:
    """A parsed selector; ``matches(labels)`` evaluates it."""

    text: str
    _pred: Predicate

    def matches(self, labels: Labels) -> bool:
        return self._pred(labels)

    def __str__(self) -> str:
        return self.text


@lru_cache(maxsize=1024)  # pools are matched on every allocation: parse each text once
def parse(text: str | None, field: str = "selector") -> Selector:
    """Parse ``text``; raises ValidationError naming ``field`` when it is malformed."""
    if text is None or not text.strip():
        return Selector("all()", lambda _labels: True)
    parser = _Parser(_tokenize(text, field), field)
    pred = parser.expr()
    if parser.pos != len(parser.tokens):
        raise ValidationError(field, f"unexpected {parser.tokens[parser.pos]!r} in selector")
    return Selector(text.strip(), pred)


class _Parser:
    def __init__(self, tokens: list[str], field: str) -> None:
        self.tokens = tokens
        self.pos = 0
        self.field = field

    def _peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _take(self, want: str | None = None) -> str:
        tok = self._peek()
        if tok is None or (want is not None and tok != want):
            raise ValidationError(self.field, f"expected {want or 'more input'} in selector")
        self.pos += 1
        return tok

    def expr(self) -> Predicate:
        parts = [self.term()]
        while self._peek() == "||":
            self._take()
            parts.append(self.term())
        if len(parts) == 1:
            return parts[0]
        return lambda labels: any(p(labels) for p in parts)

    def term(self) -> Predicate:
        parts = [self.factor()]
        while self._peek() == "&&":
            self._take()
            parts.append(self.factor())
        if len(parts) == 1:
            return parts[0]
        return lambda labels: all(p(labels) for p in parts)

    def factor(self) -> Predicate:
        tok = self._take()
        if tok == "!":
            inner = self.factor()
            return lambda labels: not inner(labels)
        if tok == "(":
            inner = self.expr()
            self._take(")")
            return inner
        if tok == "all()":
            return lambda _labels: True
        if tok == "has":
            self._take("(")
            key = self._take()
            self._take(")")
            return lambda labels: key in labels
        key = tok
        op = self._take()
        if op in ("==", "!="):
            value = self._value()
            if op == "==":
                return lambda labels: labels.get(key) == value
            return lambda labels: labels.get(key) != value
        if op == "in" or (op == "not" and self._take("in")):
            self._take("{")
            values = {self._value()}
            while self._peek() == ",":
                self._take()
                values.add(self._value())
            self._take("}")
            if op == "in":
                return lambda labels: labels.get(key) in values
            return lambda labels: labels.get(key) not in values
        raise ValidationError(self.field, f"unknown operator {op!r} in selector")

    def _value(self) -> str:
        tok = self._take()
        if len(tok) >= 2 and tok[0] == tok[-1] and tok[0] in "'\"":
            return tok[1:-1]
        raise ValidationError(self.field, f"expected a quoted value, got {tok!r}")
