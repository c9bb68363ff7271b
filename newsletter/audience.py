"""The audience: lists declared in subscribers/lists.toml, subscribers from the CLI and CSV.

CSV import streams: rows are parsed one at a time and written in chunks, each with a handful of
bulk statements (look up the chunk's addresses and suppression hashes, insert the new people,
update the known ones, add missing subscriptions), so time grows with the file and memory does not.
"""

from __future__ import annotations

import csv
import io
import tomllib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from email_validator import EmailNotValidError, validate_email
from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import Session

from newsletter.config import LANGUAGES
from newsletter.db.models import (
    Event,
    ListKind,
    MailingList,
    Subscriber,
    SubscriberStatus,
    Subscription,
    SubscriptionStatus,
    Suppression,
)
from newsletter.errors import AudienceError
from newsletter.tokens import hash_address

KNOWN_COLUMNS = ("email", "name", "language", "lists", "tags", "country")


@dataclass(frozen=True)
class ListSpec:
    slug: str
    kind: str
    double_opt_in: bool
    list_id: str
    names: dict[str, str]


@dataclass(frozen=True)
class SyncReport:
    created: tuple[str, ...]
    updated: tuple[str, ...]
    missing: tuple[str, ...]


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


def read_lists(path: Path) -> list[ListSpec]:
    """Read and check the list declarations in lists.toml."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise AudienceError(f"{path}: cannot read list declarations: {e}") from None
    specs = []
    for i, raw in enumerate(data.get("lists", [])):
        where = f"{path}: lists[{i}]"
        slug = raw.get("slug", "")
        if not slug or not isinstance(slug, str):
            raise AudienceError(f"{where}: 'slug' is required")
        if raw.get("kind") not in tuple(ListKind):
            raise AudienceError(f"{where} ({slug}): 'kind' must be digest or alerts")
        names = raw.get("name", {})
        if isinstance(names, str):
            names = {"en": names}
        specs.append(
            ListSpec(
                slug=slug,
                kind=raw["kind"],
                double_opt_in=bool(raw.get("double_opt_in", True)),
                list_id=str(raw.get("list_id") or f"{slug}.newsletter.invalid"),
                names={str(k): str(v) for k, v in names.items()},
            )
        )
    return specs


def sync_lists(*, session: Session, specs: list[ListSpec]) -> SyncReport:
    """Make the lists table match the declarations; lists no longer declared are only reported."""
    existing = {ml.slug: ml for ml in session.scalars(select(MailingList))}
    created, updated = [], []
    for spec in specs:
        ml = existing.get(spec.slug)
        if ml is None:
            ml = MailingList(slug=spec.slug, digest_cursor=0)
            session.add(ml)
            created.append(spec.slug)
        before = (ml.kind, ml.double_opt_in, ml.list_id, ml.names)
        ml.kind, ml.double_opt_in, ml.list_id = spec.kind, spec.double_opt_in, spec.list_id
        ml.names = spec.names
        ml.name = spec.names.get("en") or spec.slug
        if ml.slug not in created and before != (ml.kind, ml.double_opt_in, ml.list_id, ml.names):
            updated.append(spec.slug)
    session.flush()
    declared = {s.slug for s in specs}
    missing = tuple(sorted(set(existing) - declared))
    return SyncReport(tuple(created), tuple(updated), missing)


def get_list(session: Session, slug: str) -> MailingList:
    """Find a list by slug or say which lists exist."""
    ml = session.scalar(select(MailingList).where(MailingList.slug == slug))
    if ml is None:
        known = (
            ", ".join(session.scalars(select(MailingList.slug))) or "none; run `newsletter init`"
        )
        raise AudienceError(f"no list '{slug}' (lists: {known})")
    return ml


def normalise_email(raw: str) -> str:
    """Check an address's syntax (no DNS) and return its normalised form."""
    try:
        return validate_email(raw.strip(), check_deliverability=False).normalized.lower()
    except EmailNotValidError as e:
        raise AudienceError(f"invalid address {raw.strip()!r}: {e}") from None


def is_suppressed(session: Session, email: str, *, secret: str) -> bool:
    """Whether an address was forgotten or suppressed and must not be mailed again."""
    digest = hash_address(email, secret=secret)
    return (
        session.scalar(select(Suppression.id).where(Suppression.email_hash == digest)) is not None
    )


def create_list(*, session: Session, spec: ListSpec, now: datetime, actor: str) -> MailingList:
    """Add one list from the command line; an existing slug is refused."""
    if session.scalar(select(MailingList.id).where(MailingList.slug == spec.slug)) is not None:
        raise AudienceError(f"list '{spec.slug}' exists already")
    if spec.kind not in tuple(ListKind):
        raise AudienceError("kind must be digest or alerts")
    ml = MailingList(
        slug=spec.slug,
        kind=spec.kind,
        double_opt_in=spec.double_opt_in,
        list_id=spec.list_id,
        names=spec.names,
        name=spec.names.get("en") or spec.slug,
        digest_cursor=0,
    )
    session.add(ml)
    session.flush()
    session.add(Event(at=now, actor=actor, action="list.created", detail={"list": spec.slug}))
    return ml


def list_counts(session: Session, list_id: int) -> dict[str, int]:
    """A list's subscriptions by status (pending, active, unsubscribed)."""
    stmt = (
        select(Subscription.status, func.count())
        .where(Subscription.list_id == list_id)
        .group_by(Subscription.status)
    )
    counts = {str(s): 0 for s in SubscriptionStatus}
    counts.update({str(status): int(n) for status, n in session.execute(stmt)})
    return counts


# --- subscribers from CSV --------------------------------------------------------------------

# People in these states are never brought back by an import.
KEPT_OUT_STATUSES = (
    SubscriberStatus.UNSUBSCRIBED,
    SubscriberStatus.BOUNCED,
    SubscriberStatus.FORGOTTEN,
)
CHUNK_ROWS = 1000

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


def _split(value: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(s.strip() for s in value.split(";") if s.strip()))


def parse_row(row: RawRow) -> SubscriberRow:
    """Turn one CSV row (read by header) into a checked SubscriberRow."""

    def get(key: str) -> str:
        return (row.get(key) or "").strip()

    email = normalise_email(get("email")) if get("email") else ""
    if not email:
        raise AudienceError("missing email")
    language = get("language").lower()
    if language and language not in LANGUAGES:
        raise AudienceError(f"language must be one of {', '.join(LANGUAGES)}, not {language!r}")
    country = get("country").upper()
    if country and (len(country) != 2 or not country.isalpha() or not country.isascii()):
        raise AudienceError(f"country must be a two-letter code, not {country!r}")
    extra = {
        k.strip(): (v or "").strip()
        for k, v in row.items()
        if k and k.strip() not in KNOWN_COLUMNS and (v or "").strip()
    }
    return SubscriberRow(
        email=email,
        name=" ".join(get("name").split())[:200],
        language=language,
        country=country,
        lists=_split(get("lists")),
        tags=_split(get("tags")),
        attributes=extra,
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
    names = [h.strip().lower() for h in header or []]
    if "email" not in names or _has_surrogates(",".join(names)):
        raise AudienceError(f"{where}: the header must be UTF-8 and have an 'email' column")
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
        if None in row:
            yield start, None, "more fields than the header has"
        elif any(_has_surrogates(v) for v in row.values() if v):
            yield start, None, "not UTF-8 text (save the file as UTF-8)"
        else:
            yield start, row, ""


def _has_surrogates(value: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in value)


@dataclass(frozen=True)
class _Target:
    lists: dict[str, MailingList]
    default_list: str | None
    confirmed: bool
    secret: str
    now: datetime


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

    def reject(line: int, reason: str, raw: RawRow | None) -> None:
        report.rejected += 1
        if on_reject is None:
            report.rejects.append((line, reason))
        else:
            on_reject(line, reason, raw)

    chunk: list[SubscriberRow] = []
    last_line = 0
    for line, raw, error in rows:
        last_line = line
        row = _checked(raw, error, target)
        if isinstance(row, str):
            reject(line, row, raw)
            continue
        chunk.append(row)
        if len(chunk) >= chunk_rows:
            _import_chunk(session, chunk, target, report)
            chunk = []
            if on_progress:
                on_progress(line)
    if chunk:
        _import_chunk(session, chunk, target, report)
    if on_progress:
        on_progress(last_line)
    detail: dict[str, Any] = {"source": source, **report.counts()}
    session.add(Event(at=now, actor=actor, action="subscribers.import", detail=detail))
    return report


def _checked(raw: RawRow | None, error: str, target: _Target) -> SubscriberRow | str:
    """The row, parsed and with its lists resolved, or the reason it is rejected."""
    if raw is None:
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
    known = {
        r.email: r
        for r in session.execute(
            select(
                Subscriber.id,
                Subscriber.email,
                Subscriber.status,
                Subscriber.name,
                Subscriber.country,
                Subscriber.tags,
                Subscriber.attributes,
            ).where(Subscriber.email.in_(list(merged)))
        )
    }
    hashes = {email: hash_address(email, secret=target.secret) for email in merged}
    suppressed = set(
        session.scalars(
            select(Suppression.email_hash).where(Suppression.email_hash.in_(list(hashes.values())))
        )
    )
    ids: dict[str, int] = {}
    new: list[SubscriberRow] = []
    changes: list[dict[str, Any]] = []
    for email, row in merged.items():
        old = known.get(email)
        if hashes[email] in suppressed or (old is not None and old.status in KEPT_OUT_STATUSES):
            report.kept_out += 1
        elif old is None:
            new.append(row)
        else:
            ids[email] = old.id
            change = _fill_in(old, row)
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
    """Write rows under a header; returns how many rows were written."""
    writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    n = 0
    for row in rows:
        writer.writerow(row)
        n += 1
    return n
