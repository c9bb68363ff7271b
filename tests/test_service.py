"""The service that runs itself: a day of polling, digest and alert, a restart, two processes."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from newsletter.clock import FrozenClock
from newsletter.config import FeedSource
from newsletter.db import unit_of_work
from newsletter.db.queries import claim_batch, load_claimed, release_claims
from newsletter.devsmtp import free_port
from newsletter.importer import import_rows
from newsletter.lists import read_lists, sync_lists
from newsletter.schedule import Scheduler
from newsletter.service import Service, keep_sending
from newsletter.subscriber_csv import read_csv
from tests.builders import deliver
from tests.conftest import SECRET, FeedHttp, SmtpServer, make_settings, rss
from tests.sender_cli import wait_until

ROOT = Path(__file__).resolve().parents[1]
MONDAY_8_MINSK = datetime(2026, 11, 30, 5, 0, tzinfo=UTC)


def people(factory: sessionmaker[Session], clock: FrozenClock, extra: int) -> None:
    """The example lists and people, plus `extra` made-up digest readers for a longer digest."""
    rows = [
        (n, {"email": f"reader{n}@example.org", "lists": "weekly-digest"}, "") for n in range(extra)
    ]
    with unit_of_work(factory) as session:
        sync_lists(session=session, specs=read_lists(ROOT / "subscribers" / "lists.toml"))
        for source in (read_csv(ROOT / "subscribers" / "example.csv"), iter(rows)):
            import_rows(
                session=session,
                rows=source,
                default_list=None,
                confirmed=True,  # type: ignore[arg-type]
                secret=SECRET,
                now=clock.now(),
                actor="test",
            )


def item(n: int, when: datetime, *, urgent: bool = False) -> dict[str, object]:
    return {
        "title": f"Item {n}",
        "link": f"https://portal.example.org/item-{n}",
        "guid": f"portal-{n}",
        "date": when,
        "categories": ["urgent-action"] if urgent else ["Viasna"],
    }


def test_a_day_of_the_service_with_a_restart(
    factory: sessionmaker[Session], database_url: str, smtpd: SmtpServer, feed_http: FeedHttp
) -> None:
    """Poll, digest at nine, an urgent alert overtakes the digest, a restart sends nothing twice."""
    clock = FrozenClock(MONDAY_8_MINSK)
    base = make_settings(database_url, smtpd)
    settings = replace(
        base,
        sources=replace(base.sources, feeds=(FeedSource(url=f"{feed_http.base}/feed"),)),
        alerts=replace(base.alerts, mode="auto"),
        smtp=replace(base.smtp, batch_size=5, pool_size=2),
    )
    people(factory, clock, extra=30)
    yesterday = clock.now() - timedelta(days=1)
    feed_http.documents["/feed"] = rss([item(n, yesterday) for n in range(3)])
    scheduler = Scheduler(factory=factory, settings=settings, clock=clock, holder="one")
    assert [r.new for r in scheduler.poll_sources()] == [3]
    assert scheduler.run_digests() == []  # eight o'clock: not yet

    clock.advance(hours=1, seconds=10)
    [digest_id] = scheduler.run_digests()  # nine: the digest is queued for 39 readers
    feed_http.documents["/feed"] = rss(
        [item(n, yesterday) for n in range(3)] + [item(9, clock.now(), urgent=True)]
    )
    clock.advance(minutes=10)
    scheduler.poll_sources()  # the urgent item arrives while the digest waits to be sent
    report = deliver(factory, settings, clock)
    messages = smtpd.messages()
    kinds = ["alert" if "urgent-actions" in str(m["List-Id"]) else "digest" for m in messages]
    # Claims take alerts first: the 8 alert messages fill the first two batches of 5 (inside a
    # batch, messages go out concurrently, so the second batch's 2 digest ones may come between).
    assert kinds[:5] == ["alert"] * 5 and kinds[:10].count("alert") == 8
    assert Counter(kinds) == {"digest": 39, "alert": 8}
    assert report.sent == 47 and digest_id in report.finished

    restarted = Scheduler(factory=factory, settings=settings, clock=clock, holder="two")
    clock.advance(minutes=10)
    restarted.poll_sources()
    assert restarted.run_digests() == []
    assert deliver(factory, settings, clock).sent == 0
    per_person = Counter((str(m["X-Delivered-To"]), str(m["List-Id"])) for m in smtpd.messages())
    assert set(per_person.values()) == {1}


def test_alerts_are_claimed_before_the_rest_of_a_digest(
    factory: sessionmaker[Session], database_url: str, clock: FrozenClock
) -> None:
    """With a digest half-claimed, the next claim takes the new alert's deliveries first."""
    from newsletter.assemble import assemble_alert, assemble_digest
    from newsletter.enqueue import launch_campaign
    from tests.test_flow import ingest

    settings = replace(
        make_settings(database_url), smtp=replace(make_settings(database_url).smtp, batch_size=4)
    )
    people(factory, clock, extra=20)
    ingest(factory, clock)
    with unit_of_work(factory) as session:
        digest = assemble_digest(
            session=session, list_slug="weekly-digest", now=clock.now(), actor="t"
        )
        assert digest is not None
        launch_campaign(
            session=session, campaign=digest, settings=settings, now=clock.now(), actor="t"
        )
        first = claim_batch(session, now=clock.now(), lease_seconds=60, limit=4, campaign_id=None)
        alert, _ = assemble_alert(
            session=session,
            list_slug="urgent-actions",
            now=clock.now(),
            actor="t",
            item_ref="https://portal.example.org/?p=1221",
        )
        launch_campaign(
            session=session, campaign=alert, settings=settings, now=clock.now(), actor="t"
        )
        second = claim_batch(
            session, now=clock.now(), lease_seconds=60, limit=8, campaign_id=None, worker="w"
        )
        from newsletter.db.models import Delivery

        campaigns = {session.get(Delivery, i).campaign_id for i in second}
        assert len(first) == 4 and campaigns == {alert.id}
        # A claim that takes the alert's rest and digest rows lists the alert's first, though
        # the digest's rows are older (smaller ids); the rows read for sending keep that order.
        assert release_claims(session, second[:3], worker="w") == 3
        third = claim_batch(session, now=clock.now(), lease_seconds=60, limit=7, campaign_id=None)
        kinds = [session.get(Delivery, i).campaign_id for i in third]
        assert kinds == [alert.id] * 3 + [digest.id] * 4 and min(third[3:]) < min(third[:3])
        assert [row.delivery_id for row in load_claimed(session, third)] == third


def wait_for(
    url: str,
    *,
    seconds: float = 30,
    expect: str | None = None,
    headers: dict[str, str] | None = None,
) -> str:
    """GET url until it answers (and contains `expect`), within a bounded time."""
    deadline = time.monotonic() + seconds
    last = ""
    while time.monotonic() < deadline:
        try:
            request = urllib.request.Request(url, headers=headers or {})
            with urllib.request.urlopen(request, timeout=2) as response:
                last = response.read().decode()
            if expect is None or expect in last:
                return last
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} did not answer {expect!r} in time; last: {last!r}")


def test_two_run_processes_one_scheduler_and_clean_takeover(
    tmp_path: Path, smtpd: SmtpServer, feed_http: FeedHttp, database_url: str
) -> None:
    """Two `newsletter run`: one schedules; the webhook ingests; on SIGTERM the other takes over."""
    hook_secret, metrics_token = "h" * 40, "m" * 40
    (tmp_path / "config.toml").write_text(
        f"[database]\nurl = '{database_url}'\n"
        f"[smtp]\nhost = '{smtpd.host}'\nport = {smtpd.port}\n"
        f"[sources]\nfeeds = [{{ url = '{feed_http.base}/feed' }}]\n"
        f"[alerts]\nmode = 'auto'\nwebhook_secret = '{hook_secret}'\n"
        "[schedule]\nlock_seconds = 3\nsend_interval_seconds = 1\n"
        f"[metrics]\ntoken = '{metrics_token}'\n"
    )
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")},
        "NEWSLETTER_SECRET": SECRET,
    }
    newsletter = [sys.executable, "-m", "newsletter"]
    subprocess.run([*newsletter, "init"], cwd=tmp_path, env=env, check=True, capture_output=True)
    subprocess.run(
        [
            *newsletter,
            "subscribers",
            "import",
            str(ROOT / "subscribers" / "example.csv"),
            "--confirmed",
        ],
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
    )
    feed_http.documents["/feed"] = rss([item(1, datetime.now(UTC) - timedelta(days=3))])
    ports = [free_port(), free_port()]
    procs: list[subprocess.Popen[str]] = []
    logs = contextlib.ExitStack()
    try:
        for port, expect in zip(ports, ('"scheduler":true', None), strict=True):
            # the first takes the schedule before the second starts
            procs.append(
                subprocess.Popen(
                    [*newsletter, "run", "--port", str(port)],
                    cwd=tmp_path,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=logs.enter_context((tmp_path / f"run-{port}.log").open("w")),
                    text=True,
                )
            )
            wait_for(f"http://127.0.0.1:{port}/healthz", expect=expect)
        for _ in range(10):  # over three lease periods, never both, never the second
            states = [
                json.loads(wait_for(f"http://127.0.0.1:{p}/healthz"))["scheduler"] for p in ports
            ]
            assert states == [True, False]
            time.sleep(0.5)

        feed_http.documents["/feed"] = rss(
            [
                item(1, datetime.now(UTC) - timedelta(days=3)),
                item(2, datetime.now(UTC), urgent=True),
            ]
        )
        hook = f"http://127.0.0.1:{ports[1]}/hooks/ingest"
        forged = urllib.request.Request(hook, method="POST", headers={"X-Newsletter-Secret": "x"})
        try:
            urllib.request.urlopen(forged, timeout=10)
            raise AssertionError("a forged webhook call was accepted")
        except urllib.error.HTTPError as e:
            assert e.code == 404
        request = urllib.request.Request(
            hook, method="POST", headers={"X-Newsletter-Secret": hook_secret}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            assert json.loads(response.read())["sources"][0]["new"] == 1
        deadline = time.monotonic() + 30
        while len(smtpd.messages()) < 8 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(smtpd.messages()) == 8  # the alert, to the urgent-actions list, once each
        metrics = wait_for(
            f"http://127.0.0.1:{ports[0]}/metrics",
            headers={"Authorization": f"Bearer {metrics_token}"},
        )
        assert 'newsletter_deliveries{kind="alert",status="sent"} 8' in metrics

        procs[0].send_signal(signal.SIGTERM)
        assert procs[0].wait(timeout=30) == 0
        wait_for(f"http://127.0.0.1:{ports[1]}/healthz", expect='"scheduler":true', seconds=20)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)
        logs.close()
    assert procs[1].returncode == 0
    assert len(smtpd.messages()) == 8


def test_sigterm_mid_send_stops_cleanly_and_loses_nothing(
    tmp_path: Path, database_url: str
) -> None:
    """SIGTERM while a digest sends: exit 0 soon, no claim left held, the rest sent later once."""
    from sqlalchemy import func, select

    from newsletter.db import make_engine, make_sessionmaker
    from newsletter.db.models import Delivery, DeliveryStatus
    from tests.smtp_faults import Fault, FaultyHandler, faulty_smtpd

    handler = FaultyHandler(faults=[Fault("DATA", stall_seconds=0.02)])  # a slow relay
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")},
        "NEWSLETTER_SECRET": SECRET,
    }
    newsletter = [sys.executable, "-m", "newsletter"]
    with faulty_smtpd(handler) as smtp_port:
        (tmp_path / "config.toml").write_text(
            f"[database]\nurl = '{database_url}'\n[smtp]\nport = {smtp_port}\nbatch_size = 20\n"
            "[schedule]\nsend_interval_seconds = 1\n"
        )
        rows = "email,lists\n" + "".join(f"r{n}@example.org,weekly-digest\n" for n in range(400))
        (tmp_path / "people.csv").write_text(rows)
        for args in (
            ["init"],
            ["subscribers", "import", "people.csv", "--confirmed"],
            ["ingest", str(ROOT / "newsletter" / "data" / "portal-feed.xml")],
            ["digest", "send", "--queue-only"],
        ):
            subprocess.run(
                [*newsletter, *args], cwd=tmp_path, env=env, check=True, capture_output=True
            )
        with (tmp_path / "run.log").open("w") as log:
            run = subprocess.Popen(
                [*newsletter, "run", "--port", str(free_port())],
                cwd=tmp_path,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
            deadline = time.monotonic() + 60
            while len(handler.received) < 40 and time.monotonic() < deadline:
                time.sleep(0.05)
            run.send_signal(signal.SIGTERM)
            assert run.wait(timeout=30) == 0
        engine = make_engine(database_url)
        with make_sessionmaker(engine)() as session:
            statuses = dict(
                session.execute(
                    select(Delivery.status, func.count()).group_by(Delivery.status)
                ).all()
            )
        engine.dispose()
        assert DeliveryStatus.CLAIMED not in statuses  # every claim released or recorded
        assert statuses.get(DeliveryStatus.SENT) == len(handler.received) < 400
        subprocess.run(
            [*newsletter, "send"], cwd=tmp_path, env=env, check=True, capture_output=True
        )
    received = Counter(to for _sender, tos, _raw in handler.received for to in tos)
    assert len(received) == 400 and set(received.values()) == {1}


# --- the send loop of `newsletter run`: one pool, its hourly cap kept across rounds and restarts


def second_campaign(factory: sessionmaker[Session], clock: FrozenClock, *, rendered: bool) -> int:
    """Another running campaign to the list tests.test_send.seed made, queued for everyone."""
    from sqlalchemy import select

    from newsletter.audience import enqueue_audience
    from newsletter.db.models import Campaign, MailingList, Variant
    from tests.test_send import HTML, TEXT

    with unit_of_work(factory) as session:
        ml = session.scalars(select(MailingList)).one()
        campaign = Campaign(
            kind="digest", list_id=ml.id, dedupe_key="second", created_at=clock.now()
        )
        campaign.status = "running"
        session.add(campaign)
        session.flush()
        for lang in ("en", "ru") if rendered else ():
            session.add(
                Variant(campaign_id=campaign.id, lang=lang, subject="Second", html=HTML, text=TEXT)
            )
        enqueue_audience(session, campaign=campaign, now=clock.now())
        return campaign.id


def claimed(factory: sessionmaker[Session]) -> int:
    from sqlalchemy import func, select

    from newsletter.db.models import Delivery, DeliveryStatus

    with unit_of_work(factory) as session:
        stmt = select(func.count()).where(Delivery.status == DeliveryStatus.CLAIMED)
        return int(session.scalar(stmt) or 0)


def holds_for(predicate: Callable[[], bool], *, quiet: float, seconds: float) -> bool:
    """Whether the predicate comes to hold and keeps holding for `quiet` seconds, in time."""
    deadline, since = time.monotonic() + seconds, None
    while time.monotonic() < deadline:
        if not predicate():
            since = None
        elif since is None:
            since = time.monotonic()
        elif time.monotonic() - since >= quiet:
            return True
        time.sleep(0.05)
    return False


@contextlib.contextmanager
def send_loop(service: Service) -> Iterator[None]:
    """The send loop of `newsletter run` (keep_sending) in a thread, stopped as SIGTERM does."""
    import asyncio
    import threading

    loop = asyncio.new_event_loop()
    task = loop.create_task(keep_sending(service))
    thread = threading.Thread(target=loop.run_until_complete, args=(task,))
    thread.start()
    try:
        yield
    finally:

        def stop() -> None:
            service.stop.set()
            service.control.request_stop()

        loop.call_soon_threadsafe(stop)
        thread.join(timeout=60)
        assert not thread.is_alive(), "the send loop did not stop"
        loop.close()
    task.result()


def service_for(database_url: str, port: int, clock: FrozenClock, **smtp: object) -> Service:
    from newsletter.db import make_engine, make_sessionmaker
    from tests.test_send import settings_for

    settings = settings_for(database_url, port, **smtp)
    settings = replace(settings, schedule=replace(settings.schedule, send_interval_seconds=1))
    engine = make_engine(database_url)
    return Service(settings=settings, engine=engine, factory=make_sessionmaker(engine), clock=clock)


def test_two_campaigns_under_run_never_pass_the_hourly_cap_nor_after_a_restart(
    factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """Rounds of `newsletter run` share one relay's hourly cap; a new service counts it too.

    A relay takes 6 an hour. The first campaign (4) goes out; the second (4) then gets 2, and
    its other 2 wait, claimed, for the cap. After a restart on the same database they still
    wait: the new service counted the last hour's sends from the database.
    """
    from tests.smtp_faults import FaultyHandler, faulty_smtpd
    from tests.test_send import seed

    first = seed(factory, clock, 4)
    handler = FaultyHandler()
    with faulty_smtpd(handler) as port:
        service = service_for(database_url, port, clock, hourly_limit=6)
        with send_loop(service):
            assert wait_until(lambda: len(handler.received) == 4, seconds=30)
            assert wait_until(lambda: campaign_state(factory, first) == "finished", seconds=30)
            second = second_campaign(factory, clock, rendered=True)
            waiting = holds_for(
                lambda: len(handler.received) == 6 and claimed(factory) == 2, quiet=1, seconds=30
            )
            assert waiting, f"{len(handler.received)} sent through a relay that takes 6 an hour"
        assert claimed(factory) == 0  # the stop released the two that waited
        restarted = service_for(database_url, port, clock, hourly_limit=6)
        with send_loop(restarted):
            waiting = holds_for(
                lambda: len(handler.received) == 6 and claimed(factory) == 2, quiet=1, seconds=30
            )
            assert waiting, f"after a restart, {len(handler.received)} sent; the cap is 6"
        service.engine.dispose()
        restarted.engine.dispose()
    assert len(handler.received) == 6
    assert campaign_state(factory, second) == "running"


def test_a_campaign_without_a_variant_is_paused_once_and_the_others_still_go(
    factory: sessionmaker[Session],
    clock: FrozenClock,
    database_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`newsletter run` pauses a campaign it cannot build, says so in one line, sends the rest."""
    from sqlalchemy import delete

    from newsletter.db.models import Variant
    from tests.smtp_faults import FaultyHandler, faulty_smtpd
    from tests.test_send import seed

    broken = seed(factory, clock, 3)
    with unit_of_work(factory) as session:
        session.execute(delete(Variant).where(Variant.campaign_id == broken))
    fine = second_campaign(factory, clock, rendered=True)
    handler = FaultyHandler()
    caplog.set_level(logging.INFO, logger="newsletter")
    with faulty_smtpd(handler) as port:
        service = service_for(database_url, port, clock)
        with send_loop(service):
            assert wait_until(lambda: campaign_state(factory, fine) == "finished", seconds=30)
            time.sleep(2)  # two more rounds of the loop: nothing more is said about it
        service.engine.dispose()
    assert len(handler.received) == 3 and campaign_state(factory, broken) == "paused"
    about = [r for r in caplog.records if f"campaign {broken}" in r.getMessage()]
    assert len(about) == 1 and about[0].levelno == logging.WARNING, about
    assert "no rendered variant" in about[0].getMessage()
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    with unit_of_work(factory) as session:
        from newsletter.db.models import Campaign

        paused = session.get(Campaign, broken)
        assert paused is not None and "campaigns resume" in paused.pause_reason


def campaign_state(factory: sessionmaker[Session], cid: int) -> str:
    from sqlalchemy import select

    from newsletter.db.models import Campaign

    with unit_of_work(factory) as session:
        return str(session.scalar(select(Campaign.status).where(Campaign.id == cid)))
