"""The one gate: launch_campaign checks, queues each recipient once and records the start once.

Every edge that starts a campaign (the scheduler's digest, auto alerts, approval, the CLI's
digest and alert send) goes through it: a campaign the check refuses is queued by none of them,
unless forced, and then the override is in the events.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from newsletter.alerts import alerts_for_urgent_items, approve_alert
from newsletter.assemble import assemble_digest
from newsletter.check import FORCED, CheckError
from newsletter.clock import FrozenClock
from newsletter.config import Settings
from newsletter.db import unit_of_work
from newsletter.db.models import Campaign, CampaignStatus, Delivery, Event
from newsletter.enqueue import launch_campaign
from newsletter.errors import CampaignError
from newsletter.lists import get_list
from newsletter.schedule import Scheduler
from newsletter.subscriptions import subscribe
from tests.builders import deliver
from tests.conftest import SECRET, SmtpServer, make_settings
from tests.test_cli import SAMPLE_FEED, run
from tests.test_flow import ROOT, prepare, weekly_digest_people
from tests.test_schedule import MINSK_MONDAY_9, add_item, settings_for

ELSEWHERE = "elsewhere.example.org"  # the only host links may point at: the portal's are refused


def refusing(settings: Settings) -> Settings:
    """Settings whose check refuses every campaign made of the portal's items."""
    return replace(settings, check=replace(settings.check, allowed_link_hosts=(ELSEWHERE,)))


def deliveries(factory: sessionmaker[Session]) -> int:
    with unit_of_work(factory) as session:
        return int(session.scalar(select(func.count()).select_from(Delivery)) or 0)


def events(factory: sessionmaker[Session], action: str) -> list[Event]:
    with unit_of_work(factory) as session:
        return list(session.scalars(select(Event).where(Event.action == action)))


def test_enqueue_twice_creates_no_duplicates(
    factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """Starting the same campaign twice queues each recipient once and records the start once."""
    settings = make_settings(database_url)
    prepare(factory, clock)
    with unit_of_work(factory) as session:
        campaign = assemble_digest(
            session=session, list_slug="weekly-digest", now=clock.now(), actor="test"
        )
        assert campaign is not None
        first = launch_campaign(
            session=session, campaign=campaign, settings=settings, now=clock.now(), actor="test"
        )
        second = launch_campaign(
            session=session, campaign=campaign, settings=settings, now=clock.now(), actor="test"
        )
        total = session.scalar(select(func.count()).select_from(Delivery))
        campaign_id = campaign.id
    assert first == len(weekly_digest_people()) == total
    assert second == 0
    [started] = events(factory, "campaign.started")
    assert started.detail == {"campaign": campaign_id, "queued": first}


def test_launch_refuses_an_unchecked_campaign_unless_forced(
    factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """The check runs inside the gate: refused means nothing queued; force is audited once."""
    settings = refusing(make_settings(database_url))
    prepare(factory, clock)
    with unit_of_work(factory) as session:
        campaign = assemble_digest(
            session=session, list_slug="weekly-digest", now=clock.now(), actor="test"
        )
        assert campaign is not None
        with pytest.raises(CheckError, match="not in \\[check\\] allowed_link_hosts"):
            launch_campaign(
                session=session, campaign=campaign, settings=settings, now=clock.now(), actor="t"
            )
        assert campaign.status == CampaignStatus.DRAFT
        assert session.scalar(select(func.count()).select_from(Delivery)) == 0
        queued = launch_campaign(
            session=session,
            campaign=campaign,
            settings=settings,
            now=clock.now(),
            actor="staff",
            force=True,
        )
    assert queued == len(weekly_digest_people()) == deliveries(factory)
    [forced] = events(factory, FORCED)
    assert forced.actor == "staff" and forced.detail["campaign"] == campaign.id
    assert any("allowed_link_hosts" in line for line in forced.detail["problems"])
    assert len(events(factory, "campaign.started")) == 1


def test_scheduler_digest_refused_by_the_check_is_not_queued(
    factory: sessionmaker[Session], database_url: str
) -> None:
    """The scheduler's digest job goes through the gate: a refused digest leaves nothing behind."""
    clock = FrozenClock(MINSK_MONDAY_9)
    prepare(factory, clock)
    scheduler = Scheduler(
        factory=factory, settings=refusing(settings_for(database_url)), clock=clock, holder="a"
    )
    assert scheduler.run_digests() == []
    assert deliveries(factory) == 0
    assert "allowed_link_hosts" in scheduler.refusals["weekly-digest"]
    assert events(factory, "campaign.started") == []


def test_auto_alert_refused_by_the_check_is_held_then_approved_only_with_force(
    factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """Auto mode holds a refused alert; approve refuses it too, and --force is recorded."""
    settings = refusing(settings_for(database_url, mode="auto"))
    prepare(factory, clock)
    add_item(factory, "act-now", clock.now() - timedelta(hours=1), urgent=True)
    with unit_of_work(factory) as session:
        [alert] = alerts_for_urgent_items(session=session, settings=settings, now=clock.now())
        assert alert.status == CampaignStatus.DRAFT
        alert_id = alert.id
    assert deliveries(factory) == 0
    [held] = events(factory, "alert.held_by_check")
    # With the content hash of its item as held: approve refuses it if the feed rewrote it.
    assert held.detail["campaign"] == alert_id and len(held.detail["item_hashes"]) == 1

    def approve(session: Session, force: bool) -> int:
        return approve_alert(
            session=session,
            campaign_id=alert_id,
            settings=settings,
            now=clock.now(),
            actor="cli:staff",
            force=force,
        )

    with pytest.raises(CheckError), unit_of_work(factory) as session:
        approve(session, force=False)
    assert deliveries(factory) == 0 and events(factory, "alert.approved") == []
    with unit_of_work(factory) as session:
        queued = approve(session, force=True)
        assert session.get(Campaign, alert_id).approved_by == "cli:staff"  # type: ignore[union-attr]
    assert queued == deliveries(factory) > 0
    assert [e.actor for e in events(factory, FORCED)] == ["cli:staff"]
    assert len(events(factory, "alert.approved")) == len(events(factory, "campaign.started")) == 1


def test_an_approval_that_read_the_alert_before_another_committed_is_refused(
    factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """Three `alert approve 1` at once each read the alert as held before the first committed:
    all said approved, with 3 alert.approved and 3 campaign.started, approved_by the last.
    Now the row is locked before its status is read: the later ones are refused in one line."""
    settings = settings_for(database_url, mode="approve")
    prepare(factory, clock)
    add_item(factory, "act-now", clock.now() - timedelta(hours=1), urgent=True)
    with unit_of_work(factory) as session:
        [alert] = alerts_for_urgent_items(session=session, settings=settings, now=clock.now())
        alert_id = alert.id

    def approve(session: Session, actor: str) -> int:
        return approve_alert(
            session=session, campaign_id=alert_id, settings=settings, now=clock.now(), actor=actor
        )

    late = factory()
    try:
        held = late.get(Campaign, alert_id)  # kept: the session's copy stays as read
        assert held is not None and held.status == CampaignStatus.DRAFT
        with unit_of_work(factory) as session:
            queued = approve(session, "cli:first")
        with pytest.raises(CampaignError) as refused:
            approve(late, "cli:second")
        late.rollback()
    finally:
        late.close()
    assert "already approved by cli:first" in str(refused.value)
    assert "\n" not in str(refused.value)
    assert queued == deliveries(factory) > 0
    assert len(events(factory, "alert.approved")) == len(events(factory, "campaign.started")) == 1
    with unit_of_work(factory) as session:
        assert session.get(Campaign, alert_id).approved_by == "cli:first"  # type: ignore[union-attr]


def finished_digest(factory: sessionmaker[Session], clock: FrozenClock, settings: Settings) -> int:
    """A weekly digest, started and sent to everyone: finished."""
    prepare(factory, clock)
    with unit_of_work(factory) as session:
        campaign = assemble_digest(
            session=session, list_slug="weekly-digest", now=clock.now(), actor="test"
        )
        assert campaign is not None
        launch_campaign(
            session=session, campaign=campaign, settings=settings, now=clock.now(), actor="test"
        )
        campaign_id = campaign.id
    deliver(factory, settings, clock)
    with unit_of_work(factory) as session:
        assert session.get(Campaign, campaign_id).status == CampaignStatus.FINISHED  # type: ignore[union-attr]
    return campaign_id


def newcomer(factory: sessionmaker[Session], clock: FrozenClock) -> None:
    """Someone joins the weekly digest, as `subscribers add --confirmed` does."""
    with unit_of_work(factory) as session:
        subscribe(
            session=session,
            email="newcomer@example.org",
            lists=[get_list(session, "weekly-digest")],
            secret=SECRET,
            now=clock.now(),
            actor="test",
            confirmed=True,
        )


def test_a_finished_campaign_is_not_started_again(
    factory: sessionmaker[Session], clock: FrozenClock, database_url: str, smtpd: SmtpServer
) -> None:
    """A start after the end set the campaign running again and queued the old email to whoever
    joined since. Now a finished campaign is left as it is: nothing queued, nothing recorded."""
    settings = make_settings(database_url, smtpd)
    campaign_id = finished_digest(factory, clock, settings)
    sent = deliveries(factory)
    newcomer(factory, clock)
    with unit_of_work(factory) as session:
        campaign = session.get(Campaign, campaign_id)
        assert campaign is not None
        queued = launch_campaign(
            session=session, campaign=campaign, settings=settings, now=clock.now(), actor="late"
        )
    assert queued == 0 and deliveries(factory) == sent
    assert len(events(factory, "campaign.started")) == 1
    with unit_of_work(factory) as session:
        assert session.get(Campaign, campaign_id).status == CampaignStatus.FINISHED  # type: ignore[union-attr]


def test_a_start_that_read_the_campaign_before_it_finished_leaves_it_finished(
    factory: sessionmaker[Session], clock: FrozenClock, database_url: str, smtpd: SmtpServer
) -> None:
    """A start reads the campaign unstarted; meanwhile another starts and finishes it. The
    conditional start allowed "finished" and set it running again; now it is refused."""
    settings = make_settings(database_url, smtpd)
    prepare(factory, clock)
    with unit_of_work(factory) as session:
        made = assemble_digest(
            session=session, list_slug="weekly-digest", now=clock.now(), actor="test"
        )
        assert made is not None
        campaign_id = made.id
    late = factory()
    try:
        stale = late.get(Campaign, campaign_id)
        assert stale is not None and stale.status == CampaignStatus.DRAFT
        with unit_of_work(factory) as session:
            campaign = session.get(Campaign, campaign_id)
            assert campaign is not None
            launch_campaign(
                session=session, campaign=campaign, settings=settings, now=clock.now(), actor="a"
            )
        deliver(factory, settings, clock)
        sent = deliveries(factory)
        newcomer(factory, clock)
        with pytest.raises(CampaignError) as refused:
            launch_campaign(
                session=late, campaign=stale, settings=settings, now=clock.now(), actor="late"
            )
        late.rollback()
    finally:
        late.close()
    assert "finished meanwhile; it is not started again" in str(refused.value)
    assert deliveries(factory) == sent
    assert len(events(factory, "campaign.started")) == 1
    with unit_of_work(factory) as session:
        assert session.get(Campaign, campaign_id).status == CampaignStatus.FINISHED  # type: ignore[union-attr]


def test_a_start_that_read_the_campaign_before_another_started_it_records_one_start(
    factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """Two starts read the campaign unstarted; the later one recorded a second campaign.started.
    Now it queues only whoever joined since, into the running campaign, and records nothing."""
    settings = make_settings(database_url)
    prepare(factory, clock)
    with unit_of_work(factory) as session:
        made = assemble_digest(
            session=session, list_slug="weekly-digest", now=clock.now(), actor="test"
        )
        assert made is not None
        campaign_id = made.id
    late = factory()
    try:
        stale = late.get(Campaign, campaign_id)
        assert stale is not None and stale.status == CampaignStatus.DRAFT
        with unit_of_work(factory) as session:
            campaign = session.get(Campaign, campaign_id)
            assert campaign is not None
            first = launch_campaign(
                session=session, campaign=campaign, settings=settings, now=clock.now(), actor="a"
            )
        newcomer(factory, clock)
        second = launch_campaign(
            session=late, campaign=stale, settings=settings, now=clock.now(), actor="b"
        )
        late.commit()
    finally:
        late.close()
    assert (first, second) == (len(weekly_digest_people()), 1)
    assert deliveries(factory) == first + 1
    assert [e.actor for e in events(factory, "campaign.started")] == ["a"]


def cli_config(tmp_path: Path, database_url: str) -> dict[str, str]:
    """A CLI config on the test database whose check refuses the sample feed's links."""
    (tmp_path / "config.toml").write_text(
        f"[database]\nurl = '{database_url}'\n[check]\nallowed_link_hosts = ['{ELSEWHERE}']\n"
    )
    return {"NEWSLETTER_SECRET": SECRET}


def urgent_guid() -> str:
    """The guid of the sample feed's urgent item."""
    feed = SAMPLE_FEED.read_text()
    start = feed.rfind("https://portal.example.org/?p=", 0, feed.index("urgent-action"))
    return feed[start : feed.index("<", start)]


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(["digest", "send", "--queue-only"], id="digest-send"),
        pytest.param(["alert", "send", "--item", "GUID", "--yes", "--queue-only"], id="alert-send"),
    ],
)
def test_cli_send_refused_by_the_check_queues_nothing_unless_forced(
    tmp_path: Path, factory: sessionmaker[Session], database_url: str, command: list[str]
) -> None:
    """`digest send` and `alert send` refuse with the problems; --force queues, audited once."""
    command = [urgent_guid() if arg == "GUID" else arg for arg in command]
    env = cli_config(tmp_path, database_url)
    run(["init"], tmp_path, env)
    csv = str(ROOT / "subscribers" / "example.csv")
    run(["subscribers", "import", csv, "--confirmed"], tmp_path, env)
    run(["ingest", str(SAMPLE_FEED)], tmp_path, env)
    refused = run(command, tmp_path, env, ok=False)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "refused:" in refused.stderr and "allowed_link_hosts" in refused.stderr
    assert deliveries(factory) == 0 and events(factory, "campaign.started") == []
    forced = run([*command, "--force"], tmp_path, env)
    assert "overridden:" in forced.stderr and "queued for" in forced.stdout
    assert deliveries(factory) > 0
    assert len(events(factory, FORCED)) == len(events(factory, "campaign.started")) == 1


def _reltuples(factory: sessionmaker[Session]) -> dict[str, float]:
    from sqlalchemy import text

    with unit_of_work(factory) as session:
        rows = session.execute(
            text(
                "SELECT relname, reltuples FROM pg_class WHERE oid IN (to_regclass('subscribers'),"
                " to_regclass('subscriptions'), to_regclass('deliveries'))"
            )
        )
        return {str(name): float(count) for name, count in rows}


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_large_queue_on_postgresql_leaves_statistics_its_claims_are_planned_by(
    factory: sessionmaker[Session], clock: FrozenClock
) -> None:
    """Queued in one transaction with a fresh import, 1,500 deliveries are counted at once (in
    that transaction): no claim is planned as if the tables were empty."""
    from tests.test_send import seed

    assert set(_reltuples(factory).values()) == {-1}  # never analysed
    seed(factory, clock, 1500)
    assert _reltuples(factory) == {"subscribers": 1500, "subscriptions": 1500, "deliveries": 1500}


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_small_queue_or_fresh_statistics_are_left_to_autovacuum(
    factory: sessionmaker[Session], clock: FrozenClock
) -> None:
    """Under 1,000 deliveries nothing is analysed; over, only tables whose counts are stale."""
    from newsletter.db.queries import refresh_statistics
    from tests.test_send import seed

    seed(factory, clock, 300)
    assert set(_reltuples(factory).values()) == {-1}
    with unit_of_work(factory) as session:
        assert refresh_statistics(session, added=999) == []
        stale = ["subscribers", "subscriptions", "deliveries"]
        assert refresh_statistics(session, added=1000) == stale
        assert refresh_statistics(session, added=1000) == stale  # 300 is still under 80% of it
        assert refresh_statistics(session, added=375) == []  # 300 is 80% of 375


def test_sqlite_plans_by_rule_and_is_never_analysed(sqlite_url: str, clock: FrozenClock) -> None:
    from newsletter.db import make_engine, make_sessionmaker, migrate
    from newsletter.db.queries import refresh_statistics

    engine = make_engine(sqlite_url)
    migrate(engine)
    try:
        with unit_of_work(make_sessionmaker(engine)) as session:
            assert refresh_statistics(session, added=10**6) == []
    finally:
        engine.dispose()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_statistics_held_by_a_vacuum_do_not_hold_the_launch(
    factory: sessionmaker[Session], clock: FrozenClock
) -> None:
    """ANALYZE waits for its lock 2 s at most (a wraparound VACUUM does not yield); then the
    launch goes on in the same transaction, with its lock time-out as it was."""
    import time

    from sqlalchemy import text

    from newsletter.db.queries import refresh_statistics
    from tests.test_send import seed

    seed(factory, clock, 10)
    with unit_of_work(factory) as vacuum:
        vacuum.execute(text("LOCK TABLE deliveries IN SHARE UPDATE EXCLUSIVE MODE"))
        with unit_of_work(factory) as session:
            started = time.monotonic()
            assert refresh_statistics(session, added=5000) == ["subscribers", "subscriptions"]
            assert 1.5 < time.monotonic() - started < 20
            assert session.scalar(text("SELECT current_setting('lock_timeout')")) == "0"
            assert session.scalar(select(func.count()).select_from(Delivery)) == 10
    assert _reltuples(factory) == {"subscribers": 10, "subscriptions": 10, "deliveries": -1}
