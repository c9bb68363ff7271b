"""The sender: claim a batch, re-check who may still be mailed, build, send, record.

A batch is claimed in one short transaction, sent concurrently over the transport's
connections, and its outcomes recorded in another. A row is marked sent only after the SMTP
server accepted it; a worker that dies leaves its rows to be claimed again when the lease ends.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from newsletter.campaigns import finish_if_done, running_campaign_ids
from newsletter.clock import Clock
from newsletter.config import Settings
from newsletter.db import unit_of_work
from newsletter.db.models import (
    Campaign,
    Delivery,
    DeliveryStatus,
    Event,
    MailingList,
    Subscriber,
    SubscriberStatus,
    Subscription,
    SubscriptionStatus,
    Suppression,
    Variant,
)
from newsletter.db.queries import claim_batch
from newsletter.message import ListInfo, Recipient, build_message
from newsletter.render import RenderedVariant
from newsletter.smtp import Outcome, Result, Transport
from newsletter.tokens import hash_address

MAX_BACKOFF = timedelta(hours=6)


@dataclass
class SendReport:
    sent: int = 0
    deferred: int = 0
    failed: int = 0
    suppressed: int = 0
    finished: list[int] = field(default_factory=list)

    def add(self, other: SendReport) -> None:
        self.sent += other.sent
        self.deferred += other.deferred
        self.failed += other.failed
        self.suppressed += other.suppressed
        self.finished += other.finished


@dataclass(frozen=True)
class Job:
    delivery_id: int
    campaign_id: int
    recipient: Recipient
    message: bytes


def retry_delay(attempts: int, *, base_seconds: int, rng: random.Random) -> timedelta:
    """Exponential back-off with jitter: base·2^(n-1), times 0.5–1.5, at most six hours."""
    delay = timedelta(seconds=base_seconds * 2 ** max(attempts - 1, 0))
    return min(delay, MAX_BACKOFF) * rng.uniform(0.5, 1.5)


class VariantCache:
    """Rendered variants, loaded once per (campaign, language) for the life of a worker."""

    def __init__(self) -> None:
        self._cache: dict[tuple[int, str], RenderedVariant] = {}

    def get(
        self, session: Session, campaign_id: int, lang: str, default_lang: str
    ) -> RenderedVariant:
        """The variant in this language, else the default language's."""
        for want in (lang, default_lang):
            key = (campaign_id, want)
            if key not in self._cache:
                row = session.scalar(
                    select(Variant).where(Variant.campaign_id == campaign_id, Variant.lang == want)
                )
                if row is None:
                    continue
                self._cache[key] = RenderedVariant(
                    lang=row.lang, subject=row.subject, html=row.html, text=row.text
                )
            return self._cache[key]
        raise LookupError(f"campaign {campaign_id} has no rendered variant")


def prepare_jobs(
    session: Session, ids: list[int], *, settings: Settings, variants: VariantCache, now: datetime
) -> tuple[list[Job], int]:
    """Build messages for claimed rows; people who left since enqueue are marked suppressed."""
    rows = session.execute(
        select(Delivery, Subscriber, Subscription.status, Campaign, MailingList)
        .join(Subscriber, Subscriber.id == Delivery.subscriber_id)
        .join(Campaign, Campaign.id == Delivery.campaign_id)
        .join(MailingList, MailingList.id == Campaign.list_id)
        .outerjoin(
            Subscription,
            (Subscription.subscriber_id == Subscriber.id)
            & (Subscription.list_id == Campaign.list_id),
        )
        .where(Delivery.id.in_(ids))
    ).all()
    jobs, gone = [], []
    for delivery, sub, sub_status, campaign, ml in rows:
        if sub.status != SubscriberStatus.ACTIVE or sub_status != SubscriptionStatus.ACTIVE:
            gone.append(delivery.id)
            continue
        variant = variants.get(session, campaign.id, sub.language, settings.render.default_language)
        recipient = Recipient(subscriber_id=sub.id, email=sub.email, name=sub.name)
        msg = build_message(
            variant=variant,
            campaign_id=campaign.id,
            recipient=recipient,
            mlist=ListInfo(ml.id, ml.slug, ml.list_id),
            settings=settings,
            now=now,
        )
        jobs.append(Job(delivery.id, campaign.id, recipient, msg.as_bytes()))
    if gone:
        session.execute(
            update(Delivery)
            .where(Delivery.id.in_(gone))
            .values(
                status=DeliveryStatus.SUPPRESSED, lease_until=None, last_reply="left before sending"
            )
        )
    return jobs, len(gone)


async def send_jobs(jobs: list[Job], *, transport: Transport, sender: str) -> list[Outcome]:
    """Send every job concurrently; the transport bounds how many are in flight."""
    return list(
        await asyncio.gather(
            *(
                transport.send(job.message, sender=sender, recipient=job.recipient.email)
                for job in jobs
            )
        )
    )


def record_outcomes(
    session: Session,
    results: list[tuple[Job, Outcome]],
    *,
    settings: Settings,
    now: datetime,
    rng: random.Random,
) -> SendReport:
    """Write each outcome to its delivery row; suppress addresses refused for good."""
    report = SendReport()
    deadline = timedelta(hours=settings.smtp.retry_deadline_hours)
    for job, outcome in results:
        delivery = session.get(Delivery, job.delivery_id)
        if delivery is None or delivery.status != DeliveryStatus.CLAIMED:
            continue
        delivery.last_reply = outcome.reply[:1000]
        delivery.lease_until = None
        if outcome.result is Result.SENT:
            delivery.status, delivery.sent_at = DeliveryStatus.SENT, now
            report.sent += 1
        elif outcome.result is Result.TEMPORARY and now - delivery.created_at < deadline:
            delivery.status = DeliveryStatus.DEFERRED
            delivery.next_attempt_at = now + retry_delay(
                delivery.attempts, base_seconds=settings.smtp.retry_base_seconds, rng=rng
            )
            report.deferred += 1
        else:
            delivery.status = DeliveryStatus.FAILED
            report.failed += 1
            if outcome.result is Result.PERMANENT and outcome.recipient_level:
                suppress_bounced(
                    session, job.recipient, settings=settings, now=now, reply=outcome.reply
                )
    session.flush()
    return report


def suppress_bounced(
    session: Session, recipient: Recipient, *, settings: Settings, now: datetime, reply: str
) -> None:
    """Mark an address refused for good as bounced, so nothing is sent to it again."""
    session.execute(
        update(Subscriber)
        .where(Subscriber.id == recipient.subscriber_id)
        .values(status=SubscriberStatus.BOUNCED)
    )
    digest = hash_address(recipient.email, secret=settings.security.require_secret())
    if session.scalar(select(Suppression.id).where(Suppression.email_hash == digest)) is None:
        session.add(Suppression(email_hash=digest, reason="bounce", created_at=now))
    session.add(
        Event(
            at=now,
            actor="sender",
            action="subscriber.bounced",
            detail={"subscriber": recipient.subscriber_id, "reply": reply[:200]},
        )
    )


async def deliver_queued(
    *,
    factory: sessionmaker[Session],
    settings: Settings,
    transport: Transport,
    clock: Clock,
    campaign_id: int | None = None,
    on_batch: Callable[[SendReport], None] | None = None,
    rng: random.Random | None = None,
) -> SendReport:
    """Deliver every due delivery of running campaigns, batch by batch, then return."""
    rng = rng or random.Random()
    variants = VariantCache()
    total = SendReport()
    while True:
        with unit_of_work(factory) as session:
            ids = claim_batch(
                session,
                now=clock.now(),
                lease_seconds=settings.smtp.lease_seconds,
                limit=settings.smtp.batch_size,
                campaign_id=campaign_id,
            )
        if not ids:
            break
        with unit_of_work(factory) as session:
            jobs, gone = prepare_jobs(
                session, ids, settings=settings, variants=variants, now=clock.now()
            )
        outcomes = await send_jobs(jobs, transport=transport, sender=settings.mail.from_address)
        with unit_of_work(factory) as session:
            batch = record_outcomes(
                session,
                list(zip(jobs, outcomes, strict=True)),
                settings=settings,
                now=clock.now(),
                rng=rng,
            )
            batch.suppressed = gone
            for cid in sorted({job.campaign_id for job in jobs} | _campaigns_of(session, ids)):
                if finish_if_done(session=session, campaign_id=cid, now=clock.now()):
                    batch.finished.append(cid)
        total.add(batch)
        if on_batch:
            on_batch(batch)
    with unit_of_work(factory) as session:  # campaigns whose audience was empty
        for cid in running_campaign_ids(session):
            if finish_if_done(session=session, campaign_id=cid, now=clock.now()):
                total.finished.append(cid)
    return total


def _campaigns_of(session: Session, ids: list[int]) -> set[int]:
    return set(session.scalars(select(Delivery.campaign_id).where(Delivery.id.in_(ids)).distinct()))
