"""SMTP transport: pools of reused connections per relay, rate limits, and a reply classifier.

2xx is sent, 4xx and a dropped connection are temporary (retry later), 5xx is permanent; a 5xx
at RCPT is about the mailbox, so the address is suppressed. Transport failures (refused or
dropped connections, time-outs, TLS errors) are outcomes too; a bug (a TypeError, an
AttributeError) is not, and raises. Each relay ([smtp] and [smtp] relays) has its own pool of
stdlib smtplib connections, each driven by one thread: on loopback the SMTP dialogue is
CPU-bound, and smtplib on a reused connection outran aiosmtplib here. The sender stays asyncio;
it awaits the threads.

Every sender opens its pool with `open_pool`, which seeds each capped relay with its sends of
the last hour from the database, so an `hourly_limit` holds across runs and restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import random
import smtplib
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Protocol

from sqlalchemy.orm import Session, sessionmaker

from newsletter.clock import Clock
from newsletter.config import RelaySettings, Settings, SmtpSettings
from newsletter.db import unit_of_work
from newsletter.db.queries import recent_sends

HOUR = 3600.0
# What can go wrong on the wire: smtplib.SMTPException, ssl.SSLError, TimeoutError and
# ConnectionError are all OSErrors. An address smtplib cannot encode is the mail's fault.
TRANSPORT_ERRORS = (OSError, UnicodeEncodeError)


class Result(StrEnum):
    SENT = "sent"
    TEMPORARY = "temporary"
    PERMANENT = "permanent"
    # Never handed to a server (stopped while waiting for a rate limit): release, do not count.
    UNSENT = "unsent"


@dataclass(frozen=True)
class Outcome:
    result: Result
    reply: str
    code: int | None = None
    # A recipient-level refusal (a bad mailbox at RCPT) suppresses the address; others do not.
    recipient_level: bool = False
    relay: str = ""


class Transport(Protocol):
    """What the sender needs from a mail transport."""

    async def send(self, message: bytes, *, sender: str, recipient: str) -> Outcome: ...

    def interrupt(self) -> None: ...

    async def close(self) -> None: ...


def classify(code: int | None, reply: str | bytes, *, recipient_level: bool = False) -> Outcome:
    """Turn an SMTP reply code into an Outcome."""
    if isinstance(reply, bytes):
        reply = reply.decode("utf-8", "replace")
    reply = " ".join(reply.split())
    text = f"{code} {reply}".strip() if code else reply
    if code is not None and 200 <= code < 300:
        return Outcome(Result.SENT, text, code)
    if code is not None and 500 <= code < 600:
        return Outcome(Result.PERMANENT, text, code, recipient_level)
    return Outcome(Result.TEMPORARY, text, code)


def classify_error(error: BaseException) -> Outcome:
    """Turn a transport error raised while sending one message into an Outcome; a bug raises."""
    if isinstance(error, smtplib.SMTPResponseException):
        return classify(error.smtp_code, error.smtp_error)
    if isinstance(error, UnicodeEncodeError):  # not a usable envelope address
        return Outcome(Result.PERMANENT, f"unusable address: {type(error).__name__}")
    if isinstance(error, OSError):
        # Dropped connection, time-out, refused connection, TLS: the server said nothing final.
        return Outcome(Result.TEMPORARY, f"{type(error).__name__}: {error}".strip())
    raise error  # a TypeError or AttributeError is a bug in the sender, not a delivery outcome


def unusable_envelope(sender: str, recipient: str) -> Outcome | None:
    """A permanent failure for an address no SMTP command can carry, else None."""
    for address in (sender, recipient):
        if not address.isascii():  # SMTPUTF8 is not used: the command would not encode
            return Outcome(Result.PERMANENT, "unusable address: not ASCII")
        if "\r" in address or "\n" in address:
            return Outcome(Result.PERMANENT, "unusable address: a line break")
    return None


class ConnectionPool:
    """Up to `pool_size` connections to one relay, each used by one thread at a time."""

    def __init__(self, relay: RelaySettings) -> None:
        self.relay = relay
        self._idle: queue.SimpleQueue[smtplib.SMTP] = queue.SimpleQueue()
        self._executor = ThreadPoolExecutor(relay.pool_size, thread_name_prefix="smtp")

    async def send(self, message: bytes, *, sender: str, recipient: str) -> Outcome:
        """Send one message over a pooled connection, in the pool's threads."""
        loop = asyncio.get_running_loop()
        outcome = await loop.run_in_executor(
            self._executor, self._send_blocking, message, sender, recipient
        )
        return replace(outcome, relay=self.relay.label)

    def _send_blocking(self, message: bytes, sender: str, recipient: str) -> Outcome:
        refused = unusable_envelope(sender, recipient)
        if refused is not None:
            return refused
        conn = None
        try:
            conn = self._take()
            outcome = _exchange(conn, message, sender, recipient)
        except TRANSPORT_ERRORS as error:  # a failure on the wire is an Outcome, not a crash
            _close_quietly(conn)
            return classify_error(error)
        except BaseException:  # a bug: the connection's state is unknown, so it goes too
            _close_quietly(conn)
            raise
        if outcome.code == 421:  # the server is closing this connection
            _close_quietly(conn)
        else:
            self._idle.put(conn)
        return outcome

    def _take(self) -> smtplib.SMTP:
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            return self._connect()

    def _connect(self) -> smtplib.SMTP:
        r = self.relay
        context = ssl.create_default_context() if r.security != "none" else None
        conn: smtplib.SMTP
        if r.security == "tls":
            conn = smtplib.SMTP_SSL(
                local_hostname="localhost", timeout=r.timeout_seconds, context=context
            )
        else:
            conn = smtplib.SMTP(local_hostname="localhost", timeout=r.timeout_seconds)
        conn.connect(r.host, r.port)
        conn.ehlo()
        if r.security == "starttls":
            conn.starttls(context=context)
            conn.ehlo()
        if r.username:
            conn.login(r.username, r.password)
        return conn

    def close_blocking(self) -> None:
        """Say QUIT on every idle connection and stop the threads."""
        self._executor.shutdown(wait=True)
        self.quit_idle()

    def quit_idle(self) -> None:
        """Say QUIT on every idle connection; the next message opens a new one."""
        while True:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                return
            try:
                conn.quit()
            except (smtplib.SMTPException, OSError):
                _close_quietly(conn)


def _exchange(conn: smtplib.SMTP, message: bytes, sender: str, recipient: str) -> Outcome:
    """MAIL, RCPT, DATA on an open connection; a refusal resets it for the next message."""
    if conn.has_extn("pipelining"):
        return _exchange_pipelined(conn, message, sender, recipient)
    code, reply = conn.mail(sender)
    if code != 250:
        return _refused(conn, classify(code, reply))
    code, reply = conn.rcpt(recipient)
    if code not in (250, 251):
        return _refused(conn, classify(code, reply, recipient_level=True))
    conn.putcmd("data")
    code, reply = conn.getreply()
    if code != 354:
        raise smtplib.SMTPDataError(code, reply)
    return classify(*_send_body(conn, message))


def _exchange_pipelined(conn: smtplib.SMTP, message: bytes, sender: str, recipient: str) -> Outcome:
    """MAIL, RCPT and DATA in one write (RFC 2920), then the body: two round trips, not four.

    The addresses were checked first (unusable_envelope): no line break can end a command.
    """
    conn.send(
        f"MAIL FROM:{smtplib.quoteaddr(sender)}\r\n"
        f"RCPT TO:{smtplib.quoteaddr(recipient)}\r\nDATA\r\n"
    )
    mail = conn.getreply()
    if mail[0] == 421:  # the server is closing; the other replies will not come
        return classify(*mail)
    rcpt = conn.getreply()
    if rcpt[0] == 421:
        return classify(*rcpt)
    data = conn.getreply()
    refusal = None
    if mail[0] != 250:
        refusal = classify(*mail)
    elif rcpt[0] not in (250, 251):
        refusal = classify(*rcpt, recipient_level=True)
    if refusal is not None:
        if data[0] == 354:  # a server that opened DATA anyway gets an empty message, then RSET
            conn.send(b".\r\n")
            conn.getreply()
        return _refused(conn, refusal)
    if data[0] != 354:
        raise smtplib.SMTPDataError(*data)
    return classify(*_send_body(conn, message))


def _send_body(conn: smtplib.SMTP, message: bytes) -> tuple[int, bytes]:
    """The message, dot-stuffed (RFC 5321 4.5.2) with bytes.replace, then the final dot."""
    body = message.replace(b"\n.", b"\n..")
    if body.startswith(b"."):
        body = b"." + body
    conn.send(body + (b".\r\n" if body.endswith(b"\r\n") else b"\r\n.\r\n"))
    return conn.getreply()


def _refused(conn: smtplib.SMTP, outcome: Outcome) -> Outcome:
    if outcome.code != 421:
        conn.rset()
    return outcome


def _close_quietly(conn: smtplib.SMTP | None) -> None:
    if conn is not None:
        with contextlib.suppress(OSError):
            conn.close()


class Pace:
    """A relay's rate per second and rolling hourly cap, on the monotonic clock."""

    def __init__(self, relay: RelaySettings, sent_before: Iterable[float] = ()) -> None:
        self.interval = 1.0 / relay.rate_per_second if relay.rate_per_second > 0 else 0.0
        self.cap = relay.hourly_limit
        self.next_slot = 0.0
        self.recent: deque[float] = deque(sent_before if self.cap else ())

    def wait_seconds(self, now: float) -> float:
        """How long until this relay may take another message (0 = now)."""
        while self.recent and self.recent[0] <= now - HOUR:
            self.recent.popleft()
        capped = self.recent[0] + HOUR - now if self.cap and len(self.recent) >= self.cap else 0.0
        return max(capped, self.next_slot - now, 0.0)

    def take(self, now: float) -> None:
        """Count one message handed to the relay."""
        self.next_slot = max(now, self.next_slot) + self.interval
        if self.cap:
            self.recent.append(now)


@dataclass(frozen=True)
class SendHistory:
    """Each capped relay's sends of the last hour (from the database), as of a clock reading."""

    as_of: datetime
    sends: dict[str, list[datetime]] = field(default_factory=dict)

    def monotonic(self, label: str) -> list[float]:
        """A relay's send times as points on the monotonic clock the pacing runs on."""
        mono = time.monotonic()
        return [mono - (self.as_of - t).total_seconds() for t in self.sends.get(label, [])]


class SmtpPool:
    """Every configured relay, chosen by weight among those under their limits."""

    def __init__(
        self,
        settings: SmtpSettings,
        *,
        history: SendHistory | None = None,
        rng: random.Random | None = None,
    ) -> None:
        relays = [r for r in settings.all_relays() if r.weight > 0]
        self._pools = [ConnectionPool(r) for r in relays]
        self._paces = [Pace(r, history.monotonic(r.label) if history else ()) for r in relays]
        self._rng = rng or random.Random()
        self._interrupted = asyncio.Event()

    @property
    def labels(self) -> list[str]:
        """The relays' names, as kept on deliveries."""
        return [p.relay.label for p in self._pools]

    async def send(self, message: bytes, *, sender: str, recipient: str) -> Outcome:
        """Send through a relay under its limits; UNSENT if interrupted while waiting."""
        index = await self._pick()
        if index is None:
            return Outcome(Result.UNSENT, "stopped before sending")
        return await self._pools[index].send(message, sender=sender, recipient=recipient)

    async def _pick(self) -> int | None:
        while not self._interrupted.is_set():
            now = time.monotonic()
            waits = [pace.wait_seconds(now) for pace in self._paces]
            ready = [i for i, w in enumerate(waits) if w == 0.0]
            if ready:
                weights = [self._pools[i].relay.weight for i in ready]
                index = self._rng.choices(ready, weights)[0]
                self._paces[index].take(now)
                return index
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._interrupted.wait(), timeout=min(waits))
        return None

    def interrupt(self) -> None:
        """Stop waiting for rate limits: sends not yet handed to a relay come back UNSENT."""
        self._interrupted.set()

    async def close_idle(self) -> None:
        """Say QUIT on idle connections (a long wait ahead); the limits keep their count."""
        for pool in self._pools:
            await asyncio.to_thread(pool.quit_idle)

    async def close(self) -> None:
        """Finish what is in flight, say QUIT, stop the threads."""
        for pool in self._pools:
            await asyncio.to_thread(pool.close_blocking)


def load_history(
    factory: sessionmaker[Session],
    settings: SmtpSettings,
    clock: Clock,
    *,
    share: tuple[int, int] = (0, 1),
) -> SendHistory:
    """Each capped relay's sends in the last hour, by the injected clock.

    Worker i of n takes every n-th of them, as its settings carry 1/n of each cap.
    """
    now = clock.now()
    capped = [r.label for r in settings.all_relays() if r.hourly_limit]
    if not capped:
        return SendHistory(as_of=now)
    index, count = share
    since = now - timedelta(seconds=HOUR)
    with unit_of_work(factory) as session:
        sends = {
            label: recent_sends(session, relay=label, since=since)[index::count] for label in capped
        }
    return SendHistory(as_of=now, sends=sends)


@contextlib.asynccontextmanager
async def open_pool(
    settings: Settings,
    factory: sessionmaker[Session],
    clock: Clock,
    *,
    share: tuple[int, int] = (0, 1),
) -> AsyncIterator[SmtpPool]:
    """The relays' pool, seeded with each capped relay's last hour of sends; closed on exit.

    `share` is (i, n) for worker i of n, whose settings carry 1/n of each cap (cli/workers.py).
    """
    history = await asyncio.to_thread(load_history, factory, settings.smtp, clock, share=share)
    pool = SmtpPool(settings.smtp, history=history)
    try:
        yield pool
    finally:
        await pool.close()
