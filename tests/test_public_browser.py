"""The public pages in Debian's chromium: the form embedded by another origin and signed up in
Belarusian with the page's own proof-of-work script, the confirmation through aiosmtpd, the next
alert; and axe-core's WCAG 2.1 AA rules at 375 px on the form, its answers and the archive."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from newsletter.assemble import assemble_alert
from newsletter.clock import SystemClock
from newsletter.db import unit_of_work
from newsletter.db.models import Campaign, Subscriber
from newsletter.enqueue import launch_campaign
from newsletter.lists import get_list
from newsletter.tokens import make_token
from tests.browser_checks import check_page
from tests.builders import deliver
from tests.conftest import SECRET, SmtpServer
from tests.test_signup import lists_synced, serve_public, signup_settings
from tests.test_web import add_person


@pytest.fixture
def portal() -> Iterator[tuple[str, dict[str, bytes]]]:
    """Another local origin, standing for the portal: serves whatever page the test puts in."""
    pages: dict[str, bytes] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = pages.get(self.path, b"")
            self.send_response(200 if body else 404)
            self.send_header("content-type", "text/html; charset=utf-8")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", pages
    httpd.shutdown()
    httpd.server_close()


def send_now(factory: sessionmaker[Session], settings: Any, clock: SystemClock) -> None:
    """Deliver what is queued, on a thread of its own (Playwright holds this one's event loop)."""
    with ThreadPoolExecutor(1) as pool:
        pool.submit(deliver, factory, settings, clock).result()


def wait_for_mail(smtpd: SmtpServer, count: int, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while len(smtpd.messages()) < count and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(smtpd.messages()) >= count


def test_embedded_signup_in_belarusian_confirm_and_next_alert(
    factory: sessionmaker[Session],
    database_url: str,
    smtpd: SmtpServer,
    browser: Any,
    portal: tuple[str, dict[str, bytes]],
) -> None:
    """The portal frames /subscribe?embed=1; the reader signs up in be (the script solves 16 bits);
    the confirmation arrives in Belarusian; the click confirms; the next alert arrives once."""
    portal_url, pages = portal
    lists_synced(factory)
    clock = SystemClock()
    settings = signup_settings(
        database_url, smtpd, signup_origins=(portal_url,), signup_pow_bits=16
    )
    with serve_public(settings, factory, clock, send_confirmations=True) as (url, settings):  # type: ignore[arg-type]
        pages["/"] = (
            '<!DOCTYPE html><html lang="en"><title>Portal</title><h1>Portal</h1>'
            f'<iframe src="{url}/subscribe?embed=1&amp;lang=be" title="Sign up"'
            ' width="360" height="900"></iframe>'
        ).encode()
        page = browser.new_page()
        try:
            page.goto(portal_url + "/")
            form = page.frame_locator("iframe")
            form.locator("#email").fill("novy@example.org")
            form.locator("input[name=language][value=be]").check()
            form.locator("input[value=weekly-digest]").check()
            form.locator("input[value=urgent-actions]").check()
            form.locator("button[type=submit]").click()
            form.locator("h1", has_text="Праверце паштовую скрыню").wait_for(timeout=20000)
            wait_for_mail(smtpd, 1)
            [mail] = smtpd.messages()
            assert mail["To"] == "novy@example.org"
            text = mail.get_body(("plain",)).get_content()  # type: ignore[union-attr]
            assert "Пацвердзіць" in str(mail["Subject"]) + text or "пацвердз" in text.lower()
            link = re.search(r"http://127\.0\.0\.1:\d+/confirm/\S+", text)
            assert link is not None
            page.goto(link.group(0))
            page.click("button[type=submit]")
            page.locator("[role=status]").wait_for()
            with unit_of_work(factory) as session:
                sid = session.scalar(
                    select(Subscriber.id).where(Subscriber.email == "novy@example.org")
                )
                digest = get_list(session, "weekly-digest").id
            assert sid is not None
            token = make_token(
                secret=SECRET, purpose="preferences", subscriber_id=sid, list_id=digest
            )
            page.goto(f"{url}/preferences/{token}")
            checked = page.locator("input[name=lists]:checked").count()
            assert checked == 2
            assert page.locator("html").get_attribute("lang") == "be"
        finally:
            page.close()
        with unit_of_work(factory) as session:
            campaign, _ = assemble_alert(
                session=session,
                list_slug="urgent-actions",
                now=clock.now(),
                actor="test",
                title="Next alert",
                body_html="<p>Act.</p>",
            )
            launch_campaign(
                session=session, campaign=campaign, settings=settings, now=clock.now(), actor="test"
            )
        send_now(factory, settings, clock)
        send_now(factory, settings, clock)
    alerts = [m for m in smtpd.messages() if "Next alert" in str(m["Subject"])]
    assert [m["To"] for m in alerts] == ["novy@example.org"]


def form_page(url: str, page: Any) -> None:
    page.goto(f"{url}/subscribe?lang=ru")


def form_problem(url: str, page: Any) -> None:
    page.goto(f"{url}/subscribe?lang=be")
    page.fill("#email", "not an address@")
    page.check("input[value=weekly-digest]")
    page.evaluate("document.getElementById('email').type = 'text'")  # past the browser's check
    page.click("button[type=submit]")
    page.locator("[role=alert]").wait_for(timeout=20000)


def check_inbox(url: str, page: Any) -> None:
    page.goto(f"{url}/subscribe")
    page.fill("#email", "reader@example.org")
    page.check("input[value=urgent-actions]")
    page.click("button[type=submit]")
    page.locator("h1", has_text="Check your inbox").wait_for(timeout=20000)


def archive_index(url: str, page: Any) -> None:
    page.goto(f"{url}/archive?lang=be")


def web_copy(url: str, page: Any) -> None:
    page.goto(url + page.context.web_copy_path)  # set by the test below


STATES = {
    "form": (form_page, "form"),
    "form-problem": (form_problem, "[role=alert]"),
    "check-inbox": (check_inbox, "h1"),
    "archive": (archive_index, "li"),
    "web-copy": (web_copy, "h1"),
}


@pytest.mark.parametrize("state", list(STATES))
def test_public_pages_fit_a_phone_and_pass_axe(
    factory: sessionmaker[Session],
    database_url: str,
    smtpd: SmtpServer,
    browser: Any,
    state: str,
) -> None:
    """At 375 px: no sideways scrolling, the state's element shown, no WCAG 2.1 AA violation."""
    lists_synced(factory)
    clock = SystemClock()
    add_person(factory, clock, "reader@example.org", lists=("urgent-actions",))  # type: ignore[arg-type]
    settings = signup_settings(
        database_url,
        smtpd,
        signup_pow_bits=12,
        signup_min_seconds=1,
        mirror_urls=("https://mirror.example.net",),
    )
    with serve_public(settings, factory, clock) as (url, settings):  # type: ignore[arg-type]
        with unit_of_work(factory) as session:
            campaign, _ = assemble_alert(
                session=session,
                list_slug="urgent-actions",
                now=clock.now(),
                actor="test",
                title="Write to Ales",
                body_html="<p>Letters help.</p>",
                url="https://portal.example.org/act",
            )
            launch_campaign(
                session=session, campaign=campaign, settings=settings, now=clock.now(), actor="test"
            )
        send_now(factory, settings, clock)
        with unit_of_work(factory) as session:
            slug = session.scalar(select(Campaign.slug))
        context = browser.new_context(viewport={"width": 375, "height": 740})
        context.web_copy_path = f"/archive/{slug}/be"
        page = context.new_page()
        try:
            reach, selector = STATES[state]
            reach(url, page)
            check_page(page, selector, state)
        finally:
            context.close()
