"""The import's fast paths give what the slow ones gave: plain addresses skip email-validator's
full check with the same answer, and the bulk statements (JSON rows on PostgreSQL, Core
executemany on SQLite) fill in, subscribe and keep out as before (SQLite, PostgreSQL)."""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from newsletter.addresses import address_forms
from newsletter.db import unit_of_work
from newsletter.db.models import Subscriber, Subscription
from newsletter.errors import AudienceError
from newsletter.importer import import_rows
from newsletter.lists import read_lists, sync_lists
from newsletter.subscriber_csv import _address_forms, read_csv
from newsletter.suppression import suppress
from tests.conftest import SECRET
from tests.test_csv_hostile import _candidates

ROOT = Path(__file__).resolve().parents[1]
NOW = datetime(2026, 11, 23, tzinfo=UTC)


def _answer(forms: Callable[[str], tuple[str, ...]], raw: str) -> tuple[str, ...] | str:
    try:
        return forms(raw)
    except AudienceError as e:
        return f"error: {e}"


TAILS = ["", ".org", "@example.org", "@Example.Org", "@xn--bcher-kva.example", "@ex.test", "@b"]
EDGES = [
    "Ann.Lee+news@Example.ORG",
    " padded@example.org ",
    "a..b@example.org",
    ".a@example.org",
    "a.@example.org",
    "a@example..org",
    "a@.example.org",
    "a@example.org.",
    "a@-example.org",
    "a@example-.org",
    "a@ex--ample.org",
    "a@xn--bcher-kva.example",
    "a@XN--BCHER-KVA.example",
    "a@xn--abc.example",
    "a@example",
    "a@localhost",
    "a@site.test",
    "a@site.invalid",
    "a@site.local",
    "a@123.456",
    "a@example.123",
    "a@@example.org",
    "a@b@example.org",
    "@example.org",
    "a@",
    "",
    "a@" + "x" * 63 + ".org",
    "a@" + "x" * 64 + ".org",
    "x" * 64 + "@example.org",
    "x" * 65 + "@example.org",
    "x" * 242 + "@example.org",  # 254 characters
    "x" * 243 + "@example.org",  # 255
    "a@" + ".".join(["x" * 60] * 4) + ".org",
    "postmaster@example.org",
    "POSTMASTER@example.org",
    "a@\u212aelvin.org",  # KELVIN SIGN lowercases to ASCII k
    "a@exam\u0130ple.org",
]


def test_plain_address_shortcut_gives_what_address_forms_gives() -> None:
    """The same forms, or the same error, for hostile, odd and random addresses."""
    rng = random.Random(7)
    alphabet = "aZ09.-_+@x"
    fuzz = [
        "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 14))) + rng.choice(TAILS)
        for _ in range(3000)
    ]
    for raw in [*_candidates(), *EDGES, *fuzz]:
        assert _answer(_address_forms, raw) == _answer(address_forms, raw), repr(raw)


@pytest.fixture
def lists(factory: sessionmaker[Session]) -> sessionmaker[Session]:
    with unit_of_work(factory) as session:
        sync_lists(session=session, specs=read_lists(ROOT / "subscribers" / "lists.toml"))
    return factory


def run(
    factory: sessionmaker[Session], path: Path, *, confirmed: bool = True, chunk_rows: int = 1000
) -> dict[str, int]:
    with unit_of_work(factory) as session:
        report = import_rows(
            session=session,
            rows=read_csv(path),
            default_list=None,
            confirmed=confirmed,
            secret=SECRET,
            now=NOW,
            actor="test",
            chunk_rows=chunk_rows,
        )
    assert report.rejects == []
    return report.counts()


def people(factory: sessionmaker[Session]) -> dict[str, tuple[object, ...]]:
    with unit_of_work(factory) as session:
        return {
            s.email: (
                s.name,
                s.language,
                s.country,
                s.tags,
                s.attributes,
                s.status,
                s.discreet,
                s.on_key_problem,
                s.created_at,
            )
            for s in session.scalars(select(Subscriber))
        }


def memberships(factory: sessionmaker[Session]) -> dict[tuple[str, str], tuple[object, ...]]:
    with unit_of_work(factory) as session:
        rows = session.execute(
            select(Subscriber.email, Subscription.list_id, Subscription.status)
            .join(Subscription, Subscription.subscriber_id == Subscriber.id)
            .add_columns(Subscription.created_at, Subscription.confirmed_at)
        )
        return {(e, str(lid)): (st, c, cf) for e, lid, st, c, cf in rows}


def test_a_known_person_gets_only_what_the_file_adds(
    lists: sessionmaker[Session], tmp_path: Path
) -> None:
    """Blanks filled, tags and attributes added, choices only raised; the rest stays theirs."""
    first = tmp_path / "first.csv"
    first.write_text(
        "email,name,language,lists,tags,country,city\n"
        "ann@example.org,Ann,be,weekly-digest,press,,Vilnius\n"
        "bob@example.org,Bob,,weekly-digest,,PL,\n"
    )
    counts = run(lists, first, chunk_rows=1)
    assert counts["imported"] == 2
    second = tmp_path / "second.csv"
    second.write_text(
        "email,name,language,lists,tags,country,city,zip,discreet\n"
        "ANN@example.org,Other,ru,weekly-digest;urgent-actions,volunteer;press,lt,Riga,01100,"
        "envelope\n"
        "bob@example.org,Robert,,weekly-digest,,DE,,,\n"
    )
    counts = run(lists, second)
    assert (counts["updated"], counts["unchanged"], counts["imported"]) == (1, 1, 0)
    stored = people(lists)
    assert stored["ann@example.org"][:8] == (
        "Ann",
        "be",
        "LT",
        ["press", "volunteer"],
        {"city": "Vilnius", "zip": "01100"},
        "active",
        "envelope",
        "withhold",
    )
    assert stored["bob@example.org"][:3] == ("Bob", "en", "PL")
    assert len(memberships(lists)) == 3
    before = (people(lists), memberships(lists))
    again = run(lists, second, chunk_rows=1)
    assert again["unchanged"] == 2 and again["updated"] == 0
    assert (people(lists), memberships(lists)) == before


def test_subscriptions_are_added_once_pending_or_confirmed(
    lists: sessionmaker[Session], tmp_path: Path
) -> None:
    """Without --confirmed a double opt-in list waits (no confirmed_at); nothing is doubled."""
    path = tmp_path / "p.csv"
    path.write_text(
        "email,lists\n"
        "cat@example.org,weekly-digest\n"
        "cat@example.org,urgent-actions\n"  # a repeated row: merged, lists add up
        "dan@example.org,weekly-digest\n"
    )
    counts = run(lists, path, confirmed=False)
    assert counts["imported"] == 2 and counts["duplicates"] == 1
    assert counts["awaiting_confirmation"] == 3
    held = memberships(lists)
    assert {status for status, _, _ in held.values()} == {"pending"}
    assert all(created == NOW and confirmed is None for _, created, confirmed in held.values())
    more = tmp_path / "more.csv"
    more.write_text("email,lists\ndan@example.org,urgent-actions;weekly-digest\n")
    counts = run(lists, more, confirmed=True)
    assert counts["updated"] == 1 and counts["awaiting_confirmation"] == 0
    now_held = memberships(lists)
    assert len(now_held) == 4
    added = set(now_held) - set(held)
    [key] = added
    assert now_held[key] == ("active", NOW, NOW)
    assert all(now_held[k] == held[k] for k in held)  # the pending one stays pending


def test_suppressed_and_kept_out_people_stay_out(
    lists: sessionmaker[Session], tmp_path: Path
) -> None:
    """A suppressed address is not inserted; a re-import of it changes nothing either."""
    with unit_of_work(lists) as session:
        suppress(session, "eve@example.org", secret=SECRET, reason="bounce", now=NOW)
    path = tmp_path / "p.csv"
    path.write_text("email,lists\nEve@Example.org,weekly-digest\nfay@example.org,weekly-digest\n")
    counts = run(lists, path, chunk_rows=1)
    assert counts["kept_out"] == 1 and counts["imported"] == 1
    assert set(people(lists)) == {"fay@example.org"}
    assert run(lists, path)["kept_out"] == 1


def test_text_beyond_ascii_is_stored_as_given(lists: sessionmaker[Session], tmp_path: Path) -> None:
    """Names, tags and attributes outside ASCII (and beyond the BMP) survive the bulk writes."""
    path = tmp_path / "p.csv"
    path.write_text(
        "email,name,lists,tags,горад\n"
        'gus@example.org,"Zoë ""Ł"" 😀 \\",weekly-digest,прэса;x\\y,Мінск\n',
        encoding="utf-8",
    )
    assert run(lists, path)["imported"] == 1
    stored = people(lists)["gus@example.org"]
    assert stored[0] == 'Zoë "Ł" 😀 \\'
    assert stored[3] == ["x\\y", "прэса"] and stored[4] == {"горад": "Мінск"}
