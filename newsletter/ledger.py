"""The ledger: record each delivery's outcome, back off on 4xx, suppress refused mailboxes.

`record_outcomes` writes in the caller's transaction, with one executemany per kind of outcome
(db/queries.py), so recording stays cheap at thousands of messages a second. `LedgerWriter` is
the sender's one writer: it owns a thread and a long-lived connection, and commits the outcomes
handed to it once one of them is needed (see its docstring). SMTP replies are stored with the
recipient's address blanked out: the record says what happened, not to whom in clear.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
from collections.abc import Callable, Generator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol, cast

from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from newsletter.audit import record_event
from newsletter.campaigns import pause_campaign
from newsletter.clock import Clock
from newsletter.config import Settings
from newsletter.db.models import Campaign, CampaignStatus, DeliveryStatus
from newsletter.db.queries import mark_bounced, record_sent, record_unsent
from newsletter.smtp import Outcome, Result
from newsletter.suppression import suppress

MAX_BACKOFF = timedelta(hours=6)
# PostgreSQL's codes for a transaction it broke off so that others could go on (a deadlock, a
# serialization failure): nothing of it was written, and running it again is the remedy.
BROKEN_OFF = frozenset({"40P01", "40001"})
WRITE_TRIES = 3

log = logging.getLogger(__name__)


class Attempt(Protocol):
    """What the ledger needs to know of a message it records (send.Job is one)."""

    @property
    def delivery_id(self) -> int: ...

    @property
    def campaign_id(self) -> int: ...

    @property
    def subscriber_id(self) -> int: ...

    @property
    def email(self) -> str: ...

    @property
    def attempts(self) -> int: ...

    @property
    def retry_from(self) -> datetime: ...


@dataclass
class Recorded:
    """What one commit wrote: deliveries by outcome, and campaigns paused on the way."""

    sent: int = 0
    deferred: int = 0
    failed: int = 0
    paused: dict[int, str] = field(default_factory=dict)
    pause_asked: set[int] = field(default_factory=set)  # campaigns whose pause came with these


def retry_delay(attempts: int, *, base_seconds: int, rng: random.Random) -> timedelta:
    """Exponential back-off with jitter: base·2^(n-1), times 0.5–1.5, at most six hours."""
    delay = timedelta(seconds=base_seconds * 2 ** min(max(attempts - 1, 0), 20))
    return min(delay, MAX_BACKOFF) * rng.uniform(0.5, 1.5)


def scrub(reply: str, email: str) -> str:
    """An SMTP reply without the recipient's address in it, cut to the column's size."""
    # Checked first: most replies ("250 2.0.0 Ok: queued") never name the recipient, and
    # compiling a pattern per address (none is ever in re's cache) cost more than the insert.
    # re.escape makes the pattern a literal: matching it is linear in the reply's length.
    if email and email.lower() in reply.lower():
        # A literal (re.escape) pattern: each position compares at most len(email) characters,
        # so this is linear in the reply for an address of bounded length.
        reply = re.sub(re.escape(email), "<recipient>", reply, flags=re.IGNORECASE)
    return reply[:1000]


def record_outcomes(
    session: Session,
    results: list[tuple[Attempt, Outcome]],
    *,
    settings: Settings,
    now: datetime,
    rng: random.Random,
) -> Recorded:
    """Write each outcome to its delivery row; suppress addresses refused for good."""
    report = Recorded()
    sent: list[dict[str, object]] = []
    other: list[dict[str, object]] = []
    bounced: list[tuple[int, str, str]] = []
    deadline = timedelta(hours=settings.smtp.retry_deadline_hours)
    for job, outcome in results:
        row = {"b_id": job.delivery_id, "b_reply": scrub(outcome.reply, job.email)}
        row["b_relay"] = outcome.relay or None
        if outcome.result is Result.SENT:
            sent.append(row | {"b_at": now})
            report.sent += 1
        elif outcome.result is Result.TEMPORARY and now - job.retry_from < deadline:
            delay = retry_delay(
                job.attempts, base_seconds=settings.smtp.retry_base_seconds, rng=rng
            )
            other.append(row | {"b_status": DeliveryStatus.DEFERRED, "b_next": now + delay})
            report.deferred += 1
        else:
            other.append(row | {"b_status": DeliveryStatus.FAILED, "b_next": now})
            report.failed += 1
            if outcome.result is Result.PERMANENT and outcome.recipient_level:
                bounced.append((job.subscriber_id, job.email, str(row["b_reply"])))
    # In one order (by reader) in every transaction: two writers' commits never wait for each
    # other's rows in opposite orders.
    for subscriber_id, email, reply in sorted(bounced):
        suppress_bounced(session, subscriber_id, email, settings=settings, now=now, reply=reply)
    # Rows in id order too: a statement that walks deliveries by id meets them in our order.
    record_sent(session, sorted(sent, key=_by_id))
    record_unsent(session, sorted(other, key=_by_id))
    return report


def _by_id(row: dict[str, object]) -> int:
    return cast(int, row["b_id"])


def suppress_bounced(
    session: Session,
    subscriber_id: int,
    email: str,
    *,
    settings: Settings,
    now: datetime,
    reply: str,
) -> None:
    """Mark an address refused for good as bounced, so nothing is sent to it again."""
    mark_bounced(session, subscriber_id)
    suppress(session, email, secret=settings.security.require_secret(), reason="bounce", now=now)
    record_event(
        session,
        now=now,
        actor="sender",
        action="subscriber.bounced",
        subscriber=subscriber_id,
        reply=scrub(reply, email)[:200],
    )


def pause_running(session: Session, *, campaign_id: int, reason: str, now: datetime) -> bool:
    """Pause a campaign the sender cannot go on with, if it is still running; True if paused."""
    campaign = session.get(Campaign, campaign_id)
    if campaign is None or campaign.status != CampaignStatus.RUNNING:
        return False
    pause_campaign(session=session, campaign_id=campaign_id, now=now, actor="sender", reason=reason)
    return True


Submitted = tuple[Attempt, Outcome, str | None, asyncio.Future[None]]
# An outcome nobody has asked about yet is committed at the latest this long after it came.
MAX_UNCOMMITTED_SECONDS = 0.05


class _Channel:
    """One writing thread and its long-lived connection and session."""

    def __init__(self, factory: sessionmaker[Session]) -> None:
        self.factory = factory
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="ledger")
        # Held for the writer's life: a new session per commit cost twice the commit itself at
        # thousands of commits a second, and a pool checkout (with PostgreSQL's pre-ping, one
        # more round trip) as much again.
        self.session: Session | None = None
        self.connection: Connection | None = None

    def open(self) -> Session:
        """The channel's session (in its thread)."""
        if self.session is None:
            self.connection = self.factory.kw["bind"].connect()
            self.session = Session(bind=self.connection, expire_on_commit=False)
        return self.session

    def close(self) -> None:
        """Close the session and the connection (a broken one is not reused)."""
        if self.session is not None:
            self.session.close()
            self.session = None
        if self.connection is not None:
            self.connection.close()
            self.connection = None


class Ticket:
    """An outcome handed to the writer; awaiting it asks for its commit and waits for it.

    Awaitable more than once: after the commit it returns at once (or raises its error again).
    """

    __slots__ = ("_writer", "future")

    def __init__(self, writer: LedgerWriter, future: asyncio.Future[None]) -> None:
        self._writer, self.future = writer, future

    def __await__(self) -> Generator[Any, None, None]:
        if not self.future.done():
            self._writer.want()
        return self.future.__await__()

    def done(self) -> bool:
        """Whether the outcome's commit is over (made, or failed)."""
        return self.future.done()


class LedgerWriter:
    """The sender's writer of outcomes: its own threads, each with a long-lived connection.

    `add` hands over an outcome and returns its Ticket. Outcomes wait until someone needs one
    of them committed (a lane at its next message's final dot awaits its ticket), a pause
    comes, or MAX_UNCOMMITTED_SECONDS pass; then one commit takes every outcome waiting. So
    commits are as large as the lanes allow (a commit costs about the same for one row as for
    ten), and the event loop keeps serving the connections meanwhile. On PostgreSQL two
    channels commit side by side (a commit waits for the server's WAL flush, and the next
    group need not wait behind it); on SQLite, with one writer at a time anyway, one. An
    outcome may carry a pause (a failure burst): it is written in the same transaction as the
    outcomes it came with. `on_commit` hears of each commit, in the event loop.
    """

    def __init__(
        self,
        *,
        factory: sessionmaker[Session],
        settings: Settings,
        clock: Clock,
        rng: random.Random,
        channels: int | None = None,
        on_commit: Callable[[Recorded], None] | None = None,
    ) -> None:
        self._factory, self._settings, self._clock, self._rng = factory, settings, clock, rng
        if channels is None:
            channels = 2 if factory.kw["bind"].dialect.name == "postgresql" else 1
        self._channels = [_Channel(factory) for _ in range(channels)]
        self._free = list(self._channels)
        self._pending: list[Submitted] = []
        self._wanted = False  # someone waits for an outcome not yet in a commit
        self._deadline: asyncio.TimerHandle | None = None
        self._drivers: set[asyncio.Task[None]] = set()
        self._on_commit = on_commit
        self._idle = asyncio.Event()
        self._idle.set()

    def add(self, attempt: Attempt, outcome: Outcome, *, pause: str | None = None) -> Ticket:
        """Hand over an outcome for a coming commit; await the ticket to have it committed."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        if not self._pending:
            self._deadline = loop.call_later(MAX_UNCOMMITTED_SECONDS, self.want)
        self._pending.append((attempt, outcome, pause, future))
        if pause:  # others should learn of the pause at once
            self.want()
        return Ticket(self, future)

    async def submit(self, attempt: Attempt, outcome: Outcome, *, pause: str | None = None) -> None:
        """Hand over an outcome and return once it is committed."""
        await self.add(attempt, outcome, pause=pause)

    def want(self) -> None:
        """Commit the waiting outcomes as soon as a channel is free."""
        if not self._pending:
            return
        self._wanted = True
        while self._free:
            channel = self._free.pop()
            self._idle.clear()
            driver = asyncio.get_running_loop().create_task(self._drive(channel))
            self._drivers.add(driver)  # kept until done: the loop holds tasks only weakly
            driver.add_done_callback(self._drivers.discard)

    async def _drive(self, channel: _Channel) -> None:
        """Commit groups on this channel while outcomes are wanted."""
        loop = asyncio.get_running_loop()
        try:
            while self._wanted and self._pending:
                group, self._pending, self._wanted = self._pending, [], False
                if self._deadline is not None:
                    self._deadline.cancel()
                    self._deadline = None
                try:
                    recorded = await loop.run_in_executor(
                        channel.executor, self._write, channel, group
                    )
                except Exception as error:  # its tickets carry it; the next group tries again
                    _fail(group, error)
                    continue
                except BaseException as error:  # cancelled: nothing more is committed here
                    _fail(group + self._pending, error)
                    self._pending = []
                    raise
                for *_, future in group:
                    future.set_result(None)
                if self._on_commit is not None:
                    self._on_commit(recorded)
        finally:
            self._free.append(channel)
            if len(self._free) == len(self._channels):
                self._idle.set()

    async def flush(self) -> None:
        """Wait until every outcome handed over so far is committed (or its commit failed)."""
        while self._pending or not self._idle.is_set():
            self.want()
            await self._idle.wait()

    async def close(self) -> None:
        """Flush, then close the connections and stop the threads."""
        await self.flush()
        loop = asyncio.get_running_loop()
        for channel in self._channels:
            await loop.run_in_executor(channel.executor, channel.close)
            channel.executor.shutdown(wait=True)

    def _write(self, channel: _Channel, group: list[Submitted]) -> Recorded:
        """Commit a group of outcomes and the pauses they carry (in the channel's thread).

        A commit the database broke off to end a deadlock is written again: failing it would
        stop the sender with messages accepted and not recorded.
        """
        tries = 1
        while True:
            try:
                return self._write_once(channel, group)
            except DBAPIError as error:
                code = getattr(error.orig, "sqlstate", None)
                if code not in BROKEN_OFF or tries >= WRITE_TRIES:
                    raise
            tries += 1
            log.warning("the database broke off a ledger commit (%s); writing it again", code)

    def _write_once(self, channel: _Channel, group: list[Submitted]) -> Recorded:
        now = self._clock.now()
        session = channel.open()
        try:
            report = record_outcomes(
                session,
                [(attempt, outcome) for attempt, outcome, _p, _f in group],
                settings=self._settings,
                now=now,
                rng=self._rng,
            )
            for attempt, _o, reason, _f in group:
                if reason:
                    report.pause_asked.add(attempt.campaign_id)
                    if pause_running(
                        session, campaign_id=attempt.campaign_id, reason=reason, now=now
                    ):
                        report.paused[attempt.campaign_id] = reason
            session.commit()  # the connection was idle: the session's transaction is its own
        except BaseException:
            session.rollback()
            channel.close()  # a broken connection is not reused
            raise
        finally:
            if channel.session is not None:
                channel.session.expunge_all()  # read afresh (a campaign may be resumed)
        return report


class RecordError(Exception):
    """Another lane's commit failed; this lane's outcome was not recorded either."""


def _fail(group: list[Submitted], error: BaseException) -> None:
    """The first outcome's ticket carries the error itself; the others say it was another's."""
    for index, (*_, future) in enumerate(group):
        if future.done():
            continue
        if not isinstance(error, Exception):  # cancelled: so are the commits it held
            future.cancel()
        else:
            future.set_exception(error if index == 0 else RecordError(error))
