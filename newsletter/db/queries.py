"""The queries that matter, named and in one place; each says why it has its shape."""

from __future__ import annotations

import functools
import json
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import (
    JSON,
    ColumnElement,
    Integer,
    Select,
    String,
    Table,
    and_,
    any_,
    bindparam,
    case,
    cast,
    delete,
    func,
    literal,
    or_,
    select,
    text,
    true,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from newsletter.db.models import (
    ActionCase,
    Campaign,
    CampaignKind,
    CampaignStatus,
    CaseLetter,
    CaseMessage,
    Delivery,
    DeliveryStatus,
    Event,
    Item,
    KeyNotice,
    KeyStatus,
    MailingList,
    ReaderKey,
    Subscriber,
    SubscriberStatus,
    Subscription,
    SubscriptionStatus,
    Suppression,
    UTCDateTime,
    Variant,
)

PENDING_STATUSES = (DeliveryStatus.QUEUED, DeliveryStatus.DEFERRED, DeliveryStatus.CLAIMED)
# The deliveries table itself, for the executemany updates below (no ORM work per row).
DELIVERIES: Table = Delivery.__table__  # type: ignore[assignment]


def _dialect(session: Session) -> str:
    return session.get_bind().dialect.name


def items_since(session: Session, cursor: int) -> Sequence[Item]:
    """Items ingested after the list's digest cursor, newest first.

    The window is by item id (ingest order), not by publication date: an item that arrives late
    with an old date still gets into the next digest, and none is counted twice.
    """
    stmt = select(Item).where(Item.id > cursor).order_by(Item.published_at.desc(), Item.id.desc())
    return session.scalars(stmt).all()


# --- the audience: who a list and a segment select (newsletter.audience compiles the filter) ----


def audience_query(list_id: int | None, segment: ColumnElement[bool] | None = None) -> Select[int]:
    """Subscriber ids a campaign to this list would reach: active people, active subscription.

    Unsubscribed, bounced and forgotten people are excluded here once, and again at claim time.
    One list per campaign and a join on its unique (subscriber, list) row: nobody appears twice,
    however many lists they share. With no list, an active subscription to any list (an EXISTS,
    so again nobody twice). `segment` is a compiled filter over Subscriber that narrows it.
    """
    if list_id is None:
        on_a_list = (
            select(Subscription.id)
            .where(
                Subscription.subscriber_id == Subscriber.id,
                Subscription.status == SubscriptionStatus.ACTIVE,
            )
            .exists()
        )
        stmt = select(Subscriber.id).where(on_a_list, Subscriber.status == SubscriberStatus.ACTIVE)
    else:
        stmt = (
            select(Subscriber.id)
            .join(Subscription, Subscription.subscriber_id == Subscriber.id)
            .where(
                Subscription.list_id == list_id,
                Subscription.status == SubscriptionStatus.ACTIVE,
                Subscriber.status == SubscriberStatus.ACTIVE,
            )
        )
    return stmt if segment is None else stmt.where(segment)


def count_audience(session: Session, audience: Select[int]) -> int:
    """How many people an audience query selects now."""
    return int(session.scalar(select(func.count()).select_from(audience.subquery())) or 0)


def insert_deliveries(
    session: Session, *, campaign_id: int, audience: Select[int], now: datetime
) -> int:
    """Insert one queued delivery per subscriber of `audience` in a single INSERT ... SELECT.

    ON CONFLICT DO NOTHING on (campaign_id, subscriber_id) makes a second enqueue harmless, and
    the audience never passes through Python, so memory does not grow with the list.
    """
    ids = audience.subquery()
    source = select(
        literal(campaign_id),
        ids.c.id,
        literal(DeliveryStatus.QUEUED.value),
        literal(0),
        literal(now, Delivery.next_attempt_at.type),
        literal(now, Delivery.created_at.type),
    ).where(true())  # SQLite needs a WHERE before ON CONFLICT in INSERT ... SELECT
    columns = [
        "campaign_id",
        "subscriber_id",
        "status",
        "attempts",
        "next_attempt_at",
        "created_at",
    ]
    insert = postgresql.insert if _dialect(session) == "postgresql" else sqlite.insert
    stmt = insert(Delivery).from_select(columns, source).on_conflict_do_nothing()
    # Counted before and after: psycopg reports no rowcount for INSERT ... SELECT here.
    before = count_deliveries(session, campaign_id)
    session.execute(stmt)
    return count_deliveries(session, campaign_id) - before


# The tables a send reads by key, claim after claim: PostgreSQL plans those statements by their
# statistics. Without them (a fresh database, a big import, a first campaign) it hash-joined
# every claim's 200 rows against a sequential scan of all subscribers and subscriptions: at
# 50,000 readers 40 ms of the server's CPU per claim instead of 1 ms, growing with the list,
# and autovacuum's own ANALYZE comes a minute later at the earliest.
SEND_TABLES = ("subscribers", "subscriptions", "deliveries")  # always in this order (locks)
# Statistics counting fewer rows than this share of what a launch just queued are stale.
STALE_SHARE = 0.8
# A smaller launch is left to autovacuum: scanning a few thousand rows per claim costs little.
ANALYZE_MIN_ROWS = 1000


def refresh_statistics(session: Session, *, added: int) -> list[str]:
    """On PostgreSQL, ANALYZE the tables a send reads whose statistics a launch of `added`
    deliveries left behind; returns the tables analysed (none on SQLite, which plans by rule,
    nor a table whose lock a VACUUM holds).

    In the launch's own transaction, so the deliveries it queued are counted (ANALYZE counts a
    transaction's own new rows as live) and no sender claims from the queue before the plans
    can see it. pg_class.reltuples, not the activity counters, which lag by seconds.
    """
    if _dialect(session) != "postgresql" or added < ANALYZE_MIN_ROWS:
        return []
    rows = session.execute(
        text(
            "SELECT relname, reltuples FROM pg_class WHERE oid IN"
            " (to_regclass('subscribers'), to_regclass('subscriptions'),"
            " to_regclass('deliveries'))"
        )
    )
    known: dict[str, float] = {str(name): float(tuples) for name, tuples in rows}
    # reltuples is -1 for a table never analysed; the audience is at most every subscriber
    # (and subscription), and the deliveries hold at least the ones just queued.
    stale = [t for t in SEND_TABLES if known.get(t, -1) < added * STALE_SHARE]
    if not stale:
        return []
    # A VACUUM that will not yield (one against wraparound) holds ANALYZE's lock for as long as
    # it runs: rather than hold the launch, give up after a moment and leave it to autovacuum.
    before = session.scalar(text("SELECT current_setting('lock_timeout')"))
    session.execute(text("SELECT set_config('lock_timeout', '2s', true)"))
    analysed = []
    for table in stale:  # names from SEND_TABLES, never outside text
        try:
            with session.begin_nested():
                session.execute(text(f"ANALYZE {table}"))
            analysed.append(table)
        except OperationalError:  # the lock time-out, rolled back to the savepoint
            continue
    session.execute(text("SELECT set_config('lock_timeout', :v, true)"), {"v": before})
    return analysed


# --- suppression: keyed address hashes (newsletter.suppression hashes, these look up) ----------


def find_suppressions(session: Session, email_hashes: Sequence[str]) -> list[str]:
    """Which of these keyed address hashes are suppressed.

    One look-up over the unique email_hash index, however many forms or rows (a CSV chunk of a
    thousand) ask: an IN list on SQLite; on PostgreSQL `= ANY` of an array made from one JSON
    parameter, so no statement with a placeholder per hash is built and parsed each time.
    """
    if not email_hashes:
        return []
    column = Suppression.email_hash
    if _dialect(session) == "postgresql":
        document = cast(bindparam(None, json.dumps(list(email_hashes)), type_=String()), JSON)
        hashes = select(cast(func.json_array_elements_text(document), column.type))
        which = column == any_(func.array(hashes.scalar_subquery()))
    else:
        which = column.in_(list(email_hashes))
    return list(session.scalars(select(column).where(which)))


def add_suppression(session: Session, *, email_hash: str, reason: str, now: datetime) -> bool:
    """Suppress a keyed address hash unless it already is; returns whether it was added.

    Looked up by the unique email_hash index first, so a second bounce adds no duplicate.
    """
    found = session.scalar(select(Suppression.id).where(Suppression.email_hash == email_hash))
    if found is not None:
        return False
    session.add(Suppression(email_hash=email_hash, reason=reason, created_at=now))
    return True


def delete_suppressions(session: Session, email_hashes: Sequence[str]) -> None:
    """Lift the suppression of these keyed address hashes (by the unique email_hash index)."""
    if email_hashes:
        session.execute(delete(Suppression).where(Suppression.email_hash.in_(list(email_hashes))))


def count_deliveries(session: Session, campaign_id: int) -> int:
    """How many deliveries a campaign has (walks the unique (campaign, subscriber) index)."""
    stmt = select(func.count()).select_from(Delivery).where(Delivery.campaign_id == campaign_id)
    return int(session.scalar(stmt) or 0)


def is_due(now: datetime) -> ColumnElement[bool]:
    """A delivery is due when queued or deferred until now, or claimed by a lease that ran out."""
    return or_(
        and_(
            Delivery.status.in_((DeliveryStatus.QUEUED, DeliveryStatus.DEFERRED)),
            Delivery.next_attempt_at <= now,
        ),
        and_(Delivery.status == DeliveryStatus.CLAIMED, Delivery.lease_until < now),
    )


# The claim on PostgreSQL 15 (EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) of one _claim UPDATE, batch
# of 500, after VACUUM ANALYZE; deliveries holds 300,000 rows: two finished digests of 100,000,
# all sent, and a running one with 5,000 of its 100,000 still queued):
#
#   Update on deliveries (actual rows=500 loops=1)
#     InitPlan 1 (returns $3)
#       ->  Limit (actual rows=500 loops=1)
#             ->  LockRows (actual rows=500 loops=1)
#                   ->  Bitmap Heap Scan on deliveries deliveries_1 (actual rows=500 loops=1)
#                         Recheck Cond: ((campaign_id = 1) AND ((status)::text = ANY
#                           ('{queued,deferred}'::text[])) AND (next_attempt_at <= '...'))
#                         Heap Blocks: exact=94
#                         ->  Bitmap Index Scan on ix_deliveries_due (actual rows=5000 loops=1)
#                               Index Cond: ((campaign_id = 1) AND ((status)::text = ANY
#                                 ('{queued,deferred}'::text[])) AND (next_attempt_at <= '...'))
#     ->  Index Scan using pk_deliveries on deliveries (actual rows=500 loops=1)
#           Index Cond: (id = ANY ($3))
#
# Only due rows of the one campaign are read (ix_deliveries_due), LockRows skips rows another
# worker holds, and the update reaches each picked row by primary key. At the start of a
# campaign, when nearly every row is due, the planner may read the table in order instead and
# stop after `limit` rows: just as cheap. (Written as id IN (SELECT ...), the update was a hash
# semi-join over a sequential scan of all 300,000 rows on every claim.)
def claim_batch(
    session: Session,
    *,
    now: datetime,
    lease_seconds: int,
    limit: int,
    campaign_id: int | None,
    worker: str = "",
) -> list[int]:
    """Claim up to `limit` due deliveries of running campaigns, alerts first; returns their ids
    in the order they should go (alerts first, then by campaign; by id within a campaign).

    Campaign by campaign (a handful of rows, alerts first), each claim is one UPDATE ... WHERE id
    IN (SELECT ... LIMIT n [FOR UPDATE SKIP LOCKED]) ... RETURNING that walks ix_deliveries_due:
    it reads only due rows, so a claim costs the same at the end of a 100,000-row campaign as at
    the start. On PostgreSQL concurrent workers skip each other's rows instead of waiting; on
    SQLite the statement holds the write lock, so two workers never claim the same row. Rows whose
    lease ran out (their worker died) are due again, after the waiting ones.
    """
    alert_first = case((Campaign.kind == CampaignKind.ALERT, 0), else_=1)
    pick = select(Campaign.id).where(Campaign.status == CampaignStatus.RUNNING)
    if campaign_id is not None:
        pick = pick.where(Campaign.id == campaign_id)
    claimed: list[int] = []
    lease = now + timedelta(seconds=lease_seconds)
    for cid in list(session.scalars(pick.order_by(alert_first, Campaign.id))):
        for due in (_waiting_due(now), _lease_expired(now)):
            if len(claimed) < limit:
                claimed += sorted(_claim(session, cid, due, limit - len(claimed), lease, worker))
    return claimed


def _waiting_due(now: datetime) -> ColumnElement[bool]:
    return and_(
        Delivery.status.in_((DeliveryStatus.QUEUED, DeliveryStatus.DEFERRED)),
        Delivery.next_attempt_at <= now,
    )


def _lease_expired(now: datetime) -> ColumnElement[bool]:
    return and_(Delivery.status == DeliveryStatus.CLAIMED, Delivery.lease_until < now)


def alert_due(session: Session, *, now: datetime, campaign_id: int | None = None) -> bool:
    """Whether a running alert (this one, if given) has deliveries due and not claimed.

    Read by every sender twice a second: the few running alerts by their state, then for each
    one row of the due index per condition, asked apart as the claim asks them (with an OR
    SQLite read every row of the alert, 200,000 in 28-53 ms).
    """
    running = select(Campaign.id).where(
        Campaign.kind == CampaignKind.ALERT, Campaign.status == CampaignStatus.RUNNING
    )
    if campaign_id is not None:
        running = running.where(Campaign.id == campaign_id)
    for alert in session.scalars(running).all():
        for due in (_waiting_due(now), _lease_expired(now)):
            found = select(Delivery.id).where(Delivery.campaign_id == alert, due).limit(1)
            if session.scalar(found) is not None:
                return True
    return False


def _claim(
    session: Session,
    campaign_id: int,
    due: ColumnElement[bool],
    limit: int,
    lease: datetime,
    worker: str,
) -> list[int]:
    pick = select(Delivery.id).where(Delivery.campaign_id == campaign_id, due).limit(limit)
    chosen: ColumnElement[bool] = Delivery.id.in_(pick.scalar_subquery())
    if _dialect(session) == "postgresql":
        # id = ANY(ARRAY(...)): the picked ids are computed once (an InitPlan) and the update
        # finds each by primary key. The plainer id IN (SELECT ...) became a hash semi-join
        # that scanned the whole table on every claim.
        pick = pick.with_for_update(skip_locked=True)
        chosen = Delivery.id == func.any(func.array(pick.scalar_subquery()))
    stmt = (
        update(Delivery)
        .where(chosen)
        .values(
            status=DeliveryStatus.CLAIMED,
            lease_until=lease,
            claimed_by=worker or None,
            attempts=Delivery.attempts + 1,
        )
        .returning(Delivery.id)
        .execution_options(synchronize_session=False)
    )
    return list(session.scalars(stmt).all())


def release_claims(session: Session, ids: Sequence[int], *, worker: str) -> int:
    """Give claimed rows that were never attempted back to the queue, as if never claimed.

    Guarded by claimed_by, so a worker never releases rows another worker reclaimed meanwhile.
    """
    if not ids:
        return 0
    return _unclaim(session, Delivery.id.in_(list(ids)), worker=worker)


def release_own_claims(session: Session, *, worker: str) -> int:
    """Give back every row this worker still holds: what it claimed and did not record.

    The database, not the sender, knows which rows these are (status claimed, claimed_by this
    worker): rows whose outcome was committed are no longer claimed. Served by
    ix_deliveries_claim (status first), so it reads only the few rows claimed right now.
    """
    return _unclaim(session, true(), worker=worker)


def _unclaim(session: Session, which: ColumnElement[bool], *, worker: str) -> int:
    stmt = (
        update(Delivery)
        .where(
            which,
            Delivery.status == DeliveryStatus.CLAIMED,
            Delivery.claimed_by == worker,
        )
        .values(
            status=DeliveryStatus.QUEUED,
            lease_until=None,
            claimed_by=None,
            attempts=Delivery.attempts - 1,
        )
        .execution_options(synchronize_session=False)
    )
    return int(session.execute(stmt).rowcount or 0)  # type: ignore[attr-defined]


def extend_leases(session: Session, *, worker: str, until: datetime) -> None:
    """Keep a live worker's claims from running out while it is still sending them.

    One UPDATE by claimed_by over the claimed rows (ix_deliveries_claim, status first), not by
    id: the database knows which rows the worker holds, whatever its queue looks like.
    """
    mine = and_(Delivery.status == DeliveryStatus.CLAIMED, Delivery.claimed_by == worker)
    session.execute(
        update(Delivery)
        .where(_not_locked(session, mine))
        .values(lease_until=until)
        .execution_options(synchronize_session=False)
    )


def _not_locked(session: Session, which: ColumnElement[bool]) -> ColumnElement[bool]:
    """`which`, less (on PostgreSQL) the rows another transaction holds locked right now.

    For the housekeeping statements that change many claimed rows at once (renewing leases,
    putting back dead workers' claims) while the ledger records outcomes. Waiting for a row the
    ledger is writing, while the ledger waits for one of ours, would be a deadlock, and
    PostgreSQL would break it off by failing one side, maybe the ledger's commit. A row the
    ledger holds is being recorded (it needs no lease), and the next sweep sees what is left.
    """
    if _dialect(session) != "postgresql":
        return which  # SQLite lets one transaction write at a time: no row locks to wait for
    # The ANY(ARRAY(...)) form of _claim: the locked ids once, then each by primary key.
    free = select(Delivery.id).where(which).with_for_update(skip_locked=True)
    return Delivery.id == func.any(func.array(free.scalar_subquery()))


def claim_holders(session: Session) -> list[str]:
    """The workers that hold claims now: one name per sender process, live or dead.

    DISTINCT over the claimed rows only (ix_deliveries_claim has status first): a handful of
    batches, however large the table.
    """
    stmt = (
        select(Delivery.claimed_by)
        .where(Delivery.status == DeliveryStatus.CLAIMED, Delivery.claimed_by.is_not(None))
        .distinct()
    )
    return [name for name in session.scalars(stmt) if name]


def release_expired(session: Session, *, now: datetime) -> int:
    """Put back claims whose lease ran out (their worker died), as queued and due.

    The same condition the claim uses for expired leases (_lease_expired); attempts stay
    counted, since the dead worker may have tried them.
    """
    return _put_back(session, _lease_expired(now))


def release_claims_of(session: Session, workers: Iterable[str]) -> int:
    """Put back, at once, every claim of workers known to be gone, as an expired lease would be."""
    names = list(workers)
    if not names:
        return 0
    return _put_back(
        session, and_(Delivery.status == DeliveryStatus.CLAIMED, Delivery.claimed_by.in_(names))
    )


def _put_back(session: Session, which: ColumnElement[bool]) -> int:
    stmt = (
        update(Delivery)
        .where(_not_locked(session, which))
        .values(status=DeliveryStatus.QUEUED, lease_until=None, claimed_by=None)
        .execution_options(synchronize_session=False)
    )
    return int(session.execute(stmt).rowcount or 0)  # type: ignore[attr-defined]


# --- what the sender reads and writes around each batch ---------------------------------------


class ClaimedRow(NamedTuple):
    """A claimed delivery with what the sender needs to address and build its message."""

    delivery_id: int
    campaign_id: int
    attempts: int
    created_at: datetime
    requeued_at: datetime | None
    subscriber_id: int
    email: str
    name: str
    language: str
    subscriber_status: str
    subscription_status: str | None  # None: no subscription row for the campaign's list
    discreet: str
    on_key_problem: str
    key_status: str | None  # active, removed or revoked; None: no key
    key_fingerprint: str | None
    key_armored: str | None
    key_expires_at: datetime | None
    key_recheck_at: datetime | None

    @property
    def may_be_mailed(self) -> bool:
        """Still an active person with an active subscription to the campaign's list."""
        return (
            self.subscriber_status == SubscriberStatus.ACTIVE
            and self.subscription_status == SubscriptionStatus.ACTIVE
        )


def _claimed_rows() -> Select[*tuple[Any, ...]]:
    """The claimed rows' select, its delivery ids still to be named."""
    return (
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
            Subscriber.discreet,
            Subscriber.on_key_problem,
            ReaderKey.status,
            ReaderKey.fingerprint,
            ReaderKey.armored,
            ReaderKey.expires_at,
            ReaderKey.recheck_at,
        )
        .join(Subscriber, Subscriber.id == Delivery.subscriber_id)
        .join(Campaign, Campaign.id == Delivery.campaign_id)
        .outerjoin(
            Subscription,
            (Subscription.subscriber_id == Subscriber.id)
            & (Subscription.list_id == Campaign.list_id),
        )
        # At most one of a reader's keys is active, removed or revoked (readers.py keeps it
        # so); a pending key is not used until it is proven.
        .outerjoin(
            ReaderKey,
            (ReaderKey.subscriber_id == Subscriber.id)
            & ReaderKey.status.in_([KeyStatus.ACTIVE, KeyStatus.REMOVED, KeyStatus.REVOKED]),
        )
    )


# Built once, not at every claim (building the select cost more than running it on SQLite).
# On PostgreSQL the ids are one array parameter: the same statement every claim, so psycopg
# prepares it and the server plans it once, where 200 parameters were parsed and planned anew.
_CLAIMED_BY_ARRAY = _claimed_rows().where(
    Delivery.id == any_(bindparam("ids", type_=postgresql.ARRAY(Integer)))
)
_CLAIMED_BY_LIST = _claimed_rows().where(Delivery.id.in_(bindparam("ids", expanding=True)))


def load_claimed(session: Session, ids: Sequence[int]) -> list[ClaimedRow]:
    """The claimed rows with their person and subscription, read at send time, in the order of
    `ids` (claim_batch's: alerts first).

    Read after the claim, not at enqueue: an unsubscribe or bounce made a second ago shows here.
    The outer join to the subscription keeps rows whose subscription row is gone, so they are
    skipped (see skip_left) rather than silently left claimed. Reached by primary key.
    """
    pg = _dialect(session) == "postgresql"
    stmt = _CLAIMED_BY_ARRAY if pg else _CLAIMED_BY_LIST
    # On the connection: plain rows, without the ORM's loading machinery.
    result = session.connection().execute(stmt, {"ids": list(ids)})
    order = {delivery_id: place for place, delivery_id in enumerate(ids)}
    rows = [ClaimedRow._make(row) for row in result.all()]
    return sorted(rows, key=lambda row: order[row.delivery_id])


def skip_left(session: Session, ids: Sequence[int], *, reason: str = "left before sending") -> None:
    """Deliveries not sent on purpose: to people who left the list (or bounced) since enqueue,
    or a case's update none of whose earlier messages reached its reader (`reason`).

    Marked suppressed with the reason, not deleted: the record says who was skipped and why.
    """
    if ids:
        session.execute(
            update(DELIVERIES)
            .where(DELIVERIES.c.id.in_(list(ids)))
            .values(
                status=DeliveryStatus.SUPPRESSED,
                lease_until=None,
                claimed_by=None,
                last_reply=reason[:1000],
            )
        )


def withhold(session: Session, reasons: Sequence[tuple[int, str]]) -> None:
    """Deliveries not sent because the reader's key cannot be used and they chose `withhold`.

    Kept with the reason (never the message): the record says what was held back and why.
    """
    for delivery_id, reason in reasons:
        session.execute(
            update(DELIVERIES)
            .where(DELIVERIES.c.id == delivery_id)
            .values(
                status=DeliveryStatus.WITHHELD,
                lease_until=None,
                claimed_by=None,
                last_reply=reason[:1000],
            )
        )


def owe_key_notices(
    session: Session, problems: Sequence[tuple[int, str, str]], *, now: datetime
) -> None:
    """Owe one notice per (reader, key, problem); a problem already owed or told adds nothing."""
    if not problems:
        return
    insert = postgresql.insert if _dialect(session) == "postgresql" else sqlite.insert
    rows = [
        {"subscriber_id": sid, "fingerprint": fpr, "problem": problem, "created_at": now}
        for sid, fpr, problem in dict.fromkeys(problems)
    ]
    session.execute(insert(KeyNotice).values(rows).on_conflict_do_nothing())


def stopped_campaigns(session: Session, campaign_ids: Iterable[int]) -> set[int]:
    """Which of these campaigns are no longer running (paused, cancelled, finished).

    Polled twice a second by every sender, so it reads only the campaigns the sender has in
    hand, by primary key, and nothing when it has none.
    """
    ids = list(campaign_ids)
    if not ids:
        return set()
    stmt = select(Campaign.id).where(
        Campaign.id.in_(ids), Campaign.status != CampaignStatus.RUNNING
    )
    return set(session.scalars(stmt))


def load_variant(
    session: Session, campaign_id: int, lang: str
) -> tuple[Variant, MailingList] | None:
    """A campaign's rendered variant in one language, with its list; once per worker and language.

    One row by the variants' (campaign, lang) pair and two primary keys.
    """
    row = session.execute(
        select(Variant, MailingList)
        .join(Campaign, Campaign.id == Variant.campaign_id)
        .join(MailingList, MailingList.id == Campaign.list_id)
        .where(Variant.campaign_id == campaign_id, Variant.lang == lang)
    ).first()
    return None if row is None else (row[0], row[1])


# The ledger's writes, guarded by status = claimed, so an outcome never overwrites a row that was
# released and recorded elsewhere meanwhile. A row's sent_at or next_attempt_at is None where
# the outcome leaves that column as it is (sent: next_attempt_at; deferred or failed: sent_at).
# SQLite before 3.33 (no UPDATE ... FROM): one executemany on the session's connection.
_ONE_OUTCOME = (
    update(DELIVERIES)
    .where(
        DELIVERIES.c.id == bindparam("b_id"),
        DELIVERIES.c.status == DeliveryStatus.CLAIMED,
    )
    .values(
        status=bindparam("b_status"),
        sent_at=func.coalesce(bindparam("b_at", type_=UTCDateTime()), DELIVERIES.c.sent_at),
        next_attempt_at=func.coalesce(
            bindparam("b_next", type_=UTCDateTime()), DELIVERIES.c.next_attempt_at
        ),
        last_reply=bindparam("b_reply"),
        relay=bindparam("b_relay"),
        lease_until=None,
        claimed_by=None,
    )
)
# PostgreSQL: one statement for the whole group, its rows given as arrays (unnest). Plain SQL
# for the driver, so that the sender's writer can run it on its event loop (ledger.py) as well
# as in a session. The timestamps are naive UTC, as UTCDateTime stores them. Arrays, not one
# JSON parameter (cheaper to build): PostgreSQL plans unnest() for the rows it is given, but
# json_to_recordset() for 100, and then scanned every claimed row's index entry at each commit
# (measured: 1,190-1,230 msg/s at 100k against 1,750, the server's CPU per commit tripled).
OUTCOMES_SQL = """UPDATE deliveries AS d SET status = v.status,
    sent_at = coalesce(v.sent_at, d.sent_at),
    next_attempt_at = coalesce(v.next_at, d.next_attempt_at),
    last_reply = v.reply, relay = v.relay, lease_until = NULL, claimed_by = NULL
FROM unnest(%(ids)s::bigint[], %(statuses)s::varchar[], %(sent_at)s::timestamp[],
    %(next_at)s::timestamp[], %(replies)s::varchar[], %(relays)s::varchar[])
    AS v(id, status, sent_at, next_at, reply, relay)
WHERE d.id = v.id AND d.status = 'claimed'"""


class OutcomeRow(NamedTuple):
    """One delivery's outcome as record_outcomes writes it to the delivery's row."""

    delivery_id: int
    status: DeliveryStatus
    sent_at: datetime | None  # None: left as it is
    next_attempt_at: datetime | None  # None: left as it is
    reply: str
    relay: str | None


def record_outcomes(session: Session, rows: Sequence[OutcomeRow]) -> None:
    """Write outcomes to their claimed deliveries, in one statement on PostgreSQL."""
    if not rows:
        return
    connection = session.connection()
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(OUTCOMES_SQL, outcome_arrays(rows))
    elif sqlite3.sqlite_version_info >= (3, 33):
        stamp = _sqlite_stamp(connection.dialect)
        for start in range(0, len(rows), SQLITE_OUTCOMES_PER_STATEMENT):
            chunk = rows[start : start + SQLITE_OUTCOMES_PER_STATEMENT]
            values: list[object] = []
            for row in chunk:
                values += (
                    row.delivery_id,
                    str(row.status),
                    stamp(row.sent_at),
                    stamp(row.next_attempt_at),
                    row.reply,
                    row.relay,
                )
            connection.exec_driver_sql(_sqlite_outcomes_sql(len(chunk)), tuple(values))
    else:
        params = [dict(zip(_PARAMS, row, strict=True)) for row in rows]
        connection.execute(_ONE_OUTCOME, params)


# SQLite: a group's rows in one statement as well (UPDATE ... FROM a VALUES list, looked up by
# primary key). An executemany ran SQLite once per row, and each run let go of the GIL and took
# it back: in the sender, with the event loop busy, every taking back waited its turn, and a
# commit of ten outcomes took 0.69 ms in the ledger's thread against 0.50 ms for one statement.
# 150 rows (900 parameters) keep under the 999 that SQLite builds before 3.32 allowed.
SQLITE_OUTCOMES_PER_STATEMENT = 150


@functools.cache
def _sqlite_outcomes_sql(count: int) -> str:
    """The statement for `count` outcomes (made once per group size)."""
    values = ", ".join(["(?, ?, ?, ?, ?, ?)"] * count)
    return (
        "UPDATE deliveries SET status = v.column2,"
        " sent_at = coalesce(v.column3, deliveries.sent_at),"
        " next_attempt_at = coalesce(v.column4, deliveries.next_attempt_at),"
        " last_reply = v.column5, relay = v.column6, lease_until = NULL, claimed_by = NULL"
        f" FROM (VALUES {values}) AS v"
        " WHERE deliveries.id = v.column1 AND deliveries.status = 'claimed'"
    )


@functools.cache
def _sqlite_stamp(dialect: Dialect) -> Callable[[datetime | None], object]:
    """A moment as the dialect stores a UTCDateTime (SQLite: text in SQLAlchemy's format)."""
    bind = UTCDateTime().dialect_impl(dialect).bind_processor(dialect)
    assert bind is not None
    return bind


def outcome_arrays(rows: Sequence[OutcomeRow]) -> dict[str, list[object]]:
    """OUTCOMES_SQL's parameters for these rows: one array per column."""
    return {
        "ids": [row.delivery_id for row in rows],
        "statuses": [str(row.status) for row in rows],
        "sent_at": [_naive_utc(row.sent_at) for row in rows],
        "next_at": [_naive_utc(row.next_attempt_at) for row in rows],
        "replies": [row.reply for row in rows],
        "relays": [row.relay for row in rows],
    }


def _naive_utc(moment: datetime | None) -> datetime | None:
    """As UTCDateTime stores a moment: naive UTC; a naive one is refused, not guessed."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        raise ValueError("naive datetime given to a UTC column")
    return moment.astimezone(UTC).replace(tzinfo=None)


# _ONE_OUTCOME's parameters, in OutcomeRow's order.
_PARAMS = ("b_id", "b_status", "b_at", "b_next", "b_reply", "b_relay")


def mark_bounced(session: Session, subscriber_id: int) -> bool:
    """A person whose mailbox was refused for good is bounced: never claimed for mail again.

    False for someone forgotten meanwhile (their message was in flight): the erased record
    stays as it is, with nothing more said about them.
    """
    done = session.execute(
        update(Subscriber)
        .where(Subscriber.id == subscriber_id, Subscriber.status != SubscriberStatus.FORGOTTEN)
        .values(status=SubscriberStatus.BOUNCED)
    )
    return getattr(done, "rowcount", 0) == 1


def running_campaigns(session: Session) -> list[int]:
    """Ids of campaigns that are sending (a handful; campaigns are few)."""
    stmt = select(Campaign.id).where(Campaign.status == CampaignStatus.RUNNING)
    return list(session.scalars(stmt))


def finish_campaign(session: Session, *, campaign_id: int, now: datetime) -> bool:
    """Mark a running campaign finished if none of its deliveries is pending; True if this won.

    The pending count walks ix_deliveries_due (campaign first). The change is one conditional
    UPDATE ... RETURNING, so of two workers finishing together only one wins.
    """
    if count_pending(session, campaign_id):
        return False
    won = session.execute(
        update(Campaign)
        .where(Campaign.id == campaign_id, Campaign.status == CampaignStatus.RUNNING)
        .values(status=CampaignStatus.FINISHED, finished_at=now)
        .returning(Campaign.id)
        .execution_options(synchronize_session=False)
    ).scalar()
    if won is None:
        return False
    loaded = session.get(Campaign, campaign_id)
    if loaded is not None:
        session.refresh(loaded)  # a Campaign already in this session shows the new status
    return True


def requeue_failed(session: Session, *, campaign_id: int, now: datetime) -> int:
    """Queue a campaign's failed deliveries again, only for people who may still be mailed.

    The retry deadline restarts from now (requeued_at); sent, suppressed and bounced stay as
    they are.
    """
    mailable = select(Subscriber.id).where(Subscriber.status == SubscriberStatus.ACTIVE)
    stmt = (
        update(Delivery)
        .where(
            Delivery.campaign_id == campaign_id,
            Delivery.status == DeliveryStatus.FAILED,
            Delivery.subscriber_id.in_(mailable.scalar_subquery()),
        )
        .values(
            status=DeliveryStatus.QUEUED,
            next_attempt_at=now,
            requeued_at=now,
            lease_until=None,
            claimed_by=None,
        )
        .execution_options(synchronize_session=False)
    )
    return int(session.execute(stmt).rowcount or 0)  # type: ignore[attr-defined]


def recent_sends(session: Session, *, relay: str, since: datetime) -> list[datetime]:
    """When each message a relay carried since `since` was accepted (for its hourly cap).

    No index serves (relay, sent_at), so this reads the table: it runs once when a pool opens
    (smtp.open_pool), and only for relays that have an hourly cap.
    """
    stmt = (
        select(Delivery.sent_at)
        .where(Delivery.relay == relay, Delivery.sent_at >= since)
        .order_by(Delivery.sent_at)
    )
    return [t for t in session.scalars(stmt) if t is not None]


def count_pending(session: Session, campaign_id: int) -> int:
    """How many deliveries of a campaign are not yet in a final state."""
    stmt = select(func.count()).where(
        Delivery.campaign_id == campaign_id, Delivery.status.in_(PENDING_STATUSES)
    )
    return int(session.scalar(stmt) or 0)


def delivery_counts(session: Session, campaign_id: int) -> dict[str, int]:
    """Deliveries of a campaign by status."""
    stmt = (
        select(Delivery.status, func.count())
        .where(Delivery.campaign_id == campaign_id)
        .group_by(Delivery.status)
    )
    return {str(status): int(n) for status, n in session.execute(stmt)}


def count_due(session: Session, *, now: datetime, campaign_id: int | None) -> int:
    """How many deliveries of running campaigns a sender would claim now (for progress bars)."""
    stmt = (
        select(func.count())
        .select_from(Delivery)
        .join(Campaign, Campaign.id == Delivery.campaign_id)
        .where(Campaign.status == CampaignStatus.RUNNING, is_due(now))
    )
    if campaign_id is not None:
        stmt = stmt.where(Delivery.campaign_id == campaign_id)
    return int(session.scalar(stmt) or 0)


def campaign_events(session: Session, campaign_id: int, *, action: str) -> list[Event]:
    """A campaign's events of one kind (e.g. check overrides), oldest first.

    Filtered by action in SQL and by campaign in Python: the campaign id sits in the JSON
    detail, which SQLite and PostgreSQL query differently, and these events are few.
    """
    stmt = select(Event).where(Event.action == action).order_by(Event.id)
    return [e for e in session.scalars(stmt) if (e.detail or {}).get("campaign") == campaign_id]


# --- the messages of a case ----------------------------------------------------------------------


def case_of(session: Session, campaign_id: int) -> int | None:
    """The case a campaign is a message of, or None."""
    stmt = select(CaseMessage.case_id).where(CaseMessage.campaign_id == campaign_id)
    return session.scalar(stmt)


def earlier_case_messages(session: Session, campaign_id: int) -> tuple[int, ...]:
    """The campaigns of the same case made before this one, oldest first (() outside a case)."""
    case_id = case_of(session, campaign_id)
    if case_id is None:
        return ()
    stmt = (
        select(CaseMessage.campaign_id)
        .where(CaseMessage.case_id == case_id, CaseMessage.campaign_id < campaign_id)
        .order_by(CaseMessage.campaign_id)
    )
    return tuple(session.scalars(stmt))


def postpone_claims(session: Session, ids: Sequence[int], *, until: datetime) -> None:
    """Put claimed rows back in the queue, due at `until`, as if they had not been claimed."""
    if not ids:
        return
    session.execute(
        update(Delivery)
        .where(Delivery.id.in_(list(ids)), Delivery.status == DeliveryStatus.CLAIMED)
        .values(
            status=DeliveryStatus.QUEUED,
            lease_until=None,
            claimed_by=None,
            attempts=Delivery.attempts - 1,
            next_attempt_at=until,
        )
        .execution_options(synchronize_session=False)
    )


def fold_letters(session: Session, subscriber_id: int) -> None:
    """Delete a reader's "I sent my letter" rows, each still counted on its case."""
    case_ids = list(
        session.scalars(select(CaseLetter.case_id).where(CaseLetter.subscriber_id == subscriber_id))
    )
    if not case_ids:
        return
    session.execute(
        update(ActionCase)
        .where(ActionCase.id.in_(case_ids))
        .values(wrote_total=ActionCase.wrote_total + 1)
        .execution_options(synchronize_session=False)
    )
    session.execute(delete(CaseLetter).where(CaseLetter.subscriber_id == subscriber_id))


def drop_pending(session: Session, campaign_id: int, *, reason: str) -> int:
    """Give up a campaign's deliveries not sent and not in flight (queued or deferred)."""
    stmt = (
        update(Delivery)
        .where(
            Delivery.campaign_id == campaign_id,
            Delivery.status.in_((DeliveryStatus.QUEUED, DeliveryStatus.DEFERRED)),
        )
        .values(status=DeliveryStatus.SUPPRESSED, last_reply=reason[:1000])
        .execution_options(synchronize_session=False)
    )
    return int(session.execute(stmt).rowcount or 0)  # type: ignore[attr-defined]


# Every custom key stored for anyone (a JSON object's keys; anything else has none).
_SQLITE_ATTRIBUTE_KEYS = text(
    "SELECT DISTINCT k.key FROM subscribers, json_each(subscribers.attributes) AS k"
    " WHERE json_type(subscribers.attributes) = 'object'"
)
_PG_ATTRIBUTE_KEYS = text(
    "SELECT DISTINCT json_object_keys(attributes) FROM subscribers"
    " WHERE json_typeof(attributes) = 'object'"
)


def stored_attribute_keys(session: Session) -> set[str]:
    """The custom attribute keys stored for anyone (one scan of the subscribers)."""
    postgres = session.get_bind().dialect.name == "postgresql"
    return set(session.scalars(_PG_ATTRIBUTE_KEYS if postgres else _SQLITE_ATTRIBUTE_KEYS))
