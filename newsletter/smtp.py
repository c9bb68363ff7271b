"""SMTP transport: pools of reused connections per relay, rate limits, and a reply classifier.

2xx is sent, 4xx and a dropped connection are temporary (retry later), 5xx is permanent; a 5xx
at RCPT is about the mailbox, so the address is suppressed. Each relay ([smtp] and [smtp]
relays) has its own pool of stdlib smtplib connections, each driven by one thread: on loopback
the SMTP dialogue is CPU-bound, and smtplib on a reused connection outran aiosmtplib here. The
sender stays asyncio; it awaits the threads.
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
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum
from typing import Protocol

from newsletter.config import RelaySettings, SmtpSettings

HOUR = 3600.0


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


def classify_error(error: Exception) -> Outcome:
    """Classify an exception raised while sending one message."""
    if isinstance(error, smtplib.SMTPResponseException):
        return classify(error.smtp_code, error.smtp_error)
    if isinstance(error, UnicodeEncodeError | ValueError):  # not a usable envelope address
        return Outcome(Result.PERMANENT, f"unusable address: {type(error).__name__}")
    # Dropped connection, time-out, refused connection: the server said nothing final.
    return Outcome(Result.TEMPORARY, f"{type(error).__name__}: {error}".strip())


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
        conn = None
        try:
            conn = self._take()
            outcome = _exchange(conn, message, sender, recipient)
        except Exception as error:  # every failure becomes an Outcome, never a crash
            _close_quietly(conn)
            return classify_error(error)
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
    """MAIL, RCPT and DATA in one write (RFC 2920), then the body: two round trips, not four."""
    if any(c in "\r\n" for c in sender + recipient):
        raise ValueError("prohibited newline in an envelope address")
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


class SmtpPool:
    """Every configured relay, chosen by weight among those under their limits."""

    def __init__(
        self,
        settings: SmtpSettings,
        *,
        history: dict[str, list[datetime]] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        relays = [r for r in settings.all_relays() if r.weight > 0]
        self._pools = [ConnectionPool(r) for r in relays]
        self._paces = [Pace(r, _to_monotonic((history or {}).get(r.label, []))) for r in relays]
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

    async def close(self) -> None:
        """Finish what is in flight, say QUIT, stop the threads."""
        for pool in self._pools:
            await asyncio.to_thread(pool.close_blocking)


def _to_monotonic(times: list[datetime]) -> list[float]:
    """Wall-clock send times (from the database) as points on the monotonic clock."""
    if not times:
        return []
    wall, mono = time.time(), time.monotonic()
    return [mono - (wall - t.timestamp()) for t in times]
