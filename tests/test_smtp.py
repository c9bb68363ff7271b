"""The SMTP transport: its dialogue (pipelined when offered, dot-stuffed), stalls, refusals.

Stalls and refused connections defer instead of hanging; the reply classifier as a table.
"""

from __future__ import annotations

import asyncio
import smtplib
import socket
import ssl
import threading
from collections import deque
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from newsletter.clock import FrozenClock
from newsletter.config import load_settings
from newsletter.db import unit_of_work
from newsletter.db.models import Delivery
from newsletter.devsmtp import free_port
from newsletter.send import SendReport
from newsletter.smtp import (
    Chain,
    Outcome,
    Result,
    SmtpPool,
    classify,
    classify_error,
    open_pool,
)
from tests.conftest import SECRET
from tests.smtp_faults import Fault, FaultyHandler, faulty_smtpd
from tests.test_send import deliver, seed, settings_for

BODY = (
    b"Subject: dots\r\nMIME-Version: 1.0\r\n\r\n.starts with a dot\r\n..two dots\r\n.\r\n"
    b"a line\r\nlast line without an end"
)


class PipeliningHandler(FaultyHandler):
    """Offers PIPELINING in its EHLO reply and counts the connections it accepted."""

    connections: int = 0

    async def handle_EHLO(  # type: ignore[no-untyped-def]
        self, server, session, envelope, hostname, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        self.connections += 1
        return [*responses[:-1], "250-PIPELINING", responses[-1]]


class PlainHandler(FaultyHandler):
    """No PIPELINING: the transport speaks one command at a time."""

    connections: int = 0

    async def handle_EHLO(  # type: ignore[no-untyped-def]
        self, server, session, envelope, hostname, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        self.connections += 1
        return responses


def send_all(
    port: int, recipients: list[str], *, chained: bool = False, carried: list[str] | None = None
) -> list[Outcome]:
    """Send BODY to each recipient in turn on one connection's pool; `chained` as a sender's
    lane does, each message's final dot carrying the next one's envelope (smtp.Chain), whose
    recipients go to `carried`."""
    base = load_settings(None, {"NEWSLETTER_SECRET": SECRET})
    settings = replace(base.smtp, host="127.0.0.1", port=port, pool_size=1)
    sender = "bounces@example.org"

    async def go() -> list[Outcome]:
        pool = SmtpPool(settings)
        waiting = deque(recipients)
        following: list[str] = []

        def follow() -> tuple[str, str] | None:
            if not waiting:
                return None
            following.append(waiting.popleft())
            if carried is not None:
                carried.append(following[-1])
            return sender, following[-1]

        chain = Chain(follow) if chained else None
        outcomes = []
        try:
            while following or waiting:
                recipient = following.pop() if following else waiting.popleft()
                outcomes.append(
                    await pool.send(BODY, sender=sender, recipient=recipient, chain=chain)
                )
            return outcomes
        finally:
            if chain is not None:
                chain.drop()
            await pool.close()

    return asyncio.run(go())


@pytest.mark.parametrize("handler_type", [PipeliningHandler, PlainHandler], ids=["pipe", "plain"])
@pytest.mark.parametrize(
    ("fault", "expected", "recipient_level"),
    [
        pytest.param(None, Result.SENT, False, id="accepted"),
        pytest.param(
            Fault("MAIL", "451 4.3.0 try later", times=1), Result.TEMPORARY, False, id="mail-451"
        ),
        pytest.param(
            Fault("RCPT", "550 5.1.1 no such user"), Result.PERMANENT, True, id="rcpt-550"
        ),
        pytest.param(
            Fault("RCPT", "452 4.2.2 mailbox full"), Result.TEMPORARY, False, id="rcpt-452"
        ),
        pytest.param(Fault("DATA", "554 5.7.1 refused"), Result.PERMANENT, False, id="data-554"),
        pytest.param(Fault("RCPT", drop=True), Result.TEMPORARY, False, id="rcpt-drop"),
    ],
)
def test_each_reply_is_classified_and_the_connection_serves_the_next_message(
    handler_type: type[FaultyHandler],
    fault: Fault | None,
    expected: Result,
    recipient_level: bool,
) -> None:
    """Pipelined or not: the first message gets the reply's outcome, the second is accepted."""
    handler: Any = handler_type(faults=[replace(fault, only="first")] if fault else [])
    if fault and fault.stage == "MAIL":
        handler.faults = [replace(fault)]  # MAIL knows no recipient: `times=1` picks the first
    with faulty_smtpd(handler) as port:
        first, second = send_all(port, ["first@example.net", "second@example.net"])
    assert first.result is expected
    assert first.recipient_level is recipient_level
    assert second.result is Result.SENT
    assert [rcpts for _s, rcpts, _raw in handler.received][-1] == ["second@example.net"]
    # A refusal resets the connection for the next message; only a drop needs a new one.
    assert handler.connections == (2 if fault and fault.drop else 1)


@pytest.mark.parametrize(
    "faults",
    [
        pytest.param([], id="accepted"),
        # MAIL knows no recipient: the first fault lets the first MAIL by, the second answers.
        pytest.param(
            [Fault("MAIL", times=1), Fault("MAIL", "451 4.3.0 later", times=1)], id="mail-451"
        ),
        pytest.param(
            [Fault("MAIL", times=1), Fault("MAIL", "421 4.3.2 bye", times=1)], id="mail-421"
        ),
        pytest.param([Fault("RCPT", "550 5.1.1 no such user", only="second")], id="rcpt-550"),
        pytest.param([Fault("RCPT", "452 4.2.2 mailbox full", only="second")], id="rcpt-452"),
        pytest.param([Fault("DATA", "554 5.7.1 refused", only="second")], id="data-554"),
        pytest.param([Fault("RCPT", drop=True, only="second")], id="rcpt-drop"),
        pytest.param([Fault("DATA", drop=True, only="second")], id="data-drop"),
    ],
)
def test_a_carried_envelope_gets_the_outcome_it_gets_on_its_own(faults: list[Fault]) -> None:
    """The next envelope sent with the final dot (RFC 2920 3.1) changes no outcome: the
    second of three messages gets what it gets when its envelope waits for the first's 250,
    the same messages arrive, and a connection the server kept serves all three."""
    recipients = ["first@example.net", "second@example.net", "third@example.net"]
    seen = {}
    carried: list[str] = []
    for chained in (False, True):
        handler = PipeliningHandler(faults=[replace(f) for f in faults])
        with faulty_smtpd(handler) as port:
            outcomes = send_all(port, recipients, chained=chained, carried=carried)
        got = [(o.result, o.code, o.recipient_level) for o in outcomes]
        seen[chained] = got, [rcpts for _s, rcpts, _raw in handler.received], handler.connections
    assert seen[True][:2] == seen[False][:2]
    assert carried[:1] == ["second@example.net"]  # its envelope went with the first's dot
    outcomes, received, connections = seen[True]
    assert outcomes[0][0] is outcomes[2][0] is Result.SENT
    assert (outcomes[1][0] is Result.SENT) == (not faults)
    assert received == [[r] for r in recipients if faults == [] or r != "second@example.net"]
    dropped = any(f.drop for f in faults) or "421" in str(faults)
    assert connections == (2 if dropped else 1)


@pytest.mark.parametrize("handler_type", [PipeliningHandler, PlainHandler], ids=["pipe", "plain"])
def test_lines_starting_with_a_dot_arrive_unchanged(handler_type: type[FaultyHandler]) -> None:
    """Dot-stuffing is undone by the server: the message arrives exactly as built, plus CRLF."""
    handler = handler_type()
    with faulty_smtpd(handler) as port:
        (outcome,) = send_all(port, ["someone@example.net"])
    assert outcome.result is Result.SENT
    assert handler.received[0][2] == BODY + b"\r\n"


# --- stalls and refusals: deferred, never a hang ---------------------------------------------


def rows(factory: sessionmaker[Session]) -> list[tuple[str, str]]:
    with unit_of_work(factory) as session:
        stmt = select(Delivery.status, Delivery.last_reply).order_by(Delivery.id)
        return [(str(s), r or "") for s, r in session.execute(stmt)]


@pytest.mark.parametrize(
    "stage",
    [
        pytest.param("MAIL", id="stall-at-mail"),
        pytest.param("RCPT", id="stall-at-rcpt"),
        pytest.param("DATA", id="stall-after-data"),
    ],
)
def test_a_stalling_server_is_a_temporary_failure_after_the_timeout(
    factory: sessionmaker[Session], clock: FrozenClock, database_url: str, stage: str
) -> None:
    """A server that stops answering costs [smtp] timeout_seconds, then the mail is deferred."""
    seed(factory, clock, 3)
    # Stall the first message past the 1 s timeout, then refuse it: the late answer delivers
    # nothing. One connection, so the messages go in order and the first is person0's.
    handler = FaultyHandler([Fault(stage, "451 4.3.0 too late", stall_seconds=3, times=1)])
    reports: list[SendReport] = []
    with faulty_smtpd(handler) as port:
        settings = settings_for(
            database_url, port, timeout_seconds=1, final_reply_timeout_seconds=1, pool_size=1
        )
        worker = threading.Thread(target=lambda: reports.append(deliver(factory, settings, clock)))
        worker.start()
        worker.join(timeout=20)  # bounded: a hang fails here instead of blocking the suite
        assert not worker.is_alive(), "the sender hung on a stalled server"
    got = rows(factory)
    assert [s for s, _ in got] == ["deferred", "sent", "sent"]
    assert "timed out" in got[0][1].lower() and reports[0].deferred == 1
    assert sorted(r[0] for _f, r, _b in handler.received) == [
        "person1@example.net",
        "person2@example.net",
    ]


def test_a_refused_connection_defers_every_message(
    factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """Nothing listening at [smtp] host:port: each message is deferred, none failed or lost."""
    seed(factory, clock, 4)
    report = deliver(factory, settings_for(database_url, free_port(), timeout_seconds=1), clock)
    got = rows(factory)
    assert [s for s, _ in got] == ["deferred"] * 4 and report.deferred == 4
    assert all("ConnectionRefusedError" in reply for _, reply in got)


@pytest.mark.parametrize(
    ("code", "reply", "recipient_level", "expected"),
    [
        pytest.param(250, "2.0.0 OK", False, (Result.SENT, "250 2.0.0 OK", False), id="250"),
        pytest.param(
            251, b"user not local", False, (Result.SENT, "251 user not local", False), id="251"
        ),
        pytest.param(
            421, "4.3.2 closing", False, (Result.TEMPORARY, "421 4.3.2 closing", False), id="421"
        ),
        pytest.param(
            451,
            "4.7.1 greylisted,\r\n try again",
            True,
            (Result.TEMPORARY, "451 4.7.1 greylisted, try again", False),
            id="451-folded-never-recipient-level",
        ),
        pytest.param(
            550,
            "5.1.1 no such user",
            True,
            (Result.PERMANENT, "550 5.1.1 no such user", True),
            id="550-at-rcpt",
        ),
        pytest.param(
            554, "5.7.1 spam", False, (Result.PERMANENT, "554 5.7.1 spam", False), id="554-at-data"
        ),
        pytest.param(
            354, "go ahead", False, (Result.TEMPORARY, "354 go ahead", False), id="unexpected-3xx"
        ),
        pytest.param(
            None, "connection lost", False, (Result.TEMPORARY, "connection lost", False), id="none"
        ),
        pytest.param(
            550,
            b"\xff\xfe bad bytes",
            True,
            (Result.PERMANENT, "550 \ufffd\ufffd bad bytes", True),
            id="undecodable-bytes",
        ),
    ],
)
def test_classify_maps_reply_codes_to_outcomes(
    code: int | None, reply: str | bytes, recipient_level: bool, expected: tuple[Result, str, bool]
) -> None:
    """2xx is sent, 4xx (and no code) temporary, 5xx permanent; only 5xx keeps recipient level."""
    outcome = classify(code, reply, recipient_level=recipient_level)
    assert (outcome.result, outcome.reply, outcome.recipient_level) == expected
    assert outcome.code == code


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        pytest.param(
            smtplib.SMTPResponseException(552, b"5.3.4 too big"), Result.PERMANENT, id="5xx"
        ),
        pytest.param(smtplib.SMTPResponseException(421, b"4.4.2 idle"), Result.TEMPORARY, id="4xx"),
        pytest.param(smtplib.SMTPServerDisconnected("gone"), Result.TEMPORARY, id="disconnected"),
        pytest.param(ConnectionRefusedError(111, "refused"), Result.TEMPORARY, id="refused"),
        pytest.param(TimeoutError("timed out"), Result.TEMPORARY, id="timeout"),
        pytest.param(UnicodeEncodeError("ascii", "ä", 0, 1, "x"), Result.PERMANENT, id="non-ascii"),
    ],
)
def test_classify_error_maps_exceptions_to_outcomes(error: Exception, expected: Result) -> None:
    """A dropped or slow connection is temporary; an SMTP 5xx or an unusable address permanent."""
    assert classify_error(error).result is expected


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(ssl.SSLError(1, "wrong version number"), id="tls"),
        pytest.param(socket.gaierror(-2, "Name or service not known"), id="dns"),
        pytest.param(smtplib.SMTPNotSupportedError("STARTTLS not offered"), id="not-supported"),
        pytest.param(ConnectionResetError(104, "reset by peer"), id="reset"),
        pytest.param(smtplib.SMTPAuthenticationError(535, b"5.7.8 bad login"), id="auth-5xx"),
    ],
)
def test_transport_errors_become_outcomes(error: Exception) -> None:
    """TLS, DNS, a missing extension, a reset: outcomes with the error named, never a crash."""
    outcome = classify_error(error)
    assert outcome.result in (Result.TEMPORARY, Result.PERMANENT)
    assert outcome.reply


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(TypeError("a str where bytes belong"), id="type"),
        pytest.param(AttributeError("'NoneType' object has no attribute 'send'"), id="attribute"),
        pytest.param(KeyError("relay"), id="key"),
        pytest.param(ValueError("a bug, not an address"), id="value"),
    ],
)
def test_programming_errors_are_not_delivery_outcomes(error: Exception) -> None:
    """A bug in the transport raises: it must not be recorded as a failed or deferred message."""
    with pytest.raises(type(error)):
        classify_error(error)


def test_a_bug_on_the_wire_raises_out_of_the_pool_and_the_next_message_goes() -> None:
    """A message of the wrong type raises TypeError from send; the pool still serves the next."""
    handler = PipeliningHandler()
    base = load_settings(None, {"NEWSLETTER_SECRET": SECRET})

    async def go() -> Outcome:
        with faulty_smtpd(handler) as port:
            pool = SmtpPool(replace(base.smtp, host="127.0.0.1", port=port, pool_size=1))
            try:
                with pytest.raises(TypeError):
                    await pool.send("text, not bytes", sender="b@example.org", recipient="x@y.net")  # type: ignore[arg-type]
                return await pool.send(BODY, sender="b@example.org", recipient="x@y.net")
            finally:
                await pool.close()

    assert asyncio.run(go()).result is Result.SENT
    assert len(handler.received) == 1


@pytest.mark.parametrize("handler_type", [PipeliningHandler, PlainHandler], ids=["pipe", "plain"])
@pytest.mark.parametrize(
    "recipient",
    [
        pytest.param("someone@example.net\r\nRCPT TO:<other@example.net>", id="crlf-injection"),
        pytest.param("someone@example.net\nDATA", id="lf"),
        pytest.param("алесь@example.net", id="non-ascii"),
    ],
)
def test_an_envelope_no_command_can_carry_fails_for_good_before_any_command(
    handler_type: type[FaultyHandler], recipient: str
) -> None:
    """A line break or non-ASCII in an address fails that message; nothing reaches the server."""
    handler: Any = handler_type()
    with faulty_smtpd(handler) as port:
        bad, good = send_all(port, [recipient, "second@example.net"])
    assert bad.result is Result.PERMANENT and "unusable address" in bad.reply
    assert good.result is Result.SENT
    assert [rcpts for _s, rcpts, _raw in handler.received] == [["second@example.net"]]


def test_the_pool_counts_the_last_hour_of_sends_by_the_injected_clock(
    factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """open_pool seeds a capped relay from the database, aging sends by the clock it is given.

    The clock stands days away from the wall clock: three sends half an hour before it count
    against an hourly cap of four, three sends two hours before it do not.
    """
    seed(factory, clock, 6)
    handler = FaultyHandler()
    with faulty_smtpd(handler) as port:
        settings = settings_for(database_url, port, hourly_limit=4)
        label = settings.smtp.all_relays()[0].label
        with unit_of_work(factory) as session:
            for i, delivery in enumerate(session.scalars(select(Delivery).order_by(Delivery.id))):
                delivery.status, delivery.relay = "sent", label
                delivery.sent_at = clock.now() - timedelta(minutes=30 if i < 3 else 120)

        async def go() -> list[Outcome]:
            async with open_pool(settings, factory, clock) as pool:
                first = await pool.send(BODY, sender="b@example.org", recipient="a@example.net")
                over = asyncio.create_task(
                    pool.send(BODY, sender="b@example.org", recipient="b@example.net")
                )
                await asyncio.sleep(1)  # the cap is half an hour away: it waits, then is stopped
                pool.interrupt()
                return [first, await over]

        first, over = asyncio.run(go())
    assert (first.result, over.result) == (Result.SENT, Result.UNSENT)
    assert [rcpts for _s, rcpts, _raw in handler.received] == [["a@example.net"]]
