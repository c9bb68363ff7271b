"""Refusals the sender must read right: whose fault a 5xx at RCPT is, 4xx after a long pause,
and a relay slow to answer the final dot. Real aiosmtpd servers, SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from newsletter.campaigns import pause_campaign, resume_campaign, retry_campaign
from newsletter.clock import FrozenClock
from newsletter.config import load_settings
from newsletter.db import unit_of_work
from newsletter.db.models import (
    Campaign,
    CampaignStatus,
    Event,
    Subscriber,
    SubscriberStatus,
    Suppression,
)
from newsletter.errors import ConfigError
from newsletter.smtp import Result, SmtpPool
from tests.conftest import SECRET
from tests.smtp_faults import Fault, FaultyHandler, faulty_smtpd
from tests.test_send import deliver, seed, settings_for, statuses

BODY = b"Subject: hello\r\nMIME-Version: 1.0\r\n\r\nhello\r\n"
RELAY_DENIED = "554 5.7.1 Relay access denied"

# A reply at RCPT, and whether it refuses the reader's mailbox (so the address is suppressed):
# by the enhanced status code as README's bounce rules read it, else 550/551/553 only.
RCPT_REPLIES = [
    ("550 5.1.1 no such user", True),
    ("553 5.1.3 bad destination mailbox address syntax", True),
    ("550 5.0.0 mailbox unavailable", True),
    ("552 5.2.2 mailbox full", True),
    ("550 5.2.1 mailbox disabled", True),
    (RELAY_DENIED, False),
    ("550 5.7.1 relaying denied", False),
    ("554 5.7.26 unauthenticated mail is prohibited", False),
    ("550 5.1.8 bad sender's domain", False),
    ("552 5.3.4 message too big for system", False),
    ("550 mailbox unavailable", True),
    ("551 user not local", True),
    ("553 mailbox name not allowed", True),
    ("554 transaction failed", False),
    ("552 exceeded storage allocation", False),
]


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipe", "plain"])
def test_only_a_refused_mailbox_at_rcpt_is_recipient_level(pipelining: bool) -> None:
    """A 5xx at RCPT is about the reader's mailbox by its enhanced status code (one classifier
    with bounces), without one only for 550/551/553; a policy refusal is permanent all the same."""
    recipients = [f"reader{i}@example.net" for i in range(len(RCPT_REPLIES))]
    faults = [
        Fault("RCPT", reply, only=f"{rcpt.partition('@')[0]}@")
        for rcpt, (reply, _) in zip(recipients, RCPT_REPLIES, strict=True)
    ]
    handler = FaultyHandler(faults, pipelining=pipelining)
    base = load_settings(None, {"NEWSLETTER_SECRET": SECRET})

    async def send(port: int) -> list[tuple[Result, bool]]:
        pool = SmtpPool(replace(base.smtp, host="127.0.0.1", port=port, pool_size=1))
        try:
            outcomes = [
                await pool.send(BODY, sender="bounces@example.org", recipient=rcpt)
                for rcpt in recipients
            ]
        finally:
            await pool.close()
        return [(o.result, o.recipient_level) for o in outcomes]

    with faulty_smtpd(handler) as port:
        got = asyncio.run(send(port))
    assert got == [(Result.PERMANENT, mailbox) for _, mailbox in RCPT_REPLIES]
    assert handler.received == []


def test_a_relay_refusing_every_recipient_pauses_and_suppresses_only_a_refused_mailbox(
    factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """554 5.7.1 Relay access denied for everyone (an expired relay login): the campaign pauses
    after failure_burst, nobody is suppressed for it (only the one reader whose mailbox is
    refused), and once the relay is fixed, resume and retry bring everyone else their message,
    once."""
    cid = seed(factory, clock, 12)
    handler = FaultyHandler(
        [
            Fault("RCPT", "550 5.1.1 no such user", only="person2@"),
            Fault("RCPT", f"{RELAY_DENIED} for <person@example.net>"),
        ]
    )
    with faulty_smtpd(handler) as port:
        settings = settings_for(database_url, port, failure_burst=5, pool_size=1)
        report = deliver(factory, settings, clock)
        assert "failed deliveries in a row" in report.paused[cid]
        assert report.failed >= 5 and statuses(factory).count("queued") > 0
        with unit_of_work(factory) as session:
            campaign = session.get(Campaign, cid)
            assert campaign is not None and campaign.status == CampaignStatus.PAUSED
            bounced = session.scalars(
                select(Subscriber.email).where(Subscriber.status == SubscriberStatus.BOUNCED)
            ).all()
            assert bounced == ["person2@example.net"]
            assert len(session.scalars(select(Suppression.id)).all()) == 1
            events = session.scalars(
                select(Event.id).where(Event.action == "subscriber.bounced")
            ).all()
            assert len(events) == 1

        handler.faults.clear()  # the relay's login is fixed
        with unit_of_work(factory) as session:
            resume_campaign(session=session, campaign_id=cid, now=clock.now(), actor="t")
        with unit_of_work(factory) as session:
            retried = retry_campaign(session=session, campaign_id=cid, now=clock.now(), actor="t")
        assert retried == report.failed - 1  # all but the refused mailbox
        deliver(factory, settings, clock)
    got = Counter(r for _f, rcpts, _b in handler.received for r in rcpts)
    assert got == Counter(f"person{i}@example.net" for i in range(12) if i != 2)
    assert statuses(factory).count("sent") == 11


def test_a_campaign_resumed_after_a_pause_past_the_deadline_is_retried_not_failed(
    factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """Paused for longer than retry_deadline_hours, resumed, greylisted twice: each message is
    deferred twice and then sent, the deadline counted from the resume."""
    cid = seed(factory, clock, 3)
    with unit_of_work(factory) as session:
        pause_campaign(session=session, campaign_id=cid, now=clock.now(), actor="t", reason="x")
    clock.advance(hours=73)
    with unit_of_work(factory) as session:
        resume_campaign(session=session, campaign_id=cid, now=clock.now(), actor="t")
    handler = FaultyHandler([Fault("RCPT", "451 4.7.1 greylisted, try again later", times=6)])
    with faulty_smtpd(handler) as port:
        settings = settings_for(database_url, port, pool_size=1)
        deliver(factory, settings, clock)
        assert statuses(factory) == ["deferred"] * 3
        clock.advance(hours=1)
        deliver(factory, settings, clock)
        assert statuses(factory) == ["deferred"] * 3
        clock.advance(hours=1)
        deliver(factory, settings, clock)
    assert statuses(factory) == ["sent"] * 3
    assert sorted(r for _f, rcpts, _b in handler.received for r in rcpts) == [
        f"person{i}@example.net" for i in range(3)
    ]


def test_a_first_attempt_past_the_deadline_is_deferred_not_failed(
    factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """Mail queued long ago and never tried (held back by an hourly cap, say), greylisted at
    its first attempt: deferred, then sent."""
    seed(factory, clock, 3)
    clock.advance(hours=73)
    handler = FaultyHandler([Fault("RCPT", "451 4.7.1 greylisted, try again later", times=3)])
    with faulty_smtpd(handler) as port:
        settings = settings_for(database_url, port, pool_size=1)
        deliver(factory, settings, clock)
        assert statuses(factory) == ["deferred"] * 3
        clock.advance(hours=1)
        deliver(factory, settings, clock)
    assert statuses(factory) == ["sent"] * 3
    assert len(handler.received) == 3


def test_a_relay_slow_to_answer_the_final_dot_gets_each_message_once(
    factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """The relay answers the final dot later than timeout_seconds (a content scanner under
    load): the sender waits final_reply_timeout_seconds there, records each message sent, and
    a later run sends nobody a second copy."""
    seed(factory, clock, 3)
    handler = FaultyHandler([Fault("DATA", stall_seconds=1.5, times=3)])
    with faulty_smtpd(handler) as port:
        settings = settings_for(database_url, port, timeout_seconds=0.5, pool_size=3)
        report = deliver(factory, settings, clock)
        assert statuses(factory) == ["sent"] * 3 and report.sent == 3
        clock.advance(hours=1)
        deliver(factory, settings, clock)
    got = Counter(r for _f, rcpts, _b in handler.received for r in rcpts)
    assert got == Counter(f"person{i}@example.net" for i in range(3))


def test_final_reply_timeout_is_read_for_smtp_and_each_relay(tmp_path: Path) -> None:
    """[smtp] final_reply_timeout_seconds and a relay's own, as timeout_seconds is; > 0."""
    path = tmp_path / "config.toml"
    path.write_text(
        "[smtp]\nfinal_reply_timeout_seconds = 120\n"
        "relays = [{ host = 'b.example.org', final_reply_timeout_seconds = 45.5 }]\n"
    )
    first, second = load_settings(path, {}).smtp.all_relays()
    assert (first.final_reply_timeout_seconds, second.final_reply_timeout_seconds) == (120, 45.5)
    for table in (
        "[smtp]\nfinal_reply_timeout_seconds = 0\n",
        "[smtp]\nfinal_reply_timeout_seconds = nan\n",
        "[smtp]\nrelays = [{ host = 'b.example.org', final_reply_timeout_seconds = -1 }]\n",
    ):
        path.write_text(table)
        with pytest.raises(ConfigError, match="final_reply_timeout_seconds' must be more than 0"):
            load_settings(path, {})
