"""campaigns: the state machine. Each change happens once; a second asks for the right state."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from newsletter.assemble import assemble_digest
from newsletter.campaigns import (
    cancel_campaign,
    finish_if_done,
    get_campaign,
    pause_campaign,
    resume_campaign,
    retry_campaign,
)
from newsletter.clock import FrozenClock
from newsletter.db import unit_of_work
from newsletter.db.models import CampaignStatus, Delivery, DeliveryStatus, Event
from newsletter.enqueue import launch_campaign
from newsletter.errors import CampaignError
from tests.conftest import make_settings
from tests.test_flow import prepare


def running(factory: sessionmaker[Session], clock: FrozenClock, database_url: str) -> int:
    """A launched weekly digest, its deliveries queued."""
    prepare(factory, clock)
    with unit_of_work(factory) as session:
        campaign = assemble_digest(
            session=session, list_slug="weekly-digest", now=clock.now(), actor="test"
        )
        assert campaign is not None
        launch_campaign(
            session=session,
            campaign=campaign,
            settings=make_settings(database_url),
            now=clock.now(),
            actor="test",
        )
        return campaign.id


def status(factory: sessionmaker[Session], cid: int) -> str:
    with unit_of_work(factory) as session:
        return get_campaign(session, cid).status


def actions(factory: sessionmaker[Session], prefix: str = "campaign.") -> list[str]:
    with unit_of_work(factory) as session:
        stmt = select(Event.action).where(Event.action.startswith(prefix)).order_by(Event.id)
        return list(session.scalars(stmt))


def set_deliveries(factory: sessionmaker[Session], cid: int, to: DeliveryStatus) -> None:
    with unit_of_work(factory) as session:
        session.execute(update(Delivery).where(Delivery.campaign_id == cid).values(status=to))


def test_pause_and_resume_each_happen_once(
    factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """Pause a running campaign, resume a paused one; the same change again is refused."""
    cid = running(factory, clock, database_url)
    steer: dict[str, Any] = {"campaign_id": cid, "now": clock.now(), "actor": "staff"}
    with unit_of_work(factory) as session:
        pause_campaign(session=session, reason="wrong link", **steer)
    assert status(factory, cid) == CampaignStatus.PAUSED
    with pytest.raises(CampaignError, match="not running"), unit_of_work(factory) as session:
        pause_campaign(session=session, reason="again", **steer)
    with unit_of_work(factory) as session:
        resume_campaign(session=session, **steer)
    assert status(factory, cid) == CampaignStatus.RUNNING
    with pytest.raises(CampaignError, match="not paused"), unit_of_work(factory) as session:
        resume_campaign(session=session, **steer)
    assert actions(factory)[-2:] == ["campaign.paused", "campaign.resumed"]
    assert actions(factory).count("campaign.paused") == 1


def test_finish_happens_once_and_only_when_nothing_is_pending(
    factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """While deliveries are queued nothing finishes; then exactly one call wins."""
    cid = running(factory, clock, database_url)
    with unit_of_work(factory) as session:
        assert not finish_if_done(session=session, campaign_id=cid, now=clock.now())
    set_deliveries(factory, cid, DeliveryStatus.SENT)
    with unit_of_work(factory) as session:
        assert finish_if_done(session=session, campaign_id=cid, now=clock.now())
        assert not finish_if_done(session=session, campaign_id=cid, now=clock.now())
    assert status(factory, cid) == CampaignStatus.FINISHED
    assert actions(factory).count("campaign.finished") == 1


def test_retry_requeues_only_the_failed_and_reopens_a_finished_campaign(
    factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """Failed deliveries go back to the queue once; a second retry finds none."""
    cid = running(factory, clock, database_url)
    set_deliveries(factory, cid, DeliveryStatus.FAILED)
    with unit_of_work(factory) as session:
        assert finish_if_done(session=session, campaign_id=cid, now=clock.now())
    steer: dict[str, Any] = {"campaign_id": cid, "now": clock.now(), "actor": "staff"}
    with unit_of_work(factory) as session:
        count = retry_campaign(session=session, **steer)
        queued = session.scalars(select(Delivery.status).where(Delivery.campaign_id == cid))
        assert count > 0 and set(queued) == {DeliveryStatus.QUEUED}
    assert status(factory, cid) == CampaignStatus.RUNNING
    with unit_of_work(factory) as session:
        assert retry_campaign(session=session, **steer) == 0
    with unit_of_work(factory) as session:
        [first, _second] = session.scalars(
            select(Event).where(Event.action == "campaign.retried").order_by(Event.id)
        )
    assert first.detail == {"campaign": cid, "requeued": count}


def test_cancel_happens_once_and_a_cancelled_campaign_stays_so(
    factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """Cancel is final: cancel, retry and resume of a cancelled campaign are refused."""
    cid = running(factory, clock, database_url)
    steer: dict[str, Any] = {"campaign_id": cid, "now": clock.now(), "actor": "staff"}
    with unit_of_work(factory) as session:
        cancel_campaign(session=session, **steer)
    assert status(factory, cid) == CampaignStatus.CANCELLED
    for step, match in (
        (cancel_campaign, "already cancelled"),
        (retry_campaign, "nothing is retried"),
        (resume_campaign, "not paused"),
    ):
        with pytest.raises(CampaignError, match=match), unit_of_work(factory) as session:
            step(session=session, **steer)
    assert status(factory, cid) == CampaignStatus.CANCELLED
    assert actions(factory).count("campaign.cancelled") == 1


def test_an_unknown_campaign_is_a_one_line_error(
    factory: sessionmaker[Session], clock: FrozenClock
) -> None:
    """Asking for a campaign that does not exist names it and where to look."""
    expected = "no campaign 42; see `newsletter campaigns list`"
    with pytest.raises(CampaignError, match=expected), unit_of_work(factory) as session:
        get_campaign(session, 42)
