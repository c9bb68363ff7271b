"""The scheduler: one digest per weekly slot, missed runs caught up once, one holder at a time."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from newsletter.alerts import approve_alert
from newsletter.clock import FrozenClock
from newsletter.config import FeedSource, Settings
from newsletter.db import unit_of_work
from newsletter.db.models import Campaign, CampaignKind, CampaignStatus, Item
from newsletter.schedule import Scheduler, digest_trigger, latest_slot
from tests.conftest import make_settings
from tests.test_flow import prepare

MINSK_MONDAY_9 = datetime(2026, 11, 30, 6, 0, tzinfo=UTC)  # 09:00 in Minsk (UTC+3)


def settings_for(database_url: str, tz: str = "Europe/Minsk", **alerts: str) -> Settings:
    base = make_settings(database_url)
    return replace(
        base, schedule=replace(base.schedule, timezone=tz), alerts=replace(base.alerts, **alerts)
    )


def digests(factory: sessionmaker[Session]) -> int:
    with unit_of_work(factory) as session:
        stmt = select(func.count()).where(Campaign.kind == CampaignKind.DIGEST)
        return int(session.scalar(stmt) or 0)


def add_item(
    factory: sessionmaker[Session], title: str, now: datetime, *, urgent: bool = False
) -> None:
    """A new item, as if just ingested from the first source."""
    with unit_of_work(factory) as session:
        source_id = session.scalar(select(Item.source_id).limit(1))
        session.add(
            Item(
                source_id=source_id,
                guid=f"test:{title}",
                link=f"https://portal.example.org/{title}",
                title=title,
                summary_html="<p>x</p>",
                content_html="",
                published_at=now,
                categories=["urgent-action"] if urgent else [],
                urgent=urgent,
                content_hash=title,
                ingested_at=now,
                updated_at=now,
            )
        )


@pytest.mark.parametrize(
    ("tz", "now", "expected"),
    [
        pytest.param(
            "Europe/Minsk",
            datetime(2026, 11, 30, 6, 0, 30, tzinfo=UTC),
            datetime(2026, 11, 30, 6, 0, tzinfo=UTC),
            id="minsk-just-after",
        ),
        pytest.param(
            "Europe/Minsk", datetime(2026, 11, 30, 5, 59, tzinfo=UTC), None, id="minsk-just-before"
        ),
        pytest.param(
            "Europe/Minsk",
            datetime(2026, 12, 1, 5, 0, tzinfo=UTC),
            datetime(2026, 11, 30, 6, 0, tzinfo=UTC),
            id="minsk-within-grace",
        ),
        pytest.param(
            "Europe/Minsk", datetime(2026, 12, 1, 7, 0, tzinfo=UTC), None, id="minsk-past-grace"
        ),
        pytest.param(
            "Europe/Warsaw",
            datetime(2026, 3, 23, 9, 0, tzinfo=UTC),
            datetime(2026, 3, 23, 8, 0, tzinfo=UTC),
            id="warsaw-winter-time",
        ),
        pytest.param(
            "Europe/Warsaw",
            datetime(2026, 3, 30, 9, 0, tzinfo=UTC),
            datetime(2026, 3, 30, 7, 0, tzinfo=UTC),
            id="warsaw-summer-time",
        ),
        pytest.param(
            "Europe/Warsaw",
            datetime(2026, 10, 26, 8, 30, tzinfo=UTC),
            datetime(2026, 10, 26, 8, 0, tzinfo=UTC),
            id="warsaw-back-to-winter",
        ),
    ],
)
def test_latest_slot_follows_local_time(
    tz: str, now: datetime, expected: datetime | None, sqlite_url: str
) -> None:
    """The due slot is Monday 09:00 local time, daylight saving included, within the grace."""
    trigger = digest_trigger(settings_for(sqlite_url, tz))
    slot = latest_slot(trigger, now, lookback=timedelta(hours=24))
    assert slot == expected


def test_digest_is_sent_once_per_slot_even_after_restart(
    factory: sessionmaker[Session], database_url: str
) -> None:
    """A slot's digest goes out once; calling again or from a restarted scheduler sends nothing."""
    clock = FrozenClock(MINSK_MONDAY_9 - timedelta(minutes=1))
    prepare(factory, clock)
    settings = settings_for(database_url)
    first = Scheduler(factory=factory, settings=settings, clock=clock, holder="a")
    assert first.run_digests() == []  # not yet nine
    clock.advance(minutes=1, seconds=5)
    assert len(first.run_digests()) == 1
    assert first.run_digests() == []
    add_item(factory, "after-the-digest", clock.now())
    restarted = Scheduler(factory=factory, settings=settings, clock=clock, holder="b")
    clock.advance(minutes=3)
    assert restarted.run_digests() == []  # same slot: the new item waits for next week
    assert digests(factory) == 1
    clock.advance(days=7)
    [campaign_id] = restarted.run_digests()
    with unit_of_work(factory) as session:
        titles = [i.title for i in session.get(Campaign, campaign_id).items]
    assert titles == ["after-the-digest"]


def test_missed_digest_is_caught_up_once_and_items_are_not_skipped(
    factory: sessionmaker[Session], database_url: str
) -> None:
    """Down at nine: sent once on return within the grace; past the grace, the next one has all."""
    clock = FrozenClock(MINSK_MONDAY_9 + timedelta(hours=10))
    prepare(factory, clock)
    settings = settings_for(database_url)
    scheduler = Scheduler(factory=factory, settings=settings, clock=clock, holder="a")
    assert len(scheduler.run_digests()) == 1
    assert scheduler.run_digests() == []
    add_item(factory, "missed-week", clock.now())
    clock.advance(days=8)  # next Monday's slot was missed by more than the grace
    assert scheduler.run_digests() == []
    clock.advance(days=6)  # the Monday after
    [campaign_id] = scheduler.run_digests()
    with unit_of_work(factory) as session:
        assert [i.title for i in session.get(Campaign, campaign_id).items] == ["missed-week"]


def test_two_schedulers_at_once_send_one_digest(
    factory: sessionmaker[Session], database_url: str
) -> None:
    """Two schedulers firing the same slot at the same moment make exactly one digest."""
    clock = FrozenClock(MINSK_MONDAY_9 + timedelta(seconds=30))
    prepare(factory, clock)
    settings = settings_for(database_url)
    results: list[list[int] | Exception] = []
    barrier = threading.Barrier(4)

    def fire(holder: str) -> None:
        scheduler = Scheduler(factory=factory, settings=settings, clock=clock, holder=holder)
        barrier.wait()
        try:
            results.append(scheduler.run_digests())
        except Exception as e:  # a loser may fail to write; it must not send
            results.append(e)

    threads = [threading.Thread(target=fire, args=(f"h{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert digests(factory) == 1
    assert sum(len(r) for r in results if isinstance(r, list)) == 1


def test_only_one_scheduler_holds_the_lock_until_it_expires(
    factory: sessionmaker[Session], database_url: str, clock: FrozenClock
) -> None:
    """A second scheduler stays idle while the first renews; it takes over once the lease ends."""
    settings = settings_for(database_url)
    a = Scheduler(factory=factory, settings=settings, clock=clock, holder="a")
    b = Scheduler(factory=factory, settings=settings, clock=clock, holder="b")
    assert a.hold_lock()
    assert not b.hold_lock()
    clock.advance(seconds=settings.schedule.lock_seconds - 1)
    assert a.hold_lock()  # renewed
    clock.advance(seconds=settings.schedule.lock_seconds - 1)
    assert not b.hold_lock()
    clock.advance(seconds=2)  # a stopped renewing: its lease ran out
    assert b.hold_lock()
    assert not a.hold_lock()
    b.let_go()
    assert a.hold_lock()


@pytest.mark.parametrize("mode", ["auto", "approve"])
def test_recent_urgent_item_becomes_an_alert(
    factory: sessionmaker[Session], database_url: str, clock: FrozenClock, mode: str
) -> None:
    """A fresh urgent item makes one alert: started at once in auto mode, held in approve mode."""
    prepare(factory, clock)  # the sample feed's urgent item is from 2014: no alert for it
    settings = settings_for(database_url, mode=mode)
    scheduler = Scheduler(factory=factory, settings=settings, clock=clock, holder="a")
    assert scheduler.make_alerts() == []
    add_item(factory, "act-now", clock.now() - timedelta(hours=1), urgent=True)
    [campaign_id] = scheduler.make_alerts()
    assert scheduler.make_alerts() == []
    with unit_of_work(factory) as session:
        status = session.get(Campaign, campaign_id).status
    assert status == (CampaignStatus.RUNNING if mode == "auto" else CampaignStatus.DRAFT)
    if mode == "approve":
        with unit_of_work(factory) as session:
            queued = approve_alert(
                session=session,
                campaign_id=campaign_id,
                settings=settings,
                now=clock.now(),
                actor="cli:staff",
            )
            campaign = session.get(Campaign, campaign_id)
            assert (campaign.status, campaign.approved_by) == (CampaignStatus.RUNNING, "cli:staff")
        assert queued == 8


def test_sources_are_polled_on_their_own_interval(
    factory: sessionmaker[Session], database_url: str, clock: FrozenClock, tmp_path: Path
) -> None:
    """Each source is fetched when its interval has passed, not on every tick."""
    feed = Path(__file__).resolve().parents[1] / "newsletter" / "data" / "portal-feed.xml"
    base = settings_for(database_url)
    settings = replace(
        base,
        sources=replace(
            base.sources,
            feeds=(FeedSource(url=str(feed), name="portal", lang="en", poll_minutes=30),),
        ),
    )
    scheduler = Scheduler(factory=factory, settings=settings, clock=clock, holder="a")
    assert [r.new for r in scheduler.poll_sources()] == [10]
    clock.advance(minutes=10)
    assert scheduler.poll_sources() == []
    clock.advance(minutes=20)
    assert [r.not_modified for r in scheduler.poll_sources()] == [True]


def run_at_once(count: int, work: Callable[[int], object]) -> list[object]:
    """Run work(0) … work(count - 1) on threads released together; exceptions are returned."""
    barrier = threading.Barrier(count)
    results: list[object] = []

    def one(n: int) -> None:
        barrier.wait()
        try:
            results.append(work(n))
        except Exception as e:  # the assertion below shows it
            results.append(e)

    threads = [threading.Thread(target=one, args=(n,)) for n in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


def test_two_polls_at_once_ingest_a_source_once(
    factory: sessionmaker[Session], database_url: str, clock: FrozenClock
) -> None:
    """Two schedulers polling one slow source at the same moment: one ingests it, the other
    reports it busy; neither fails, and each item is stored once."""
    from tests.test_fetch import SAMPLE, send, serve

    def slow(handler: Any, server: Any) -> None:
        server.stop.wait(1.0)
        send(handler, 200, {}, SAMPLE.read_bytes())

    base = settings_for(database_url)
    with serve({"/feed": slow}) as server:
        settings = replace(
            base, sources=replace(base.sources, feeds=(FeedSource(url=f"{server.base}/feed"),))
        )
        schedulers = [
            Scheduler(factory=factory, settings=settings, clock=clock, holder=f"h{n}")
            for n in range(2)
        ]
        results = run_at_once(2, lambda n: schedulers[n].poll_sources(force=True))
    assert not [r for r in results if isinstance(r, Exception)], results
    reports = sorted((r for rs in results for r in rs), key=lambda r: r.busy)  # type: ignore[attr-defined]
    assert [(r.new, r.busy, r.error) for r in reports] == [(10, False, None), (0, True, None)]
    assert len(server.requests) == 1
    with unit_of_work(factory) as session:
        assert session.scalar(select(func.count()).select_from(Item)) == 10


def test_alerts_made_at_once_make_one_alert(
    factory: sessionmaker[Session], database_url: str, clock: FrozenClock
) -> None:
    """Four alert makers at once (a poll and webhook calls, in several processes): one alert,
    no error."""
    prepare(factory, clock)
    settings = settings_for(database_url, mode="auto")
    add_item(factory, "act-now", clock.now() - timedelta(hours=1), urgent=True)
    schedulers = [
        Scheduler(factory=factory, settings=settings, clock=clock, holder=f"h{n}") for n in range(4)
    ]
    results = run_at_once(4, lambda n: schedulers[n].make_alerts())
    assert not [r for r in results if isinstance(r, Exception)], results
    assert sum(len(r) for r in results if isinstance(r, list)) == 1
    with unit_of_work(factory) as session:
        stmt = select(func.count()).where(Campaign.kind == CampaignKind.ALERT)
        assert session.scalar(stmt) == 1
