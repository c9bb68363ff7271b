"""The ledger's writer on SQLite and PostgreSQL: outcomes, back-off, suppression, pauses."""

from __future__ import annotations

import asyncio
import random
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import Connection, Engine, select, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from newsletter import ledger
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
from newsletter.db.queries import (
    _ONE_OUTCOME,
    _PARAMS,
    SQLITE_OUTCOMES_PER_STATEMENT,
    OutcomeRow,
    claim_batch,
    extend_leases,
    outcome_arrays,
    release_claims,
    release_claims_of,
)
from newsletter.ledger import LedgerWriter, Recorded, RecordError, retry_delay
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
        reports: list[Recorded] = []
        writer = LedgerWriter(
            factory=factory,
            settings=settings,
            clock=clock,
            rng=random.Random(7),
            on_commit=reports.append,
        )
        try:
            await asyncio.gather(
                *(writer.submit(job, outcome, pause=pause) for job, outcome, pause in items)
            )
        finally:
            await writer.close()
        return reports

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


def test_replies_and_moments_are_stored_exactly_as_given(
    factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """Quotes, backslashes, braces, commas, NULL-like words, Cyrillic, emoji, a 1000-character
    reply, a NULL relay and microseconds: read back as they were written, on both databases."""
    settings = make_settings(database_url)
    clock.advance(seconds=0.000123)
    replies = [
        '250 "quoted" \\ back\\slash {a,b} NULL null',
        "250 Прынята ✉️ 𝔘",
        "250 " + "x" * 996,
        "250 " + "y" * 2000,
    ]
    jobs = claimed_jobs(factory, clock, len(replies))
    items: list[tuple[Job, Outcome, str | None]] = [
        (job, Outcome(Result.SENT, reply, 250, relay="" if i == 1 else "main"), None)
        for i, (job, reply) in enumerate(zip(jobs, replies, strict=True))
    ]
    write(factory, settings, clock, items)
    for i, job in enumerate(jobs):
        got = delivery(factory, job.delivery_id)
        assert got.last_reply == replies[i][:1000]
        assert got.sent_at == clock.now() and got.sent_at.microsecond == 123
        assert got.relay == (None if i == 1 else "main")


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
    # A second attempt past the deadline fails (a first one never does: test_send_refusals).
    past = clock.now() - deadline - timedelta(seconds=1)
    late = Job(**{**late.__dict__, "attempts": 2, "retry_from": past})
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
    # Nothing commits until an outcome is awaited: by then all twenty wait for the same commit.
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


def test_sqlite_writes_a_group_in_one_statement_as_it_wrote_them_row_by_row(
    factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """More outcomes than one statement holds, of every kind, moments with and without
    microseconds, a row no longer claimed: the rows read back as the executemany that SQLite
    before 3.33 uses writes them."""
    if not database_url.startswith("sqlite"):
        pytest.skip("SQLite's statement")
    n = SQLITE_OUTCOMES_PER_STATEMENT + 7
    jobs = claimed_jobs(factory, clock, 2 * n)
    with unit_of_work(factory) as session:  # one of each half released: the guard keeps it
        release_claims(session, [jobs[3].delivery_id, jobs[n + 3].delivery_id], worker="w")
    at = clock.now().replace(microsecond=0)

    def rows(part: list[Job]) -> list[OutcomeRow]:
        made = []
        for i, job in enumerate(part):
            kind = i % 3
            status = [DeliveryStatus.SENT, DeliveryStatus.DEFERRED, DeliveryStatus.FAILED][kind]
            moment = at + timedelta(microseconds=i % 2 * 17)
            made.append(
                OutcomeRow(
                    job.delivery_id,
                    status,
                    moment if kind == 0 else None,
                    moment + timedelta(minutes=i) if kind else None,
                    f"{250 + kind * 200} 'reply' {i} ✉",
                    None if i % 5 == 0 else "main",
                )
            )
        return made

    with unit_of_work(factory) as session:
        ledger.record_outcomes(session, rows(jobs[:n]))
        old = [dict(zip(_PARAMS, row, strict=True)) for row in rows(jobs[n:])]
        session.connection().execute(_ONE_OUTCOME, old)

    def state(part: list[Job]) -> list[tuple[object, ...]]:
        with unit_of_work(factory) as session:
            found = session.scalars(
                select(Delivery)
                .where(Delivery.id.in_([job.delivery_id for job in part]))
                .order_by(Delivery.id)
            )
            return [
                (d.status, d.sent_at, d.next_attempt_at, d.last_reply, d.relay, d.claimed_by)
                for d in found
            ]

    one_statement, row_by_row = state(jobs[:n]), state(jobs[n:])
    assert one_statement == row_by_row
    assert one_statement[3][0] == DeliveryStatus.QUEUED  # released: left as it was
    assert one_statement[0] == (
        DeliveryStatus.SENT,
        at,
        one_statement[0][2],
        "250 'reply' 0 ✉",
        None,
        None,
    )
    assert one_statement[1][1:3] == (None, at + timedelta(microseconds=17, minutes=1))


def new_writer(
    factory: sessionmaker[Session],
    database_url: str,
    clock: FrozenClock,
    reports: list[Recorded] | None = None,
) -> LedgerWriter:
    """A writer on this database that keeps each commit's report in `reports`."""
    return LedgerWriter(
        factory=factory,
        settings=make_settings(database_url),
        clock=clock,
        rng=random.Random(7),
        on_commit=None if reports is None else reports.append,
    )


def _trip_on(factory: sessionmaker[Session], delivery_id: int) -> None:
    """A trigger that makes the database refuse to record this one delivery."""
    with unit_of_work(factory) as session:
        if session.get_bind().dialect.name == "sqlite":
            session.execute(
                text(
                    "create trigger refuse_one before update on deliveries "
                    f"when old.id = {delivery_id} begin select raise(abort, 'refused'); end"
                )
            )
        else:
            session.execute(
                text(
                    "create function refuse_one() returns trigger language plpgsql as "
                    "$$ begin raise exception 'refused'; end $$"
                )
            )
            session.execute(
                text(
                    "create trigger refuse_one before update on deliveries for each row "
                    f"when (old.id = {delivery_id}) execute function refuse_one()"
                )
            )


def test_an_outcome_waits_until_it_is_asked_for_then_one_commit_takes_every_waiting_one(
    factory: sessionmaker[Session],
    clock: FrozenClock,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Handed over, an outcome is not yet written; awaiting one ticket commits all waiting."""
    monkeypatch.setattr(ledger, "MAX_UNCOMMITTED_SECONDS", 30.0)
    jobs = claimed_jobs(factory, clock, 4)
    reports: list[Recorded] = []

    async def run() -> list[DeliveryStatus]:
        writer = new_writer(factory, database_url, clock, reports)
        try:
            tickets = [writer.add(job, SENT) for job in jobs[:3]]
            await asyncio.sleep(0.3)  # nobody asked: nothing is written
            before = [delivery(factory, job.delivery_id).status for job in jobs]
            assert not any(t.done() for t in tickets) and reports == []
            await tickets[1]
            assert all(t.done() for t in tickets)
            await tickets[1]  # a ticket may be awaited again
            last = writer.add(jobs[3], SENT)
        finally:
            await writer.close()  # commits what still waits
        assert last.done()
        return before

    before = asyncio.run(run())
    assert before == [DeliveryStatus.CLAIMED] * 4
    assert [r.sent for r in reports] == [3, 1]
    with unit_of_work(factory) as session:
        assert set(session.scalars(select(Delivery.status))) == {DeliveryStatus.SENT}


def test_an_outcome_nobody_asks_for_is_committed_within_its_deadline(
    factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """The record never lags far behind the server's word, even when no lane waits."""
    [job] = claimed_jobs(factory, clock, 1)
    reports: list[Recorded] = []

    async def run() -> None:
        writer = new_writer(factory, database_url, clock, reports)
        try:
            ticket = writer.add(job, SENT)
            for _ in range(100):  # the deadline is 50 ms; a busy machine may take longer
                await asyncio.sleep(ledger.MAX_UNCOMMITTED_SECONDS)
                if ticket.done():
                    break
            assert ticket.done() and [r.sent for r in reports] == [1]
        finally:
            await writer.close()

    asyncio.run(run())
    assert delivery(factory, job.delivery_id).status == DeliveryStatus.SENT


def test_a_pause_is_committed_at_once_without_being_asked_for(
    factory: sessionmaker[Session],
    clock: FrozenClock,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Other senders must learn of a failure burst's pause now, not at the next final dot."""
    monkeypatch.setattr(ledger, "MAX_UNCOMMITTED_SECONDS", 30.0)
    [job] = claimed_jobs(factory, clock, 1)
    reports: list[Recorded] = []

    async def run() -> None:
        writer = new_writer(factory, database_url, clock, reports)
        try:
            writer.add(job, LATER, pause="paused after 1 failure")
            for _ in range(100):
                await asyncio.sleep(0.05)
                if reports:
                    break
            assert reports and reports[0].pause_asked == {job.campaign_id}
        finally:
            await writer.close()

    asyncio.run(run())
    with unit_of_work(factory) as session:
        assert session.scalar(select(Campaign.status)) == CampaignStatus.PAUSED


def test_a_failed_commit_fails_its_tickets_and_the_next_group_is_written(
    factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """The database refuses one row: that group's tickets raise (one with the error, the others
    naming it), nothing of it is written, and the writer goes on with a new connection."""
    first, second, third = claimed_jobs(factory, clock, 3)
    _trip_on(factory, first.delivery_id)

    async def run() -> list[BaseException | None]:
        writer = new_writer(factory, database_url, clock)
        try:
            failing = [writer.add(first, SENT), writer.add(second, SENT)]
            results = await asyncio.gather(*failing, return_exceptions=True)
            await writer.add(third, SENT)
        finally:
            await writer.close()
        return [r if isinstance(r, BaseException) else None for r in results]

    own, other = asyncio.run(run())
    assert own is not None and "refused" in str(own) and not isinstance(own, RecordError)
    assert isinstance(other, RecordError) and "refused" in str(other)
    statuses = [delivery(factory, j.delivery_id).status for j in (first, second, third)]
    assert statuses == [DeliveryStatus.CLAIMED, DeliveryStatus.CLAIMED, DeliveryStatus.SENT]


def _lock_row(connection: Connection, delivery_id: int) -> None:
    """Lock one delivery row in this connection's open transaction, as a writer of it would."""
    connection.execute(
        text("select id from deliveries where id = :id for update"), {"id": delivery_id}
    )


async def _until_a_backend_waits_for_a_lock(engine: Engine) -> None:
    """Return once some session of this database waits for a row lock (at most 10 s)."""
    query = text(
        "select count(*) from pg_stat_activity "
        "where datname = current_database() and wait_event_type = 'Lock'"
    )
    for _ in range(500):
        with engine.connect() as probe:
            if probe.execute(query).scalar():
                return
        await asyncio.sleep(0.02)
    raise AssertionError("no session ever waited for a lock")


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_commit_broken_off_by_a_deadlock_is_written_again(
    factory: sessionmaker[Session],
    clock: FrozenClock,
    database_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Another transaction locks the ledger's rows in the opposite order: PostgreSQL ends the
    deadlock by failing the ledger's commit (it waited first), and the ledger writes the group
    again once the other transaction is over. No ticket fails; both outcomes are recorded."""
    first, second = claimed_jobs(factory, clock, 2)
    engine = factory.kw["bind"]

    async def run() -> None:
        writer = new_writer(factory, database_url, clock)
        try:
            with engine.connect() as other:
                _lock_row(other, second.delivery_id)
                tickets = [writer.add(first, SENT), writer.add(second, SENT)]
                both = asyncio.ensure_future(asyncio.gather(*tickets))
                await _until_a_backend_waits_for_a_lock(engine)  # the ledger, on `second`
                await asyncio.to_thread(_lock_row, other, first.delivery_id)  # the cycle
                other.commit()
                await both
        finally:
            await writer.close()

    with caplog.at_level("WARNING", logger="newsletter.ledger"):
        asyncio.run(run())
    assert "broke off a ledger commit (40P01)" in caplog.text
    statuses = [delivery(factory, job.delivery_id).status for job in (first, second)]
    assert statuses == [DeliveryStatus.SENT, DeliveryStatus.SENT]


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_lease_renewal_and_putting_back_skip_rows_being_recorded_instead_of_waiting(
    factory: sessionmaker[Session], clock: FrozenClock
) -> None:
    """The sender's housekeeping changes many claimed rows in one statement; it must never
    wait for a row the ledger holds (that wait, in a cycle, is a deadlock). The row held is
    left as it was, the others are changed."""
    free, held = claimed_jobs(factory, clock, 2)
    engine = factory.kw["bind"]
    until = clock.now() + timedelta(minutes=5)
    with engine.connect() as ledger_side:
        _lock_row(ledger_side, held.delivery_id)
        with unit_of_work(factory) as session:
            session.execute(text("set local lock_timeout = '3s'"))  # waiting fails the test
            extend_leases(session, worker="w", until=until)
        assert delivery(factory, free.delivery_id).lease_until == until
        assert delivery(factory, held.delivery_id).lease_until != until
        with unit_of_work(factory) as session:
            session.execute(text("set local lock_timeout = '3s'"))
            assert release_claims_of(session, ["w"]) == 1
        ledger_side.rollback()
    assert delivery(factory, free.delivery_id).status == DeliveryStatus.QUEUED
    assert delivery(factory, held.delivery_id).status == DeliveryStatus.CLAIMED


def _end_ledger_backends(engine: Engine) -> int:
    """End (as an administrator or a restart would) the ledger's own connections."""
    query = text(
        "select pg_terminate_backend(pid) from pg_stat_activity "
        "where datname = current_database() and application_name = 'newsletter ledger' "
        "and query like 'UPDATE deliveries AS d%'"
    )
    with engine.connect() as admin:
        return sum(admin.execute(query).scalars())


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_ledger_connection_the_server_ended_is_replaced_and_the_group_written(
    factory: sessionmaker[Session],
    clock: FrozenClock,
    database_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Outcomes alone are written from the event loop's own connection. If the server ends
    it between two commits, the next group goes on a new connection: no ticket fails, and a
    commit that failed here would stop the sender with messages accepted and unrecorded."""
    first, second, third = claimed_jobs(factory, clock, 3)
    engine = factory.kw["bind"]

    async def run() -> int:
        writer = new_writer(factory, database_url, clock)
        try:
            await writer.add(first, SENT)
            ended = await asyncio.to_thread(_end_ledger_backends, engine)
            await writer.add(second, LATER)
            await writer.add(third, SENT)
        finally:
            await writer.close()
        return ended

    with caplog.at_level("WARNING", logger="newsletter.ledger"):
        assert asyncio.run(run()) == 1
    assert "connection was lost; writing again" in caplog.text
    statuses = [delivery(factory, job.delivery_id).status for job in (first, second, third)]
    assert statuses == [DeliveryStatus.SENT, DeliveryStatus.DEFERRED, DeliveryStatus.SENT]


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_ledger_error_from_the_event_loop_names_no_values(
    factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """The statement written from the event loop fails as a session's would: a database error
    whose text shows the statement but none of its values (a reply may quote a person)."""
    (job,) = claimed_jobs(factory, clock, 1)
    _trip_on(factory, job.delivery_id)
    secret_reply = Outcome(Result.SENT, "250 ok for reader-secret@example.net", 250)

    async def run() -> BaseException:
        writer = new_writer(factory, database_url, clock)
        try:
            with pytest.raises(DBAPIError) as failed:
                await writer.add(job, secret_reply)
        finally:
            await writer.close()
        return failed.value

    error = asyncio.run(run())
    assert "refused" in str(error) and "reader-secret" not in str(error)
    assert "UPDATE deliveries" in str(error)
    assert delivery(factory, job.delivery_id).status == DeliveryStatus.CLAIMED


def test_outcome_arrays_store_naive_utc_and_refuse_a_naive_moment() -> None:
    """The arrays the PostgreSQL statement takes hold moments as UTCDateTime stores them (naive
    UTC, converted from any zone); a moment without a zone is refused, not guessed."""
    kyiv = timezone(timedelta(hours=2))
    row = OutcomeRow(7, DeliveryStatus.SENT, datetime(2026, 12, 6, 12, tzinfo=kyiv), None, "", None)
    arrays = outcome_arrays([row])
    assert arrays["sent_at"] == [datetime(2026, 12, 6, 10)] and arrays["next_at"] == [None]
    assert arrays["ids"] == [7] and arrays["statuses"] == ["sent"] and arrays["relays"] == [None]
    with pytest.raises(ValueError, match="naive"):
        outcome_arrays([row._replace(sent_at=datetime(2026, 12, 6, 12))])


def test_scrub_blanks_the_address_and_marks_only_control_characters() -> None:
    """NUL and escapes (PostgreSQL refuses a NUL) become U+FFFD; other characters a reply may
    hold stay, and the address goes whatever its case."""
    reply = "550 5.1.1 <Person2@Example.NET>\x00 \x1b[2J unknown\u200d \u00a0 \ud800 ok"
    assert ledger.scrub(reply, "person2@example.net") == (
        "550 5.1.1 <<recipient>>\ufffd \ufffd[2J unknown\u200d \u00a0 \ufffd ok"
    )
