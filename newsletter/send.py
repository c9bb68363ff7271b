"""The sender: claim a batch, re-check who may still be mailed, build, send, record.

A batch is claimed in one short transaction (with a lease, and this worker's name), then sent over
as many lanes as the transport has connections. Each lane records its message's outcome, committed
together with whatever other lanes finished meanwhile, before it sends the next one: a sender
killed at any moment leaves at most one accepted-but-unrecorded message per connection, and that
one goes again with the same Message-ID. A watcher re-reads the campaigns' states twice a second
(pause, cancel) and renews the leases of live claims. Claims never attempted are released.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import Connection, select, update
from sqlalchemy.orm import Session, sessionmaker

from newsletter.bounces import verp_address
from newsletter.campaigns import finish_if_done, pause_campaign, running_campaign_ids
from newsletter.clock import Clock
from newsletter.config import Settings
from newsletter.db import unit_of_work
from newsletter.db.models import (
    Campaign,
    CampaignKind,
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
from newsletter.db.queries import claim_batch, extend_leases, release_claims
from newsletter.dkim import DkimSigner
from newsletter.errors import PermanentDeliveryError
from newsletter.ledger import DELIVERIES, Job, SendReport, record_outcomes, retry_delay
from newsletter.message import ListInfo, MessageTemplate, Recipient
from newsletter.render import RenderedVariant
from newsletter.smtp import Outcome, Result, SmtpPool, Transport

__all__ = ["Job", "SendControl", "SendReport", "deliver_queued", "retry_delay", "worker_name"]

WATCH_SECONDS = 0.5


def worker_name() -> str:
    """A name for this sender process, unique enough to tell its claims from others'."""
    return f"{socket.gethostname()[:30]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass
class SendControl:
    """What may be sent right now: a stop request, and campaigns no longer running."""

    stopping: bool = False
    held: set[int] = field(default_factory=set)
    on_stop: list[Callable[[], None]] = field(default_factory=list)

    def request_stop(self) -> None:
        """Finish what is in flight, send nothing new (SIGTERM / SIGINT)."""
        self.stopping = True
        for callback in self.on_stop:
            callback()

    def may_send(self, campaign_id: int) -> bool:
        """Whether a message of this campaign may start now."""
        return not self.stopping and campaign_id not in self.held


class TemplateCache:
    """Message templates, built once per (campaign, language) for the life of a worker."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._cache: dict[tuple[int, str], MessageTemplate | None] = {}

    def get(self, session: Session, campaign_id: int, lang: str) -> MessageTemplate:
        """The template in this language, else the default language's."""
        for want in (lang, self._settings.render.default_language):
            key = (campaign_id, want)
            if key not in self._cache:
                self._cache[key] = self._build(session, campaign_id, want)
            if (found := self._cache[key]) is not None:
                return found
        raise LookupError(f"campaign {campaign_id} has no rendered variant")

    def _build(self, session: Session, campaign_id: int, lang: str) -> MessageTemplate | None:
        row = session.execute(
            select(Variant, MailingList)
            .join(Campaign, Campaign.id == Variant.campaign_id)
            .join(MailingList, MailingList.id == Campaign.list_id)
            .where(Variant.campaign_id == campaign_id, Variant.lang == lang)
        ).first()
        if row is None:
            return None
        v, ml = row
        return MessageTemplate.build(
            variant=RenderedVariant(v.lang, v.subject, v.html, v.text, v.link_nonce),
            campaign_id=campaign_id,
            mlist=ListInfo(ml.id, ml.slug, ml.list_id),
            settings=self._settings,
        )


def prepare_jobs(
    session: Session,
    ids: list[int],
    *,
    settings: Settings,
    templates: TemplateCache,
    signer: DkimSigner | None,
    now: datetime,
) -> tuple[list[Job], list[int]]:
    """Build messages for claimed rows; returns the jobs and the rows of people who left."""
    stmt = (
        select(
            Delivery.id,
            Delivery.campaign_id,
            Delivery.attempts,
            Delivery.created_at,
            Delivery.requeued_at,
            Subscriber.id,
            Subscriber.email,
            Subscriber.name,
            Subscriber.language,
            Subscriber.status,
            Subscription.status,
        )
        .join(Subscriber, Subscriber.id == Delivery.subscriber_id)
        .join(Campaign, Campaign.id == Delivery.campaign_id)
        .outerjoin(
            Subscription,
            (Subscription.subscriber_id == Subscriber.id)
            & (Subscription.list_id == Campaign.list_id),
        )
        .where(Delivery.id.in_(ids))
        .order_by(Delivery.id)
    )
    jobs, gone = [], []
    for (
        did,
        cid,
        attempts,
        created,
        requeued,
        sid,
        email,
        name,
        lang,
        status,
        sub,
    ) in session.execute(stmt):
        if status != SubscriberStatus.ACTIVE or sub != SubscriptionStatus.ACTIVE:
            gone.append(did)
            continue
        message, error = b"", ""
        try:
            message = templates.get(session, cid, lang).render(
                Recipient(sid, email, name), settings=settings, now=now
            )
            message = signer.sign(message) if signer else message
        except PermanentDeliveryError as e:
            error = str(e)
        envelope = verp_address(did, settings=settings)
        jobs.append(
            Job(did, cid, sid, email, attempts, requeued or created, envelope, message, error)
        )
    return jobs, gone


def mark_left(session: Session, ids: list[int]) -> None:
    """Deliveries to people who left the list (or bounced) since enqueue are not sent."""
    if ids:
        session.execute(
            update(DELIVERIES)
            .where(DELIVERIES.c.id.in_(ids))
            .values(
                status=DeliveryStatus.SUPPRESSED,
                lease_until=None,
                claimed_by=None,
                last_reply="left before sending",
            )
        )


class Recorder:
    """Commits outcomes as they come, in a database thread, grouping those that arrive together.

    While one group is being written, the outcomes that arrive meanwhile wait for the next
    commit, so the event loop keeps serving the connections and commits grow with the load.
    """

    def __init__(self, sender: Sender) -> None:
        self._sender = sender
        self._pending: list[tuple[Job, Outcome, asyncio.Future[None]]] = []
        self._flushing = False

    async def record(self, job: Job, outcome: Outcome) -> None:
        """Return once this outcome is committed."""
        done = asyncio.get_running_loop().create_future()
        self._pending.append((job, outcome, done))
        if not self._flushing:
            self._flushing = True
            try:
                await asyncio.sleep(0)  # let lanes finishing in the same tick join this commit
                while self._pending:
                    group, self._pending = self._pending, []
                    try:
                        await self._sender.write([(j, o) for j, o, _ in group])
                    except BaseException as error:
                        self._fail(group + self._pending, error, done)
                        self._pending = []
                        raise
                    for _j, _o, fut in group:
                        fut.set_result(None)
            finally:
                self._flushing = False
        await done

    @staticmethod
    def _fail(
        waiting: list[tuple[Job, Outcome, asyncio.Future[None]]],
        error: BaseException,
        own: asyncio.Future[None],
    ) -> None:
        for _j, _o, fut in waiting:
            if fut is not own and not fut.done():
                fut.set_exception(RecordError(error))


class RecordError(Exception):
    """Another lane's commit failed; this lane's outcome was not recorded either."""


class Sender:
    """One worker's delivery loop; `deliver_queued` is its public face.

    A producer claims and prepares the next batch (in a database thread) while the lanes are
    still sending the current one, so the connections never wait for a claim.
    """

    def __init__(
        self,
        *,
        factory: sessionmaker[Session],
        settings: Settings,
        transport: Transport,
        clock: Clock,
        control: SendControl,
        worker: str,
        campaign_id: int | None,
        rng: random.Random,
        signer: DkimSigner | None,
        on_batch: Callable[[SendReport], None] | None,
    ) -> None:
        self.factory, self.settings, self.transport = factory, settings, transport
        self.clock, self.control, self.worker = clock, control, worker
        self.campaign_id, self.rng, self.signer, self.on_batch = campaign_id, rng, signer, on_batch
        self.templates = TemplateCache(settings)
        self.recorder = Recorder(self)
        self.total = SendReport()
        self.streaks: dict[int, int] = {}
        self.pausing: set[int] = set()  # paused for a failure burst, not yet committed
        self.active: set[int] = set()
        self.lanes = max(sum(r.pool_size for r in settings.smtp.all_relays() if r.weight > 0), 1)
        self.queue: deque[Job] = deque()
        self.unstarted: list[Job] = []
        self.outstanding: set[int] = set()  # claimed by this run, not yet recorded or released
        self.in_flight = 0
        self.producing = True
        self.changed = asyncio.Condition()
        # Outcomes are written by one thread through one long-lived session: a new session per
        # commit cost twice the commit itself at thousands of commits a second.
        self.ledger = ThreadPoolExecutor(1, thread_name_prefix="ledger")
        self.ledger_session: Session | None = None
        self.ledger_connection: Connection
        control.on_stop.append(transport.interrupt)
        control.on_stop.append(self._poke_threadsafe)

    async def run(self) -> SendReport:
        """Claim, send and record batch after batch until nothing is due or a stop is asked."""
        self.loop = asyncio.get_running_loop()
        watcher = asyncio.create_task(self._watch())
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._produce())
                for _ in range(self.lanes):
                    group.create_task(self._lane())
        except BaseExceptionGroup as failed:
            self._release(sorted(self.outstanding))  # claimed by us and never recorded
            raise _first_cause(failed) from None
        except BaseException:
            self._release(sorted(self.outstanding))
            raise
        finally:
            watcher.cancel()
            self.control.on_stop.remove(self._poke_threadsafe)
            await self.loop.run_in_executor(self.ledger, self._close_ledger)
            self.ledger.shutdown(wait=True)
        self._release_unstarted()
        with unit_of_work(self.factory) as session:  # campaigns with nothing left (or no audience)
            for cid in running_campaign_ids(session):
                if self.campaign_id in (None, cid) and self._finish(session, cid):
                    self.total.finished.append(cid)
        self.total.stopped = self.control.stopping
        return self.total

    # --- the producer: claim and prepare ahead of the lanes ---------------------------------

    async def _produce(self) -> None:
        limit = self.settings.smtp.batch_size
        try:
            while not self.control.stopping:
                self._release_unstarted()  # e.g. a campaign resumed meanwhile: claim them again
                ids, jobs, gone, alerts = await asyncio.to_thread(self._claim_and_prepare, limit)
                if not ids:
                    return
                self._report(SendReport(suppressed=gone))
                async with self.changed:
                    self.queue.extend(jobs)
                    self.changed.notify_all()
                    # Nothing more due: let them finish, then close campaigns. An alert's batch
                    # goes out whole before anything claimed after it starts.
                    if len(ids) < limit or alerts:
                        await self.changed.wait_for(self._idle)
                    else:  # claim the next batch when half of this one has gone out
                        await self.changed.wait_for(
                            lambda: len(self.queue) <= limit // 2 or self.control.stopping
                        )
                if len(ids) < limit:
                    self._finish_done({job.campaign_id for job in jobs})
        finally:
            async with self.changed:
                self.producing = False
                self.changed.notify_all()

    def _claim_and_prepare(self, limit: int) -> tuple[list[int], list[Job], int, bool]:
        """Claim a batch in one short transaction, then build its messages (a database thread)."""
        with unit_of_work(self.factory) as session:
            ids = claim_batch(
                session,
                now=self.clock.now(),
                lease_seconds=self.settings.smtp.lease_seconds,
                limit=limit,
                campaign_id=self.campaign_id,
                worker=self.worker,
            )
        self.outstanding.update(ids)
        if not ids:
            return ids, [], 0, False
        with unit_of_work(self.factory) as session:
            jobs, gone = prepare_jobs(
                session,
                ids,
                settings=self.settings,
                templates=self.templates,
                signer=self.signer,
                now=self.clock.now(),
            )
            mark_left(session, gone)
            cids = {job.campaign_id for job in jobs}
            is_alert = Campaign.kind == CampaignKind.ALERT
            alerts = session.scalar(select(Campaign.id).where(Campaign.id.in_(cids), is_alert))
        self.outstanding.difference_update(gone)
        self.active |= cids
        return ids, jobs, len(gone), alerts is not None

    def _idle(self) -> bool:
        return not self.queue and self.in_flight == 0

    # --- the lanes: one message at a time each, recorded before the next --------------------

    async def _lane(self) -> None:
        while True:
            async with self.changed:
                await self.changed.wait_for(lambda: bool(self.queue) or not self.producing)
                if not self.queue:
                    return
                job = self.queue.popleft()
                self.in_flight += 1
                self.changed.notify_all()
            try:
                await self._one(job)
            finally:
                self.in_flight -= 1
                if self.in_flight == 0 and not self.queue:
                    async with self.changed:
                        self.changed.notify_all()

    async def _one(self, job: Job) -> None:
        if not self.control.may_send(job.campaign_id):
            self.unstarted.append(job)
            return
        outcome = await self._attempt(job)
        if outcome.result is Result.UNSENT:
            self.unstarted.append(job)
        else:
            await self.recorder.record(job, outcome)

    async def _attempt(self, job: Job) -> Outcome:
        if job.error:
            return Outcome(Result.PERMANENT, job.error)
        return await self.transport.send(job.message, sender=job.envelope_from, recipient=job.email)

    def _poke_threadsafe(self) -> None:
        """Wake the producer and the lanes (a stop was asked), from any thread."""

        async def poke() -> None:
            async with self.changed:
                self.changed.notify_all()

        loop = getattr(self, "loop", None)
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(lambda: loop.create_task(poke()))

    # --- the ledger side ---------------------------------------------------------------------

    async def write(self, results: list[tuple[Job, Outcome]]) -> None:
        """Commit a group of outcomes; pause a campaign whose failures run past the limit."""
        bursts = {
            cid: reason
            for cid, reason in self._bursts(results).items()
            if cid not in self.control.held
        }
        self.pausing |= bursts.keys()
        self.control.held |= bursts.keys()
        try:
            report = await self.loop.run_in_executor(
                self.ledger, self._write_blocking, results, bursts
            )
        finally:
            self.pausing -= bursts.keys()
        self.outstanding.difference_update(job.delivery_id for job, _ in results)
        self._report(report)

    def _write_blocking(
        self, results: list[tuple[Job, Outcome]], bursts: dict[int, str]
    ) -> SendReport:
        now = self.clock.now()
        if self.ledger_session is None:
            # Held for the sender's life: a pool checkout per commit (with PostgreSQL's
            # pre-ping, one more round trip) cost as much as the commit.
            self.ledger_connection = self.factory.kw["bind"].connect()
            self.ledger_session = Session(bind=self.ledger_connection, expire_on_commit=False)
        session = self.ledger_session
        try:
            report = record_outcomes(
                session, results, settings=self.settings, now=now, rng=self.rng
            )
            for cid, reason in bursts.items():
                if self._pause(session, cid, reason, now):
                    report.paused[cid] = reason
            session.commit()  # the connection was idle: the session's transaction is its own
        except BaseException:
            session.rollback()
            self._close_ledger()  # a broken connection is not reused
            raise
        finally:
            if self.ledger_session is not None:
                self.ledger_session.expunge_all()  # read afresh (a campaign may be resumed)
        return report

    def _close_ledger(self) -> None:
        if self.ledger_session is not None:
            self.ledger_session.close()
            self.ledger_connection.close()
            self.ledger_session = None

    def _bursts(self, results: Iterable[tuple[Job, Outcome]]) -> dict[int, str]:
        """Campaigns whose run of consecutive failures reached [smtp] failure_burst."""
        limit, tripped = self.settings.smtp.failure_burst, {}
        for job, outcome in results:
            ok = outcome.result is Result.SENT
            streak = 0 if ok else self.streaks.get(job.campaign_id, 0) + 1
            self.streaks[job.campaign_id] = streak
            if limit and streak >= limit:
                tripped[job.campaign_id] = (
                    f"paused after {streak} failed deliveries in a row; last reply: "
                    f"{outcome.reply[:200]}"
                )
        return tripped

    def _pause(self, session: Session, cid: int, reason: str, now: datetime) -> bool:
        campaign = session.get(Campaign, cid)
        if campaign is None or campaign.status != CampaignStatus.RUNNING:
            return False
        pause_campaign(session=session, campaign_id=cid, now=now, actor="sender", reason=reason)
        return True

    def _release_unstarted(self) -> None:
        jobs, self.unstarted = self.unstarted, []
        self._release([job.delivery_id for job in jobs])

    def _release(self, ids: list[int]) -> None:
        if ids:
            with unit_of_work(self.factory) as session:
                released = release_claims(session, ids, worker=self.worker)
            self.outstanding.difference_update(ids)
            self._report(SendReport(released=released))

    def _finish_done(self, cids: set[int]) -> None:
        with unit_of_work(self.factory) as session:
            done = [cid for cid in sorted(cids) if self._finish(session, cid)]
        self._report(SendReport(finished=done))

    def _finish(self, session: Session, cid: int) -> bool:
        return finish_if_done(session=session, campaign_id=cid, now=self.clock.now())

    def _report(self, report: SendReport) -> None:
        self.total.add(report)
        if self.on_batch:
            self.on_batch(report)

    async def _watch(self) -> None:
        """Re-read campaign states (pause, cancel) and renew this worker's leases."""
        lease = self.settings.smtp.lease_seconds
        renew_every, since_renew = max(lease / 3, WATCH_SECONDS), 0.0
        while True:
            await asyncio.sleep(WATCH_SECONDS)
            since_renew += WATCH_SECONDS
            with unit_of_work(self.factory) as session:
                self._hold_stopped(session)
                if since_renew >= renew_every:
                    until = self.clock.now() + timedelta(seconds=lease)
                    extend_leases(session, worker=self.worker, until=until)
                    since_renew = 0.0

    def _hold_stopped(self, session: Session) -> None:
        # Recomputed, not accumulated: a campaign resumed meanwhile may be sent again.
        active = set(self.active)
        stmt = select(Campaign.id).where(
            Campaign.id.in_(active), Campaign.status != CampaignStatus.RUNNING
        )
        stopped = set(session.scalars(stmt)) if active else set()
        self.control.held = stopped | self.pausing


def _first_cause(group: BaseExceptionGroup) -> BaseException:
    """The error that stopped the sender, not the lanes that stopped because of it."""
    leaves: list[BaseException] = []

    def walk(error: BaseException) -> None:
        if isinstance(error, BaseExceptionGroup):
            for inner in error.exceptions:
                walk(inner)
        else:
            leaves.append(error)

    walk(group)
    causes = [e for e in leaves if not isinstance(e, RecordError | asyncio.CancelledError)]
    return (causes or leaves)[0]


async def deliver_queued(
    *,
    factory: sessionmaker[Session],
    settings: Settings,
    transport: Transport,
    clock: Clock,
    campaign_id: int | None = None,
    on_batch: Callable[[SendReport], None] | None = None,
    rng: random.Random | None = None,
    control: SendControl | None = None,
    worker: str | None = None,
    signer: DkimSigner | None = None,
) -> SendReport:
    """Deliver every due delivery of running campaigns, then return what happened."""
    sender = Sender(
        factory=factory,
        settings=settings,
        transport=transport,
        clock=clock,
        control=control or SendControl(),
        worker=worker or worker_name(),
        campaign_id=campaign_id,
        rng=rng or random.Random(),
        signer=signer,
        on_batch=on_batch,
    )
    return await sender.run()


def deliver_all(*, factory: sessionmaker[Session], settings: Settings, clock: Clock) -> SendReport:
    """Deliver everything due now over a fresh connection pool, from synchronous code."""

    async def run() -> SendReport:
        pool = SmtpPool(settings.smtp)
        try:
            return await deliver_queued(
                factory=factory, settings=settings, transport=pool, clock=clock
            )
        finally:
            await pool.close()

    return asyncio.run(run())
