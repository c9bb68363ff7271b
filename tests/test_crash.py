"""Kill -9 a real `newsletter send` at random moments: nobody is lost, few get a second copy.

The sender records each message's outcome before its connection takes the next one, so a kill
leaves at most one accepted-but-unrecorded message per connection. Those rows stay `claimed` under
the dead process's lease; the test config makes the lease 2 seconds, and the restarted process
takes over the expired claims (after the queued ones), resending them with the same Message-ID.
"""

from __future__ import annotations

import random
import signal
import time
from collections import defaultdict
from email import message_from_bytes, policy
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from newsletter.clock import FrozenClock
from newsletter.db import unit_of_work
from newsletter.db.models import Campaign, CampaignKind, CampaignStatus, Delivery
from tests.sender_cli import NewsletterCli, wait_until
from tests.smtp_faults import Fault, FaultyHandler, faulty_smtpd
from tests.test_send import seed

RECIPIENTS = 3000
POOL_SIZE = 4
KILLS = 5
LEASE_SECONDS = 2


def sender_config(database_url: str, port: int) -> str:
    return (
        f"[database]\nurl = '{database_url}'\n"
        f"[smtp]\nhost = '127.0.0.1'\nport = {port}\npool_size = {POOL_SIZE}\n"
        f"batch_size = 100\nlease_seconds = {LEASE_SECONDS}\n"
    )


def campaign_status(factory: sessionmaker[Session], cid: int) -> str:
    with unit_of_work(factory) as session:
        return str(session.scalar(select(Campaign.status).where(Campaign.id == cid)))


def test_kill_9_at_random_moments_loses_nobody_and_duplicates_only_in_flight_mail(
    tmp_path: Path, factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """SIGKILL mid-send, restart: everyone gets mail, duplicates ≤ connections × kills, same ID."""
    cid = seed(factory, clock, RECIPIENTS)
    handler = FaultyHandler()
    rng = random.Random(20261123)
    with faulty_smtpd(handler) as port:
        cli = NewsletterCli(tmp_path, sender_config(database_url, port))
        for kill in range(KILLS):
            before = len(handler.received)
            proc = cli.start("send")
            try:
                if kill == 0:  # once during start-up or the first claim, before much is sent
                    time.sleep(rng.uniform(0.3, 1.2))
                else:  # then after a random number of further messages
                    target = before + rng.randint(20, RECIPIENTS // (KILLS + 2))
                    assert wait_until(
                        lambda t=target, p=proc: len(handler.received) >= t or p.poll() is not None,
                        seconds=60,
                    ), "the sender made no progress"
                    time.sleep(rng.uniform(0, 0.02))
                assert proc.poll() is None, f"sender finished before kill {kill + 1}"
                proc.send_signal(signal.SIGKILL)
            finally:
                proc.kill()
                proc.wait(timeout=30)
            assert proc.returncode == -signal.SIGKILL
        killed_at = len(handler.received)
        # Run to completion; a run may end while dead claims are still under lease, so repeat
        # (bounded) until the campaign is finished, each run taking over the expired claims.
        for _attempt in range(10):
            cli.run("send")
            if campaign_status(factory, cid) == CampaignStatus.FINISHED:
                break
            time.sleep(LEASE_SECONDS)
    assert 0 < killed_at < RECIPIENTS
    assert campaign_status(factory, cid) == CampaignStatus.FINISHED
    with unit_of_work(factory) as session:
        rows = session.execute(select(Delivery.status, Delivery.subscriber_id)).all()
    assert len(rows) == RECIPIENTS and {str(status) for status, _ in rows} == {"sent"}

    copies: dict[str, list[str]] = defaultdict(list)
    for _sender, rcpts, raw in handler.received:
        msg = message_from_bytes(raw, policy=policy.default)
        copies[rcpts[0]].append(str(msg["Message-ID"]))
    assert set(copies) == {f"person{i}@example.net" for i in range(RECIPIENTS)}
    duplicates = len(handler.received) - len(copies)
    assert duplicates <= POOL_SIZE * KILLS, f"{duplicates} second copies after {KILLS} kills"
    twice = {rcpt: ids for rcpt, ids in copies.items() if len(ids) > 1}
    assert all(len(set(ids)) == 1 for ids in twice.values()), twice


def test_kill_9_mid_alert_then_a_new_sender_sends_every_message_within_a_minute(
    tmp_path: Path, factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """With the default lease, a sender restarted on the same host takes the dead one's claims.

    The relay is slow, so the kill lands while the alert's first batch is in flight; the new
    `newsletter send` puts the dead process's claims back at once instead of waiting for their
    lease, and everyone has the alert within a minute of the kill.
    """
    recipients, pool = 300, 4
    cid = seed(factory, clock, recipients)
    with unit_of_work(factory) as session:
        session.execute(update(Campaign).values(kind=CampaignKind.ALERT))
    handler = FaultyHandler([Fault("DATA", stall_seconds=0.05)])
    with faulty_smtpd(handler) as port:
        config = (  # no lease_seconds: the default
            f"[database]\nurl = '{database_url}'\n"
            f"[smtp]\nhost = '127.0.0.1'\nport = {port}\npool_size = {pool}\nbatch_size = 100\n"
        )
        cli = NewsletterCli(tmp_path, config)
        proc = cli.start("send")
        try:
            assert wait_until(lambda: len(handler.received) >= 20, seconds=60), "no mail flowed"
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait(timeout=30)
        killed, at_kill = time.monotonic(), len(handler.received)
        cli.run("send", timeout=60)
        took = time.monotonic() - killed
    assert at_kill < recipients and proc.returncode == -signal.SIGKILL
    assert took < 60, f"the alert took {took:.0f}s after the kill"
    assert campaign_status(factory, cid) == CampaignStatus.FINISHED
    copies: dict[str, set[str]] = defaultdict(set)
    for _sender, rcpts, raw in handler.received:
        copies[rcpts[0]].add(str(message_from_bytes(raw, policy=policy.default)["Message-ID"]))
    assert set(copies) == {f"person{i}@example.net" for i in range(recipients)}
    assert len(handler.received) - recipients <= pool  # at most one in flight per connection
    assert all(len(ids) == 1 for ids in copies.values())  # a second copy keeps its Message-ID
