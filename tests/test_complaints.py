"""Spam complaints: feedback-loop reports (ARF) as RFC 5965, Yahoo's CFL and Microsoft's JMRP
write them, two ways in (`newsletter bounces process MAILDIR` and the inbound SMTP server).

A digest is first really sent through aiosmtpd, so each delivery has its real VERP envelope
sender and Message-ID; the reports (tests/data/arf) are filled with them: whole, redacted (only
the Message-ID, or only the VERP address left), forged, foreign, repeated, of another type,
hostile. The right person is unsubscribed and suppressed, each complaint counts once, the rest
changes nothing; a campaign past the complaint rate pauses itself, once, with the reason.
"""

from __future__ import annotations

import logging
import mailbox
import re
import smtplib
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from newsletter.bounces import UnreadableMailError
from newsletter.campaigns import resume_campaign
from newsletter.clock import FrozenClock
from newsletter.complaints import handle_return, over_complaint_rate
from newsletter.db import unit_of_work
from newsletter.db.models import (
    Campaign,
    Complaint,
    Delivery,
    Event,
    Subscriber,
    Subscription,
    Suppression,
)
from newsletter.devsmtp import free_port
from newsletter.inbound import inbound_for
from newsletter.suppression import is_suppressed
from tests.conftest import SECRET, make_settings
from tests.sender_cli import NewsletterCli
from tests.test_bounces import BOUNCE_ADDRESS, Sent, nested_multiparts, send_everyone

ARF = Path(__file__).parent / "data" / "arf"
MESSAGE_ID = re.compile(rb"^Message-ID: (<[^>\r\n]+>)", re.MULTILINE | re.IGNORECASE)

# case: (fixture, how it is changed, outcome, whether its person complained)
CASES = {
    "rfc5965": ("rfc5965", "", "complaint", True),
    "yahoo-cfl-redacted": ("yahoo-cfl", "", "complaint", True),
    "yahoo-cfl-message-id-only": ("yahoo-cfl-message-id-only", "", "complaint", True),
    "jmrp": ("jmrp", "", "complaint", True),
    "jmrp-verp-only": ("jmrp-verp-only", "", "complaint", True),
    "not-spam": ("not-spam", "", "not a complaint", False),
    "forged-message-id": ("yahoo-cfl-message-id-only", "forge-hmac", "unknown delivery", False),
    "forged-verp": ("jmrp-verp-only", "forge-verp", "unknown delivery", False),
    "wrong-report-type": ("rfc5965", "delivery-status", "not a bounce", False),
    "no-original": ("yahoo-cfl", "no-original", "unknown delivery", False),
}
# Besides one report per case: RFC 5965's own example (someone else's mail) and the first
# report again.
SUMMARY = "complaint 5, complaint again 1, not a bounce 1, not a complaint 1, unknown delivery 4"


def fill(name: str, sent: Sent, rcpt: str, how: str = "") -> bytes:
    """A fixture with the delivery's VERP address, Message-ID and recipient, in CRLF lines."""
    found = MESSAGE_ID.search(sent.headers)
    assert found is not None
    mid, verp = found.group(1).decode(), sent.envelope_from
    if how == "forge-hmac":  # the same campaign and person, a signature made up
        mid = re.sub(r"\.[0-9a-f]{16}@", ".0123456789abcdef@", mid)
    if how == "forge-verp":
        verp = re.sub(r"-[0-9a-f]{10}@", "-0123456789@", verp)
    text = (ARF / f"{name}.eml").read_text()
    text = text.replace("%%VERP%%", verp).replace("%%MESSAGE_ID%%", mid)
    text = text.replace("%%RCPT%%", rcpt)
    if how == "delivery-status":
        text = text.replace("report-type=feedback-report", "report-type=delivery-status")
    if how == "no-original":  # the report part only, the original cut off, no VERP left
        text = text.split("------=_Part_1188_81922.1732442531\nContent-Type: message/rfc822")[0]
        text = text.replace(f"Original-Mail-From: <{verp}>\n", "")
    return text.replace("\n", "\r\n").encode()


def reports(sent: dict[str, Sent]) -> list[bytes]:
    """One report per case, RFC 5965's foreign example, and the first report again."""
    out = [
        fill(name, sent[case], f"person{i}@example.net", how)
        for i, (case, (name, how, *_)) in enumerate(CASES.items())
    ]
    foreign = (ARF / "rfc5965-foreign.eml").read_bytes().replace(b"\n", b"\r\n")
    return [*out, foreign, out[0]]


def assert_complaints(factory: sessionmaker[Session], sent: dict[str, Sent]) -> None:
    """The people of the complaint cases unsubscribed and suppressed, each counted once."""
    settings_secret = SECRET
    with unit_of_work(factory) as session:
        for case, (*_, complained) in CASES.items():
            d = session.get(Delivery, sent[case].delivery_id)
            assert d is not None
            person = session.get(Subscriber, d.subscriber_id)
            assert person is not None
            subscriptions = session.scalars(
                select(Subscription.status).where(Subscription.subscriber_id == person.id)
            ).all()
            expected = "unsubscribed" if complained else "active"
            assert (case, person.status, set(subscriptions)) == (case, expected, {expected})
            assert is_suppressed(session, person.email, secret=settings_secret) == complained
            assert (session.get(Complaint, d.id) is not None) == complained
            assert d.status == "sent"  # a complaint is no bounce: the message was delivered
        reasons = session.scalars(select(Suppression.reason)).all()
        assert reasons == ["complaint"] * 5
        events = session.scalars(select(Event).where(Event.action == "delivery.complained"))
        assert sorted(e.detail["delivery"] for e in events) == sorted(
            sent[c].delivery_id for c, v in CASES.items() if v[3]
        )


def test_bounces_process_applies_the_providers_reports(
    tmp_path: Path, factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """`newsletter bounces process`: the right people suppressed, each report counted once."""
    sent = send_everyone(factory, clock, database_url, tuple(CASES))
    box = mailbox.Maildir(tmp_path / "fbl", create=True)
    for raw in reports(sent):
        box.add(f"Delivered-To: {BOUNCE_ADDRESS}\r\n".encode() + raw)
    cli = NewsletterCli(tmp_path, f"[database]\nurl = '{database_url}'\n")
    assert " ".join(cli.run("bounces", "process", str(tmp_path / "fbl")).split()) == SUMMARY
    assert_complaints(factory, sent)
    logs = "".join(p.read_text() for p in tmp_path.glob("*-bounces.log"))
    assert "@example.net" not in logs  # no address logged
    # Processed again (--all): every report is a repeat now; nothing more is counted.
    again = " ".join(cli.run("bounces", "process", "--all", str(tmp_path / "fbl")).split())
    assert again == "complaint again 6, not a bounce 1, not a complaint 1, unknown delivery 4"
    assert_complaints(factory, sent)


def test_inbound_smtp_applies_the_providers_reports(
    factory: sessionmaker[Session],
    clock: FrozenClock,
    database_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The service's inbound SMTP takes the reports at the bounce address, end to end."""
    sent = send_everyone(factory, clock, database_url, tuple(CASES))
    base = make_settings(database_url)
    settings = replace(base, inbound=replace(base.inbound, enabled=True, port=free_port()))
    controller = inbound_for(settings, factory, clock)
    caplog.set_level(logging.INFO, logger="newsletter.complaints")
    try:
        with smtplib.SMTP("127.0.0.1", settings.inbound.port, timeout=10) as client:
            for raw in reports(sent):
                assert client.sendmail("fbl@example.com", [BOUNCE_ADDRESS], raw) == {}
    finally:
        controller.stop()
    assert_complaints(factory, sent)
    lines = [r.getMessage() for r in caplog.records]
    assert sum("nothing changed" in line for line in lines) == 5
    assert not any("@" in line for line in lines)


def test_hostile_reports_change_nothing_and_the_batch_goes_on(
    factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """Nested, huge, partless and cut-off reports: one answer each, the real one still applied."""
    sent = send_everyone(factory, clock, database_url, ("real",))
    settings = make_settings(database_url)
    real = fill("jmrp", sent["real"], "person0@example.net")
    head, _, tail = real.partition(b"--JMRP_boundary_7a1c\r\nContent-Type: message/feedback")
    hostile = {
        "nested": (nested_multiparts(10_000, real), "unreadable"),
        # The report after 300 KB of text: only the first 256 KB are read, the report is lost.
        "huge": (
            head.replace(b"This is an email", b"x" * 300_000) + b"--JMRP" + tail,
            "not a complaint",
        ),
        "partless": (
            b"Content-Type: multipart/report; report-type=feedback-report\r\n\r\nno parts\r\n",
            "not a complaint",
        ),
        # Cut off in the original: the report part, and its Original-Mail-From, came whole.
        "cut-off": (real[: real.index(b"Return-Path") + 20], "complaint"),
        "real": (real, "complaint again"),
    }
    outcomes = {}
    for name, (raw, _) in hostile.items():
        with unit_of_work(factory) as session:
            try:
                outcomes[name] = handle_return(
                    session=session, raw=raw, settings=settings, now=clock.now()
                )
            except UnreadableMailError:
                outcomes[name] = "unreadable"
    assert outcomes == {name: outcome for name, (_, outcome) in hostile.items()}
    with unit_of_work(factory) as session:
        assert session.scalar(select(func.count()).select_from(Complaint)) == 1
        assert session.scalar(select(func.count()).select_from(Suppression)) == 1


def test_the_complaint_rate_rule() -> None:
    """Past the rate, and only after the minimum delivered; 0 never pauses."""
    assert not over_complaint_rate(3, 999, rate=0.003, min_delivered=1000)
    assert not over_complaint_rate(3, 1000, rate=0.003, min_delivered=1000)  # at, not past
    assert over_complaint_rate(4, 1000, rate=0.003, min_delivered=1000)
    assert not over_complaint_rate(50, 1000, rate=0.0, min_delivered=1000)
    assert not over_complaint_rate(1, 0, rate=0.5, min_delivered=0)


def still_sending(factory: sessionmaker[Session], clock: FrozenClock) -> int:
    """One more reader queued and the campaign running again, as in the middle of a send."""
    now = clock.now()
    with unit_of_work(factory) as session:
        campaign = session.scalars(select(Campaign)).one()
        late = Subscriber(email="late@example.net", created_at=now)
        session.add(late)
        session.flush()
        session.add(
            Delivery(
                campaign_id=campaign.id, subscriber_id=late.id, next_attempt_at=now, created_at=now
            )
        )
        session.execute(update(Campaign).values(status="running", finished_at=None))
        return campaign.id


def test_a_campaign_past_the_complaint_rate_pauses_itself_once(
    tmp_path: Path, factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """Rate 0.25 after 4 delivered: one complaint of 4 is at it, two pass it and pause the
    campaign with the reason; resumed by an operator, a third complaint does not pause it."""
    people = ("a", "b", "c", "d")
    sent = send_everyone(factory, clock, database_url, people)
    campaign_id = still_sending(factory, clock)
    cli = NewsletterCli(
        tmp_path,
        f"[database]\nurl = '{database_url}'\n"
        "[smtp]\ncomplaint_pause_rate = 0.25\ncomplaint_min_delivered = 4\n",
    )
    box = mailbox.Maildir(tmp_path / "fbl", create=True)

    def complain(i: int) -> tuple[str, str]:
        box.add(fill("yahoo-cfl", sent[people[i]], f"person{i}@example.net"))
        cli.run("bounces", "process", str(tmp_path / "fbl"))
        with unit_of_work(factory) as session:
            campaign = session.get(Campaign, campaign_id)
            assert campaign is not None
            return str(campaign.status), campaign.pause_reason

    assert complain(0) == ("running", "")
    status, reason = complain(1)
    assert status == "paused"
    assert reason.startswith("paused after 2 spam complaints in 4 delivered messages (50.00%")
    assert "complaint_pause_rate" in reason
    with unit_of_work(factory) as session:
        resume_campaign(session=session, campaign_id=campaign_id, now=clock.now(), actor="ops")
    assert complain(2) == ("running", "")
    with unit_of_work(factory) as session:
        pauses = session.scalars(select(Event).where(Event.action == "campaign.paused")).all()
        assert [(e.actor, e.detail["campaign"]) for e in pauses] == [("complaints", campaign_id)]
        assert session.scalar(select(func.count()).select_from(Complaint)) == 3


# case: (fixture, how it is changed, outcome, whether its person complained)
ORIGINAL_CASES = {
    "reply-headers": ("reply-headers", "", "unknown delivery", False),
    "forwarded-attachment": ("forwarded-attachment", "", "unknown delivery", False),
    "two-ids": ("yahoo-cfl-message-id-only", "two-ids", "unknown delivery", False),
    "base64-feedback": ("base64-feedback", "", "complaint", True),
    "quoted-printable-feedback": ("quoted-printable-feedback", "", "complaint", True),
}


def test_only_the_reports_own_original_names_the_delivery(
    factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """A reported reply (our id in In-Reply-To/References), someone else's message carrying ours
    as an attachment, a Message-ID field with a second id: nothing changes, the person stays
    subscribed everywhere. A transfer-encoded feedback part is read as any other."""
    sent = send_everyone(factory, clock, database_url, tuple(ORIGINAL_CASES))
    settings = make_settings(database_url)
    for case, (name, how, outcome, _) in ORIGINAL_CASES.items():
        raw = fill(name, sent[case], "person@example.net")
        if how == "two-ids":  # the original's Message-ID field with someone else's id first
            found = MESSAGE_ID.search(sent[case].headers)
            assert found is not None
            mine = b"Message-ID: " + found.group(1)
            assert mine in raw
            raw = raw.replace(mine, b"Message-ID: <other.1@example.com> " + found.group(1))
        with unit_of_work(factory) as session:
            got = handle_return(session=session, raw=raw, settings=settings, now=clock.now())
        assert (case, got) == (case, outcome)
    with unit_of_work(factory) as session:
        for case, (*_, complained) in ORIGINAL_CASES.items():
            d = session.get(Delivery, sent[case].delivery_id)
            assert d is not None
            person = session.get(Subscriber, d.subscriber_id)
            assert person is not None
            statuses = set(
                session.scalars(
                    select(Subscription.status).where(Subscription.subscriber_id == person.id)
                )
            )
            expected = "unsubscribed" if complained else "active"
            assert (case, statuses) == (case, {expected})
            assert is_suppressed(session, person.email, secret=SECRET) == complained
            assert (session.get(Complaint, d.id) is not None) == complained
