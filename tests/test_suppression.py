"""Suppression: a suppressed or forgotten address is refused at every way in, and at send time."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from newsletter.audience import audience_size
from newsletter.clock import FrozenClock
from newsletter.db import unit_of_work
from newsletter.db.models import Delivery, DeliveryStatus, Subscriber, SubscriberStatus, Suppression
from newsletter.ledger import suppress_bounced
from newsletter.lists import get_list, read_lists, sync_lists
from newsletter.subscriptions import SubscribeResult, confirm, forget, subscribe
from newsletter.suppression import (
    hash_address,
    is_suppressed,
    lift_suppression,
    suppress,
    suppressed_forms,
)
from tests.conftest import SECRET, SmtpServer, make_settings
from tests.test_audience import run_import
from tests.test_cli import run
from tests.test_flow import deliver
from tests.test_send import seed

ROOT = Path(__file__).resolve().parents[1]
NOW = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)


@pytest.fixture
def lists(factory: sessionmaker[Session]) -> sessionmaker[Session]:
    with unit_of_work(factory) as session:
        sync_lists(session=session, specs=read_lists(ROOT / "subscribers" / "lists.toml"))
    return factory


def add(factory: sessionmaker[Session], email: str, slug: str = "weekly-digest") -> SubscribeResult:
    """`subscribers add EMAIL --list SLUG --confirmed`, as a step."""
    with unit_of_work(factory) as session:
        return subscribe(
            session=session,
            email=email,
            lists=[get_list(session, slug)],
            secret=SECRET,
            now=NOW,
            actor="test",
            confirmed=True,
        )


def reach(factory: sessionmaker[Session]) -> int:
    with unit_of_work(factory) as session:
        return audience_size(session, get_list(session, "weekly-digest").id)


def bounce(factory: sessionmaker[Session], sid: int, email: str) -> None:
    """A mailbox refused for good, as the ledger records a 5xx or a hard bounce."""
    with unit_of_work(factory) as session:
        suppress_bounced(
            session, sid, email, settings=make_settings("sqlite://"), now=NOW, reply="550 gone"
        )


def test_the_hash_is_keyed_and_holds_no_address() -> None:
    """Another secret gives another hash; case and spaces around the address do not."""
    digest = hash_address("Ann@Example.org ", secret=SECRET)
    assert digest == hash_address("ann@example.org", secret=SECRET)
    assert digest != hash_address("ann@example.org", secret=SECRET + "2")
    assert len(digest) == 64 and "ann" not in digest


def test_suppress_covers_every_stored_form_once(factory: sessionmaker[Session]) -> None:
    """An IDN address is suppressed under its A-label and its Unicode form, and only once."""
    with unit_of_work(factory) as session:
        assert suppress(session, "ann@bücher.example", secret=SECRET, reason="test", now=NOW)
        assert not suppress(
            session, "ann@xn--bcher-kva.example", secret=SECRET, reason="test", now=NOW
        )
    with unit_of_work(factory) as session:
        assert session.scalar(select(func.count()).select_from(Suppression)) == 2
        assert is_suppressed(session, "ANN@xn--bcher-kva.example", secret=SECRET)
        assert is_suppressed(session, "ann@bücher.example", secret=SECRET)
        assert not is_suppressed(session, "bob@bücher.example", secret=SECRET)
        assert suppressed_forms(
            session, ["ann@bücher.example", "bob@example.org"], secret=SECRET
        ) == {"ann@bücher.example"}
        lift_suppression(session, "ann@xn--bcher-kva.example", secret=SECRET)
    with unit_of_work(factory) as session:
        assert session.scalar(select(func.count()).select_from(Suppression)) == 0


def test_import_keeps_out_suppressed_and_forgotten_addresses(
    lists: sessionmaker[Session], tmp_path: Path
) -> None:
    """A CSV row for a bounced or forgotten address is kept out; a new one goes in."""
    bounce(lists, add(lists, "bounced@example.org").subscriber_id, "bounced@example.org")
    with unit_of_work(lists) as session:
        forget(session=session, email="gone@example.org", secret=SECRET, now=NOW, actor="test")
    path = tmp_path / "people.csv"
    path.write_text(
        "email,lists\nbounced@example.org,weekly-digest\nGONE@example.org,weekly-digest\n"
        "new@example.org,weekly-digest\n"
    )
    counts, _ = run_import(lists, path)
    assert (counts["kept_out"], counts["imported"]) == (2, 1)
    assert reach(lists) == 1


def test_subscribe_asks_a_suppressed_address_to_confirm_afresh(
    lists: sessionmaker[Session],
) -> None:
    """Even --confirmed, a bounced or forgotten address waits for its own click; that lifts it."""
    sid = add(lists, "bounced@example.org").subscriber_id
    bounce(lists, sid, "bounced@example.org")
    with unit_of_work(lists) as session:
        forget(session=session, email="gone@example.org", secret=SECRET, now=NOW, actor="test")
    for email in ("bounced@example.org", "gone@example.org"):
        result = add(lists, email, "urgent-actions")
        assert result.active == () and result.pending == ("urgent-actions",)
    with unit_of_work(lists) as session:
        assert audience_size(session, get_list(session, "urgent-actions").id) == 0
        confirm(session=session, subscriber_id=result.subscriber_id, secret=SECRET, now=NOW)
        assert not is_suppressed(session, "gone@example.org", secret=SECRET)
        assert is_suppressed(session, "bounced@example.org", secret=SECRET)
        assert audience_size(session, get_list(session, "urgent-actions").id) == 1
    assert reach(lists) == 0  # the bounced one is still on weekly-digest, and still not reached


def test_subscribers_add_confirmed_does_not_bring_back_a_forgotten_address(
    tmp_path: Path, smtpd: SmtpServer, database_url: str
) -> None:
    """`subscribers add --confirmed` of a forgotten address mails a confirmation, adds no one."""
    (tmp_path / "config.toml").write_text(
        f"[database]\nurl = '{database_url}'\n[smtp]\nhost = '{smtpd.host}'\nport = {smtpd.port}\n"
    )
    env = {"NEWSLETTER_SECRET": SECRET}
    run(["init"], tmp_path, env)
    run(["subscribers", "forget", "ann@example.org", "--yes"], tmp_path, env)
    added = run(
        ["subscribers", "add", "ann@example.org", "--list", "weekly-digest", "--confirmed"],
        tmp_path,
        env,
    )
    assert "active on no list; awaiting confirmation on weekly-digest" in added.stdout
    assert "confirmation emails sent: 1" in added.stderr
    [message] = smtpd.messages()
    assert message["To"] == "ann@example.org" and "/confirm/" in message.get_body().get_content()


def test_the_sender_skips_who_bounced_or_was_forgotten_after_enqueue(
    factory: sessionmaker[Session], smtpd: SmtpServer, clock: FrozenClock, database_url: str
) -> None:
    """Queued before the bounce or the forget: nothing goes to them, the rest is sent."""
    cid = seed(factory, clock, 4)
    with unit_of_work(factory) as session:
        people = {s.email: s.id for s in session.scalars(select(Subscriber))}
    bounce(factory, people["person1@example.net"], "person1@example.net")
    with unit_of_work(factory) as session:
        forget(session=session, email="person2@example.net", secret=SECRET, now=NOW, actor="t")
    deliver(factory, make_settings(database_url, smtpd), clock)
    assert sorted(str(m["To"]).rpartition("<")[2].strip(">") for m in smtpd.messages()) == [
        "person0@example.net",
        "person3@example.net",
    ]
    with unit_of_work(factory) as session:
        bounced = session.scalar(
            select(Delivery.status).where(
                Delivery.campaign_id == cid, Delivery.subscriber_id == people["person1@example.net"]
            )
        )
        forgotten = session.get(Subscriber, people["person2@example.net"])
    assert bounced == DeliveryStatus.SUPPRESSED
    assert forgotten is not None and forgotten.status == SubscriberStatus.FORGOTTEN
