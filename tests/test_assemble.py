"""assemble: a digest of what is new since the list's cursor, an alert from an item or text."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from newsletter.assemble import MAX_DIGEST_ITEMS, assemble_alert, assemble_digest
from newsletter.clock import FrozenClock
from newsletter.db import unit_of_work
from newsletter.db.models import (
    Campaign,
    CampaignKind,
    CampaignStatus,
    DigestExclusion,
    Event,
    Item,
    MailingList,
)
from newsletter.errors import CampaignError
from tests.test_flow import prepare
from tests.test_schedule import add_item


def digest(factory: sessionmaker[Session], clock: FrozenClock) -> tuple[int, int] | None:
    """(campaign id, number of items) of a new digest of weekly-digest, or None."""
    with unit_of_work(factory) as session:
        campaign = assemble_digest(
            session=session, list_slug="weekly-digest", now=clock.now(), actor="test"
        )
        return None if campaign is None else (campaign.id, len(campaign.items))


def cursor(factory: sessionmaker[Session]) -> int | None:
    with unit_of_work(factory) as session:
        return session.scalar(
            select(MailingList.digest_cursor).where(MailingList.slug == "weekly-digest")
        )


def test_digest_takes_the_items_since_the_cursor_then_nothing_new_is_none(
    factory: sessionmaker[Session], clock: FrozenClock
) -> None:
    """The first digest has every item; the cursor moves; a repeat is None; a new item follows."""
    prepare(factory, clock)
    with unit_of_work(factory) as session:
        total, last_id = session.execute(select(func.count(), func.max(Item.id))).one()
    made = digest(factory, clock)
    assert made is not None and made[1] == total
    assert cursor(factory) == last_id
    assert digest(factory, clock) is None
    add_item(factory, "later", clock.now() + timedelta(days=1))
    again = digest(factory, clock)
    assert again is not None and again[1] == 1
    with unit_of_work(factory) as session:
        campaign = session.get(Campaign, again[0])
        assert campaign is not None
        assert [i.title for i in campaign.items] == ["later"]
        assert (campaign.kind, campaign.status) == (CampaignKind.DIGEST, CampaignStatus.DRAFT)
        details = [
            e.detail
            for e in session.scalars(select(Event).where(Event.action == "digest.assembled"))
        ]
    assert details == [
        {"list": "weekly-digest", "items": total},
        {"list": "weekly-digest", "items": 1},
    ]


def test_a_digest_takes_the_newest_hundred_items_and_passes_the_rest_over(
    factory: sessionmaker[Session], clock: FrozenClock
) -> None:
    """A feed of thousands of items made a digest nobody could render; the newest 100 go, the
    older ones are passed over for good and counted in the event."""
    prepare(factory, clock)
    assert digest(factory, clock) is not None  # the sample's items
    for n in range(130):
        add_item(factory, f"item-{n:03}", clock.now() + timedelta(minutes=130 - n))
    made = digest(factory, clock)
    assert made is not None and made[1] == MAX_DIGEST_ITEMS == 100
    with unit_of_work(factory) as session:
        campaign = session.get(Campaign, made[0])
        assert campaign is not None
        assert sorted(i.title for i in campaign.items) == [f"item-{n:03}" for n in range(100)]
        last = session.scalars(select(Event).where(Event.action == "digest.assembled")).all()[-1]
        assert last.detail == {"list": "weekly-digest", "items": 100, "passed_over": 30}
        assert cursor(factory) == session.scalar(select(func.max(Item.id)))
    assert digest(factory, clock) is None


def test_items_the_check_would_refuse_are_set_aside_and_the_digest_goes(
    factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """One item with an http link, or naming the readers' own pages, made the check refuse the
    whole digest (every source's news) while ingest said ok: such items are set aside, as staff
    would leave them out, named with why in one event, and the rest go."""
    from tests.test_schedule import settings_for

    settings = settings_for(database_url)
    prepare(factory, clock)
    assert digest(factory, clock) is not None  # the sample's items
    base = settings.web.base_url.rstrip("/")
    later = clock.now() + timedelta(hours=1)
    add_item(factory, "fine", later)
    add_item(factory, "plain-http", later)
    add_item(factory, "names-our-page", later)
    with unit_of_work(factory) as session:
        for item in session.scalars(select(Item).where(Item.guid.like("test:%"))):
            if item.title == "plain-http":
                item.link = "http://old-partner.example.org/report"
            elif item.title == "names-our-page":
                item.summary_html = f"<p>Write to {base}/preferences/abc please</p>"
    with unit_of_work(factory) as session:
        campaign = assemble_digest(
            session=session,
            list_slug="weekly-digest",
            now=clock.now(),
            actor="t",
            settings=settings,
        )
        assert campaign is not None and [i.title for i in campaign.items] == ["fine"]
        [event] = session.scalars(select(Event).where(Event.action == "digest.items_set_aside"))
        reasons = sorted(entry["reason"] for entry in event.detail["items"])
        page = f"{base}/preferences/"
        assert reasons == [
            f"it names the readers' preferences page ({page})",
            "not https: http://old-partner.example.org/report",
        ]
        excluded = session.scalars(select(DigestExclusion.excluded_by)).all()
        assert excluded == ["check", "check"]


def test_when_the_check_would_refuse_every_item_none_is_set_aside(
    factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """A setting that refuses every item (allowed_link_hosts without the portal) is a mistake
    to show, not to hide: the digest keeps them all, for the check to refuse it loudly."""
    from dataclasses import replace

    from tests.test_schedule import settings_for

    base = settings_for(database_url)
    settings = replace(base, check=replace(base.check, allowed_link_hosts=("elsewhere.example",)))
    prepare(factory, clock)
    with unit_of_work(factory) as session:
        total = session.scalar(select(func.count()).select_from(Item))
        now = clock.now()
        campaign = assemble_digest(
            session=session, list_slug="weekly-digest", now=now, actor="t", settings=settings
        )
        assert campaign is not None and len(campaign.items) == total
        assert session.scalar(select(func.count()).select_from(DigestExclusion)) == 0


def test_digest_of_an_alert_list_is_refused(
    factory: sessionmaker[Session], clock: FrozenClock
) -> None:
    """A digest is made only for a digest list."""
    prepare(factory, clock)
    with pytest.raises(CampaignError, match="not a digest list"), unit_of_work(factory) as s:
        assemble_digest(session=s, list_slug="urgent-actions", now=clock.now(), actor="t")


def alert(
    factory: sessionmaker[Session], clock: FrozenClock, **what: str
) -> tuple[int, bool, list[str], str]:
    """Ask for an urgent-actions alert: (campaign id, created, item guids, body)."""
    with unit_of_work(factory) as session:
        campaign, created = assemble_alert(
            session=session, list_slug="urgent-actions", now=clock.now(), actor="test", **what
        )
        return campaign.id, created, [i.guid for i in campaign.items], campaign.body_html


def test_alert_from_an_item_and_asked_twice_is_one_campaign(
    factory: sessionmaker[Session], clock: FrozenClock
) -> None:
    """An alert names its item; asking again for the same item returns the same campaign."""
    prepare(factory, clock)
    add_item(factory, "act-now", clock.now(), urgent=True)
    first, second = (alert(factory, clock, item_ref="test:act-now") for _ in range(2))
    assert first[1:3] == (True, ["test:act-now"])
    assert second[:3] == (first[0], False, ["test:act-now"])
    with unit_of_work(factory) as session:
        events = session.scalars(select(Event).where(Event.action == "alert.created")).all()
    assert len(events) == 1 and events[0].detail["list"] == "urgent-actions"


def test_alert_from_text_is_cleaned_and_the_same_text_is_one_campaign(
    factory: sessionmaker[Session], clock: FrozenClock
) -> None:
    """Staff text is sanitised; the same title, text and link twice are one campaign."""
    prepare(factory, clock)
    text = {"body_html": "<p>Now.</p><script>alert(1)</script>", "url": "https://x.example/"}
    first, second = (alert(factory, clock, title="Write today", **text) for _ in range(2))
    assert first[:3] == (first[0], True, []) and second[:2] == (first[0], False)
    assert "<script" not in first[3] and "Now." in first[3]
    other = alert(factory, clock, title="Write tomorrow", **text)
    assert other[1] and other[0] != first[0]


def test_alert_needs_an_item_or_a_title(factory: sessionmaker[Session], clock: FrozenClock) -> None:
    """Neither an item nor a title is a one-line CampaignError, and nothing is made."""
    prepare(factory, clock)
    with pytest.raises(CampaignError, match="needs --item"), unit_of_work(factory) as session:
        assemble_alert(session=session, list_slug="urgent-actions", now=clock.now(), actor="t")
    with unit_of_work(factory) as session:
        assert session.scalar(select(func.count()).select_from(Campaign)) == 0


def test_an_item_reference_matching_several_items_is_refused(
    factory: sessionmaker[Session], clock: FrozenClock
) -> None:
    """A guid that is also another item's link names neither: one line, and nothing is made;
    the item given itself is still found."""
    prepare(factory, clock)
    add_item(factory, "act-now", clock.now(), urgent=True)
    add_item(factory, "forged", clock.now())
    with unit_of_work(factory) as session:
        forged = session.scalars(select(Item).where(Item.guid == "test:forged")).one()
        forged.link = "test:act-now"
    with pytest.raises(CampaignError, match="matches 2 items") as caught:
        alert(factory, clock, item_ref="test:act-now")
    assert "\n" not in str(caught.value)
    with unit_of_work(factory) as session:
        assert session.scalar(select(func.count()).select_from(Campaign)) == 0
        real = session.scalars(select(Item).where(Item.guid == "test:act-now")).one()
        campaign, created = assemble_alert(
            session=session, list_slug="urgent-actions", now=clock.now(), actor="t", item=real
        )
        assert created and [i.guid for i in campaign.items] == ["test:act-now"]
