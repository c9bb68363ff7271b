"""Import: checked CSV rows written as subscribers and subscriptions, chunk by chunk.

Rows are written in chunks, each with a handful of bulk statements (look up the chunk's addresses
and suppression hashes, insert the new people, update the known ones, add missing subscriptions),
so time grows with the file and memory does not. On PostgreSQL each statement takes the chunk as
one JSON parameter (json_to_recordset, or an array for `= ANY`); on SQLite, Core executemany.
Only people known before a chunk are asked for their subscriptions. Each chunk is written in a
savepoint: if the database refuses it, its rows are written one by one and only the refused row
is rejected. On PostgreSQL a chunk's last statement (its new subscriptions, which return nothing)
is sent without waiting: the next chunk is read and checked while the database works, and the
savepoint is released only once that statement has succeeded (see _finish).
Nobody who unsubscribed, bounced, was forgotten or is suppressed is brought back. Custom
attribute keys stored for anyone stay within MAX_ATTRIBUTES, so an export always reads back: a
row bringing a new key past that is rejected, naming the column.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    String,
    Table,
    Text,
    any_,
    bindparam,
    cast,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, StatementError
from sqlalchemy.orm import Session

from newsletter.audit import record_event
from newsletter.db.models import (
    DiscreetMode,
    KeyProblemChoice,
    MailingList,
    ReaderKey,
    Subscriber,
    SubscriberStatus,
    Subscription,
    SubscriptionStatus,
    UTCDateTime,
)
from newsletter.db.queries import stored_attribute_keys
from newsletter.errors import AudienceError
from newsletter.lists import get_list
from newsletter.openpgp import KeyInfo, KeyProblem, read_key
from newsletter.readers import key_row
from newsletter.subscriber_csv import (
    CHUNK_ROWS,
    MAX_ATTRIBUTES,
    RawRow,
    RowResult,
    SubscriberRow,
    merge_rows,
    parse_row,
)
from newsletter.suppression import KEPT_OUT_STATUSES, suppressed_forms


@dataclass
class ImportReport:
    imported: int = 0
    updated: int = 0
    unchanged: int = 0
    kept_out: int = 0
    duplicates: int = 0
    rejected: int = 0
    pending: int = 0
    keys: int = 0
    rejects: list[tuple[int, str]] = field(default_factory=list)

    def absorb(self, part: ImportReport) -> None:
        """Add the figures of one written chunk."""
        self.imported += part.imported
        self.updated += part.updated
        self.unchanged += part.unchanged
        self.kept_out += part.kept_out
        self.duplicates += part.duplicates
        self.pending += part.pending
        self.keys += part.keys

    def counts(self) -> dict[str, int]:
        """The figures people and scripts want, by name."""
        return {
            "imported": self.imported,
            "updated": self.updated,
            "unchanged": self.unchanged,
            "kept_out": self.kept_out,
            "duplicates": self.duplicates,
            "rejected": self.rejected,
            "awaiting_confirmation": self.pending,
            "keys": self.keys,
        }


# A database error that is about one row's values; any other (connection lost, a bug) stops.
ROW_REFUSALS = (DataError, IntegrityError)


RejectSink = Callable[[int, str, RawRow | None], None]


@dataclass(frozen=True)
class _Target:
    lists: dict[str, MailingList]
    default_list: str | None
    confirmed: bool
    secret: str
    now: datetime
    postgres: bool  # rows and look-ups go as JSON parameters (see _among, _PG_INSERT_...)
    attribute_keys: set[str]  # custom keys stored for anyone, and those rows taken so far add


Checked = tuple[int, RawRow | None, SubscriberRow]  # line, row as read, row as parsed
Rejected = tuple[int, str, RawRow | None]  # line, reason, row as read


@dataclass
class _Batch:
    """Rows read and checked: the rejects met since the last batch, in file order, then a chunk
    to write (full, or the file's last), the keys its rows gave (as read_key read them, by
    their armored text: each checked once), and the line reached."""

    rejects: list[Rejected] = field(default_factory=list)
    chunk: list[Checked] = field(default_factory=list)
    keys: dict[str, KeyInfo] = field(default_factory=dict)
    line: int = 0
    full: bool = False  # the chunk has chunk_rows rows (progress is reported after it)


def import_rows(
    *,
    session: Session,
    rows: Iterable[RowResult],
    default_list: str | None,
    confirmed: bool,
    secret: str,
    now: datetime,
    actor: str,
    source: str = "",
    on_reject: RejectSink | None = None,
    on_progress: Callable[[int], None] | None = None,
    chunk_rows: int = CHUNK_ROWS,
) -> ImportReport:
    """Import CSV rows in chunks; bad rows are rejected with their line number, good rows go in.

    Never resubscribes anyone who unsubscribed (from the service or from a list), bounced or
    was forgotten; re-importing the same rows changes nothing.
    """
    lists = {ml.slug: ml for ml in session.scalars(select(MailingList))}
    if default_list and default_list not in lists:
        get_list(session, default_list)  # raises with the known lists
    postgres = session.get_bind().dialect.name == "postgresql"
    keys = stored_attribute_keys(session)
    target = _Target(lists, default_list, confirmed, secret, now, postgres, keys)
    report = ImportReport()
    # The start is an event of its own: the audit trail is append-only, so the counts go in a
    # second event at the end rather than into this one.
    record_event(session, now=now, actor=actor, action="subscribers.import_started", source=source)
    # A write first: SQLite's driver begins the transaction only at a write, and a savepoint
    # taken before that would commit on release instead of nesting in the import's transaction.
    session.flush()

    def reject(line: int, reason: str, raw: RawRow | None) -> None:
        report.rejected += 1
        if on_reject is None:
            report.rejects.append((line, reason))
        else:
            on_reject(line, reason, raw)

    batches = _batches(rows, target, chunk_rows)
    ahead: list[_Batch | None] = []  # the next batch, once read

    def read_next() -> None:
        """Read the next batch, once: while a chunk's last statement runs, if it can."""
        if not ahead:
            ahead.append(next(batches, None))

    batch: _Batch | None = next(batches)
    last_line = 0
    while batch is not None:
        for rejected in batch.rejects:
            reject(*rejected)
        if batch.chunk:
            _write_chunk(session, batch.chunk, batch.keys, target, report, reject, read_next)
        read_next()
        last_line = batch.line
        if batch.full and on_progress:
            on_progress(last_line)
        batch = ahead.pop()
    if on_progress:
        on_progress(last_line)
    record_event(
        session, now=now, actor=actor, action="subscribers.import", source=source, **report.counts()
    )
    session.flush()
    return report


def _batches(rows: Iterable[RowResult], target: _Target, chunk_rows: int) -> Iterator[_Batch]:
    """The rows checked and cut into chunks of chunk_rows good rows, rejects kept in order; the
    last batch (maybe with no rows) ends at the file's last line."""
    batch = _Batch()
    for line, raw, error in rows:
        batch.line = line
        row = _checked(raw, error, target, batch.keys)
        if isinstance(row, str):
            batch.rejects.append((line, row, raw))
            continue
        batch.chunk.append((line, raw, row))
        if len(batch.chunk) >= chunk_rows:
            batch.full = True
            yield batch
            batch = _Batch(line=line)
    yield batch


def _checked(
    raw: RawRow | None, error: str, target: _Target, keys: dict[str, KeyInfo]
) -> SubscriberRow | str:
    """The row, parsed and with its lists resolved, or the reason it is rejected; a key it
    gives is read once and kept in `keys` by its armored text."""
    if raw is None or error:
        return error
    try:
        row = parse_row(raw)
    except AudienceError as e:
        return str(e)
    wanted = row.lists or ((target.default_list,) if target.default_list else ())
    unknown = [s for s in wanted if s not in target.lists]
    if unknown:
        return f"unknown list {unknown[0]!r}"
    key = row.openpgp_key
    if key:  # checked as `subscribers key` checks it; the file's word stands for the proof
        try:
            info = read_key(key, email=row.email, now=target.now)
        except KeyProblem as problem:
            return f"openpgp_key: {problem}"
        key, keys[info.armored] = info.armored, info
    new_keys = row.attributes.keys() - target.attribute_keys
    if new_keys:  # rare: only a file's first rows with a column bring one
        if len(target.attribute_keys) + len(new_keys) > MAX_ATTRIBUTES:
            return (
                f"column {min(new_keys)!r}: a custom column past the {MAX_ATTRIBUTES} "
                "kept for everyone (export could not be imported back)"
            )
        target.attribute_keys.update(new_keys)  # a row the database refuses over-counts
    if wanted == row.lists and key == row.openpgp_key:
        return row  # as almost every row is: no copy
    return replace(row, lists=tuple(wanted), openpgp_key=key)


def _write_chunk(
    session: Session,
    chunk: list[Checked],
    keys: dict[str, KeyInfo],
    target: _Target,
    report: ImportReport,
    reject: RejectSink,
    meanwhile: Callable[[], None] | None = None,
) -> None:
    """Write a chunk in a savepoint; if the database refuses it, write its rows one at a time.

    So a value the checks above did not foresee rejects only its own row. The reason names the
    error's kind only: a database error's text may quote other rows' values. `meanwhile` is
    called while the chunk's last statement runs, inside the savepoint (see _finish).
    """
    part = ImportReport()
    try:
        with session.begin_nested():
            last = _import_chunk(session, [row for _, _, row in chunk], keys, target, part)
            _finish(session, last, meanwhile)
    except StatementError as e:
        if isinstance(e, DBAPIError) and not isinstance(e, ROW_REFUSALS):
            raise
        if len(chunk) > 1:
            for one in chunk:
                _write_chunk(session, [one], keys, target, report, reject)
            return
        line, raw, _ = chunk[0]
        reject(line, f"the database refused this row ({type(e).__name__})", raw)
        return
    report.absorb(part)


Deferred = tuple[str, dict[str, Any]]  # a PostgreSQL statement (psycopg's style) and its values


def _finish(session: Session, last: Deferred | None, meanwhile: Callable[[], None] | None) -> None:
    """Run a chunk's last statement and call `meanwhile`, overlapped on PostgreSQL.

    The statement is sent in psycopg's pipeline mode and `meanwhile` (reading the next chunk,
    which touches no database) runs before its result is awaited; leaving the pipeline awaits
    it, so the savepoint is released, or rolled back on an error, only after. An error comes as
    SQLAlchemy's (IntegrityError, DataError...) without its values, as the session's would.
    """
    if last is None:
        if meanwhile is not None:
            meanwhile()
        return
    import psycopg  # here, not at the top: SQLite runs (and every command) need not load libpq

    statement, values = last
    connection = session.connection().connection.dbapi_connection
    if not isinstance(connection, psycopg.Connection):  # make_engine gives psycopg (pyproject)
        raise TypeError("PostgreSQL is reached through psycopg 3 (postgresql+psycopg://)")
    try:
        with connection.pipeline():
            connection.execute(statement, values)
            if meanwhile is not None:
                meanwhile()
    except psycopg.Error as e:
        raise DBAPIError.instance(statement, None, e, psycopg.Error, hide_parameters=True) from e


def _import_chunk(
    session: Session,
    rows: list[SubscriberRow],
    keys: dict[str, KeyInfo],
    target: _Target,
    report: ImportReport,
) -> Deferred | None:
    """Write one chunk with a few bulk statements; on PostgreSQL the last one, the new
    subscriptions, is returned for _finish to run."""
    merged: dict[str, SubscriberRow] = {}
    for row in rows:
        if row.email in merged:
            report.duplicates += 1
            merged[row.email] = merge_rows(merged[row.email], row)
        else:
            merged[row.email] = row
    forms = {form: row.email for row in merged.values() for form in row.older_forms}
    forms.update({email: email for email in merged})
    known = {
        forms[r.email]: r
        for r in session.execute(
            select(
                Subscriber.id,
                Subscriber.email,
                Subscriber.status,
                Subscriber.name,
                Subscriber.country,
                cast(Subscriber.tags, Text).label("tags"),  # JSON, read only when needed
                cast(Subscriber.attributes, Text).label("attributes"),
                Subscriber.discreet,
                Subscriber.on_key_problem,
            ).where(_among(Subscriber.email, list(forms), target.postgres))
        )
    }
    suppressed = {forms[f] for f in suppressed_forms(session, forms, secret=target.secret)}
    ids: dict[str, int] = {}
    new: list[SubscriberRow] = []
    changes: list[dict[str, Any]] = []
    for email, row in merged.items():
        old = known.get(email)
        if email in suppressed or (old is not None and old.status in KEPT_OUT_STATUSES):
            report.kept_out += 1
        elif old is None:
            new.append(row)
        else:
            ids[email] = old.id
            change = _fill_in(old, row)
            if old.email != email:  # stored in an older form: now the deliverable one
                change["email"] = email
            if change:
                changes.append({"id": old.id, **change})
    known_ids = set(ids.values())  # people inserted below have no subscriptions yet
    ids.update(_insert_subscribers(session, new, target))
    _update_subscribers(session, changes, target.postgres)
    wanted = {ids[email]: merged[email].lists for email in ids}
    subscribed, last = _add_subscriptions(session, wanted, known_ids, target, report)
    changed = {c["id"] for c in changes} | subscribed
    given = {ids[e]: r for e, r in merged.items() if e in ids}
    report.keys += _add_keys(session, given, keys, target)
    report.imported += len(new)
    for email in ids.keys() - {r.email for r in new}:
        if ids[email] in changed:
            report.updated += 1
        else:
            report.unchanged += 1
    return last


def _among(column: Any, values: list[Any], postgres: bool) -> Any:
    """`column IN values`; on PostgreSQL `= ANY` of an array made from one JSON parameter.

    So no statement with a placeholder per value is built and parsed for every chunk, and the
    values go as one string (psycopg dumps a list value by value, in Python).
    """
    if not postgres:
        return column.in_(values)
    document = cast(bindparam(None, json.dumps(values), type_=String()), JSON)
    listed = select(cast(func.json_array_elements_text(document), column.type)).scalar_subquery()
    return column == any_(func.array(listed))


# How discreet each mode is: a file may move a known person up this scale, never down.
DISCREET_RANK: dict[str, int] = {
    DiscreetMode.OFF: 0,
    DiscreetMode.ENVELOPE: 1,
    DiscreetMode.POINTER: 2,
}


def _add_keys(
    session: Session, rows: dict[int, SubscriberRow], keys: dict[str, KeyInfo], target: _Target
) -> int:
    """The file's keys for people with none yet: active at once with `--confirmed` (an admin's
    word, as `subscribers key --confirmed`), else pending until the reader follows the link
    sent encrypted to it; someone's own key is never replaced by a file's."""
    given = {sid: row.openpgp_key for sid, row in rows.items() if row.openpgp_key}
    if not given:
        return 0
    have = set(
        session.scalars(
            select(ReaderKey.subscriber_id).where(ReaderKey.subscriber_id.in_(list(given)))
        )
    )
    added = 0
    for sid, armored in given.items():
        if sid in have:
            continue
        proven = target.now if target.confirmed else None
        session.add(key_row(sid, keys[armored], now=target.now, proven=proven))
        added += 1
    session.flush()
    return added


def _fill_in(old: Any, row: SubscriberRow) -> dict[str, Any]:
    """What a row adds to someone already known: blanks filled, tags and attributes added.

    Nothing already there is overwritten: a language or name the person chose stays theirs.
    The reading choices only ever protect more: a mode more discreet than theirs, or
    `withhold` over `plain`; a file never makes a known reader's mail less discreet.
    """
    change: dict[str, Any] = {}
    if row.discreet and DISCREET_RANK[row.discreet] > DISCREET_RANK.get(old.discreet, 0):
        change["discreet"] = row.discreet
    if row.on_key_problem == KeyProblemChoice.WITHHOLD and old.on_key_problem != row.on_key_problem:
        change["on_key_problem"] = row.on_key_problem
    if row.name and not old.name:
        change["name"] = row.name
    if row.country and not old.country:
        change["country"] = row.country
    # The stored tags and attributes (JSON text) are decoded only when the row has some.
    tags = list(json.loads(old.tags) or []) if row.tags else []
    if set(row.tags) - set(tags):
        change["tags"] = sorted(set(tags) | set(row.tags))
    attributes = dict(json.loads(old.attributes) or {}) if row.attributes else {}
    added = {k: v for k, v in row.attributes.items() if k not in attributes}
    if added:
        change["attributes"] = {**attributes, **added}
    return change


# On PostgreSQL a chunk's rows go as one JSON parameter, read by json_to_recordset: one
# statement and one string, where psycopg would dump row by row or value by value in Python.
# A key a row does not have reads as NULL; `now` is converted by its column type.
_PG_INSERT_SUBSCRIBERS = text(
    "INSERT INTO subscribers (email, name, language, country, tags, attributes, status,"
    " created_at, discreet, on_key_problem)"
    " SELECT v.email, v.name, v.language, v.country, v.tags, v.attributes, CAST(:status AS text),"
    " :now, v.discreet, v.on_key_problem"
    " FROM json_to_recordset(CAST(:rows AS json)) AS v(email text, name text, language text,"
    " country text, tags json, attributes json, discreet text, on_key_problem text)"
    " RETURNING id, email"
).bindparams(bindparam("now", type_=UTCDateTime()))

# Only what _fill_in changed is in a row: a missing key (NULL) leaves its column as it is.
_PG_UPDATE_SUBSCRIBERS = text(
    "UPDATE subscribers AS s SET email = COALESCE(v.email, s.email),"
    " name = COALESCE(v.name, s.name), country = COALESCE(v.country, s.country),"
    " tags = COALESCE(v.tags, s.tags), attributes = COALESCE(v.attributes, s.attributes),"
    " discreet = COALESCE(v.discreet, s.discreet),"
    " on_key_problem = COALESCE(v.on_key_problem, s.on_key_problem)"
    " FROM json_to_recordset(CAST(:rows AS json)) AS v(id integer, email text, name text,"
    " country text, tags json, attributes json, discreet text, on_key_problem text)"
    " WHERE s.id = v.id"
)

# Run by _finish on the session's psycopg connection (psycopg's placeholders): `now` is given
# as UTCDateTime stores it, naive UTC.
_PG_INSERT_SUBSCRIPTIONS = (
    "INSERT INTO subscriptions (subscriber_id, list_id, status, created_at, confirmed_at)"
    " SELECT v.subscriber_id, v.list_id, v.status, CAST(%(now)s AS timestamp),"
    " CASE WHEN v.status = CAST(%(active)s AS text) THEN CAST(%(now)s AS timestamp) END"
    " FROM json_to_recordset(CAST(%(rows)s AS json)) AS v(subscriber_id integer,"
    " list_id integer, status text)"
)

# The tables themselves, for Core statements (no ORM bookkeeping per row).
SUBSCRIBERS: Table = Subscriber.__table__  # type: ignore[assignment]
SUBSCRIPTIONS: Table = Subscription.__table__  # type: ignore[assignment]
ACTIVE, PENDING = SubscriptionStatus.ACTIVE.value, SubscriptionStatus.PENDING.value


def _insert_subscribers(
    session: Session, rows: list[SubscriberRow], target: _Target
) -> dict[str, int]:
    """Insert new people in one statement; returns their ids by address."""
    if not rows:
        return {}
    params = [
        {
            "email": r.email,
            "name": r.name,
            "language": r.language or "en",
            "country": r.country,
            "tags": sorted(r.tags),
            "attributes": r.attributes,
            "discreet": r.discreet or DiscreetMode.OFF.value,
            "on_key_problem": r.on_key_problem or KeyProblemChoice.WITHHOLD.value,
        }
        for r in rows
    ]
    status = SubscriberStatus.ACTIVE.value
    if target.postgres:
        values = {"rows": json.dumps(params), "status": status, "now": target.now}
        result = session.execute(_PG_INSERT_SUBSCRIBERS, values)
    else:
        stmt = insert(SUBSCRIBERS).returning(SUBSCRIBERS.c.id, SUBSCRIBERS.c.email)
        result = session.execute(
            stmt, [{**p, "status": status, "created_at": target.now} for p in params]
        )
    return {email: sid for sid, email in result}


def _update_subscribers(session: Session, changes: list[dict[str, Any]], postgres: bool) -> None:
    """Write what _fill_in found: each person's changed columns, nothing else."""
    if not changes:
        return
    if postgres:
        session.execute(_PG_UPDATE_SUBSCRIBERS, {"rows": json.dumps(changes)})
    else:
        session.execute(update(Subscriber), changes)


def _subscriptions_of(session: Session, ids: list[int], postgres: bool) -> set[tuple[int, int]]:
    """The (person, list) pairs these people have, in any state."""
    if not ids:
        return set()
    stmt = select(Subscription.subscriber_id, Subscription.list_id).where(
        _among(Subscription.subscriber_id, ids, postgres)
    )
    return {(sid, lid) for sid, lid in session.execute(stmt)}


def _add_subscriptions(
    session: Session,
    wanted: dict[int, tuple[str, ...]],
    known_ids: set[int],
    target: _Target,
    report: ImportReport,
) -> tuple[set[int], Deferred | None]:
    """Add the subscriptions people do not have yet; one they left is never added back.

    Only people known before this chunk can have any: those it inserted are not looked up.
    Returns who gets one and, on PostgreSQL, the statement that adds them, for _finish to run.
    """
    ids = [sid for sid, slugs in wanted.items() if slugs]
    if not ids:
        return set(), None
    have = _subscriptions_of(session, [sid for sid in ids if sid in known_ids], target.postgres)
    params: list[dict[str, Any]] = []
    for sid in ids:
        for slug in wanted[sid]:
            ml = target.lists[slug]
            if (sid, ml.id) in have:
                continue
            have.add((sid, ml.id))
            active = target.confirmed or not ml.double_opt_in
            report.pending += 0 if active else 1
            params.append(
                {
                    "subscriber_id": sid,
                    "list_id": ml.id,
                    "status": ACTIVE if active else PENDING,
                }
            )
    subscribed = {int(p["subscriber_id"]) for p in params}
    if not params:
        return subscribed, None
    if target.postgres:
        now = UTCDateTime().process_bind_param(target.now, None)  # as the column stores it
        values = {"rows": json.dumps(params), "now": now, "active": ACTIVE}
        return subscribed, (_PG_INSERT_SUBSCRIPTIONS, values)
    else:
        now = target.now
        rows = [
            {**p, "created_at": now, "confirmed_at": now if p["status"] == ACTIVE else None}
            for p in params
        ]
        session.execute(insert(SUBSCRIPTIONS), rows)
    return subscribed, None
