"""Bounces that come back later: VERP envelope senders and delivery status notifications.

Each delivery goes out with its own signed envelope sender, bounces+<delivery>-<signature>@domain
(VERP), so a bounce names the delivery it is about whatever the remote server writes in it. A
bounce is read with the email package: RFC 3464 message/delivery-status parts give the action and
status per recipient; the original message's Message-ID (text/rfc822-headers or message/rfc822) is
the fallback when the bounce lost the VERP address.

A hard bounce (action failed, status 5.x.x about the mailbox: X.0.0, X.1.x but the sender's
X.1.7 and X.1.8, X.2.0 to X.2.2; RFC 3463) with a valid VERP signature marks the delivery failed
and suppresses the address at once. A permanent failure about anything else (policy and
authentication X.7.x, such as a DMARC rejection, content X.6.x, a message too large X.2.3 or
X.3.4, routing, protocol) refused this message, not the address: it marks the delivery failed (a
VERP signature required) and suppresses no one, as the sender does for such a 5xx at RCPT (one
classifier for both: smtp_wire.mailbox_refused). A relay that accepts and then forwards would
otherwise turn one DNS mistake into every reader of a provider suppressed for good.

When only the returned Message-ID names the delivery, anyone who saw that message could have
written the bounce: a hard one is counted (an event and a note on the delivery) and suppresses only
when a second such bounce arrives for another delivery of the same person, that is from another
campaign. Bounces repeated for the same delivery never count twice, however far apart in time: a
forger can repeat one bounce, but cannot make a second Message-ID. A bounce applied once stays
applied (its delivery.bounced event) when the reader later signs up again, and a hard bounce for a
delivery that went out before the reader's latest confirmation suppresses no one: the confirmation
email reached them since. A delay (4.x.x) is noted on the delivery.

Mail from outside is read with limits (read_mail): only its first MAX_READ_BYTES, at most
MAX_CONTENT_TYPES Content-Type fields (which bounds how deep MIME can nest before the recursive
parser sees it), parts walked at most MAX_DEPTH deep. A message that cannot be read raises
UnreadableMailError, and its reader sets it aside (a Maildir folder, an SMTP answer) and goes on.
"""

from __future__ import annotations

import hmac
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from email import message_from_bytes, policy
from email.message import Message
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from newsletter.audit import record_event
from newsletter.config import Settings
from newsletter.db.models import (
    Delivery,
    DeliveryStatus,
    Event,
    Subscriber,
    SubscriberStatus,
    Subscription,
)
from newsletter.errors import ConfigError, NewsletterError
from newsletter.ledger import scrub, suppress_bounced
from newsletter.message import message_id
from newsletter.smtp_wire import mailbox_refused
from newsletter.tokens import keyed_hash

# The part of a VERP address after its last "+": <delivery>-<signature>. Linear: fullmatch of two
# bounded runs of disjoint classes around a literal "-"; the address is split by rpartition first,
# so the bounce address's own local part may hold a "+" too (news+bounces@).
_VERP_TAIL = re.compile(r"(?P<id>\d{1,18})-(?P<sig>[0-9a-f]{10})")
# Linear: every match starts at a literal "<" and every quantifier after it is bounded (at most
# 18 + 18 + 16 + 255 characters), so each start position costs a bounded number of steps whatever
# follows; the text is cut to MAX_HEADERS_TEXT first anyway.
_MESSAGE_ID = re.compile(r"<(?P<cid>\d{1,18})\.(?P<sid>\d{1,18})\.[0-9a-f]{16}@[^<>@\s]{1,255}>")
_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")  # fullmatch on at most 20 characters
_ADDRESS_HEADERS = ("Delivered-To", "X-Original-To", "Envelope-To", "X-Envelope-To", "To")
# Address candidates are the words between these characters; str.translate and str.split are
# single passes, where a regex scan for "x@y" re-scanned every long run once per start position.
_NOT_IN_ADDRESS = str.maketrans({c: " " for c in '<>,"'})

MAX_READ_BYTES = 256 * 1024  # a report and the original's headers come first; the rest is body
MAX_CONTENT_TYPES = 32  # Content-Type fields in what is read: nesting is at most 2 * 32 + 1 deep
MAX_CONTENT_TYPE_BYTES = 2000  # one field, folding included: the parser's params are quadratic
MAX_DEPTH = 8  # how deep the walk looks for the report and the returned original
MAX_PARTS = 200  # how many parts the walk looks at
MAX_ADDRESS = 320
MAX_CANDIDATES = 100  # address words tried as VERP addresses
MAX_HEADER_CHARS = 2000  # one header value as read
MAX_HEADERS_TEXT = 64 * 1024  # of a returned original's headers


class UnreadableMailError(NewsletterError):
    """A message that cannot be read safely; it is set aside, never retried as is."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"unreadable message: {reason}")


@dataclass(frozen=True)
class Bounce:
    """What a bounce says: which delivery, and whether the failure is for good."""

    delivery_id: int | None  # from a VERP address whose signature is valid
    message_key: tuple[int, int] | None  # (campaign, subscriber) from the original Message-ID
    hard: bool  # failed for good (5.x.x)
    status: str
    diagnostic: str


def _signature(delivery_id: int, secret: str) -> str:
    return keyed_hash(secret, "sha256").digest(b"verp:%d" % delivery_id).hex()[:10]


def verp_address(delivery_id: int, *, settings: Settings, bounce_address: str = "") -> str:
    """The envelope sender of one delivery: bounces+<id>-<signature>@domain.

    `bounce_address` is the identity's ([discreet] bounce_address for a discreet reader);
    [mail] bounce_address when not given.
    """
    local, _, domain = (bounce_address or settings.mail.bounce_address).rpartition("@")
    sig = _signature(delivery_id, settings.security.require_secret())
    return f"{local}+{delivery_id}-{sig}@{domain}"


def parse_verp(address: str, *, settings: Settings) -> int | None:
    """The delivery a VERP address names, or None if it is not ours or the signature is wrong."""
    address = address.strip().strip("<>").lower()
    if len(address) > MAX_ADDRESS:
        return None
    local_part, _, domain = address.rpartition("@")
    local, plus, tail = local_part.rpartition("+")
    match = _VERP_TAIL.fullmatch(tail) if plus else None
    ours = {
        tuple(a.lower().rpartition("@")[::2])
        for a in (settings.mail.bounce_address, settings.discreet.bounce_address)
    }
    if not match or (local, domain) not in ours:
        return None
    delivery_id = int(match["id"])
    expected = _signature(delivery_id, settings.security.require_secret())
    return delivery_id if hmac.compare_digest(expected, match["sig"]) else None


def read_mail(raw: bytes) -> Message:
    """Parse mail from outside within the limits above; UnreadableMailError when it cannot be."""
    head = raw[:MAX_READ_BYTES]
    _check_shape(head)
    try:
        # compat32 keeps header values as plain strings: the structured header parser of
        # policy.default took 40 s, or all memory, on one hostile megabyte-long header.
        return message_from_bytes(head, policy=policy.compat32)
    except Exception as e:  # RecursionError, MemoryError and the parser's own errors alike
        raise UnreadableMailError(f"the email package failed ({type(e).__name__})") from None


def _check_shape(head: bytes) -> None:
    """Refuse, before parsing, MIME that nests too deep or has an oversized Content-Type."""
    count, length = 0, -1  # length of the Content-Type field being read; -1 outside one
    # Lines as the email package splits them (CR, LF or CRLF); only a Content-Type field can
    # open a nested part, so counting them bounds the parser's recursion.
    for line in head.splitlines():
        if length >= 0 and line[:1] in (b" ", b"\t"):
            length += len(line)
        else:
            length = len(line) if line[:13].lower() == b"content-type:" else -1
            count += length >= 0
        if count > MAX_CONTENT_TYPES:
            raise UnreadableMailError(f"more than {MAX_CONTENT_TYPES} MIME parts")
        if length > MAX_CONTENT_TYPE_BYTES:
            raise UnreadableMailError(f"a Content-Type over {MAX_CONTENT_TYPE_BYTES} bytes")


def mail_parts(msg: Message) -> Iterator[Message]:
    """The message and its parts in order, at most MAX_DEPTH deep and MAX_PARTS in all."""
    stack, seen = [(msg, 0)], 0
    while stack and seen < MAX_PARTS:
        part, depth = stack.pop()
        seen += 1
        yield part
        children = part.get_payload()
        if isinstance(children, list) and depth < MAX_DEPTH:
            stack += [
                (c, depth + 1) for c in reversed(children[:MAX_PARTS]) if isinstance(c, Message)
            ]


def header_text(part: Message, name: str) -> str:
    """One header as printable one-line text: raw bytes decoded as UTF-8, controls blanked."""
    value = part.get(name)
    text = "" if value is None else str(value)[:MAX_HEADER_CHARS]
    # compat32 keeps undecodable bytes as surrogates; back to bytes, then UTF-8 or U+FFFD.
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())


def parse_bounce(
    raw: bytes, *, envelope_recipients: Sequence[str] = (), settings: Settings
) -> Bounce | None:
    """Read a delivery status notification; None when it is not one (an auto-reply, spam).

    Raises UnreadableMailError when the message cannot be read, whatever the reason.
    """
    return bounce_of(read_mail(raw), envelope_recipients, settings)


def bounce_of(msg: Message, envelope: Sequence[str], settings: Settings) -> Bounce | None:
    """What a message read with read_mail says as a bounce; None when it is not one."""
    try:
        return _bounce_of(msg, envelope, settings)
    except NewsletterError:
        raise
    except Exception as e:  # any surprise in a hostile message sets it aside, not the run
        raise UnreadableMailError(f"unexpected content ({type(e).__name__})") from None


def _bounce_of(msg: Message, envelope: Sequence[str], settings: Settings) -> Bounce | None:
    report = _delivery_status(msg)
    if report is None:
        return None
    action, status, diagnostic = report
    return Bounce(
        delivery_id=find_delivery(msg, envelope, settings),
        message_key=original_key(msg, settings),
        hard=action == "failed" and status.startswith("5"),
        status=status,
        diagnostic=without_addresses(diagnostic)[:500],
    )


def without_addresses(text: str) -> str:
    """One-line text with each word that holds an "@" replaced by "<address>".

    A remote server's diagnostic may name the reader in a form scrub() cannot know (the
    forwarding target of their alias, the domain as Unicode, a +tag), and the reply is kept in
    the append-only audit events, which `subscribers forget` does not erase. A split and a join:
    linear.
    """
    return " ".join("<address>" if "@" in word else word for word in text.split())


def _delivery_status(msg: Message) -> tuple[str, str, str] | None:
    """(action, status, diagnostic) of the first recipient block that failed or was delayed."""
    for part in mail_parts(msg):
        if part.get_content_type() != "message/delivery-status":
            continue
        blocks = part.get_payload()
        for block in blocks[1:MAX_PARTS] if isinstance(blocks, list) else []:
            if not isinstance(block, Message):
                continue
            action = header_text(block, "Action").lower()
            if action in ("failed", "delayed"):
                # The code is the field's first word: some servers add a comment after it
                # ("5.1.1 (bad destination mailbox address)"), RFC 822 style.
                status = header_text(block, "Status")[:40].partition(" ")[0][:20]
                status = status if _STATUS.fullmatch(status) else ""
                return action, status, header_text(block, "Diagnostic-Code")
    return None


def find_delivery(msg: Message, envelope: Sequence[str], settings: Settings) -> int | None:
    """The delivery of the first VERP address, with a valid signature, in envelope or headers."""
    candidates = [address[:MAX_HEADER_CHARS] for address in envelope]
    for name in _ADDRESS_HEADERS:
        candidates += [str(v)[:MAX_HEADER_CHARS] for v in msg.get_all(name, [])[:MAX_PARTS]]
    words = (w for c in candidates for w in c.translate(_NOT_IN_ADDRESS).split() if "@" in w)
    for _, word in zip(range(MAX_CANDIDATES), words, strict=False):
        if (found := parse_verp(word, settings=settings)) is not None:
            return found
    return None


def original_key(msg: Message, settings: Settings) -> tuple[int, int] | None:
    """(campaign, subscriber) from the returned original's Message-ID, if it is one of ours."""
    for part in mail_parts(msg):
        kind = part.get_content_type()
        if kind == "message/rfc822":
            payload = part.get_payload()
            original = payload[0] if isinstance(payload, list) and payload else None
            text = str(original.get("Message-ID", "")) if isinstance(original, Message) else ""
        elif kind == "text/rfc822-headers":
            body = part.get_payload(decode=True)  # it may come base64-encoded
            text = (
                body[:MAX_HEADERS_TEXT].decode("ascii", "replace")
                if isinstance(body, bytes)
                else ""
            )
        else:
            continue
        for match in _MESSAGE_ID.finditer(text[:MAX_HEADERS_TEXT]):
            cid, sid = int(match["cid"]), int(match["sid"])
            if _is_ours(match.group(0), cid, sid, settings):
                return cid, sid
    return None


def our_message_id(value: str, settings: Settings) -> tuple[int, int] | None:
    """(campaign, subscriber) when a Message-ID field's value is exactly one Message-ID of ours
    (signature checked); None for anything else, however much of ours it quotes."""
    found = value[:MAX_HEADER_CHARS].strip()
    match = _MESSAGE_ID.fullmatch(found)
    if match is None:
        return None
    cid, sid = int(match["cid"]), int(match["sid"])
    return (cid, sid) if _is_ours(found, cid, sid, settings) else None


def _is_ours(found: str, cid: int, sid: int, settings: Settings) -> bool:
    """Whether a Message-ID found in returned text carries our signature for (cid, sid)."""
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
    """Apply one incoming bounce: "hard", "unconfirmed", "refused" (failed for good, not for the
    mailbox: nobody suppressed), "hard before confirmation" (the delivery failed, the reader
    confirmed since: nobody suppressed), "soft", "not a bounce", "unknown delivery"; "hard again"
    and "refused again" for a bounce already applied (nothing written).

    Raises UnreadableMailError, before touching the database, when the message cannot be read.
    """
    return apply_bounce(
        session=session,
        msg=read_mail(raw),
        envelope_recipients=envelope_recipients,
        settings=settings,
        now=now,
    )


def apply_bounce(
    *,
    session: Session,
    msg: Message,
    envelope_recipients: Sequence[str] = (),
    settings: Settings,
    now: datetime,
) -> str:
    """Apply one bounce already read with read_mail; the outcomes of handle_bounce."""
    bounce = bounce_of(msg, envelope_recipients, settings)
    if bounce is None:
        return "not a bounce"
    delivery = delivery_for(session, bounce.delivery_id, bounce.message_key)
    if delivery is None:
        return "unknown delivery"
    subscriber = session.get(Subscriber, delivery.subscriber_id)
    email = subscriber.email if subscriber else ""
    reply = scrub(f"bounce {bounce.status} {bounce.diagnostic}".strip(), email)
    if not bounce.hard:
        delivery.last_reply = reply
        return "soft"
    if not mailbox_refused(bounce.status):
        if bounce.delivery_id is not None and delivery.status == DeliveryStatus.FAILED:
            return "refused again"  # the same report twice writes nothing twice
        delivery.last_reply = reply
        if bounce.delivery_id is not None:  # a Message-ID alone may be forged: a note only
            delivery.status = DeliveryStatus.FAILED
            record_event(
                session, now=now, actor="bounces", action="delivery.refused", delivery=delivery.id
            )
        session.flush()
        return "refused"
    if _bounce_applied(session, delivery, subscriber):
        return "hard again"  # whatever the reader did since: no second event for one bounce
    if bounce.delivery_id is None and not _bounced_elsewhere(session, delivery):
        _count_unconfirmed(session, delivery, reply, now=now)
        return "unconfirmed"
    delivery.last_reply = reply
    delivery.status = DeliveryStatus.FAILED
    if _confirmed_since(session, delivery):
        # They confirmed (signed up again) after this message went out: the mailbox took our
        # confirmation email since, so this old bounce says nothing about it now.
        record_event(
            session,
            now=now,
            actor="bounces",
            action=BOUNCED,
            delivery=delivery.id,
            suppressed=False,
        )
        session.flush()
        return "hard before confirmation"
    if subscriber is not None:
        suppress_bounced(session, subscriber.id, email, settings=settings, now=now, reply=reply)
    record_event(session, now=now, actor="bounces", action=BOUNCED, delivery=delivery.id)
    session.flush()
    return "hard"


BOUNCED = "delivery.bounced"
UNCONFIRMED = "delivery.bounce_unconfirmed"


def _count_unconfirmed(session: Session, delivery: Delivery, reply: str, *, now: datetime) -> None:
    """Note a hard bounce named only by Message-ID: an event (once per delivery), and a line on
    the delivery."""
    delivery.last_reply = f"{reply[:900]} (unconfirmed: Message-ID only, no VERP signature)"
    noted = select(func.count()).where(
        Event.action == UNCONFIRMED, Event.detail["delivery"].as_integer() == delivery.id
    )
    if session.scalar(noted):
        return
    record_event(
        session,
        now=now,
        actor="bounces",
        action=UNCONFIRMED,
        delivery=delivery.id,
        subscriber=delivery.subscriber_id,
    )
    session.flush()


def _bounce_applied(session: Session, delivery: Delivery, subscriber: Subscriber | None) -> bool:
    """Whether a hard bounce was applied to this delivery already (the reader suppressed then).

    Failed with its reader bounced, or failed with a delivery.bounced event: the event stays
    when the reader signs up again and is no longer bounced. Only a failed delivery is looked
    up (a retried one is sent again, and its new bounce is new).
    """
    if delivery.status != DeliveryStatus.FAILED:
        return False
    if subscriber is None or subscriber.status == SubscriberStatus.BOUNCED:
        return True
    applied = select(func.count()).where(
        Event.action == BOUNCED, Event.detail["delivery"].as_integer() == delivery.id
    )
    return bool(session.scalar(applied))


def _confirmed_since(session: Session, delivery: Delivery) -> bool:
    """Whether the delivery's reader confirmed a subscription after the delivery went out."""
    went_out = delivery.sent_at or delivery.created_at
    later = select(func.count()).where(
        Subscription.subscriber_id == delivery.subscriber_id,
        Subscription.confirmed_at > went_out,
    )
    return bool(session.scalar(later))


def _bounced_elsewhere(session: Session, delivery: Delivery) -> bool:
    """Whether an unconfirmed hard bounce came for another delivery (campaign) of this person,
    one that went out after their latest confirmation (an older one is no evidence now)."""
    confirmed = select(func.max(Subscription.confirmed_at)).where(
        Subscription.subscriber_id == delivery.subscriber_id
    )
    latest = session.scalar(confirmed)
    others = (
        select(func.count())
        .select_from(Event)
        .join(Delivery, Delivery.id == Event.detail["delivery"].as_integer())
        .where(
            Event.action == UNCONFIRMED,
            Event.detail["subscriber"].as_integer() == delivery.subscriber_id,
            Delivery.id != delivery.id,
        )
    )
    if latest is not None:
        others = others.where(func.coalesce(Delivery.sent_at, Delivery.created_at) > latest)
    return bool(session.scalar(others))


def delivery_for(
    session: Session, delivery_id: int | None, message_key: tuple[int, int] | None
) -> Delivery | None:
    """The delivery a bounce or complaint names: by VERP, else by the original's Message-ID."""
    if delivery_id is not None:
        return session.get(Delivery, delivery_id)
    if message_key is not None:
        cid, sid = message_key
        return session.scalar(
            select(Delivery).where(Delivery.campaign_id == cid, Delivery.subscriber_id == sid)
        )
    return None


# Reading a Maildir: the layout is simple enough to walk by hand, and mailbox.Maildir would parse
# every message (get_message) just to read its flags, which is where a hostile one crashed the run.
UNREADABLE = ".unreadable"


@dataclass(frozen=True)
class MaildirResult:
    """What became of one message file: its unique name, the outcome and, if set aside or left
    unmarked, why."""

    name: str
    outcome: str
    reason: str = ""
    marked: bool = True  # False: applied, but still unmarked (it is read again next run)


def process_maildir(
    root: Path, *, apply: Callable[[bytes], str], again: bool = False
) -> Iterator[MaildirResult]:
    """Apply each new message of a Maildir in arrival order, marking it seen (S) once applied.

    A message that cannot be read is moved to the Maildir++ folder .unreadable and reported as
    "unreadable"; an error of apply itself (the database) stops the run, the message unmarked.
    A missing cur/ is made first; ConfigError, before anything is applied, when messages could
    not be marked. A message applied whose marking fails all the same (a full disk, a name too
    long for its flags) is reported with marked False and the run goes on: applying it again
    next run writes nothing twice (each outcome is kept per delivery), so marking comes after
    applying, and a run killed between the two loses nothing.
    """
    _ready_to_mark(root)
    for path in _maildir_files(root):
        name, _, info = path.name.partition(":")
        flags = info[2:] if info.startswith("2,") else ""
        if "S" in flags and not again:
            continue
        try:
            raw = _read_head(path)
            if raw is None:
                continue  # another reader took it meanwhile
            outcome = apply(raw)
        except UnreadableMailError as e:
            os.replace(path, _unreadable_folder(root) / f"{name}:2,{flags}")
            yield MaildirResult(name, "unreadable", e.reason)
            continue
        seen = "".join(sorted(set(flags + "S")))
        try:
            os.replace(path, root / "cur" / f"{name}:2,{seen}")
        except OSError as e:
            yield MaildirResult(name, outcome, _os_reason(e), marked=False)
            continue
        yield MaildirResult(name, outcome)


def _ready_to_mark(root: Path) -> None:
    """Make a missing cur/; ConfigError when new/ or cur/ cannot take a marked message."""
    cur = root / "cur"
    try:
        cur.mkdir(mode=0o700, exist_ok=True)  # mail to the bounce address names readers
    except OSError as e:
        raise ConfigError(
            f"{root}: cannot make cur/ to mark messages in ({_os_reason(e)})"
        ) from None
    for folder in (root / "new", cur):
        if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError(f"{folder}: not writable, so processed messages cannot be marked")


def _os_reason(error: OSError) -> str:
    """An OSError in a few words, without the paths it quotes."""
    return error.strerror or type(error).__name__


def _read_head(path: Path) -> bytes | None:
    """The part of a message file that read_mail looks at; None when the file is gone."""
    try:
        with path.open("rb") as f:
            return f.read(MAX_READ_BYTES)
    except FileNotFoundError:
        return None
    except OSError as e:  # permissions, I/O errors: this file only
        raise UnreadableMailError(f"the file cannot be read ({type(e).__name__})") from None


def _maildir_files(root: Path) -> list[Path]:
    """The message files in new/ and cur/, oldest name first (names start with the time)."""
    files = [
        path
        for sub in ("new", "cur")
        if (root / sub).is_dir()
        for path in (root / sub).iterdir()
        if not path.name.startswith(".") and path.is_file()
    ]
    return sorted(files, key=lambda path: path.name)


def _unreadable_folder(root: Path) -> Path:
    """The cur/ of the .unreadable folder, made as a Maildir++ folder when it is missing."""
    folder = root / UNREADABLE
    for sub in ("tmp", "new", "cur"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    (folder / "maildirfolder").touch()
    return folder / "cur"
