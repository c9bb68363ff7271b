"""Subscribers from and to CSV: import (streamed, in chunks) and export.

CSV import streams: rows are parsed one at a time and written in chunks, each with a handful of
bulk statements (look up the chunk's addresses and suppression hashes, insert the new people,
update the known ones, add missing subscriptions), so time grows with the file and memory does not.
Each chunk is written in a savepoint: if the database refuses it, its rows are written one by one
and only the refused row is rejected. No reason or error names anyone but the row's own values.

Spreadsheets run cells that look like formulas (OWASP "CSV injection"). Every cell we write
(export, rejects file, header included) that starts with = + - @ (or their fullwidth forms), a
tab, CR or LF, also after leading spaces, or with ' itself, gets one leading ' (which
spreadsheets show as "text"); import removes exactly that one ', so an export reads back
unchanged.
"""

from __future__ import annotations

import csv
import io
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, StatementError
from sqlalchemy.orm import Session

from newsletter.addresses import address_forms
from newsletter.config import LANGUAGES
from newsletter.db.models import (
    Event,
    MailingList,
    Subscriber,
    SubscriberStatus,
    Subscription,
    SubscriptionStatus,
)
from newsletter.errors import AudienceError
from newsletter.lists import get_list
from newsletter.suppression import KEPT_OUT_STATUSES, suppressed_forms

KNOWN_COLUMNS = ("email", "name", "language", "lists", "tags", "country")


@dataclass
class ImportReport:
    imported: int = 0
    updated: int = 0
    unchanged: int = 0
    kept_out: int = 0
    duplicates: int = 0
    rejected: int = 0
    pending: int = 0
    rejects: list[tuple[int, str]] = field(default_factory=list)

    def absorb(self, part: ImportReport) -> None:
        """Add the figures of one written chunk."""
        self.imported += part.imported
        self.updated += part.updated
        self.unchanged += part.unchanged
        self.kept_out += part.kept_out
        self.duplicates += part.duplicates
        self.pending += part.pending

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
        }


CHUNK_ROWS = 1000
MAX_CELL_CHARS = 1000  # longer cells reject their row (names are then cut to 200)
# A database error that is about one row's values; any other (connection lost, a bug) stops.
ROW_REFUSALS = (DataError, IntegrityError)

RawRow = dict[str, str | None]
RowResult = tuple[int, RawRow | None, str]
RejectSink = Callable[[int, str, RawRow | None], None]


@dataclass(frozen=True)
class SubscriberRow:
    email: str
    name: str = ""
    language: str = ""  # "" = not given: new people get "en", known people keep theirs
    country: str = ""
    lists: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    attributes: dict[str, str] = field(default_factory=dict)
    older_forms: tuple[str, ...] = ()  # forms of the address stored before (see address_forms)


# Cells a spreadsheet may take for a formula begin with one of these (OWASP's list: = + - @ tab
# CR; LF and the fullwidth forms, which some spreadsheets fold to ASCII, too).
FORMULA_STARTS = frozenset("=+-@\t\r\n\uff1d\uff0b\uff0d\uff20")


def _needs_quote(value: str) -> bool:
    return value[:1] == "'" or value.lstrip(" ")[:1] in FORMULA_STARTS


def neutralise_cell(value: str) -> str:
    """A cell a spreadsheet shows as text: one leading ' before anything that may start a formula.

    A value that starts with ' itself gets one too, so restore_cell removes exactly what was added.
    """
    return "'" + value if _needs_quote(value) else value


def restore_cell(value: str) -> str:
    """The value neutralise_cell was given: its one added leading ' removed, nothing else."""
    return value[1:] if value[:1] == "'" and _needs_quote(value[1:]) else value


def _split(value: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(s.strip() for s in value.split(";") if s.strip()))


def parse_row(row: RawRow) -> SubscriberRow:
    """Turn one CSV row (read by header) into a checked SubscriberRow."""

    def get(key: str) -> str:
        return restore_cell((row.get(key) or "").strip())

    forms = address_forms(get("email")) if get("email") else ()
    if not forms:
        raise AudienceError("missing email")
    language = get("language").lower()
    if language and language not in LANGUAGES:
        raise AudienceError(f"language must be one of {', '.join(LANGUAGES)}, not {language!r}")
    country = get("country").upper()
    if country and (len(country) != 2 or not country.isalpha() or not country.isascii()):
        raise AudienceError(f"country must be a two-letter code, not {country!r}")
    extra = {  # header names arrive stripped and restored (see _read_rows)
        k: restore_cell((v or "").strip())
        for k, v in row.items()
        if k and k not in KNOWN_COLUMNS and (v or "").strip()
    }
    return SubscriberRow(
        email=forms[0],
        name=" ".join(get("name").split())[:200],
        language=language,
        country=country,
        lists=_split(get("lists")),
        tags=_split(get("tags")),
        attributes=extra,
        older_forms=forms[1:],
    )


def merge_rows(first: SubscriberRow, later: SubscriberRow) -> SubscriberRow:
    """Two rows for one address become one: later values win, lists and tags add up."""
    return SubscriberRow(
        email=first.email,
        name=later.name or first.name,
        language=later.language or first.language,
        country=later.country or first.country,
        lists=tuple(dict.fromkeys(first.lists + later.lists)),
        tags=tuple(dict.fromkeys(first.tags + later.tags)),
        attributes={**first.attributes, **later.attributes},
        older_forms=first.older_forms,
    )


def count_lines(path: Path) -> int:
    """How many lines a file has (for a progress bar), reading it in blocks."""
    try:
        with path.open("rb") as handle:
            return sum(block.count(b"\n") for block in iter(lambda: handle.read(1 << 20), b""))
    except OSError as e:
        raise AudienceError(f"{path}: cannot open: {e.strerror}") from None


def read_csv(path: Path) -> Iterator[RowResult]:
    """Stream (first line number, row or None, error) from a CSV file read by its header.

    A UTF-8 BOM and Windows line ends are fine. Bytes that are not UTF-8 spoil only their row:
    they are kept as surrogates while reading, and such a row is rejected.
    """
    try:
        handle = path.open(encoding="utf-8-sig", errors="surrogateescape", newline="")
    except OSError as e:
        raise AudienceError(f"{path}: cannot open: {e.strerror}") from None
    with handle:
        yield from _read_rows(handle, str(path))


def _read_rows(handle: io.TextIOBase | Any, where: str) -> Iterator[RowResult]:
    reader = csv.DictReader(handle)
    try:
        header = reader.fieldnames
    except csv.Error as e:
        raise AudienceError(f"{where}: cannot read the header: {e}") from None
    names = [restore_cell(h.strip()).lower() for h in header or []]
    if "email" not in names or any(_cell_problem(n) for n in names):
        raise AudienceError(
            f"{where}: the header must be UTF-8 text without control characters "
            "and have an 'email' column"
        )
    reader.fieldnames = names
    line = reader.line_num
    while True:
        start = line + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            line = reader.line_num
            yield start, None, f"unreadable row: {e}"
            continue
        line = reader.line_num
        yield start, row, _row_problem(row)


def _row_problem(row: dict[str | None, Any]) -> str:
    """Why a row cannot be stored as it is ("" when it can), naming the column, not the value."""
    if None in row:
        return "more fields than the header has"
    for key, value in row.items():
        problem = _cell_problem(value) if value else ""
        if problem:
            return f"column {key!r}: {problem}"
    return ""


def _cell_problem(value: str) -> str:
    """What no database should be given: bytes that were not UTF-8, control characters
    (PostgreSQL refuses NUL outright), or a cell longer than MAX_CELL_CHARS."""
    if len(value) > MAX_CELL_CHARS:
        return f"longer than {MAX_CELL_CHARS} characters"
    if value.isprintable():  # the common case, checked in C
        return ""
    for ch in value:
        if "\udc80" <= ch <= "\udcff":
            return "not UTF-8 text (save the file as UTF-8)"
        if ch not in "\t\n\r" and unicodedata.category(ch) in ("Cc", "Cs"):
            return f"control character U+{ord(ch):04X}"
    return ""


@dataclass(frozen=True)
class _Target:
    lists: dict[str, MailingList]
    default_list: str | None
    confirmed: bool
    secret: str
    now: datetime


Checked = tuple[int, RawRow | None, SubscriberRow]  # line, row as read, row as parsed


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
    target = _Target(lists, default_list, confirmed, secret, now)
    report = ImportReport()
    event = Event(at=now, actor=actor, action="subscribers.import", detail={"source": source})
    session.add(event)
    # A write first: SQLite's driver begins the transaction only at a write, and a savepoint
    # taken before that would commit on release instead of nesting in the import's transaction.
    session.flush()

    def reject(line: int, reason: str, raw: RawRow | None) -> None:
        report.rejected += 1
        if on_reject is None:
            report.rejects.append((line, reason))
        else:
            on_reject(line, reason, raw)

    chunk: list[Checked] = []
    last_line = 0
    for line, raw, error in rows:
        last_line = line
        row = _checked(raw, error, target)
        if isinstance(row, str):
            reject(line, row, raw)
            continue
        chunk.append((line, raw, row))
        if len(chunk) >= chunk_rows:
            _write_chunk(session, chunk, target, report, reject)
            chunk = []
            if on_progress:
                on_progress(line)
    if chunk:
        _write_chunk(session, chunk, target, report, reject)
    if on_progress:
        on_progress(last_line)
    event.detail = {"source": source, **report.counts()}
    session.flush()
    return report


def _checked(raw: RawRow | None, error: str, target: _Target) -> SubscriberRow | str:
    """The row, parsed and with its lists resolved, or the reason it is rejected."""
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
    return replace(row, lists=tuple(wanted))


def _write_chunk(
    session: Session,
    chunk: list[Checked],
    target: _Target,
    report: ImportReport,
    reject: RejectSink,
) -> None:
    """Write a chunk in a savepoint; if the database refuses it, write its rows one at a time.

    So a value the checks above did not foresee rejects only its own row. The reason names the
    error's kind only: a database error's text may quote other rows' values.
    """
    part = ImportReport()
    try:
        with session.begin_nested():
            _import_chunk(session, [row for _, _, row in chunk], target, part)
    except StatementError as e:
        if isinstance(e, DBAPIError) and not isinstance(e, ROW_REFUSALS):
            raise
        if len(chunk) > 1:
            for one in chunk:
                _write_chunk(session, [one], target, report, reject)
            return
        line, raw, _ = chunk[0]
        reject(line, f"the database refused this row ({type(e).__name__})", raw)
        return
    report.absorb(part)


def _import_chunk(
    session: Session, rows: list[SubscriberRow], target: _Target, report: ImportReport
) -> None:
    """Write one chunk with a few bulk statements."""
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
                Subscriber.tags,
                Subscriber.attributes,
            ).where(Subscriber.email.in_(list(forms)))
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
    ids.update(_insert_subscribers(session, new, target.now))
    if changes:
        session.execute(update(Subscriber), changes)
    wanted = {ids[email]: merged[email].lists for email in ids}
    subscribed = _add_subscriptions(session, wanted, target, report)
    changed = {c["id"] for c in changes} | subscribed
    report.imported += len(new)
    for email in ids.keys() - {r.email for r in new}:
        if ids[email] in changed:
            report.updated += 1
        else:
            report.unchanged += 1


def _fill_in(old: Any, row: SubscriberRow) -> dict[str, Any]:
    """What a row adds to someone already known: blanks filled, tags and attributes added.

    Nothing already there is overwritten: a language or name the person chose stays theirs.
    """
    change: dict[str, Any] = {}
    if row.name and not old.name:
        change["name"] = row.name
    if row.country and not old.country:
        change["country"] = row.country
    tags = list(old.tags or [])
    if set(row.tags) - set(tags):
        change["tags"] = sorted(set(tags) | set(row.tags))
    attributes = dict(old.attributes or {})
    added = {k: v for k, v in row.attributes.items() if k not in attributes}
    if added:
        change["attributes"] = {**attributes, **added}
    return change


def _insert_subscribers(
    session: Session, rows: list[SubscriberRow], now: datetime
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
            "status": SubscriberStatus.ACTIVE.value,
            "created_at": now,
        }
        for r in rows
    ]
    result = session.execute(insert(Subscriber).returning(Subscriber.id, Subscriber.email), params)
    return {email: sid for sid, email in result}


def _add_subscriptions(
    session: Session, wanted: dict[int, tuple[str, ...]], target: _Target, report: ImportReport
) -> set[int]:
    """Add the subscriptions people do not have yet; one they left is never added back."""
    ids = [sid for sid, slugs in wanted.items() if slugs]
    if not ids:
        return set()
    have = {
        (int(sid), int(lid))
        for sid, lid in session.execute(
            select(Subscription.subscriber_id, Subscription.list_id).where(
                Subscription.subscriber_id.in_(ids)
            )
        )
    }
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
                    "status": (SubscriptionStatus.ACTIVE if active else SubscriptionStatus.PENDING),
                    "created_at": target.now,
                    "confirmed_at": target.now if active else None,
                }
            )
    if params:
        session.execute(insert(Subscription), params)
    return {int(p["subscriber_id"]) for p in params}


# --- export ----------------------------------------------------------------------------------


def _exported(list_id: int | None) -> Any:
    """Active people; with a list, only its active members."""
    stmt = select(Subscriber).where(Subscriber.status == SubscriberStatus.ACTIVE)
    if list_id is not None:
        stmt = stmt.where(
            select(Subscription.id)
            .where(
                Subscription.subscriber_id == Subscriber.id,
                Subscription.list_id == list_id,
                Subscription.status == SubscriptionStatus.ACTIVE,
            )
            .exists()
        )
    return stmt


def _pages(session: Session, list_id: int | None, size: int) -> Iterator[list[Subscriber]]:
    """Exported people in pages by id (keyset paging: no long-open cursor, steady memory)."""
    last = 0
    while True:
        stmt = _exported(list_id).where(Subscriber.id > last).order_by(Subscriber.id).limit(size)
        page = list(session.scalars(stmt))
        if not page:
            return
        yield page
        last = page[-1].id
        session.expunge_all()


def export_columns(session: Session, *, list_id: int | None = None) -> list[str]:
    """The CSV header of an export: the columns import reads, then every custom attribute."""
    keys: set[str] = set()
    for page in _pages(session, list_id, CHUNK_ROWS):
        for sub in page:
            keys.update(sub.attributes or {})
    return [*KNOWN_COLUMNS, *sorted(keys - set(KNOWN_COLUMNS))]


def export_rows(
    session: Session, *, list_id: int | None = None, chunk_rows: int = CHUNK_ROWS
) -> Iterator[dict[str, str]]:
    """Active people as CSV rows import reads back; lists are their active subscriptions."""
    for page in _pages(session, list_id, chunk_rows):
        slugs: dict[int, list[str]] = {}
        stmt = (
            select(Subscription.subscriber_id, MailingList.slug)
            .join(MailingList, MailingList.id == Subscription.list_id)
            .where(
                Subscription.subscriber_id.in_([s.id for s in page]),
                Subscription.status == SubscriptionStatus.ACTIVE,
            )
            .order_by(MailingList.slug)
        )
        for sid, slug in session.execute(stmt):
            slugs.setdefault(sid, []).append(slug)
        for sub in page:
            yield {
                **(sub.attributes or {}),
                "email": sub.email,
                "name": sub.name,
                "language": sub.language,
                "lists": ";".join(slugs.get(sub.id, [])),
                "tags": ";".join(sub.tags or []),
                "country": sub.country,
            }


def write_csv(rows: Iterable[dict[str, str]], columns: list[str], handle: Any) -> int:
    """Write rows under a header, every cell neutralised; returns how many rows were written."""
    # CRLF line ends (RFC 4180): the csv module quotes a cell holding either, so a lone CR in a
    # value cannot end its row early.
    writer = csv.writer(handle, lineterminator="\r\n")
    writer.writerow([neutralise_cell(c) for c in columns])
    n = 0
    for row in rows:
        writer.writerow([neutralise_cell(_text(row.get(c))) for c in columns])
        n += 1
    return n


def _text(value: object) -> str:
    return "" if value is None else str(value)
