"""The segment rule language: rules select the right people; typos say where and what."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from newsletter.db import unit_of_work
from newsletter.db.models import Subscriber, SubscriberStatus
from newsletter.errors import AudienceError
from newsletter.segments import SegmentError, compile_rule, read_segments

ROOT = Path(__file__).resolve().parents[1]

PEOPLE = [
    # email, language, country, tags, attributes, joined
    ("ales", "be", "LT", ["press"], {"city": "Vilnius"}, datetime(2025, 6, 1, tzinfo=UTC)),
    ("bela", "be", "PL", [], {"city": "Warsaw"}, datetime(2026, 2, 1, tzinfo=UTC)),
    ("rita", "ru", "LT", ["press", "volunteer"], {}, datetime(2025, 12, 31, 23, tzinfo=UTC)),
    (
        "emma",
        "en",
        "GB",
        ["volunteer"],
        {"city": "Vilnius", "role": "lawyer"},
        datetime(2026, 1, 1, tzinfo=UTC),
    ),
]


@pytest.fixture
def people(factory: sessionmaker[Session]) -> sessionmaker[Session]:
    with unit_of_work(factory) as session:
        for name, lang, country, tags, attrs, joined in PEOPLE:
            session.add(
                Subscriber(
                    email=f"{name}@example.org",
                    name=name,
                    language=lang,
                    country=country,
                    tags=tags,
                    attributes=attrs,
                    status=SubscriberStatus.ACTIVE,
                    created_at=joined,
                )
            )
    return factory


def selected(factory: sessionmaker[Session], rule: str) -> set[str]:
    with unit_of_work(factory) as session:
        return set(session.scalars(select(Subscriber.name).where(compile_rule(rule))))


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        pytest.param('lang = "be"', {"ales", "bela"}, id="lang"),
        pytest.param('language = "RU"', {"rita"}, id="language-case"),
        pytest.param('lang in ("be", "ru")', {"ales", "bela", "rita"}, id="lang-in"),
        pytest.param('lang not in ("be", "ru")', {"emma"}, id="lang-not-in"),
        pytest.param('country = "LT"', {"ales", "rita"}, id="country"),
        pytest.param('country = "lt"', {"ales", "rita"}, id="country-lowercase"),
        pytest.param('country != "LT"', {"bela", "emma"}, id="country-not"),
        pytest.param("tag:press", {"ales", "rita"}, id="tag"),
        pytest.param("not tag:press", {"bela", "emma"}, id="not-tag"),
        pytest.param("tag:missing", set(), id="no-such-tag"),
        pytest.param('attr.city = "Vilnius"', {"ales", "emma"}, id="attribute"),
        pytest.param('attr.city != "Vilnius"', {"bela", "rita"}, id="attribute-not-incl-missing"),
        pytest.param('not attr.city = "Vilnius"', {"bela", "rita"}, id="not-attribute"),
        pytest.param('attr.role in ("lawyer", "judge")', {"emma"}, id="attribute-in"),
        pytest.param("subscribed_before = 2026-01-01", {"ales", "rita"}, id="before"),
        pytest.param("subscribed_after = 2026-01-01", {"bela"}, id="after"),
        pytest.param('lang = "be" and tag:press', {"ales"}, id="and"),
        pytest.param('lang = "en" or country = "PL"', {"bela", "emma"}, id="or"),
        pytest.param(
            'tag:press and lang = "be" or tag:volunteer and country = "GB"',
            {"ales", "emma"},
            id="and-binds-tighter",
        ),
        pytest.param('tag:press and (lang = "be" or country = "GB")', {"ales"}, id="parentheses"),
        pytest.param('NOT (lang = "be" OR lang = "ru")', {"emma"}, id="keywords-any-case"),
        pytest.param("not not tag:press", {"ales", "rita"}, id="double-not"),
        pytest.param("", {"ales", "bela", "rita", "emma"}, id="empty-is-everyone"),
        pytest.param('attr.name = "x\' OR 1=1 --"', set(), id="injection-is-a-value"),
    ],
)
def test_rule_selects_expected_people(
    people: sessionmaker[Session], rule: str, expected: set[str]
) -> None:
    """Each rule selects exactly the expected subscribers, on SQLite and PostgreSQL."""
    assert selected(people, rule) == expected


@pytest.mark.parametrize(
    ("rule", "column", "message"),
    [
        pytest.param('lnag = "be"', 1, "unknown field 'lnag'", id="unknown-field"),
        pytest.param("lang = ", 8, "expected a value", id="missing-value"),
        pytest.param('lang = "xx"', 8, "language must be one of en, be, ru", id="bad-language"),
        pytest.param('(lang = "be"', 13, "expected ')'", id="unclosed"),
        pytest.param('lang = "be")', 12, "expected 'and', 'or' or the end", id="stray-paren"),
        pytest.param('lang == "be"', 7, "expected a value", id="double-equals"),
        pytest.param('lang "be"', 6, "expected '=', '!=' or 'in'", id="missing-operator"),
        pytest.param('lang in "be"', 9, "expected '(' and a list", id="in-without-list"),
        pytest.param('lang in ("be" "ru")', 15, "expected ',' or ')'", id="missing-comma"),
        pytest.param('lang = "be" and', 16, "expected a field", id="dangling-and"),
        pytest.param('subscribed_before = "2026"', 21, "expected a date", id="date-as-text"),
        pytest.param("subscribed_before = 2026-02-30", 21, "not a real date", id="impossible-date"),
        pytest.param("subscribed_before != 2026-01-01", 1, "takes '= DATE'", id="date-operator"),
        pytest.param(
            "country = 2026-01-01", 11, 'expected a "text" value', id="date-as-text-value"
        ),
        pytest.param("lang = 'be'; DROP TABLE subscribers", 12, "unexpected ';'", id="sql-text"),
        pytest.param("tag:press or", 13, "expected a field", id="dangling-or"),
    ],
)
def test_malformed_rule_says_where_and_what(rule: str, column: int, message: str) -> None:
    """A malformed rule raises one line with its column and what was expected."""
    with pytest.raises(SegmentError) as info:
        compile_rule(rule)
    text = str(info.value)
    assert "\n" not in text
    assert f"column {column}:" in text, text
    assert message in text, text


def test_declared_segments_all_compile() -> None:
    """Every rule in subscribers/segments.toml is valid."""
    specs = read_segments(ROOT / "subscribers" / "segments.toml")
    assert {s.name for s in specs} >= {"belarusian-readers", "russian-readers"}


def test_a_bad_rule_in_the_file_names_the_segment(tmp_path: Path) -> None:
    """A typo in segments.toml stops the sync with the file, the segment and the column."""
    path = tmp_path / "segments.toml"
    path.write_text('[[segments]]\nname = "oops"\nrule = \'lang = "be" and\'\n')
    with pytest.raises(AudienceError) as info:
        read_segments(path)
    assert "segment 'oops'" in str(info.value) and "column 16" in str(info.value)


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        pytest.param("(" * 40 + "tag:a" + ")" * 40, "nested more than 32 deep", id="deep-parens"),
        pytest.param("(" * 5000 + "tag:a" + ")" * 5000, "longer than 4096", id="very-deep"),
        pytest.param("not " * 900 + "tag:a", "nested more than 32 deep", id="deep-not"),
        pytest.param(" or ".join(["tag:a"] * 300), "more than 200 terms", id="300-terms"),
        pytest.param(" or ".join(["tag:a"] * 5000), "longer than 4096", id="5000-terms"),
        pytest.param('attr.x = "' + "a" * 100_000 + '"', "longer than 4096", id="100k-chars"),
        pytest.param('attr.x = "' + "\\" * 4000, "unexpected", id="unclosed-escapes"),
    ],
)
def test_pathological_rule_is_refused_in_one_line(rule: str, message: str) -> None:
    """Deep nesting, thousands of terms or a huge rule: a quick one-line SegmentError."""
    started = time.monotonic()
    with pytest.raises(SegmentError) as info:
        compile_rule(rule)
    assert time.monotonic() - started < 5  # generous: it takes milliseconds
    text = str(info.value)
    assert "\n" not in text and message in text, text


def test_rules_at_the_limits_still_compile() -> None:
    """32 levels of parentheses and 200 terms are still fine."""
    compile_rule("(" * 32 + "tag:a" + ")" * 32)
    compile_rule(" or ".join(["tag:a"] * 200))
