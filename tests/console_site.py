"""What the console tests share: a console app on a test database, staff enrolled in it, and a
client that signs in through the pages and posts forms with their tokens."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from html import unescape
from pathlib import Path
from typing import Any

import httpx
import pyotp
from sqlalchemy.orm import Session, sessionmaker
from starlette.testclient import TestClient

from newsletter.clock import FrozenClock
from newsletter.config import Settings
from newsletter.console import create_console_app
from newsletter.db import unit_of_work
from newsletter.lists import read_lists, sync_lists
from newsletter.smtp import SmtpPool, Transport
from newsletter.staff import add_staff, begin_enrolment, complete_enrolment

ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "correct horse battery staple 42"
BASE = "http://127.0.0.1:8001"


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
        secret = begin_enrolment(session, token=token, now=clock.now(), settings=settings).totp_secret
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

    def __init__(self, app: Any, base: str, clock: FrozenClock) -> None:
        self.http = TestClient(app, base_url=base, follow_redirects=False)
        self.clock = clock
        self.base = base

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return self.http.get(path, **kw)

    def post(
        self, path: str, data: dict[str, str], *, csrf_from: str = "/", headers: dict[str, str] | None = None
    ) -> httpx.Response:
        """Post a form with the token of the page at `csrf_from`, as our own page would."""
        if "csrf" not in data:
            data = {**data, "csrf": csrf_of(self.get(csrf_from).text)}
        sent = {"origin": self.base, "sec-fetch-site": "same-origin", **(headers or {})}
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


def console_client(
    settings: Settings, factory: sessionmaker[Session], clock: FrozenClock, base: str = BASE
) -> ConsoleClient:
    """A client of a console app whose [console] base_url is `base`."""
    settings = console_settings(settings, base_url=base)
    app = create_console_app(settings, factory, clock, transport_factory=smtp_transport(settings))
    return ConsoleClient(app, base, clock)
