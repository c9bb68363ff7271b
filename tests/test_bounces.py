"""Bounces that come back: DSNs, lost VERP, garbage, auto-replies and forgeries, two ways in.

Mail is first really sent through aiosmtpd (so each delivery has its real VERP envelope sender and
Message-ID); the returns are then built from what the server received, and fed in either through
`newsletter bounces process MAILDIR` on a real Maildir or through the service's inbound SMTP.
"""

from __future__ import annotations

import mailbox
import smtplib
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from newsletter.bounces import parse_verp, verp_address
from newsletter.clock import FrozenClock
from newsletter.db import unit_of_work
from newsletter.db.models import Delivery, Event, Subscriber, Suppression
from newsletter.devsmtp import free_port
from newsletter.inbound import inbound_for
from tests.conftest import make_settings
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
    "hard-only-message-id": ("hard-headers", "plain", "hard", "failed", "bounced"),
    "hard-only-full-original": ("hard-original", "plain", "hard", "failed", "bounced"),
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


def send_everyone(factory: sessionmaker[Session], clock: FrozenClock, database_url: str) -> dict:
    """Seed one person per case and really send them the campaign; returns case -> Sent."""
    seed(factory, clock, len(CASES))
    handler = FaultyHandler()
    with faulty_smtpd(handler) as port:
        deliver(factory, settings_for(database_url, port), clock)
    with unit_of_work(factory) as session:
        ids = dict(session.execute(select(Subscriber.email, Delivery.id).join(Delivery)).all())
    by_rcpt = {rcpts[0]: (sender, raw) for sender, rcpts, raw in handler.received}
    out = {}
    for i, case in enumerate(CASES):
        sender, raw = by_rcpt[f"person{i}@example.net"]
        out[case] = Sent(ids[f"person{i}@example.net"], sender, raw.split(b"\r\n\r\n")[0], raw)
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
    assert summary.strip() == "hard 4, not a bounce 2, soft 1, unknown delivery 1"
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
