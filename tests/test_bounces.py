"""Bounces that come back: DSNs, lost VERP, garbage, auto-replies and forgeries, two ways in.

Mail is first really sent through aiosmtpd (so each delivery has its real VERP envelope sender and
Message-ID); the returns are then built from what the server received, and fed in either through
`newsletter bounces process MAILDIR` on a real Maildir or through the service's inbound SMTP.
Hostile returns (MIME nested ten thousand deep, a megabyte of parentheses in a header, bytes that
are not UTF-8, a cut-off message) sit between real ones: the real ones must still be applied.
"""

from __future__ import annotations

import logging
import mailbox
import smtplib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from newsletter.audience import enqueue_audience
from newsletter.bounces import UNCONFIRMED, handle_bounce, parse_verp, verp_address
from newsletter.clock import FrozenClock
from newsletter.db import unit_of_work
from newsletter.db.models import (
    Campaign,
    Delivery,
    Event,
    MailingList,
    Subscriber,
    Suppression,
    Variant,
)
from newsletter.devsmtp import free_port
from newsletter.inbound import inbound_for
from newsletter.subscriptions import confirm, subscribe, unsubscribe
from tests.builders import run
from tests.conftest import SECRET, make_settings
from tests.sender_cli import NewsletterCli
from tests.smtp_faults import FaultyHandler, faulty_smtpd
from tests.test_send import deliver, seed, settings_for

BOUNCE_ADDRESS = "bounces@portal.example.org"


@dataclass(frozen=True)
class Sent:
    """One delivery as the receiving server got it."""

    delivery_id: int
    envelope_from: str
    headers: bytes
    raw: bytes


def dsn(to: str, rcpt: str, action: str, status: str, original: bytes, kind: str) -> bytes:
    """An RFC 3464 multipart/report, as Postfix writes one, with the original attached."""
    attached = (
        f"Content-Type: {kind}\r\n\r\n".encode() + original
        if kind
        else b"Content-Type: text/plain\r\n\r\n(original not returned)\r\n"
    )
    return (
        (
            "From: Mail Delivery System <MAILER-DAEMON@mx.example.net>\r\n"
            f"To: {to}\r\n"
            "Subject: Undelivered Mail Returned to Sender\r\n"
            "Auto-Submitted: auto-replied\r\n"
            "MIME-Version: 1.0\r\n"
            'Content-Type: multipart/report; report-type=delivery-status; boundary="B0UND"\r\n'
            "\r\n--B0UND\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
            "This is the mail system at host mx.example.net. Your message was not delivered.\r\n"
            "\r\n--B0UND\r\nContent-Type: message/delivery-status\r\n\r\n"
            "Reporting-MTA: dns; mx.example.net\r\n\r\n"
            f"Final-Recipient: rfc822; {rcpt}\r\nOriginal-Recipient: rfc822;{rcpt}\r\n"
            f"Action: {action}\r\nStatus: {status}\r\nRemote-MTA: dns; mx.example.net\r\n"
            f"Diagnostic-Code: smtp; {status[0]}50 {status} <{rcpt}>: mailbox says no\r\n"
            "\r\n--B0UND\r\n"
        ).encode()
        + attached
        + b"\r\n--B0UND--\r\n"
    )


def out_of_office(to: str) -> bytes:
    """An auto-reply to the envelope sender: not a bounce."""
    return (
        f"From: Reader <person4@example.net>\r\nTo: {to}\r\n"
        "Subject: Out of office: Weekly\r\nAuto-Submitted: auto-replied\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n\r\nI am away until Monday.\r\n"
    ).encode()


LARGE = b"<p>a long digest, returned in full by the remote server</p>\r\n" * 3200
GARBAGE = b"\x89PNG\r\n\x1a\n\x00\x01\x02 not mail at all \xff\xfe\r\n\r\n\x80\x81\r\n"

# case id: (how to build the return from the sent delivery, envelope recipient, outcome,
#           delivery status afterwards, subscriber status afterwards)
CASES = {
    "hard-with-verp": ("hard", "verp", "hard", "failed", "bounced"),
    "soft-with-verp": ("soft", "verp", "soft", "sent", "active"),
    # Only the Message-ID names the delivery: counted, not suppressed (anyone could forge it).
    "hard-only-message-id": ("hard-headers", "plain", "unconfirmed", "sent", "active"),
    "hard-only-full-original": ("hard-original", "plain", "unconfirmed", "sent", "active"),
    "hard-large-original": ("hard-large", "verp", "hard", "failed", "bounced"),
    "garbage": ("garbage", "plain", "not a bounce", "sent", "active"),
    "out-of-office": ("ooo", "verp", "not a bounce", "sent", "active"),
    "forged-verp": ("forged", "forged", "unknown delivery", "sent", "active"),
}


def build_return(how: str, sent: Sent, rcpt: str, to: str) -> bytes:
    """The bytes of one returned message for one sent delivery."""
    if how == "garbage":
        return GARBAGE
    if how == "ooo":
        return out_of_office(to)
    if how == "soft":
        return dsn(to, rcpt, "delayed", "4.4.7", sent.headers, "text/rfc822-headers")
    if how == "hard-original":
        return dsn(to, rcpt, "failed", "5.1.1", sent.raw, "message/rfc822")
    if how == "hard-large":  # a whole 200 KB digest comes back with it
        return dsn(to, rcpt, "failed", "5.2.2", sent.raw + LARGE, "message/rfc822")
    if how == "forged":
        return dsn(to, rcpt, "failed", "5.1.1", b"", "")
    return dsn(to, rcpt, "failed", "5.1.1", sent.headers, "text/rfc822-headers")


def envelope_to(kind: str, sent: Sent) -> str:
    if kind == "verp":
        return sent.envelope_from
    if kind == "forged":
        return f"bounces+{sent.delivery_id}-0123456789@portal.example.org"
    return BOUNCE_ADDRESS


def send_everyone(
    factory: sessionmaker[Session],
    clock: FrozenClock,
    database_url: str,
    cases: Sequence[str] = tuple(CASES),
) -> dict[str, Sent]:
    """Seed person<i> for the i-th case and really send them the campaign; returns case -> Sent."""
    seed(factory, clock, len(cases))
    return send_queued(factory, clock, database_url, cases)


def send_queued(
    factory: sessionmaker[Session], clock: FrozenClock, database_url: str, cases: Sequence[str]
) -> dict[str, Sent]:
    """Send what is queued through aiosmtpd; the last delivery of person<i> is cases[i]'s."""
    handler = FaultyHandler()
    with faulty_smtpd(handler) as port:
        deliver(factory, settings_for(database_url, port), clock)
    by_rcpt = {rcpts[0]: (sender, raw) for sender, rcpts, raw in handler.received}
    out = {}
    for i, case in enumerate(cases):
        sender, raw = by_rcpt[f"person{i}@example.net"]
        out[case] = Sent(
            parse_verp(sender, settings=make_settings(database_url)) or 0,
            sender,
            raw.split(b"\r\n\r\n")[0],
            raw,
        )
    return out


def returns(sent: dict[str, Sent]) -> list[tuple[str, str, bytes]]:
    """(case, envelope recipient, bytes) for every case."""
    out = []
    for i, (case, (how, kind, *_)) in enumerate(CASES.items()):
        to = envelope_to(kind, sent[case])
        out.append((case, to, build_return(how, sent[case], f"person{i}@example.net", to)))
    return out


def assert_outcomes(factory: sessionmaker[Session], sent: dict[str, Sent]) -> None:
    with unit_of_work(factory) as session:
        for case, (_how, _kind, _outcome, delivery_status, person_status) in CASES.items():
            d = session.get(Delivery, sent[case].delivery_id)
            person = session.get(Subscriber, d.subscriber_id)
            assert (case, d.status, person.status) == (case, delivery_status, person_status)
            if case.startswith(("hard", "soft")):
                assert "bounce" in (d.last_reply or "") and person.email not in d.last_reply
        unconfirmed = session.scalars(select(Event).where(Event.action == UNCONFIRMED)).all()
        assert sorted(e.detail["delivery"] for e in unconfirmed) == sorted(
            sent[c].delivery_id for c, v in CASES.items() if v[2] == "unconfirmed"
        )
        hard = [c for c, v in CASES.items() if v[2] == "hard"]
        assert session.scalar(select(func.count()).select_from(Suppression)) == len(hard)
        bounced = session.scalars(select(Event).where(Event.action == "delivery.bounced")).all()
        assert sorted(e.detail["delivery"] for e in bounced) == sorted(
            sent[c].delivery_id for c in hard
        )


def test_verp_addresses_are_signed_per_delivery(database_url: str) -> None:
    """A VERP address names its delivery; a wrong signature, domain or local part names none."""
    settings = make_settings(database_url)
    good = verp_address(42, settings=settings)
    assert parse_verp(good, settings=settings) == 42
    assert parse_verp(f"<{good.upper()}>", settings=settings) == 42
    for bad in (
        good.replace("+42-", "+43-"),
        "bounces+42-0123456789@portal.example.org",
        good.replace("portal.example.org", "example.com"),
        good.replace("bounces+", "news+"),
    ):
        assert parse_verp(bad, settings=settings) is None, bad


def test_bounces_process_applies_a_maildir_of_returns(
    tmp_path: Path, factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """`newsletter bounces process MAILDIR`: hard fails and suppresses, the rest change nothing."""
    sent = send_everyone(factory, clock, database_url)
    box = mailbox.Maildir(tmp_path / "bounces", create=True)
    for _case, to, raw in returns(sent):
        box.add(f"Delivered-To: {to}\r\n".encode() + raw if raw != GARBAGE else raw)
    cli = NewsletterCli(tmp_path, f"[database]\nurl = '{database_url}'\n")
    summary = cli.run("bounces", "process", str(tmp_path / "bounces"))
    assert summary.strip() == "hard 2, not a bounce 2, soft 1, unconfirmed 2, unknown delivery 1"
    assert_outcomes(factory, sent)
    assert cli.run("bounces", "process", str(tmp_path / "bounces")).strip() == "no new messages"
    assert all("S" in box.get_message(key).get_flags() for key in box.iterkeys())


def test_inbound_smtp_applies_returns_to_the_bounce_addresses(
    factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """The service's inbound SMTP takes mail to bounces(+VERP)@ and applies it, end to end."""
    sent = send_everyone(factory, clock, database_url)
    base = make_settings(database_url)
    settings = replace(base, inbound=replace(base.inbound, enabled=True, port=free_port()))
    controller = inbound_for(settings, factory, clock)
    try:
        with smtplib.SMTP("127.0.0.1", settings.inbound.port, timeout=10) as client:
            for _case, to, raw in returns(sent):
                assert client.sendmail("", [to], raw) == {}  # accepted, forged ones too
            with pytest.raises(smtplib.SMTPRecipientsRefused):
                client.sendmail("", ["bouncesx@portal.example.org"], GARBAGE)
    finally:
        controller.stop()
    assert_outcomes(factory, sent)


def nested_multiparts(levels: int, inner: bytes) -> bytes:
    """A message whose MIME nests `levels` multiparts deep around `inner`."""
    opens = b"".join(
        b'Content-Type: multipart/mixed; boundary="n%d"\r\n\r\n--n%d\r\n' % (i, i)
        for i in range(levels)
    )
    closes = b"".join(b"\r\n--n%d--" % i for i in reversed(range(levels)))
    return b"MIME-Version: 1.0\r\n" + opens + inner + closes + b"\r\n"


def nested_messages(levels: int, inner: bytes) -> bytes:
    """A message wrapping `inner` in `levels` message/rfc822 parts."""
    return b"MIME-Version: 1.0\r\n" + b"Content-Type: message/rfc822\r\n\r\n" * levels + inner


def long_content_type(inner: bytes) -> bytes:
    """A DSN whose top Content-Type is folded out to 3,000 bytes of quoted parameters."""
    params = b"".join(
        b';\r\n x%d="a;b;c;d;e;f;g;h;i;j;k;l;m;n;o;p;q;r;s;t;u;v"' % i for i in range(75)
    )
    return inner.replace(b'boundary="B0UND"', b'boundary="B0UND"' + params, 1)


def parens_header(inner: bytes) -> bytes:
    """A DSN with a To header of 108,000 opening parentheses (folded into legal lines)."""
    return b"To: " + b"\r\n ".join([b"(" * 900] * 120) + b"\r\n" + inner


def not_utf8(inner: bytes) -> bytes:
    """A DSN whose subject and diagnostic are Latin-1 and raw bytes, with a NUL among them."""
    return inner.replace(b"Subject: ", b"Subject: Unzustellbar \xfc ", 1).replace(
        b"mailbox says no", b"mailbox \xff\xfe says \x00 no \xc3(", 1
    )


def truncated(inner: bytes) -> bytes:
    """A DSN cut off inside the returned original's headers."""
    return inner[: inner.index(b"Content-Type: message/rfc822") + 120]


# case id: (how to spoil a real hard VERP bounce, outcome: set aside or still applied)
HOSTILE = {
    "nested-10000-multiparts": (lambda raw: nested_multiparts(10_000, raw), "unreadable"),
    "nested-2000-messages": (lambda raw: nested_messages(2_000, raw), "unreadable"),
    "content-type-3000-bytes": (long_content_type, "unreadable"),
    "header-of-100k-parens": (parens_header, "hard"),
    "not-utf-8-with-nul": (not_utf8, "hard"),
    "truncated": (truncated, "hard"),
}
HOSTILE_CASES = ["real-first", *HOSTILE, "real-last"]


def hostile_returns(sent: dict[str, Sent]) -> list[tuple[str, str, bytes, str]]:
    """(case, envelope recipient, bytes, outcome): real hard bounces around the hostile ones."""
    out = []
    for i, case in enumerate(HOSTILE_CASES):
        to = sent[case].envelope_from
        raw = dsn(to, f"person{i}@example.net", "failed", "5.1.1", sent[case].raw, "message/rfc822")
        spoil, outcome = HOSTILE.get(case, (lambda r: r, "hard"))
        out.append((case, to, spoil(raw), outcome))
    return out


def assert_hostile_outcomes(factory: sessionmaker[Session], sent: dict[str, Sent]) -> None:
    """Every readable return applied (NUL and bad bytes kept out); every unreadable one not."""
    with unit_of_work(factory) as session:
        for case, *_rest, outcome in hostile_returns(sent):
            d = session.get(Delivery, sent[case].delivery_id)
            person = session.get(Subscriber, d.subscriber_id)
            expected = ("failed", "bounced") if outcome == "hard" else ("sent", "active")
            assert (case, d.status, person.status) == (case, *expected)
        reply = session.get(Delivery, sent["not-utf-8-with-nul"].delivery_id).last_reply
        assert "\ufffd" in reply and "\x00" not in reply and "says" in reply


def test_bounces_process_sets_unreadable_mail_aside_and_applies_the_rest(
    tmp_path: Path, factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """Hostile returns between real ones: real ones applied, unreadable ones set aside, one line
    each; a second run does not meet them again."""
    sent = send_everyone(factory, clock, database_url, HOSTILE_CASES)
    root = tmp_path / "bounces"
    box = mailbox.Maildir(root, create=True)
    for _case, to, raw, _outcome in hostile_returns(sent):
        box.add(f"Delivered-To: {to}\r\n".encode() + raw)
    cli = NewsletterCli(tmp_path, f"[database]\nurl = '{database_url}'\n")
    lines = cli.run("bounces", "process", str(root), timeout=120).strip().splitlines()
    unreadable = [c for c, (_spoil, outcome) in HOSTILE.items() if outcome == "unreadable"]
    assert lines[-1] == f"hard {len(HOSTILE_CASES) - len(unreadable)}, unreadable {len(unreadable)}"
    assert len(lines) == len(unreadable) + 1
    assert all(line.startswith("set aside ") and "@" not in line for line in lines[:-1])
    assert_hostile_outcomes(factory, sent)
    assert len(list((root / ".unreadable" / "cur").iterdir())) == len(unreadable)
    assert cli.run("bounces", "process", str(root)).strip() == "no new messages"
    assert cli.run("bounces", "process", "--all", str(root)).strip().startswith("hard ")


def test_inbound_smtp_answers_unreadable_mail_and_the_session_goes_on(
    factory: sessionmaker[Session],
    clock: FrozenClock,
    database_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Over one SMTP session: unreadable returns get 554 and one log line, readable ones 250, and
    the real bounce after them is applied."""
    caplog.set_level(logging.WARNING, logger="newsletter.inbound")
    sent = send_everyone(factory, clock, database_url, HOSTILE_CASES)
    base = make_settings(database_url)
    settings = replace(base, inbound=replace(base.inbound, enabled=True, port=free_port()))
    controller = inbound_for(settings, factory, clock)
    answers = []
    try:
        with smtplib.SMTP("127.0.0.1", settings.inbound.port, timeout=60) as client:
            client.ehlo()
            for case, to, raw, outcome in hostile_returns(sent):
                assert client.mail("")[0] == 250, case
                assert client.rcpt(to)[0] == 250, case
                answers.append((case, client.data(raw)[0], outcome))
    finally:
        controller.stop()
    assert [(case, code) for case, code, _ in answers] == [
        (case, 554 if outcome == "unreadable" else 250) for case, _code, outcome in answers
    ]
    assert_hostile_outcomes(factory, sent)
    logged = [r for r in caplog.records if r.name == "newsletter.inbound"]
    assert len(logged) == sum(outcome == "unreadable" for *_r, outcome in answers)
    assert all("unreadable" in r.getMessage() and "@" not in r.getMessage() for r in logged)


def second_campaign(factory: sessionmaker[Session], clock: FrozenClock) -> None:
    """Another running campaign to the same list, its deliveries queued."""
    with unit_of_work(factory) as session:
        first = session.scalars(select(Campaign)).one()
        campaign = Campaign(
            kind="digest", list_id=first.list_id, dedupe_key="next", created_at=clock.now()
        )
        campaign.status = "running"
        session.add(campaign)
        session.flush()
        for variant in session.scalars(select(Variant).where(Variant.campaign_id == first.id)):
            session.add(
                Variant(
                    campaign_id=campaign.id,
                    lang=variant.lang,
                    subject=variant.subject,
                    html=variant.html,
                    text=variant.text,
                )
            )
        enqueue_audience(session, campaign=campaign, now=clock.now())


def test_a_message_id_alone_suppresses_only_with_a_second_campaign(
    factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """A hard bounce naming a delivery only by its Message-ID (a forgery needs no more) is
    counted; repeating it changes nothing; one for another campaign of that person suppresses."""
    first = send_everyone(factory, clock, database_url, ["first"])["first"]
    second_campaign(factory, clock)
    second = send_queued(factory, clock, database_url, ["second"])["second"]
    settings = make_settings(database_url)
    forged_verp = f"bounces+{first.delivery_id}-0123456789@portal.example.org"

    def bounce(sent: Sent, to: str) -> tuple[str, str, int]:
        raw = dsn(to, "person0@example.net", "failed", "5.1.1", sent.headers, "text/rfc822-headers")
        with unit_of_work(factory) as session:
            outcome = handle_bounce(
                session=session,
                raw=raw,
                envelope_recipients=[to],
                settings=settings,
                now=clock.now(),
            )
        with unit_of_work(factory) as session:
            person = session.scalars(select(Subscriber)).one()
            held = session.scalar(select(func.count()).select_from(Suppression))
            return outcome, str(person.status), held

    assert bounce(first, BOUNCE_ADDRESS) == ("unconfirmed", "active", 0)
    assert bounce(first, forged_verp) == ("unconfirmed", "active", 0)
    clock.advance(days=30)
    assert bounce(first, BOUNCE_ADDRESS) == ("unconfirmed", "active", 0)
    assert bounce(second, BOUNCE_ADDRESS) == ("hard", "bounced", 1)
    with unit_of_work(factory) as session:
        note = session.get(Delivery, first.delivery_id)
        assert note.status == "sent" and "unconfirmed" in (note.last_reply or "")
        assert session.get(Delivery, second.delivery_id).status == "failed"


# --- replays, statuses about the message, a Maildir that cannot be marked --------------------


def apply_hard(
    factory: sessionmaker[Session],
    clock: FrozenClock,
    database_url: str,
    sent: Sent,
    status: str = "5.1.1",
) -> tuple[str, str, int]:
    """Apply a hard VERP bounce of one delivery; (outcome, person's status, suppressions)."""
    settings = make_settings(database_url)
    to = sent.envelope_from
    raw = dsn(to, "person0@example.net", "failed", status, sent.headers, "text/rfc822-headers")
    with unit_of_work(factory) as session:
        outcome = handle_bounce(
            session=session, raw=raw, envelope_recipients=[to], settings=settings, now=clock.now()
        )
    with unit_of_work(factory) as session:
        person = session.get(Subscriber, session.get(Delivery, sent.delivery_id).subscriber_id)
        held = session.scalar(select(func.count()).select_from(Suppression))
        return outcome, str(person.status), held


def come_back(factory: sessionmaker[Session], clock: FrozenClock, email: str) -> None:
    """The reader signs up again and clicks the confirmation link, a day later."""
    clock.advance(days=1)
    with unit_of_work(factory) as session:
        lists = session.scalars(select(MailingList)).all()
        joined = subscribe(
            session=session, email=email, lists=lists, secret=SECRET, now=clock.now(), actor="web"
        )
        assert joined.pending  # bounced: only a fresh confirmation brings them back
        confirm(session=session, subscriber_id=joined.subscriber_id, secret=SECRET, now=clock.now())


def bounced_events(factory: sessionmaker[Session]) -> list[int]:
    with unit_of_work(factory) as session:
        events = session.scalars(select(Event).where(Event.action == "delivery.bounced")).all()
        return sorted(e.detail["delivery"] for e in events)


def test_an_old_bounce_again_leaves_a_reader_who_came_back(
    factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """A hard bounce applied, the reader back and confirmed, the same bounce again (a replayed
    Maildir, a DSN delivered twice): nothing changes, the reader stays."""
    sent = send_everyone(factory, clock, database_url, ["only"])["only"]
    assert apply_hard(factory, clock, database_url, sent) == ("hard", "bounced", 1)
    come_back(factory, clock, "person0@example.net")
    clock.advance(days=30)
    assert apply_hard(factory, clock, database_url, sent) == ("hard again", "active", 0)
    assert bounced_events(factory) == [sent.delivery_id]


def test_a_bounce_for_a_delivery_before_the_readers_confirmation_suppresses_no_one(
    factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """A late bounce for an older delivery, arriving after the reader came back, marks that
    delivery failed and leaves them subscribed; a bounce for a later delivery still suppresses."""
    first = send_everyone(factory, clock, database_url, ["first"])["first"]
    clock.advance(hours=1)
    second_campaign(factory, clock)
    second = send_queued(factory, clock, database_url, ["second"])["second"]
    assert apply_hard(factory, clock, database_url, second) == ("hard", "bounced", 1)
    come_back(factory, clock, "person0@example.net")
    assert apply_hard(factory, clock, database_url, first) == (
        "hard before confirmation",
        "active",
        0,
    )
    assert apply_hard(factory, clock, database_url, first) == ("hard again", "active", 0)
    with unit_of_work(factory) as session:
        assert session.get(Delivery, first.delivery_id).status == "failed"
    assert bounced_events(factory) == sorted([first.delivery_id, second.delivery_id])


@pytest.mark.parametrize(
    ("status", "outcome", "person"),
    [
        ("5.2.3", "refused", "active"),  # message length exceeds an administrative limit
        ("5.2.4", "refused", "active"),  # mailing list expansion problem
        ("5.3.4", "refused", "active"),  # message too big for the system
        ("5.2.1", "hard", "bounced"),  # mailbox disabled
        ("5.2.2", "hard", "bounced"),  # mailbox full, and the receiver gave up
    ],
)
def test_a_message_refused_as_too_large_suppresses_no_one(
    factory: sessionmaker[Session],
    clock: FrozenClock,
    database_url: str,
    status: str,
    outcome: str,
    person: str,
) -> None:
    """X.2.3 and X.2.4 are about this message (RFC 3463), not the reader's mailbox."""
    sent = send_everyone(factory, clock, database_url, ["only"])["only"]
    assert apply_hard(factory, clock, database_url, sent, status)[:2] == (outcome, person)
    with unit_of_work(factory) as session:
        assert session.get(Delivery, sent.delivery_id).status == "failed"


def maildir_of_new_only(root: Path, sent: dict[str, Sent], names: Sequence[str]) -> None:
    """A Maildir as some delivery agents leave it: new/ only, one hard bounce per file name."""
    (root / "new").mkdir(parents=True)
    for i, (name, one) in enumerate(zip(names, sent.values(), strict=True)):
        to, rcpt = one.envelope_from, f"person{i}@example.net"
        raw = dsn(to, rcpt, "failed", "5.1.1", one.headers, "text/rfc822-headers")
        (root / "new" / name).write_bytes(f"Delivered-To: {one.envelope_from}\r\n".encode() + raw)


def test_bounces_process_makes_a_missing_cur_and_marks_every_message(
    tmp_path: Path, factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """A Maildir without cur/: cur/ is made, every message applied and marked seen once."""
    sent = send_everyone(factory, clock, database_url, ["a", "b"])
    root = tmp_path / "bounces"
    maildir_of_new_only(root, sent, ["1700000000.M1P1.host", "1700000001.M1P1.host"])
    cli = NewsletterCli(tmp_path, f"[database]\nurl = '{database_url}'\n")
    assert cli.run("bounces", "process", str(root)).strip() == "hard 2"
    assert sorted(p.name for p in (root / "cur").iterdir()) == [
        "1700000000.M1P1.host:2,S",
        "1700000001.M1P1.host:2,S",
    ]
    assert not list((root / "new").iterdir())
    assert cli.run("bounces", "process", str(root)).strip() == "no new messages"
    assert bounced_events(factory) == sorted(s.delivery_id for s in sent.values())


def test_a_message_that_cannot_be_marked_is_named_and_the_rest_applied(
    tmp_path: Path, factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """The first file's name has no room for its flags (255 bytes at most): it is applied and
    named in one line, the next one is applied and marked, the exit code says so; the next run
    reads the first again and changes nothing."""
    sent = send_everyone(factory, clock, database_url, ["long", "short"])
    root = tmp_path / "bounces"
    long_name = "1700000000.M1P1." + "h" * 237  # 253 bytes: with ":2,S" 257, too long
    maildir_of_new_only(root, sent, [long_name, "1700000001.M1P1.host"])
    args = ["--config", str(tmp_path / "config.toml"), "bounces", "process", str(root)]
    (tmp_path / "config.toml").write_text(f"[database]\nurl = '{database_url}'\n")
    env = {"NEWSLETTER_SECRET": SECRET}
    first = run(args, tmp_path, env, ok=False)
    lines = first.stdout.strip().splitlines()
    assert first.returncode == 1, first.stderr
    assert lines[0].startswith(f"applied {long_name} but could not mark it seen: ")
    assert lines[1:] == ["hard 2"]
    assert [p.name for p in (root / "cur").iterdir()] == ["1700000001.M1P1.host:2,S"]
    again = run(args, tmp_path, env, ok=False)
    assert again.returncode == 1 and again.stdout.strip().splitlines()[1:] == ["hard again 1"]
    assert bounced_events(factory) == sorted(s.delivery_id for s in sent.values())


def test_a_message_id_bounce_from_before_the_readers_confirmation_is_no_evidence_now(
    factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """Two Message-ID-only bounces suppress only when both are about deliveries after the
    reader's latest confirmation: the confirmation email reached them in between."""
    settings = make_settings(database_url)
    first = send_everyone(factory, clock, database_url, ["first"])["first"]

    def unsigned(sent: Sent) -> str:
        raw = dsn(
            BOUNCE_ADDRESS,
            "person0@example.net",
            "failed",
            "5.1.1",
            sent.headers,
            "text/rfc822-headers",
        )
        with unit_of_work(factory) as session:
            return handle_bounce(
                session=session,
                raw=raw,
                envelope_recipients=[BOUNCE_ADDRESS],
                settings=settings,
                now=clock.now(),
            )

    assert unsigned(first) == "unconfirmed"
    with unit_of_work(factory) as session:
        person = session.scalars(select(Subscriber)).one()
        unsubscribe(
            session=session, subscriber_id=person.id, list_id=None, now=clock.now(), actor="web"
        )
    come_back(factory, clock, "person0@example.net")
    clock.advance(hours=1)
    second_campaign(factory, clock)
    second = send_queued(factory, clock, database_url, ["second"])["second"]
    assert unsigned(second) == "unconfirmed"
    with unit_of_work(factory) as session:
        assert session.scalars(select(Subscriber.status)).one() == "active"
        assert session.scalar(select(func.count()).select_from(Suppression)) == 0
