"""Steering the digest: left-out items never go, a skipped week is not caught up, send now."""

from __future__ import annotations

from datetime import datetime

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from newsletter.clock import FrozenClock
from newsletter.config import Settings
from newsletter.db import unit_of_work
from newsletter.db.models import Campaign, CampaignStatus, Event, Item, MailingList, Source
from newsletter.digest_control import (
    exclude_item,
    include_item,
    send_digest_now,
    skip_digest,
    upcoming_digest,
)
from newsletter.errors import CampaignError
from newsletter.schedule import Scheduler
from tests.builders import deliver
from tests.conftest import SmtpServer, make_settings
from tests.test_approvals import seed_people

DIGEST = "weekly-digest"


@pytest.fixture
def settings(database_url: str, smtpd: SmtpServer) -> Settings:
    return make_settings(database_url, smtpd)


def add_items(factory: sessionmaker[Session], clock: FrozenClock, *titles: str) -> list[int]:
    """Ingested items (an English source), newest last."""
    now = clock.now()
    with unit_of_work(factory) as session:
        source = session.scalar(select(Source)) or Source(url="https://portal.example.org/feed")
        session.add(source)
        session.flush()
        items = [
            Item(
                source_id=source.id, guid=title, link=f"https://portal.example.org/{i}",
                title=title, summary_html="<p>Summary.</p>", published_at=now,
                content_hash=title, ingested_at=now, updated_at=now,
            )
            for i, title in enumerate(titles)
        ]  # fmt: skip
        session.add_all(items)
        session.flush()
        return [i.id for i in items]


def scheduler(factory: sessionmaker[Session], settings: Settings, clock: FrozenClock) -> Scheduler:
    return Scheduler(factory=factory, settings=settings, clock=clock, holder="test")


def sent_text(smtpd: SmtpServer) -> str:
    return "\n".join(
        m.get_body(("plain",)).get_content()  # type: ignore[union-attr]
        for m in smtpd.messages()
    )


def test_an_excluded_item_is_never_sent(
    factory: sessionmaker[Session], settings: Settings, clock: FrozenClock, smtpd: SmtpServer
) -> None:
    seed_people(factory, clock, 2)
    keep, drop = add_items(factory, clock, "Kept item title", "Dropped item title")
    with unit_of_work(factory) as session:
        exclude_item(session, list_slug=DIGEST, item_id=drop, now=clock.now(), actor="staff")
        exclude_item(session, list_slug=DIGEST, item_id=drop, now=clock.now(), actor="staff")
        upcoming = upcoming_digest(session, list_slug=DIGEST, settings=settings, now=clock.now())
        assert [i.id for i in upcoming.items] == [keep]
        assert [i.id for i in upcoming.excluded] == [drop]
    # 2026-11-23 is a Monday: the 09:00 Europe/Minsk slot (06:00 UTC) is due.
    assert len(scheduler(factory, settings, clock).run_digests()) == 1
    deliver(factory, settings, clock)
    assert len(smtpd.messages()) == 2
    assert "Kept item title" in sent_text(smtpd) and "Dropped item title" not in sent_text(smtpd)
    # Next week, with a new item: the dropped one does not come back.
    clock.advance(days=7)
    add_items(factory, clock, "Next week's item")
    assert len(scheduler(factory, settings, clock).run_digests()) == 1
    deliver(factory, settings, clock)
    assert "Next week's item" in sent_text(smtpd) and "Dropped item title" not in sent_text(smtpd)
    with unit_of_work(factory) as session:
        ml = session.scalars(select(MailingList).where(MailingList.slug == DIGEST)).one()
        assert ml.digest_cursor == max(drop, keep) + 1


def test_when_every_item_is_left_out_the_cursor_still_moves(
    factory: sessionmaker[Session], settings: Settings, clock: FrozenClock, smtpd: SmtpServer
) -> None:
    seed_people(factory, clock, 1)
    (only,) = add_items(factory, clock, "Only item")
    with unit_of_work(factory) as session:
        exclude_item(session, list_slug=DIGEST, item_id=only, now=clock.now(), actor="staff")
    assert scheduler(factory, settings, clock).run_digests() == []
    with unit_of_work(factory) as session:
        include_item(session, list_slug=DIGEST, item_id=only, now=clock.now(), actor="staff")
        ml = session.scalars(select(MailingList).where(MailingList.slug == DIGEST)).one()
        assert ml.digest_cursor == only
        assert (
            upcoming_digest(session, list_slug=DIGEST, settings=settings, now=clock.now()).items
            == []
        )
    assert smtpd.messages() == []


def test_a_skipped_missed_slot_is_not_caught_up(
    factory: sessionmaker[Session], settings: Settings, clock: FrozenClock, smtpd: SmtpServer
) -> None:
    seed_people(factory, clock, 1)
    add_items(factory, clock, "Skipped one", "Skipped two")
    with unit_of_work(factory) as session:
        assert (
            skip_digest(
                session, list_slug=DIGEST, now=clock.now(), actor="staff", settings=settings
            )
            == 2
        )
        event = session.scalars(select(Event).where(Event.action == "digest.skipped")).one()
        assert event.detail["items"] == 2 and event.actor == "staff"
    add_items(factory, clock, "Arrived after the skip")
    assert scheduler(factory, settings, clock).run_digests() == []
    clock.advance(hours=12)
    assert scheduler(factory, settings, clock).run_digests() == []
    clock.advance(days=7)
    assert len(scheduler(factory, settings, clock).run_digests()) == 1
    deliver(factory, settings, clock)
    text = sent_text(smtpd)
    assert "Arrived after the skip" in text and "Skipped one" not in text


def test_skipping_before_the_slot_skips_that_slot(
    factory: sessionmaker[Session], settings: Settings, clock: FrozenClock, smtpd: SmtpServer
) -> None:
    seed_people(factory, clock, 1)
    clock.advance(days=-1)  # Sunday: the next slot is tomorrow
    add_items(factory, clock, "Sunday item")
    with unit_of_work(factory) as session:
        upcoming = upcoming_digest(session, list_slug=DIGEST, settings=settings, now=clock.now())
        assert upcoming.next_run is not None
        assert upcoming.next_run.astimezone(clock.now().tzinfo) == datetime.fromisoformat(
            "2026-11-23T06:00:00+00:00"
        )
        skip_digest(session, list_slug=DIGEST, now=clock.now(), actor="staff", settings=settings)
    add_items(factory, clock, "Sunday night item")
    clock.advance(days=1)
    assert scheduler(factory, settings, clock).run_digests() == []
    assert smtpd.messages() == []


def test_send_now_goes_through_the_launch_gate_without_left_out_items(
    factory: sessionmaker[Session], settings: Settings, clock: FrozenClock, smtpd: SmtpServer
) -> None:
    seed_people(factory, clock, 3)
    keep, drop = add_items(factory, clock, "Sent now", "Left out")
    with unit_of_work(factory) as session:
        exclude_item(session, list_slug=DIGEST, item_id=drop, now=clock.now(), actor="staff")
        campaign = send_digest_now(
            session, list_slug=DIGEST, settings=settings, now=clock.now(), actor="staff"
        )
        assert campaign is not None and campaign.status == CampaignStatus.RUNNING
        assert [i.id for i in campaign.items] == [keep]
        actions = [e.action for e in session.scalars(select(Event).order_by(Event.id))]
        assert actions.index("campaign.checked") < actions.index("campaign.started")
        assert (
            send_digest_now(
                session, list_slug=DIGEST, settings=settings, now=clock.now(), actor="staff"
            )
            is None
        )
    deliver(factory, settings, clock)
    assert len(smtpd.messages()) == 3 and "Left out" not in sent_text(smtpd)
    # The scheduler's slot today finds nothing new.
    assert scheduler(factory, settings, clock).run_digests() == []


def test_an_alert_list_has_no_digest_to_steer(
    factory: sessionmaker[Session], settings: Settings, clock: FrozenClock
) -> None:
    seed_people(factory, clock, 1)
    with pytest.raises(CampaignError, match="not a digest list"), unit_of_work(factory) as session:
        skip_digest(session, list_slug="urgent-actions", now=clock.now(), actor="staff")
    with unit_of_work(factory) as session:
        assert session.scalars(select(Campaign)).all() == []
