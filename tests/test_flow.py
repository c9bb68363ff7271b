"""The whole flow end to end, on SQLite and PostgreSQL: feed → digest/alert → real SMTP server."""

from __future__ import annotations

from email.message import EmailMessage
from html import escape as html_escape
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from newsletter.assemble import assemble_alert, assemble_digest
from newsletter.clock import FrozenClock
from newsletter.config import Settings
from newsletter.db import unit_of_work
from newsletter.db.models import Campaign, CampaignStatus, Delivery, DeliveryStatus, Item
from newsletter.enqueue import launch_campaign
from newsletter.importer import import_rows
from newsletter.ingest import ingest_all
from newsletter.lists import read_lists, sync_lists
from newsletter.subscriber_csv import read_csv
from tests.builders import deliver
from tests.conftest import SECRET, SmtpServer, make_settings

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_FEED = ROOT / "newsletter" / "data" / "portal-feed.xml"
EXAMPLE_CSV = ROOT / "subscribers" / "example.csv"


def weekly_digest_people() -> set[str]:
    """Addresses in example.csv whose lists include weekly-digest."""
    rows = [r for _line, r, _err in read_csv(EXAMPLE_CSV) if r]
    return {r["email"] for r in rows if "weekly-digest" in (r["lists"] or "")}


def prepare(factory: sessionmaker[Session], clock: FrozenClock) -> None:
    """Lists, the example subscribers and the sample feed, as `newsletter demo` does."""
    with unit_of_work(factory) as session:
        sync_lists(session=session, specs=read_lists(ROOT / "subscribers" / "lists.toml"))
        import_rows(
            session=session,
            rows=read_csv(EXAMPLE_CSV),
            default_list=None,
            confirmed=True,
            secret=SECRET,
            now=clock.now(),
            actor="test",
        )
    ingest(factory, clock)


def ingest(factory: sessionmaker[Session], clock: FrozenClock) -> None:
    [report] = ingest_all(
        factory=factory,
        sources=[(str(SAMPLE_FEED), "sample", "en")],
        settings=Settings().sources,
        clock=clock,
    )
    assert report.error is None


def send_digest(
    factory: sessionmaker[Session], settings: Settings, clock: FrozenClock
) -> int | None:
    with unit_of_work(factory) as session:
        campaign = assemble_digest(
            session=session, list_slug="weekly-digest", now=clock.now(), actor="test"
        )
        if campaign is None:
            return None
        launch_campaign(
            session=session, campaign=campaign, settings=settings, now=clock.now(), actor="test"
        )
        cid = campaign.id
    deliver(factory, settings, clock)
    return cid


def check_headers(msg: EmailMessage) -> None:
    """Every header DESIGN promises is there and well-formed."""
    for name in (
        "From",
        "To",
        "Subject",
        "Date",
        "Message-ID",
        "MIME-Version",
        "List-Id",
        "List-Unsubscribe",
        "List-Unsubscribe-Post",
    ):
        assert msg[name], f"missing {name}"
    assert "\n" not in str(msg["Subject"]) and "\r" not in str(msg["Subject"])
    unsub = str(msg["List-Unsubscribe"])
    assert "<https://" in unsub or "<http://" in unsub
    assert "<mailto:" in unsub and "=?" not in unsub
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert msg.get_content_type() == "multipart/alternative"
    assert msg.get_body(("plain",)) is not None and msg.get_body(("html",)) is not None


def test_digest_reaches_each_subscriber_exactly_once(
    factory: sessionmaker[Session], smtpd: SmtpServer, clock: FrozenClock, database_url: str
) -> None:
    """A digest of the sample feed reaches each list member once, with every header and part."""
    settings = make_settings(database_url, smtpd)
    prepare(factory, clock)
    cid = send_digest(factory, settings, clock)
    assert cid is not None
    messages = smtpd.messages()
    recipients = [str(m["X-Delivered-To"]) for m in messages]
    assert sorted(recipients) == sorted(weekly_digest_people())
    with unit_of_work(factory) as session:
        titles = list(session.scalars(select(Item.title)))
        assert session.get(Campaign, cid).status == CampaignStatus.FINISHED
    assert len(titles) == 10
    for msg in messages:
        check_headers(msg)
        text = " ".join(msg.get_body(("plain",)).get_content().split())  # titles may be wrapped
        html = " ".join(msg.get_body(("html",)).get_content().split())
        for title in titles:
            assert title in text
            assert html_escape(title, quote=False) in html
    assert len({m["Message-ID"] for m in messages}) == len(messages)


def test_second_digest_with_nothing_new_sends_nothing(
    factory: sessionmaker[Session], smtpd: SmtpServer, clock: FrozenClock, database_url: str
) -> None:
    """After a digest, ingesting the same feed again adds nothing and no second digest goes out."""
    settings = make_settings(database_url, smtpd)
    prepare(factory, clock)
    assert send_digest(factory, settings, clock) is not None
    first = len(smtpd.messages())
    clock.advance(days=7)
    ingest(factory, clock)
    with unit_of_work(factory) as session:
        assert session.scalar(select(func.count()).select_from(Item)) == 10
    assert send_digest(factory, settings, clock) is None
    assert len(smtpd.messages()) == first


def test_alert_goes_to_alert_list_once_even_if_asked_twice(
    factory: sessionmaker[Session], smtpd: SmtpServer, clock: FrozenClock, database_url: str
) -> None:
    """The urgent item's alert reaches the urgent-actions list; asking again sends nothing more."""
    settings = make_settings(database_url, smtpd)
    prepare(factory, clock)
    for _ in range(2):
        with unit_of_work(factory) as session:
            urgent = session.scalars(select(Item).where(Item.urgent.is_(True))).one()
            campaign, _created = assemble_alert(
                session=session,
                list_slug="urgent-actions",
                now=clock.now(),
                actor="test",
                item_ref=urgent.link,
            )
            launch_campaign(
                session=session, campaign=campaign, settings=settings, now=clock.now(), actor="test"
            )
        deliver(factory, settings, clock)
    rows = [r for _line, r, _err in read_csv(EXAMPLE_CSV) if r]
    expected = {r["email"] for r in rows if "urgent-actions" in (r["lists"] or "")}
    received = [str(m["X-Delivered-To"]) for m in smtpd.messages()]
    assert sorted(received) == sorted(expected)
    for msg in smtpd.messages():
        check_headers(msg)
        assert "urgent-actions.portal.example.org" in str(msg["List-Id"])


@pytest.mark.parametrize("reply", ["451 try later", "550 no such mailbox"])
def test_smtp_refusal_is_recorded_not_lost(
    factory: sessionmaker[Session],
    tmp_path: Path,
    clock: FrozenClock,
    database_url: str,
    reply: str,
) -> None:
    """A 4xx defers each delivery for a retry; a 5xx at RCPT fails it and suppresses the address."""
    from aiosmtpd.controller import Controller

    from newsletter.devsmtp import free_port

    class Refuser:
        async def handle_RCPT(self, server, session, envelope, address, options):
            return reply

    port = free_port()
    controller = Controller(Refuser(), hostname="127.0.0.1", port=port)
    controller.start()
    try:
        settings = make_settings(database_url, SmtpServer("127.0.0.1", port, tmp_path, None))  # type: ignore[arg-type]
        prepare(factory, clock)
        send_digest(factory, settings, clock)
    finally:
        controller.stop()
    people = len(weekly_digest_people())
    with unit_of_work(factory) as session:
        statuses = list(session.scalars(select(Delivery.status)))
        campaign = session.scalars(select(Campaign)).one()
    if reply.startswith("4"):
        assert statuses == [DeliveryStatus.DEFERRED] * people
        assert campaign.status == CampaignStatus.RUNNING
    else:
        assert statuses == [DeliveryStatus.FAILED] * people
        assert campaign.status == CampaignStatus.FINISHED
        clock.advance(days=7)
        with unit_of_work(factory) as session:  # bounced people are not queued again
            from newsletter.audience import audience_size

            assert audience_size(session, campaign.list_id) == 0
