"""SMTP transport: pools of reused connections per relay, rate limits, and a reply classifier.

2xx is sent, 4xx and a dropped connection are temporary (retry later), 5xx is permanent; a 5xx
at RCPT whose status refuses the mailbox (smtp_wire.refuses_mailbox) has the address
suppressed, a policy refusal only fails the delivery. Transport failures (refused or
dropped connections, time-outs, TLS errors) are outcomes too; a bug (a TypeError, an
AttributeError) is not, and raises. Each relay ([smtp] and [smtp] relays) has its own pool of
connections on the event loop (smtp_wire.py): no thread, no hand-off per message.

Every sender opens its pool with `open_pool`, which seeds each capped relay with its sends of
the last hour from the database, so an `hourly_limit` holds across runs and restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import smtplib
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Protocol

from sqlalchemy.orm import Session, sessionmaker

from newsletter.clock import Clock
from newsletter.config import RelaySettings, Settings, SmtpSettings
from newsletter.db import unit_of_work
from newsletter.db.queries import recent_sends
from newsletter.smtp_wire import EnvelopeLost, SmtpConnection

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

    async def send(
        self,
        message: bytes,
        *,
        sender: str,
        recipient: str,
        ready: Awaitable[object] | None = None,
        chain: Chain | None = None,
        may_wait: Callable[[], bool] | None = None,
        may_go: Callable[[], Awaitable[bool]] | None = None,
        urgent: bool = False,
    ) -> Outcome:
        """Send one message; its final dot (acceptance) waits for `ready`, if given.

        `chain`: the calling lane's, so its next message's envelope may go with this one's
        final dot (see Chain); a transport may ignore it. `may_wait`: asked whenever a wait for
        a limit wakes; `may_go`: awaited once, right before the message goes to a server. If
        either says no, the message is not sent and the outcome is UNSENT. An `urgent` message
        (an alert's) takes a free slot of a limit before any other waiting for one.
        """
        ...

    def wake(self) -> None:
        """Let every send waiting for a limit ask its `may_wait` again (e.g. a pause came)."""
        ...

    def interrupt(self) -> None: ...

    async def close(self) -> None: ...


def classify(
    code: int | None, reply: str | bytes, *, recipient_level: bool = False, relay: str = ""
) -> Outcome:
    """Turn an SMTP reply code into an Outcome."""
    if isinstance(reply, bytes):
        reply = reply.decode("utf-8", "replace")
    reply = " ".join(reply.split())
    text = f"{code} {reply}".strip() if code else reply
    if code is not None and 200 <= code < 300:
        return Outcome(Result.SENT, text, code, relay=relay)
    if code is not None and 500 <= code < 600:
        return Outcome(Result.PERMANENT, text, code, recipient_level, relay)
    return Outcome(Result.TEMPORARY, text, code, relay=relay)


def classify_error(error: BaseException) -> Outcome:
    """Turn a transport error raised while sending one message into an Outcome; a bug raises."""
    if isinstance(error, smtplib.SMTPResponseException):
        outcome = classify(error.smtp_code, error.smtp_error)
        if outcome.result is Result.SENT:  # a 2xx where another reply belonged: nothing went
            return Outcome(Result.TEMPORARY, f"out of step: {outcome.reply}", outcome.code)
        return outcome
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


class Chain:
    """One lane's way of sending its next message on the connection its last one used.

    `follow` is asked, when a message's final dot may go, for the lane's next message's
    (sender, recipient), or None. An envelope it names goes in the dot's write, and the
    connection, with its pool slot, stays here for that message: the lane must send it next
    with this chain, or `drop` the chain (the server is waiting for that message's content).
    """

    def __init__(self, follow: Callable[[], tuple[str, str] | None]) -> None:
        self._follow = follow
        self._held: tuple[ConnectionPool, SmtpConnection] | None = None

    def follow(self) -> tuple[str, str] | None:
        """The next message's envelope, if the lane has one an SMTP command can carry."""
        following = self._follow()
        if following is None or unusable_envelope(*following) is not None:
            return None  # the lane sends it on its own, and learns there why it cannot go
        return following

    def hold(self, pool: ConnectionPool, conn: SmtpConnection) -> None:
        """Keep a connection carrying the next message's envelope."""
        self.drop()
        self._held = (pool, conn)

    def take(self, pool: ConnectionPool) -> SmtpConnection | None:
        """The connection held for `pool`, if any (its slot goes with it)."""
        held, self._held = self._held, None
        if held is None:
            return None
        if held[0] is not pool:
            held[0].let_go(held[1])
            return None
        return held[1]

    def drop(self) -> None:
        """Close a connection held for a message that will not come."""
        held, self._held = self._held, None
        if held is not None:
            held[0].let_go(held[1])


class ConnectionPool:
    """Up to `pool_size` connections to one relay, each carrying one message at a time."""

    def __init__(self, relay: RelaySettings) -> None:
        self.relay = relay
        self._idle: list[SmtpConnection] = []
        self._slots = asyncio.BoundedSemaphore(relay.pool_size)  # a slot freed twice raises
        self._closed = False

    async def send(
        self,
        message: bytes,
        *,
        sender: str,
        recipient: str,
        ready: Awaitable[object] | None = None,
        chain: Chain | None = None,
        may_go: Callable[[], Awaitable[bool]] | None = None,
    ) -> Outcome:
        """Send one message over a pooled connection (a new one if none is idle).

        `ready` (the previous outcome's commit): awaited before the final dot; if it fails, the
        connection is dropped mid-DATA, so the server keeps nothing, and its error raises.
        `chain`: the connection carrying this message's envelope, if the lane's last message
        sent it; the next message's envelope may go with this one's final dot. `may_go`: awaited
        once a connection is ready, right before the message goes; no means UNSENT.
        """
        conn = chain.take(self) if chain is not None else None
        refused = unusable_envelope(sender, recipient)
        if refused is not None:
            if conn is not None:  # not a message Chain.follow names; kept safe all the same
                self.let_go(conn)
            return replace(refused, relay=self.relay.label)
        chained = conn is not None
        if conn is None:
            await self._slots.acquire()
        follow = chain.follow if chain is not None and not self._closed else None
        try:
            conn = conn or self._take_idle() or await SmtpConnection.open(self.relay)
            if may_go is not None and not await may_go():  # e.g. paused while it waited
                if chained or self._closed:  # a chained one holds this message's envelope
                    self.let_go(conn)
                else:
                    self._idle.append(conn)
                    self._slots.release()
                return Outcome(Result.UNSENT, "stopped before sending", relay=self.relay.label)
            try:
                code, reply, recipient_level = await conn.send(
                    message, sender, recipient, ready=ready, follow=follow
                )
            except EnvelopeLost:  # e.g. a server that hangs up after so many messages
                conn.abort()
                conn = None
                conn = self._take_idle() or await SmtpConnection.open(self.relay)
                code, reply, recipient_level = await conn.send(
                    message, sender, recipient, ready=ready, follow=follow
                )
        except TRANSPORT_ERRORS as error:  # a failure on the wire is an Outcome, not a crash
            if conn is not None:
                conn.abort()
            self._slots.release()
            return replace(classify_error(error), relay=self.relay.label)
        except BaseException:  # a bug or a cancel: the connection's state is unknown
            if conn is not None:
                conn.abort()
            self._slots.release()
            raise
        if code == 421 or self._closed or not conn.usable:  # closing, or out of step
            self.let_go(conn)
        elif conn.carried is not None and chain is not None:
            chain.hold(self, conn)
        else:
            self._idle.append(conn)
            self._slots.release()
        return classify(code, reply, recipient_level=recipient_level, relay=self.relay.label)

    def let_go(self, conn: SmtpConnection) -> None:
        """Close a connection that was in use and free its slot."""
        conn.abort()
        self._slots.release()

    def _take_idle(self) -> SmtpConnection | None:
        """An idle connection still open (a server may close one that idled too long)."""
        while self._idle:
            conn = self._idle.pop()
            if conn.usable:
                return conn
            conn.abort()
        return None

    async def quit_idle(self) -> None:
        """Say QUIT on every idle connection; the next message opens a new one."""
        idle, self._idle = self._idle, []
        await asyncio.gather(*(conn.quit() for conn in idle))

    async def close(self) -> None:
        """Say QUIT on idle connections; one still in use closes when its message is done."""
        self._closed = True
        await self.quit_idle()


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
        # A send recorded ahead of the clock (set back since) counts as just now: else a capped
        # relay would wait for the jump as well as the hour.
        return [
            mono - max((self.as_of - t).total_seconds(), 0.0) for t in self.sends.get(label, [])
        ]


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
        self._interrupted = False
        self._woken = asyncio.Event()  # replaced at each wake: set once, for those waiting then
        self._urgent_waiting = 0  # urgent sends waiting for a slot: the others let them first
        self._unpaced = (
            len(relays) == 1 and not relays[0].rate_per_second and not relays[0].hourly_limit
        )

    @property
    def labels(self) -> list[str]:
        """The relays' names, as kept on deliveries."""
        return [p.relay.label for p in self._pools]

    async def send(
        self,
        message: bytes,
        *,
        sender: str,
        recipient: str,
        ready: Awaitable[object] | None = None,
        chain: Chain | None = None,
        may_wait: Callable[[], bool] | None = None,
        may_go: Callable[[], Awaitable[bool]] | None = None,
        urgent: bool = False,
    ) -> Outcome:
        """Send through a relay under its limits; UNSENT if interrupted while waiting, if
        `may_wait` says no when the wait wakes (`wake`), or `may_go` right before it goes.
        While an `urgent` send waits for a limit, no other takes a free slot.

        `ready`: awaited before the message's final dot (ConnectionPool.send). `chain` is used
        with one relay without limits only: elsewhere the next message's relay is chosen when
        it is due, and its envelope cannot go ahead of it.
        """
        index = await self._pick(may_wait, urgent)
        if index is None:
            if chain is not None:
                chain.drop()
            return Outcome(Result.UNSENT, "stopped before sending")
        # A slot taken for a message that then does not go is not given back: the limits err
        # on the safe side.
        return await self._pools[index].send(
            message,
            sender=sender,
            recipient=recipient,
            ready=ready,
            chain=chain if self._unpaced else None,
            may_go=may_go,
        )

    async def _pick(self, may_wait: Callable[[], bool] | None, urgent: bool) -> int | None:
        if self._unpaced:  # one relay without limits: nothing to choose or wait for
            return None if self._interrupted else 0
        if not urgent:
            return await self._wait_for_slot(may_wait, urgent)
        self._urgent_waiting += 1
        try:
            return await self._wait_for_slot(may_wait, urgent)
        finally:
            self._urgent_waiting -= 1
            self.wake()  # the others waiting may take a slot again

    async def _wait_for_slot(self, may_wait: Callable[[], bool] | None, urgent: bool) -> int | None:
        # Only the cheap question while waiting: every waiting lane wakes at each free slot.
        while not self._interrupted and (may_wait is None or may_wait()):
            now = time.monotonic()
            waits = [pace.wait_seconds(now) for pace in self._paces]
            ready = [i for i, w in enumerate(waits) if w == 0.0]
            timeout: float | None = min(waits)
            if ready and (urgent or not self._urgent_waiting):
                weights = [self._pools[i].relay.weight for i in ready]
                index = self._rng.choices(ready, weights)[0]
                self._paces[index].take(now)
                return index
            if ready:  # an urgent send takes it: woken once it has (see _pick)
                timeout = None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._woken.wait(), timeout=timeout)
        return None

    def wake(self) -> None:
        """Let every send waiting for a limit ask its `may_wait` again (e.g. a pause came)."""
        self._woken.set()
        self._woken = asyncio.Event()

    def interrupt(self) -> None:
        """Stop waiting for rate limits: sends not yet handed to a relay come back UNSENT."""
        self._interrupted = True
        self.wake()

    async def close_idle(self) -> None:
        """Say QUIT on idle connections (a long wait ahead); the limits keep their count."""
        for pool in self._pools:
            await pool.quit_idle()

    async def close(self) -> None:
        """Say QUIT on every connection."""
        for pool in self._pools:
            await pool.close()


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
