"""The List-Unsubscribe mailto: mail to our own aiosmtpd inbound unsubscribes that token.

The server also stands up to hostile clients: mail nested ten thousand MIME levels deep, a
database that fails, idle connections, clients that never read, and too many connections.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import smtplib
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from newsletter.clock import FrozenClock
from newsletter.db import make_engine, make_sessionmaker, unit_of_work
from newsletter.db.models import Subscription, SubscriptionStatus
from newsletter.devsmtp import free_port
from newsletter.inbound import (
    MAX_RECIPIENTS,
    InboundMail,
    InboundRoute,
    start_inbound,
    unsubscribe_route,
)
from newsletter.lists import get_list, read_lists, sync_lists
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
    # Discreet readers' List-Unsubscribe mailto names the neutral domain's address.
    discreet = replace(settings.discreet, unsubscribe_address="leave@notes.example.net")
    settings = replace(settings, discreet=discreet)
    seen: list[InboundMail] = []

    async def record(mail: InboundMail) -> None:
        seen.append(mail)

    routes = [
        unsubscribe_route(settings=settings, factory=factory, clock=clock),
        InboundRoute("bounces", lambda rcpt: rcpt.startswith("bounces+"), record),
    ]
    inbound = replace(settings.inbound, port=free_port())
    controller = start_inbound(routes=routes, inbound=inbound)
    yield Inbound(inbound.port, factory, seen)
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
    ("to", "subject"),
    [
        pytest.param("Unsubscribe@Portal.example.org", "unsubscribe {token}", id="as-sent"),
        pytest.param(
            "Unsubscribe@Portal.example.org", "  UNSUBSCRIBE   {token} ", id="case-and-spaces"
        ),
        pytest.param("leave@notes.example.net", "unsubscribe {token}", id="discreet-address"),
    ],
)
def test_mail_to_the_unsubscribe_address_unsubscribes(
    inbound: Inbound, factory: sessionmaker[Session], clock: FrozenClock, to: str, subject: str
) -> None:
    """Mail with "unsubscribe TOKEN" to a List-Unsubscribe address (the portal's, or the
    discreet identity's) unsubscribes that token."""
    sid, token = reader(factory, clock)
    inbound.send(to=to, subject=subject.format(token=token))
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


@contextmanager
def serve(routes: list[InboundRoute], database_url: str, **limits: Any) -> Iterator[int]:
    """The inbound server with these routes and [inbound] values; yields its port."""
    base = make_settings(database_url).inbound
    inbound = replace(base, port=free_port(), **limits)
    controller = start_inbound(routes=routes, inbound=inbound)
    try:
        yield inbound.port
    finally:
        controller.stop()


def connect(port: int, client: str = "127.0.0.1") -> tuple[socket.socket, bytes]:
    """A raw connection from the given loopback address, and the server's first line."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(client, 0))
    return sock, sock.recv(1024)


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server ends the connection (within the socket's timeout) without a word."""
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def served_within(port: int, seconds: float, client: str = "127.0.0.1") -> bool:
    """Whether a new connection from client is greeted with 220 before the budget runs out."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sock, greeting = connect(port, client)
        sock.close()
        if greeting.startswith(b"220"):
            return True
        time.sleep(0.1)
    return False


def nested(levels: int, subject: str) -> bytes:
    """A message with the given subject whose body nests `levels` multiparts deep."""
    opens = "".join(
        f'Content-Type: multipart/mixed; boundary="n{i}"\r\n\r\n--n{i}\r\n' for i in range(levels)
    )
    head = f"From: reader@example.org\r\nTo: unsubscribe@portal.example.org\r\nSubject: {subject}"
    return f"{head}\r\nMIME-Version: 1.0\r\n{opens}hi\r\n".encode()


def test_deeply_nested_mail_is_answered_and_the_session_goes_on(
    inbound: Inbound, factory: sessionmaker[Session], clock: FrozenClock
) -> None:
    """An unsubscribe mail nested 10,000 MIME levels deep is applied from its headers, and the
    same session then delivers the next message."""
    sid, token = reader(factory, clock)
    with smtplib.SMTP("127.0.0.1", inbound.port, timeout=30) as client:
        client.sendmail(
            "", ["unsubscribe@portal.example.org"], nested(10_000, f"unsubscribe {token}")
        )
        assert inbound.status(sid) == SubscriptionStatus.UNSUBSCRIBED
        client.sendmail("", ["bounces+1-ab@portal.example.org"], nested(10, "Undelivered"))
    assert [m.message["Subject"] for m in inbound.seen] == ["Undelivered"]


def test_a_failing_route_is_logged_by_kind_before_451(
    tmp_path: Path,
    factory: sessionmaker[Session],
    clock: FrozenClock,
    database_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """When applying fails (here: a database without tables), the error is logged by its kind,
    no address or text in it, and only then answered 451 so the sender tries again."""
    caplog.set_level(logging.INFO, logger="newsletter.inbound")
    with unit_of_work(factory) as session:
        sync_lists(session=session, specs=read_lists(ROOT / "subscribers" / "lists.toml"))
    _sid, token = reader(factory, clock)
    engine = make_engine(f"sqlite:///{tmp_path / 'empty.db'}")
    settings = make_settings(database_url)
    routes = [unsubscribe_route(settings=settings, factory=make_sessionmaker(engine), clock=clock)]
    with serve(routes, database_url) as port, smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
        c.ehlo()
        c.mail("reader@example.org")
        c.rcpt("unsubscribe@portal.example.org")
        code, _ = c.data(f"Subject: unsubscribe {token}\r\n\r\nplease\r\n".encode())
        logged = [r for r in caplog.records if r.name == "newsletter.inbound"]
    engine.dispose()
    assert code == 451
    assert [r.levelname for r in logged] == ["ERROR"]
    line = logged[0].getMessage()
    assert "OperationalError" in line and "451" in line
    assert "@" not in line and logged[0].exc_info is None


def test_an_idle_connection_is_closed_after_the_idle_timeout(sqlite_url: str) -> None:
    """A client that connects and then says nothing is disconnected once the timeout passes."""
    with serve([], sqlite_url, idle_timeout_seconds=0.5) as port:
        sock, greeting = connect(port)
        with sock:
            assert greeting.startswith(b"220")
            assert closed_by_server(sock)


def test_a_client_that_never_reads_its_replies_loses_its_place(sqlite_url: str) -> None:
    """A client that sends commands but reads no reply (buffers full, like a half-open peer) is
    dropped at the idle timeout, so its connection slot is free again."""
    with serve([], sqlite_url, idle_timeout_seconds=0.5, max_connections_per_client=1) as port:
        hog = socket.socket()
        hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        hog.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        hog.connect(("127.0.0.1", port))
        with hog:
            hog.settimeout(1)
            # EHLO's reply is long, so the server's buffers fill soon; sending stops with a
            # timeout once every buffer is full, or a reset once the server drops us.
            with contextlib.suppress(OSError):
                while True:
                    hog.sendall(b"EHLO x\r\n" * 1000)
            assert served_within(port, 60)  # generous: the server first works off the backlog


def test_connections_are_bounded_per_client_and_in_total(
    inbound: Inbound, factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """A third connection from one address is refused with 421 while another address is still
    served, and mails; past the total nobody else gets in; a closed connection frees its place."""
    sid, token = reader(factory, clock)
    settings = make_settings(database_url)
    routes = [unsubscribe_route(settings=settings, factory=factory, clock=clock)]
    with serve(routes, database_url, max_connections=3, max_connections_per_client=2) as port:
        first, second = connect(port), connect(port)
        assert [greeting[:3] for _sock, greeting in (first, second)] == [b"220", b"220"]
        third, greeting = connect(port)
        with third:
            assert greeting.startswith(b"421") and closed_by_server(third)
        with smtplib.SMTP("127.0.0.1", port, timeout=10, source_address=("127.0.0.2", 0)) as c:
            msg = EmailMessage()
            msg["From"], msg["To"] = "reader@example.org", "unsubscribe@portal.example.org"
            msg["Subject"] = f"unsubscribe {token}"
            c.send_message(msg)
            assert inbound.status(sid) == SubscriptionStatus.UNSUBSCRIBED
            other, greeting = connect(port, "127.0.0.3")
            with other:
                assert greeting.startswith(b"421") and closed_by_server(other)
        first[0].close()
        with second[0]:
            assert served_within(port, 10)


def test_a_message_takes_a_bounded_number_of_recipients(inbound: Inbound) -> None:
    """Each recipient is applied on its own, so one message cannot name a thousand of them."""
    with smtplib.SMTP("127.0.0.1", inbound.port, timeout=10) as client:
        client.ehlo()
        client.mail("")
        codes = [client.rcpt(f"bounces+{i}-ab@portal.example.org")[0] for i in range(25)]
    assert codes == [250] * MAX_RECIPIENTS + [452] * (25 - MAX_RECIPIENTS)


def test_an_undecodable_subject_gets_554_and_the_session_goes_on(
    inbound: Inbound, factory: sessionmaker[Session], clock: FrozenClock
) -> None:
    """A subject whose encoded word cannot be decoded is answered 554; the next message of the
    same session, an RFC 2047-encoded "unsubscribe TOKEN", is applied."""
    sid, token = reader(factory, clock)
    encoded = base64.b64encode(f"unsubscribe {token}".encode()).decode()
    with smtplib.SMTP("127.0.0.1", inbound.port, timeout=10) as client:
        client.ehlo()
        client.mail("reader@example.org")
        client.rcpt("unsubscribe@portal.example.org")
        assert client.data(b"Subject: =?utf-8?b?AAAAA?=\r\n\r\nplease\r\n")[0] == 554
        assert inbound.status(sid) == SubscriptionStatus.ACTIVE
        message = f"Subject: =?utf-8?b?{encoded}?=\r\n\r\nplease\r\n"
        client.sendmail("reader@example.org", ["unsubscribe@portal.example.org"], message)
    assert inbound.status(sid) == SubscriptionStatus.UNSUBSCRIBED
