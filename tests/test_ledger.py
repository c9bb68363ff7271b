"""The ledger's writer on SQLite and PostgreSQL: outcomes, back-off, suppression, pauses."""

from __future__ import annotations

import asyncio
import random
from datetime import timedelta

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from newsletter.clock import FrozenClock
from newsletter.config import Settings
from newsletter.db import unit_of_work
from newsletter.db.models import (
    Campaign,
    CampaignStatus,
    Delivery,
    DeliveryStatus,
    Event,
    Subscriber,
    SubscriberStatus,
    Suppression,
)
from newsletter.db.queries import claim_batch, release_claims
from newsletter.ledger import LedgerWriter, Recorded, retry_delay
from newsletter.send import Job
from newsletter.smtp import Outcome, Result
from newsletter.suppression import hash_address
from tests.conftest import SECRET, make_settings
from tests.test_send import seed

SENT = Outcome(Result.SENT, "250 2.0.0 Ok: queued", 250, relay="main")
LATER = Outcome(Result.TEMPORARY, "451 4.7.1 greylisted", 451, relay="main")
NO_SUCH_USER = Outcome(
    Result.PERMANENT, "550 5.1.1 <person2@example.net>: no such user", 550, True, "main"
)
SPAM = Outcome(Result.PERMANENT, "554 5.7.1 looks like spam", 554, False, "main")


def claimed_jobs(factory: sessionmaker[Session], clock: FrozenClock, n: int) -> list[Job]:
    """n people of a running campaign, their deliveries claimed by worker "w"."""
    seed(factory, clock, n)
    with unit_of_work(factory) as session:
        ids = claim_batch(
            session, now=clock.now(), lease_seconds=60, limit=n, campaign_id=None, worker="w"
        )
        rows = session.scalars(select(Delivery).where(Delivery.id.in_(ids)).order_by(Delivery.id))
        return [
            Job(
                delivery_id=d.id,
                campaign_id=d.campaign_id,
                subscriber_id=d.subscriber_id,
                email=f"person{i}@example.net",
                attempts=d.attempts,
                retry_from=d.created_at,
                envelope_from="bounces@example.org",
                message=b"",
            )
            for i, d in enumerate(rows)
        ]


def write(
    factory: sessionmaker[Session],
    settings: Settings,
    clock: FrozenClock,
    items: list[tuple[Job, Outcome, str | None]],
) -> list[Recorded]:
    """Submit every outcome at once, as lanes finishing together do; the writer's reports."""

    async def run() -> list[Recorded]:
        writer = LedgerWriter(factory=factory, settings=settings, clock=clock, rng=random.Random(7))
        try:
            done = await asyncio.gather(
                *(writer.submit(job, outcome, pause=pause) for job, outcome, pause in items)
            )
        finally:
            await writer.close()
        return [report for reports in done for report in reports]

    return asyncio.run(run())


def delivery(factory: sessionmaker[Session], delivery_id: int) -> Delivery:
    with unit_of_work(factory) as session:
        found = session.get(Delivery, delivery_id)
        assert found is not None
        session.expunge(found)
        return found


def test_each_outcome_is_committed_before_submit_returns(
    factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """2xx sent, 4xx deferred with back-off, 5xx failed: visible to another session at once."""
    settings = make_settings(database_url)
    sent, later, spam = claimed_jobs(factory, clock, 3)
    reports = write(
        factory, settings, clock, [(sent, SENT, None), (later, LATER, None), (spam, SPAM, None)]
    )
    assert (sum(r.sent for r in reports), sum(r.deferred for r in reports)) == (1, 1)
    assert sum(r.failed for r in reports) == 1
    done = delivery(factory, sent.delivery_id)
    assert (done.status, done.sent_at, done.relay) == (DeliveryStatus.SENT, clock.now(), "main")
    assert done.claimed_by is None and done.lease_until is None
    deferred = delivery(factory, later.delivery_id)
    base = timedelta(seconds=settings.smtp.retry_base_seconds)
    assert deferred.status == DeliveryStatus.DEFERRED
    assert clock.now() + base * 0.5 <= deferred.next_attempt_at <= clock.now() + base * 1.5
    refused = delivery(factory, spam.delivery_id)
    assert (refused.status, refused.last_reply) == (DeliveryStatus.FAILED, SPAM.reply)
    with unit_of_work(factory) as session:  # a refusal of the message is not of the mailbox
        assert session.scalar(select(Suppression.id)) is None


def test_a_refused_mailbox_is_failed_bounced_and_suppressed_without_its_address(
    factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """A 5xx at RCPT fails the delivery, bounces the person and keeps only a keyed hash."""
    settings = make_settings(database_url)
    *_, refused = claimed_jobs(factory, clock, 3)
    write(factory, settings, clock, [(refused, NO_SUCH_USER, None)])
    row = delivery(factory, refused.delivery_id)
    assert row.status == DeliveryStatus.FAILED
    assert row.last_reply == "550 5.1.1 <<recipient>>: no such user"
    with unit_of_work(factory) as session:
        person = session.get(Subscriber, refused.subscriber_id)
        assert person is not None and person.status == SubscriberStatus.BOUNCED
        hashes = session.scalars(select(Suppression.email_hash)).all()
        assert hashes == [hash_address(refused.email, secret=SECRET)]
        [event] = session.scalars(select(Event).where(Event.action == "subscriber.bounced"))
        assert refused.email not in str(event.detail)
    write(factory, settings, clock, [])  # nothing to write is nothing written
    with unit_of_work(factory) as session:
        assert len(session.scalars(select(Suppression.id)).all()) == 1


def test_back_off_doubles_per_attempt_and_a_deferral_past_the_deadline_fails(
    factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """The third 4xx waits about four base delays; a 4xx after the retry deadline is final."""
    settings = make_settings(database_url)
    third, late = claimed_jobs(factory, clock, 2)
    third = Job(**{**third.__dict__, "attempts": 3})
    deadline = timedelta(hours=settings.smtp.retry_deadline_hours)
    late = Job(**{**late.__dict__, "retry_from": clock.now() - deadline - timedelta(seconds=1)})
    reports = write(factory, settings, clock, [(third, LATER, None), (late, LATER, None)])
    assert [(r.deferred, r.failed) for r in reports] == [(1, 1)]
    base = timedelta(seconds=settings.smtp.retry_base_seconds)
    wait = delivery(factory, third.delivery_id).next_attempt_at - clock.now()
    assert base * 4 * 0.5 <= wait <= base * 4 * 1.5
    assert delivery(factory, late.delivery_id).status == DeliveryStatus.FAILED


@pytest.mark.parametrize(
    ("attempts", "low", "high"),
    [
        pytest.param(1, 30, 90, id="first"),
        pytest.param(2, 60, 180, id="second"),
        pytest.param(5, 480, 1440, id="fifth"),
        pytest.param(40, 6 * 3600 * 0.5, 6 * 3600 * 1.5, id="capped-at-six-hours"),
    ],
)
def test_retry_delay_is_exponential_with_jitter_and_capped(
    attempts: int, low: float, high: float
) -> None:
    """base·2^(n-1) times 0.5–1.5, the doubling capped at six hours."""
    rng = random.Random(3)
    delays = [retry_delay(attempts, base_seconds=60, rng=rng).total_seconds() for _ in range(50)]
    assert all(low <= d <= high for d in delays)
    assert max(delays) - min(delays) > (high - low) / 4  # jittered, not one fixed delay


def test_outcomes_that_arrive_together_share_one_commit(
    factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """Twenty lanes finishing in the same tick are written by one commit, not twenty."""
    jobs = claimed_jobs(factory, clock, 20)
    reports = write(factory, make_settings(database_url), clock, [(j, SENT, None) for j in jobs])
    # The first submit yields once before it writes, so the other nineteen join its commit.
    assert [r.sent for r in reports] == [20]
    with unit_of_work(factory) as session:
        assert set(session.scalars(select(Delivery.status))) == {DeliveryStatus.SENT}


def test_a_pause_is_committed_with_the_outcome_that_carries_it(
    factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """A burst's pause lands with its outcome; a campaign no longer running is left as it is."""
    settings = make_settings(database_url)
    first, second = claimed_jobs(factory, clock, 2)
    reports = write(factory, settings, clock, [(first, LATER, "paused after 1 failure")])
    assert reports[0].paused == {first.campaign_id: "paused after 1 failure"}
    with unit_of_work(factory) as session:
        campaign = session.get(Campaign, first.campaign_id)
        assert campaign is not None and campaign.status == CampaignStatus.PAUSED
        assert campaign.pause_reason == "paused after 1 failure"
    assert delivery(factory, first.delivery_id).status == DeliveryStatus.DEFERRED
    with unit_of_work(factory) as session:
        session.execute(update(Campaign).values(status=CampaignStatus.CANCELLED))
    reports = write(factory, settings, clock, [(second, LATER, "paused again")])
    assert reports[0].paused == {}
    with unit_of_work(factory) as session:
        assert session.scalar(select(Campaign.status)) == CampaignStatus.CANCELLED


def test_an_outcome_never_overwrites_a_row_that_is_no_longer_claimed(
    factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """A row released (and perhaps claimed elsewhere) keeps its state: the write is guarded."""
    [job] = claimed_jobs(factory, clock, 1)
    with unit_of_work(factory) as session:
        assert release_claims(session, [job.delivery_id], worker="w") == 1
    write(factory, make_settings(database_url), clock, [(job, SENT, None)])
    row = delivery(factory, job.delivery_id)
    assert (row.status, row.sent_at) == (DeliveryStatus.QUEUED, None)
