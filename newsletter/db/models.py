"""The service's tables, as typed SQLAlchemy 2 models."""

from __future__ import annotations

import secrets
from datetime import UTC, date, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every back end (SQLite has no time zones)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class SubscriberStatus(StrEnum):
    ACTIVE = "active"
    UNSUBSCRIBED = "unsubscribed"
    BOUNCED = "bounced"
    # `subscribers forget`: the row is kept, emptied of personal data, so its id (named by links
    # already sent) is never reused for someone else.
    FORGOTTEN = "forgotten"


class DiscreetMode(StrEnum):
    """How discreet a reader's mail is: nothing outside the body names the portal."""

    OFF = "off"
    ENVELOPE = "envelope"  # the neutral identity and subject; the content as everyone gets it
    POINTER = "pointer"  # the same envelope; the body only a neutral note and a link


class KeyProblemChoice(StrEnum):
    """What a reader with an encryption key gets when that key becomes unusable."""

    WITHHOLD = "withhold"  # nothing readable in the clear: withheld, and one notice
    PLAIN = "plain"


class KeyStatus(StrEnum):
    PENDING = "pending"  # given, not yet proven: a message encrypted to it carries the link
    ACTIVE = "active"
    REMOVED = "removed"  # taken off by an admin: the reader's on_key_problem applies
    REVOKED = "revoked"  # the reader gave us its revocation: never used again, as removed


class SubscriptionStatus(StrEnum):
    PENDING = "pending"
    ACTIVE = "active"
    UNSUBSCRIBED = "unsubscribed"


class ListKind(StrEnum):
    DIGEST = "digest"
    ALERTS = "alerts"


class CampaignKind(StrEnum):
    DIGEST = "digest"
    ALERT = "alert"


class CampaignStatus(StrEnum):
    DRAFT = "draft"
    SCHEDULED = "scheduled"
    RUNNING = "running"
    PAUSED = "paused"
    FINISHED = "finished"
    CANCELLED = "cancelled"


class DeliveryStatus(StrEnum):
    QUEUED = "queued"
    CLAIMED = "claimed"
    SENT = "sent"
    DEFERRED = "deferred"
    FAILED = "failed"
    SUPPRESSED = "suppressed"
    # The reader's key is unusable and they chose `withhold`: nothing sent, the reason kept.
    WITHHELD = "withheld"


def _enum(cls: type[StrEnum]) -> String:
    return String(max(len(m.value) for m in cls))


def campaign_slug(kind: str, created_at: datetime) -> str:
    """A campaign's name in its web copy's URL: kind, day and a random tail (not guessable)."""
    return f"{kind}-{created_at:%Y-%m-%d}-{secrets.token_hex(4)}"


def _slug_default(context: Any) -> str:
    values = context.get_current_parameters()
    return campaign_slug(str(values["kind"]), values["created_at"])


class Source(Base):
    """A feed the service ingests: a URL or a file path."""

    __tablename__ = "sources"
    id: Mapped[int] = mapped_column(primary_key=True)
    url: Mapped[str] = mapped_column(String(2000), unique=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    lang: Mapped[str] = mapped_column(String(8), default="en")
    etag: Mapped[str | None] = mapped_column(String(500))
    last_modified: Mapped[str | None] = mapped_column(String(100))
    last_fetched_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    # sha256 of the last document stored whole, with the code and settings that parsed it:
    # the same again is not parsed again (see ingest.document_digest).
    document_digest: Mapped[str | None] = mapped_column(String(64))


class Item(Base):
    """One portal item, upserted by (source, guid)."""

    __tablename__ = "items"
    __table_args__ = (UniqueConstraint("source_id", "guid"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    source_id: Mapped[int] = mapped_column(ForeignKey("sources.id", ondelete="CASCADE"))
    guid: Mapped[str] = mapped_column(String(2000))
    link: Mapped[str] = mapped_column(String(2000), default="")
    title: Mapped[str] = mapped_column(String(500))
    summary_html: Mapped[str] = mapped_column(Text, default="")
    content_html: Mapped[str] = mapped_column(Text, default="")
    published_at: Mapped[datetime] = mapped_column(UTCDateTime)
    categories: Mapped[list[str]] = mapped_column(JSON, default=list)
    urgent: Mapped[bool] = mapped_column(Boolean, default=False)
    content_hash: Mapped[str] = mapped_column(String(64))
    ingested_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    source: Mapped[Source] = relationship()


class Subscriber(Base):
    """A person who gets mail; the least personal data that does the job."""

    __tablename__ = "subscribers"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    language: Mapped[str] = mapped_column(String(8), default="en")
    country: Mapped[str] = mapped_column(String(2), default="")
    tags: Mapped[list[str]] = mapped_column(JSON, default=list)
    attributes: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(_enum(SubscriberStatus), default=SubscriberStatus.ACTIVE)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    discreet: Mapped[str] = mapped_column(_enum(DiscreetMode), default=DiscreetMode.OFF)
    on_key_problem: Mapped[str] = mapped_column(
        _enum(KeyProblemChoice), default=KeyProblemChoice.WITHHOLD
    )


class MailingList(Base):
    """A list people subscribe to: the weekly digest or urgent actions."""

    __tablename__ = "lists"
    id: Mapped[int] = mapped_column(primary_key=True)
    slug: Mapped[str] = mapped_column(String(100), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    names: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    kind: Mapped[str] = mapped_column(_enum(ListKind))
    double_opt_in: Mapped[bool] = mapped_column(Boolean, default=True)
    list_id: Mapped[str] = mapped_column(String(255))
    # The last item id a digest of this list included: the digest window lives here, in the
    # database, so a missed or repeated run neither skips nor repeats items.
    digest_cursor: Mapped[int] = mapped_column(Integer, default=0)
    # The scheduled weekly slot the last digest answered: one digest per slot, even when a
    # restarted or second scheduler fires the same slot again.
    last_digest_slot: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Subscription(Base):
    """A subscriber's membership of one list."""

    __tablename__ = "subscriptions"
    __table_args__ = (UniqueConstraint("subscriber_id", "list_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    subscriber_id: Mapped[int] = mapped_column(ForeignKey("subscribers.id", ondelete="CASCADE"))
    list_id: Mapped[int] = mapped_column(ForeignKey("lists.id", ondelete="CASCADE"), index=True)
    status: Mapped[str] = mapped_column(_enum(SubscriptionStatus))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    confirmed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    unsubscribed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # When the double opt-in email went out; pending rows without it are still to be mailed.
    confirm_sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Segment(Base):
    """A named rule that narrows a list's audience."""

    __tablename__ = "segments"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    rule: Mapped[str] = mapped_column(Text)


class Campaign(Base):
    """One digest or alert to one list (and optionally a segment)."""

    __tablename__ = "campaigns"
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(_enum(CampaignKind))
    list_id: Mapped[int] = mapped_column(ForeignKey("lists.id"))
    segment_id: Mapped[int | None] = mapped_column(ForeignKey("segments.id"))
    status: Mapped[str] = mapped_column(_enum(CampaignStatus), default=CampaignStatus.DRAFT)
    # Makes "the same campaign again" impossible: a digest window or an alert's item/text.
    dedupe_key: Mapped[str] = mapped_column(String(200), unique=True)
    title: Mapped[str] = mapped_column(String(500), default="")
    body_html: Mapped[str] = mapped_column(Text, default="")
    url: Mapped[str] = mapped_column(String(2000), default="")
    created_by: Mapped[str] = mapped_column(String(200), default="")
    # An alert written in the console: the other languages' title and body_html, by language
    # ({"be": {"title": ..., "body_html": ...}}); title/body_html above are the default language's.
    translations: Mapped[dict[str, dict[str, str]]] = mapped_column(JSON, default=dict)
    # The Markdown staff wrote, by language, kept to edit the draft again (never sent as is).
    source_text: Mapped[dict[str, dict[str, str]]] = mapped_column(JSON, default=dict)
    # A training alert goes only to staff addresses, never to a list's members.
    training: Mapped[bool] = mapped_column(Boolean, default=False)
    approved_by: Mapped[str] = mapped_column(String(200), default="")
    pause_reason: Mapped[str] = mapped_column(String(500), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The web copy's name, /archive/<slug>/<lang>; given at insert (campaign_slug).
    slug: Mapped[str | None] = mapped_column(
        String(120), unique=True, index=True, default=_slug_default
    )
    # False keeps a campaign out of /archive and its feed (`alert send --no-archive`).
    archived: Mapped[bool] = mapped_column(Boolean, default=True)
    mailing_list: Mapped[MailingList] = relationship()
    items: Mapped[list[Item]] = relationship(
        secondary="campaign_items", order_by="desc(Item.published_at)"
    )
    # Set when the campaign is a message of an urgent-action case.
    case_message: Mapped[CaseMessage | None] = relationship(viewonly=True)


class CampaignItem(Base):
    """Which items a campaign carries."""

    __tablename__ = "campaign_items"
    campaign_id: Mapped[int] = mapped_column(
        ForeignKey("campaigns.id", ondelete="CASCADE"), primary_key=True
    )
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"), primary_key=True)


class Variant(Base):
    """A campaign rendered once for one language; recipients only get a cheap substitution."""

    __tablename__ = "variants"
    __table_args__ = (UniqueConstraint("campaign_id", "lang"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id", ondelete="CASCADE"))
    lang: Mapped[str] = mapped_column(String(8))
    subject: Mapped[str] = mapped_column(String(500))
    html: Mapped[str] = mapped_column(Text)
    text: Mapped[str] = mapped_column(Text)
    # The nonce in this render's link markers (render.link_markers); "" for a variant rendered
    # before 0003, which carries the fixed markers.
    link_nonce: Mapped[str] = mapped_column(String(64), default="")


class Delivery(Base):
    """The outbox: one row per (campaign, subscriber), moved to sent only after SMTP accepts."""

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("campaign_id", "subscriber_id"),
        # The claim query walks this index: status first, then due time.
        Index("ix_deliveries_claim", "status", "next_attempt_at"),
        # claim_batch claims campaign by campaign (alerts first) and walks this index, so a claim
        # reads only due rows instead of sorting every pending row of every campaign.
        Index("ix_deliveries_due", "campaign_id", "status", "next_attempt_at"),
        # The providers' daily counts (newsletter.metrics) read the messages sent today.
        Index("ix_deliveries_sent_at", "sent_at"),
        # A VERP address names a delivery by id: SQLite must never give a deleted one again.
        {"sqlite_autoincrement": True},
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id", ondelete="CASCADE"))
    subscriber_id: Mapped[int] = mapped_column(ForeignKey("subscribers.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(_enum(DeliveryStatus), default=DeliveryStatus.QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime)
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_reply: Mapped[str | None] = mapped_column(String(1000))
    relay: Mapped[str | None] = mapped_column(String(100))
    # Which sender process holds the claim: a graceful stop releases only its own rows.
    claimed_by: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # `campaigns retry` restarts the retry deadline from here instead of from created_at.
    requeued_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Complaint(Base):
    """A recipient marked a delivery as spam (a feedback-loop report): counted once per delivery."""

    __tablename__ = "complaints"
    delivery_id: Mapped[int] = mapped_column(
        ForeignKey("deliveries.id", ondelete="CASCADE"), primary_key=True
    )
    campaign_id: Mapped[int] = mapped_column(
        ForeignKey("campaigns.id", ondelete="CASCADE"), index=True
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Suppression(Base):
    """An address that must not be mailed, kept only as a keyed hash."""

    __tablename__ = "suppressions"
    id: Mapped[int] = mapped_column(primary_key=True)
    email_hash: Mapped[str] = mapped_column(String(64), unique=True)
    reason: Mapped[str] = mapped_column(String(50))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Event(Base):
    """The audit trail: who did what, when."""

    __tablename__ = "events"
    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(100))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class ServiceLock(Base):
    """A named lease held by one process (e.g. the scheduler), so a second one stays idle."""

    __tablename__ = "service_locks"
    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    holder: Mapped[str] = mapped_column(String(200))
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)


class StaffRole(StrEnum):
    EDITOR = "editor"
    APPROVER = "approver"
    ADMIN = "admin"


class Staff(Base):
    """A campaign staff account for the console (never a subscriber)."""

    __tablename__ = "staff"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    role: Mapped[str] = mapped_column(_enum(StaffRole))
    language: Mapped[str] = mapped_column(String(8), default="en")
    # Argon2id (argon2-cffi's encoded form); "" until enrolled.
    password_hash: Mapped[str] = mapped_column(String(200), default="")
    totp_secret: Mapped[str] = mapped_column(String(64), default="")
    # The last TOTP time step accepted: a code is good once (a replay of it, or of an older
    # step, is refused).
    totp_last_step: Mapped[int] = mapped_column(Integer, default=0)
    training: Mapped[bool] = mapped_column(Boolean, default=False)
    # sha256 of the one-time enrolment link's secret, and when it expires.
    enrol_token_hash: Mapped[str | None] = mapped_column(String(64), unique=True)
    enrol_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    enrolled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    disabled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class StaffRecoveryCode(Base):
    """A single-use recovery code, kept only as a hash."""

    __tablename__ = "staff_recovery_codes"
    id: Mapped[int] = mapped_column(primary_key=True)
    staff_id: Mapped[int] = mapped_column(ForeignKey("staff.id", ondelete="CASCADE"), index=True)
    code_hash: Mapped[str] = mapped_column(String(200))
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class StaffSession(Base):
    """A signed-in console session, server side: revocable at once."""

    __tablename__ = "staff_sessions"
    # sha256 of the cookie's value: a leaked table does not give working cookies.
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    staff_id: Mapped[int] = mapped_column(ForeignKey("staff.id", ondelete="CASCADE"), index=True)
    # The per-session form token every state-changing request must carry.
    csrf_token: Mapped[str] = mapped_column(String(64))
    client: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class RateLimit(Base):
    """Attempts counted per key in fixed windows, in the database so every process agrees."""

    __tablename__ = "rate_limits"
    # A keyed hash of what is limited (e.g. "signin:client:203.0.113.5"): no address kept plain.
    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    window_start: Mapped[datetime] = mapped_column(UTCDateTime, primary_key=True)
    count: Mapped[int] = mapped_column(Integer, default=0)


class CampaignRevision(Base):
    """A draft frozen for approval: what exactly will be sent, to whom, as one hash."""

    __tablename__ = "campaign_revisions"
    __table_args__ = (UniqueConstraint("campaign_id", "number"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    # sha256 over the rendered variants (nonce-free), list, segment and recipient count.
    hash: Mapped[str] = mapped_column(String(64))
    list_id: Mapped[int] = mapped_column(ForeignKey("lists.id"))
    segment_id: Mapped[int | None] = mapped_column(ForeignKey("segments.id"))
    recipients: Mapped[int] = mapped_column(Integer)
    created_by: Mapped[str] = mapped_column(String(320))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # Set when an edit (a newer revision) voids this one and its approvals.
    voided_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Approval(Base):
    """One person's approval of one revision (a break-glass send records one too)."""

    __tablename__ = "approvals"
    __table_args__ = (UniqueConstraint("revision_id", "approver"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    revision_id: Mapped[int] = mapped_column(
        ForeignKey("campaign_revisions.id", ondelete="CASCADE")
    )
    approver: Mapped[str] = mapped_column(String(320))
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    break_glass: Mapped[bool] = mapped_column(Boolean, default=False)
    reason: Mapped[str] = mapped_column(Text, default="")


class DigestExclusion(Base):
    """An item staff left out of a list's next digest."""

    __tablename__ = "digest_exclusions"
    list_id: Mapped[int] = mapped_column(
        ForeignKey("lists.id", ondelete="CASCADE"), primary_key=True
    )
    item_id: Mapped[int] = mapped_column(
        ForeignKey("items.id", ondelete="CASCADE"), primary_key=True
    )
    excluded_by: Mapped[str] = mapped_column(String(320))
    excluded_at: Mapped[datetime] = mapped_column(UTCDateTime)


class ConfirmationMark(Base):
    """When an address was last sent a web signup's confirmation, as a keyed hash only.

    Kept for [web] confirm_resend_hours, so that one address gets at most one confirmation in that
    time whatever is posted, without keeping the address of someone who never confirms.
    """

    __tablename__ = "confirmation_marks"
    email_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    sent_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class UsedChallenge(Base):
    """A signup form's challenge already answered: each form token is good for one post."""

    __tablename__ = "used_challenges"
    challenge: Mapped[str] = mapped_column(String(64), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class ReaderKey(Base):
    """A reader's OpenPGP public key: pending until proven, then what their mail is encrypted to.

    At most one row per (subscriber, status): a new key waits as pending while the active one
    stays in use, and replaces it only once the reader follows the link sent encrypted to it.
    """

    __tablename__ = "reader_keys"
    __table_args__ = (UniqueConstraint("subscriber_id", "status"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    subscriber_id: Mapped[int] = mapped_column(ForeignKey("subscribers.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(_enum(KeyStatus))
    fingerprint: Mapped[str] = mapped_column(String(64))
    armored: Mapped[str] = mapped_column(Text, default="")
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    confirmed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # When the encrypted proof-of-decryption message went out; NULL: still owed.
    confirm_sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # When the encrypted "your key expires soon" reminder went out for this key.
    reminded_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # From then on the sender checks the key in full again (openpgp.KeyInfo.recheck_at).
    recheck_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class KeyNotice(Base):
    """One neutral plaintext notice per key problem (not per campaign); NULL sent_at: owed."""

    __tablename__ = "key_notices"
    __table_args__ = (UniqueConstraint("subscriber_id", "fingerprint", "problem"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    subscriber_id: Mapped[int] = mapped_column(
        ForeignKey("subscribers.id", ondelete="CASCADE"), index=True
    )
    fingerprint: Mapped[str] = mapped_column(String(64))
    problem: Mapped[str] = mapped_column(String(20))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class CaseStatus(StrEnum):
    DRAFT = "draft"  # being prepared; nothing sent
    OPEN = "open"  # the first message went out
    UPDATED = "updated"  # at least one update went out
    CLOSED = "closed"  # the closing message went out (or it was closed with no message)


class CaseOutcome(StrEnum):
    RELEASED = "released"
    IMPROVED = "improved"
    NO_CHANGE = "no-change"
    NO_FURTHER_ACTION = "no-further-action"


class CaseRole(StrEnum):
    """What a message of a case is: the first, an update, the reminder or the closing one."""

    FIRST = "first"
    UPDATE = "update"
    REMINDER = "reminder"
    CLOSING = "closing"


class ActionCase(Base):
    """An urgent-action case ("UA 12/26"): who to write to, by when, what to say.

    Its messages are campaigns (CaseMessage), all threaded under the first one each reader got.
    """

    __tablename__ = "cases"
    __table_args__ = (UniqueConstraint("year", "seq"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    # The number of the case within its year: "UA <seq>/<yy>" (reference keeps the prefix used).
    year: Mapped[int] = mapped_column(Integer)
    seq: Mapped[int] = mapped_column(Integer)
    reference: Mapped[str] = mapped_column(String(40), unique=True)
    status: Mapped[str] = mapped_column(_enum(CaseStatus), default=CaseStatus.DRAFT)
    outcome: Mapped[str] = mapped_column(_enum(CaseOutcome), default="")
    title: Mapped[str] = mapped_column(String(300))
    body_html: Mapped[str] = mapped_column(Text, default="")
    # What readers are asked to do, besides writing (sanitised HTML); "" = the usual ask.
    actions_html: Mapped[str] = mapped_column(Text, default="")
    person: Mapped[str] = mapped_column(String(200), default="")
    # False: the web copies show the person's initials only (the emails carry the name).
    person_public: Mapped[bool] = mapped_column(Boolean, default=True)
    # The last day to write, in the portal's time zone ([schedule] timezone).
    deadline: Mapped[date | None] = mapped_column(Date)
    # [{"name", "title", "email", "postal", "salutation", "language"}], in the order given.
    targets: Mapped[list[dict[str, str]]] = mapped_column(JSON, default=list)
    # The sample letter by language: {"be": {"subject": ..., "body": ...}}.
    letters: Mapped[dict[str, dict[str, str]]] = mapped_column(JSON, default=dict)
    list_id: Mapped[int] = mapped_column(ForeignKey("lists.id"))
    segment_id: Mapped[int | None] = mapped_column(ForeignKey("segments.id"))
    item_id: Mapped[int | None] = mapped_column(ForeignKey("items.id"), unique=True)
    created_by: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # False keeps every message of the case out of the archive (`actions create --no-archive`).
    archived: Mapped[bool] = mapped_column(Boolean, default=True)
    # How many said they wrote, kept when the case closes and the per-reader rows are deleted.
    wrote_total: Mapped[int] = mapped_column(Integer, default=0)
    mailing_list: Mapped[MailingList] = relationship()


class CaseMessage(Base):
    """A campaign that is one message of a case, with its place in the thread."""

    __tablename__ = "case_messages"
    campaign_id: Mapped[int] = mapped_column(
        ForeignKey("campaigns.id", ondelete="CASCADE"), primary_key=True
    )
    case_id: Mapped[int] = mapped_column(ForeignKey("cases.id", ondelete="CASCADE"), index=True)
    role: Mapped[str] = mapped_column(_enum(CaseRole))
    # 0 for the first, reminder and closing messages; 1, 2, ... for updates.
    number: Mapped[int] = mapped_column(Integer, default=0)
    body_html: Mapped[str] = mapped_column(Text, default="")
    # An update also to people who joined the list after the first message (`--include-new`).
    include_new: Mapped[bool] = mapped_column(Boolean, default=False)
    # The public web copy by language: rendered for the archive (initials when the person's
    # name is not to be published, no "I wrote" link), never sent.
    copies: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    case: Mapped[ActionCase] = relationship()


class CaseLetter(Base):
    """A reader who said they sent their letter: counted once, spared the reminder; no time kept."""

    __tablename__ = "case_letters"
    case_id: Mapped[int] = mapped_column(
        ForeignKey("cases.id", ondelete="CASCADE"), primary_key=True
    )
    subscriber_id: Mapped[int] = mapped_column(
        ForeignKey("subscribers.id", ondelete="CASCADE"), primary_key=True
    )
