"""CSV import and export, list sync, and campaign audiences with segments (SQLite, PostgreSQL)."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from newsletter.audience import (
    audience_size,
    count_selected,
    enqueue_audience,
    list_people,
    segment_where,
)
from newsletter.clock import FrozenClock
from newsletter.db import unit_of_work
from newsletter.db.models import (
    Campaign,
    CampaignKind,
    Delivery,
    Event,
    MailingList,
    Segment,
    Subscriber,
    Subscription,
    SubscriptionStatus,
)
from newsletter.errors import AudienceError
from newsletter.importer import import_rows
from newsletter.lists import get_list, read_lists, sync_lists
from newsletter.subscriber_csv import export_columns, export_rows, read_csv, write_csv
from newsletter.subscriptions import forget, subscribe, unsubscribe
from tests.conftest import SECRET
from tests.test_cli import run as run_cli

ROOT = Path(__file__).resolve().parents[1]
LISTS = ROOT / "subscribers" / "lists.toml"

# Windows line ends, a BOM, columns in an odd order, a custom column, and trouble:
MESSY = (
    "\ufeffCountry,EMAIL,lists,name,city,tags,language\r\n"
    "LT,Ales@Example.org,weekly-digest;urgent-actions,Алесь,Vilnius,press,be\r\n"  # 2 ok
    "PL,not-an-address,weekly-digest,Nobody,,,en\r\n"  # 3 bad address
    "GB,emma@example.org,weekly-digest,Emma,London,volunteer,en\r\n"  # 4 ok
    "GB,EMMA@example.org,urgent-actions,,,press,\r\n"  # 5 duplicate of 4: merged
    "LT,left@example.org,weekly-digest,Left,,,en\r\n"  # 6 unsubscribed earlier: kept out
    "LT,gone@example.org,weekly-digest,Gone,,,en\r\n"  # 7 forgotten earlier: kept out
    "XX1,x@example.org,weekly-digest,,,,en\r\n"  # 8 bad country
    "LT,y@example.org,no-such-list,,,,en\r\n"  # 9 unknown list
    "LT,z@example.org,weekly-digest,,,,fr\r\n"  # 10 bad language
    "LT,too@example.org,weekly-digest,,,,en,extra\r\n"  # 11 too many fields
    "LT,\r\n"  # 12 missing email
    '"RU","multi@example.org","weekly-digest","Two\r\nlines",,,"ru"\r\n'  # 13-14 ok, quoted
)
LATIN1_ROW = "LT,jose@example.org,weekly-digest,Jos\xe9,,,en\r\n".encode("latin-1")  # 15 not UTF-8


def messy_file(tmp_path: Path) -> Path:
    path = tmp_path / "people.csv"
    path.write_bytes(MESSY.encode("utf-8") + LATIN1_ROW)
    return path


@pytest.fixture
def lists(factory: sessionmaker[Session]) -> sessionmaker[Session]:
    with unit_of_work(factory) as session:
        sync_lists(session=session, specs=read_lists(LISTS))
    return factory


def run_import(
    factory: sessionmaker[Session], path: Path, *, chunk_rows: int = 1000, confirmed: bool = True
) -> tuple[dict[str, int], list[tuple[int, str]]]:
    with unit_of_work(factory) as session:
        report = import_rows(
            session=session,
            rows=read_csv(path),
            default_list=None,
            confirmed=confirmed,
            secret=SECRET,
            now=datetime(2026, 11, 23, tzinfo=UTC),
            actor="test",
            chunk_rows=chunk_rows,
        )
    return report.counts(), report.rejects


def join(
    session: Session,
    who: str,
    lists: list[MailingList],
    now: datetime,
    *,
    confirmed: bool = True,
    language: str = "",
) -> int:
    """who@example.org subscribed to these lists; their id."""
    return subscribe(
        session=session,
        email=f"{who}@example.org",
        lists=lists,
        secret=SECRET,
        now=now,
        actor="test",
        confirmed=confirmed,
        language=language,
    ).subscriber_id


def leave_and_forget(factory: sessionmaker[Session], clock: FrozenClock) -> None:
    """left@ unsubscribed from everything; gone@ was forgotten."""
    with unit_of_work(factory) as session:
        lists = [get_list(session, "weekly-digest")]
        for who in ("left", "gone"):
            join(session, who, lists, clock.now())
        left = session.scalar(select(Subscriber.id).where(Subscriber.email == "left@example.org"))
        assert left is not None
        unsubscribe(session=session, subscriber_id=left, list_id=None, now=clock.now(), actor="t")
        forget(session=session, email="gone@example.org", secret=SECRET, now=clock.now(), actor="t")


@pytest.mark.parametrize(
    "chunk_rows", [pytest.param(1000, id="one-chunk"), pytest.param(2, id="tiny-chunks")]
)
def test_messy_csv_counts_rejects_and_keeps_out(
    lists: sessionmaker[Session], clock: FrozenClock, tmp_path: Path, chunk_rows: int
) -> None:
    """Bad rows are rejected by line and reason, good ones imported, leavers kept out."""
    leave_and_forget(lists, clock)
    counts, rejects = run_import(lists, messy_file(tmp_path), chunk_rows=chunk_rows)
    assert dict(rejects) == {
        3: rejects[0][1],
        8: "country must be a two-letter code, not 'XX1'",
        9: "unknown list 'no-such-list'",
        10: "language must be one of en, be, ru, not 'fr'",
        11: "more fields than the header has",
        12: "missing email",
        15: "column 'name': not UTF-8 text (save the file as UTF-8)",
    }
    assert "invalid address" in rejects[0][1]
    assert counts["rejected"] == 7
    assert counts["kept_out"] == 2
    # ales, emma, multi are new; the duplicate emma row is merged (in one chunk) or an update.
    assert counts["imported"] == 3
    assert counts["duplicates"] + counts["updated"] == 1
    with unit_of_work(lists) as session:
        ales = session.scalar(select(Subscriber).where(Subscriber.email == "ales@example.org"))
        assert ales is not None
        assert (ales.name, ales.language, ales.country, ales.tags) == (
            "Алесь",
            "be",
            "LT",
            ["press"],
        )
        assert ales.attributes == {"city": "Vilnius"}
        emma = session.scalar(select(Subscriber).where(Subscriber.email == "emma@example.org"))
        assert emma is not None and emma.tags == ["press", "volunteer"]
        multi = session.scalar(select(Subscriber).where(Subscriber.email == "multi@example.org"))
        assert multi is not None and multi.name == "Two lines" and multi.language == "ru"
        left = session.scalar(select(Subscriber).where(Subscriber.email == "left@example.org"))
        assert left is not None and left.status == "unsubscribed"
        active = session.scalars(
            select(Subscription.status).where(Subscription.subscriber_id == left.id)
        ).all()
        assert set(active) == {SubscriptionStatus.UNSUBSCRIBED}
        assert (
            session.scalar(select(Subscriber.id).where(Subscriber.email == "gone@example.org"))
            is None
        )
        emma_lists = session.scalar(
            select(func.count()).where(
                Subscription.subscriber_id == emma.id, Subscription.status == "active"
            )
        )
        assert emma_lists == 2


def test_reimporting_the_same_file_changes_nothing(
    lists: sessionmaker[Session], clock: FrozenClock, tmp_path: Path
) -> None:
    """A second import of the same file imports and updates nobody."""
    leave_and_forget(lists, clock)
    path = messy_file(tmp_path)
    run_import(lists, path)
    with unit_of_work(lists) as session:
        before = session.scalar(select(func.count()).select_from(Subscription))
    counts, _ = run_import(lists, path)
    assert counts["imported"] == 0 and counts["updated"] == 0
    assert counts["kept_out"] == 2 and counts["unchanged"] == 3
    with unit_of_work(lists) as session:
        assert session.scalar(select(func.count()).select_from(Subscription)) == before


def test_import_never_resubscribes_a_list_someone_left(
    lists: sessionmaker[Session], clock: FrozenClock, tmp_path: Path
) -> None:
    """Someone still subscribed elsewhere who left one list is not put back on it."""
    path = tmp_path / "one.csv"
    path.write_text("email,lists\nann@example.org,weekly-digest;urgent-actions\n")
    run_import(lists, path)
    with unit_of_work(lists) as session:
        sid = session.scalar(select(Subscriber.id))
        digest = get_list(session, "weekly-digest").id
        assert sid is not None
        unsubscribe(session=session, subscriber_id=sid, list_id=digest, now=clock.now(), actor="t")
    counts, _ = run_import(lists, path)
    assert counts["unchanged"] == 1
    with unit_of_work(lists) as session:
        assert audience_size(session, digest) == 0


def test_import_without_confirmed_waits_for_double_opt_in(
    lists: sessionmaker[Session], tmp_path: Path
) -> None:
    """Rows for a double opt-in list without --confirmed are pending, not in any audience."""
    path = tmp_path / "new.csv"
    path.write_text("email,lists\nnew@example.org,weekly-digest\n")
    counts, _ = run_import(lists, path, confirmed=False)
    assert counts["awaiting_confirmation"] == 1
    with unit_of_work(lists) as session:
        assert audience_size(session, get_list(session, "weekly-digest").id) == 0
        assert session.scalar(select(Subscription.status)) == SubscriptionStatus.PENDING


def test_export_then_import_round_trips(
    lists: sessionmaker[Session], tmp_path: Path, clock: FrozenClock
) -> None:
    """Exported CSV, imported into an empty database, gives the same people, lists and data."""
    counts, _ = run_import(lists, messy_file(tmp_path))
    with unit_of_work(lists) as session:
        columns = export_columns(session)
        buffer = io.StringIO()
        n = write_csv(export_rows(session, chunk_rows=2), columns, buffer)
    assert n == counts["imported"]
    assert columns[:6] == ["email", "name", "language", "lists", "tags", "country"]
    assert "city" in columns
    exported = tmp_path / "export.csv"
    exported.write_text(buffer.getvalue(), encoding="utf-8")
    with unit_of_work(lists) as session:
        snapshot = _snapshot(session)
        session.execute(Subscription.__table__.delete())
        session.execute(Subscriber.__table__.delete())
    again, rejects = run_import(lists, exported)
    assert rejects == [] and again["imported"] == n
    with unit_of_work(lists) as session:
        assert _snapshot(session) == snapshot


def _snapshot(session: Session) -> dict[str, tuple[object, ...]]:
    people = {}
    for sub in session.scalars(select(Subscriber)):
        slugs = session.scalars(
            select(MailingList.slug)
            .join(Subscription, Subscription.list_id == MailingList.id)
            .where(Subscription.subscriber_id == sub.id, Subscription.status == "active")
            .order_by(MailingList.slug)
        ).all()
        people[sub.email] = (
            sub.name,
            sub.language,
            sub.country,
            sorted(sub.tags),
            sub.attributes,
            tuple(slugs),
        )
    return people


def test_import_is_recorded_as_an_event_without_addresses(
    lists: sessionmaker[Session], tmp_path: Path
) -> None:
    """The import leaves one event with its counts and no address in it."""
    run_import(lists, messy_file(tmp_path))
    with unit_of_work(lists) as session:
        [event] = session.scalars(select(Event).where(Event.action == "subscribers.import"))
    assert event.actor == "test" and event.detail["imported"] == 5  # left@ and gone@ are new here
    assert "@" not in str(event.detail)


def test_list_no_longer_declared_is_reported_not_deleted(
    lists: sessionmaker[Session], tmp_path: Path
) -> None:
    """Dropping a list from lists.toml reports it and keeps it with its subscriptions."""
    run_import(lists, messy_file(tmp_path))
    only_digest = tmp_path / "lists.toml"
    text = LISTS.read_text(encoding="utf-8")
    only_digest.write_text(
        text[: text.index("[[lists]]", text.index("[[lists]]") + 1)], encoding="utf-8"
    )
    with unit_of_work(lists) as session:
        report = sync_lists(session=session, specs=read_lists(only_digest))
        assert report.missing == ("urgent-actions",)
        alerts = get_list(session, "urgent-actions")
        assert session.scalar(select(func.count()).where(Subscription.list_id == alerts.id)) == 2


def test_campaign_with_segment_reaches_only_the_segment_once(
    lists: sessionmaker[Session], tmp_path: Path, clock: FrozenClock
) -> None:
    """A campaign to a list and segment queues each matching member once, even if enqueued twice."""
    run_import(lists, messy_file(tmp_path))
    with unit_of_work(lists) as session:
        segment = Segment(name="press", rule="tag:press")
        session.add(segment)
        session.flush()
        digest = get_list(session, "weekly-digest")
        campaign = Campaign(
            kind=CampaignKind.ALERT,
            list_id=digest.id,
            segment_id=segment.id,
            dedupe_key="test-segment",
            created_at=clock.now(),
        )
        session.add(campaign)
        session.flush()
        assert audience_size(session, digest.id, segment.id) == 2  # ales and emma
        assert audience_size(session, digest.id) == 5
        assert enqueue_audience(session, campaign=campaign, now=clock.now()) == 2
        assert enqueue_audience(session, campaign=campaign, now=clock.now()) == 0


# --- one definition of who a list and a segment select -------------------------------------


def seat_audience(factory: sessionmaker[Session], clock: FrozenClock) -> None:
    """Belarusian speakers in every state a campaign must or must not reach, plus one English."""
    with unit_of_work(factory) as session:
        digest, alerts = get_list(session, "weekly-digest"), get_list(session, "urgent-actions")

        def add(who: str, lists: list[MailingList], *, lang: str = "be", ok: bool = True) -> int:
            return join(session, who, lists, clock.now(), confirmed=ok, language=lang)

        add("digest", [digest])  # reached by a digest campaign
        add("alerts", [alerts])  # reached by an alerts campaign
        add("nolist", [])  # on no list at all: no campaign reaches them
        add("pending", [digest], ok=False)  # has not confirmed yet
        left = add("left", [digest])  # left the one list they were on; still 'active' overall
        unsubscribe(
            session=session, subscriber_id=left, list_id=digest.id, now=clock.now(), actor="t"
        )
        add("gone", [digest])
        forget(session=session, email="gone@example.org", secret=SECRET, now=clock.now(), actor="t")
        add("english", [digest, alerts], lang="en")  # on both lists, outside the segment
        session.add(Segment(name="belarusian", rule='lang = "be"'))


def enqueued(factory: sessionmaker[Session], clock: FrozenClock, slug: str) -> set[str]:
    """Whom a campaign to this list with the segment actually queues."""
    with unit_of_work(factory) as session:
        ml = get_list(session, slug)
        segment = session.scalar(select(Segment).where(Segment.name == "belarusian"))
        assert segment is not None
        campaign = Campaign(
            kind=CampaignKind.ALERT,
            list_id=ml.id,
            segment_id=segment.id,
            dedupe_key=f"count-{slug}",
            created_at=clock.now(),
        )
        session.add(campaign)
        session.flush()
        enqueue_audience(session, campaign=campaign, now=clock.now())
        stmt = (
            select(Subscriber.email)
            .join(Delivery, Delivery.subscriber_id == Subscriber.id)
            .where(Delivery.campaign_id == campaign.id)
        )
        return set(session.scalars(stmt))


def cli(tmp_path: Path, database_url: str, *args: str) -> object:
    """`newsletter ARGS --json` in a fresh process on this database; the parsed JSON."""
    (tmp_path / "config.toml").write_text(f"[database]\nurl = '{database_url}'\n")
    out = run_cli([*args, "--json"], tmp_path, {"NEWSLETTER_SECRET": SECRET}).stdout
    return json.loads(out)


def test_segments_count_is_what_enqueue_queues(
    lists: sessionmaker[Session], clock: FrozenClock, tmp_path: Path, database_url: str
) -> None:
    """`segments count NAME` counts whom a campaign on some list reaches; --list, that list's.

    Without --list it used to count everyone active who matched, also people on no list or who
    left the only list they were on: figures no campaign could reach.
    """
    seat_audience(lists, clock)
    count = ("segments", "count", "belarusian")
    anywhere = cli(tmp_path, database_url, *count)
    on_digest = cli(tmp_path, database_url, *count, "--list", "weekly-digest")
    digest = enqueued(lists, clock, "weekly-digest")
    alerts = enqueued(lists, clock, "urgent-actions")
    assert digest == {"digest@example.org"} and alerts == {"alerts@example.org"}
    assert anywhere == {"count": len(digest | alerts)}
    assert on_digest == {"count": len(digest)}


def test_segments_show_and_subscribers_list_select_the_same_people(
    lists: sessionmaker[Session], clock: FrozenClock, tmp_path: Path, database_url: str
) -> None:
    """`segments show`, `subscribers list --segment` and enqueue agree on who is selected."""
    seat_audience(lists, clock)
    shown = cli(tmp_path, database_url, "segments", "show", "belarusian")
    listing = ("subscribers", "list", "--segment", "belarusian")
    listed = cli(tmp_path, database_url, *listing)
    on_digest = cli(tmp_path, database_url, *listing, "--list", "weekly-digest")
    reached = enqueued(lists, clock, "weekly-digest") | enqueued(lists, clock, "urgent-actions")
    assert isinstance(shown, list) and isinstance(listed, list) and isinstance(on_digest, list)
    assert {p["email"] for p in shown} == {p["email"] for p in listed} == reached
    assert [p["email"] for p in on_digest] == ["digest@example.org"]


def test_audience_selection_by_step(lists: sessionmaker[Session], clock: FrozenClock) -> None:
    """The steps behind the commands: any list, one list, and everyone of a status."""
    seat_audience(lists, clock)
    with unit_of_work(lists) as session:
        where = segment_where(session, name="belarusian", rule=None)
        assert count_selected(session, where=where, list_slug=None) == 2
        assert count_selected(session, where=where, list_slug="urgent-actions") == 1
        everyone = list_people(session, list_slug=None, segment=None, status=None, limit=50)
        assert len(everyone) == 7  # every row, the forgotten one's tombstone too
        left = list_people(session, list_slug=None, segment=None, status="forgotten", limit=50)
        assert [p.status for p in left] == ["forgotten"]
        on_digest = list_people(
            session, list_slug="weekly-digest", segment=None, status="active", limit=50
        )
        assert {p.email for p in on_digest} == {"digest@example.org", "english@example.org"}
        with pytest.raises(AudienceError, match="active people only"):
            list_people(session, list_slug="weekly-digest", segment=None, status="bounced", limit=5)
