"""The audience: lists declared in subscribers/lists.toml, subscribers from the CLI and CSV."""

from __future__ import annotations

import csv
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from email_validator import EmailNotValidError, validate_email
from sqlalchemy import select
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
    rejects: list[tuple[int, str]] = field(default_factory=list)


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


@dataclass(frozen=True)
class SubscriberRow:
    email: str
    name: str = ""
    language: str = "en"
    country: str = ""
    lists: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    attributes: dict[str, str] = field(default_factory=dict)


def parse_row(row: dict[str, str | None]) -> SubscriberRow:
    """Turn one CSV row (read by header) into a checked SubscriberRow."""

    def get(key: str) -> str:
        return (row.get(key) or "").strip()

    email = normalise_email(get("email")) if get("email") else ""
    if not email:
        raise AudienceError("missing email")
    language = get("language").lower() or "en"
    if language not in LANGUAGES:
        raise AudienceError(f"language must be one of {', '.join(LANGUAGES)}, not {language!r}")
    country = get("country").upper()
    if country and (len(country) != 2 or not country.isalpha()):
        raise AudienceError(f"country must be a two-letter code, not {country!r}")
    extra = {
        k.strip(): (v or "").strip()
        for k, v in row.items()
        if k and k.strip() not in KNOWN_COLUMNS and (v or "").strip()
    }
    return SubscriberRow(
        email=email,
        name=get("name")[:200],
        language=language,
        country=country,
        lists=tuple(s.strip() for s in get("lists").split(";") if s.strip()),
        tags=tuple(s.strip() for s in get("tags").split(";") if s.strip()),
        attributes=extra,
    )


def read_csv(path: Path) -> Iterator[tuple[int, dict[str, str | None] | None, str]]:
    """Stream (line number, row or None, error) from a CSV file read by its header."""
    try:
        handle = path.open(encoding="utf-8-sig", newline="")
    except OSError as e:
        raise AudienceError(f"{path}: cannot open: {e.strerror}") from None
    with handle:
        reader = csv.DictReader(handle)
        try:
            header = reader.fieldnames
        except (csv.Error, UnicodeDecodeError) as e:
            raise AudienceError(f"{path}: cannot read the header: {e}") from None
        if not header or "email" not in [h.strip().lower() for h in header]:
            raise AudienceError(f"{path}: the header must have an 'email' column")
        reader.fieldnames = [h.strip().lower() for h in header]
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except (csv.Error, UnicodeDecodeError) as e:
                yield reader.line_num, None, f"unreadable row: {e}"
                continue
            if None in row:
                yield reader.line_num, None, "more fields than the header has"
                continue
            yield reader.line_num, row, ""


def upsert_subscriber(
    *,
    session: Session,
    row: SubscriberRow,
    lists: dict[str, MailingList],
    confirmed: bool,
    now: datetime,
) -> str:
    """Add or update one subscriber and their subscriptions; returns imported/updated/unchanged."""
    sub = session.scalar(select(Subscriber).where(Subscriber.email == row.email))
    outcome = "updated"
    if sub is None:
        sub = Subscriber(
            email=row.email, created_at=now, status=SubscriberStatus.ACTIVE, tags=[], attributes={}
        )
        session.add(sub)
        outcome = "imported"
    before = (sub.name, sub.language, sub.country, sub.tags, sub.attributes)
    sub.name = row.name or sub.name or ""
    sub.language, sub.country = row.language, row.country or sub.country or ""
    sub.tags = sorted(set(sub.tags or []) | set(row.tags))
    sub.attributes = {**(sub.attributes or {}), **row.attributes}
    session.flush()
    changed = _subscribe(session, sub, [lists[s] for s in row.lists], confirmed, now)
    if (
        outcome == "updated"
        and not changed
        and before == (sub.name, sub.language, sub.country, sub.tags, sub.attributes)
    ):
        outcome = "unchanged"
    return outcome


def _subscribe(
    session: Session, sub: Subscriber, targets: list[MailingList], confirmed: bool, now: datetime
) -> bool:
    """Subscribe to lists; never resubscribes someone who left a list. True if anything changed."""
    current = {
        s.list_id: s
        for s in session.scalars(select(Subscription).where(Subscription.subscriber_id == sub.id))
    }
    changed = False
    for ml in targets:
        if ml.id in current:
            continue
        active = confirmed or not ml.double_opt_in
        session.add(
            Subscription(
                subscriber_id=sub.id,
                list_id=ml.id,
                created_at=now,
                status=SubscriptionStatus.ACTIVE if active else SubscriptionStatus.PENDING,
                confirmed_at=now if active else None,
            )
        )
        changed = True
    session.flush()
    return changed


def import_rows(
    *,
    session: Session,
    rows: Iterator[tuple[int, dict[str, str | None] | None, str]],
    default_list: str | None,
    confirmed: bool,
    secret: str,
    now: datetime,
    actor: str,
) -> ImportReport:
    """Import CSV rows; bad rows are collected with their line number, good rows go in."""
    lists = {ml.slug: ml for ml in session.scalars(select(MailingList))}
    if default_list and default_list not in lists:
        get_list(session, default_list)  # raises with the known lists
    report = ImportReport()
    for line, raw, error in rows:
        if raw is None:
            report.rejects.append((line, error))
            continue
        try:
            row = parse_row(raw)
            wanted = row.lists or ((default_list,) if default_list else ())
            unknown = [s for s in wanted if s not in lists]
            if unknown:
                raise AudienceError(f"unknown list {unknown[0]!r}")
            row = SubscriberRow(**{**row.__dict__, "lists": tuple(wanted)})
        except AudienceError as e:
            report.rejects.append((line, str(e)))
            continue
        if _is_kept_out(session, row.email, secret):
            report.kept_out += 1
            continue
        outcome = upsert_subscriber(
            session=session, row=row, lists=lists, confirmed=confirmed, now=now
        )
        setattr(report, outcome, getattr(report, outcome) + 1)
    session.add(
        Event(
            at=now,
            actor=actor,
            action="subscribers.import",
            detail={
                "imported": report.imported,
                "updated": report.updated,
                "kept_out": report.kept_out,
                "rejected": len(report.rejects),
            },
        )
    )
    return report


def _is_kept_out(session: Session, email: str, secret: str) -> bool:
    """An import never brings back someone who unsubscribed, bounced or was forgotten."""
    status = session.scalar(select(Subscriber.status).where(Subscriber.email == email))
    if status in (SubscriberStatus.UNSUBSCRIBED, SubscriberStatus.BOUNCED):
        return True
    return is_suppressed(session, email, secret=secret)
