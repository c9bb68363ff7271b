"""A fault-injecting aiosmtpd handler: 421/451/550 at MAIL, RCPT or DATA, drops, stalls."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

from aiosmtpd.controller import Controller

from newsletter.devsmtp import free_port


@dataclass
class Fault:
    """Answer `reply` at `stage` (MAIL, RCPT, DATA), or drop / stall there, for matching mail."""

    stage: str
    reply: str = ""
    drop: bool = False
    stall_seconds: float = 0.0
    # Only for recipients containing this text; empty = everyone. At MAIL no recipient is known
    # yet, so a MAIL fault with `only` never fires: pick its message with `times` instead.
    only: str = ""
    times: int = -1  # how many times; -1 = always


@dataclass
class FaultyHandler:
    """Keeps every accepted message (bytes, envelope) and applies the faults in order."""

    faults: list[Fault] = field(default_factory=list)
    received: list[tuple[str, list[str], bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Offered as real relays offer it: the sender then sends each next envelope with the final
    # dot (smtp.Chain), so the faults meet that path too.
    pipelining: bool = True

    async def handle_EHLO(self, server, session, envelope, hostname, responses):  # type: ignore[no-untyped-def]
        session.host_name = hostname
        if not self.pipelining:
            return responses
        return [*responses[:-1], "250-PIPELINING", responses[-1]]

    def _match(self, stage: str, rcpts: list[str]) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.stage != stage or fault.times == 0:
                    continue
                if fault.only and not any(fault.only in r for r in rcpts):
                    continue
                fault.times -= 1 if fault.times > 0 else 0
                return fault
        return None

    async def _apply(self, server: Any, stage: str, rcpts: list[str]) -> str | None:
        fault = self._match(stage, rcpts)
        if fault is None:
            return None
        if fault.stall_seconds:
            await asyncio.sleep(fault.stall_seconds)
        if fault.drop:
            server.transport.abort()
            return "421 dropped"
        return fault.reply or None

    async def handle_MAIL(self, server, session, envelope, address, options):  # type: ignore[no-untyped-def]
        reply = await self._apply(server, "MAIL", [])
        if reply:
            return reply
        envelope.mail_from, envelope.mail_options = address, options
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, options):  # type: ignore[no-untyped-def]
        reply = await self._apply(server, "RCPT", [address])
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
        reply = await self._apply(server, "DATA", list(envelope.rcpt_tos))
        if reply:
            return reply
        with self.lock:
            self.received.append(
                (envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content)
            )
        return "250 2.0.0 accepted"

    def messages(self) -> list[EmailMessage]:
        """Every accepted message, parsed with the email package."""
        with self.lock:
            raws = [raw for _f, _r, raw in self.received]
        return [message_from_bytes(r, policy=policy.default) for r in raws]  # type: ignore[misc]


@contextmanager
def faulty_smtpd(handler: FaultyHandler) -> Iterator[int]:
    """Run the handler on 127.0.0.1 at a free port; yields the port."""
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port, ready_timeout=10)
    controller.start()
    try:
        yield port
    finally:
        controller.stop()
