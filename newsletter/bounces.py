"""Bounces that come back later: VERP envelope senders and delivery status notifications.

Each delivery goes out with its own signed envelope sender, bounces+<delivery>-<signature>@domain
(VERP), so a bounce names the delivery it is about whatever the remote server writes in it. A
bounce is read with the email package: RFC 3464 message/delivery-status parts give the action and
status per recipient; the original message's Message-ID (text/rfc822-headers or message/rfc822) is
the fallback when the bounce lost the VERP address. A hard bounce (action failed, status 5.x.x)
marks the delivery failed and suppresses the address; a delay (4.x.x) is noted on the delivery.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from email import message_from_bytes, policy
from email.message import Message

from sqlalchemy import select
from sqlalchemy.orm import Session

from newsletter.config import Settings
from newsletter.db.models import Delivery, DeliveryStatus, Event, Subscriber
from newsletter.ledger import scrub, suppress_bounced
from newsletter.message import message_id

# Linear: anchored at the start (match); each run is followed by a character outside its class.
_VERP = re.compile(r"^(?P<local>[^+@]+)\+(?P<id>\d+)-(?P<sig>[0-9a-f]{10})@(?P<domain>[^@>]+)$")
# Linear: digit runs each followed by a fixed character, then a run that stops at "<" or ">", so
# attempts from different "<" never rescan the same text ([^>]+ made unclosed ids quadratic).
_MESSAGE_ID = re.compile(r"<(?P<cid>\d+)\.(?P<sid>\d+)\.[0-9a-f]{16}@[^<>]+>")
_ADDRESS_HEADERS = ("Delivered-To", "X-Original-To", "Envelope-To", "X-Envelope-To", "To")


@dataclass(frozen=True)
class Bounce:
    """What a bounce says: which delivery, and whether the failure is for good."""

    delivery_id: int | None
    message_key: tuple[int, int] | None  # (campaign, subscriber) from the original Message-ID
    hard: bool
    status: str
    diagnostic: str


def _signature(delivery_id: int, secret: str) -> str:
    return hmac.new(secret.encode(), f"verp:{delivery_id}".encode(), hashlib.sha256).hexdigest()[
        :10
    ]


def verp_address(delivery_id: int, *, settings: Settings) -> str:
    """The envelope sender of one delivery: bounces+<id>-<signature>@domain."""
    local, _, domain = settings.mail.bounce_address.rpartition("@")
    sig = _signature(delivery_id, settings.security.require_secret())
    return f"{local}+{delivery_id}-{sig}@{domain}"


def parse_verp(address: str, *, settings: Settings) -> int | None:
    """The delivery a VERP address names, or None if it is not ours or the signature is wrong."""
    match = _VERP.match(address.strip().strip("<>").lower())
    local, _, domain = settings.mail.bounce_address.lower().rpartition("@")
    if not match or match["local"] != local or match["domain"] != domain:
        return None
    delivery_id = int(match["id"])
    expected = _signature(delivery_id, settings.security.require_secret())
    return delivery_id if hmac.compare_digest(expected, match["sig"]) else None


def parse_bounce(
    raw: bytes, *, envelope_recipients: Sequence[str] = (), settings: Settings
) -> Bounce | None:
    """Read a delivery status notification; None when it is not one (an auto-reply, spam)."""
    msg = message_from_bytes(raw, policy=policy.default)
    report = _delivery_status(msg)
    if report is None:
        return None
    action, status, diagnostic = report
    if action not in ("failed", "delayed"):
        return None
    return Bounce(
        delivery_id=_find_delivery(msg, envelope_recipients, settings),
        message_key=_original_key(msg, settings),
        hard=action == "failed" and status.startswith("5"),
        status=status,
        diagnostic=" ".join(diagnostic.split())[:500],
    )


def _delivery_status(msg: Message) -> tuple[str, str, str] | None:
    """(action, status, diagnostic) of the first recipient block that failed or was delayed."""
    for part in msg.walk():
        if part.get_content_type() != "message/delivery-status":
            continue
        blocks = part.get_payload()
        for block in blocks[1:] if isinstance(blocks, list) else []:
            if not isinstance(block, Message):
                continue
            action = str(block.get("Action", "")).strip().lower()
            if action in ("failed", "delayed"):
                status = str(block.get("Status", "")).strip()
                return action, status, str(block.get("Diagnostic-Code", ""))
    return None


def _find_delivery(msg: Message, envelope: Sequence[str], settings: Settings) -> int | None:
    candidates = list(envelope)
    for name in _ADDRESS_HEADERS:
        candidates += [str(v) for v in msg.get_all(name, [])]
    for candidate in candidates:
        # Split on one character class (linear); findall("[^…]+@[^…]+") was quadratic in a long
        # run without "@". A token counts, as it did, when an "@" has a character on each side.
        tokens = re.split(r"[\s<>,\"]", candidate)
        for address in (token for token in tokens if "@" in token[1:-1]):
            if (found := parse_verp(address, settings=settings)) is not None:
                return found
    return None


def _original_key(msg: Message, settings: Settings) -> tuple[int, int] | None:
    """(campaign, subscriber) from the returned original's Message-ID, if it is one of ours."""
    for part in msg.walk():
        kind = part.get_content_type()
        if kind not in ("text/rfc822-headers", "message/rfc822"):
            continue
        payload = part.get_payload()
        original = payload[0] if isinstance(payload, list) else payload
        text = original.as_string() if isinstance(original, Message) else str(original)
        for match in _MESSAGE_ID.finditer(text):
            cid, sid = int(match["cid"]), int(match["sid"])
            if _is_ours(match.group(0), cid, sid, settings):
                return cid, sid
    return None


def _is_ours(found: str, cid: int, sid: int, settings: Settings) -> bool:
    domain = found.rpartition("@")[2].rstrip(">")
    secret = settings.security.require_secret()
    mine = message_id(campaign_id=cid, subscriber_id=sid, secret=secret, domain=domain)
    return hmac.compare_digest(mine, found)


def handle_bounce(
    *,
    session: Session,
    raw: bytes,
    envelope_recipients: Sequence[str] = (),
    settings: Settings,
    now: datetime,
) -> str:
    """Apply one incoming bounce; returns "hard", "soft", "not a bounce" or "unknown delivery"."""
    bounce = parse_bounce(raw, envelope_recipients=envelope_recipients, settings=settings)
    if bounce is None:
        return "not a bounce"
    delivery = _delivery_for(session, bounce)
    if delivery is None:
        return "unknown delivery"
    subscriber = session.get(Subscriber, delivery.subscriber_id)
    email = subscriber.email if subscriber else ""
    reply = scrub(f"bounce {bounce.status} {bounce.diagnostic}".strip(), email)
    delivery.last_reply = reply
    if not bounce.hard:
        return "soft"
    delivery.status = DeliveryStatus.FAILED
    if subscriber is not None:
        suppress_bounced(session, subscriber.id, email, settings=settings, now=now, reply=reply)
    session.add(
        Event(at=now, actor="bounces", action="delivery.bounced", detail={"delivery": delivery.id})
    )
    session.flush()
    return "hard"


def _delivery_for(session: Session, bounce: Bounce) -> Delivery | None:
    if bounce.delivery_id is not None:
        return session.get(Delivery, bounce.delivery_id)
    if bounce.message_key is not None:
        cid, sid = bounce.message_key
        return session.scalar(
            select(Delivery).where(Delivery.campaign_id == cid, Delivery.subscriber_id == sid)
        )
    return None
