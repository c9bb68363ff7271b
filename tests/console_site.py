"""What the console tests share: a console app on a test database, staff enrolled in it, and a
client that signs in through the pages and posts forms with their tokens."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field, replace
from html import unescape
from pathlib import Path
from typing import Any

import httpx
import pyotp
import uvicorn
from sqlalchemy.orm import Session, sessionmaker

from newsletter.clock import FrozenClock
from newsletter.config import Settings
from newsletter.console import create_console_app
from newsletter.console_security import url_origin
from newsletter.db import unit_of_work
from newsletter.devsmtp import free_port
from newsletter.lists import read_lists, sync_lists
from newsletter.smtp import SmtpPool, Transport
from newsletter.staff import add_staff, begin_enrolment, complete_enrolment
from newsletter.webserver import listener_config

ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "correct horse battery staple 42"


@dataclass
class Staffer:
    email: str
    role: str
    secret: str
    password: str = PASSWORD


def console_settings(settings: Settings, **console: Any) -> Settings:
    """Settings whose [console] has these values changed."""
    return replace(settings, console=replace(settings.console, **console))


def declare_lists(factory: sessionmaker[Session]) -> None:
    """The repository's lists.toml in the database."""
    with unit_of_work(factory) as session:
        sync_lists(session=session, specs=read_lists(ROOT / "subscribers" / "lists.toml"))


def next_code(secret: str, clock: FrozenClock) -> str:
    """Move the clock one TOTP step on and give that step's code (so each code is fresh)."""
    clock.advance(seconds=30)
    return pyotp.TOTP(secret).at(clock.now())


def enrol_staff(
    factory: sessionmaker[Session],
    settings: Settings,
    clock: FrozenClock,
    email: str,
    role: str,
) -> Staffer:
    """Add an account and enrol it through the step functions (the pages are tested apart)."""
    with unit_of_work(factory) as session:
        url = add_staff(
            session, email=email, role=role, name="", now=clock.now(), actor="cli:test",
            settings=settings,
        )  # fmt: skip
    token = url.rsplit("/enrol/", 1)[1]
    with unit_of_work(factory) as session:
        secret = begin_enrolment(
            session, token=token, now=clock.now(), settings=settings
        ).totp_secret
    with unit_of_work(factory) as session:
        complete_enrolment(
            session, token=token, password=PASSWORD, password_again=PASSWORD,
            code=next_code(secret, clock), now=clock.now(), client="127.0.0.1",
        )  # fmt: skip
    return Staffer(email, role, secret)


def smtp_transport(settings: Settings) -> Any:
    """A transport_factory: a pool of the relays in these settings (the test's aiosmtpd)."""

    @asynccontextmanager
    async def open_transport() -> AsyncIterator[Transport]:
        pool = SmtpPool(settings.smtp)
        try:
            yield pool
        finally:
            await pool.close()

    return open_transport


def csrf_of(page: str) -> str:
    """The form token on a page."""
    match = re.search(r'name="csrf" value="([^"]+)"', page)
    assert match, "the page carries no form token"
    return unescape(match.group(1))


def field_of(page: str, name: str) -> str:
    """A hidden field's value on a page."""
    match = re.search(rf'name="{name}" value="([^"]*)"', page)
    assert match, f"the page has no field {name}"
    return unescape(match.group(1))


class ConsoleClient:
    """A browser stand-in: keeps cookies, reads form tokens from pages, posts same-origin."""

    def __init__(self, url: str, clock: FrozenClock, origin: str | None = None) -> None:
        self.http = httpx.Client(base_url=url, follow_redirects=False, timeout=30)
        self.clock = clock
        self.origin = origin or url

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return self.http.get(path, **kw)

    def post(
        self,
        path: str,
        data: dict[str, str],
        *,
        csrf_from: str = "/",
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        """Post a form with the token of the page at `csrf_from`, as our own page would."""
        if "csrf" not in data:
            data = {**data, "csrf": csrf_of(self.get(csrf_from).text)}
        sent = {"origin": self.origin, "sec-fetch-site": "same-origin", **(headers or {})}
        return self.http.post(path, data=data, headers=sent)

    def sign_in(self, who: Staffer) -> httpx.Response:
        """Both sign-in steps through the pages; the last response (a redirect to /)."""
        first = self.post(
            "/signin", {"email": who.email, "password": who.password}, csrf_from="/signin"
        )
        assert first.status_code == 200, first.text
        return self.post(
            "/signin/code",
            {
                "csrf": csrf_of(first.text),
                "pending": field_of(first.text, "pending"),
                "code": next_code(who.secret, self.clock),
            },
        )


@dataclass
class ConsoleSite:
    """A console served on a loopback port; `client()` gives a new browser stand-in."""

    url: str
    settings: Settings
    clock: FrozenClock
    clients: list[ConsoleClient] = field(default_factory=list)

    def client(self) -> ConsoleClient:
        """A new client with no cookies (closed when the site stops)."""
        made = ConsoleClient(
            self.url, self.clock, origin=url_origin(self.settings.console.base_url)
        )
        self.clients.append(made)
        return made


@contextmanager
def serve_console(
    settings: Settings,
    factory: sessionmaker[Session],
    clock: FrozenClock,
    *,
    base_url: str | None = None,
    port: int | None = None,
) -> Iterator[ConsoleSite]:
    """Serve the console as `newsletter console` does until the block ends.

    [console] base_url is the server's own URL unless `base_url` is given (an https one, say).
    """
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    settings = console_settings(settings, base_url=base_url or url)
    app = create_console_app(settings, factory, clock, transport_factory=smtp_transport(settings))
    server = uvicorn.Server(listener_config(app, settings, host="127.0.0.1", port=port))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    site = ConsoleSite(url, settings, clock)
    try:
        yield site
    finally:
        for client in site.clients:
            client.http.close()
        server.should_exit = True
        thread.join(timeout=10)
