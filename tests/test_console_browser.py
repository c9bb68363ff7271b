"""The issue's scenario end to end, in Debian's chromium: staff added from the CLI enrol, an
editor writes an alert in two languages, previews and tests it, submits; the editor cannot
approve; an approver approves with a fresh code; every member gets it once; the audit log shows
the chain; an edit after an approval voids it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyotp
import pytest
from sqlalchemy.orm import Session, sessionmaker

from newsletter.clock import FrozenClock, SystemClock
from newsletter.config import Settings
from newsletter.db import make_engine, make_sessionmaker, migrate
from newsletter.devsmtp import free_port
from tests.builders import deliver, run
from tests.conftest import SECRET, SmtpServer, make_settings
from tests.console_site import PASSWORD, ConsoleSite, declare_lists, serve_console
from tests.test_web import add_person

ROLES = ("admin", "editor", "approver")
CHAIN = (
    "staff.enrolled",
    "staff.signed_in",
    "alert.drafted",
    "alert.test_sent",
    "alert.submitted",
    "staff.step_up",
    "alert.approved",
    "campaign.started",
)
MEMBERS = {"en1@example.org": "en", "en2@example.org": "en", "be1@example.org": "be"}


def start_clock() -> FrozenClock:
    """A frozen clock at the start of this TOTP step (the CLI dates links by the system clock)."""
    now = SystemClock().now().timestamp()
    return FrozenClock(datetime.fromtimestamp(now - now % 30, tz=UTC))


@pytest.fixture
def world(
    tmp_path: Path, smtpd: SmtpServer
) -> Iterator[tuple[Settings, sessionmaker[Session], FrozenClock, Path]]:
    """A SQLite database with the lists and three members, and a config file for the CLI."""
    url = f"sqlite:///{tmp_path / 'console.db'}"
    engine = make_engine(url)
    migrate(engine)
    factory = make_sessionmaker(engine)
    clock = start_clock()
    declare_lists(factory)
    for email, lang in MEMBERS.items():
        add_person(factory, clock, email, language=lang, lists=("urgent-actions",))
    yield make_settings(url, smtpd), factory, clock, tmp_path
    engine.dispose()


def cli_add(cwd: Path, config: Path, email: str, role: str) -> str:
    """`newsletter staff add EMAIL --role R --json`: the enrolment link."""
    out = run(["--config", str(config), "staff", "add", email, "--role", role, "--json"], cwd)
    return str(json.loads(out.stdout)["enrol_url"])


def write_config(path: Path, settings: Settings, console_url: str) -> Path:
    """A config file for the CLI: the test's database, secret, relay and console URL."""
    config = path / "config.toml"
    config.write_text(
        f'[database]\nurl = "{settings.database.url}"\n'
        f'[security]\nsecret = "{SECRET}"\n'
        f'[smtp]\nhost = "{settings.smtp.host}"\nport = {settings.smtp.port}\n'
        f'[console]\nbase_url = "{console_url}"\n',
        encoding="utf-8",
    )
    return config


def submit(page: Any, selector: str) -> None:
    """Press a form's button (from the keyboard) and wait for the page the POST answers with.

    Playwright's scripts cannot run in the sandboxed preview frames, and its mouse click, which
    checks what is under the pointer, hangs on a page that has them; Enter on the focused
    button submits the same form.
    """
    with page.expect_navigation(wait_until="domcontentloaded"):
        page.locator(selector).press("Enter")


def fresh_code(secret: str, clock: FrozenClock) -> str:
    """The next TOTP step's code, with the shared clock moved there (each code used once)."""
    clock.advance(seconds=30)
    return pyotp.TOTP(secret).at(clock.now())


def enrol(browser: Any, url: str, clock: FrozenClock, width: int) -> tuple[Any, str]:
    """Open the enrolment link in a new browser context, set the password, confirm a code."""
    context = browser.new_context(viewport={"width": width, "height": 900})
    page = context.new_page()
    page.goto(url)
    qr = page.locator("img.qr")
    assert qr.get_attribute("src").startswith("data:image/svg+xml;base64,")
    assert qr.evaluate("img => img.naturalWidth") > 0  # the QR code renders as an image
    assert page.locator("a[href^='otpauth://totp/']").count() == 1
    secret = page.locator("#secret").inner_text().strip()
    page.fill("#password", PASSWORD)
    page.fill("#password_again", PASSWORD)
    page.fill("#code", fresh_code(secret, clock))
    submit(page, "button[type=submit]")
    assert page.locator("#recovery-codes li").count() == 10
    return context, secret


def sign_in(context: Any, site: ConsoleSite, email: str, secret: str, clock: FrozenClock) -> Any:
    """Both sign-in steps in the browser; the dashboard page."""
    page = context.new_page()
    page.goto(f"{site.url}/signin")
    page.fill("#email", email)
    page.fill("#password", PASSWORD)
    submit(page, "button[type=submit]")
    page.fill("#code", fresh_code(secret, clock))
    submit(page, "button[type=submit]")
    assert page.url == f"{site.url}/", page.content()
    return page


def compose(page: Any, site: ConsoleSite, title: str, *, be: bool = True) -> int:
    """Write an alert to urgent-actions in English (and Belarusian); its id."""
    page.goto(f"{site.url}/alerts/new")
    page.select_option("#list", "urgent-actions")
    page.fill("#title_en", title)
    page.fill(
        "#body_en", "Write to the prosecutor **today**. [Why](https://portal.example.org/why)"
    )
    if be:
        page.fill("#title_be", "Напішыце пракурору")
        page.fill("#body_be", "Напішыце пракурору **сёння**.")
    submit(page, "button[value=save]")
    match = re.fullmatch(rf"{re.escape(site.url)}/alerts/(\d+)", page.url)
    assert match, page.url
    return int(match.group(1))


def frame_background(page: Any, selector: str) -> str:
    """The computed background colour of the email's outer page in a preview frame."""
    frame = page.frame_locator(selector)
    return str(frame.locator("body").evaluate("b => getComputedStyle(b).backgroundColor"))


def test_two_person_alert_from_draft_to_every_member(
    browser: Any,
    world: tuple[Settings, sessionmaker[Session], FrozenClock, Path],
    smtpd: SmtpServer,
) -> None:
    settings, factory, clock, tmp = world
    port = free_port()
    console_url = f"http://127.0.0.1:{port}"
    config = write_config(tmp, settings, console_url)
    links = {role: cli_add(tmp, config, f"{role}@example.org", role) for role in ROLES}
    settings = replace(settings, console=replace(settings.console, base_url=console_url))
    with serve_console(settings, factory, clock, port=port) as site:
        secrets = {}
        contexts = {}
        for role, link in links.items():
            assert link.startswith(f"{console_url}/enrol/")
            # The admin on a phone, the others on desktops.
            width = 375 if role == "admin" else 1280
            contexts[role], secrets[role] = enrol(browser, link, clock, width)

        # The editor writes the alert in en and be and looks at it.
        editor = sign_in(contexts["editor"], site, "editor@example.org", secrets["editor"], clock)
        alert_id = compose(editor, site, "Write to the prosecutor")
        assert editor.locator("#check-verdict").count() == 1, editor.content()
        phone = editor.frame_locator("iframe.frame-phone")
        assert "Write to the prosecutor" in phone.locator("body").inner_text()
        width = "f => f.getBoundingClientRect().width"
        assert editor.locator("iframe.frame-phone").evaluate(width) == 375
        assert editor.locator("iframe.frame-desktop").evaluate(width) >= 600
        light = frame_background(editor, "iframe.frame-desktop")
        editor.goto(f"{site.url}/alerts/{alert_id}?preview=be&scheme=dark")
        assert (
            "Напішыце пракурору"
            in editor.frame_locator("iframe.frame-phone").locator("body").inner_text()
        )
        dark = frame_background(editor, "iframe.frame-desktop")
        assert light != dark and dark == "rgb(18, 18, 18)", (light, dark)

        # A test to the editor's own address, marked as one.
        submit(editor, "#send-test")
        assert editor.locator("#test-results").count() == 1, editor.content()
        assert "editor@example.org" in editor.locator("#test-results").inner_text()
        tests = [m for m in smtpd.messages() if m["To"] == "editor@example.org"]
        assert len(tests) == 1 and str(tests[0]["Subject"]).startswith("[TEST] ")

        # Submitted: a revision with its hash; no approve button for the author.
        submit(editor, "#submit")
        revision = editor.locator("#revision-hash").inner_text().strip()
        assert re.fullmatch(r"[0-9a-f]{64}", revision)
        assert editor.locator("#approve").count() == 0
        token = editor.locator("input[name=csrf]").first.get_attribute("value")
        forged = editor.request.post(
            f"{site.url}/alerts/{alert_id}/approve",
            form={
                "csrf": token,
                "revision": revision,
                "code": fresh_code(secrets["editor"], clock),
            },
        )
        assert forged.status == 403
        notices = [m for m in smtpd.messages() if m["To"] == "approver@example.org"]
        assert (
            len(notices) == 1 and "prosecutor" not in notices[0].get_body(("plain",)).get_content()
        )

        # The approver looks, and approves with a fresh code.
        approver = sign_in(
            contexts["approver"], site, "approver@example.org", secrets["approver"], clock
        )
        approver.goto(f"{site.url}/alerts/{alert_id}")
        assert approver.locator("#revision-hash").inner_text().strip() == revision
        approver.fill("#approve-code", fresh_code(secrets["approver"], clock))
        submit(approver, "#approve")
        assert approver.url == f"{site.url}/campaigns/{alert_id}", approver.content()

        # The sender runs its own event loop: on a thread of its own, beside Playwright's.
        with ThreadPoolExecutor(1) as pool:
            report = pool.submit(deliver, factory, settings, clock).result()
        assert report.sent == len(MEMBERS)
        alerts = [m for m in smtpd.messages() if m["To"] in MEMBERS]
        assert sorted(m["To"] for m in alerts) == sorted(MEMBERS)
        be_subject = next(str(m["Subject"]) for m in alerts if m["To"] == "be1@example.org")
        assert "Напішыце" in be_subject and not be_subject.startswith("[TEST]")

        # The admin's audit log: the chain, with the revision hash.
        admin = sign_in(contexts["admin"], site, "admin@example.org", secrets["admin"], clock)
        admin.goto(f"{site.url}/audit")
        log = admin.locator("#audit").inner_text()
        for action in CHAIN:
            assert action in log, action
        hashed = [row for row in log.splitlines() if revision in row]
        assert any("alert.submitted" in r for r in hashed) and any(
            "alert.approved" in r for r in hashed
        )
        for context in contexts.values():
            context.close()

    # With two approvals required, an edit after the first one voids it.
    two = replace(settings, alerts=replace(settings.alerts, approvals_required=2))
    with serve_console(two, factory, clock, port=port) as site:
        contexts = {role: browser.new_context() for role in ("editor", "approver")}
        editor = sign_in(contexts["editor"], site, "editor@example.org", secrets["editor"], clock)
        second = compose(editor, site, "A second alert", be=False)
        submit(editor, "#submit")
        approver = sign_in(
            contexts["approver"], site, "approver@example.org", secrets["approver"], clock
        )
        approver.goto(f"{site.url}/alerts/{second}")
        approver.fill("#approve-code", fresh_code(secrets["approver"], clock))
        submit(approver, "#approve")
        assert "1 of 2" in approver.content()
        editor.goto(f"{site.url}/alerts/{second}")
        editor.fill("#title_en", "A second alert, changed")
        submit(editor, "button[value=save]")
        assert editor.locator("#revision-voided").count() == 1
        approver.goto(f"{site.url}/alerts/{second}")
        assert approver.locator("#approve").count() == 0
        for context in contexts.values():
            context.close()
