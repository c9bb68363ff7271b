"""Urgent-action cases: a numbered case, its first message, updates, the reminder and the closing.

A case ("UA 12/26") holds who to write to, by when and what to say. Each message of a case is an
alert campaign (so it goes first, through the one launch gate and the pre-send check) linked to
the case by a CaseMessage row. Who gets what:

- the first message: the case's list (and segment), as any alert;
- updates and the reminder: the people still on the list whom a message of the case was sent
  to, or whose first message is still on its way (its campaign running or paused: the sender
  holds theirs until it went, and gives it up if none of the earlier messages reached them
  after all); an update `include_new` also everyone on the list now; the reminder not those
  who said they wrote;
- the closing: the people still on the list whom a message of the case was sent to; what had not
  gone yet of the others is dropped (audience.campaign_audience).

Every message after the first carries In-Reply-To and References naming, for each reader, the
messages of the case that reader was sent (message.py), so it threads under their original.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from sqlalchemy import delete, func, literal, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from newsletter.alerts import MAX_ALERT_AGE
from newsletter.assemble import find_item
from newsletter.audience import campaign_audience
from newsletter.audit import record_event
from newsletter.campaigns import finish_if_done
from newsletter.case_files import Letter, Target
from newsletter.check import Problem
from newsletter.config import Settings
from newsletter.db.models import (
    ActionCase,
    Campaign,
    CampaignKind,
    CampaignStatus,
    CaseLetter,
    CaseMessage,
    CaseOutcome,
    CaseRole,
    CaseStatus,
    Delivery,
    DeliveryStatus,
    DiscreetMode,
    Item,
    Subscriber,
    SubscriberStatus,
)
from newsletter.db.queries import count_audience, drop_pending
from newsletter.enqueue import launch_campaign
from newsletter.errors import CampaignError, NewsletterError
from newsletter.htmltext import html_to_text
from newsletter.lists import get_list
from newsletter.sanitize import MAX_HTML_DEPTH, clean_html, clean_text, html_depth
from newsletter.segments import get_segment
from newsletter.variants import store_case_copies

log = logging.getLogger(__name__)

# Runs once the check lets a message through, before anything is queued (a confirmation).
Checked = Callable[[Campaign, Sequence[Problem]], None]
NUMBERING_ATTEMPTS = 20
NUMBERING_LOCK = 0x55410000  # "UA" and the year: the advisory lock key of a year's numbering
# A case as people name it: its id, or its number with or without the prefix ("UA 3/26",
# "3/26"). ASCII digits only, bounded; linear: no nested or overlapping quantifiers, and the
# text is one short command-line argument.
_CASE_REF = re.compile(
    r"(?P<id>[0-9]{1,9})|(?:(?P<prefix>[A-Za-z0-9-]{1,10}) )?(?P<seq>[0-9]{1,6})/(?P<yy>[0-9]{2})",
    re.ASCII,
)


@dataclass(frozen=True)
class CaseDraft:
    """What staff give to make or edit a case; None leaves a field as it is (on edit)."""

    title: str | None = None
    body_html: str | None = None
    actions_html: str | None = None
    person: str | None = None
    person_public: bool | None = None
    deadline: date | None = None
    targets: tuple[Target, ...] | None = None
    letters: Mapping[str, Letter] | None = None
    archived: bool | None = None  # False: no web copy of any of its messages


def portal_zone(settings: Settings) -> ZoneInfo:
    """The portal's time zone, in which deadlines are days ([schedule] timezone)."""
    return ZoneInfo(settings.schedule.timezone)


def reference(prefix: str, seq: int, year: int) -> str:
    """A case's number as people cite it: "UA 12/26"."""
    return f"{prefix} {seq}/{year % 100:02d}"


# --- making and finding cases ----------------------------------------------------------------


def create_case(
    session: Session,
    *,
    settings: Settings,
    now: datetime,
    actor: str,
    draft: CaseDraft,
    list_slug: str | None = None,
    segment: str | None = None,
    item_ref: str | None = None,
) -> ActionCase:
    """Make a draft case with the next number of the year (in the portal's time zone)."""
    item = find_item(session, item_ref) if item_ref else None
    if item is not None:
        taken = session.scalar(select(ActionCase).where(ActionCase.item_id == item.id))
        if taken is not None:
            raise CampaignError(
                f"item {item_ref!r} already has case {taken.reference} ({taken.id})"
            )
    title = draft.title if draft.title is not None else (item.title if item else "")
    from_item = (item.summary_html or item.content_html) if item else ""
    body = draft.body_html if draft.body_html is not None else from_item
    ml = get_list(session, list_slug or settings.actions.list or settings.alerts.list)
    case = ActionCase(
        list_id=ml.id,
        segment_id=get_segment(session, segment).id if segment else None,
        item_id=item.id if item else None,
        status=CaseStatus.DRAFT,
        outcome="",
        title="",
        body_html="",
        actions_html="",
        person="",
        person_public=True,
        targets=[],
        letters={},
        archived=True,
        wrote_total=0,
        created_by=actor,
        created_at=now,
    )
    _apply(case, CaseDraft(**{**draft.__dict__, "title": title, "body_html": body}), settings)
    if not case.title:
        raise CampaignError("a case needs a title (--title)")
    _number(session, case, settings=settings, now=now)
    record_event(
        session, now=now, actor=actor, action="case.created", case=case.id, reference=case.reference
    )
    return case


def _number(session: Session, case: ActionCase, *, settings: Settings, now: datetime) -> None:
    """Insert the case with the year's next number; a number taken meanwhile is tried again.

    Two staff creating cases at once could both read the same highest number: on PostgreSQL an
    advisory lock per year makes them take turns; and the unique (year, seq) lets only one
    insert win anyway, the other reading again, in its savepoint, and taking the next.
    """
    year = now.astimezone(portal_zone(settings)).year
    if session.get_bind().dialect.name == "postgresql":
        # One numbering at a time per year, until this transaction ends: the next writer reads
        # the highest number after this one committed. (Without it, eight writers at once kept
        # taking each other's numbers; SQLite serialises writers by itself.)
        session.execute(select(func.pg_advisory_xact_lock(NUMBERING_LOCK + year)))
    for _ in range(NUMBERING_ATTEMPTS):
        highest = session.scalar(select(func.max(ActionCase.seq)).where(ActionCase.year == year))
        case.year, case.seq = year, int(highest or 0) + 1
        case.reference = reference(settings.actions.prefix, case.seq, year)
        try:
            with session.begin_nested():
                session.add(case)
                session.flush()
            return
        except IntegrityError:
            session.expunge(case) if case in session else None
            continue
    raise CampaignError("could not number the case: too many made at once; try again")


def edit_case(
    session: Session,
    *,
    case: ActionCase,
    settings: Settings,
    now: datetime,
    actor: str,
    draft: CaseDraft,
) -> ActionCase:
    """Change a draft case; once its first message went out, only the deadline may change."""
    if case.status != CaseStatus.DRAFT:
        fields = {k for k, v in draft.__dict__.items() if v is not None}
        if fields - {"deadline"}:
            raise CampaignError(
                f"case {case.reference} is {case.status}: only its deadline may change now; "
                "tell readers more with `newsletter actions update`"
            )
        today = now.astimezone(portal_zone(settings)).date()
        if draft.deadline is not None and draft.deadline < today:
            raise CampaignError(
                f"case {case.reference}: {draft.deadline.isoformat()} has passed; "
                "an open case's deadline can only move to today or later"
            )
    moved = draft.deadline is not None and draft.deadline != case.deadline
    _apply(case, draft, settings)
    record_event(session, now=now, actor=actor, action="case.edited", case=case.id)
    session.flush()
    if moved and case.status != CaseStatus.DRAFT:
        # The web copies name the deadline in their text, under a box saying the new one: they
        # are rendered again, as on closing, so that no page shows two deadlines.
        for message in messages_of(session, case.id):
            campaign = session.get(Campaign, message.campaign_id)
            if campaign is not None:
                store_case_copies(session, campaign, settings)
    return case


def _apply(case: ActionCase, draft: CaseDraft, settings: Settings) -> None:
    base = settings.web.base_url or "https://invalid/"
    if draft.title is not None:
        case.title = clean_text(draft.title, max_length=300)
    if draft.body_html is not None:
        case.body_html = _cleaned(draft.body_html, base=base, what="the case's text")
    if draft.actions_html is not None:
        case.actions_html = _cleaned(draft.actions_html, base=base, what="the actions text")
    if draft.person is not None:
        case.person = clean_text(draft.person, max_length=200)
    if draft.archived is not None:
        case.archived = draft.archived
    if draft.person_public is not None:
        case.person_public = draft.person_public
    if draft.deadline is not None:
        case.deadline = draft.deadline
    if draft.targets is not None:
        case.targets = [t.as_dict() for t in draft.targets]
    if draft.letters is not None:
        letters = dict(case.letters or {})
        letters.update(
            {lang: {"subject": v.subject, "body": v.body} for lang, v in draft.letters.items()}
        )
        case.letters = letters


def _cleaned(fragment: str, *, base: str, what: str) -> str:
    """Sanitised HTML, refused when nested deeper than any template can render."""
    html = clean_html(fragment, base_url=base)
    if html_depth(html) > MAX_HTML_DEPTH:
        raise CampaignError(f"{what} nests HTML more than {MAX_HTML_DEPTH} elements deep")
    return html


def names_person(case: ActionCase, also: str = "") -> bool:
    """Whether the title or a text of the case seems to name its person (any part of the name
    of 4+ letters, its first 4 letters, any letter case: "Bialiatski" in "Bialiatskis")."""
    stems = [w[:4].casefold() for w in case.person.replace("-", " ").split() if len(w) >= 4]
    text = " ".join([case.title, case.body_html, case.actions_html, also]).casefold()
    return any(stem in text for stem in stems)


def case_from_item(
    session: Session, *, settings: Settings, item: Item, now: datetime, actor: str = "scheduler"
) -> ActionCase | None:
    """A draft case for an urgent item, held for staff; None when the item has one already."""
    if session.scalar(select(ActionCase.id).where(ActionCase.item_id == item.id)) is not None:
        return None
    # A feed's title may clean to nothing: the case still needs one, for staff to change.
    title = clean_text(item.title, max_length=300) or f"Urgent item {item.id}"
    draft = CaseDraft(title=title, body_html=item.summary_html or item.content_html)
    case = create_case(session, settings=settings, now=now, actor=actor, draft=draft)
    case.item_id = item.id
    session.flush()
    record_event(session, now=now, actor=actor, action="case.awaiting_staff", case=case.id)
    return case


def cases_for_urgent_items(
    session: Session, *, settings: Settings, now: datetime, actor: str = "scheduler"
) -> list[ActionCase]:
    """A draft case, held for staff, for each recent urgent item that has none."""
    if not settings.actions.from_urgent_items:
        return []
    have = select(ActionCase.item_id).where(ActionCase.item_id.is_not(None))
    items = session.scalars(
        select(Item)
        .where(
            Item.urgent.is_(True),
            Item.published_at >= now - MAX_ALERT_AGE,
            Item.id.not_in(have),
        )
        .order_by(Item.id)
    ).all()
    made = []
    for item in items:
        try:  # one item that cannot make a case (hostile HTML, ...) does not stop the others
            with session.begin_nested():
                case = case_from_item(session, settings=settings, item=item, now=now, actor=actor)
        except NewsletterError as e:
            log.warning("no draft case for urgent item %d: %s", item.id, e)
            continue
        if case is not None:
            made.append(case)
    return made


def get_case(session: Session, ref: str | int) -> ActionCase:
    """A case by id ("12"), or by number ("UA 12/26", "12/26")."""
    text = " ".join(str(ref).split())
    case = None
    match = _CASE_REF.fullmatch(text)
    if match and match["id"]:
        case = session.get(ActionCase, int(match["id"]))
    elif match:
        found = session.scalars(
            select(ActionCase).where(ActionCase.seq == int(match["seq"])).order_by(ActionCase.year)
        ).all()
        case = next(
            (
                c
                for c in found
                if c.year % 100 == int(match["yy"])
                and (
                    not match["prefix"]
                    or c.reference.split(" ")[0].casefold() == match["prefix"].casefold()
                )
            ),
            None,
        )
    if case is None:
        raise CampaignError(f"no case {text!r}; see `newsletter actions list`")
    return case


# --- its messages ------------------------------------------------------------------------------


def messages_of(session: Session, case_id: int) -> list[CaseMessage]:
    """The case's messages, oldest first."""
    stmt = (
        select(CaseMessage).where(CaseMessage.case_id == case_id).order_by(CaseMessage.campaign_id)
    )
    return list(session.scalars(stmt))


def first_message(session: Session, case_id: int) -> CaseMessage | None:
    """The case's first message, once it was made."""
    return session.scalar(
        select(CaseMessage).where(
            CaseMessage.case_id == case_id, CaseMessage.role == CaseRole.FIRST
        )
    )


def message_campaign(
    session: Session,
    case: ActionCase,
    *,
    role: CaseRole,
    number: int = 0,
    body_html: str = "",
    include_new: bool = False,
    now: datetime,
    actor: str,
    settings: Settings,
) -> Campaign:
    """The campaign of one message of the case (the same one when asked again)."""
    key = f"case:{case.id}:{role}:{number}"
    existing = session.scalar(select(Campaign).where(Campaign.dedupe_key == key))
    if existing is not None:
        return existing
    base = settings.web.base_url or "https://invalid/"
    campaign = Campaign(
        kind=CampaignKind.ALERT,
        list_id=case.list_id,
        segment_id=case.segment_id,
        status=CampaignStatus.DRAFT,
        dedupe_key=key,
        title=case.title,
        body_html=clean_html(body_html, base_url=base) if body_html else "",
        created_by=actor,
        created_at=now,
        archived=case.archived,
    )
    try:
        # Two staff sending the same message at once both found none: the unique key lets one
        # make it; the other (waiting for it, in its savepoint) takes it, or for a message with
        # its own text (an update, the closing) is told, rather than sending the other's text.
        with session.begin_nested():
            session.add(campaign)
            session.flush()
            session.add(
                CaseMessage(
                    campaign_id=campaign.id,
                    case_id=case.id,
                    role=role,
                    number=number,
                    body_html=campaign.body_html,
                    include_new=include_new,
                    copies={},
                )
            )
            session.flush()
    except IntegrityError:
        made = session.scalar(select(Campaign).where(Campaign.dedupe_key == key))
        if made is None:
            raise
        if role in (CaseRole.UPDATE, CaseRole.CLOSING):
            raise CampaignError(
                f"case {case.reference}: someone else made its {role} at the same moment "
                f"(campaign {made.id}); see `newsletter actions show {case.id}`"
            ) from None
        return made
    session.refresh(campaign, ["case_message"])
    return campaign


def send_first(
    session: Session,
    *,
    case: ActionCase,
    settings: Settings,
    now: datetime,
    actor: str,
    force: bool = False,
    on_checked: Checked | None = None,
) -> tuple[Campaign, int]:
    """Check and start the case's first message; returns it and how many were queued."""
    if case.status == CaseStatus.CLOSED:
        raise CampaignError(f"case {case.reference} is closed")
    problems = readiness(case, settings=settings, now=now)
    if problems:
        raise CampaignError(f"case {case.reference} is not ready to send: {problems[0]}")
    campaign = message_campaign(
        session, case, role=CaseRole.FIRST, now=now, actor=actor, settings=settings
    )
    if campaign.status == CampaignStatus.CANCELLED:
        # An update goes only to those the first message reached: say so, not "send an update".
        raise CampaignError(
            f"case {case.reference}: its first message was cancelled (campaign {campaign.id}); "
            "an update reaches only the readers it was sent to"
        )
    if campaign.status == CampaignStatus.FINISHED:
        raise CampaignError(
            f"case {case.reference}: its first message is already finished "
            f"(campaign {campaign.id}); send an update instead"
        )
    queued = launch_campaign(
        session=session,
        campaign=campaign,
        settings=settings,
        now=now,
        actor=actor,
        force=force,
        on_checked=_bound(on_checked, campaign),
    )
    if case.status == CaseStatus.DRAFT:
        case.status = CaseStatus.OPEN
    record_event(session, now=now, actor=actor, action="case.sent", case=case.id, queued=queued)
    session.flush()
    return campaign, queued


def _bound(on_checked: Checked | None, campaign: Campaign) -> Callable[[Sequence[Problem]], None]:
    def run(problems: Sequence[Problem]) -> None:
        if on_checked is not None:
            on_checked(campaign, problems)

    return run


def readiness(case: ActionCase, *, settings: Settings, now: datetime) -> list[str]:
    """Why a case cannot be sent yet, one line each ([] = ready)."""
    found = []
    if not case.targets:
        found.append("it has no targets (--target-file)")
    if not case.letters:
        found.append("it has no sample letter (--letter LANG=FILE)")
    elif settings.render.default_language not in case.letters:
        found.append(
            f"it has no letter in {settings.render.default_language}, the default language"
        )
    if case.deadline is None:
        found.append("it has no deadline (--deadline YYYY-MM-DD)")
    elif case.deadline < now.astimezone(portal_zone(settings)).date():
        found.append(f"its deadline {case.deadline.isoformat()} has passed")
    return found


def _follow_up(
    session: Session,
    *,
    case: ActionCase,
    role: CaseRole,
    body_html: str,
    include_new: bool,
    settings: Settings,
    now: datetime,
    actor: str,
    force: bool,
    on_checked: Checked | None,
) -> tuple[Campaign, int]:
    """Make and start one later message of a sent case (an update, the reminder, the closing)."""
    first = first_message(session, case.id)
    if first is None or case.status == CaseStatus.DRAFT:
        raise CampaignError(
            f"case {case.reference} has not been sent yet: `newsletter actions send {case.id}`"
        )
    if case.status == CaseStatus.CLOSED and role != CaseRole.CLOSING:
        raise CampaignError(f"case {case.reference} is closed")
    if session.get_bind().dialect.name == "postgresql":  # two updates at once: one at a time
        session.execute(select(ActionCase.id).where(ActionCase.id == case.id).with_for_update())
    number = 0
    if role == CaseRole.UPDATE:
        number = 1 + sum(1 for m in messages_of(session, case.id) if m.role == CaseRole.UPDATE)
    campaign = message_campaign(
        session,
        case,
        role=role,
        number=number,
        body_html=body_html,
        include_new=include_new,
        now=now,
        actor=actor,
        settings=settings,
    )
    if role != CaseRole.CLOSING and not count_audience(
        session, campaign_audience(session, campaign)
    ):
        raise CampaignError(
            f"case {case.reference}: nobody to send the {role} to (no reader of it is still "
            "on the list)"
        )
    queued = launch_campaign(
        session=session,
        campaign=campaign,
        settings=settings,
        now=now,
        actor=actor,
        force=force,
        on_checked=_bound(on_checked, campaign),
    )
    return campaign, queued


def send_update(
    session: Session,
    *,
    case: ActionCase,
    body_html: str,
    include_new: bool,
    settings: Settings,
    now: datetime,
    actor: str,
    force: bool = False,
    on_checked: Checked | None = None,
) -> tuple[Campaign, int]:
    """Send update N to the case's readers still on the list (and, asked, to newcomers).

    Its readers: everyone a message of the case was sent to, and everyone whose first message
    is still on its way (the sender holds their update until that first one went).
    """
    if not visible_text(body_html):
        raise CampaignError("an update needs text (--body-file)")
    campaign, queued = _follow_up(
        session,
        case=case,
        role=CaseRole.UPDATE,
        body_html=body_html,
        include_new=include_new,
        settings=settings,
        now=now,
        actor=actor,
        force=force,
        on_checked=on_checked,
    )
    case.status = CaseStatus.UPDATED
    number = campaign.case_message.number if campaign.case_message else 0
    record_event(
        session,
        now=now,
        actor=actor,
        action="case.updated",
        case=case.id,
        update=number,
        queued=queued,
    )
    session.flush()
    return campaign, queued


def visible_text(fragment: str) -> str:
    """The text a reader would see of an HTML fragment ("" for markup, spaces, zero-widths)."""
    text = html_to_text(clean_html(fragment, base_url="https://invalid/"))
    return "".join(c for c in text if not c.isspace() and unicodedata.category(c) != "Cf")


def close_case(
    session: Session,
    *,
    case: ActionCase,
    outcome: str,
    body_html: str,
    settings: Settings,
    now: datetime,
    actor: str,
    force: bool = False,
    on_checked: Checked | None = None,
) -> tuple[Campaign | None, int]:
    """Close a case with its outcome, and thank its readers in a last threaded message.

    The closing goes to everyone a message of the case was sent to and who is still on the list;
    what was not sent yet of the earlier messages is cancelled (nobody is asked to write about a
    closed case). The web copies are rendered again, closed: no targets or letter left in them.
    The per-reader "I wrote" rows go, their count kept on the case. A draft closes with no message.
    """
    if outcome not in set(CaseOutcome):
        raise CampaignError(
            f"unknown outcome {outcome!r}: expected one of "
            + ", ".join(o.value for o in CaseOutcome)
        )
    if case.status == CaseStatus.CLOSED:
        raise CampaignError(f"case {case.reference} is already closed ({case.outcome})")
    was_sent = case.status != CaseStatus.DRAFT
    # Closed first, so that the closing message (and every copy) is rendered as closed.
    case.status, case.outcome, case.closed_at = CaseStatus.CLOSED, outcome, now
    campaign, queued = None, 0
    if was_sent:
        campaign, queued = _follow_up(
            session,
            case=case,
            role=CaseRole.CLOSING,
            body_html=body_html,
            include_new=False,
            settings=settings,
            now=now,
            actor=actor,
            force=force,
            on_checked=on_checked,
        )
    for message in messages_of(session, case.id):
        earlier = session.get(Campaign, message.campaign_id)
        if earlier is None or (campaign is not None and earlier.id == campaign.id):
            continue
        if earlier.status == CampaignStatus.DRAFT:  # a held reminder: never started
            earlier.status, earlier.finished_at = CampaignStatus.CANCELLED, now
            record_event(
                session, now=now, actor=actor, action="campaign.cancelled", campaign=earlier.id
            )
        elif earlier.status in (CampaignStatus.RUNNING, CampaignStatus.PAUSED):
            # What went out stays (and in the archive); what had not yet is dropped.
            dropped = drop_pending(session, earlier.id, reason="not sent: the case was closed")
            record_event(
                session,
                now=now,
                actor=actor,
                action="case.dropped_unsent",
                campaign=earlier.id,
                dropped=dropped,
            )
            finish_if_done(session=session, campaign_id=earlier.id, now=now)
        store_case_copies(session, earlier, settings)
    case.wrote_total = wrote_count(session, case.id)
    session.execute(delete(CaseLetter).where(CaseLetter.case_id == case.id))
    record_event(
        session,
        now=now,
        actor=actor,
        action="case.closed",
        case=case.id,
        outcome=outcome,
        queued=queued,
    )
    session.flush()
    return campaign, queued


# --- the deadline reminder ---------------------------------------------------------------------


def reminder_due_at(deadline: date, *, settings: Settings) -> datetime:
    """When a case's one reminder goes: 09:00 portal time, remind_days_before the deadline."""
    day = deadline - timedelta(days=settings.actions.remind_days_before)
    return datetime.combine(day, time(9, 0), tzinfo=portal_zone(settings))


def due_reminders(session: Session, *, settings: Settings, now: datetime) -> list[ActionCase]:
    """Open cases whose reminder is due now and has not been made.

    None for a case whose first message went out after its reminder's time (its readers have
    just been asked), nor once the deadline has passed (the service was down meanwhile).
    """
    if settings.actions.remind_days_before <= 0:
        return []
    reminded = select(CaseMessage.case_id).where(CaseMessage.role == CaseRole.REMINDER)
    first_started = (
        select(Campaign.started_at)
        .join(CaseMessage, CaseMessage.campaign_id == Campaign.id)
        .where(CaseMessage.case_id == ActionCase.id, CaseMessage.role == CaseRole.FIRST)
        .scalar_subquery()
    )
    rows = session.execute(
        select(ActionCase, first_started)
        .where(
            ActionCase.status.in_((CaseStatus.OPEN, CaseStatus.UPDATED)),
            ActionCase.deadline.is_not(None),
            ActionCase.id.not_in(reminded),
        )
        .order_by(ActionCase.id)
    ).all()
    today = now.astimezone(portal_zone(settings)).date()
    due = []
    for case, started in rows:
        if case.deadline is None or today > case.deadline:
            continue
        at = reminder_due_at(case.deadline, settings=settings)
        if at <= now and (started is None or started < at):
            due.append(case)
    return due


def send_reminder(
    session: Session,
    *,
    case: ActionCase,
    settings: Settings,
    now: datetime,
    actor: str,
    force: bool = False,
    on_checked: Checked | None = None,
) -> tuple[Campaign, int]:
    """Start a case's one reminder: to its readers still on the list who did not say they wrote."""
    key = f"case:{case.id}:{CaseRole.REMINDER}:0"
    made = session.scalar(select(Campaign).where(Campaign.dedupe_key == key))
    if made is not None and made.status != CampaignStatus.DRAFT:
        raise CampaignError(f"case {case.reference}: its reminder was already sent ({made.status})")
    if case.deadline is not None and now.astimezone(portal_zone(settings)).date() > case.deadline:
        raise CampaignError(
            f"case {case.reference}: its deadline {case.deadline.isoformat()} has passed; "
            "no reminder (move the deadline with `actions edit --deadline`)"
        )
    return _follow_up(
        session,
        case=case,
        role=CaseRole.REMINDER,
        body_html="",
        include_new=False,
        settings=settings,
        now=now,
        actor=actor,
        force=force,
        on_checked=on_checked,
    )


def send_due_reminders(
    session: Session, *, settings: Settings, now: datetime, actor: str = "scheduler"
) -> list[Campaign]:
    """Start the reminder of each case whose time has come (each case at most once).

    A reminder that cannot go (the check refuses it, nobody to send it to) is kept as a held
    draft with the reason in the events, so it is not tried again every minute:
    `newsletter actions remind ID --force` sends it.
    """
    started = []
    for case in due_reminders(session, settings=settings, now=now):
        try:
            with session.begin_nested():
                campaign, queued = send_reminder(
                    session, case=case, settings=settings, now=now, actor=actor
                )
        except NewsletterError as e:  # the check, or a template: held, the others go on
            log.warning("case %s: reminder held: %s", case.reference, e)
            message_campaign(
                session, case, role=CaseRole.REMINDER, now=now, actor=actor, settings=settings
            )
            record_event(
                session,
                now=now,
                actor=actor,
                action="case.reminder_held",
                case=case.id,
                reason=str(e)[:200],
            )
            continue
        record_event(
            session, now=now, actor=actor, action="case.reminded", case=case.id, queued=queued
        )
        started.append(campaign)
    session.flush()
    return started


def held_reminder(session: Session, case_id: int) -> int | None:
    """The campaign of a case's reminder made but not started (held), or None."""
    stmt = (
        select(Campaign.id)
        .join(CaseMessage, CaseMessage.campaign_id == Campaign.id)
        .where(
            CaseMessage.case_id == case_id,
            CaseMessage.role == CaseRole.REMINDER,
            Campaign.status == CampaignStatus.DRAFT,
        )
    )
    return session.scalar(stmt)


# --- "I sent my letter" ------------------------------------------------------------------------


def record_wrote(session: Session, *, case_id: int, subscriber_id: int) -> bool:
    """Count a reader's "I sent my letter" once; True when it was not counted before.

    Nothing is kept for a closed case (the count is final, the rows are gone), nor for a reader
    who is discreet or forgotten (their rows are deleted when they become so).
    """
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        # Held until this transaction ends: a closing (which locks the case to update it), a
        # reader turning discreet or being forgotten (which lock the reader) wait for this click,
        # then delete its row; a click after them sees them.
        for lock in (
            select(ActionCase.id).where(ActionCase.id == case_id),
            select(Subscriber.id).where(Subscriber.id == subscriber_id),
        ):
            session.execute(lock.with_for_update(read=True))
    # The states as the database has them now, in the insert itself, not as this session first
    # read them: the reader's page may have read the case before staff closed it (or the reader
    # before they turned discreet), and a row written after the rows were deleted would stay.
    still_open = select(ActionCase.id).where(
        ActionCase.id == case_id, ActionCase.status != CaseStatus.CLOSED
    )
    still_counted = select(Subscriber.id).where(
        Subscriber.id == subscriber_id,
        Subscriber.discreet == DiscreetMode.OFF,
        Subscriber.status != SubscriberStatus.FORGOTTEN,
    )
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = (
        insert(CaseLetter)
        .from_select(
            ["case_id", "subscriber_id"],
            select(literal(case_id), literal(subscriber_id)).where(
                still_open.exists(), still_counted.exists()
            ),
        )
        .on_conflict_do_nothing()
    )
    # RETURNING gives a row only when this insert wrote one: exact with two readers at once.
    return session.execute(stmt.returning(CaseLetter.case_id)).first() is not None


def wrote_count(session: Session, case_id: int) -> int:
    """How many readers said they sent their letter (kept on the case once it is closed)."""
    stmt = select(func.count()).select_from(CaseLetter).where(CaseLetter.case_id == case_id)
    kept = session.scalar(select(ActionCase.wrote_total).where(ActionCase.id == case_id))
    return int(session.scalar(stmt) or 0) + int(kept or 0)


def recipients_count(session: Session, case_id: int) -> int:
    """How many people the first message was sent to."""
    first = select(CaseMessage.campaign_id).where(
        CaseMessage.case_id == case_id, CaseMessage.role == CaseRole.FIRST
    )
    stmt = select(func.count()).where(
        Delivery.campaign_id.in_(first.scalar_subquery()), Delivery.status == DeliveryStatus.SENT
    )
    return int(session.scalar(stmt) or 0)
