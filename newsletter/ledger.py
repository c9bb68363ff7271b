"""The ledger: record each delivery's outcome, back off on 4xx, suppress refused mailboxes.

`plan_outcomes` works out a group's rows; `write_plan` writes them in the caller's transaction,
in one statement (db/queries.py), so recording stays cheap at thousands of messages a second.
`LedgerWriter` is the sender's one writer: it owns long-lived connections (on PostgreSQL, one
on the event loop besides each thread's), and commits the outcomes handed to it once one of
them is needed (see its docstring). SMTP replies are stored with the recipient's address
blanked out: the record says what happened, not to whom in clear.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import threading
import unicodedata
from collections.abc import Callable, Generator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from newsletter.audit import record_event
from newsletter.campaigns import pause_campaign
from newsletter.clock import Clock
from newsletter.config import Settings
from newsletter.db.models import Campaign, CampaignStatus, DeliveryStatus
from newsletter.db.queries import (
    OUTCOMES_SQL,
    OutcomeRow,
    mark_bounced,
    outcome_arrays,
    record_outcomes,
)
from newsletter.errors import CampaignError
from newsletter.smtp import Outcome, Result
from newsletter.suppression import suppress

if TYPE_CHECKING:  # imported where used: libpq is memory that a process on SQLite never needs
    import psycopg

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
    """An SMTP reply without the recipient's address or control characters, cut to size."""
    # Checked first: most replies ("250 2.0.0 Ok: queued") never name the recipient, and
    # compiling a pattern per address (none is ever in re's cache) cost more than the insert.
    # re.escape makes the pattern a literal: matching it is linear in the reply's length.
    if email and email.lower() in reply.lower():
        # A literal (re.escape) pattern: each position compares at most len(email) characters,
        # so this is linear in the reply for an address of bounded length.
        reply = re.sub(re.escape(email), "<recipient>", reply, flags=re.IGNORECASE)
    if not reply.isprintable():  # a relay's NUL would be refused by PostgreSQL, losing the group
        reply = "".join("\ufffd" if unicodedata.category(c) in ("Cc", "Cs") else c for c in reply)
    return reply[:1000]


@dataclass
class Plan:
    """A group's writes, worked out before any is made: a write tried again writes the same."""

    rows: list[OutcomeRow] = field(default_factory=list)  # by delivery id
    bounced: list[tuple[int, str, str]] = field(default_factory=list)  # by reader

    def recorded(self) -> Recorded:
        """What writing this plan records, in counts."""
        statuses = [row.status for row in self.rows]
        return Recorded(
            sent=statuses.count(DeliveryStatus.SENT),
            deferred=statuses.count(DeliveryStatus.DEFERRED),
            failed=statuses.count(DeliveryStatus.FAILED),
        )


def plan_outcomes(
    results: list[tuple[Attempt, Outcome]], *, settings: Settings, now: datetime, rng: random.Random
) -> Plan:
    """Each outcome's row, with its retry time; the addresses refused for good.

    A temporary failure is deferred until the retry deadline has passed since `retry_from`, and
    always on a delivery's first attempt: a campaign held back past the deadline (an hourly
    cap, a long queue) still gets a retry for each greylisted message. `attempts` counts the
    claim that sent this one (claim_batch adds it), so it is 1 on the first attempt.
    """
    plan = Plan()
    deadline = timedelta(hours=settings.smtp.retry_deadline_hours)
    for job, outcome in results:
        reply, relay = scrub(outcome.reply, job.email), outcome.relay or None
        if outcome.result is Result.SENT:
            row = OutcomeRow(job.delivery_id, DeliveryStatus.SENT, now, None, reply, relay)
        elif outcome.result is Result.TEMPORARY and (
            job.attempts <= 1 or now - job.retry_from < deadline
        ):
            delay = retry_delay(
                job.attempts, base_seconds=settings.smtp.retry_base_seconds, rng=rng
            )
            row = OutcomeRow(
                job.delivery_id, DeliveryStatus.DEFERRED, None, now + delay, reply, relay
            )
        else:
            row = OutcomeRow(job.delivery_id, DeliveryStatus.FAILED, None, now, reply, relay)
            # recipient_level: the mailbox itself was refused at RCPT (smtp_wire.refuses_mailbox);
            # a policy refusal (5.7.x) fails this delivery only, and `campaigns retry` sends it.
            if outcome.result is Result.PERMANENT and outcome.recipient_level:
                plan.bounced.append((job.subscriber_id, job.email, reply))
        plan.rows.append(row)
    # In one order in every transaction (readers, then deliveries by id): two writers' commits
    # never wait for each other's rows in opposite orders.
    plan.bounced.sort()
    plan.rows.sort()
    return plan


def write_plan(session: Session, plan: Plan, *, settings: Settings, now: datetime) -> None:
    """Write a plan in the caller's transaction: suppress the refused addresses, record outcomes."""
    for subscriber_id, email, reply in plan.bounced:
        suppress_bounced(session, subscriber_id, email, settings=settings, now=now, reply=reply)
    record_outcomes(session, plan.rows)


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
    if not mark_bounced(session, subscriber_id):
        return  # forgotten while the message was in flight: already kept out, nothing to add
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
    try:
        pause_campaign(
            session=session, campaign_id=campaign_id, now=now, actor="sender", reason=reason
        )
    except CampaignError:  # cancelled or paused by someone else meanwhile: theirs stands
        return False
    return True


Submitted = tuple[Attempt, Outcome, str | None, asyncio.Future[None]]
# An outcome nobody has asked about yet is committed at the latest this long after it came.
MAX_UNCOMMITTED_SECONDS = 0.05


class _Channel:
    """One writer's connections: a thread with a session, and on PostgreSQL one for the loop."""

    def __init__(self, factory: sessionmaker[Session]) -> None:
        self.factory = factory
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="ledger")
        # Held for the writer's life: a new session per commit cost twice the commit itself at
        # thousands of commits a second, and a pool checkout (with PostgreSQL's pre-ping, one
        # more round trip) as much again.
        self.session: Session | None = None
        self.connection: Connection | None = None
        self.on_loop: psycopg.AsyncConnection[Any] | None = None

    def open(self) -> Session:
        """The channel's session (in its thread)."""
        if self.session is None:
            self.connection = self.factory.kw["bind"].connect()
            self.session = Session(bind=self.connection, expire_on_commit=False)
        return self.session

    async def open_on_loop(self) -> psycopg.AsyncConnection[Any]:
        """The channel's connection for the event loop, in autocommit (PostgreSQL only)."""
        import psycopg

        if self.on_loop is None or self.on_loop.closed:
            engine = self.factory.kw["bind"]
            args, kwargs = engine.dialect.create_connect_args(engine.url)
            kwargs.setdefault("application_name", "newsletter ledger")  # in pg_stat_activity
            self.on_loop = await psycopg.AsyncConnection.connect(*args, **kwargs, autocommit=True)
        return self.on_loop

    def close(self) -> None:
        """Close the session and the connection (a broken one is not reused)."""
        if self.session is not None:
            self.session.close()
            self.session = None
        if self.connection is not None:
            self.connection.close()
            self.connection = None

    async def close_on_loop(self) -> None:
        """Close the event loop's connection (it does not wait for the server)."""
        if self.on_loop is not None:
            await self.on_loop.close()
            self.on_loop = None


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
    group need not wait behind it), and a group of outcomes alone is one statement sent from
    the event loop (see _commit); on SQLite, with one writer at a time anyway, one channel,
    whose thread takes group after group itself while they are wanted (see _drain). An
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
        # With psycopg, a group of outcomes alone is written from the event loop (see _commit).
        self._on_loop = factory.kw["bind"].dialect.driver == "psycopg"
        self._free = list(self._channels)
        # _pending and _wanted are taken together under the lock: by the event loop, and by a
        # channel's thread that takes the next group itself (_drain).
        self._lock = threading.Lock()
        self._pending: list[Submitted] = []
        self._wanted = False  # someone waits for an outcome not yet in a commit
        self._stopping = False  # a driver was cancelled: the threads take no more groups
        self._deadline: asyncio.TimerHandle | None = None
        self._drivers: set[asyncio.Task[None]] = set()
        self._on_commit = on_commit
        self._idle = asyncio.Event()
        self._idle.set()

    def add(self, attempt: Attempt, outcome: Outcome, *, pause: str | None = None) -> Ticket:
        """Hand over an outcome for a coming commit; await the ticket to have it committed."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._lock:
            self._pending.append((attempt, outcome, pause, future))
        if self._deadline is None:  # else one due within MAX_UNCOMMITTED_SECONDS is set already
            self._deadline = loop.call_later(MAX_UNCOMMITTED_SECONDS, self._overdue)
        if pause:  # others should learn of the pause at once
            self.want()
        return Ticket(self, future)

    async def submit(self, attempt: Attempt, outcome: Outcome, *, pause: str | None = None) -> None:
        """Hand over an outcome and return once it is committed."""
        await self.add(attempt, outcome, pause=pause)

    def want(self) -> None:
        """Commit the waiting outcomes as soon as a channel is free."""
        with self._lock:
            if not self._pending:
                return
            self._wanted = True
        while self._free:
            channel = self._free.pop()
            self._idle.clear()
            driver = asyncio.get_running_loop().create_task(self._drive(channel))
            self._drivers.add(driver)  # kept until done: the loop holds tasks only weakly
            driver.add_done_callback(self._drivers.discard)

    def _overdue(self) -> None:
        self._deadline = None
        self.want()

    def _take(self) -> list[Submitted]:
        """Every waiting outcome, if one of them is wanted (none else)."""
        with self._lock:
            if self._stopping or not (self._wanted and self._pending):
                return []
            group, self._pending, self._wanted = self._pending, [], False
            return group

    async def _drive(self, channel: _Channel) -> None:
        """Commit groups on this channel while outcomes are wanted."""
        loop = asyncio.get_running_loop()
        try:
            if self._on_loop:
                while group := self._take():
                    if self._deadline is not None:
                        self._deadline.cancel()
                        self._deadline = None
                    try:
                        recorded = await self._commit(channel, group)
                    except Exception as error:  # its tickets carry it; the next group tries
                        _fail(group, error)
                        continue
                    except BaseException as error:  # cancelled: nothing more is committed
                        _fail(group, error)
                        raise
                    self._settle(group, recorded)
            else:
                await loop.run_in_executor(channel.executor, self._drain, channel, loop)
        except BaseException as error:  # cancelled: no thread takes another group
            with self._lock:
                self._stopping = True
                waiting, self._pending = self._pending, []
            _fail(waiting, error)
            raise
        finally:
            self._free.append(channel)
            if len(self._free) == len(self._channels):
                self._idle.set()
        if self._wanted:  # wanted while the channel was finishing, when none was free
            self.want()

    def _drain(self, channel: _Channel, loop: asyncio.AbstractEventLoop) -> None:
        """Commit group after group in the channel's thread, while outcomes are wanted.

        The thread takes the next group itself, without going back to the event loop between
        commits: each hand-over waits for the other thread to get the interpreter, and the
        lanes wait at their final dots meanwhile. Handed over one by one, a commit of about ten
        outcomes took 1.5-1.9 ms from the asking to the answer, of which 0.8 ms was the write
        (SQLite, 20 connections, benchmarks/send.py).
        """
        while group := self._take():
            try:
                recorded = self._write_again(channel, *self._plan(group))
            except Exception as error:  # its tickets carry it; the next group tries again
                loop.call_soon_threadsafe(_fail, group, error)
                continue
            loop.call_soon_threadsafe(self._settle, group, recorded)

    def _settle(self, group: list[Submitted], recorded: Recorded) -> None:
        """A group is committed: its tickets are done and `on_commit` hears of it."""
        for *_, future in group:
            if not future.done():  # cancelled meanwhile (the sender is stopping)
                future.set_result(None)
        if self._on_commit is not None:
            self._on_commit(recorded)

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
            await channel.close_on_loop()  # first: it cannot fail
            await loop.run_in_executor(channel.executor, channel.close)
            channel.executor.shutdown(wait=True)

    def _plan(self, group: list[Submitted]) -> tuple[Plan, list[tuple[int, str]], datetime]:
        """A group's rows, the pauses it carries, and the moment they are recorded at."""
        now = self._clock.now()
        attempts = [(attempt, outcome) for attempt, outcome, _p, _f in group]
        plan = plan_outcomes(attempts, settings=self._settings, now=now, rng=self._rng)
        # A pause's reason quotes the last reply: scrubbed as every stored reply is (a NUL would
        # fail the commit, an address would name a reader in the campaign and its audit event).
        pauses = [
            (attempt.campaign_id, scrub(reason, attempt.email))
            for attempt, _o, reason, _f in group
            if reason
        ]
        return plan, pauses, now

    async def _commit(self, channel: _Channel, group: list[Submitted]) -> Recorded:
        """Commit a group of outcomes and the pauses they carry (psycopg).

        The common group, outcomes only, is one statement from the event loop, in autocommit.
        A write from the channel's thread cost twice the CPU in round trips (BEGIN, the
        statement, COMMIT) and the hand-overs between the thread and the loop, and took longer,
        while the lanes waited for it. Bounces and pauses take a transaction in the thread.
        """
        plan, pauses, now = self._plan(group)
        if plan.bounced or pauses:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(
                channel.executor, self._write_again, channel, plan, pauses, now
            )
        tries = 1
        while True:
            try:
                return await self._write_on_loop(channel, plan)
            except DBAPIError as error:
                if not _broken_off(error, tries):
                    raise
            tries += 1

    def _write_again(
        self, channel: _Channel, plan: Plan, pauses: list[tuple[int, str]], now: datetime
    ) -> Recorded:
        """_write, written again when the database broke it off (in the thread)."""
        tries = 1
        while True:
            try:
                return self._write(channel, plan, pauses, now)
            except DBAPIError as error:
                if not _broken_off(error, tries):
                    raise
            tries += 1

    async def _write_on_loop(self, channel: _Channel, plan: Plan) -> Recorded:
        """Write a plan of outcomes only, in one statement on the event loop's connection.

        A connection lost on the way (the server restarted, a proxy's idle time-out) is
        replaced once and the statement sent again: if the first one was committed after all,
        the second finds its rows no longer claimed and changes nothing. Cancelled (the event
        loop torn down mid-write), psycopg cancels the statement in the server: as with a
        killed sender, each connection's last message may then go again (same Message-ID).
        """
        import psycopg

        retried = False
        while True:
            try:
                connection = await channel.open_on_loop()
                await connection.execute(OUTCOMES_SQL, outcome_arrays(plan.rows))
                return plan.recorded()
            except BaseException as error:
                lost = channel.on_loop is not None and channel.on_loop.broken
                await channel.close_on_loop()  # a broken connection is not reused
                if not isinstance(error, psycopg.Error):
                    raise
                if not lost or retried:  # as SQLAlchemy's errors: parameters never shown
                    raise DBAPIError.instance(
                        OUTCOMES_SQL, None, error, psycopg.Error, hide_parameters=True
                    ) from error
            retried = True
            log.warning("the ledger's database connection was lost; writing again")

    def _write(
        self, channel: _Channel, plan: Plan, pauses: list[tuple[int, str]], now: datetime
    ) -> Recorded:
        """Write a plan and the pauses that came with it in one transaction (in the thread)."""
        session = channel.open()
        try:
            write_plan(session, plan, settings=self._settings, now=now)
            report = plan.recorded()
            for campaign_id, reason in pauses:
                report.pause_asked.add(campaign_id)
                if pause_running(session, campaign_id=campaign_id, reason=reason, now=now):
                    report.paused[campaign_id] = reason
            session.commit()  # the connection was idle: the session's transaction is its own
        except BaseException:
            session.rollback()
            channel.close()  # a broken connection is not reused
            raise
        finally:
            if channel.session is not None:
                channel.session.expunge_all()  # read afresh (a campaign may be resumed)
        return report


def _broken_off(error: DBAPIError, tries: int) -> bool:
    """Whether to write a commit again: PostgreSQL broke it off to end a deadlock (failing it
    would stop the sender with messages accepted and not recorded), and tries are left."""
    code = getattr(error.orig, "sqlstate", None)
    if code not in BROKEN_OFF or tries >= WRITE_TRIES:
        return False
    log.warning("the database broke off a ledger commit (%s); writing it again", code)
    return True


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
