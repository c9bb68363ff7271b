"""The segment rule language, compiled to SQLAlchemy expressions (never to SQL text).

A rule narrows a list's audience. The grammar, loosest binding first::

    rule       := or
    or         := and ("or" and)*
    and        := not ("and" not)*
    not        := "not" not | atom
    atom       := "(" or ")" | TAG | comparison
    comparison := FIELD ("=" | "!=") value | FIELD ["not"] "in" "(" value ("," value)* ")"
    FIELD      := lang | country | subscribed_before | subscribed_after | attr.NAME
    TAG        := tag:NAME
    value      := "text" | 'text' | YYYY-MM-DD

For example ``lang in ("be", "ru") and not tag:press``, ``attr.city = "Vilnius"`` or
``country = "LT" or subscribed_before = 2026-01-01``. Keywords are case-insensitive, and so is
the NAME of attr.NAME, as import stores a column's name. Every value
reaches the database as a bound parameter; a typo stops with one line naming the column.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import ColumnElement, and_, exists, false, func, not_, or_, select, true
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import InstrumentedAttribute, Session
from sqlalchemy.sql.functions import GenericFunction
from sqlalchemy.types import String

from newsletter.config import LANGUAGES
from newsletter.db.models import Segment, Subscriber
from newsletter.errors import AudienceError
from newsletter.sanitize import control_character
from newsletter.subscriber_csv import column_name

FIELDS = ("lang", "country", "subscribed_before", "subscribed_after", "attr.NAME", "tag:NAME")
# Limits that keep a rule quick to parse and compile, and well within Python's recursion limit.
MAX_RULE_CHARS = 4096
MAX_TERMS = 200  # comparisons and tags
MAX_DEPTH = 32  # parentheses and 'not', nested
_NAME = r"[A-Za-z0-9_][A-Za-z0-9_\-]*"
# Linear: it is matched at one position at a time (match, not search), each alternative starts
# with a different character, and no quantifier nests another except in strings, where the two
# inner alternatives start differently ([^"\\] or \\), so each character is read once; an
# unclosed string is scanned to the end once, and then the rule is refused.
_TOKEN = re.compile(
    rf"""(?P<space>\s+)
    |(?P<lparen>\()|(?P<rparen>\))|(?P<comma>,)
    |(?P<op>!=|=)
    |(?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
    |(?P<date>\d{{4}}-\d{{2}}-\d{{2}}(?![\w-]))
    |(?P<word>(?:tag:|attr\.)?{_NAME})
    """,
    re.VERBOSE,
)
_KEYWORDS = ("and", "or", "not", "in")


class SegmentError(AudienceError):
    """A segment rule that does not parse or names something unknown."""

    def __init__(self, rule: str, position: int, message: str) -> None:
        self.position = position
        super().__init__(f"segment rule, column {position + 1}: {message}")


@dataclass(frozen=True)
class _Tok:
    kind: str  # lparen rparen comma op string date word keyword end
    text: str
    pos: int


@dataclass(frozen=True)
class SegmentSpec:
    name: str
    rule: str


def _describe(tok: _Tok) -> str:
    return "the end of the rule" if tok.kind == "end" else repr(tok.text)


def tokenize(rule: str) -> list[_Tok]:
    """Split a rule into tokens; an unknown character stops with its column."""
    tokens, pos = [], 0
    while pos < len(rule):
        match = _TOKEN.match(rule, pos)
        if match is None:
            raise SegmentError(rule, pos, f"unexpected {rule[pos]!r}")
        kind = match.lastgroup or ""
        text = match.group()
        if kind == "word" and text.lower() in _KEYWORDS:
            kind, text = "keyword", text.lower()
        if kind != "space":
            tokens.append(_Tok(kind, text, pos))
        pos = match.end()
    tokens.append(_Tok("end", "", len(rule)))
    return tokens


class _Parser:
    """Recursive descent over the tokens, building the expression as it goes."""

    def __init__(self, rule: str) -> None:
        if len(rule) > MAX_RULE_CHARS:
            raise SegmentError(rule, MAX_RULE_CHARS, f"longer than {MAX_RULE_CHARS} characters")
        self.rule = rule
        self.tokens = tokenize(rule)
        self.i = 0
        self.depth = 0
        self.terms = 0
        self.attributes: set[str] = set()  # the custom attribute keys named, as stored

    @property
    def tok(self) -> _Tok:
        return self.tokens[self.i]

    def fail(self, expected: str, tok: _Tok | None = None) -> SegmentError:
        tok = tok or self.tok
        return SegmentError(self.rule, tok.pos, f"expected {expected}, found {_describe(tok)}")

    def take(self, kind: str, text: str | None = None) -> _Tok | None:
        tok = self.tok
        if tok.kind == kind and (text is None or tok.text == text):
            self.i += 1
            return tok
        return None

    def parse(self) -> ColumnElement[bool]:
        expr = self.or_()
        if self.tok.kind != "end":
            raise self.fail("'and', 'or' or the end of the rule")
        return expr

    def or_(self) -> ColumnElement[bool]:
        parts = [self.and_()]
        while self.take("keyword", "or"):
            parts.append(self.and_())
        return parts[0] if len(parts) == 1 else or_(*parts)

    def and_(self) -> ColumnElement[bool]:
        parts = [self.not_()]
        while self.take("keyword", "and"):
            parts.append(self.not_())
        return parts[0] if len(parts) == 1 else and_(*parts)

    def not_(self) -> ColumnElement[bool]:
        if tok := self.take("keyword", "not"):
            self.enter(tok)
            expr = not_(self.not_())
            self.depth -= 1
            return expr
        return self.atom()

    def enter(self, tok: _Tok) -> None:
        """Go one level deeper (a parenthesis or a 'not'), within MAX_DEPTH."""
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise SegmentError(self.rule, tok.pos, f"nested more than {MAX_DEPTH} deep")

    def atom(self) -> ColumnElement[bool]:
        if tok := self.take("lparen"):
            self.enter(tok)
            expr = self.or_()
            if not self.take("rparen"):
                raise self.fail("')'")
            self.depth -= 1
            return expr
        tok = self.take("word")
        if tok is None:
            raise self.fail("a field (lang, country, attr.NAME …), tag:NAME, 'not' or '('")
        self.terms += 1
        if self.terms > MAX_TERMS:
            raise SegmentError(self.rule, tok.pos, f"more than {MAX_TERMS} terms")
        if tok.text.startswith("tag:"):
            return has_tag(tok.text.removeprefix("tag:"))
        return self.comparison(tok)

    def comparison(self, field: _Tok) -> ColumnElement[bool]:
        if _field_kind(field.text) is None:
            raise SegmentError(
                self.rule, field.pos, f"unknown field {field.text!r} (fields: {', '.join(FIELDS)})"
            )
        if field.text.startswith("attr."):
            self.attributes.add(attribute_key(field.text))
        if op := self.take("op"):
            value = self.value()
            return _compare(self.rule, field, op.text, [value])
        negate = self.take("keyword", "not") is not None
        if not self.take("keyword", "in"):
            raise self.fail("'in'" if negate else "'=', '!=' or 'in'")
        values = self.value_list()
        expr = _compare(self.rule, field, "in", values)
        return not_(expr) if negate else expr

    def value(self) -> _Tok:
        tok = self.take("string") or self.take("date")
        if tok is None:
            raise self.fail('a value ("text" or a date like 2026-01-01)')
        return tok

    def value_list(self) -> list[_Tok]:
        if not self.take("lparen"):
            raise self.fail("'(' and a list of values")
        values = [self.value()]
        while self.take("comma"):
            values.append(self.value())
        if not self.take("rparen"):
            raise self.fail("',' or ')'")
        return values


def _field_kind(name: str) -> str | None:
    if name in ("lang", "language", "country"):
        return "text"
    if name in ("subscribed_before", "subscribed_after"):
        return "date"
    if name.startswith("attr.") and len(name) > len("attr."):
        return "text"
    return None


def _text(rule: str, tok: _Tok) -> str:
    if tok.kind != "string":
        raise SegmentError(rule, tok.pos, f'expected a "text" value, found {tok.text!r}')
    # Linear: a fixed backslash, then one character; each match is consumed, never retried.
    return re.sub(r"\\(.)", r"\1", tok.text[1:-1])


def _day(rule: str, tok: _Tok) -> datetime:
    if tok.kind != "date":
        raise SegmentError(rule, tok.pos, f"expected a date like 2026-01-01, found {tok.text!r}")
    try:
        day = date.fromisoformat(tok.text)
    except ValueError:
        raise SegmentError(rule, tok.pos, f"{tok.text!r} is not a real date") from None
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def _compare(rule: str, field: _Tok, op: str, values: list[_Tok]) -> ColumnElement[bool]:
    """One comparison, with values checked against the field they are compared with."""
    name = field.text
    if _field_kind(name) == "date":
        if op != "=":
            raise SegmentError(rule, field.pos, f"{name} takes '= DATE'")
        day = _day(rule, values[0])
        if name == "subscribed_before":
            return Subscriber.created_at < day
        if day.date() == date.max:  # no day after it to count from
            return false()
        return Subscriber.created_at >= day + timedelta(days=1)
    texts = [_text(rule, v) for v in values]
    column: ColumnElement[str] | InstrumentedAttribute[str]
    if name in ("lang", "language"):
        texts = [t.lower() for t in texts]
        for tok, t in zip(values, texts, strict=True):
            if t not in LANGUAGES:
                raise SegmentError(rule, tok.pos, f"language must be one of {', '.join(LANGUAGES)}")
        column = Subscriber.language
    elif name == "country":
        texts = [t.upper() for t in texts]
        column = Subscriber.country
    else:
        # Missing attributes compare as "", so `not attr.x = "a"` includes people without x.
        key = attribute_key(name)
        column = func.coalesce(Subscriber.attributes[key].as_string(), "")
    if op == "=":
        return column == texts[0]
    if op == "!=":
        return column != texts[0]
    return column.in_(texts)


class JsonValues(GenericFunction[str]):
    """The elements of a JSON array of strings, as rows (json_each / json_array_elements_text)."""

    name = "json_values"
    type = String()
    inherit_cache = True


@compiles(JsonValues, "sqlite")
def _json_values_sqlite(element: JsonValues, compiler: Any, **kw: Any) -> str:
    return f"json_each({compiler.process(element.clauses, **kw)})"


@compiles(JsonValues, "postgresql")
def _json_values_postgresql(element: JsonValues, compiler: Any, **kw: Any) -> str:
    return f"json_array_elements_text({compiler.process(element.clauses, **kw)})"


def has_tag(tag: str) -> ColumnElement[bool]:
    """Subscribers whose tags include this one (a correlated EXISTS over the JSON array)."""
    values = JsonValues(Subscriber.tags).table_valued("value")
    return exists(select(1).select_from(values).where(values.c.value == tag))


def attribute_key(field: str) -> str:
    """The stored key an attr.NAME field names: `attr.City` is the column a file calls City."""
    return column_name(field.removeprefix("attr."))


def rule_attributes(rule: str) -> set[str]:
    """The custom attribute keys a rule names, as stored; a bad rule raises SegmentError."""
    if not rule.strip():
        return set()
    parser = _Parser(rule)
    parser.parse()
    return parser.attributes


def compile_rule(rule: str) -> ColumnElement[bool]:
    """Compile a rule to a WHERE expression over Subscriber; a bad rule raises SegmentError."""
    if not rule.strip():
        return true()
    return _Parser(rule).parse()


def read_segments(path: Path) -> list[SegmentSpec]:
    """Read segments.toml and check every rule, naming the segment whose rule is wrong."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise AudienceError(f"{path}: cannot read segment declarations: {e}") from None
    declared = data.get("segments", [])
    if not isinstance(declared, list) or not all(isinstance(raw, dict) for raw in declared):
        raise AudienceError(f"{path}: 'segments' must be tables: [[segments]] with name, rule")
    specs: list[SegmentSpec] = []
    for i, raw in enumerate(declared):
        name, rule = raw.get("name"), raw.get("rule")
        if not isinstance(name, str) or not name or not isinstance(rule, str):
            raise AudienceError(f"{path}: segments[{i}]: 'name' and 'rule' are required")
        # Stored and looked up as text (PostgreSQL refuses a NUL); a long rule may span lines.
        if char := control_character(name) or control_character(rule, allowed="\t\n\r"):
            raise AudienceError(f"{path}: segments[{i}]: a control character ({char})")
        try:
            compile_rule(rule)
        except SegmentError as e:
            raise AudienceError(f"{path}: segment '{name}': {e}") from None
        specs.append(SegmentSpec(name=name, rule=rule))
    return specs


def sync_segments(*, session: Session, specs: list[SegmentSpec]) -> tuple[int, int, list[str]]:
    """Make the segments table match the declarations; returns (created, updated, undeclared)."""
    existing = {s.name: s for s in session.scalars(select(Segment))}
    created = updated = 0
    for spec in specs:
        row = existing.get(spec.name)
        if row is None:
            session.add(Segment(name=spec.name, rule=spec.rule))
            created += 1
        elif row.rule != spec.rule:
            row.rule = spec.rule
            updated += 1
    session.flush()
    # Undeclared segments stay: a campaign may still point at one.
    return created, updated, sorted(set(existing) - {s.name for s in specs})


def get_segment(session: Session, name: str) -> Segment:
    """Find a segment by name or say which exist."""
    segment = session.scalar(select(Segment).where(Segment.name == name))
    if segment is None:
        known = ", ".join(session.scalars(select(Segment.name).order_by(Segment.name))) or "none"
        raise AudienceError(f"no segment '{name}' (segments: {known})")
    return segment


def segment_filter(session: Session, segment_id: int | None) -> ColumnElement[bool]:
    """The WHERE expression of a stored segment (everyone when there is none)."""
    if segment_id is None:
        return true()
    segment = session.get(Segment, segment_id)
    return compile_rule(segment.rule) if segment is not None else false()
