"""One SMTP client connection on the event loop: greeting, EHLO, STARTTLS, AUTH, transactions.

The sender's hot path. An asyncio Protocol reads the server's replies as they arrive and the
commands go out with one write each, so a message costs the event loop a few callbacks and no
thread: smtplib driven by a pool of threads paid two hand-offs per message and passed the GIL
between up to eleven threads, which made the SMTP exchange most of the sender's CPU
(docs/performance.md). Failures raise smtplib's exceptions (all OSErrors), so `smtp.classify_error`
reads them as it always has.

A server cannot make the client wait or grow without bound: every reply has `timeout_seconds`
from the moment it is awaited (the reply to a message's final dot `final_reply_timeout_seconds`),
a reply line is at most 8,192 bytes (smtplib's own limit), a multi-line reply at most 64 KiB,
and more than MAX_WAITING replies unread close the connection.

A refusal at RCPT is about the reader's mailbox only when its status says so (`refuses_mailbox`,
with `mailbox_refused`, which bounces.py applies to delivery status notifications too): a relay's
policy refusal (554 5.7.1 Relay access denied) is the sender's problem, and nobody is suppressed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import re
import smtplib
import ssl
from collections import deque
from collections.abc import Awaitable, Callable

from newsletter.config import RelaySettings

MAX_LINE = 8192
MAX_REPLY = 64 * 1024
# Replies received and not yet read: a pipelined transaction with a carried envelope has four
# at most (the dot's, MAIL, RCPT, DATA); more is a server talking unasked, out of step.
MAX_WAITING = 16
QUIT_SECONDS = 2.0
# Characters that make an address more than a bare addr-spec: such a one goes through
# smtplib.quoteaddr (an email.utils parse, 17 us) instead of plain angle brackets.
NOT_BARE = frozenset('<>()",;: \t\\[]')
# An enhanced status code (RFC 3463), e.g. 5.1.1: at most nine characters. Used with fullmatch
# on one word of at most 16 bytes, and no quantifier is nested: constant time.
_STATUS = re.compile(rb"[245]\.\d{1,3}\.\d{1,3}")
# Without an enhanced status code, the basic codes that refuse the mailbox itself: 550 mailbox
# unavailable, 551 user not local, 553 mailbox name not allowed (RFC 5321 4.2.3). Others (552,
# 554, 5.7.x policy) refuse this delivery, not the address.
MAILBOX_CODES = frozenset({550, 551, 553})


def stuff(data: bytes) -> bytes:
    """Dot-stuffed for SMTP's DATA (RFC 5321 4.5.2): a line starting with "." gets another.

    `data` must start at the start of a line (or not with a dot).
    """
    data = data.replace(b"\n.", b"\n..")
    return b"." + data if data.startswith(b".") else data


class Wire(bytes):
    """A message already dot-stuffed (message.MessageTemplate.render's wire form): the
    transport sends it as it is, sparing a scan of every byte."""


class NotReady(Exception):
    """What a message's final dot waited for failed: the caller drops the connection mid-DATA."""


class EnvelopeLost(smtplib.SMTPServerDisconnected):
    """The connection failed before the server answered an envelope sent with the previous
    message's final dot: nothing of this message went, and it may go on another connection."""


class SmtpProtocol(asyncio.Protocol):
    """Collects the server's replies as (code, text) and hands them to whoever awaits one."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._lines: list[bytes] = []  # the reply being read, line by line
        self._size = 0
        self._replies: deque[tuple[int, bytes]] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._error: OSError | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport the commands are written to."""
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        """Split what came into lines and lines into replies.

        Linear in what arrived: a complete line is scanned once; a partial one (at most
        MAX_LINE bytes, past that the connection fails) is scanned again when more comes.
        """
        buffer = self._buffer
        buffer += data
        start = 0
        while (end := buffer.find(b"\n", start)) >= 0:
            self._line(bytes(buffer[start:end]).rstrip(b"\r"))
            start = end + 1
        del buffer[:start]
        if len(buffer) > MAX_LINE:
            self._fail(smtplib.SMTPResponseException(500, b"reply line too long"))
        elif len(self._replies) > MAX_WAITING:  # once per read, not per reply
            self._fail(smtplib.SMTPResponseException(-1, b"replies nobody asked for"))
        self._wake()

    def _line(self, line: bytes) -> None:
        self._size += len(line)
        if len(line) > MAX_LINE or self._size > MAX_REPLY:
            self._fail(smtplib.SMTPResponseException(500, b"reply too long"))
            return
        self._lines.append(line[4:].strip())
        if line[3:4] != b"-":  # the last line of a reply: "250 ok", not "250-PIPELINING"
            code = int(line[:3]) if line[:3].isdigit() else -1  # as smtplib reads a bad code
            self._replies.append((code, b"\n".join(self._lines)))
            self._lines, self._size = [], 0

    def connection_lost(self, exc: Exception | None) -> None:
        """The server (or we) closed the connection: whoever waits learns it."""
        if self._error is None:
            self._error = smtplib.SMTPServerDisconnected(
                f"connection closed: {exc}" if exc else "connection closed by the server"
            )
        self._wake()

    def _fail(self, error: OSError) -> None:
        self._error = error
        if self.transport is not None:
            self.transport.abort()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if self._replies:
            waiter.set_result(None)
        elif self._error is not None:
            waiter.set_exception(self._error)

    async def reply(self, timeout: float) -> tuple[int, bytes]:
        """The next reply, waiting at most `timeout` seconds for it."""
        if not self._replies:
            if self._error is not None:
                raise self._error
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            timer = loop.call_later(timeout, _time_out, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        return self._replies.popleft()

    def quiet(self) -> bool:
        """Nothing received that was not read: no reply waiting, no partial line."""
        return not self._replies and not self._buffer

    def usable(self, *, expected: bool = False) -> bool:
        """Still open, nothing failed, and nothing unread (unless replies are `expected`)."""
        transport = self.transport
        return (
            self._error is None
            and transport is not None
            and not transport.is_closing()
            and (expected or self.quiet())
        )

    def write(self, data: bytes) -> None:
        """Send bytes; a connection already lost says so at the next reply."""
        if self.transport is None or self.transport.is_closing():
            raise self._error or smtplib.SMTPServerDisconnected("not connected")
        self.transport.write(data)


def _time_out(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError("timed out waiting for the server's reply"))


def mailbox_refused(status: str) -> bool:
    """Whether a permanent status code is about the recipient's mailbox or address (RFC 3463:
    X.0.0 undetermined, X.1.x addressing but X.1.7/X.1.8 the sender's address, X.2.0 to X.2.2
    mailbox status)."""
    _, subject, detail = status.split(".") if status.count(".") == 2 else ("", "", "")
    if subject == "0":
        return detail == "0"
    if subject == "2":
        # X.2.0 other mailbox status, X.2.1 mailbox disabled, X.2.2 mailbox full: the mailbox.
        # RFC 3463 calls a full mailbox usually transient; a 5.2.2 is a receiver saying it gave
        # up (an abandoned mailbox over quota), and whoever empties theirs can sign up again.
        # X.2.3 (message length over an administrative limit) and X.2.4 (mailing list
        # expansion) refuse this message, not the address: nobody is suppressed for them.
        return detail in ("0", "1", "2")
    return subject == "1" and detail not in ("7", "8")


def enhanced_status(text: bytes) -> str:
    """The enhanced status code opening a reply's text (RFC 2034), e.g. "5.1.1"; "" if none."""
    # A valid code is at most nine bytes: a first word cut at 16 that matches was not cut.
    words = text[:16].split(maxsplit=1)
    return words[0].decode("ascii") if words and _STATUS.fullmatch(words[0]) else ""


def refuses_mailbox(code: int, text: bytes) -> bool:
    """Whether a 5xx reply to RCPT refuses the recipient's mailbox itself, so that the address
    is suppressed: by its enhanced status code (`mailbox_refused`), else by MAILBOX_CODES."""
    if not 500 <= code < 600:
        return False
    status = enhanced_status(text)
    return mailbox_refused(status) if status else code in MAILBOX_CODES


def envelope_address(address: str) -> str:
    """The address in angle brackets for MAIL FROM / RCPT TO."""
    if NOT_BARE.isdisjoint(address):
        return f"<{address}>"
    return smtplib.quoteaddr(address)


class SmtpConnection:
    """An open, greeted (and, as configured, encrypted and logged-in) connection to a relay."""

    def __init__(self, protocol: SmtpProtocol, relay: RelaySettings) -> None:
        self.protocol, self.relay = protocol, relay
        self.timeout = relay.timeout_seconds
        # RFC 5321 4.5.3.2.6 gives the server 10 minutes to answer the final dot: a server slow
        # there may have queued the message already, and a time-out would send it again later.
        self.final_timeout = relay.final_reply_timeout_seconds
        self.extensions: dict[str, str] = {}
        # The envelope (sender, recipient) written with the last message's final dot, whose
        # replies are still to be read: the next `send` must be for it.
        self.carried: tuple[str, str] | None = None

    @classmethod
    async def open(cls, relay: RelaySettings) -> SmtpConnection:
        """Connect, read the greeting, EHLO, STARTTLS and AUTH as the relay is configured."""
        loop = asyncio.get_running_loop()
        context = ssl.create_default_context() if relay.security != "none" else None
        _transport, protocol = await asyncio.wait_for(
            loop.create_connection(
                SmtpProtocol,
                relay.host,
                relay.port,
                ssl=context if relay.security == "tls" else None,
            ),
            relay.timeout_seconds,
        )
        conn = cls(protocol, relay)
        try:
            code, text = await protocol.reply(conn.timeout)
            if code != 220:
                raise smtplib.SMTPConnectError(code, text)
            await conn._hello()
            if relay.security == "starttls":
                await conn._starttls(context or ssl.create_default_context())
            if relay.username:
                await conn._login(relay.username, relay.password)
        except BaseException:
            conn.abort()
            raise
        return conn

    async def command(self, line: str) -> tuple[int, bytes]:
        """Send one command line and return its reply."""
        self.protocol.write(line.encode("ascii") + b"\r\n")
        return await self.protocol.reply(self.timeout)

    async def _hello(self) -> None:
        code, text = await self.command("EHLO localhost")
        if code != 250:
            code, text = await self.command("HELO localhost")
            if code != 250:
                raise smtplib.SMTPHeloError(code, text)
            self.extensions = {}
            return
        self.extensions = {}
        for line in text.split(b"\n")[1:]:
            keyword, _, params = line.decode("ascii", "replace").partition(" ")
            self.extensions[keyword.lower()] = params.strip()

    async def _starttls(self, context: ssl.SSLContext) -> None:
        if "starttls" not in self.extensions:
            raise smtplib.SMTPNotSupportedError("STARTTLS extension not supported by server.")
        code, text = await self.command("STARTTLS")
        if code != 220:
            raise smtplib.SMTPResponseException(code, text)
        protocol = self.protocol
        if not protocol.quiet():  # sent in clear after the 220: an injection (CVE-2011-0411)
            raise smtplib.SMTPResponseException(-1, b"data after the STARTTLS reply")
        assert protocol.transport is not None
        loop = asyncio.get_running_loop()
        secure = await asyncio.wait_for(
            loop.start_tls(protocol.transport, protocol, context, server_hostname=self.relay.host),
            self.timeout,
        )
        assert isinstance(secure, asyncio.Transport)
        if not protocol.quiet():  # came in clear while the handshake was being set up
            raise smtplib.SMTPResponseException(-1, b"data in clear before the TLS handshake")
        protocol.transport = secure
        await self._hello()

    async def _login(self, user: str, password: str) -> None:
        """AUTH with the first of PLAIN, LOGIN, CRAM-MD5 the server offers."""
        if "auth" not in self.extensions:
            raise smtplib.SMTPNotSupportedError("SMTP AUTH extension not supported by server.")
        offered = self.extensions["auth"].upper().split()
        if "PLAIN" in offered:
            code, text = await self.command("AUTH PLAIN " + _b64(f"\0{user}\0{password}".encode()))
        elif "LOGIN" in offered:
            code, text = await self.command("AUTH LOGIN " + _b64(user.encode()))
            if code == 334:
                code, text = await self.command(_b64(password.encode()))
        elif "CRAM-MD5" in offered:
            code, text = await self.command("AUTH CRAM-MD5")
            if code == 334:
                try:
                    challenge = base64.b64decode(text, validate=True)
                except ValueError:  # binascii.Error
                    raise smtplib.SMTPException("not a CRAM-MD5 challenge") from None
                digest = hmac.new(password.encode(), challenge, "md5").hexdigest()
                code, text = await self.command(_b64(f"{user} {digest}".encode()))
        else:
            raise smtplib.SMTPException("no suitable authentication method offered")
        if code not in (235, 503):  # 503: already authenticated
            raise smtplib.SMTPAuthenticationError(code, text)

    async def send(
        self,
        message: bytes,
        sender: str,
        recipient: str,
        *,
        ready: Awaitable[object] | None = None,
        follow: Callable[[], tuple[str, str] | None] | None = None,
    ) -> tuple[int, bytes, bool]:
        """One mail transaction: (code, reply, whether a refusal was about the recipient's
        mailbox: `refuses_mailbox` of a refusal at RCPT).

        MAIL, RCPT and DATA go in one write when the server offers PIPELINING (RFC 2920): two
        round trips, not four. The addresses were checked first (smtp.unusable_envelope): no
        line break can end a command early. The final dot, which lets the server accept the
        message, waits for `ready`; the caller drops the connection if that raises.

        `follow`, asked once the final dot may go, names the next message's envelope, or None.
        Its MAIL, RCPT and DATA then go in the dot's write (RFC 2920 3.1: message content may
        open a group), so the next message costs one round trip here, not two. The connection
        then carries that envelope (`carried`): only a `send` for it may come next, or an abort.
        """
        body = message if isinstance(message, Wire) else stuff(message)
        end = b".\r\n" if body.endswith(b"\r\n") else b"\r\n.\r\n"
        protocol, timeout = self.protocol, self.timeout
        pipelining = "pipelining" in self.extensions
        if pipelining:
            carried, self.carried = self.carried, None
            if carried is None:
                if not protocol.quiet():  # a reply nobody asked for: the dialogue is out of step
                    raise smtplib.SMTPResponseException(-1, b"unexpected reply before MAIL")
                protocol.write(_envelope(sender, recipient))
            elif carried != (sender, recipient):
                raise ValueError("a send for another envelope than the one carried")
            try:
                mail = await protocol.reply(timeout)
            except OSError as error:
                # Only a hang-up: a server silent past the time-out may still be at work, and
                # this message's outcome (deferred) should not wait for a second time-out.
                if carried is None or isinstance(error, TimeoutError):
                    raise
                raise EnvelopeLost(f"before the carried envelope's reply: {error}") from error
            if mail[0] == 421:  # the server is closing; the other replies will not come
                return (*mail, False)
            refusal = None if mail[0] == 250 else (*mail, False)
            try:
                rcpt = await protocol.reply(timeout)
                if rcpt[0] == 421:
                    return (*rcpt, False)
                if refusal is None and rcpt[0] not in (250, 251):
                    refusal = (*rcpt, refuses_mailbox(*rcpt))
                data = await protocol.reply(timeout)
            except OSError:
                if refusal is not None:  # refused, then hung up: the refusal is the answer
                    return refusal
                raise
            if not protocol.quiet():  # more than three replies: the dialogue is out of step
                raise smtplib.SMTPResponseException(-1, b"unexpected reply after DATA")
            if refusal is not None:
                if data[0] == 354:  # a server that opened DATA anyway gets an empty message
                    protocol.write(b".\r\n")
                    await protocol.reply(timeout)
                return await self._refused(refusal)
        else:
            if not protocol.quiet():
                raise smtplib.SMTPResponseException(-1, b"unexpected reply before MAIL")
            mail = await self.command(f"MAIL FROM:{envelope_address(sender)}")
            if mail[0] != 250:
                return await self._refused((*mail, False))
            rcpt = await self.command(f"RCPT TO:{envelope_address(recipient)}")
            if rcpt[0] not in (250, 251):
                return await self._refused((*rcpt, refuses_mailbox(*rcpt)))
            data = await self.command("DATA")
        if data[0] != 354:
            raise smtplib.SMTPDataError(*data)
        if not protocol.quiet():  # the server waits for the content: a reply now is out of step
            raise smtplib.SMTPResponseException(-1, b"unexpected reply after 354")
        if ready is not None:
            protocol.write(body)
            body = b""
            try:
                await ready
            except Exception as error:  # not an OSError: no outcome of this message
                raise NotReady(
                    "what this message waited for failed; nothing was accepted"
                ) from error
        following = follow() if follow is not None and pipelining else None
        if following is None:
            protocol.write(body + end)
        else:
            protocol.write(body + end + _envelope(*following))
            self.carried = following
        return (*await protocol.reply(self.final_timeout), False)

    async def _refused(self, refusal: tuple[int, bytes, bool]) -> tuple[int, bytes, bool]:
        """After a refusal, RSET so the connection serves the next message (a server that hung
        up instead leaves the refusal standing, and the connection unusable)."""
        if refusal[0] != 421:
            with contextlib.suppress(OSError):
                if (await self.command("RSET"))[0] != 250:  # out of step: not reused
                    self.abort()
        return refusal

    @property
    def usable(self) -> bool:
        """Open, and in step: nothing failed and no reply is waiting unread but a carried
        envelope's."""
        return self.protocol.usable(expected=self.carried is not None)

    async def quit(self) -> None:
        """Say QUIT (waiting briefly for the answer) and close."""
        try:
            self.protocol.write(b"QUIT\r\n")
            await self.protocol.reply(min(self.timeout, QUIT_SECONDS))
        except OSError:
            pass
        finally:
            self.abort()

    def abort(self) -> None:
        """Close at once: the connection's state is unknown or no longer wanted."""
        if self.protocol.transport is not None:
            self.protocol.transport.abort()


def _envelope(sender: str, recipient: str) -> bytes:
    """MAIL, RCPT and DATA for one message, to be written as one group (PIPELINING)."""
    mail_from, rcpt_to = envelope_address(sender), envelope_address(recipient)
    return f"MAIL FROM:{mail_from}\r\nRCPT TO:{rcpt_to}\r\nDATA\r\n".encode()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
