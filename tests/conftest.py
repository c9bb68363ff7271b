"""Shared fixtures: real SQLite files, real PostgreSQL when configured, a real SMTP server."""

from __future__ import annotations

import functools
import mailbox
import os
import secrets
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session, sessionmaker

from newsletter.clock import FrozenClock
from newsletter.config import Settings, load_settings
from newsletter.db import make_engine, make_sessionmaker, migrate
from newsletter.devsmtp import MaildirHandler, free_port, start_dev_smtp

PG_URL = os.environ.get("NEWSLETTER_TEST_POSTGRES_URL", "")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
SECRET = "test-secret-" + "x" * 40


@functools.cache
def _postgres_available() -> bool:
    if not PG_URL:
        return False
    engine = create_engine(PG_URL)
    try:
        with engine.connect() as conn:
            conn.execute(text("select 1"))
        return True
    except Exception:
        return False
    finally:
        engine.dispose()


def require_postgres() -> None:
    """Skip locally when PostgreSQL is absent; in CI its absence is a failure."""
    if _postgres_available():
        return
    reason = "PostgreSQL not available (set NEWSLETTER_TEST_POSTGRES_URL)"
    if IN_CI:
        pytest.fail(reason + " — CI must provide it")
    pytest.skip(reason)


def require_chromium() -> str:
    """Debian's chromium for browser tests: skipped locally when absent, a failure in CI."""
    path = os.environ.get("NEWSLETTER_TEST_CHROMIUM") or shutil.which("chromium") or ""
    if path and os.access(path, os.X_OK):
        return path
    reason = "chromium not installed (apt-get install chromium)"
    if IN_CI:
        pytest.fail(reason + " — CI must provide it")
    pytest.skip(reason)


@pytest.fixture
def browser() -> Iterator[Any]:
    """A headless Debian chromium driven by Playwright; nothing is downloaded."""
    executable = require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        instance = pw.chromium.launch(
            executable_path=executable,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
                "--disable-sync",
            ],
        )
        yield instance
        instance.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database: a SQLite file, or a PostgreSQL schema of its own."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'test.db'}"
        return
    require_postgres()
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(text(f'create schema "{schema}"'))
    sep = "&" if "?" in PG_URL else "?"
    yield f"{PG_URL}{sep}options=-csearch_path%3D{schema}"
    with admin.begin() as conn:
        conn.execute(text(f'drop schema "{schema}" cascade'))
    admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A SQLite file in the test's own folder."""
    return f"sqlite:///{tmp_path / 'test.db'}"


@pytest.fixture
def clock() -> FrozenClock:
    """A clock frozen at a known instant."""
    return FrozenClock(datetime(2026, 11, 23, 9, 0, tzinfo=UTC))


@dataclass
class SmtpServer:
    host: str
    port: int
    maildir: Path
    handler: MaildirHandler

    def messages(self) -> list[EmailMessage]:
        """Every message received so far, in arrival order, parsed with the email package."""
        box = mailbox.Maildir(self.maildir, create=False)
        return [
            message_from_bytes(box.get_bytes(key), policy=policy.default)  # type: ignore[misc]
            for key in list(self.handler.keys)
        ]


@pytest.fixture
def smtpd(tmp_path: Path) -> Iterator[SmtpServer]:
    """A real aiosmtpd server on 127.0.0.1 that keeps every message in a Maildir."""
    port = free_port()
    maildir = tmp_path / "maildir"
    handler = MaildirHandler(maildir)
    controller = start_dev_smtp(host="127.0.0.1", port=port, maildir=maildir, handler=handler)
    yield SmtpServer("127.0.0.1", port, maildir, handler)
    controller.stop()


def make_settings(database_url: str, smtp: SmtpServer | None = None) -> Settings:
    """Embedded defaults pointed at a test database and SMTP server."""
    base = load_settings(
        None, {"NEWSLETTER_SECRET": SECRET, "NEWSLETTER_DATABASE_URL": database_url}
    )
    if smtp is not None:
        base = replace(base, smtp=replace(base.smtp, host=smtp.host, port=smtp.port))
    return base


@pytest.fixture
def factory(database_url: str) -> Iterator[sessionmaker[Session]]:
    """A migrated database (SQLite and PostgreSQL) and its session factory."""
    engine = make_engine(database_url)
    migrate(engine)
    yield make_sessionmaker(engine)
    engine.dispose()


def random_secret() -> str:
    return secrets.token_urlsafe(32)


@dataclass
class FeedHttp:
    """A real HTTP server on 127.0.0.1; set `documents[path] = bytes` to publish a feed."""

    base: str
    documents: dict[str, bytes]


@pytest.fixture
def feed_http() -> Iterator[FeedHttp]:
    """Serve whatever the test puts in `documents`, as a portal would serve its feed."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from threading import Thread

    documents: dict[str, bytes] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = documents.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Type", "application/rss+xml")
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield FeedHttp(f"http://127.0.0.1:{httpd.server_address[1]}", documents)
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def rss(items: list[dict[str, Any]]) -> bytes:
    """A small RSS 2.0 feed: each item has title, link, guid, date (aware) and categories."""
    from email.utils import format_datetime
    from html import escape

    entries = "".join(
        f"<item><title>{escape(i['title'])}</title><link>{escape(i['link'])}</link>"
        f'<guid isPermaLink="false">{escape(i["guid"])}</guid>'
        f"<pubDate>{format_datetime(i['date'])}</pubDate>"
        + "".join(f"<category>{escape(c)}</category>" for c in i.get("categories", ()))
        + f"<description>{escape(i.get('summary', 'Summary.'))}</description></item>"
        for i in items
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?><rss version="2.0"><channel>'
        "<title>Portal</title><link>https://portal.example.org/</link>"
        f"<description>test</description>{entries}</channel></rss>"
    ).encode()
