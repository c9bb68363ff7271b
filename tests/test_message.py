"""The byte-template message, as received by a real SMTP server, against the reference path.

The sender's fast path (message.MessageTemplate) splices each recipient's links into bodies that
were quoted-printable encoded once per variant. These tests send a campaign with hostile names,
long links and non-Latin subjects through aiosmtpd, parse what arrived with the email package,
and compare it with message.build_message, the slow reference built with the email package.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.header import decode_header, make_header
from email.message import EmailMessage
from email.utils import parseaddr

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from newsletter.audience import enqueue_audience
from newsletter.clock import FrozenClock
from newsletter.config import Settings
from newsletter.db import unit_of_work
from newsletter.db.models import Campaign, MailingList, Subscriber, Subscription, Variant
from newsletter.errors import PermanentDeliveryError
from newsletter.message import (
    ListInfo,
    MessageTemplate,
    Recipient,
    build_message,
    format_to,
    link_urls,
    message_id,
)
from newsletter.render import RenderedVariant, link_markers
from newsletter.smtp_wire import stuff
from tests.smtp_faults import FaultyHandler, faulty_smtpd
from tests.test_send import deliver, settings_for

LONG_URL = "https://spring96.org/be/news/" + "palitviazni-" * 20 + "?utm=no&x=1&y=%D0%B0"
NAMES = {
    "none": "",
    "quotes-commas": 'Ann "The Hammer" O\'Brien, Jr.',
    "backslash": "Back\\slash (office); <ops>",
    "cyrillic-be": "Алесь Бяляцкі",
    "cyrillic-quotes-commas": 'Марыя "Маша" Калеснікава, Мінск',
    "emoji": "Zoë Ødegaard-Łukasz 🌹",
    "long-ascii": "Long " * 39 + "Name",
    "long-cyrillic": "Жыве " * 39 + "Вясна",
    "header-injection": "Evil\r\nBcc: victim@example.org\r\n",
    # Encoded-word lookalikes: sent as they are, a decoding client would see a line break.
    "encoded-word-q": "=?utf-8?q?Evil=0D=0ABcc:_victim@example.org?=",
    "encoded-word-b": "=?utf-8?b?RXZpbA0KQmNjOiB2aWN0aW1AZXhhbXBsZS5vcmc=?=",
    "encoded-word-inside": "Ann =?UTF-8?Q?=0D=0AReply-To:_x@example.org?= Lee",
}
LANGS = ["en", "be", "ru"]
# be and ru carry markers with a nonce, as rendered now; en the fixed markers of a variant stored
# by an older version (link_nonce ""): both kinds must send alike.
NONCES = {"en": "", "be": "0123456789abcdef0123456789abcdef", "ru": "fedcba9876543210" * 2}
SUBJECTS = {
    "en": 'Weekly: "Viasna", prisoners & the = sign =?utf-8?q?=0D=0ABcc:_victim@example.org?=',
    "be": "Штотыднёвы дайджэст: палітвязні, «Вясна» і Алесь Бяляцкі",
    "ru": "Еженедельный дайджест: " + "очень длинная тема письма " * 6,
}
TEXT = (
    "Новости недели — {lang}\n\n"
    "A line exactly at the edge of the quoted-printable width, and an = sign = here ok.\n"
    ".a line that starts with a dot\n"
    "From the desk of the editor (a line starting with From)\n"
    "trailing spaces   \n"
    f"Read more: {LONG_URL}\n\n"
    "{preferences}\n"
    f"Unsubscribe (in the middle of a long line {'x' * 70}): {{unsubscribe}} end.\n"
)
HTML = (
    "<html><body><p>Новости — {lang}: " + "доўгі радок " * 40 + "</p>\n"
    f'<p><a href="{LONG_URL.replace("&", "&amp;")}">read</a></p>\n'
    '<a href="{unsubscribe}">unsubscribe</a><a href="{preferences}">prefs</a>'
    "</body></html>\n"
)


def body(template: str, lang: str) -> str:
    """TEXT or HTML in one language, with that language's markers."""
    markers = link_markers(NONCES[lang])
    return template.replace("{lang}", lang).format_map(markers)


def seed_campaign(factory: sessionmaker[Session], clock: FrozenClock) -> int:
    """One person per hostile name, spread over three languages, and a running campaign."""
    now = clock.now()
    with unit_of_work(factory) as session:
        ml = MailingList(slug="weekly", name="Weekly", kind="digest", list_id="weekly.example.org")
        session.add(ml)
        session.flush()
        for i, name in enumerate(NAMES.values()):
            person = Subscriber(
                email=f"person{i}@example.net", name=name, language=LANGS[i % 3], created_at=now
            )
            session.add(person)
            session.flush()
            session.add(
                Subscription(
                    subscriber_id=person.id, list_id=ml.id, status="active", created_at=now
                )
            )
        campaign = Campaign(
            kind="digest", list_id=ml.id, dedupe_key="msg", created_at=now, status="running"
        )
        session.add(campaign)
        session.flush()
        for lang in LANGS:
            session.add(
                Variant(
                    campaign_id=campaign.id,
                    lang=lang,
                    subject=SUBJECTS[lang],
                    html=body(HTML, lang),
                    text=body(TEXT, lang),
                    link_nonce=NONCES[lang],
                )
            )
        enqueue_audience(session, campaign=campaign, now=now)
        return campaign.id


@pytest.fixture(
    params=[
        pytest.param("https://news.portal.example.org", id="short-base-url"),
        pytest.param("https://news.portal.example.org/" + "mirror-path/" * 16, id="long-base-url"),
    ]
)
def sent(
    request: pytest.FixtureRequest,
    factory: sessionmaker[Session],
    clock: FrozenClock,
    database_url: str,
) -> tuple[Settings, int, list[bytes]]:
    """The campaign really sent through aiosmtpd; (settings, campaign id, raw messages)."""
    cid = seed_campaign(factory, clock)
    handler = FaultyHandler()
    with faulty_smtpd(handler) as port:
        settings = settings_for(database_url, port)
        settings = replace(settings, web=replace(settings.web, base_url=request.param))
        report = deliver(factory, settings, clock)
    assert report.sent == len(NAMES) == len(handler.received)
    return settings, cid, [raw for _sender, _rcpts, raw in handler.received]


def reference(
    factory: sessionmaker[Session], settings: Settings, cid: int, email: str
) -> tuple[Recipient, EmailMessage, ListInfo, RenderedVariant]:
    """What build_message (the slow path) makes for this recipient, parsed back."""
    with unit_of_work(factory) as session:
        person = session.scalars(select(Subscriber).where(Subscriber.email == email)).one()
        ml = session.scalars(select(MailingList)).one()
        v = session.scalars(
            select(Variant).where(Variant.campaign_id == cid, Variant.lang == person.language)
        ).one()
        recipient = Recipient(person.id, person.email, person.name)
        mlist = ListInfo(ml.id, ml.slug, ml.list_id)
        variant = RenderedVariant(v.lang, v.subject, v.html, v.text, v.link_nonce)
    built = build_message(
        variant=variant,
        campaign_id=cid,
        recipient=recipient,
        mlist=mlist,
        settings=settings,
        now=datetime(2026, 1, 1, tzinfo=UTC),
    )
    parsed = message_from_bytes(built.as_bytes(), policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    return recipient, parsed, mlist, variant


def parts(msg: EmailMessage) -> dict[str, str]:
    """The decoded text of each leaf part, by content type."""
    return {p.get_content_type(): p.get_content() for p in msg.walk() if not p.is_multipart()}


def test_every_line_is_within_the_smtp_and_mime_limits(
    sent: tuple[Settings, int, list[bytes]],
) -> None:
    """No line over 998 bytes, body lines within 78, CRLF only, no parse defects."""
    _settings, _cid, raws = sent
    for raw in raws:
        _head, _, body = raw.partition(b"\r\n\r\n")
        assert raw.count(b"\n") == raw.count(b"\r\n"), "bare LF"
        assert max(len(line) for line in raw.split(b"\r\n")) <= 998
        assert max(len(line) for line in body.split(b"\r\n")) <= 78
        assert raw.isascii(), "8-bit bytes without 8BITMIME"
        msg = message_from_bytes(raw, policy=policy.default)
        assert [(p.get_content_type(), p.defects) for p in msg.walk()] == [
            ("multipart/alternative", []),
            ("text/plain", []),
            ("text/html", []),
        ]


def test_headers_decode_to_the_names_subjects_and_links_promised(
    sent: tuple[Settings, int, list[bytes]], factory: sessionmaker[Session]
) -> None:
    """To, Subject, Message-ID, List-* decode to exactly what the reference path carries."""
    settings, cid, raws = sent
    by_email, raws_by_email = {}, {}
    for raw in raws:
        msg = message_from_bytes(raw, policy=policy.default)
        assert isinstance(msg, EmailMessage)
        by_email[msg["To"].addresses[0].addr_spec] = msg
        raws_by_email[msg["To"].addresses[0].addr_spec] = raw
    for i, (case, name) in enumerate(NAMES.items()):
        email = f"person{i}@example.net"
        msg = by_email[email]
        recipient, ref, mlist, variant = reference(factory, settings, cid, email)
        expected_name = " ".join("".join(c for c in name if c.isprintable()).split())
        (to,) = msg["To"].addresses
        assert (case, to.addr_spec, msg["To"].defects) == (case, email, ())
        assert not {"\r", "\n"} & set(to.display_name), case
        assert (case, *rfc2047_to(raws_by_email[email])) == (case, expected_name, email)
        assert "Bcc" not in msg and "Reply-To" not in msg and len(msg.get_all("To", [])) == 1
        assert msg["Subject"] == " ".join(variant.subject.split()) == ref["Subject"]
        for header in ("From", "Message-ID", "List-Id", "List-Unsubscribe-Post", "MIME-Version"):
            assert msg[header] == ref[header], header
        urls = link_urls(recipient=recipient, mlist=mlist, settings=settings)
        unsubscribe = f"<{urls['unsubscribe']}>, <{urls['mailto']}>"
        assert msg["List-Unsubscribe"] == ref["List-Unsubscribe"] == unsubscribe
        raw_header = next(
            line for line in raw_headers(msg) if line.startswith(b"List-Unsubscribe:")
        )
        assert b"=?" not in raw_header and urls["unsubscribe"].encode() in raw_header


def rfc2047_to(raw: bytes) -> tuple[str, str]:
    """The To header's (display name, address), decoded by the rules of RFC 2047.

    Not by policy.default's address parser: it keeps the folding space between two adjacent
    encoded-words of a long non-ASCII name ("Ж ыве"), which RFC 2047 6.2 says to drop and mail
    clients do drop. The email package's RFC 2047 decoder (email.header) follows the rule.
    """
    name, address = parseaddr(str(message_from_bytes(raw, policy=policy.compat32)["To"]))
    return str(make_header(decode_header(name))), address


def raw_headers(msg: EmailMessage) -> list[bytes]:
    """The message's header lines as sent, unfolded."""
    head = msg.as_bytes(policy=policy.SMTP.clone(refold_source="none")).split(b"\r\n\r\n")[0]
    return head.replace(b"\r\n ", b" ").replace(b"\r\n\t", b"\t").split(b"\r\n")


def test_bodies_decode_to_exactly_what_the_reference_path_makes(
    sent: tuple[Settings, int, list[bytes]], factory: sessionmaker[Session]
) -> None:
    """The text and HTML parts decode to build_message's, with the same personal links."""
    settings, cid, raws = sent
    for raw in raws:
        msg = message_from_bytes(raw, policy=policy.default)
        assert isinstance(msg, EmailMessage)
        email = msg["To"].addresses[0].addr_spec
        recipient, ref, mlist, _variant = reference(factory, settings, cid, email)
        got, want = parts(msg), parts(ref)
        assert got == want
        urls = link_urls(recipient=recipient, mlist=mlist, settings=settings)
        assert urls["unsubscribe"] in got["text/plain"] and urls["preferences"] in got["text/html"]
        assert LONG_URL in got["text/plain"]


def test_message_id_is_stable_across_builds_and_times(
    sent: tuple[Settings, int, list[bytes]], factory: sessionmaker[Session]
) -> None:
    """Two builds at different times carry the Message-ID that was sent, and differ only in Date."""
    settings, cid, raws = sent
    msg = message_from_bytes(raws[0], policy=policy.default)
    email = msg["To"].addresses[0].addr_spec
    recipient, _ref, mlist, variant = reference(factory, settings, cid, email)
    template = MessageTemplate.build(
        variant=variant, campaign_id=cid, mlist=mlist, settings=settings
    )
    first = template.render(recipient, settings=settings, now=datetime(2026, 1, 1, tzinfo=UTC))
    again = template.render(recipient, settings=settings, now=datetime(2027, 6, 1, tzinfo=UTC))
    ids = {
        message_from_bytes(m, policy=policy.default)["Message-ID"] for m in (first, again, raws[0])
    }
    expected = message_id(
        campaign_id=cid,
        subscriber_id=recipient.subscriber_id,
        secret=settings.security.require_secret(),
        domain="portal.example.org",
    )
    assert ids == {expected}
    assert [
        a for a, b in zip(first.split(b"\r\n"), again.split(b"\r\n"), strict=True) if a != b
    ] == [line for line in first.split(b"\r\n") if line.startswith(b"Date:")]


ENCODED_LOOKALIKES = [
    pytest.param(NAMES["encoded-word-q"], id="q"),
    pytest.param(NAMES["encoded-word-b"], id="b"),
    pytest.param(NAMES["encoded-word-inside"], id="inside"),
    pytest.param("Алесь =?utf-8?q?=0D=0ABcc:_x@example.org?=", id="non-ascii-too"),
]


@pytest.mark.parametrize("text", ENCODED_LOOKALIKES)
def test_encoded_word_lookalikes_decode_to_themselves_on_both_paths(text: str) -> None:
    """A name or subject like "=?utf-8?q?=0D=0A...?=" is encoded: it decodes to itself."""
    settings = settings_for("sqlite://", 25)
    variant = RenderedVariant("en", f"Urgent: {text}", body(HTML, "en"), body(TEXT, "en"))
    recipient = Recipient(7, "reader@example.org", text)
    mlist = ListInfo(1, "weekly", "weekly.example.org")
    now = datetime(2026, 1, 1, tzinfo=UTC)
    slow = build_message(
        variant=variant, campaign_id=1, recipient=recipient, mlist=mlist, settings=settings, now=now
    ).as_bytes()
    template = MessageTemplate.build(variant=variant, campaign_id=1, mlist=mlist, settings=settings)
    fast = template.render(recipient, settings=settings, now=now)
    for raw in (slow, fast):
        msg = message_from_bytes(raw, policy=policy.default)
        (to,) = msg["To"].addresses
        assert to.addr_spec == "reader@example.org" and not {"\r", "\n"} & set(to.display_name)
        assert rfc2047_to(raw) == (text, "reader@example.org")  # decodes to itself, as clients do
        assert str(msg["Subject"]) == f"Urgent: {text}"
        assert sorted(msg.keys()) == sorted(HEADERS), msg.keys()


HEADERS = (
    "To",
    "Date",
    "Message-ID",
    "List-Unsubscribe",
    "From",
    "Subject",
    "List-Id",
    "List-Unsubscribe-Post",
    "Content-Type",
    "MIME-Version",
)


def test_an_address_that_looks_encoded_is_refused() -> None:
    """An address cannot be RFC 2047 encoded: one with "=?" in it is never sent."""
    recipient = Recipient(7, "=?utf-8?q?=0D=0A?=@example.org", "")
    with pytest.raises(PermanentDeliveryError, match="encoded-word"):
        format_to(recipient)


@pytest.mark.parametrize(
    "base_url",
    [
        pytest.param("https://news.portal.example.org", id="short"),
        # a link folded by quoted-printable so that a continuation line starts with "."
        pytest.param("https://a" + "b" * 66 + "c.example.org/" + "x." * 40, id="dot-at-fold"),
    ],
)
def test_the_wire_form_is_the_message_dot_stuffed(base_url: str) -> None:
    """render(wire=True), which the sender hands to SMTP as it is, equals the message stuffed
    whole; the fixtures' lines start with dots in the bodies and at a link's fold."""
    settings = settings_for("sqlite://", 25)
    settings = replace(settings, web=replace(settings.web, base_url=base_url))
    dotted = ".starts with a dot\n..two dots\n.\nplain\n."
    variant = RenderedVariant(
        "en",
        ".Subject with a dot",
        dotted + "\n" + body(HTML, "en") + "\n" + dotted,
        dotted + "\n" + body(TEXT, "en") + "\n" + dotted,
    )
    template = MessageTemplate.build(
        variant=variant, campaign_id=1, mlist=ListInfo(1, "w", "w.example.org"), settings=settings
    )
    now = datetime(2026, 1, 1, tzinfo=UTC)
    for name in NAMES.values():
        recipient = Recipient(7, "reader@example.org", name)
        plain = template.render(recipient, settings=settings, now=now)
        wire = template.render(recipient, settings=settings, now=now, wire=True)
        assert b"\n." in plain  # the case is exercised
        assert wire == stuff(plain)
        assert wire.replace(b"\n..", b"\n.") == plain  # nothing else changed
