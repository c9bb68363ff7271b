"""Lists: the declarations in subscribers/lists.toml, and the lists table they keep in step.

`newsletter init` and `newsletter lists sync` apply the declarations (lists, then the segments
beside them) through sync_declarations; `lists create` adds one list from the command line.
"""

from __future__ import annotations

import string
import tomllib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from newsletter.audit import record_event
from newsletter.db.models import ListKind, MailingList, Subscription, SubscriptionStatus
from newsletter.errors import AudienceError
from newsletter.sanitize import control_character
from newsletter.segments import read_segments, sync_segments

# What a slug may hold: no ';' (it separates slugs in a CSV cell), no spaces, nothing a terminal
# or a page could show as something else (bidi controls, look-alike letters).
SLUG_CHARS = frozenset(string.ascii_letters + string.digits + "-_.")
MAX_SLUG_CHARS = 64


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


def default_list_id(slug: str, *, from_address: str) -> str:
    """The List-Id of a list that declares none: SLUG.<the domain of [mail] from_address>.

    RFC 2919 asks for a name in a domain the list's owner controls; the sender's is that domain.
    """
    return f"{slug}.{from_address.rpartition('@')[2]}"


def read_lists(path: Path, *, from_address: str | None = None) -> list[ListSpec]:
    """Read and check the list declarations in lists.toml.

    A list without `list_id` gets default_list_id; without `from_address` to derive it from,
    one is required.
    """
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise AudienceError(f"{path}: cannot read list declarations: {e}") from None
    declared = data.get("lists", [])
    if not isinstance(declared, list):
        raise AudienceError(f"{path}: 'lists' must be tables: [[lists]] with slug, kind, name")
    specs: list[ListSpec] = []
    for i, raw in enumerate(declared):
        where = f"{path}: lists[{i}]"
        if not isinstance(raw, dict):
            raise AudienceError(f"{where}: must be a table: [[lists]] with slug, kind, name")
        slug = raw.get("slug", "")
        if not slug or not isinstance(slug, str):
            raise AudienceError(f"{where}: 'slug' is required")
        if raw.get("kind") not in tuple(ListKind):
            raise AudienceError(f"{where} ({slug}): 'kind' must be digest or alerts")
        names = raw.get("name", {})
        if isinstance(names, str):
            names = {"en": names}
        if not isinstance(names, dict):
            raise AudienceError(f"{where} ({slug}): 'name' must be text or a table LANG = NAME")
        if any(slug == s.slug for s in specs):  # a second one would replace the first
            raise AudienceError(f"{where}: the list '{slug}' is declared twice")
        list_id = str(raw.get("list_id") or "")
        if not list_id and from_address is None:
            raise AudienceError(f"{where} ({slug}): 'list_id' is required")
        spec = ListSpec(
            slug=slug,
            kind=raw["kind"],
            double_opt_in=bool(raw.get("double_opt_in", True)),
            list_id=list_id or default_list_id(slug, from_address=from_address or ""),
            names={str(k): str(v) for k, v in names.items()},
        )
        if problem := spec_problem(spec):
            raise AudienceError(f"{where}: {problem}")
        specs.append(spec)
    return specs


def spec_problem(spec: ListSpec) -> str:
    """Why a list's slug, List-Id or names cannot be stored as they are, or "".

    They go into headers and every rendered message, and PostgreSQL refuses a NUL; the value
    itself is not quoted. (A new list's slug must also pass slug_problem.)
    """
    named = [("slug", spec.slug), ("list_id", spec.list_id)]
    named += [(f"names.{lang}", name) for lang, name in spec.names.items()]
    for key, value in named:
        if char := control_character(value):
            return f"'{key}' holds a control character ({char})"
    return ""


def slug_problem(slug: str) -> str:
    """Why a new list cannot have this slug, or "".

    A slug is a word of CSV files (`lists`, joined by ';'), forms and the command line, and is
    shown on terminals and pages: kept to SLUG_CHARS, nothing can make one list read as another.
    Only new lists are held to it: a list made before the rule keeps its slug (and its people).
    """
    if 0 < len(slug) <= MAX_SLUG_CHARS and SLUG_CHARS.issuperset(slug) and slug[0].isalnum():
        return ""
    return (
        f"'slug' must be 1 to {MAX_SLUG_CHARS} ASCII letters, digits, '-', '_' or '.', "
        f"starting with a letter or digit: {slug!r} is not"
    )


def sync_lists(*, session: Session, specs: list[ListSpec]) -> SyncReport:
    """Make the lists table match the declarations; lists no longer declared are only reported."""
    existing = {ml.slug: ml for ml in session.scalars(select(MailingList))}
    created, updated = [], []
    for spec in specs:
        ml = existing.get(spec.slug)
        if ml is None:
            if problem := slug_problem(spec.slug):
                raise AudienceError(problem)
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


def create_list(*, session: Session, spec: ListSpec, now: datetime, actor: str) -> MailingList:
    """Add one list from the command line; an existing slug is refused."""
    if session.scalar(select(MailingList.id).where(MailingList.slug == spec.slug)) is not None:
        raise AudienceError(f"list '{spec.slug}' exists already")
    if spec.kind not in tuple(ListKind):
        raise AudienceError("kind must be digest or alerts")
    if problem := spec_problem(spec) or slug_problem(spec.slug):
        raise AudienceError(problem)
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
    record_event(session, now=now, actor=actor, action="list.created", list=spec.slug)
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


@dataclass(frozen=True)
class DeclarationsReport:
    lists: SyncReport
    segments_created: int = 0
    segments_updated: int = 0
    segments_undeclared: tuple[str, ...] = ()


def sync_declarations(
    *, session: Session, lists_file: Path, segments_file: Path, from_address: str
) -> DeclarationsReport:
    """Apply lists.toml, then segments.toml when there is one (`init` and `lists sync` alike)."""
    report = sync_lists(session=session, specs=read_lists(lists_file, from_address=from_address))
    if not segments_file.is_file():
        return DeclarationsReport(report)
    created, updated, undeclared = sync_segments(
        session=session, specs=read_segments(segments_file)
    )
    return DeclarationsReport(report, created, updated, tuple(undeclared))


@dataclass(frozen=True)
class ListRow:
    slug: str
    kind: str
    list_id: str
    active: int


def list_overview(session: Session) -> list[ListRow]:
    """Every list with its kind, List-Id and number of active subscriptions, by slug."""
    active = (
        select(func.count())
        .where(
            Subscription.list_id == MailingList.id,
            Subscription.status == SubscriptionStatus.ACTIVE,
        )
        .scalar_subquery()
    )
    stmt = select(MailingList.slug, MailingList.kind, MailingList.list_id, active).order_by(
        MailingList.slug
    )
    return [
        ListRow(slug, kind, list_id, int(n)) for slug, kind, list_id, n in session.execute(stmt)
    ]
