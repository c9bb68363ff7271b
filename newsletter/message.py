"""Build the message one recipient gets: headers, a text and an HTML part, stable Message-ID.

Two ways to the same message. `build_message` uses the email package for one recipient (previews,
tests). `MessageTemplate` is the sender's fast path: the email package builds each variant once
(headers folded, parts declared quoted-printable), every fixed stretch of the bodies is
quoted-printable encoded once, and per recipient only the links are encoded and spliced in between
soft line breaks, with the per-recipient headers put in front. Every line stays within 76
characters and decodes to exactly what `build_message` carries.

Links go only where the variant's own markers are (render.link_markers: a nonce per render, so
feed text cannot carry them), and the fast path refuses a variant whose markers are not each once
in its own place (render.misplaced_links), as an old variant with the fixed markers may be.
"""

from __future__ import annotations

import binascii
import dataclasses
import functools
import html
import re
from dataclasses import dataclass
from datetime import datetime
from email.header import Header
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime

from newsletter.addresses import header_problem
from newsletter.config import DiscreetSettings, Settings
from newsletter.errors import PermanentDeliveryError
from newsletter.render import (
    RenderedVariant,
    has_link,
    misplaced_links,
    personalise,
    without_wrote,
)
from newsletter.smtp_wire import stuff
from newsletter.tokens import keyed_hash, make_token, make_wrote_token, page_url

# Folding at 78 columns made the email package RFC 2047-encode the long List-Unsubscribe URLs,
# which mail clients then cannot read. That header is set raw, folded between its two URLs (a
# line under RFC 5322's 998), and this policy leaves raw headers as they are.
POLICY = SMTP.clone(refold_source="none")


@dataclass(frozen=True)
class Recipient:
    subscriber_id: int
    email: str
    name: str
    # The campaigns of the same case this reader was sent before, oldest first: the message
    # threads under them (In-Reply-To the first, References all).
    thread: tuple[int, ...] = ()


@dataclass(frozen=True)
class ListInfo:
    id: int
    slug: str
    list_id: str


@dataclass(frozen=True)
class Identity:
    """Who a message says it is from, and where its links and bounces go.

    The plain one is the portal's ([mail], [web]); the discreet one ([discreet]) names nothing:
    its own From, Subject, List-Id, Message-ID domain, bounce domain and link host.
    """

    from_name: str
    from_address: str
    links_base: str
    unsubscribe_address: str  # "" = the https unsubscribe link only
    bounce_address: str
    discreet: DiscreetSettings | None = None

    @property
    def domain(self) -> str:
        """The domain of the From address (Message-IDs are made under it)."""
        return self.from_address.rpartition("@")[2]

    def subject(self, real: str, lang: str) -> str:
        """The Subject a reader sees: the real one, or the neutral one in their language."""
        return self.discreet.subject(lang) if self.discreet else real

    def list_header(self, mlist: ListInfo) -> str:
        """The List-Id: the list's own, or one neutral id for every list."""
        return f"<{self.discreet.list_id}>" if self.discreet else f"{mlist.slug} <{mlist.list_id}>"


def plain_identity(settings: Settings) -> Identity:
    """The portal's own sending identity."""
    mail = settings.mail
    return Identity(
        mail.from_name,
        mail.from_address,
        settings.web.base_url,
        mail.unsubscribe_address,
        mail.bounce_address,
    )


def discreet_identity(settings: Settings) -> Identity:
    """The neutral sending identity of readers who chose a discreet envelope."""
    d = settings.discreet
    return Identity(
        d.from_name,
        d.from_address,
        d.links_base(settings.web.base_url),
        d.unsubscribe_address,
        d.bounce_address,
        d,
    )


def identity_for(settings: Settings, discreet: str) -> Identity:
    """The identity for a reader's discreet mode ("off" is the plain one)."""
    return plain_identity(settings) if discreet in ("", "off") else discreet_identity(settings)


def message_id(*, campaign_id: int, subscriber_id: int, secret: str, domain: str) -> str:
    """The same Message-ID for the same (campaign, subscriber), every time it is built."""
    tag = keyed_hash(secret, "sha256").digest(b"%d:%d" % (campaign_id, subscriber_id))
    return f"<{campaign_id}.{subscriber_id}.{tag.hex()[:16]}@{domain}>"


def link_urls(
    *,
    recipient: Recipient,
    mlist: ListInfo,
    settings: Settings,
    identity: Identity | None = None,
    case_id: int | None = None,
) -> dict[str, str]:
    """The recipient's signed unsubscribe and preferences links (https, and mailto if any);
    with `case_id`, their "I sent my letter" link for that case too."""
    secret = settings.security.require_secret()
    identity = identity or plain_identity(settings)
    base = identity.links_base
    unsub = make_token(
        secret=secret,
        purpose="unsubscribe",
        subscriber_id=recipient.subscriber_id,
        list_id=mlist.id,
    )
    prefs = make_token(
        secret=secret,
        purpose="preferences",
        subscriber_id=recipient.subscriber_id,
        list_id=mlist.id,
    )
    mailto = identity.unsubscribe_address
    wrote = ""
    if case_id is not None:
        token = make_wrote_token(
            secret=secret, subscriber_id=recipient.subscriber_id, case_id=case_id
        )
        wrote = page_url(base, "wrote", token)
    return {
        "unsubscribe": page_url(base, "unsubscribe", unsub),
        "preferences": page_url(base, "preferences", prefs),
        # A token is URL-safe base64 and dots: only the space needs quoting (quote() is slow).
        "mailto": f"mailto:{mailto}?subject=unsubscribe%20{unsub}" if mailto else "",
        "wrote": wrote,
    }


# The most ids a References header lists: the first message and the latest others.
MAX_REFERENCES = 12
FOLD = "\r\n "  # between two ids of References: every line stays short


def thread_ids(recipient: Recipient, *, secret: str, domain: str) -> list[str]:
    """The Message-IDs of a reader's earlier messages of a case, first first ([] outside one).

    Each id is the one that reader's earlier message carried (message_id is a function of the
    campaign and the reader), under the domain of the identity they get mail from now: a reader
    who has chosen a discreet envelope since never sees the portal's domain in these headers
    (their thread breaks instead). Past MAX_REFERENCES, the first and the latest (RFC 5322
    3.6.4 allows trimming).
    """
    ids = [
        message_id(
            campaign_id=c, subscriber_id=recipient.subscriber_id, secret=secret, domain=domain
        )
        for c in recipient.thread
    ]
    if len(ids) > MAX_REFERENCES:
        ids = [ids[0], *ids[-(MAX_REFERENCES - 1) :]]
    return ids


def thread_headers(recipient: Recipient, *, secret: str, domain: str) -> str:
    """In-Reply-To (the first) and References (all), folded between ids ("" outside a case)."""
    ids = thread_ids(recipient, secret=secret, domain=domain)
    if not ids:
        return ""
    return f"In-Reply-To: {ids[0]}\r\nReferences: {FOLD.join(ids)}\r\n"


def list_unsubscribe(urls: dict[str, str]) -> str:
    """The List-Unsubscribe value: the https link, then the mailto one if there is one."""
    if not urls["mailto"]:
        return f"<{urls['unsubscribe']}>"
    return f"<{urls['unsubscribe']}>,\r\n <{urls['mailto']}>"


def build_message(
    *,
    variant: RenderedVariant,
    campaign_id: int,
    recipient: Recipient,
    mlist: ListInfo,
    settings: Settings,
    now: datetime,
    identity: Identity | None = None,
    case_id: int | None = None,
) -> EmailMessage:
    """Personalise a rendered variant for one recipient and wrap it with every header we promise.

    `case_id`: the variant is a case's message, whose "I sent my letter" link names that case.
    """
    identity = identity or plain_identity(settings)
    variant = _for_identity(variant, identity)
    # A check or preview (no case given) gets a link to case 0, shaped as every reader's is.
    wrote = (case_id or 0) if has_link(variant, "wrote") else None
    urls = link_urls(
        recipient=recipient, mlist=mlist, settings=settings, identity=identity, case_id=wrote
    )
    html, text = personalise(
        variant,
        unsubscribe_url=urls["unsubscribe"],
        preferences_url=urls["preferences"],
        wrote_url=urls["wrote"],
    )
    msg = EmailMessage(policy=POLICY)
    msg["From"] = Address(identity.from_name, addr_spec=identity.from_address)
    msg.set_raw("To", format_to(recipient))  # as the fast path: names cleaned, never refolded
    set_subject(msg, identity.subject(variant.subject, variant.lang))
    msg["Date"] = format_datetime(now)
    msg["Message-ID"] = message_id(
        campaign_id=campaign_id,
        subscriber_id=recipient.subscriber_id,
        secret=settings.security.require_secret(),
        domain=identity.domain,
    )
    ids = thread_ids(recipient, secret=settings.security.require_secret(), domain=identity.domain)
    if ids:
        msg["In-Reply-To"] = ids[0]
        msg["References"] = " ".join(ids)
    msg["List-Id"] = identity.list_header(mlist)
    msg.set_raw("List-Unsubscribe", list_unsubscribe(urls))
    msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    msg.set_content(text, subtype="plain", charset="utf-8")
    msg.add_alternative(html, subtype="html", charset="utf-8")
    return msg


# --- the sender's fast path ------------------------------------------------------------------

TEXT_SLOT = "@@NEWSLETTER-TEXT-BODY@@"
HTML_SLOT = "@@NEWSLETTER-HTML-BODY@@"
SOFT_BREAK = b"=\r\n"


def _qp(data: str) -> bytes:
    """Quoted-printable with CRLF line ends (binascii is C, and keeps lines within 76)."""
    out = binascii.b2a_qp(data.encode("utf-8"), istext=True)
    return out.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


@dataclass(frozen=True)
class _Body:
    """One body part cut at its per-recipient markers, the fixed stretches encoded once."""

    pieces: tuple[bytes, ...]
    links: tuple[str, ...]  # the link ("unsubscribe", "preferences") between two pieces
    escape: bool
    stuffed: tuple[bytes, ...]  # the pieces dot-stuffed, as the wire form carries them

    @classmethod
    def encode(cls, body: str, *, markers: dict[str, str], escape: bool) -> _Body:
        """Cut a rendered body at its markers and encode each fixed stretch."""
        body = body.replace("\r\n", "\n").removesuffix("\n").replace("\n", "\r\n")
        # Linear: an alternation of literal strings, no quantifier.
        cut = re.compile("(" + "|".join(re.escape(m) for m in markers.values()) + ")")
        parts = cut.split(body)
        key = {marker: name for name, marker in markers.items()}
        links = tuple(key[marker] for marker in parts[1::2])
        pieces = tuple(_qp(p) for p in parts[::2])
        return cls(pieces, links, escape, tuple(stuff(p) for p in pieces))

    def fill(
        self, urls: dict[str, str], *, wire: bool = False, encoded: dict[str, bytes] | None = None
    ) -> bytes:
        """The encoded body with this recipient's links, each between soft line breaks.

        `wire`: dot-stuffed. Each piece and each link starts a line (after a soft break), so
        stuffing them one by one stuffs the whole. `encoded`: the links' encodings made so far
        for this recipient (the text and HTML parts share a link that HTML escaping leaves as
        it is, as signed URLs are), filled in as they are made.
        """
        pieces = self.stuffed if wire else self.pieces
        made = {} if encoded is None else encoded
        out = [pieces[0]]
        for link, piece in zip(self.links, pieces[1:], strict=True):
            value = urls[link]
            if self.escape:
                value = html.escape(value)
            if (done := made.get(value)) is None:
                done = made[value] = stuff(_qp(value)) if wire else _qp(value)
            out += (SOFT_BREAK, done, SOFT_BREAK, piece)
        return b"".join(out)


@dataclass(frozen=True)
class MessageTemplate:
    """A variant made into message bytes once; `render` adds one recipient in well under 1 ms."""

    head: bytes
    middle: bytes
    tail: bytes
    text: _Body
    html: _Body
    mlist: ListInfo
    campaign_id: int
    identity: Identity
    # The case whose "I sent my letter" link the bodies carry (None: no such link).
    wrote_case: int | None = None
    # head, middle and tail dot-stuffed (they start a line or with a line break)
    stuffed: tuple[bytes, bytes, bytes] = (b"", b"", b"")

    @classmethod
    def build(
        cls,
        *,
        variant: RenderedVariant,
        campaign_id: int,
        mlist: ListInfo,
        settings: Settings,
        identity: Identity | None = None,
        sealed: bool = False,
        case_id: int | None = None,
    ) -> MessageTemplate:
        """Build the variant's fixed headers and MIME structure once, with the email package.

        A variant with a marker out of place is refused: the sender never splices a reader's
        links anywhere the templates did not put them, not even when the check was forced.
        `sealed`: the message will be encrypted, so it keeps the real Subject (RFC 9788 moves it
        inside, and the outside gets the neutral one). `case_id`: a case's message, whose "I sent
        my letter" link (if the variant carries one) names that case.
        """
        misplaced = misplaced_links(variant)
        if misplaced:
            part, what = misplaced[0]
            raise PermanentDeliveryError(
                f"not sent, as a reader's links would go astray: {variant.lang} {part}: {what}"
            )
        identity = identity or plain_identity(settings)
        variant = _for_identity(variant, identity)
        msg = EmailMessage(policy=POLICY)
        msg["From"] = Address(identity.from_name, addr_spec=identity.from_address)
        set_subject(
            msg, variant.subject if sealed else identity.subject(variant.subject, variant.lang)
        )
        msg["List-Id"] = identity.list_header(mlist)
        msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
        msg.set_content(TEXT_SLOT, subtype="plain", charset="utf-8", cte="quoted-printable")
        msg.add_alternative(HTML_SLOT, subtype="html", charset="utf-8", cte="quoted-printable")
        head, rest = msg.as_bytes().split(TEXT_SLOT.encode())
        middle, tail = rest.split(HTML_SLOT.encode())
        return cls(
            head=head,
            middle=middle,
            tail=tail,
            text=_Body.encode(variant.text, markers=variant.markers, escape=False),
            html=_Body.encode(variant.html, markers=variant.markers, escape=True),
            mlist=mlist,
            campaign_id=campaign_id,
            identity=identity,
            wrote_case=case_id if has_link(variant, "wrote") else None,
            stuffed=(stuff(head), stuff(middle), stuff(tail)),
        )

    def render(
        self, recipient: Recipient, *, settings: Settings, now: datetime, wire: bool = False
    ) -> bytes:
        """One recipient's message: their headers in front, their links spliced into the parts.

        `wire`: dot-stuffed as SMTP's DATA carries it, at no cost beyond the links (the fixed
        stretches were stuffed once); equal to `stuff(render(...))`. Header lines never start
        with a dot, and head, middle and tail start with a header name or a line break.
        """
        urls = link_urls(
            recipient=recipient,
            mlist=self.mlist,
            settings=settings,
            identity=self.identity,
            case_id=self.wrote_case,
        )
        secret = settings.security.require_secret()
        mid = message_id(
            campaign_id=self.campaign_id,
            subscriber_id=recipient.subscriber_id,
            secret=secret,
            domain=self.identity.domain,
        )
        headers = (
            f"To: {format_to(recipient)}\r\n"
            f"Date: {_date(now)}\r\n"
            f"Message-ID: {mid}\r\n"
            f"{thread_headers(recipient, secret=secret, domain=self.identity.domain)}"
            f"List-Unsubscribe: {list_unsubscribe(urls)}\r\n"
        )
        head, middle, tail = self.stuffed if wire else (self.head, self.middle, self.tail)
        encoded: dict[str, bytes] = {}  # by the link's text as it stands in the part
        return b"".join(
            (
                headers.encode("ascii"),
                head,
                self.text.fill(urls, wire=wire, encoded=encoded),
                middle,
                self.html.fill(urls, wire=wire, encoded=encoded),
                tail,
            )
        )


@functools.lru_cache(maxsize=8)
def _date(now: datetime) -> str:
    """The Date header's value: a batch's messages share one `now`, so it is formatted once."""
    return format_datetime(now)


PREHEADER_START = '<div class="preheader"'


def _for_identity(variant: RenderedVariant, identity: Identity) -> RenderedVariant:
    """The variant as a reader of this identity gets it: a discreet one gets no preview text
    and no "I sent my letter" link (nothing is recorded about them)."""
    if identity.discreet:
        return without_wrote(without_preheader(variant), keep=False)
    return without_wrote(variant, keep=True)


def without_preheader(variant: RenderedVariant) -> RenderedVariant:
    """The variant with its hidden preview text emptied: a discreet inbox list shows nothing.

    The preheader is our own template's first hidden div (email/partials/preheader.mjml.j2), its
    text escaped by Jinja (no "<" inside), so the next "</div>" closes it.
    """
    start = variant.html.find(PREHEADER_START)
    if start < 0:
        return variant
    open_end = variant.html.find(">", start) + 1
    close = variant.html.find("</div>", open_end)
    if open_end <= 0 or close < 0:
        return variant
    html = variant.html[:open_end] + variant.html[close:]
    return dataclasses.replace(variant, html=html)


def set_subject(msg: EmailMessage, subject: str) -> None:
    """One line of subject; non-ASCII encoded here, as the email package folds it badly.

    Python's folder puts the space between two encoded-words outside them when it folds a long
    non-ASCII Subject, and decoders drop that space (RFC 2047 6.2): a long Belarusian subject
    arrived with words run together. email.header keeps each space inside an encoded-word.
    Text that looks like an encoded-word is encoded too: given as it is, the email package
    decodes it, and "=?utf-8?q?x=0D=0ABcc:_y?=" in a feed's title would become a header.
    """
    subject = " ".join(subject.split())
    if subject.isascii() and not _looks_encoded(subject):
        msg["Subject"] = subject
    else:
        msg.set_raw("Subject", Header(subject, "utf-8", header_name="Subject").encode("\r\n"))


def format_to(recipient: Recipient) -> str:
    """The To header's value: a quoted or RFC 2047-encoded name and the address.

    A name that looks like an encoded-word is encoded, never quoted as it is: mail clients (and
    the email package) decode encoded-words even inside quotes, and "=?utf-8?q?=0D=0A?=" would
    show them a line break. An address cannot be encoded, so one that looks so is refused.
    """
    email = recipient.email
    if (problem := header_problem(email)) is not None:
        raise PermanentDeliveryError(problem)
    name = recipient.name
    if not name.isprintable():  # checked first: most names are, and the scan is per character
        name = "".join(c for c in name if c.isprintable())
    name = " ".join(name.split())
    if not name:
        return email
    if name.isascii() and not _looks_encoded(name):
        quoted = name.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{quoted}" <{email}>'
    encoded = Header(name, "utf-8", header_name="To").encode(linesep="\r\n")
    return f"{encoded} <{email}>"


def _looks_encoded(value: str) -> bool:
    # Every RFC 2047 encoded-word starts with "=?"; decoders are lenient about the rest.
    return "=?" in value
