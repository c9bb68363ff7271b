"""Two-person approval of console alerts: frozen revisions, approvals, break-glass, training.

A submitted draft is rendered through the sender's own path (variants.render_campaign, stored
as the variants the sender will send) and frozen as a revision: one hash over each variant with
its link nonce taken out, the list, the segment and the recipient count. An approver approves
the hash they saw; an edit voids the revision and its approvals (compose.update_draft). When
[alerts] approvals_required people other than the author have approved, the alert goes through
the one launch gate (enqueue.launch_campaign). The author never counts, whatever their role,
except in training, where the alert goes only to staff addresses (test_send.send_training).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from newsletter.audience import audience_size
from newsletter.audit import record_event
from newsletter.check import Problem, check_campaign, stored_variants
from newsletter.compose import editable_draft, void_revisions
from newsletter.config import Settings
from newsletter.db.models import Approval, Campaign, CampaignRevision, Event, Staff
from newsletter.enqueue import launch_campaign
from newsletter.errors import ApprovalError
from newsletter.i18n import N_
from newsletter.render import RenderedVariant
from newsletter.sanitize import clean_text
from newsletter.staff import is_active
from newsletter.variants import render_campaign, store_variants

APPROVING_ROLES = ("approver", "admin")
NONCE_STANDIN = "NONCE"
REASON_MIN_CHARS = 20
REASON_MAX_CHARS = 500
# The events whose actor wrote (part of) a draft: none of them may approve it.
AUTHORING_ACTIONS = ("alert.drafted", "alert.edited")


class Approver(Protocol):
    """What the rules need of a staff member (staff.StaffView has these)."""

    @property
    def email(self) -> str: ...
    @property
    def role(self) -> str: ...
    @property
    def training(self) -> bool: ...


@dataclass(frozen=True)
class RevisionView:
    number: int
    hash: str
    recipients: int
    created_by: str
    created_at: datetime
    approvals: tuple[str, ...]  # approver emails
    voided: bool
    problems: tuple[str, ...] = ()  # the pre-send check's verdict at submission ("" = clean)


@dataclass(frozen=True)
class ApprovalState:
    campaign_id: int
    author: str
    revision: RevisionView | None
    needed: int
    training: bool
    # Everyone who drafted or edited the alert: none of them may approve it (outside training).
    authors: tuple[str, ...] = ()
    status: str = "draft"

    def can_approve(self, staff: Approver) -> bool:
        """Whether this person may approve the open revision now."""
        return approval_refusal(self, staff) is None


def approval_refusal(state: ApprovalState, staff: Approver) -> ApprovalError | None:
    """Why this person may not approve the open revision (the reason, as an error not raised),
    or None when they may."""
    rev = state.revision
    if state.status != "draft":
        return ApprovalError.of(N_("the alert is %(status)s"), status=str(state.status))
    if rev is None or rev.voided:
        return ApprovalError.of(
            N_("the alert has not been submitted for approval (or was edited since)")
        )
    if staff.role not in APPROVING_ROLES:
        return ApprovalError.of(N_("an %(role)s may not approve alerts"), role=staff.role)
    email = staff.email.casefold()
    if not state.training and email in {a.casefold() for a in state.authors}:
        return ApprovalError.of(N_("the author of an alert may not approve it"))
    if email in {a.casefold() for a in rev.approvals}:
        return ApprovalError.of(N_("you have approved this revision already"))
    return None


def revision_hash(
    variants: Sequence[RenderedVariant], *, list_id: int, segment_id: int | None, recipients: int
) -> str:
    """sha256 over the variants (their link nonce replaced), the list, segment and count."""
    digest = hashlib.sha256()
    for v in sorted(variants, key=lambda v: v.lang):
        for part in (v.lang, v.subject, v.html, v.text):
            value = part.replace(v.nonce, NONCE_STANDIN) if v.nonce else part
            digest.update(value.encode() + b"\0")
    digest.update(f"list={list_id}\0segment={segment_id}\0recipients={recipients}".encode())
    return digest.hexdigest()


def check_verdict(session: Session, *, campaign_id: int, settings: Settings) -> list[str]:
    """The pre-send check's problems of the alert as it stands, one line each ([] = clean)."""
    campaign = editable_draft(session, campaign_id)
    return [str(p) for p in check_campaign(session, campaign, settings)]


def submit_for_approval(
    session: Session, *, campaign_id: int, settings: Settings, now: datetime, actor: str
) -> RevisionView:
    """Render and freeze the draft as a new revision (older ones voided); audited with its hash."""
    lock_alert(session, campaign_id)
    campaign = editable_draft(session, campaign_id)
    variants = render_campaign(campaign, settings=settings)
    store_variants(session, campaign, variants)
    problems: list[Problem] = check_campaign(session, campaign, settings)
    recipients = audience_size(session, campaign.list_id, campaign.segment_id)
    digest = revision_hash(
        variants, list_id=campaign.list_id, segment_id=campaign.segment_id, recipients=recipients
    )
    void_revisions(session, campaign_id=campaign.id, now=now)
    last = session.scalar(
        select(func.max(CampaignRevision.number)).where(CampaignRevision.campaign_id == campaign.id)
    )
    revision = CampaignRevision(
        campaign_id=campaign.id,
        number=(last or 0) + 1,
        hash=digest,
        list_id=campaign.list_id,
        segment_id=campaign.segment_id,
        recipients=recipients,
        created_by=actor,
        created_at=now,
    )
    session.add(revision)
    session.flush()
    record_event(
        session,
        now=now,
        actor=actor,
        action="alert.submitted",
        campaign=campaign.id,
        revision=revision.number,
        hash=digest,
        recipients=recipients,
        problems=[str(p) for p in problems],
    )
    return _view(session, revision, tuple(str(p) for p in problems))


def approval_state(session: Session, *, campaign_id: int, settings: Settings) -> ApprovalState:
    """Who wrote the alert, its latest revision and its approvals, and how many are needed."""
    campaign = _alert(session, campaign_id)
    revision = _latest_revision(session, campaign.id)
    return ApprovalState(
        campaign_id=campaign.id,
        author=campaign.created_by,
        revision=_view(session, revision) if revision else None,
        needed=max(1, settings.alerts.approvals_required),
        training=is_training(campaign, settings),
        authors=tuple(sorted(_authors(session, campaign))),
        status=str(campaign.status),
    )


def is_training(campaign: Campaign, settings: Settings) -> bool:
    """A training alert: the console is in training mode, or its author's account was."""
    return campaign.training or settings.console.training


def approve(
    session: Session,
    *,
    campaign_id: int,
    revision_hash: str,
    approver: Approver,
    settings: Settings,
    now: datetime,
    force: bool = False,
    training_addresses: Sequence[str] = (),
) -> int | None:
    """Record an approval of the revision the approver saw; launch once enough have approved.

    The caller has verified a fresh second-factor code. Returns the deliveries queued, or None
    while more approvals are needed. A training alert queues nothing: it is made ready for
    test_send.send_training to the staff addresses (training_addresses, else its authors and
    approvers), and 0 is returned.
    """
    campaign = _locked_alert(session, campaign_id)
    state = approval_state(session, campaign_id=campaign_id, settings=settings)
    refusal = approval_refusal(state, approver)
    if refusal is None and state.revision and state.revision.hash != revision_hash:
        refusal = ApprovalError.of(
            N_("the alert changed since you looked at it: review the new revision")
        )
    if refusal is not None:
        raise ApprovalError.of(
            N_("alert %(id)s cannot be approved: %(reason)s"), id=campaign_id, reason=refusal
        )
    revision = _open_revision(session, campaign.id)
    session.add(Approval(revision_id=revision.id, approver=approver.email, at=now))
    session.flush()
    record_event(
        session,
        now=now,
        actor=approver.email,
        action="alert.approved",
        campaign=campaign.id,
        revision=revision.number,
        hash=revision.hash,
    )
    if len(_standing_approvers(session, revision)) < state.needed:
        return None
    return _launch(
        session, campaign, revision, settings=settings, now=now, actor=approver.email,
        force=force, training_addresses=training_addresses,
    )  # fmt: skip


def break_glass(
    session: Session,
    *,
    campaign_id: int,
    revision_hash: str,
    staff: Approver,
    reason: str,
    settings: Settings,
    now: datetime,
    training_addresses: Sequence[str] = (),
) -> int:
    """Send alone, when [console] break_glass allows it, with a written reason; recorded.

    The caller has verified a fresh second-factor code and mails every approver
    (staff_notices.break_glass_message). An approver or admin only, the author included.
    """
    if not settings.console.break_glass:
        raise ApprovalError.of(
            N_("sending alone (break-glass) is off: [console] break_glass = false")
        )
    reason = clean_text(reason, max_length=REASON_MAX_CHARS)
    if len(reason) < REASON_MIN_CHARS:
        raise ApprovalError.of(N_("say why in at least %(n)d characters"), n=REASON_MIN_CHARS)
    if staff.role not in APPROVING_ROLES:
        raise ApprovalError.of(N_("an %(role)s may not send alone"), role=staff.role)
    campaign = _locked_alert(session, campaign_id)
    if str(campaign.status) != "draft":
        raise ApprovalError.of(
            N_("alert %(id)s is %(status)s"), id=campaign_id, status=str(campaign.status)
        )
    revision = _latest_revision(session, campaign.id)
    if revision is None or revision.voided_at is not None or revision.hash != revision_hash:
        raise ApprovalError.of(
            N_(
                "alert %(id)s cannot be sent: it changed since you looked at it, "
                "or was not submitted"
            ),
            id=campaign_id,
        )
    mine = session.scalar(
        select(Approval).where(
            Approval.revision_id == revision.id, Approval.approver == staff.email
        )
    )
    if mine is None:
        session.add(
            Approval(
                revision_id=revision.id,
                approver=staff.email,
                at=now,
                break_glass=True,
                reason=reason,
            )
        )
    else:
        mine.break_glass, mine.reason = True, reason
    record_event(
        session,
        now=now,
        actor=staff.email,
        action="alert.break_glass",
        campaign=campaign.id,
        revision=revision.number,
        hash=revision.hash,
        reason=reason,
    )
    session.flush()
    return _launch(
        session, campaign, revision, settings=settings, now=now, actor=staff.email,
        force=False, training_addresses=training_addresses,
    )  # fmt: skip


def training_recipients(session: Session, campaign_id: int) -> list[str]:
    """The staff addresses a training alert made ready to send goes to ([] if not ready)."""
    events = session.scalars(
        select(Event).where(Event.action == "alert.training_ready").order_by(Event.id.desc())
    )
    for event in events:
        if (event.detail or {}).get("campaign") == campaign_id:
            return list(event.detail.get("addresses", []))
    return []


# --- helpers -----------------------------------------------------------------------------------


def _launch(
    session: Session,
    campaign: Campaign,
    revision: CampaignRevision,
    *,
    settings: Settings,
    now: datetime,
    actor: str,
    force: bool,
    training_addresses: Sequence[str],
) -> int:
    """Start the approved revision, after making sure the stored variants are the ones hashed."""
    stored = stored_variants(session, campaign)
    digest = revision_hash(
        stored,
        list_id=campaign.list_id,
        segment_id=campaign.segment_id,
        recipients=revision.recipients,
    )
    if digest != revision.hash or (campaign.list_id, campaign.segment_id) != (
        revision.list_id,
        revision.segment_id,
    ):
        raise ApprovalError.of(
            N_("alert %(id)s: what is stored is not the approved revision; submit it again"),
            id=campaign.id,
        )
    approvers = _approvers(session, revision)
    campaign.approved_by = ", ".join(approvers)[:200]
    if is_training(campaign, settings):
        addresses = list(training_addresses) or sorted(
            {*_authors(session, campaign), *approvers}, key=str.casefold
        )
        record_event(
            session,
            now=now,
            actor=actor,
            action="alert.training_ready",
            campaign=campaign.id,
            hash=revision.hash,
            addresses=addresses,
        )
        session.flush()
        return 0
    return launch_campaign(
        session=session, campaign=campaign, settings=settings, now=now, actor=actor, force=force
    )


def _alert(session: Session, campaign_id: int) -> Campaign:
    campaign = session.get(Campaign, campaign_id)
    if campaign is None or campaign.kind != "alert":
        raise ApprovalError.of(N_("no alert %(id)s"), id=campaign_id)
    return campaign


def lock_alert(session: Session, campaign_id: int) -> None:
    """Lock a campaign's row for the rest of the transaction, before anything of it is read.

    Edits, submissions, approvals and break-glass sends of one alert then run one after
    another: two approvers at once each count the other's approval, a double-clicked approve
    is refused as already given (not a broken unique key), and an edit saved while the approval
    launches the alert finds it started and changes nothing. A no-op UPDATE takes the lock on
    both databases (SQLite ignores FOR UPDATE; its first write takes the database's write lock).
    """
    session.execute(
        update(Campaign)
        .where(Campaign.id == campaign_id)
        .values(kind=Campaign.kind)
        .execution_options(synchronize_session=False)
    )


def _locked_alert(session: Session, campaign_id: int) -> Campaign:
    """The alert, read after its row is locked (lock_alert)."""
    lock_alert(session, campaign_id)
    campaign = _alert(session, campaign_id)
    session.refresh(campaign)
    return campaign


def _latest_revision(session: Session, campaign_id: int) -> CampaignRevision | None:
    return session.scalar(
        select(CampaignRevision)
        .where(CampaignRevision.campaign_id == campaign_id)
        .order_by(CampaignRevision.number.desc())
        .limit(1)
    )


def _open_revision(session: Session, campaign_id: int) -> CampaignRevision:
    revision = _latest_revision(session, campaign_id)
    if revision is None or revision.voided_at is not None:
        raise ApprovalError.of(
            N_("alert %(id)s has no revision waiting for approval"), id=campaign_id
        )
    return revision


def _approvers(session: Session, revision: CampaignRevision) -> list[str]:
    return list(
        session.scalars(
            select(Approval.approver)
            .where(Approval.revision_id == revision.id)
            .order_by(Approval.at, Approval.id)
        )
    )


def _standing_approvers(session: Session, revision: CampaignRevision) -> list[str]:
    """The revision's approvers whose approval still counts: one from an account disabled,
    reset or re-enrolled since (a stolen phone), or no longer an approver or admin, does not."""
    approvals = list(
        session.scalars(
            select(Approval)
            .where(Approval.revision_id == revision.id)
            .order_by(Approval.at, Approval.id)
        )
    )
    emails = [a.approver.lower() for a in approvals]
    accounts = {
        s.email.casefold(): s
        for s in session.scalars(select(Staff).where(func.lower(Staff.email).in_(emails)))
    }
    standing = []
    for approval in approvals:
        account = accounts.get(approval.approver.casefold())
        if account is not None and not (
            is_active(account)
            and account.role in APPROVING_ROLES
            and account.enrolled_at is not None
            and account.enrolled_at <= approval.at
        ):
            continue
        standing.append(approval.approver)
    return standing


def _authors(session: Session, campaign: Campaign) -> set[str]:
    """The draft's creator and everyone who edited it (events), by address."""
    found = {campaign.created_by}
    events = session.scalars(select(Event).where(Event.action.in_(AUTHORING_ACTIONS)))
    found |= {e.actor for e in events if (e.detail or {}).get("campaign") == campaign.id}
    return {a for a in found if a}


def _view(
    session: Session, revision: CampaignRevision, problems: tuple[str, ...] = ()
) -> RevisionView:
    return RevisionView(
        number=revision.number,
        hash=revision.hash,
        recipients=revision.recipients,
        created_by=revision.created_by,
        created_at=revision.created_at,
        approvals=tuple(_approvers(session, revision)),
        voided=revision.voided_at is not None,
        problems=problems,
    )
