"""Pause, resume and cancel from a second process while a real `newsletter send` is sending.

The SMTP server holds each message for STALL seconds before accepting it, so a sender with POOL
connections can deliver at most POOL / STALL messages a second: that ceiling turns "stops within
about a second" into a count, with no clock in the assertion.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from newsletter.clock import FrozenClock
from newsletter.db import unit_of_work
from newsletter.db.models import Campaign, Delivery
from tests.sender_cli import NewsletterCli, wait_until, wait_until_still
from tests.smtp_faults import Fault, FaultyHandler, faulty_smtpd
from tests.test_send import seed

RECIPIENTS = 600
POOL = 4
STALL = 0.03
MAX_PER_SECOND = POOL / STALL
BATCH = 200  # 1.5 s of mail at most speed: a pause must stop the sender mid-batch


def sender_config(database_url: str, port: int) -> str:
    return (
        f"[database]\nurl = '{database_url}'\n"
        f"[smtp]\nhost = '127.0.0.1'\nport = {port}\npool_size = {POOL}\nbatch_size = {BATCH}\n"
    )


def state(factory: sessionmaker[Session], cid: int) -> tuple[str, Counter[str]]:
    """The campaign's status and its deliveries by status."""
    with unit_of_work(factory) as session:
        status = str(session.scalar(select(Campaign.status).where(Campaign.id == cid)))
        rows = session.scalars(select(Delivery.status).where(Delivery.campaign_id == cid))
        return status, Counter(str(s) for s in rows)


def stop_mid_send(cli: NewsletterCli, handler: FaultyHandler, cid: int, verb: str) -> int:
    """Start a sender, `campaigns VERB` it from another process once mail flows; returns count.

    The count is what the server had received once it stopped growing; the sender must then
    exit by itself, having released what it had claimed but not sent.
    """
    sender = cli.start("send")
    try:
        assert wait_until(lambda: len(handler.received) >= 60, seconds=60), "no mail flowed"
        cli.run("campaigns", verb, str(cid))
        at_stop = len(handler.received)
        settled = wait_until_still(lambda: len(handler.received), quiet=1.0, seconds=10)
        assert settled is not None, f"mail kept flowing after `campaigns {verb}`"
        # Within a second (the sender re-reads states every 0.5 s) no message starts; the ones
        # in flight, one per connection, finish. Fewer than a batch: it stopped mid-batch.
        assert settled - at_stop <= MAX_PER_SECOND + POOL < BATCH, (at_stop, settled)
        assert sender.wait(timeout=30) == 0
    finally:
        sender.kill()
        sender.wait(timeout=30)
    assert settled < RECIPIENTS and len(handler.received) == settled
    return settled


def recipients(handler: FaultyHandler) -> Counter[str]:
    return Counter(rcpts[0] for _sender, rcpts, _raw in handler.received)


def test_pause_stops_claims_and_resume_sends_only_the_rest(
    tmp_path: Path, factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """Pause from another process stops the sender within a second; resume sends each once."""
    cid = seed(factory, clock, RECIPIENTS)
    handler = FaultyHandler([Fault("DATA", stall_seconds=STALL)])
    with faulty_smtpd(handler) as port:
        cli = NewsletterCli(tmp_path, sender_config(database_url, port))
        sent = stop_mid_send(cli, handler, cid, "pause")
        status, counts = state(factory, cid)
        assert (status, counts) == ("paused", Counter(sent=sent, queued=RECIPIENTS - sent))
        cli.run("send")  # a paused campaign is not claimed
        assert len(handler.received) == sent and state(factory, cid)[1]["sent"] == sent
        cli.run("campaigns", "resume", str(cid))
        cli.run("send")
    assert state(factory, cid) == ("finished", Counter(sent=RECIPIENTS))
    got = recipients(handler)
    assert len(got) == RECIPIENTS and set(got.values()) == {1}


def test_cancel_stops_the_sender_and_keeps_an_honest_record(
    tmp_path: Path, factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """Cancel stops sending for good; every delivery row stays, marked as what really happened."""
    cid = seed(factory, clock, RECIPIENTS)
    handler = FaultyHandler([Fault("DATA", stall_seconds=STALL)])
    with faulty_smtpd(handler) as port:
        cli = NewsletterCli(tmp_path, sender_config(database_url, port))
        sent = stop_mid_send(cli, handler, cid, "cancel")
        after_cancel = state(factory, cid)
        assert after_cancel == ("cancelled", Counter(sent=sent, queued=RECIPIENTS - sent))
        cli.run("send")  # nor is a cancelled one
        shown = cli.run("campaigns", "show", str(cid))
    assert state(factory, cid) == after_cancel and len(handler.received) == sent
    assert "cancelled" in shown and str(sent) in shown
    got = recipients(handler)
    assert len(got) == sent and set(got.values()) == {1}
