"""`newsletter send --workers N`: real worker processes sharing one campaign through the database.

PostgreSQL keeps the workers apart with `FOR UPDATE SKIP LOCKED`, SQLite with its write lock (WAL
and a busy timeout). Each worker records a message's outcome before its connection takes the
next one, so a worker killed with SIGKILL leaves at most one accepted-but-unrecorded message per
connection; its claims come back when their (here 2-second) lease runs out.
"""

from __future__ import annotations

import os
import signal
import time
from collections import defaultdict
from email import message_from_bytes, policy
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from newsletter.clock import FrozenClock
from newsletter.db import unit_of_work
from newsletter.db.models import Campaign, CampaignStatus, Delivery
from tests.sender_cli import NewsletterCli, wait_until
from tests.smtp_faults import FaultyHandler, faulty_smtpd
from tests.test_send import seed

RECIPIENTS = 1200
POOL_SIZE = 2
LEASE_SECONDS = 2


class PeerHandler(FaultyHandler):
    """Also notes which client connection delivered each message."""

    peers: set[tuple[str, int]]

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.peers.add(tuple(session.peer))
        return str(await super().handle_DATA(server, session, envelope))


def worker_config(database_url: str, port: int) -> str:
    return (
        f"[database]\nurl = '{database_url}'\n"
        f"[smtp]\nhost = '127.0.0.1'\nport = {port}\npool_size = {POOL_SIZE}\n"
        f"batch_size = 40\nlease_seconds = {LEASE_SECONDS}\n"
    )


def copies_by_recipient(handler: FaultyHandler) -> dict[str, list[str]]:
    """Message-IDs each recipient received, in arrival order."""
    copies: dict[str, list[str]] = defaultdict(list)
    for _sender, rcpts, raw in list(handler.received):
        message = message_from_bytes(raw, policy=policy.default)
        copies[rcpts[0]].append(str(message["Message-ID"]))
    return copies


def statuses(factory: sessionmaker[Session]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    with unit_of_work(factory) as session:
        for status in session.scalars(select(Delivery.status)):
            counts[str(status)] += 1
    return dict(counts)


def campaign_status(factory: sessionmaker[Session], cid: int) -> str:
    with unit_of_work(factory) as session:
        return str(session.scalar(select(Campaign.status).where(Campaign.id == cid)))


def everyone() -> set[str]:
    return {f"person{i}@example.net" for i in range(RECIPIENTS)}


def child_pids(pid: int) -> list[int]:
    """The worker processes a `newsletter send --workers N` parent started."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_three_workers_on_postgresql_send_each_recipient_exactly_one_message(
    tmp_path: Path, factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """Three worker processes share one campaign: everyone gets one message, the campaign ends."""
    cid = seed(factory, clock, RECIPIENTS)
    handler = PeerHandler()
    handler.peers = set()
    with faulty_smtpd(handler) as port:
        cli = NewsletterCli(tmp_path, worker_config(database_url, port))
        out = cli.run("send", "--workers", "3", timeout=60)
    copies = copies_by_recipient(handler)
    assert set(copies) == everyone()
    assert all(len(ids) == 1 for ids in copies.values())
    assert statuses(factory) == {"sent": RECIPIENTS}
    assert campaign_status(factory, cid) == CampaignStatus.FINISHED
    assert f"sent {RECIPIENTS}," in out  # the parent's summary adds up its workers
    # More connections delivered mail than one process opens: several workers took part.
    assert len(handler.peers) > POOL_SIZE


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_worker_killed_9_halfway_loses_nobody_and_duplicates_only_its_in_flight_mail(
    tmp_path: Path, factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """SIGKILL one of three workers halfway: all are sent, second copies ≤ its connections."""
    cid = seed(factory, clock, RECIPIENTS)
    handler = FaultyHandler()
    with faulty_smtpd(handler) as port:
        cli = NewsletterCli(tmp_path, worker_config(database_url, port))
        parent = cli.start("send", "--workers", "3")
        try:
            assert wait_until(lambda: len(child_pids(parent.pid)) == 3, seconds=30)
            victim = child_pids(parent.pid)[1]
            assert wait_until(lambda: len(handler.received) >= RECIPIENTS // 2, seconds=60)
            os.kill(victim, signal.SIGKILL)
            parent.wait(timeout=60)
        finally:
            if parent.poll() is None:
                parent.kill()
                parent.wait(timeout=30)
        assert parent.returncode != 0  # the parent says a worker failed
        assert f"exited {-signal.SIGKILL}" in (tmp_path / "01-send.log").read_text()
        # The killed worker's claims come back after their lease; a plain run sends the rest.
        for _attempt in range(10):
            if campaign_status(factory, cid) == CampaignStatus.FINISHED:
                break
            time.sleep(LEASE_SECONDS)
            cli.run("send")
    assert campaign_status(factory, cid) == CampaignStatus.FINISHED
    assert statuses(factory) == {"sent": RECIPIENTS}
    copies = copies_by_recipient(handler)
    assert set(copies) == everyone()
    duplicates = len(handler.received) - len(copies)
    assert duplicates <= POOL_SIZE, f"{duplicates} second copies from one killed worker"
    assert all(len(set(ids)) == 1 for ids in copies.values())  # a resend keeps its Message-ID


def test_two_workers_on_sqlite_send_exactly_once_without_locking_errors(
    tmp_path: Path, sqlite_url: str, clock: FrozenClock
) -> None:
    """Two workers on one SQLite file (WAL, busy timeout): exactly once, no "database is locked"."""
    from newsletter.db import make_engine, make_sessionmaker, migrate

    engine = make_engine(sqlite_url)
    migrate(engine)
    factory = make_sessionmaker(engine)
    try:
        cid = seed(factory, clock, RECIPIENTS)
        handler = FaultyHandler()
        with faulty_smtpd(handler) as port:
            cli = NewsletterCli(tmp_path, worker_config(sqlite_url, port))
            cli.run("send", "--workers", "2", timeout=60)
        logs = "".join(p.read_text() for p in tmp_path.glob("*.log"))
        assert "locked" not in logs
        copies = copies_by_recipient(handler)
        assert set(copies) == everyone()
        assert all(len(ids) == 1 for ids in copies.values())
        assert statuses(factory) == {"sent": RECIPIENTS}
        assert campaign_status(factory, cid) == CampaignStatus.FINISHED
    finally:
        engine.dispose()


@pytest.mark.parametrize("count", [1, 2, 3, 5])
@pytest.mark.parametrize("limit", [0, 1, 2, 7, 100])
def test_worker_shares_of_an_hourly_cap_add_up_and_none_is_left_uncapped(
    limit: int, count: int
) -> None:
    """Each worker's share of a cap is at least 1 and the shares add up to the cap, or refused."""
    from dataclasses import replace

    from newsletter.cli.workers import check_shares, share_of
    from newsletter.config import Settings
    from newsletter.errors import ConfigError

    settings = Settings()
    settings = replace(settings, smtp=replace(settings.smtp, hourly_limit=limit))
    if 0 < limit < count:
        with pytest.raises(ConfigError, match="use at most"):
            check_shares(settings, count)
        return
    check_shares(settings, count)
    parts = [share_of(settings, i, count).smtp.hourly_limit for i in range(count)]
    assert sum(parts) == limit
    assert all(p > 0 for p in parts) or limit == 0


def test_send_with_more_workers_than_an_hourly_cap_is_refused_in_one_line(
    tmp_path: Path,
) -> None:
    """`send --workers 2` with hourly_limit = 1 stops before sending (a 0 share means no cap)."""
    from tests.test_cli import run

    (tmp_path / "config.toml").write_text(
        f"[database]\nurl = 'sqlite:///{tmp_path}/n.db'\n[smtp]\nhourly_limit = 1\n"
    )
    env = {"NEWSLETTER_SECRET": "s" * 40}
    run(["init"], tmp_path, env)
    result = run(["send", "--workers", "2"], tmp_path, env, ok=False)
    assert result.returncode != 0
    assert "use at most 1 workers" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_stray_line_on_a_workers_stdout_is_shown_and_the_send_goes_on(
    tmp_path: Path, sqlite_url: str, clock: FrozenClock
) -> None:
    """A worker that prints something else (here at start-up, through sitecustomize) does not
    stop the parent: the line reaches stderr made safe, everyone gets one message, exit 0."""
    from newsletter.db import make_engine, make_sessionmaker, migrate

    engine = make_engine(sqlite_url)
    migrate(engine)
    factory = make_sessionmaker(engine)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import sys\n"
        "if '--worker-of' in sys.argv:\n"
        "    print('not json \\x1b[31mred\\x1b[0m')\n"
        "    print('[1, 2]')\n"
        '    print(\'{"sent": "many"}\')\n'
    )
    try:
        seed(factory, clock, 100)
        handler = FaultyHandler()
        with faulty_smtpd(handler) as port:
            cli = NewsletterCli(tmp_path, worker_config(sqlite_url, port))
            cli.env["PYTHONPATH"] = os.pathsep.join(
                [str(site), *filter(None, [os.environ.get("PYTHONPATH")])]
            )
            out = cli.run("send", "--workers", "2", timeout=60)
        err = "".join(p.read_text() for p in tmp_path.glob("*-send.log"))
        assert "sent 100," in out
        assert "worker #0: not json \\u001b[31mred\\u001b[0m" in err
        assert "worker #1: [1, 2]" in err
        assert 'worker #1: {"sent": "many"}' in err
        assert "\x1b" not in err
        assert set(copies_by_recipient(handler)) == {f"person{i}@example.net" for i in range(100)}
    finally:
        engine.dispose()


def test_a_workers_report_reads_back_as_it_was_written_and_nothing_else_reads_as_one() -> None:
    """Every report survives its JSON line; lines of other shapes are not reports."""
    import json
    from dataclasses import asdict

    from newsletter.cli.workers import report_to_json, worker_report
    from newsletter.send import SendReport

    report = SendReport(sent=3, deferred=1, finished=[7], paused={8: "a burst"}, stopped=True)
    assert worker_report(report_to_json(report) + "\n") == (False, report)
    assert worker_report(json.dumps({"final": asdict(report)})) == (True, report)
    for line in [
        "",
        "null",
        "3",
        '"x"',
        "[]",
        '{"sent": true}',
        '{"sent": 1.5}',
        '{"x": 1}',
        '{"finished": ["1"]}',
        '{"paused": {"x": "y"}}',
        '{"paused": {"1": 2}}',
        '{"stopped": 1}',
        '{"final": 1}',
        '{"final": {"sent": "1"}}',
        "{" * 100_000,
        "[" * 100_000,
    ]:
        assert worker_report(line) is None, line
