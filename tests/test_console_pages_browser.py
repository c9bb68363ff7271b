"""Every console page, in each of its states, in a real browser at 375 px and 1280 px, with axe.

Each state is reached as a staffer reaches it (the sign-in pages, a link, a form sent), then the
page must not scroll sideways on a phone, and at both widths axe-core's WCAG 2.1 A and AA rules
must find nothing. The preview frames hold the email (checked by its own tests); axe sees them as
frames of another origin and leaves their content alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from axe_playwright_python.sync_playwright import Axe
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from newsletter.clock import FrozenClock
from newsletter.db import make_engine, make_sessionmaker, migrate, unit_of_work
from newsletter.db.models import Campaign, CampaignStatus, Delivery
from newsletter.staff import add_staff
from newsletter.staff_sessions import revoke_sessions
from tests.conftest import SmtpServer, make_settings
from tests.console_site import (
    PASSWORD,
    ConsoleSite,
    Staffer,
    console_settings,
    enrol_staff,
    next_code,
    serve_console,
)
from tests.test_approvals import seed_people
from tests.test_console import sending_alert, submitted_alert
from tests.test_console_browser import start_clock
from tests.test_digest_control import add_items

WCAG_AA = {"runOnly": {"type": "tag", "values": ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]}}
PHONE, DESKTOP = 375, 1280
# What sticks out past the viewport's right edge, innermost first: for the failure message.
WIDEST = """[...document.querySelectorAll("main *, header *")]
  .filter(e => e.getBoundingClientRect().right > innerWidth + 0.5)
  .reverse().slice(0, 4).map(e => e.outerHTML.slice(0, 100))"""
ROLES = ("editor", "approver", "admin")


@dataclass
class World:
    """A console served on a SQLite file with readers, lists and three enrolled staffers."""

    site: ConsoleSite
    factory: sessionmaker[Session]
    clock: FrozenClock
    staff: dict[str, Staffer]

    @property
    def url(self) -> str:
        return self.site.url


@contextmanager
def serve_world(tmp_path: Path, smtpd: SmtpServer, *, training: bool) -> Iterator[World]:
    """Three readers on both lists, an editor, an approver and an admin, the console served."""
    url = f"sqlite:///{tmp_path / 'console.db'}"
    engine = make_engine(url)
    migrate(engine)
    factory = make_sessionmaker(engine)
    clock = start_clock()
    seed_people(factory, clock, 3, langs=("en", "be"))
    settings = console_settings(make_settings(url, smtpd), training=training)
    try:
        with serve_console(settings, factory, clock) as site:
            staff = {
                role: enrol_staff(factory, site.settings, clock, f"{role}@example.org", role)
                for role in ROLES
            }
            yield World(site, factory, clock, staff)
    finally:
        engine.dispose()


def submit(page: Any, selector: str) -> None:
    """Send a form by Enter on its button, and wait for the page that answers.

    A mouse click straight after Playwright scrolls a button into view can be routed by
    Chromium to the out-of-process preview frame that was under that point before the scroll
    (see the report on issue 12); Enter goes to the focused button whatever the frames.
    """
    with page.expect_navigation(wait_until="load"):
        page.locator(selector).press("Enter")


def password_step(world: World, page: Any, email: str, password: str) -> None:
    page.goto(f"{world.url}/signin")
    page.fill("#email", email)
    page.fill("#password", password)
    submit(page, "button[type=submit]")


def sign_in(world: World, page: Any, role: str) -> None:
    """Both steps in the browser as `role`; the dashboard is shown."""
    who = world.staff[role]
    password_step(world, page, who.email, who.password)
    page.fill("#code", next_code(who.secret, world.clock))
    submit(page, "button[type=submit]")
    assert page.url == f"{world.url}/", page.content()


def http_client(world: World, role: str) -> Any:
    """A signed-in ConsoleClient, to set a state up through the pages without the browser."""
    client = world.site.client()
    assert client.sign_in(world.staff[role]).status_code == 303
    return client


# --- sign-in and enrolment ----------------------------------------------------------------------


def signin_page(world: World, page: Any) -> None:
    page.goto(f"{world.url}/signin")


def signin_code(world: World, page: Any) -> None:
    password_step(world, page, "editor@example.org", PASSWORD)


def signin_error(world: World, page: Any) -> None:
    password_step(world, page, "editor@example.org", "not the password at all")


def signin_throttled(world: World, page: Any) -> None:
    for _ in range(world.site.settings.console.failures_per_account_client + 1):
        password_step(world, page, "editor@example.org", "not the password at all")
    assert "Too many attempts" in page.content()


def enrol_link(world: World) -> str:
    with unit_of_work(world.factory) as session:
        return add_staff(session, email="new@example.org", role="editor", name="",
                         now=world.clock.now(), actor="cli:test",
                         settings=world.site.settings)  # fmt: skip


def enrol_page(world: World, page: Any) -> None:
    page.goto(enrol_link(world))


def enrol_fill(world: World, page: Any, *, code: str) -> None:
    page.goto(enrol_link(world))
    page.fill("#password", PASSWORD)
    page.fill("#password_again", PASSWORD)
    page.fill("#code", code)
    submit(page, "button[type=submit]")


def enrol_error(world: World, page: Any) -> None:
    enrol_fill(world, page, code="000000")


def enrolled_page(world: World, page: Any) -> None:
    page.goto(enrol_link(world))
    secret = page.locator("#secret").inner_text().strip()
    page.fill("#password", PASSWORD)
    page.fill("#password_again", PASSWORD)
    page.fill("#code", next_code(secret, world.clock))
    submit(page, "button[type=submit]")


# --- dashboard, compose, alert --------------------------------------------------------------------


def dashboard_empty(world: World, page: Any) -> None:
    sign_in(world, page, "editor")


def finished_campaign(world: World) -> None:
    """An alert sent to everyone on its list, finished."""
    campaign_id = sending_alert(world.factory, world.site.settings, world.clock)
    with unit_of_work(world.factory) as session:
        session.execute(
            update(Delivery)
            .where(Delivery.campaign_id == campaign_id)
            .values(status="sent", sent_at=world.clock.now())
        )
        session.execute(
            update(Campaign)
            .where(Campaign.id == campaign_id)
            .values(status=CampaignStatus.FINISHED, finished_at=world.clock.now())
        )


def dashboard_busy(world: World, page: Any) -> None:
    finished_campaign(world)
    sending_alert(world.factory, world.site.settings, world.clock)
    submitted_alert(http_client(world, "editor"), "Held for approval")
    sign_in(world, page, "editor")
    assert page.locator("[data-campaign]").count() == 1
    assert "Held for approval" in page.content() and "Nothing finished yet" not in page.content()


def compose_empty(world: World, page: Any, role: str = "editor") -> None:
    sign_in(world, page, role)
    page.goto(f"{world.url}/alerts/new")


def compose_search(world: World, page: Any) -> None:
    add_items(world.factory, world.clock, "Court hearing moved", "Letters delivered")
    compose_empty(world, page)
    page.fill("#q", "court")
    submit(page, "#q")


def compose_error(world: World, page: Any) -> None:
    compose_empty(world, page)
    page.fill("#url", "https://portal.example.org/why")
    submit(page, "button[value=save]")  # no title and no item: refused


def alert_draft(world: World, page: Any, role: str = "editor") -> int:
    """A draft in en and be, written in the browser; its id."""
    compose_empty(world, page, role)
    page.fill("#title_en", "Write to the prosecutor")
    page.fill("#body_en", "Write **today**. [Why](https://portal.example.org/why)")
    page.fill("#title_be", "Напішыце пракурору")
    page.fill("#body_be", "Напішыце **сёння**.")
    submit(page, "button[value=save]")
    return int(page.url.rsplit("/", 1)[1])


def alert_tested(world: World, page: Any) -> None:
    alert_draft(world, page)
    submit(page, "#send-test")


def alert_submitted(world: World, page: Any) -> None:
    """Submitted by the editor, seen by the approver: previews, hash, the approval form."""
    alert_id = alert_draft(world, page)
    submit(page, "#submit")
    page.context.clear_cookies()
    sign_in(world, page, "approver")
    page.goto(f"{world.url}/alerts/{alert_id}?preview=be&scheme=dark")


def alert_approved(world: World, page: Any) -> None:
    alert_submitted(world, page)
    alert_id = page.url.split("/alerts/")[1].split("?")[0]
    page.fill("#approve-code", next_code(world.staff["approver"].secret, world.clock))
    submit(page, "#approve")
    assert page.url.endswith(f"/campaigns/{alert_id}")
    page.goto(f"{world.url}/alerts/{alert_id}")


# --- watch, digest, admin, errors -----------------------------------------------------------------


def watch_page(world: World, page: Any) -> None:
    campaign_id = sending_alert(world.factory, world.site.settings, world.clock)
    sign_in(world, page, "admin")
    page.goto(f"{world.url}/campaigns/{campaign_id}")


def watch_paused(world: World, page: Any) -> None:
    watch_page(world, page)
    page.fill("#reason", "the link is wrong")
    submit(page, "#reason")


def digest_page(world: World, page: Any) -> None:
    ids = add_items(world.factory, world.clock, "First item", "Second item")
    client = http_client(world, "approver")
    form = {"list": "weekly-digest", "item": str(ids[0])}
    assert client.post("/digest/exclude", form, csrf_from="/digest").status_code == 303
    sign_in(world, page, "approver")
    page.goto(f"{world.url}/digest")


def audit_page(world: World, page: Any) -> None:
    sign_in(world, page, "admin")
    page.goto(f"{world.url}/audit")


def staff_page(world: World, page: Any) -> None:
    enrol_link(world)  # one account not enrolled yet
    sign_in(world, page, "admin")
    page.goto(f"{world.url}/staff")


def error_403(world: World, page: Any) -> None:
    sign_in(world, page, "editor")
    page.goto(f"{world.url}/audit")


def error_404(world: World, page: Any) -> None:
    sign_in(world, page, "editor")
    page.goto(f"{world.url}/no-such-page")


def error_409(world: World, page: Any) -> None:
    campaign_id = sending_alert(world.factory, world.site.settings, world.clock)
    sign_in(world, page, "approver")
    page.goto(f"{world.url}/campaigns/{campaign_id}")
    other = http_client(world, "admin")  # cancels it while the page is open
    path = f"/campaigns/{campaign_id}"
    assert other.post(f"{path}/cancel", {}, csrf_from=path).status_code == 303
    submit(page, "button.danger")  # the stale page's Cancel: the step refuses


def training_dashboard(world: World, page: Any) -> None:
    sign_in(world, page, "approver")


def training_alert(world: World, page: Any) -> None:
    alert_draft(world, page, "approver")  # may approve their own, in training only
    submit(page, "#submit")


@dataclass(frozen=True)
class State:
    reach: Callable[[World, Any], object]
    selector: str
    status: int | None = None
    training: bool = False


STATES: dict[str, State] = {
    "signin": State(signin_page, "#email"),
    "signin-code": State(signin_code, "#code"),
    "signin-error": State(signin_error, "[role=alert]"),
    "signin-throttled": State(signin_throttled, "[role=alert]"),
    "enrol": State(enrol_page, "img.qr"),
    "enrol-error": State(enrol_error, "[role=alert]"),
    "enrolled": State(enrolled_page, "#recovery-codes"),
    "dashboard-empty": State(dashboard_empty, "#h-sending"),
    "dashboard-busy": State(dashboard_busy, "[data-campaign] [data-field=sent]"),
    "compose": State(compose_empty, "form.compose"),
    "compose-search": State(compose_search, "input[value='Court hearing moved']"),
    "compose-error": State(compose_error, "[role=alert]", status=400),
    "alert-draft": State(alert_draft, "iframe.frame-phone"),
    "alert-tested": State(alert_tested, "#test-results"),
    "alert-submitted": State(alert_submitted, "#approve-code"),
    "alert-approved": State(alert_approved, "a[href^='/campaigns/']"),
    "watch": State(watch_page, "[data-live=progress] [data-field=failed]"),
    "watch-paused": State(watch_paused, "p.warn"),
    "digest": State(digest_page, "button.link"),
    "audit": State(audit_page, "#audit"),
    "staff": State(staff_page, "table"),
    "error-403": State(error_403, "h1", status=403),
    "error-404": State(error_404, "h1", status=404),
    "error-409": State(error_409, "p.error", status=409),
    "training-dashboard": State(training_dashboard, "p.training", training=True),
    "training-alert": State(training_alert, "#approve-code", training=True),
}


def axe_violations(page: Any) -> list[tuple[str, str, list[str]]]:
    """axe-core's WCAG 2.1 A/AA violations on the page as it is: rule, help, offending nodes."""
    found = Axe().run(page, options=WCAG_AA).response["violations"]
    return [(v["id"], v["help"], [n["html"][:120] for n in v["nodes"]]) for v in found]


@pytest.mark.parametrize("state", list(STATES))
def test_each_console_page_fits_a_phone_and_passes_axe(
    tmp_path: Path, smtpd: SmtpServer, browser: Any, state: str
) -> None:
    """At 375 px: no sideways scrolling; at 375 and 1280 px: no WCAG 2.1 AA violation."""
    spec = STATES[state]
    statuses: list[int] = []
    with serve_world(tmp_path, smtpd, training=spec.training) as world:
        context = browser.new_context(viewport={"width": PHONE, "height": 800})
        page = context.new_page()

        def note_status(response: Any) -> None:
            if response.request.is_navigation_request() and response.frame == page.main_frame:
                statuses.append(response.status)

        page.on("response", note_status)
        try:
            spec.reach(world, page)
            page.wait_for_load_state()
            assert page.locator(spec.selector).first.is_visible(), f"{state}: {spec.selector}"
            if spec.status is not None:
                assert statuses[-1] == spec.status, statuses
            assert ("Training mode" in page.content()) == spec.training
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= PHONE, f"{state}: {width}px wide: {page.evaluate(WIDEST)}"
            assert axe_violations(page) == [], f"{state} at {PHONE}px"
            page.set_viewport_size({"width": DESKTOP, "height": 900})
            assert axe_violations(page) == [], f"{state} at {DESKTOP}px"
        finally:
            context.close()


def test_the_axe_check_finds_a_violation_when_there_is_one(
    tmp_path: Path, smtpd: SmtpServer, browser: Any
) -> None:
    """The check can fail: a console page with a field stripped of its label is caught."""
    with serve_world(tmp_path, smtpd, training=False) as world:
        page = browser.new_page(viewport={"width": PHONE, "height": 800})
        try:
            signin_page(world, page)
            page.evaluate("document.querySelector('label[for=email]').remove()")
            assert "label" in [rule for rule, _, _ in axe_violations(page)]
        finally:
            page.close()


def test_a_watch_page_left_open_goes_to_sign_in_when_its_session_ends(
    tmp_path: Path, smtpd: SmtpServer, browser: Any
) -> None:
    """A watch page polls its figures every 2 s; once its session is over (here revoked, as an
    idle one is), the next poll's 401 takes the page to /signin: an unattended screen stops
    showing the campaign instead of keeping stale figures on view."""
    with serve_world(tmp_path, smtpd, training=False) as world:
        page = browser.new_page(viewport={"width": PHONE, "height": 800})
        try:
            watch_page(world, page)
            assert page.url.startswith(f"{world.url}/campaigns/")
            with unit_of_work(world.factory) as session:
                revoke_sessions(session, staff_id=None, now=world.clock.now(), actor="t")
            page.wait_for_url(f"{world.url}/signin", timeout=20_000)
        finally:
            page.close()
