"""The subscription lifecycle: double opt-in by email, unsubscribe, preferences, forget."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from newsletter.audience import audience_size
from newsletter.clock import FrozenClock
from newsletter.db import unit_of_work
from newsletter.db.models import (
    Event,
    MailingList,
    Subscriber,
    SubscriberStatus,
    Subscription,
    SubscriptionStatus,
    Suppression,
)
from newsletter.lists import get_list, read_lists, sync_lists
from newsletter.notices import send_confirmations
from newsletter.smtp import SmtpPool
from newsletter.subscriptions import confirm, forget, subscribe, unsubscribe
from newsletter.tokens import read_token
from tests.conftest import SECRET, SmtpServer, make_settings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def lists(factory: sessionmaker[Session]) -> sessionmaker[Session]:
    with unit_of_work(factory) as session:
        sync_lists(session=session, specs=read_lists(ROOT / "subscribers" / "lists.toml"))
    return factory


def add(factory: sessionmaker[Session], clock: FrozenClock, email: str, **kw: object) -> int:
    with unit_of_work(factory) as session:
        result = subscribe(
            session=session,
            email=email,
            lists=[get_list(session, "weekly-digest"), get_list(session, "urgent-actions")],
            secret=SECRET,
            now=clock.now(),
            actor="test",
            **kw,  # type: ignore[arg-type]
        )
    return result.subscriber_id


def reach(factory: sessionmaker[Session]) -> int:
    with unit_of_work(factory) as session:
        return audience_size(session, get_list(session, "weekly-digest").id)


def test_double_opt_in_mails_one_confirmation_then_confirms(
    lists: sessionmaker[Session], clock: FrozenClock, smtpd: SmtpServer, database_url: str
) -> None:
    """A new subscriber gets one confirmation email naming both lists, and nothing else before."""
    settings = make_settings(database_url, smtpd)
    sid = add(lists, clock, "New@Example.org", language="be")
    assert reach(lists) == 0

    async def run() -> tuple[int, int]:
        pool = SmtpPool(settings.smtp)
        try:
            return await send_confirmations(
                factory=lists, settings=settings, transport=pool, clock=clock
            )
        finally:
            await pool.close()

    assert asyncio.run(run()) == (1, 0)
    assert asyncio.run(run()) == (0, 0)  # owed once, sent once
    [msg] = smtpd.messages()
    assert msg["X-Delivered-To"] == "new@example.org"
    assert msg["Auto-Submitted"] == "auto-generated"
    text = msg.get_body(("plain",)).get_content()
    assert "Штотыднёвы дайджэст" in text and "Тэрміновыя акцыі" in text
    token = re.search(r"/confirm/(\S+)", text).group(1)  # type: ignore[union-attr]
    claims = read_token(token, secret=SECRET, purpose="confirm")
    assert claims.subscriber_id == sid
    with unit_of_work(lists) as session:
        active = confirm(session=session, subscriber_id=sid, secret=SECRET, now=clock.now())
    assert sorted(active) == ["urgent-actions", "weekly-digest"]
    assert reach(lists) == 1


def test_newsletter_run_sends_confirmations_at_a_random_moment_not_each_round(
    lists: sessionmaker[Session], clock: FrozenClock, smtpd: SmtpServer, database_url: str
) -> None:
    """Under `newsletter run` a round sends owed confirmations only once the random delay since
    the last such round has passed: a signup just after one waits, and is then sent once."""
    import time

    from newsletter.db import make_engine, make_sessionmaker
    from newsletter.service import Service, send_round

    settings = make_settings(database_url, smtpd)
    engine = make_engine(database_url)
    service = Service(
        settings=settings,
        engine=engine,
        factory=make_sessionmaker(engine),
        clock=clock,
        confirm_delay=(1.5, 2.0),
    )

    async def round_() -> None:
        pool = SmtpPool(settings.smtp)
        try:
            await send_round(service, pool, None)
        finally:
            await pool.close()

    add(lists, clock, "first@example.org")
    started = time.monotonic()
    asyncio.run(round_())  # the first round sends at once, and draws the next one's moment
    assert [m["X-Delivered-To"] for m in smtpd.messages()] == ["first@example.org"]
    assert 1.5 <= service.confirm_at - started <= 2.0 + 0.5
    add(lists, clock, "second@example.org")
    asyncio.run(round_())
    assert len(smtpd.messages()) == 1 or time.monotonic() >= service.confirm_at  # owed, kept
    time.sleep(max(0.0, service.confirm_at - time.monotonic()))
    asyncio.run(round_())
    asyncio.run(round_())
    assert [m["X-Delivered-To"] for m in smtpd.messages()] == [
        "first@example.org",
        "second@example.org",
    ]
    engine.dispose()


def test_confirmed_flag_and_single_opt_in_skip_the_email(
    lists: sessionmaker[Session], clock: FrozenClock
) -> None:
    """--confirmed makes people active at once."""
    add(lists, clock, "known@example.org", confirmed=True)
    assert reach(lists) == 1


def test_unsubscribe_is_idempotent_and_recorded(
    lists: sessionmaker[Session], clock: FrozenClock
) -> None:
    """Unsubscribing twice changes state once and leaves one event naming no address."""
    sid = add(lists, clock, "reader@example.org", confirmed=True)
    with unit_of_work(lists) as session:
        digest = get_list(session, "weekly-digest").id
        args = {"session": session, "subscriber_id": sid, "list_id": digest, "now": clock.now()}
        assert unsubscribe(**args, actor="test") is True  # type: ignore[arg-type]
        assert unsubscribe(**args, actor="test") is False  # type: ignore[arg-type]
    with unit_of_work(lists) as session:
        events = session.scalars(
            select(Event).where(Event.action == "subscriber.unsubscribed")
        ).all()
    assert len(events) == 1 and "@" not in str(events[0].detail)
    assert reach(lists) == 0


@pytest.mark.parametrize(
    "how",
    [
        pytest.param("forgotten", id="forgotten"),
        pytest.param("unsubscribed", id="unsubscribed"),
    ],
)
def test_adding_back_someone_who_left_needs_a_fresh_confirmation(
    lists: sessionmaker[Session], clock: FrozenClock, how: str
) -> None:
    """Even with --confirmed, someone forgotten or unsubscribed comes back only by confirming."""
    sid = add(lists, clock, "leaver@example.org", confirmed=True)
    with unit_of_work(lists) as session:
        if how == "forgotten":
            forget(
                session=session,
                email="leaver@example.org",
                secret=SECRET,
                now=clock.now(),
                actor="t",
            )
        else:
            unsubscribe(
                session=session, subscriber_id=sid, list_id=None, now=clock.now(), actor="t"
            )
    again = add(lists, clock, "leaver@example.org", confirmed=True)
    assert reach(lists) == 0
    with unit_of_work(lists) as session:
        confirm(session=session, subscriber_id=again, secret=SECRET, now=clock.now())
        assert session.scalar(select(Suppression.id)) is None  # a fresh confirmation lifts it
    assert reach(lists) == 1


def test_forget_leaves_only_a_keyed_hash(lists: sessionmaker[Session], clock: FrozenClock) -> None:
    """After forget no address, name, tag or subscription remains; the id is not reused."""
    sid = add(
        lists,
        clock,
        "secret.person@example.org",
        confirmed=True,
        name="Secret Person",
        tags=["press"],
    )
    with unit_of_work(lists) as session:
        assert forget(
            session=session,
            email="Secret.Person@example.org",
            secret=SECRET,
            now=clock.now(),
            actor="t",
        )
    with unit_of_work(lists) as session:
        tomb = session.get(Subscriber, sid)
        assert tomb is not None and tomb.status == SubscriberStatus.FORGOTTEN
        assert (
            "secret" not in tomb.email
            and tomb.name == ""
            and tomb.tags == []
            and tomb.attributes == {}
        )
        assert (
            session.scalar(select(Subscription.id).where(Subscription.subscriber_id == sid)) is None
        )
        [suppression] = session.scalars(select(Suppression)).all()
        assert "secret" not in suppression.email_hash and len(suppression.email_hash) == 64
        dump = " ".join(str(e.detail) for e in session.scalars(select(Event)))
        assert "secret.person" not in dump.lower()
    newcomer = add(lists, clock, "someone.else@example.org", confirmed=True)
    assert newcomer != sid


def test_an_old_preferences_link_does_not_bring_back_a_bounced_address(
    lists: sessionmaker[Session], clock: FrozenClock
) -> None:
    """A hard-bounced person ticking a list on an old preferences page is refused, stays out."""
    from newsletter.db.queries import mark_bounced
    from newsletter.errors import AudienceError
    from newsletter.subscriptions import set_preferences

    sid = add(lists, clock, "gone@example.org", confirmed=True)
    with unit_of_work(lists) as session:
        digest = get_list(session, "weekly-digest").id
        unsubscribe(session=session, subscriber_id=sid, list_id=digest, now=clock.now(), actor="t")
        mark_bounced(session, sid)  # then the alerts bounced for good
    assert reach(lists) == 0
    with unit_of_work(lists) as session:
        digest = get_list(session, "weekly-digest").id
        with pytest.raises(AudienceError, match="bounced"):
            set_preferences(
                session=session,
                subscriber_id=sid,
                list_ids={digest},
                language="en",
                now=clock.now(),
                actor="web",
            )
    with unit_of_work(lists) as session:
        sub = session.get(Subscriber, sid)
        assert sub is not None and sub.status == SubscriberStatus.BOUNCED
    assert reach(lists) == 0


@pytest.mark.parametrize("how", ["forgotten", "bounced"])
def test_a_list_without_double_opt_in_still_asks_someone_kept_out_to_confirm(
    lists: sessionmaker[Session], clock: FrozenClock, how: str
) -> None:
    """Forgotten or bounced people are not put back on a single-opt-in list by `subscribers add`."""
    from newsletter.db.queries import mark_bounced

    with unit_of_work(lists) as session:
        for ml in session.scalars(select(MailingList)):
            ml.double_opt_in = False
    sid = add(lists, clock, "kept-out@example.org")
    assert reach(lists) == 1  # single opt-in: active at once
    with unit_of_work(lists) as session:
        if how == "forgotten":
            forget(session=session, email="kept-out@example.org", secret=SECRET, now=clock.now(),
                   actor="t")  # fmt: skip
        else:
            mark_bounced(session, sid)
    assert reach(lists) == 0
    again = add(lists, clock, "kept-out@example.org")
    assert reach(lists) == 0
    with unit_of_work(lists) as session:
        rows = session.scalars(select(Subscription).where(Subscription.subscriber_id == again))
        assert {r.status for r in rows} == {SubscriptionStatus.PENDING}
        confirm(session=session, subscriber_id=again, secret=SECRET, now=clock.now())
    assert reach(lists) == 1
