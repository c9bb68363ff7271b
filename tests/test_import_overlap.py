"""The next chunk is read while a chunk's last statement runs (on PostgreSQL, its new
subscriptions go in psycopg's pipeline mode): a refusal of that statement still rejects only its
own row, the savepoint is released only after it, and rejects and progress still come in file
order (SQLite and PostgreSQL)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session, sessionmaker

from newsletter.db import unit_of_work
from newsletter.db.models import MailingList, Subscriber, Subscription
from newsletter.importer import import_rows
from newsletter.lists import read_lists, sync_lists
from newsletter.subscriber_csv import RawRow, RowResult, read_csv
from tests.conftest import SECRET

ROOT = Path(__file__).resolve().parents[1]
NOW = datetime(2026, 11, 23, tzinfo=UTC)
REFUSED = "refused@example.org"


@pytest.fixture
def lists(factory: sessionmaker[Session]) -> sessionmaker[Session]:
    with unit_of_work(factory) as session:
        sync_lists(session=session, specs=read_lists(ROOT / "subscribers" / "lists.toml"))
    return factory


def refuse_subscriptions_of(engine: Engine, email: str) -> None:
    """Make the database refuse any subscription of one person: the statement that adds new
    people's subscriptions fails after the people themselves went in."""
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            conn.execute(
                text(
                    "CREATE TRIGGER refuse_subscription BEFORE INSERT ON subscriptions WHEN"
                    " (SELECT email FROM subscribers WHERE id = NEW.subscriber_id) = :email"
                    " BEGIN SELECT RAISE(ABORT, 'refused'); END".replace(":email", f"'{email}'")
                )
            )
        else:
            conn.execute(
                text(
                    "CREATE FUNCTION refuse_subscription() RETURNS trigger LANGUAGE plpgsql AS $$"
                    " BEGIN IF (SELECT email FROM subscribers WHERE id = NEW.subscriber_id)"
                    f" = '{email}' THEN RAISE check_violation USING MESSAGE = 'refused'; END IF;"
                    " RETURN NEW; END $$"
                )
            )
            conn.execute(
                text(
                    "CREATE TRIGGER refuse_subscription BEFORE INSERT ON subscriptions"
                    " FOR EACH ROW EXECUTE FUNCTION refuse_subscription()"
                )
            )


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("email,name,lists\n" + "".join(line + "\n" for line in lines))
    return path


LINES = [
    "a@example.org,A,weekly-digest",  # line 2
    "bad@,B,weekly-digest",  # 3: rejected when read
    "c@example.org,C,urgent-actions;weekly-digest",  # 4
    f"{REFUSED},R,weekly-digest",  # 5: refused by the database (its subscription)
    "e@example.org,E,weekly-digest",  # 6
    "f@example.org,F,nosuchlist",  # 7: rejected when read
    "g@example.org,G,urgent-actions",  # 8
    "h@example.org,H,weekly-digest",  # 9
    "i@example.org,I,",  # 10: no list
]


def run(
    factory: sessionmaker[Session], path: Path, chunk_rows: int
) -> tuple[dict[str, int], list[tuple[str, int]]]:
    """Import; returns the counts and every reject and progress call, in the order made."""
    calls: list[tuple[str, int]] = []

    def on_reject(line: int, reason: str, raw: RawRow | None) -> None:
        calls.append(("reject", line))

    with unit_of_work(factory) as session:
        report = import_rows(
            session=session,
            rows=read_csv(path),
            default_list=None,
            confirmed=True,
            secret=SECRET,
            now=NOW,
            actor="test",
            on_reject=on_reject,
            on_progress=lambda line: calls.append(("progress", line)),
            chunk_rows=chunk_rows,
        )
    return report.counts(), calls


def stored(factory: sessionmaker[Session]) -> dict[str, set[str]]:
    """Everyone stored, with the lists of their subscriptions."""
    with unit_of_work(factory) as session:
        found: dict[str, set[str]] = {e: set() for e in session.scalars(select(Subscriber.email))}
        pairs = session.execute(
            select(Subscriber.email, MailingList.slug)
            .join(Subscription, Subscription.subscriber_id == Subscriber.id)
            .join(MailingList, MailingList.id == Subscription.list_id)
        )
        for email, slug in pairs:
            found[email].add(slug)
        return found


EXPECTED = {
    "a@example.org": {"weekly-digest"},
    "c@example.org": {"urgent-actions", "weekly-digest"},
    "e@example.org": {"weekly-digest"},
    "g@example.org": {"urgent-actions"},
    "h@example.org": {"weekly-digest"},
    "i@example.org": set(),
}


# As before reading ahead: rows rejected when read are reported as they are read, a row the
# database refuses when its chunk is written; so with one chunk for the whole file, line 5's
# refusal comes after line 7's reject, and with smaller chunks in file order.
@pytest.mark.parametrize(
    ("chunk_rows", "order"), [(1, [3, 5, 7]), (2, [3, 5, 7]), (3, [3, 5, 7]), (1000, [3, 7, 5])]
)
def test_a_refused_subscription_rejects_only_its_row_and_order_is_kept(
    lists: sessionmaker[Session], tmp_path: Path, chunk_rows: int, order: list[int]
) -> None:
    refuse_subscriptions_of(lists.kw["bind"], REFUSED)
    counts, calls = run(lists, write(tmp_path / "p.csv", LINES), chunk_rows)
    assert stored(lists) == EXPECTED  # the refused person is not stored without a subscription
    assert counts["imported"] == 6 and counts["rejected"] == 3
    assert [line for kind, line in calls if kind == "reject"] == order
    progress = [line for kind, line in calls if kind == "progress"]
    assert progress == sorted(progress) and progress[-1] == 10
    # Progress after a chunk comes after that chunk's rejects, before the next chunk's.
    if chunk_rows == 2:
        assert calls == [
            ("reject", 3),
            ("progress", 4),  # a, c
            ("reject", 5),  # R and e: R refused
            ("progress", 6),
            ("reject", 7),
            ("progress", 9),  # g, h
            ("progress", 10),  # i, the last chunk
        ]


def test_a_refused_subscription_keeps_the_import_one_transaction(
    lists: sessionmaker[Session], tmp_path: Path
) -> None:
    """After a refused chunk the import goes on in the same transaction, and a failure after
    it keeps nothing (the chunks' savepoints nest in the import's transaction)."""
    refuse_subscriptions_of(lists.kw["bind"], REFUSED)
    path = write(tmp_path / "p.csv", LINES)
    with pytest.raises(RuntimeError), unit_of_work(lists) as session:
        import_rows(
            session=session,
            rows=read_csv(path),
            default_list=None,
            confirmed=True,
            secret=SECRET,
            now=NOW,
            actor="test",
            chunk_rows=2,
        )
        raise RuntimeError("after the import")
    assert stored(lists) == {}
    counts, _ = run(lists, path, 2)
    assert counts["imported"] == 6
    again, _ = run(lists, path, 2)  # a re-import changes nothing
    assert again["imported"] == 0 and again["updated"] == 0 and again["unchanged"] == 6
    assert stored(lists) == EXPECTED


def test_an_error_while_reading_ahead_stops_the_import(
    lists: sessionmaker[Session], tmp_path: Path
) -> None:
    """An error raised by the rows while a chunk's last statement runs is raised, and nothing of
    the import is kept."""

    def rows() -> Iterator[RowResult]:
        yield from read_csv(write(tmp_path / "p.csv", LINES[:3]))
        raise OSError("the disk went away")

    with pytest.raises(OSError, match="went away"), unit_of_work(lists) as session:
        import_rows(
            session=session,
            rows=rows(),
            default_list=None,
            confirmed=True,
            secret=SECRET,
            now=NOW,
            actor="test",
            chunk_rows=1,
        )
    assert stored(lists) == {}
