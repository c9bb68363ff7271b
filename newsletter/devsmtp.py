"""A local SMTP server that keeps every message it receives in a Maildir, for trying things."""

from __future__ import annotations

import mailbox
import socket
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from newsletter.errors import ConfigError

MAILDIR_FOLDERS = ("tmp", "new", "cur")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (aiosmtpd cannot bind port 0 and report it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class MaildirHandler:
    """Stores each received message in a Maildir, with its envelope in two headers."""

    def __init__(self, maildir: Path) -> None:
        make_maildir(maildir)
        self.maildir = mailbox.Maildir(maildir, create=False)
        self.count = 0
        self.keys: list[str] = []  # Maildir keys in the order the messages arrived

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        """Offer PIPELINING, as real relays do: aiosmtpd reads commands line by line, so it
        serves pipelined ones (and a next envelope sent with a final dot) in order."""
        session.host_name = hostname
        return [*responses[:-1], "250-PIPELINING", responses[-1]]

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        head = (
            f"Return-Path: <{envelope.mail_from}>\r\n"
            f"X-Delivered-To: {', '.join(envelope.rcpt_tos)}\r\n"
        ).encode()
        self.keys.append(self.maildir.add(head + content))
        self.count += 1
        return "250 Message accepted for delivery"


def make_maildir(path: Path) -> None:
    """Make `path` a Maildir, also when it exists already (empty, or missing a folder)."""
    # mailbox.Maildir(create=True) only creates a folder that does not exist: given an existing
    # empty one it adds nothing, and every message is refused for want of tmp/.
    try:
        for folder in MAILDIR_FOLDERS:
            (path / folder).mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{path}: cannot keep mail there ({e.strerror})") from None


def start_dev_smtp(*, host: str, port: int, maildir: Path, handler: Any = None) -> Controller:
    """Start the server in a background thread; call .stop() on the result to end it."""
    controller = Controller(
        handler or MaildirHandler(maildir),
        hostname=host,
        port=port,
        data_size_limit=10 * 1024 * 1024,
        server_hostname="newsletter-dev-smtp",
        ready_timeout=10,
    )
    controller.start()
    return controller
