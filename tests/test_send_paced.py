"""A paced sender (rate_per_second, hourly_limit) keeps its promises while messages wait.

Pause and cancel stop messages already waiting for a rate or hourly slot, an unsubscribe holds
for a message claimed before it, and an alert goes before a digest's messages claimed earlier.
Against a real SMTP server, on SQLite and PostgreSQL; every assertion counts messages, none
times them.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

import newsletter.smtp
from newsletter.audience import enqueue_audience
from newsletter.campaigns import cancel_campaign, pause_campaign
from newsletter.clock import FrozenClock
from newsletter.config import Settings
from newsletter.db import unit_of_work
from newsletter.db.models import (
    Campaign,
    Delivery,
    MailingList,
    Subscriber,
    Subscription,
    Variant,
)
from newsletter.send import Job, JobQueue, Sender, SendReport
from newsletter.subscriptions import forget, unsubscribe
from tests.conftest import SECRET
from tests.sender_cli import wait_until
from tests.smtp_faults import FaultyHandler, faulty_smtpd
from tests.test_send import HTML, TEXT, deliver, seed, settings_for


@dataclass
class Running:
    """A sender run in a thread of its own, so the test can act while it sends."""

    thread: threading.Thread
    report: list[SendReport] = field(default_factory=list)
    error: list[BaseException] = field(default_factory=list)

    def join(self) -> SendReport:
        """Wait for the run to end by itself; its report."""
        self.thread.join(timeout=60)
        assert not self.thread.is_alive(), "the sender did not stop"
        if self.error:
            raise self.error[0]
        return self.report[0]


def start(factory: sessionmaker[Session], settings: Settings, clock: FrozenClock) -> Running:
    """Start one sender run (tests.test_send.deliver) in a thread."""

    def run() -> None:
        try:
            running.report.append(deliver(factory, settings, clock))
        except BaseException as error:  # handed to the test by join()
            running.error.append(error)

    running = Running(threading.Thread(target=run, daemon=True))
    running.thread.start()
    return running


def counts(factory: sessionmaker[Session], cid: int) -> tuple[str, Counter[str]]:
    """The campaign's status and its deliveries by status."""
    with unit_of_work(factory) as session:
        status = str(session.scalar(select(Campaign.status).where(Campaign.id == cid)))
        rows = session.scalars(select(Delivery.status).where(Delivery.campaign_id == cid))
        return status, Counter(str(s) for s in rows)


def recipients(handler: FaultyHandler) -> list[str]:
    with handler.lock:
        return [rcpts[0] for _sender, rcpts, _raw in handler.received]


@pytest.mark.parametrize("verb", ["pause", "cancel"])
def test_a_pause_stops_messages_waiting_for_a_rate_slot(
    factory: sessionmaker[Session], clock: FrozenClock, database_url: str, verb: str
) -> None:
    """Ten connections at 2 messages a second: nearly every lane waits for the rate with a
    message in hand. After the pause (or cancel) at most about a second's worth goes: not the
    ten messages already waiting."""
    cid = seed(factory, clock, 30)
    handler = FaultyHandler()
    with faulty_smtpd(handler) as port:
        settings = settings_for(database_url, port, rate_per_second=2.0, pool_size=10)
        running = start(factory, settings, clock)
        assert wait_until(lambda: len(handler.received) >= 3, seconds=30)
        with unit_of_work(factory) as session:
            if verb == "pause":
                pause_campaign(
                    session=session, campaign_id=cid, now=clock.now(), actor="t", reason="t"
                )
            else:
                cancel_campaign(session=session, campaign_id=cid, now=clock.now(), actor="t")
        at_stop = len(handler.received)
        report = running.join()
    sent = len(handler.received)
    # The watcher reads states twice a second: one message in flight, two slots of 0.5 s, and
    # slack for a loaded machine; before, every lane's waiting message went (ten).
    assert sent - at_stop <= 6, (at_stop, sent)
    status, by_status = counts(factory, cid)
    assert status == ("paused" if verb == "pause" else "cancelled")
    assert by_status == Counter(sent=sent, queued=30 - sent) and report.sent == sent
    assert len(set(recipients(handler))) == sent


def test_a_cancel_stops_messages_waiting_for_the_hourly_cap(
    factory: sessionmaker[Session],
    clock: FrozenClock,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two messages an "hour" (3 s here): the lanes wait for the cap with messages in hand; a
    cancel sends them back, and none goes when the cap frees."""
    monkeypatch.setattr(newsletter.smtp, "HOUR", 3.0)
    cid = seed(factory, clock, 8)
    handler = FaultyHandler()
    with faulty_smtpd(handler) as port:
        settings = settings_for(database_url, port, hourly_limit=2, pool_size=3)
        running = start(factory, settings, clock)
        assert wait_until(lambda: len(handler.received) >= 2, seconds=30)
        with unit_of_work(factory) as session:
            cancel_campaign(session=session, campaign_id=cid, now=clock.now(), actor="t")
        report = running.join()
    assert len(handler.received) == 2 == report.sent
    assert counts(factory, cid) == ("cancelled", Counter(sent=2, queued=6))


def test_an_unsubscribe_holds_for_messages_claimed_before_it(
    factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """Eight connections at 2 messages a second hold claimed messages for seconds. Everyone
    not yet mailed unsubscribes: at most about a second's worth still goes, the rest are
    skipped as people who left (not sent, not failed, not queued again)."""
    cid = seed(factory, clock, 16)
    handler = FaultyHandler()
    with faulty_smtpd(handler) as port:
        settings = settings_for(database_url, port, rate_per_second=2.0, pool_size=8)
        running = start(factory, settings, clock)
        assert wait_until(lambda: len(handler.received) >= 2, seconds=30)
        with unit_of_work(factory) as session:
            mailed = set(recipients(handler))
            for sid, email in session.execute(select(Subscriber.id, Subscriber.email)):
                if email not in mailed:
                    unsubscribe(
                        session=session,
                        subscriber_id=sid,
                        list_id=None,
                        now=clock.now(),
                        actor="reader",
                    )
        at_unsubscribe = len(mailed)
        report = running.join()
    sent = len(handler.received)
    assert sent - at_unsubscribe <= 6, (at_unsubscribe, sent)  # before: all 14 went
    status, by_status = counts(factory, cid)
    assert by_status == Counter(sent=sent, suppressed=16 - sent)
    assert status == "finished" and report.sent == sent and report.suppressed == 16 - sent
    with unit_of_work(factory) as session:
        replies = session.scalars(
            select(Delivery.last_reply).where(Delivery.status == "suppressed")
        )
        assert set(replies) == {"left before sending"}


def test_a_reader_forgotten_after_the_claim_is_not_mailed(
    factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """Review: a forgotten reader's deliveries are deleted with them, and the look again at a
    claim took a row that was not found for one still to be mailed: 10 of 14 forgotten readers
    were mailed. A row gone is a reader gone."""
    seed(factory, clock, 16)
    handler = FaultyHandler()
    with faulty_smtpd(handler) as port:
        settings = settings_for(database_url, port, rate_per_second=2.0, pool_size=8)
        running = start(factory, settings, clock)
        assert wait_until(lambda: len(handler.received) >= 2, seconds=30)
        with unit_of_work(factory) as session:
            mailed = set(recipients(handler))
            for email in session.scalars(select(Subscriber.email)):
                if email and email not in mailed:
                    forget(session=session, email=email, secret=SECRET, now=clock.now(), actor="t")
        at_forget = len(mailed)
        report = running.join()
    assert len(handler.received) - at_forget <= 6, (at_forget, len(handler.received))
    assert report.sent == len(handler.received)


def test_a_paced_sender_looks_again_once_per_message_at_most(
    factory: sessionmaker[Session],
    clock: FrozenClock,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Review: at 2 messages a second, every waiting lane woke at each free slot, found its
    look at the readers old, read the database again and built its message again: 8 reads a
    message at 1 msg/s. Only the message that has its slot looks again now, and each message is
    built once."""
    reads: list[int] = []
    original = Sender._who_left

    def counted(self: Sender, ids: list[int]) -> set[int]:
        reads.append(len(ids))
        return original(self, ids)

    monkeypatch.setattr(Sender, "_who_left", counted)
    builds: list[int] = []
    build = Job.payload

    def built(self: Job) -> bytes:
        builds.append(self.delivery_id)
        return build(self)

    monkeypatch.setattr(Job, "payload", built)
    cid = seed(factory, clock, 12)
    handler = FaultyHandler()
    with faulty_smtpd(handler) as port:
        settings = settings_for(database_url, port, rate_per_second=2.0, pool_size=20)
        report = start(factory, settings, clock).join()
    assert report.sent == 12 == len(handler.received)
    assert counts(factory, cid) == ("finished", Counter(sent=12))
    assert len(reads) <= 12, reads  # one a message at most; before, 14 and more
    assert sorted(builds) == sorted(set(builds)) and len(builds) == 12  # each built once


def add_alert(factory: sessionmaker[Session], clock: FrozenClock, readers: int) -> int:
    """A running alert to the first `readers` people (an alerts list of their own)."""
    now = clock.now()
    with unit_of_work(factory) as session:
        ml = MailingList(slug="alerts", name="Alerts", kind="alerts", list_id="alerts.example.org")
        session.add(ml)
        session.flush()
        ids = session.scalars(select(Subscriber.id).order_by(Subscriber.id).limit(readers))
        session.add_all(
            Subscription(subscriber_id=i, list_id=ml.id, status="active", created_at=now)
            for i in ids
        )
        alert = Campaign(
            kind="alert", list_id=ml.id, dedupe_key="alert", created_at=now, status="running"
        )
        session.add(alert)
        session.flush()
        for lang in ("en", "ru"):
            session.add(
                Variant(campaign_id=alert.id, lang=lang, subject="URGENT", html=HTML, text=TEXT)
            )
        enqueue_audience(session, campaign=alert, now=now)
        return alert.id


@pytest.mark.parametrize(
    ("rate", "pool", "digest_size", "most_before"),
    [
        # Two lanes at 10 a second, the digest claimed long ago: the alert's messages waited
        # behind every claimed digest message (over 30). About 1.5 s at most, with slack.
        (10.0, 2, 40, 20),
        # Review: twenty lanes at 4 a second, each holding a digest message waiting for the
        # rate, competed with the alert's for each free slot (7 to 39 went first). A digest
        # lane now gives its message back while an alert's waits in the queue, and lets an
        # alert's message waiting for the rate take the slot: the watcher's look and a claim.
        (4.0, 20, 60, 4),
    ],
)
def test_an_alert_goes_before_a_paced_digests_messages(
    factory: sessionmaker[Session],
    clock: FrozenClock,
    database_url: str,
    rate: float,
    pool: int,
    digest_size: int,
    most_before: int,
) -> None:
    """A digest sends under a rate limit; an alert launched meanwhile goes within about a
    second, not after the digest messages claimed or held by the lanes."""
    digest = seed(factory, clock, digest_size)
    handler = FaultyHandler()
    with faulty_smtpd(handler) as port:
        settings = settings_for(database_url, port, rate_per_second=rate, pool_size=pool)
        running = start(factory, settings, clock)
        assert wait_until(lambda: len(handler.received) >= 3, seconds=30)
        alert = add_alert(factory, clock, 3)
        launched = len(handler.received)
        running.join()
    with handler.lock:
        urgent = [n for n, (_s, _r, raw) in enumerate(handler.received) if b"URGENT" in raw]
    assert len(urgent) == 3
    assert urgent[0] - launched <= most_before, (launched, urgent)
    assert counts(factory, digest) == ("finished", Counter(sent=digest_size))
    assert counts(factory, alert) == ("finished", Counter(sent=3))
    assert len(handler.received) == digest_size + 3


def job(n: int, campaign_id: int) -> Job:
    """A job for delivery n (only the queue handles it)."""
    return Job(
        n,
        campaign_id,
        n,
        f"reader{n}@example.net",
        0,
        datetime(2026, 12, 6, tzinfo=UTC),
        "b@x",
        b"",
    )


def test_urgent_jobs_are_taken_before_every_job_waiting() -> None:
    """Alert jobs put after a digest's go first, to a lane's take and to its pipelined next."""

    async def go() -> list[int]:
        queue = JobQueue()
        queue.put(job(n, 1) for n in range(1, 4))
        queue.put([job(10, 2), job(11, 2)], urgent=True)
        everything: Callable[[Job], bool] = lambda _job: True  # noqa: E731
        first = await queue.take()
        second = queue.take_next(everything)
        rest = [await queue.take() for _ in range(3)]
        return [j.delivery_id for j in (first, second, *rest) if j is not None]

    assert asyncio.run(go()) == [10, 11, 1, 2, 3]
