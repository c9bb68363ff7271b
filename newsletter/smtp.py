"""SMTP transport: a small pool of reused aiosmtplib connections and a reply classifier.

2xx is sent, 4xx and a dropped connection are temporary (retry later), 5xx is permanent.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

import aiosmtplib

from newsletter.config import SmtpSettings


class Result(StrEnum):
    SENT = "sent"
    TEMPORARY = "temporary"
    PERMANENT = "permanent"


@dataclass(frozen=True)
class Outcome:
    result: Result
    reply: str
    code: int | None = None
    # A recipient-level refusal (a bad mailbox at RCPT) suppresses the address; others do not.
    recipient_level: bool = False


class Transport(Protocol):
    """What the sender needs from a mail transport."""

    async def send(self, message: bytes, *, sender: str, recipient: str) -> Outcome: ...

    async def close(self) -> None: ...


def classify(code: int | None, reply: str, *, recipient_level: bool = False) -> Outcome:
    """Turn an SMTP reply code into an Outcome."""
    text = f"{code} {reply}".strip() if code else reply
    if code is not None and 200 <= code < 300:
        return Outcome(Result.SENT, text, code)
    if code is not None and 500 <= code < 600:
        return Outcome(Result.PERMANENT, text, code, recipient_level)
    return Outcome(Result.TEMPORARY, text, code)


def classify_error(error: Exception) -> Outcome:
    """Classify an exception raised while sending one message."""
    if isinstance(error, aiosmtplib.SMTPRecipientsRefused):
        first = error.recipients[0]
        return classify(first.code, first.message, recipient_level=True)
    if isinstance(error, aiosmtplib.SMTPResponseException):
        return classify(error.code, error.message)
    if isinstance(error, ValueError):  # an address aiosmtplib cannot put in an envelope
        return Outcome(Result.PERMANENT, f"unusable address: {error}", None, True)
    # Dropped connection, time-out, refused connection: the server said nothing final.
    return Outcome(Result.TEMPORARY, f"{type(error).__name__}: {error}".strip())


class SmtpPool:
    """Up to `pool_size` connections to one SMTP server, each reused for many messages."""

    def __init__(self, settings: SmtpSettings) -> None:
        self._settings = settings
        self._idle: asyncio.LifoQueue[aiosmtplib.SMTP] = asyncio.LifoQueue()
        self._slots = asyncio.Semaphore(settings.pool_size)
        self._all: set[aiosmtplib.SMTP] = set()

    async def _connect(self) -> aiosmtplib.SMTP:
        s = self._settings
        client = aiosmtplib.SMTP(
            hostname=s.host,
            port=s.port,
            timeout=s.timeout_seconds,
            use_tls=s.security == "tls",
            start_tls=s.security == "starttls",
            tls_context=ssl.create_default_context() if s.security != "none" else None,
            username=s.username or None,
            password=s.password or None,
            local_hostname="localhost",
        )
        await client.connect()
        self._all.add(client)
        return client

    async def send(self, message: bytes, *, sender: str, recipient: str) -> Outcome:
        """Send one message to one recipient over a pooled connection."""
        async with self._slots:
            client = self._idle.get_nowait() if not self._idle.empty() else None
            try:
                if client is None or not client.is_connected:
                    client = await self._connect()
                _errors, reply = await client.sendmail(sender, [recipient], message)
            except Exception as error:  # every failure becomes an Outcome, never a crash
                await self._discard(client, error)
                return classify_error(error)
            self._idle.put_nowait(client)
            return classify(250, reply)

    async def _discard(self, client: aiosmtplib.SMTP | None, error: Exception) -> None:
        """Keep a connection after a plain refusal; drop it after anything else."""
        if client is None:
            return
        if (
            isinstance(error, aiosmtplib.SMTPResponseException | aiosmtplib.SMTPRecipientsRefused)
            and client.is_connected
        ):
            self._idle.put_nowait(client)
            return
        self._all.discard(client)
        client.close()

    async def close(self) -> None:
        """Say QUIT on every open connection."""
        while not self._idle.empty():
            client = self._idle.get_nowait()
            self._all.discard(client)
            try:
                await client.quit()
            except aiosmtplib.SMTPException:
                client.close()
        for client in list(self._all):
            client.close()
        self._all.clear()
