"""Spam complaints: the feedback-loop reports (ARF, RFC 5965) the big providers send.

Yahoo's Complaint Feedback Loop and Microsoft's JMRP send, to the address registered with them
(here the bounce address, so that they arrive where bounces do), a multipart/report;
report-type=feedback-report: a message/feedback-report part (Feedback-Type: abuse,
Original-Mail-From, Original-Rcpt-To, Arrival-Date...) and the original, whole (message/rfc822)
or its headers (text/rfc822-headers), often with the recipient's address redacted.

The complained-about delivery is found as a bounce's is (newsletter.bounces): a VERP address
with a valid signature (the envelope recipient, the report's Original-Mail-From, the original's
Return-Path), else the original's Message-ID, which carries our HMAC. Stricter than for a bounce,
"the original" is only the report's own: the first message/rfc822 or text/rfc822-headers part
directly under the multipart/report, and only its Message-ID field, holding exactly one id of
ours. A reply to our message (our id in In-Reply-To or References) or someone else's message
carrying ours as an attachment names no delivery. The recipient's address in the report is never
used: anyone can write one. A Message-ID alone is enough here, where a bounce
needs a second one: only someone who saw the message knows it, and the message carries its own
unsubscribe links, so a complaint gives no one a power they did not have.

A complaint unsubscribes the person from every list and suppresses the address (reason
"complaint") at once, and is counted once per delivery on its campaign (table complaints), so the
same report twice counts once. A campaign whose complaints pass [smtp] complaint_pause_rate of its
delivered messages, once it has delivered complaint_min_delivered, pauses itself with the
reason, once (an operator who resumes it has the last word). A report that names no delivery of
ours (forged, another sender's, a signature that does not verify) changes nothing, and says so
in one log line without any address.
"""

from __future__ import annotations

import base64
import binascii
import logging
import quopri
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from email.errors import MissingHeaderBodySeparatorDefect
from email.message import Message
from email.parser import HeaderParser
from email.policy import compat32

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from newsletter.audit import record_event
from newsletter.bounces import (
    MAX_HEADER_CHARS,
    MAX_HEADERS_TEXT,
    MAX_PARTS,
    UnreadableMailError,
    apply_bounce,
    delivery_for,
    find_delivery,
    header_text,
    our_message_id,
    read_mail,
)
from newsletter.campaigns import pause_campaign
from newsletter.config import Settings
from newsletter.db.models import (
    Campaign,
    CampaignStatus,
    Complaint,
    Delivery,
    DeliveryStatus,
    Event,
    Subscriber,
    SubscriberStatus,
)
from newsletter.errors import NewsletterError
from newsletter.subscriptions import unsubscribe
from newsletter.suppression import suppress

log = logging.getLogger(__name__)

ACTOR = "complaints"
MAX_RETURN_PATHS = 10
# RFC 5965's registered feedback types: only these are named in the log (the field is outside
# text); "abuse" is the complaint, the others (fraud, virus, other, not-spam) change nothing.
FEEDBACK_TYPES = ("abuse", "fraud", "virus", "other", "not-spam")


@dataclass(frozen=True)
class Report:
    """What a feedback report says: its type and the delivery it names, if any."""

    feedback_type: str  # lower case; "" when the report part is missing
    delivery_id: int | None  # from a VERP address whose signature is valid
    message_key: tuple[int, int] | None  # (campaign, subscriber) from the original's Message-ID


def is_feedback_report(msg: Message) -> bool:
    """Whether a message is a multipart/report with report-type=feedback-report."""
    if msg.get_content_type() != "multipart/report":
        return False
    kind = msg.get_param("report-type")
    return isinstance(kind, str) and kind.strip().lower() == "feedback-report"


def parse_report(msg: Message, envelope: Sequence[str], settings: Settings) -> Report | None:
    """Read a feedback report (already read with read_mail); None when the message is not one.

    Raises UnreadableMailError when a surprise in the message stops the reading.
    """
    try:
        if not is_feedback_report(msg):
            return None
        fields = _feedback_fields(msg)
        if fields is None:
            return Report("", None, None)
        original = _original(msg)
        candidates = [
            *envelope,
            header_text(fields, "Original-Mail-From"),
            *_return_paths(original),
        ]
        return Report(
            feedback_type=header_text(fields, "Feedback-Type").lower()[:20],
            delivery_id=find_delivery(msg, candidates, settings),
            message_key=_original_key(original, settings),
        )
    except NewsletterError:
        raise
    except Exception as e:  # any surprise in a hostile message sets it aside, not the run
        raise UnreadableMailError(f"unexpected content ({type(e).__name__})") from None


def _report_parts(msg: Message) -> list[Message]:
    """The parts directly under the multipart/report (nothing nested deeper)."""
    payload = msg.get_payload()
    if not isinstance(payload, list):
        return []
    return [part for part in payload[:MAX_PARTS] if isinstance(part, Message)]


def _feedback_fields(msg: Message) -> Message | None:
    """The fields of the report's message/feedback-report part, as headers."""
    for part in _report_parts(msg):
        if part.get_content_type() == "message/feedback-report":
            return _message_headers(part)
    return None


def _original(msg: Message) -> Message | None:
    """The headers of the report's own original: the first message/rfc822 or
    text/rfc822-headers part directly under the report; None when there is none."""
    for part in _report_parts(msg):
        kind = part.get_content_type()
        if kind == "message/rfc822":
            return _message_headers(part)
        if kind == "text/rfc822-headers":
            body = part.get_payload(decode=True)  # it may come base64-encoded
            return _headers_of(body) if isinstance(body, bytes) else None
    return None


def _message_headers(part: Message) -> Message | None:
    """A message/* part's content as a header block, decoded first when it came base64- or
    quoted-printable-encoded (which the parser ignores for message/* parts)."""
    payload = part.get_payload()
    inner = payload[0] if isinstance(payload, list) and payload else None
    if not isinstance(inner, Message):
        return None
    encoding = str(part.get("Content-Transfer-Encoding", "")).strip().lower()
    if encoding not in ("base64", "quoted-printable"):
        return inner
    # The encoded text as it came: whatever the parser took for header lines, a blank line only
    # if there was one, then the rest (a str: the parser keeps it undecoded).
    head = "".join(f"{name}: {value}\n" for name, value in inner.raw_items())
    blank = not any(isinstance(d, MissingHeaderBodySeparatorDefect) for d in inner.defects)
    rest = inner.get_payload()
    text = head + ("\n" if head and blank else "") + (rest if isinstance(rest, str) else "")
    raw = text[: 2 * MAX_HEADERS_TEXT].encode("ascii", "replace")
    try:
        body = base64.b64decode(raw) if encoding == "base64" else quopri.decodestring(raw)
    except (binascii.Error, ValueError):
        return None
    return _headers_of(body)


def _headers_of(body: bytes) -> Message:
    """Header text (a report's fields, an original's headers) read as a header block."""
    text = body[:MAX_HEADERS_TEXT].decode("ascii", "replace")
    return HeaderParser(policy=compat32).parsestr(text, headersonly=True)


def _return_paths(original: Message | None) -> list[str]:
    """The Return-Path fields of the report's original: where the provider saw our VERP address."""
    if original is None:
        return []
    found = original.get_all("Return-Path", [])[:MAX_RETURN_PATHS]
    return [str(value)[:MAX_HEADER_CHARS] for value in found]


def _original_key(original: Message | None, settings: Settings) -> tuple[int, int] | None:
    """(campaign, subscriber) from the original's one Message-ID field, when it is exactly one
    Message-ID of ours; never from In-Reply-To, References or anything nested."""
    if original is None:
        return None
    fields = original.get_all("Message-ID", [])
    if len(fields) != 1:
        return None
    return our_message_id(str(fields[0]), settings)


def handle_return(
    *,
    session: Session,
    raw: bytes,
    envelope_recipients: Sequence[str] = (),
    settings: Settings,
    now: datetime,
) -> str:
    """Apply one message that came back: a feedback report as a complaint, anything else as a
    bounce. The outcome: "complaint", "complaint again", "not a complaint", "unknown delivery",
    or one of newsletter.bounces.handle_bounce's.

    Raises UnreadableMailError, before touching the database, when the message cannot be read.
    """
    msg = read_mail(raw)
    report = parse_report(msg, envelope_recipients, settings)
    if report is None:
        return apply_bounce(
            session=session,
            msg=msg,
            envelope_recipients=envelope_recipients,
            settings=settings,
            now=now,
        )
    return apply_complaint(session=session, report=report, settings=settings, now=now)


def apply_complaint(*, session: Session, report: Report, settings: Settings, now: datetime) -> str:
    """Suppress and count the complaint a report makes; see handle_return for the outcomes."""
    if report.feedback_type != "abuse":
        kind = report.feedback_type if report.feedback_type in FEEDBACK_TYPES else "unknown"
        log.info("feedback report of type %s is not a complaint; nothing changed", kind)
        return "not a complaint"
    delivery = delivery_for(session, report.delivery_id, report.message_key)
    if delivery is None:
        log.info("complaint names no delivery of ours (forged or unknown); nothing changed")
        return "unknown delivery"
    if session.get(Complaint, delivery.id) is not None:
        log.info("complaint about delivery %s repeated; counted once", delivery.id)
        return "complaint again"
    session.add(
        Complaint(delivery_id=delivery.id, campaign_id=delivery.campaign_id, created_at=now)
    )
    _unsubscribe(session, delivery.subscriber_id, settings=settings, now=now)
    record_event(
        session,
        now=now,
        actor=ACTOR,
        action="delivery.complained",
        delivery=delivery.id,
        campaign=delivery.campaign_id,
    )
    session.flush()
    log.info("complaint about delivery %s: unsubscribed and suppressed", delivery.id)
    pause_if_complained(session, delivery.campaign_id, settings=settings, now=now)
    return "complaint"


def _unsubscribe(
    session: Session, subscriber_id: int, *, settings: Settings, now: datetime
) -> None:
    """A complaint is an unsubscribe from everything, and the address is suppressed."""
    unsubscribe(session=session, subscriber_id=subscriber_id, list_id=None, now=now, actor=ACTOR)
    person = session.get(Subscriber, subscriber_id)
    if person is not None and person.status != SubscriberStatus.FORGOTTEN:
        secret = settings.security.require_secret()
        suppress(session, person.email, secret=secret, reason="complaint", now=now)


def over_complaint_rate(
    complaints: int, delivered: int, *, rate: float, min_delivered: int
) -> bool:
    """Whether complaints pass `rate` of delivered, once at least min_delivered are delivered."""
    return rate > 0 and delivered >= max(min_delivered, 1) and complaints > rate * delivered


def complaint_counts(session: Session, campaign_ids: Sequence[int]) -> dict[int, int]:
    """Complaints counted per campaign (campaigns without any are left out)."""
    if not campaign_ids:
        return {}
    rows = session.execute(
        select(Complaint.campaign_id, func.count())
        .where(Complaint.campaign_id.in_(campaign_ids))
        .group_by(Complaint.campaign_id)
    )
    return {int(cid): int(n) for cid, n in rows}


def pause_if_complained(
    session: Session, campaign_id: int, *, settings: Settings, now: datetime
) -> bool:
    """Pause a running campaign whose complaint rate passed the limit, once; True if paused."""
    campaign = session.get(Campaign, campaign_id)
    if campaign is None or campaign.status != CampaignStatus.RUNNING:
        return False
    complaints = complaint_counts(session, [campaign_id]).get(campaign_id, 0)
    delivered = int(
        session.scalar(
            select(func.count()).where(
                Delivery.campaign_id == campaign_id, Delivery.status == DeliveryStatus.SENT
            )
        )
        or 0
    )
    smtp = settings.smtp
    if not over_complaint_rate(
        complaints,
        delivered,
        rate=smtp.complaint_pause_rate,
        min_delivered=smtp.complaint_min_delivered,
    ):
        return False
    paused_before = select(func.count()).where(
        Event.actor == ACTOR,
        Event.action == "campaign.paused",
        Event.detail["campaign"].as_integer() == campaign_id,
    )
    if session.scalar(paused_before):
        return False
    reason = (
        f"paused after {complaints} spam complaints in {delivered} delivered messages"
        f" ({complaints / delivered:.2%}, over [smtp] complaint_pause_rate"
        f" {smtp.complaint_pause_rate:.2%})"
    )
    pause_campaign(session=session, campaign_id=campaign_id, now=now, actor=ACTOR, reason=reason)
    log.warning("campaign %s paused: %s", campaign_id, reason)
    return True
