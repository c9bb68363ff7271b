"""Urgent-action cases against a second adversarial probe: the later messages of a case whose
first message was cancelled or failed, a closed case's messages retried, a reader's own
"I sent my letter" link pasted into an update.

Real SQLite and PostgreSQL, a real SMTP server that defers or refuses one reader (aiosmtpd).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from email.message import EmailMessage

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from newsletter.audience import UNTHREADED
from newsletter.campaigns import (
    cancel_campaign,
    pause_campaign,
    resume_campaign,
    retry_campaign,
)
from newsletter.cases import close_case, get_case, send_first, send_update
from newsletter.check import CheckError
from newsletter.clock import FrozenClock
from newsletter.config import Settings
from newsletter.db import unit_of_work
from newsletter.db.models import Campaign, CampaignStatus, Delivery, DeliveryStatus
from newsletter.errors import CampaignError
from newsletter.tokens import make_wrote_token, page_url
from tests.builders import deliver
from tests.conftest import SECRET, make_settings
from tests.smtp_faults import Fault, FaultyHandler, faulty_smtpd
from tests.test_cases import START, make_case, people
from tests.test_flow import prepare

VICTIM = "anna.example@example.org"
World = tuple[sessionmaker[Session], Settings, FrozenClock, FaultyHandler]


@pytest.fixture
def world(factory: sessionmaker[Session], database_url: str) -> Iterator[World]:
    """The demo's lists and people, a clock, and an SMTP server whose faults a test sets."""
    clock = FrozenClock(START)
    prepare(factory, clock)
    handler = FaultyHandler()
    with faulty_smtpd(handler) as port:
        base = make_settings(database_url)
        smtp = replace(base.smtp, host="127.0.0.1", port=port, retry_deadline_hours=1)
        yield factory, replace(base, smtp=smtp), clock, handler


def received(handler: FaultyHandler, campaign_id: int) -> dict[str, EmailMessage]:
    """One campaign's messages by recipient (its Message-ID names the campaign first)."""
    out: dict[str, EmailMessage] = {}
    for msg in handler.messages():
        if str(msg["Message-ID"]).startswith(f"<{campaign_id}."):
            address = str(msg["To"]).rpartition("<")[2].rstrip(">")
            assert address not in out, f"{address} got two copies"
            out[address] = msg
    return out


def first_with_victim_deferred(world: World) -> tuple[int, int]:
    """A case whose first message went to everyone but VICTIM (greylisted): (case, campaign)."""
    factory, settings, clock, handler = world
    handler.faults.append(Fault("RCPT", reply="451 4.2.2 mailbox full, try later", only="anna"))
    case_id = make_case(factory, settings, clock)
    with unit_of_work(factory) as session:
        first, queued = send_first(
            session, case=get_case(session, case_id), settings=settings, now=clock.now(), actor="t"
        )
        first_id = first.id
    report = deliver(factory, settings, clock)
    assert (queued, report.sent, report.deferred) == (8, 7, 1)
    return case_id, first_id


def update(world: World, case_id: int, **kwargs: object) -> tuple[int, int]:
    """Make an update of the case (not delivered yet): (campaign, how many were queued)."""
    factory, settings, clock, _ = world
    with unit_of_work(factory) as session:
        made, queued = send_update(
            session,
            case=get_case(session, case_id),
            body_html=str(kwargs.get("body", "<p>He was moved to another prison.</p>")),
            include_new=False,
            settings=settings,
            now=clock.now(),
            actor="t",
        )
        return made.id, queued


def delivery(factory: sessionmaker[Session], campaign_id: int, email: str) -> Delivery:
    """One reader's delivery of a campaign."""
    sid = people(factory)[email].id
    with unit_of_work(factory) as session:
        found = session.scalars(
            select(Delivery).where(
                Delivery.campaign_id == campaign_id, Delivery.subscriber_id == sid
            )
        ).one()
        session.expunge(found)
        return found


def status(factory: sessionmaker[Session], campaign_id: int) -> str:
    """A campaign's status now."""
    with unit_of_work(factory) as session:
        campaign = session.get(Campaign, campaign_id)
        assert campaign is not None
        return str(campaign.status)


def test_an_update_held_for_a_cancelled_first_message_is_given_up_not_held_for_ever(
    world: World,
) -> None:
    """VICTIM's first message is still deferred when the update is made (so they are in its
    audience), then the first message is cancelled: their update is not sent (suppressed, with
    why), the others' is, and the update campaign finishes. A later update leaves them out."""
    factory, settings, clock, handler = world
    case_id, first_id = first_with_victim_deferred(world)
    update_id, queued = update(world, case_id)
    assert queued == 8
    with unit_of_work(factory) as session:
        cancel_campaign(session=session, campaign_id=first_id, now=clock.now(), actor="t")
    handler.faults.clear()
    for _ in range(3):  # long past the five minutes an update waits for its first message
        clock.advance(minutes=6)
        deliver(factory, settings, clock)
    assert len(received(handler, update_id)) == 7 and VICTIM not in received(handler, update_id)
    given_up = delivery(factory, update_id, VICTIM)
    assert (given_up.status, given_up.last_reply) == (DeliveryStatus.SUPPRESSED, UNTHREADED)
    assert status(factory, update_id) == CampaignStatus.FINISHED
    assert delivery(factory, first_id, VICTIM).status == DeliveryStatus.DEFERRED  # the record
    assert update(world, case_id, body="<p>A second update.</p>")[1] == 7


def test_an_update_made_after_the_first_message_was_cancelled_unsent_is_refused(
    world: World,
) -> None:
    """Nobody got the first message (cancelled while queued): an update has nobody to go to,
    and `actions send` does not suggest one."""
    factory, settings, clock, _ = world
    case_id = make_case(factory, settings, clock)
    with unit_of_work(factory) as session:
        first, _ = send_first(
            session, case=get_case(session, case_id), settings=settings, now=clock.now(), actor="t"
        )
        cancel_campaign(session=session, campaign_id=first.id, now=clock.now(), actor="t")
    with pytest.raises(CampaignError, match="nobody to send the update to"):
        update(world, case_id)
    with unit_of_work(factory) as session, pytest.raises(CampaignError) as refused:
        send_first(
            session, case=get_case(session, case_id), settings=settings, now=clock.now(), actor="t"
        )
    assert "was cancelled" in str(refused.value)
    assert "send an update instead" not in str(refused.value)


def test_a_reader_whose_first_message_failed_gets_no_update(world: World) -> None:
    """VICTIM's first message is deferred when the update is made, then fails at the retry
    deadline: the update, held for it, is never sent to them (no update out of its thread)."""
    factory, settings, clock, handler = world
    case_id, first_id = first_with_victim_deferred(world)
    update_id, queued = update(world, case_id)
    assert queued == 8
    for _ in range(12):  # the first message is retried until its deadline, an hour
        clock.advance(minutes=20)
        deliver(factory, settings, clock)
        if delivery(factory, first_id, VICTIM).status == DeliveryStatus.FAILED:
            break
    assert delivery(factory, first_id, VICTIM).status == DeliveryStatus.FAILED
    handler.faults.clear()  # their mailbox works again
    for _ in range(3):
        clock.advance(minutes=6)
        deliver(factory, settings, clock)
    updates = received(handler, update_id)
    assert len(updates) == 7 and VICTIM not in updates
    assert all(msg["In-Reply-To"] for msg in updates.values())
    given_up = delivery(factory, update_id, VICTIM)
    assert (given_up.status, given_up.last_reply) == (DeliveryStatus.SUPPRESSED, UNTHREADED)
    assert status(factory, update_id) == CampaignStatus.FINISHED


def test_a_closed_cases_messages_are_neither_retried_nor_resumed(world: World) -> None:
    """VICTIM's first message failed; an update was paused; the case is closed. Retrying the
    first message or resuming the update is refused in one line, and nothing more is sent;
    the closing message itself may still be retried."""
    factory, settings, clock, handler = world
    handler.faults.append(Fault("DATA", reply="554 5.7.1 rejected by policy", only="anna"))
    case_id = make_case(factory, settings, clock)
    with unit_of_work(factory) as session:
        first, _ = send_first(
            session, case=get_case(session, case_id), settings=settings, now=clock.now(), actor="t"
        )
        first_id = first.id
    assert deliver(factory, settings, clock).failed == 1
    update_id, _ = update(world, case_id)
    with unit_of_work(factory) as session:
        pause_campaign(
            session=session, campaign_id=update_id, now=clock.now(), actor="t", reason="typo"
        )
        closing, _ = close_case(
            session,
            case=get_case(session, case_id),
            outcome="released",
            body_html="<p>He is free.</p>",
            settings=settings,
            now=clock.now(),
            actor="t",
        )
        assert closing is not None
        closing_id = closing.id
    handler.faults.clear()
    deliver(factory, settings, clock)
    before = len(handler.received)
    clock.advance(hours=1)
    for refuse in (retry_campaign, resume_campaign):
        for campaign_id in (first_id, update_id):
            with unit_of_work(factory) as session, pytest.raises(CampaignError) as refused:
                refuse(session=session, campaign_id=campaign_id, now=clock.now(), actor="staff")
            assert "closed" in str(refused.value) and "\n" not in str(refused.value)
    with unit_of_work(factory) as session:
        assert (
            retry_campaign(session=session, campaign_id=closing_id, now=clock.now(), actor="s") == 0
        )
    deliver(factory, settings, clock)
    assert len(handler.received) == before
    assert delivery(factory, first_id, VICTIM).status == DeliveryStatus.FAILED
    assert status(factory, update_id) == CampaignStatus.PAUSED


def test_a_readers_own_wrote_link_pasted_into_an_update_is_refused(world: World) -> None:
    """Anna's "I sent my letter" link in an update's text would count whoever clicks it as
    her: the check refuses the update, and nothing is queued."""
    factory, settings, clock, _ = world
    case_id = make_case(factory, settings, clock)
    with unit_of_work(factory) as session:
        send_first(
            session, case=get_case(session, case_id), settings=settings, now=clock.now(), actor="t"
        )
    deliver(factory, settings, clock)
    token = make_wrote_token(
        secret=SECRET, subscriber_id=people(factory)[VICTIM].id, case_id=case_id
    )
    url = page_url(settings.web.base_url, "wrote", token)
    with pytest.raises(CheckError) as refused:
        update(world, case_id, body=f'<p>Done? <a href="{url}">Tell us</a>.</p>')
    assert any("wrote page" in str(p) for p in refused.value.problems)
    with unit_of_work(factory) as session:
        assert session.scalars(select(Campaign.id)).all() == [1]  # the update was rolled back
