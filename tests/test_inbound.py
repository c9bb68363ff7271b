"""The List-Unsubscribe mailto: mail to our own aiosmtpd inbound unsubscribes that token."""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from newsletter.audience import get_list, read_lists, sync_lists
from newsletter.clock import FrozenClock
from newsletter.db import unit_of_work
from newsletter.db.models import Subscription, SubscriptionStatus
from newsletter.devsmtp import free_port
from newsletter.inbound import InboundMail, InboundRoute, start_inbound, unsubscribe_route
from newsletter.subscriptions import subscribe
from newsletter.tokens import make_token
from tests.conftest import SECRET, make_settings

ROOT = Path(__file__).resolve().parents[1]


class Inbound:
    def __init__(self, port: int, factory: sessionmaker[Session], seen: list[InboundMail]) -> None:
        self.port, self.factory, self.seen = port, factory, seen

    def send(self, *, to: str, subject: str) -> None:
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = "reader@example.org", to, subject
        msg.set_content("sent by a mail client")
        with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as client:
            client.send_message(msg)

    def status(self, subscriber_id: int) -> str:
        with unit_of_work(self.factory) as session:
            return str(
                session.scalar(
                    select(Subscription.status).where(Subscription.subscriber_id == subscriber_id)
                )
            )


@pytest.fixture
def inbound(
    factory: sessionmaker[Session], database_url: str, clock: FrozenClock
) -> Iterator[Inbound]:
    """The inbound server with the unsubscribe route and a recording route for bounces@."""
    with unit_of_work(factory) as session:
        sync_lists(session=session, specs=read_lists(ROOT / "subscribers" / "lists.toml"))
    settings = make_settings(database_url)
    seen: list[InboundMail] = []

    async def record(mail: InboundMail) -> None:
        seen.append(mail)

    routes = [
        unsubscribe_route(settings=settings, factory=factory, clock=clock),
        InboundRoute("bounces", lambda rcpt: rcpt.startswith("bounces+"), record),
    ]
    port = free_port()
    controller = start_inbound(routes=routes, host="127.0.0.1", port=port, max_message_bytes=65536)
    yield Inbound(port, factory, seen)
    controller.stop()


def reader(factory: sessionmaker[Session], clock: FrozenClock) -> tuple[int, str]:
    with unit_of_work(factory) as session:
        ml = get_list(session, "weekly-digest")
        result = subscribe(
            session=session,
            email="reader@example.org",
            lists=[ml],
            secret=SECRET,
            now=clock.now(),
            actor="test",
            confirmed=True,
        )
        token = make_token(
            secret=SECRET, purpose="unsubscribe", subscriber_id=result.subscriber_id, list_id=ml.id
        )
    return result.subscriber_id, token


@pytest.mark.parametrize(
    "subject",
    [
        pytest.param("unsubscribe {token}", id="as-sent"),
        pytest.param("  UNSUBSCRIBE   {token} ", id="case-and-spaces"),
    ],
)
def test_mail_to_the_unsubscribe_address_unsubscribes(
    inbound: Inbound, factory: sessionmaker[Session], clock: FrozenClock, subject: str
) -> None:
    """Mail with "unsubscribe TOKEN" to the List-Unsubscribe address unsubscribes that token."""
    sid, token = reader(factory, clock)
    inbound.send(to="Unsubscribe@Portal.example.org", subject=subject.format(token=token))
    assert inbound.status(sid) == SubscriptionStatus.UNSUBSCRIBED


@pytest.mark.parametrize(
    "subject",
    [
        pytest.param("unsubscribe {token}x", id="altered"),
        pytest.param("unsubscribe", id="no-token"),
        pytest.param("hello {token}", id="other-subject"),
    ],
)
def test_bad_or_missing_token_is_accepted_and_changes_nothing(
    inbound: Inbound, factory: sessionmaker[Session], clock: FrozenClock, subject: str
) -> None:
    """A bad token is accepted silently (no oracle for strangers) and unsubscribes no one."""
    sid, token = reader(factory, clock)
    inbound.send(to="unsubscribe@portal.example.org", subject=subject.format(token=token))
    assert inbound.status(sid) == SubscriptionStatus.ACTIVE


def test_unknown_recipient_is_refused_and_other_routes_get_theirs(
    inbound: Inbound, factory: sessionmaker[Session], clock: FrozenClock
) -> None:
    """A recipient no route takes is refused at RCPT; a plugged-in route gets its own mail."""
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        inbound.send(to="someone@portal.example.org", subject="hi")
    inbound.send(to="bounces+12-ab@portal.example.org", subject="Undelivered Mail")
    assert [m.recipient for m in inbound.seen] == ["bounces+12-ab@portal.example.org"]
    assert inbound.seen[0].message["Subject"] == "Undelivered Mail"
