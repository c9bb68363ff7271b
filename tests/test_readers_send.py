"""Readers at risk, through the real sender: encrypted mail, withheld mail, discreet envelopes.

Keys are made by the real gpg (tests/gpg_keys.py) and the mail is read back by it; the sender
talks to a real aiosmtpd; SQLite and PostgreSQL. The clock is the real date (gpg makes keys now).
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import replace
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from newsletter.assemble import assemble_alert
from newsletter.clock import FrozenClock
from newsletter.config import Settings
from newsletter.db import unit_of_work
from newsletter.db.models import (
    Delivery,
    DeliveryStatus,
    Item,
    KeyNotice,
    MailingList,
    ReaderKey,
    Subscriber,
    Subscription,
)
from newsletter.enqueue import launch_campaign
from newsletter.i18n import gettext_for
from newsletter.notices import send_confirmations
from newsletter.readers import confirm_key, remove_key, set_key, set_reading
from newsletter.smtp import SmtpPool
from newsletter.subscriptions import unsubscribe
from newsletter.tokens import read_copy_token, read_key_token
from tests.conftest import SECRET, SmtpServer, make_settings
from tests.gpg_keys import GpgHome
from tests.test_flow import prepare, send_digest

PLAIN = "anna.example@example.org"
KEYED = "bob.placeholder@example.org"
ENVELOPE = "dzmitry.uzor@example.org"
DISCREET_BASE = "https://notes-mirror.example.net"
# Links are the only personal part of a message body: each reader's own tokens.
PERSONAL = re.compile(r"/(?:u|preferences|confirm|key)/[A-Za-z0-9._\-]+")


@pytest.fixture
def now_clock() -> FrozenClock:
    """The real date, to the second: gpg makes its keys at the real time."""
    return FrozenClock(datetime.now(UTC).replace(microsecond=0))


def settings_with(database_url: str, smtpd: SmtpServer, **openpgp: str) -> Settings:
    """Test settings: a neutral identity on a host of its own, and the portal's signing key."""
    base = make_settings(database_url, smtpd)
    discreet = replace(base.discreet, base_url=DISCREET_BASE)
    return replace(base, discreet=discreet, openpgp=replace(base.openpgp, **openpgp))


def reader_key(tmp_path: Path, email: str, *, expire: str = "1y") -> tuple[GpgHome, str]:
    """A reader's GnuPG home with a key (ed25519 + cv25519) for this address; its armored key."""
    home = GpgHome.make(tmp_path / email.split("@")[0])
    fpr = home.generate(f"Reader <{email}>", expire=expire)
    home.add_key(fpr, expire=expire)
    return home, home.export(fpr)


def portal_key(tmp_path: Path) -> tuple[GpgHome, str, Path]:
    """The portal's signing key made by gpg: its home, fingerprint and secret key file."""
    portal = GpgHome.make(tmp_path / "portal")
    fpr = portal.generate("Portal <news@portal.example.org>", usage="sign")
    key_file = tmp_path / "portal.asc"
    key_file.write_text(portal.export_secret(fpr))
    return portal, fpr, key_file


def subscriber_id(factory: sessionmaker[Session], email: str) -> int:
    with factory() as session:
        sid = session.scalar(select(Subscriber.id).where(Subscriber.email == email))
        assert sid is not None
        return sid


def service_mail(factory: sessionmaker[Session], settings: Settings, clock: FrozenClock) -> None:
    """Send every owed confirmation and key message, as the service loop does."""

    async def run() -> None:
        pool = SmtpPool(settings.smtp)
        try:
            await send_confirmations(
                factory=factory, settings=settings, transport=pool, clock=clock
            )
        finally:
            await pool.close()

    asyncio.run(run())


def to(messages: list[EmailMessage], email: str) -> list[EmailMessage]:
    return [m for m in messages if email in str(m["To"])]


def encrypted_payload(msg: EmailMessage) -> bytes:
    """The armored OpenPGP message of a PGP/MIME message (RFC 3156's second part)."""
    assert msg.get_content_type() == "multipart/encrypted"
    assert msg.get_param("protocol") == "application/pgp-encrypted"
    control, data = list(msg.iter_parts())
    assert control.get_content_type() == "application/pgp-encrypted"
    assert b"Version: 1" in control.get_payload(decode=True)
    assert data.get_content_type() == "application/octet-stream"
    payload = data.get_payload(decode=True)
    assert isinstance(payload, bytes) and payload.startswith(b"-----BEGIN PGP MESSAGE-----")
    return payload


def inner(home: GpgHome, msg: EmailMessage) -> EmailMessage:
    """Decrypt a PGP/MIME message with the reader's gpg: the protected message inside."""
    decrypted = home.decrypt(encrypted_payload(msg))
    return message_from_bytes(decrypted.plaintext, policy=policy.default)  # type: ignore[return-value]


def bodies(msg: EmailMessage) -> tuple[str, str]:
    """The text and HTML parts, with each reader's personal links made alike."""
    text, html = msg.get_body(("plain",)), msg.get_body(("html",))
    assert text is not None and html is not None
    return (
        PERSONAL.sub("/LINK", str(text.get_content())),
        PERSONAL.sub("/LINK", str(html.get_content())),
    )


def activate_by_mail(
    factory: sessionmaker[Session],
    settings: Settings,
    clock: FrozenClock,
    smtpd: SmtpServer,
    home: GpgHome,
    email: str,
) -> None:
    """The reader decrypts the key confirmation with gpg and follows the link inside."""
    service_mail(factory, settings, clock)
    [proof] = to(smtpd.messages(), email)[-1:]
    opened = inner(home, proof)
    text = opened.get_body(("plain",))
    assert text is not None
    [link] = re.findall(r"https?://\S+/key/\S+", str(text.get_content()))
    assert link.startswith(settings.discreet.links_base(settings.web.base_url)) or link.startswith(
        settings.web.base_url
    )
    claims = read_key_token(
        link.rpartition("/")[2], secret=SECRET, max_age_seconds=3600, now=clock.now()
    )
    with unit_of_work(factory) as session:
        confirm_key(
            session,
            subscriber_id=claims.subscriber_id,
            fingerprint=claims.fingerprint,
            now=clock.now(),
        )


def test_encrypted_digest_round_trip(
    factory: sessionmaker[Session],
    smtpd: SmtpServer,
    now_clock: FrozenClock,
    database_url: str,
    tmp_path: Path,
) -> None:
    """A key given, proven by decrypting its confirmation, then the digest: PGP/MIME whose inside
    equals what a plain reader gets (bar the personal links), real Subject inside only, signed by
    the portal's key, one-click unsubscribe still outside."""
    portal, portal_fpr, key_file = portal_key(tmp_path)
    settings = settings_with(database_url, smtpd, signing_key_file=str(key_file))
    clock = now_clock
    prepare(factory, clock)
    home, armored = reader_key(tmp_path, KEYED)
    home.import_key(portal.export(portal_fpr))
    with unit_of_work(factory) as session:
        set_key(
            session,
            subscriber_id=subscriber_id(factory, KEYED),
            data=armored,
            now=clock.now(),
            actor="test",
        )
    activate_by_mail(factory, settings, clock, smtpd, home, KEYED)
    with factory() as session:
        [key] = session.scalars(select(ReaderKey)).all()
        assert key.status == "active" and key.confirm_sent_at is not None

    before = len(smtpd.messages())
    assert send_digest(factory, settings, clock) is not None
    sent = smtpd.messages()[before:]
    [plain] = to(sent, PLAIN)
    [secret] = to(sent, KEYED)
    assert plain.get_content_type() == "multipart/alternative"
    assert str(secret["Subject"]) == "[...]"
    assert secret["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert "/u/" in str(secret["List-Unsubscribe"])
    assert secret["Autocrypt"] and "keydata=" in str(secret["Autocrypt"])
    decrypted = home.decrypt(encrypted_payload(secret))
    assert [words[0] for words in decrypted.lines("VALIDSIG")][:1] or decrypted.lines("GOODSIG")
    assert any(portal_fpr in " ".join(words) for words in decrypted.lines("VALIDSIG"))
    opened = message_from_bytes(decrypted.plaintext, policy=policy.default)
    assert isinstance(opened, EmailMessage)
    assert opened.get_content_type() == "multipart/alternative"
    assert opened.get_param("hp") == "cipher"
    assert str(opened["Subject"]) == str(plain["Subject"]) != "[...]"
    assert bodies(opened) == bodies(plain)
    # Nothing readable outside: no item title, no real subject.
    assert str(plain["Subject"]) not in secret.as_string()


def test_a_key_is_not_used_before_it_is_proven(
    factory: sessionmaker[Session],
    smtpd: SmtpServer,
    now_clock: FrozenClock,
    database_url: str,
    tmp_path: Path,
) -> None:
    """Someone sets a key for a reader: it stays pending, the reader's mail stays readable."""
    settings = settings_with(database_url, smtpd)
    prepare(factory, now_clock)
    _home, armored = reader_key(tmp_path, KEYED)
    with unit_of_work(factory) as session:
        set_key(
            session,
            subscriber_id=subscriber_id(factory, KEYED),
            data=armored,
            now=now_clock.now(),
            actor="test",
        )
    send_digest(factory, settings, now_clock)
    digests = [
        m for m in to(smtpd.messages(), KEYED) if m.get_content_type() != "multipart/encrypted"
    ]
    assert len(digests) == 1 and digests[0].get_content_type() == "multipart/alternative"


@pytest.mark.parametrize("choice", ["withhold", "plain"])
def test_unusable_key_withholds_or_sends_plain_with_one_notice(
    factory: sessionmaker[Session],
    smtpd: SmtpServer,
    now_clock: FrozenClock,
    database_url: str,
    tmp_path: Path,
    choice: str,
) -> None:
    """A key that expired since it was proven: under withhold nothing readable goes, the
    delivery is recorded withheld with the reason; under plain the ordinary mail goes. Either
    way the reader gets one neutral notice for the problem, not one per campaign."""
    settings = settings_with(database_url, smtpd)
    clock = now_clock
    prepare(factory, clock)
    _home, armored = reader_key(tmp_path, KEYED, expire="2d")
    sid = subscriber_id(factory, KEYED)
    with unit_of_work(factory) as session:
        set_key(
            session, subscriber_id=sid, data=armored, now=clock.now(), actor="test", confirmed=True
        )
        set_reading(
            session, subscriber_id=sid, on_key_problem=choice, now=clock.now(), actor="test"
        )
    clock.advance(days=3)
    first = send_digest(factory, settings, clock)
    alert_items(factory, settings, clock)
    service_mail(factory, settings, clock)
    service_mail(factory, settings, clock)  # owed once: a second run sends nothing more
    mail = to(smtpd.messages(), KEYED)
    notices = [m for m in mail if str(m["Auto-Submitted"]) == "auto-generated"]
    assert len(notices) == 1
    notice_text = notices[0].get_body(("plain",))
    assert notice_text is not None and "expired" in str(notice_text.get_content())
    campaigns = [m for m in mail if m not in notices]
    with factory() as session:
        rows = session.scalars(select(Delivery).where(Delivery.subscriber_id == sid)).all()
        assert session.scalars(select(KeyNotice.problem)).all() == ["expired"]
    if choice == "withhold":
        assert campaigns == []
        assert {r.status for r in rows} == {DeliveryStatus.WITHHELD}
        assert all(r.last_reply == "withheld: key expired" for r in rows)
        assert len(rows) == 2
    else:
        assert len(campaigns) == 2
        assert all(m.get_content_type() == "multipart/alternative" for m in campaigns)
        assert {r.status for r in rows} == {DeliveryStatus.SENT}
    assert first is not None


def alert_items(factory: sessionmaker[Session], settings: Settings, clock: FrozenClock) -> None:
    """An urgent alert to the urgent-actions list, launched and sent (the keyed reader is on the
    digest list only, so a second digest-list campaign is an alert to weekly-digest)."""
    with unit_of_work(factory) as session:
        campaign, _ = assemble_alert(
            session=session,
            list_slug="weekly-digest",
            now=clock.now(),
            actor="test",
            title="Write to the prison today",
            body_html="<p>Letters help.</p>",
            url="https://portal.example.org/action",
        )
        launch_campaign(
            session=session, campaign=campaign, settings=settings, now=clock.now(), actor="test"
        )
    from tests.builders import deliver

    deliver(factory, settings, clock)


def test_revoked_and_removed_keys_are_problems_too(
    factory: sessionmaker[Session],
    smtpd: SmtpServer,
    now_clock: FrozenClock,
    database_url: str,
    tmp_path: Path,
) -> None:
    """A key whose revocation we hold, and a key an admin removed: withheld, one notice each."""
    settings = settings_with(database_url, smtpd)
    prepare(factory, now_clock)
    home, armored = reader_key(tmp_path, KEYED)
    sid = subscriber_id(factory, KEYED)
    other_home, other = reader_key(tmp_path, PLAIN)
    other_sid = subscriber_id(factory, PLAIN)
    with unit_of_work(factory) as session:
        set_key(
            session,
            subscriber_id=sid,
            data=armored,
            now=now_clock.now(),
            actor="test",
            confirmed=True,
        )
        set_key(
            session,
            subscriber_id=other_sid,
            data=other,
            now=now_clock.now(),
            actor="test",
            confirmed=True,
        )
        remove_key(
            session, subscriber_id=other_sid, now=now_clock.now(), actor="test", by_reader=False
        )
    fpr = home.import_key(armored)[0]
    home.revoke(fpr)
    with unit_of_work(factory) as session:  # the reader gives us the key with its revocation
        info = set_key(
            session, subscriber_id=sid, data=home.export(fpr), now=now_clock.now(), actor="t"
        )
        assert info.revoked and info.fingerprint == fpr
    with factory() as session:
        [row] = session.scalars(select(ReaderKey).where(ReaderKey.subscriber_id == sid))
        assert (row.status, row.fingerprint) == ("revoked", fpr)
    send_digest(factory, settings, now_clock)
    service_mail(factory, settings, now_clock)
    with factory() as session:
        statuses = dict(session.execute(select(Delivery.subscriber_id, Delivery.status)).all())
        problems = dict(session.execute(select(KeyNotice.subscriber_id, KeyNotice.problem)).all())
    assert statuses[sid] == statuses[other_sid] == DeliveryStatus.WITHHELD
    assert problems == {sid: "revoked", other_sid: "removed"}
    for email in (KEYED, PLAIN):
        [notice] = to(smtpd.messages(), email)
        assert notice["Auto-Submitted"] == "auto-generated"
        assert notice.get_content_type() == "multipart/alternative"  # plain: the key is the problem
    assert other_home is not None


# --- the discreet envelope -------------------------------------------------------------------


def forbidden_words(settings: Settings, factory: sessionmaker[Session]) -> list[str]:
    """What must not appear in a discreet reader's headers: brand, lists, portal hosts."""
    words = [settings.brand.name, "Bialiatski", "Viasna", "digest", "alert", "urgent"]
    words += [urlsplit(settings.web.base_url).netloc, settings.mail.from_address.rpartition("@")[2]]
    with factory() as session:
        for ml in session.scalars(select(MailingList)):
            words += [ml.slug, ml.name, ml.list_id, *ml.names.values()]
    return [w for w in words if w]


def header_text(msg: EmailMessage) -> str:
    """Every header, decoded, except the test server's delivery record of the recipient."""
    return "\n".join(
        f"{name}: {value}" for name, value in msg.items() if name.lower() != "x-delivered-to"
    )


def assert_discreet(msg: EmailMessage, settings: Settings, words: list[str], subject: str) -> None:
    heads = header_text(msg).lower()
    neutral = settings.discreet.subject("be")
    for word in [*words, *([subject] if subject not in ("", neutral) else [])]:
        assert word.lower() not in heads, (word, heads)
    assert str(msg["From"]).endswith(f"<{settings.discreet.from_address}>")
    assert "notes.example.net" in str(msg["Return-Path"])
    assert str(msg["Message-ID"]).endswith("@notes.example.net>")


def test_every_message_to_an_envelope_reader_names_nothing(
    factory: sessionmaker[Session],
    smtpd: SmtpServer,
    now_clock: FrozenClock,
    database_url: str,
    tmp_path: Path,
) -> None:
    """Digest, alert, confirmation, key confirmation, key problem notice and expiry reminder to
    a discreet reader: no header names the brand, a list, the portal host or the campaign."""
    settings = settings_with(database_url, smtpd)
    clock = now_clock
    prepare(factory, clock)
    sid = subscriber_id(factory, ENVELOPE)
    home, armored = reader_key(tmp_path, ENVELOPE, expire="10d")
    with unit_of_work(factory) as session:
        set_reading(session, subscriber_id=sid, discreet="envelope", now=clock.now(), actor="test")
        set_key(session, subscriber_id=sid, data=armored, now=clock.now(), actor="test")
    activate_by_mail(factory, settings, clock, smtpd, home, ENVELOPE)  # the key confirmation
    service_mail(factory, settings, clock)  # the key expires within 14 days: a reminder
    send_digest(factory, settings, clock)
    alert_items(factory, settings, clock)
    with unit_of_work(factory) as session:
        remove_key(session, subscriber_id=sid, now=clock.now(), actor="test", by_reader=False)
        set_reading(
            session, subscriber_id=sid, on_key_problem="plain", now=clock.now(), actor="test"
        )
        urgent = session.scalars(
            select(MailingList).where(MailingList.slug == "urgent-actions")
        ).one()
        session.execute(
            delete(Subscription).where(
                Subscription.subscriber_id == sid, Subscription.list_id == urgent.id
            )
        )
        session.add(  # waiting for their click: a confirmation email is owed
            Subscription(
                subscriber_id=sid, list_id=urgent.id, status="pending", created_at=clock.now()
            )
        )
    send_digest_again(factory, settings, clock)
    service_mail(factory, settings, clock)
    mail = to(smtpd.messages(), ENVELOPE)
    kinds = {kind_of(m, home) for m in mail}
    assert {"key_confirm", "key_expiry", "digest", "alert", "key_problem", "confirm"} <= kinds, (
        kinds
    )
    words = forbidden_words(settings, factory)
    for msg in mail:
        subject = real_subject(msg, home)
        assert_discreet(msg, settings, words, subject)
        assert str(msg["Subject"]) == settings.discreet.subject("be")
        unsub = str(msg["List-Unsubscribe"] or "")
        if unsub:
            assert unsub.startswith(f"<{DISCREET_BASE}/u/")


def send_digest_again(
    factory: sessionmaker[Session], settings: Settings, clock: FrozenClock
) -> None:
    clock.advance(days=1)
    alert_items_named(factory, settings, clock, "A second alert")


def alert_items_named(
    factory: sessionmaker[Session], settings: Settings, clock: FrozenClock, title: str
) -> None:
    with unit_of_work(factory) as session:
        campaign, _ = assemble_alert(
            session=session,
            list_slug="weekly-digest",
            now=clock.now(),
            actor="test",
            title=title,
            body_html="<p>Text.</p>",
        )
        launch_campaign(
            session=session, campaign=campaign, settings=settings, now=clock.now(), actor="test"
        )
    from tests.builders import deliver

    deliver(factory, settings, clock)


def real_subject(msg: EmailMessage, home: GpgHome) -> str:
    if msg.get_content_type() == "multipart/encrypted":
        return str(inner(home, msg)["Subject"])
    return str(msg["Subject"])


def kind_of(msg: EmailMessage, home: GpgHome) -> str:
    opened = inner(home, msg) if msg.get_content_type() == "multipart/encrypted" else msg
    text = opened.get_body(("plain",))
    body = str(text.get_content()) if text is not None else ""
    if "/confirm/" in body:
        return "confirm"
    if "/key/" in body:
        return "key_confirm"
    _ = gettext_for("be")  # the reader reads Belarusian
    if _("Your encryption key expires soon") in body:
        return "key_expiry"
    if _("Your encryption key cannot be used") in body:
        return "key_problem"
    if "Write to the prison" in body or "A second alert" in body:
        return "alert"
    return "digest"


def test_pointer_reader_gets_a_neutral_note_and_a_link(
    factory: sessionmaker[Session],
    smtpd: SmtpServer,
    now_clock: FrozenClock,
    database_url: str,
) -> None:
    """A pointer reader's digest: the neutral envelope, and a body with no item title, only a
    link to the campaign's web copy on the neutral host (the same link for every such reader)."""
    settings = settings_with(database_url, smtpd)
    prepare(factory, now_clock)
    with unit_of_work(factory) as session:
        for email in (ENVELOPE, KEYED):
            sid = subscriber_id(factory, email)
            set_reading(
                session, subscriber_id=sid, discreet="pointer", now=now_clock.now(), actor="test"
            )
        titles = [t for t in session.scalars(select(Item.title)) if t]
    cid = send_digest(factory, settings, now_clock)
    assert cid is not None and titles
    words = forbidden_words(settings, factory)
    links = set()
    for email, lang in ((ENVELOPE, "be"), (KEYED, "en")):
        [msg] = to(smtpd.messages(), email)
        assert str(msg["Subject"]) == settings.discreet.subject(lang)
        assert_discreet(msg, settings, words, "")
        text, html = bodies(msg)
        for title in titles:
            assert title not in text and title not in html
        for word in words:
            assert word.lower() not in text.lower(), word
        [link] = re.findall(rf"{re.escape(DISCREET_BASE)}/w/\S+", text)
        links.add(link.rpartition("/")[2])
        campaign, copy_lang = read_copy_token(links.pop(), secret=SECRET)
        assert (campaign, copy_lang) == (cid, lang)
        assert "preheader" not in html or ">" + titles[0] not in html
    [plain] = to(smtpd.messages(), PLAIN)
    assert any(t in plain.get_body(("plain",)).get_content() for t in titles)  # type: ignore[union-attr]


def test_encrypted_mail_to_a_discreet_reader_carries_no_portal_key(
    factory: sessionmaker[Session],
    smtpd: SmtpServer,
    now_clock: FrozenClock,
    database_url: str,
    tmp_path: Path,
) -> None:
    """Signed and encrypted to an envelope reader: the neutral subject outside instead of [...],
    no Autocrypt header (the portal key's user ID would name the portal), the real one inside."""
    portal, portal_fpr, key_file = portal_key(tmp_path)
    settings = settings_with(database_url, smtpd, signing_key_file=str(key_file))
    prepare(factory, now_clock)
    home, armored = reader_key(tmp_path, ENVELOPE)
    home.import_key(portal.export(portal_fpr))  # gpg fails on a signature it cannot check
    sid = subscriber_id(factory, ENVELOPE)
    with unit_of_work(factory) as session:
        set_reading(session, subscriber_id=sid, discreet="envelope", now=now_clock.now(), actor="t")
        set_key(
            session, subscriber_id=sid, data=armored, now=now_clock.now(), actor="t", confirmed=True
        )
    send_digest(factory, settings, now_clock)
    [msg] = to(smtpd.messages(), ENVELOPE)
    assert msg.get_content_type() == "multipart/encrypted"
    assert msg["Autocrypt"] is None
    assert str(msg["Subject"]) == settings.discreet.subject("be")
    assert_discreet(msg, settings, forbidden_words(settings, factory), "")
    opened = inner(home, msg)
    assert "notes.example.net" in str(opened["From"])
    assert str(opened["Subject"]) != settings.discreet.subject("be")


def test_no_key_mail_after_leaving_every_list(
    factory: sessionmaker[Session],
    smtpd: SmtpServer,
    now_clock: FrozenClock,
    database_url: str,
    tmp_path: Path,
) -> None:
    """A reader whose key expires soon, and whose key problem is owed, left every list (one
    click each): no reminder and no notice reaches them any more."""
    settings = settings_with(database_url, smtpd)
    prepare(factory, now_clock)
    _home, armored = reader_key(tmp_path, KEYED, expire="10d")
    sid = subscriber_id(factory, KEYED)
    with unit_of_work(factory) as session:
        set_key(
            session, subscriber_id=sid, data=armored, now=now_clock.now(), actor="t", confirmed=True
        )
        session.add(
            KeyNotice(
                subscriber_id=sid, fingerprint="X", problem="expired", created_at=now_clock.now()
            )
        )
        for list_id in session.scalars(
            select(Subscription.list_id).where(Subscription.subscriber_id == sid)
        ):
            unsubscribe(
                session=session, subscriber_id=sid, list_id=list_id, now=now_clock.now(), actor="t"
            )
        assert session.get(Subscriber, sid).status == "active"  # type: ignore[union-attr]
    service_mail(factory, settings, now_clock)
    assert to(smtpd.messages(), KEYED) == []


def test_a_key_whose_recheck_came_is_judged_once_and_the_judgement_kept(
    factory: sessionmaker[Session],
    smtpd: SmtpServer,
    now_clock: FrozenClock,
    database_url: str,
    tmp_path: Path,
) -> None:
    """Once a key's recheck_at has come, the sender judges it again in full and stores the
    judgement: the message goes encrypted, and the next one takes the quick path (no recheck)."""
    settings = settings_with(database_url, smtpd)
    clock = now_clock
    prepare(factory, clock)
    home, armored = reader_key(tmp_path, KEYED)
    sid = subscriber_id(factory, KEYED)
    with unit_of_work(factory) as session:
        set_key(
            session, subscriber_id=sid, data=armored, now=clock.now(), actor="t", confirmed=True
        )
        key = session.scalars(select(ReaderKey).where(ReaderKey.subscriber_id == sid)).one()
        assert key.recheck_at is None
        key.recheck_at = clock.now()  # as if a signature of the key dated later counted now
        expires = key.expires_at
    before = len(smtpd.messages())
    assert send_digest(factory, settings, clock) is not None
    [secret] = to(smtpd.messages()[before:], KEYED)
    assert str(secret["Subject"]) == "[...]"
    assert home.decrypt(encrypted_payload(secret)).plaintext
    with factory() as session:
        key = session.scalars(select(ReaderKey).where(ReaderKey.subscriber_id == sid)).one()
        assert (key.status, key.recheck_at, key.expires_at) == ("active", None, expires)
