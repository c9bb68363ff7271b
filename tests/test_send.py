"""The sender against a fault-injecting SMTP server: every reply rule, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import random
import re
from dataclasses import replace
from datetime import timedelta

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from newsletter.audience import enqueue_audience
from newsletter.campaigns import pause_campaign, retry_campaign
from newsletter.clock import FrozenClock
from newsletter.config import Settings
from newsletter.db import unit_of_work
from newsletter.db.models import (
    Campaign,
    CampaignStatus,
    Delivery,
    DeliveryStatus,
    MailingList,
    Subscriber,
    SubscriberStatus,
    Subscription,
    SubscriptionStatus,
    Variant,
)
from newsletter.render import PREFERENCES_URL, UNSUBSCRIBE_URL
from newsletter.send import SendControl, SendReport, deliver_queued
from newsletter.smtp import SmtpPool
from tests.conftest import make_settings
from tests.smtp_faults import Fault, FaultyHandler, faulty_smtpd

TEXT = (
    f"Новости недели\n\nRead more.\n\nUnsubscribe: {UNSUBSCRIBE_URL}\n"
    f"Preferences: {PREFERENCES_URL}\n"
)
HTML = (
    "<html><body><p>Новости — " + "long line " * 30 + "</p>"
    f'<a href="{UNSUBSCRIBE_URL}">unsubscribe</a> <a href="{PREFERENCES_URL}">prefs</a>'
    "</body></html>"
)


def seed(factory: sessionmaker[Session], clock: FrozenClock, n: int, *, start: bool = True) -> int:
    """A list of n people (some with non-ASCII names), a running digest campaign, its deliveries."""
    now = clock.now()
    with unit_of_work(factory) as session:
        ml = MailingList(slug="weekly", name="Weekly", kind="digest", list_id="weekly.example.org")
        session.add(ml)
        session.flush()
        session.add_all(
            Subscriber(
                email=f"person{i}@example.net",
                name=["", "Ann Lee", "Алесь Бяляцкі", 'Q "quote" \\ x'][i % 4],
                language=["en", "ru"][i % 2],
                created_at=now,
            )
            for i in range(n)
        )
        session.flush()
        ids = session.scalars(select(Subscriber.id)).all()
        session.add_all(
            Subscription(subscriber_id=s, list_id=ml.id, status="active", created_at=now)
            for s in ids
        )
        campaign = Campaign(
            kind="digest", list_id=ml.id, dedupe_key="test", created_at=now, status="running"
        )
        session.add(campaign)
        session.flush()
        for lang in ("en", "ru"):
            session.add(
                Variant(
                    campaign_id=campaign.id,
                    lang=lang,
                    subject="Weekly — неделя",
                    html=HTML,
                    text=TEXT,
                )
            )
        if start:
            enqueue_audience(session, campaign=campaign, now=now)
        return campaign.id


def deliver(
    factory: sessionmaker[Session], settings: Settings, clock: FrozenClock, **kw: object
) -> SendReport:
    """Run the sender once against the configured server."""

    async def run() -> SendReport:
        pool = SmtpPool(settings.smtp)
        try:
            return await deliver_queued(
                factory=factory,
                settings=settings,
                transport=pool,
                clock=clock,
                rng=random.Random(1),
                **kw,  # type: ignore[arg-type]
            )
        finally:
            await pool.close()

    return asyncio.run(run())


def settings_for(database_url: str, port: int, **smtp: object) -> Settings:
    base = make_settings(database_url)
    return replace(base, smtp=replace(base.smtp, host="127.0.0.1", port=port, **smtp))  # type: ignore[arg-type]


def statuses(factory: sessionmaker[Session]) -> list[str]:
    with unit_of_work(factory) as session:
        return [str(s) for s in session.scalars(select(Delivery.status).order_by(Delivery.id))]


@pytest.mark.parametrize(
    ("fault", "expected", "suppressed"),
    [
        pytest.param(Fault("MAIL", "451 4.3.0 try later"), "deferred", False, id="451-at-mail"),
        pytest.param(Fault("RCPT", "451 4.2.1 greylisted"), "deferred", False, id="451-at-rcpt"),
        pytest.param(Fault("DATA", "451 4.3.0 busy"), "deferred", False, id="451-at-data"),
        pytest.param(Fault("MAIL", "421 4.3.2 closing"), "deferred", False, id="421-at-mail"),
        pytest.param(Fault("RCPT", "421 4.3.2 closing"), "deferred", False, id="421-at-rcpt"),
        pytest.param(Fault("DATA", drop=True), "deferred", False, id="drop-mid-data"),
        pytest.param(Fault("RCPT", "550 5.1.1 no such user"), "failed", True, id="550-at-rcpt"),
        pytest.param(Fault("MAIL", "550 5.7.1 sender refused"), "failed", False, id="550-at-mail"),
        pytest.param(Fault("DATA", "550 5.7.1 spam"), "failed", False, id="550-at-data"),
    ],
)
def test_each_smtp_reply_moves_the_delivery_as_promised(
    factory: sessionmaker[Session],
    clock: FrozenClock,
    database_url: str,
    fault: Fault,
    expected: str,
    suppressed: bool,
) -> None:
    """4xx/drops defer with back-off, 5xx fails at once, a 5xx at RCPT also suppresses."""
    cid = seed(factory, clock, 6)
    one = replace(fault, times=1) if fault.stage == "MAIL" else replace(fault, only="person3@")
    handler = FaultyHandler([one])
    with faulty_smtpd(handler) as port:
        report = deliver(factory, settings_for(database_url, port), clock)
    got = statuses(factory)
    assert sorted(got) == sorted(["sent"] * 5 + [expected])
    assert len(handler.received) == 5 and report.sent == 5
    with unit_of_work(factory) as session:
        d = session.scalars(select(Delivery).where(Delivery.status != "sent")).one()
        person = session.get(Subscriber, d.subscriber_id)
        assert (person.status == SubscriberStatus.BOUNCED) is suppressed
        assert person.email not in (d.last_reply or "")
        assert d.next_attempt_at > clock.now() if expected == "deferred" else True
        campaign = session.get(Campaign, cid)
        running = expected == "deferred"
        assert campaign.status == (CampaignStatus.RUNNING if running else CampaignStatus.FINISHED)


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        pytest.param("250 2.0.0 queued\x00 \x1b[2J\x85", "sent", id="2xx"),
        pytest.param("451 4.3.0 busy\x00", "deferred", id="4xx"),
        pytest.param("550 5.1.1 \x00<person3@example.net>\x07", "failed", id="5xx"),
    ],
)
def test_control_characters_in_a_relays_reply_are_recorded_as_replacement_marks(
    factory: sessionmaker[Session], clock: FrozenClock, database_url: str, reply: str, expected: str
) -> None:
    """A NUL in a reply (PostgreSQL refuses it in text) still records every outcome once."""
    seed(factory, clock, 6)
    handler = FaultyHandler(
        [Fault("RCPT" if expected == "failed" else "DATA", reply, only="person3@")]
    )
    with faulty_smtpd(handler) as port:
        report = deliver(factory, settings_for(database_url, port), clock)
    assert sorted(statuses(factory)) == sorted(["sent"] * 5 + [expected])
    assert report.sent == 5 + (expected == "sent")
    with unit_of_work(factory) as session:
        recorded = session.scalars(
            select(Delivery.last_reply).where(Delivery.last_reply.is_not(None))
        )
        odd = [r for r in recorded if "\ufffd" in r]
    assert len(odd) == 1 and odd[0].isprintable() and "person3@" not in odd[0], odd


def test_deferred_mail_is_retried_until_the_deadline_then_failed(
    factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """A 451 is retried after its back-off; past the deadline the next 451 fails it."""
    seed(factory, clock, 2)
    handler = FaultyHandler([Fault("RCPT", "451 later", only="person1@")])
    with faulty_smtpd(handler) as port:
        settings = settings_for(database_url, port, retry_deadline_hours=1)
        deliver(factory, settings, clock)
        assert statuses(factory) == ["sent", "deferred"]
        deliver(factory, settings, clock)  # not due yet: nothing happens
        assert statuses(factory) == ["sent", "deferred"]
        clock.advance(minutes=30)
        deliver(factory, settings, clock)
        assert statuses(factory) == ["sent", "deferred"]
        clock.advance(hours=2)
        deliver(factory, settings, clock)
        assert statuses(factory) == ["sent", "failed"]
    with unit_of_work(factory) as session:
        attempts = session.scalars(select(Delivery.attempts).order_by(Delivery.id)).all()
    assert attempts == [1, 3]


def test_retry_requeues_failed_deliveries_only(
    factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """`campaigns retry` sends the failed ones again and nobody else gets a second copy."""
    cid = seed(factory, clock, 4)
    handler = FaultyHandler([Fault("DATA", "554 5.3.0 relay broken", only="person2@")])
    with faulty_smtpd(handler) as port:
        settings = settings_for(database_url, port)
        deliver(factory, settings, clock)
        assert statuses(factory) == ["sent", "sent", "failed", "sent"]
        handler.faults.clear()
        with unit_of_work(factory) as session:
            assert retry_campaign(session=session, campaign_id=cid, now=clock.now(), actor="t") == 1
        deliver(factory, settings, clock)
    assert statuses(factory) == ["sent"] * 4
    assert sorted(r[0] for _f, r, _b in handler.received) == sorted(
        f"person{i}@example.net" for i in range(4)
    )


def test_a_burst_of_failures_pauses_the_campaign_with_a_reason(
    factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """After failure_burst failures in a row the campaign pauses; the rest stay queued."""
    cid = seed(factory, clock, 60)
    handler = FaultyHandler([Fault("MAIL", "451 4.7.0 rate limited")])
    with faulty_smtpd(handler) as port:
        settings = settings_for(database_url, port, failure_burst=10, batch_size=20, pool_size=2)
        report = deliver(factory, settings, clock)
    got = statuses(factory)
    assert got.count("deferred") < 20 and got.count("queued") > 40
    assert "claimed" not in got
    with unit_of_work(factory) as session:
        campaign = session.get(Campaign, cid)
        assert campaign.status == CampaignStatus.PAUSED
        # The pause comes at 10; a failure already in flight on the other connection may add one.
        run = re.search(r"after (\d+) failed deliveries in a row", campaign.pause_reason)
        assert run is not None and 10 <= int(run.group(1)) <= 10 + 2
        assert "451" in campaign.pause_reason
    assert cid in report.paused


def test_unsubscribe_during_sending_is_honoured_for_unsent_mail(
    factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """Someone who leaves after enqueue but before their claim gets nothing."""
    seed(factory, clock, 10)
    with unit_of_work(factory) as session:
        session.execute(
            update(Subscription)
            .where(Subscription.subscriber_id.in_([3, 7]))
            .values(status=SubscriptionStatus.UNSUBSCRIBED)
        )
    handler = FaultyHandler()
    with faulty_smtpd(handler) as port:
        report = deliver(factory, settings_for(database_url, port), clock)
    got = statuses(factory)
    assert got.count("suppressed") == 2 and report.suppressed == 2
    rcpts = {r[0] for _f, r, _b in handler.received}
    assert len(rcpts) == 8 and not rcpts & {"person2@example.net", "person6@example.net"}


def test_paused_campaign_is_not_claimed_and_resume_sends_only_the_rest(
    factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """A paused campaign sends nothing; after resume each person gets exactly one message."""
    from newsletter.campaigns import resume_campaign

    cid = seed(factory, clock, 5)
    handler = FaultyHandler()
    with faulty_smtpd(handler) as port:
        settings = settings_for(database_url, port)
        with unit_of_work(factory) as session:
            pause_campaign(session=session, campaign_id=cid, now=clock.now(), actor="t", reason="x")
        assert deliver(factory, settings, clock).sent == 0
        with unit_of_work(factory) as session:
            resume_campaign(session=session, campaign_id=cid, now=clock.now(), actor="t")
        deliver(factory, settings, clock)
        deliver(factory, settings, clock)
    assert sorted(r[0] for _f, r, _b in handler.received) == [
        f"person{i}@example.net" for i in range(5)
    ]


def test_a_stop_request_releases_claims_never_attempted(
    factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """A stop lets in-flight mail finish, releases the rest of the batch, loses nobody."""
    seed(factory, clock, 30)
    control = SendControl()
    handler = FaultyHandler()
    with faulty_smtpd(handler) as port:
        settings = settings_for(database_url, port, pool_size=1)
        seen: list[int] = []

        def stop_after_five(batch: SendReport) -> None:
            seen.append(batch.sent)
            if sum(seen) >= 5:
                control.request_stop()

        report = deliver(factory, settings, clock, control=control, on_batch=stop_after_five)
        got = statuses(factory)
        assert report.stopped and "claimed" not in got
        assert got.count("sent") == len(handler.received) == report.sent
        assert got.count("queued") == 30 - report.sent == report.released
        deliver(factory, settings, clock)
    assert len(handler.received) == 30 == len({r[0] for _f, r, _b in handler.received})


def test_an_expired_lease_is_reclaimed_with_the_same_message_id(
    factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """Rows claimed by a dead worker go out after the lease, carrying the same Message-ID."""
    seed(factory, clock, 3)
    handler = FaultyHandler()
    with faulty_smtpd(handler) as port:
        settings = settings_for(database_url, port)
        deliver(factory, settings, clock)
        first = [m["Message-ID"] for m in handler.messages()]
        with unit_of_work(factory) as session:  # as if a worker claimed them again and died
            session.execute(
                update(Delivery).values(
                    status=DeliveryStatus.CLAIMED, lease_until=clock.now() + timedelta(seconds=60)
                )
            )
            session.execute(update(Campaign).values(status=CampaignStatus.RUNNING))
        assert deliver(factory, settings, clock).sent == 0
        clock.advance(seconds=61)
        assert deliver(factory, settings, clock).sent == 3
    again = [m["Message-ID"] for m in handler.messages()[3:]]
    assert sorted(first) == sorted(again)


def test_relays_share_the_mail_by_weight_and_hourly_cap(
    factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """A relay at its hourly cap takes no more; the others carry the rest, recorded per row."""
    from newsletter.config import RelaySettings

    seed(factory, clock, 12)
    capped, spare = FaultyHandler(), FaultyHandler()
    with faulty_smtpd(capped) as p1, faulty_smtpd(spare) as p2:
        settings = settings_for(
            database_url,
            p1,
            hourly_limit=3,
            relays=(RelaySettings(host="127.0.0.1", port=p2, name="spare", weight=1),),
        )
        deliver(factory, settings, clock)
    assert len(capped.received) <= 3 and len(capped.received) + len(spare.received) == 12
    with unit_of_work(factory) as session:
        relays = session.scalars(select(Delivery.relay)).all()
    assert relays.count("spare") == len(spare.received)
