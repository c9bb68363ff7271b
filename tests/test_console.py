"""The console's pages: its own listener, the dashboard and live figures, the watch page and
its controls, the preview frame, the digest, the audit log and its CSV, enrolment, language."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from newsletter.archive import is_public
from newsletter.audit import record_event
from newsletter.clock import FrozenClock
from newsletter.compose import DraftInput, LanguageText, create_draft
from newsletter.config import Settings
from newsletter.console_security import CONSOLE_CSP, PREVIEW_CSP
from newsletter.db import unit_of_work
from newsletter.db.models import Campaign, CampaignStatus, Delivery, Event, Subscriber
from newsletter.devsmtp import free_port
from newsletter.enqueue import launch_campaign
from newsletter.staff import add_staff
from newsletter.web import create_app
from tests.conftest import SECRET, SmtpServer, make_settings
from tests.console_site import (
    ConsoleClient,
    ConsoleSite,
    Staffer,
    console_settings,
    csrf_of,
    enrol_staff,
    next_code,
    serve_console,
)
from tests.test_approvals import seed_people
from tests.test_digest_control import add_items
from tests.test_service import wait_for

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def settings(database_url: str, smtpd: SmtpServer) -> Settings:
    return console_settings(make_settings(database_url, smtpd))


@pytest.fixture
def site(
    factory: sessionmaker[Session], settings: Settings, clock: FrozenClock
) -> Iterator[ConsoleSite]:
    seed_people(factory, clock, 3, langs=("en", "be"))
    with serve_console(settings, factory, clock) as served:
        yield served


def signed_in(
    site: ConsoleSite, factory: sessionmaker[Session], email: str, role: str
) -> ConsoleClient:
    who: Staffer = enrol_staff(factory, site.settings, site.clock, email, role)
    client = site.client()
    assert client.sign_in(who).status_code == 303
    return client


def sending_alert(factory: sessionmaker[Session], settings: Settings, clock: FrozenClock) -> int:
    """An alert to the three readers, launched: one sent, one failed (with a reply), one queued."""
    draft = DraftInput("urgent-actions", None, None, {"en": LanguageText("Sign now", "Please.")})
    with unit_of_work(factory) as session:
        campaign = create_draft(session, draft=draft, settings=settings, now=clock.now(), actor="t")
        launch_campaign(session=session, campaign=campaign, settings=settings, now=clock.now(),
                        actor="t")  # fmt: skip
        ids = list(session.scalars(select(Delivery.id).where(Delivery.campaign_id == campaign.id)))
        session.execute(
            update(Delivery).where(Delivery.id == ids[0]).values(status="sent", sent_at=clock.now())
        )
        session.execute(
            update(Delivery)
            .where(Delivery.id == ids[1])
            .values(status="failed", last_reply="550 5.1.1 mailbox unknown", attempts=1)
        )
        return campaign.id


# --- its own listener ------------------------------------------------------------------------


def test_the_public_pages_do_not_serve_the_console(
    factory: sessionmaker[Session], settings: Settings, clock: FrozenClock
) -> None:
    """The supporters' app has no console route: it can face the internet alone."""
    paths = {getattr(r, "path", "") for r in create_app(settings, factory, clock).routes}
    assert not paths & {"/signin", "/alerts/new", "/audit", "/enrol/{token}", "/api/progress"}


@pytest.mark.parametrize("command", ["console", "run"])
def test_the_commands_serve_the_console_on_its_own_port(tmp_path: Path, command: str) -> None:
    """`newsletter console` serves it alone; `newsletter run` beside the pages, on another port."""
    web, staff = free_port(), free_port()
    (tmp_path / "config.toml").write_text(
        f"[database]\nurl = 'sqlite:///{tmp_path / 'n.db'}'\n"
        f"[console]\nport = {staff}\nbase_url = 'http://127.0.0.1:{staff}'\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    env["NEWSLETTER_SECRET"] = SECRET
    newsletter = [sys.executable, "-m", "newsletter"]
    subprocess.run([*newsletter, "init"], cwd=tmp_path, env=env, check=True, capture_output=True)
    args = ["console"] if command == "console" else ["run", "--port", str(web)]
    proc = subprocess.Popen([*newsletter, *args], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_for(f"http://127.0.0.1:{staff}/healthz")
        signin = httpx.get(f"http://127.0.0.1:{staff}/signin")
        if command == "run":
            wait_for(f"http://127.0.0.1:{web}/healthz")
            public = httpx.get(f"http://127.0.0.1:{web}/signin")
            assert public.status_code == 404
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert signin.status_code == 200 and 'autocomplete="current-password"' in signin.text
    assert signin.headers["content-security-policy"] == CONSOLE_CSP


# --- dashboard and live figures ------------------------------------------------------------------


def test_dashboard_and_progress_show_the_ledger_counts(
    site: ConsoleSite, factory: sessionmaker[Session], settings: Settings, clock: FrozenClock
) -> None:
    """Sending campaigns with sent, queued, failed, the rate and time left; JSON for the script."""
    campaign_id = sending_alert(factory, settings, clock)
    editor = signed_in(site, factory, "ed@example.org", "editor")
    page = editor.get("/").text
    assert f'data-campaign="{campaign_id}"' in page and "Sign now" in page
    assert "Next digest:" in page
    progress = editor.get("/api/progress").json()["campaigns"]
    assert progress == [
        {
            "id": campaign_id,
            "status": "running",
            "counts": {"sent": 1, "queued": 1, "claimed": 0, "deferred": 0, "failed": 1},
            "total": 3,
            "per_minute": 0.2,  # one sent in the last five minutes
            "seconds_left": 300,
        }
    ]
    one = editor.get(f"/api/progress?campaign={campaign_id}").json()["campaigns"]
    assert one == progress
    assert site.client().get("/api/progress").status_code == 401


def test_watch_page_shows_replies_and_addresses_to_admins_only(
    site: ConsoleSite, factory: sessionmaker[Session], settings: Settings, clock: FrozenClock
) -> None:
    """Failures with the relay's reply for everyone; the address for admins alone."""
    campaign_id = sending_alert(factory, settings, clock)
    with unit_of_work(factory) as session:
        failed = session.scalar(select(Delivery).where(Delivery.status == "failed"))
        assert failed is not None
        address = session.get(Subscriber, failed.subscriber_id)
    editor = signed_in(site, factory, "ed@example.org", "editor")
    admin = signed_in(site, factory, "ad@example.org", "admin")
    as_editor = editor.get(f"/campaigns/{campaign_id}").text
    as_admin = admin.get(f"/campaigns/{campaign_id}").text
    assert "550 5.1.1 mailbox unknown" in as_editor and "550 5.1.1 mailbox unknown" in as_admin
    assert "@example.net" not in as_editor
    assert address is not None and address.email in as_admin


def test_pause_for_anyone_resume_and_cancel_for_approvers(
    site: ConsoleSite, factory: sessionmaker[Session], settings: Settings, clock: FrozenClock
) -> None:
    """The same steps as the CLI; an editor may pull the brake but not send on."""
    campaign_id = sending_alert(factory, settings, clock)
    editor = signed_in(site, factory, "ed@example.org", "editor")
    approver = signed_in(site, factory, "ap@example.org", "approver")
    path = f"/campaigns/{campaign_id}"
    assert editor.post(f"{path}/pause", {"reason": "wrong link"}).status_code == 303
    assert editor.post(f"{path}/resume", {}).status_code == 403
    assert approver.post(f"{path}/resume", {}).status_code == 303
    assert approver.post(f"{path}/retry", {}).status_code == 303
    assert approver.post(f"{path}/cancel", {}).status_code == 303
    again = approver.post(f"{path}/cancel", {})  # a refused step: its one line, nothing changed
    assert again.status_code == 409 and "already cancelled" in again.text
    with unit_of_work(factory) as session:
        campaign = session.get(Campaign, campaign_id)
        assert campaign is not None and campaign.status == CampaignStatus.CANCELLED
        events = [
            e for e in session.scalars(select(Event).order_by(Event.id))
            if e.action.startswith("campaign.")
        ]  # fmt: skip
        actions = [(e.actor, e.action) for e in events]
        # Every change made through the console names the address it came from.
        origins = {(e.detail.get("client"), e.detail.get("via")) for e in events if e.actor != "t"}
    assert origins == {("127.0.0.1", "console")}
    assert ("ed@example.org", "campaign.paused") in actions
    assert ("ap@example.org", "campaign.resumed") in actions
    assert ("ap@example.org", "campaign.retried") in actions
    assert ("ap@example.org", "campaign.cancelled") in actions


# --- compose and preview --------------------------------------------------------------------------


def test_compose_shows_recipients_per_language_and_a_preview_frame(
    site: ConsoleSite, factory: sessionmaker[Session]
) -> None:
    """Counts for the chosen list before saving; the preview has its own CSP and inert links."""
    editor = signed_in(site, factory, "ed@example.org", "editor")
    counted = editor.post(
        "/alerts/new",
        {"action": "count", "list": "urgent-actions", "title_en": "Kept", "body_en": "Text"},
        csrf_from="/alerts/new",
    )
    assert counted.status_code == 200 and 'value="Kept"' in counted.text
    assert "en: <strong>2</strong>" in counted.text and "be: <strong>1</strong>" in counted.text
    assert editor.get("/api/recipients?list=urgent-actions").json() == {
        "counts": {"en": 2, "be": 1, "ru": 0}
    }
    made = editor.post(
        "/alerts/new",
        {"action": "save", "list": "urgent-actions", "title_en": "Free them", "body_en": "Now."},
        csrf_from="/alerts/new",
    )
    path = made.headers["location"]
    page = editor.get(path).text
    assert '<iframe class="frame-phone" sandbox=""' in page
    frame = editor.get(f"{path}/preview/en?width=phone&scheme=light")
    assert frame.headers["content-security-policy"] == PREVIEW_CSP
    assert (
        "frame-ancestors 'self'" in PREVIEW_CSP and frame.headers["x-frame-options"] == "SAMEORIGIN"
    )
    assert "Free them" in frame.text and "%%" not in frame.text and "/u/" not in frame.text
    dark = editor.get(f"{path}/preview/en?scheme=dark").text
    assert "prefers-color-scheme" in frame.text and "prefers-color-scheme" not in dark
    assert editor.get(f"{path}/preview/xx").status_code == 404


def test_compose_keeps_an_alert_out_of_the_archive_when_unticked(
    site: ConsoleSite, factory: sessionmaker[Session]
) -> None:
    """The web copy is offered ticked; unticked, the alert is kept out of the public archive."""
    editor = signed_in(site, factory, "ed@example.org", "editor")
    form = editor.get("/alerts/new").text
    assert 'name="archive" type="checkbox" value="1" checked' in form
    fields = {"action": "save", "list": "urgent-actions", "title_en": "Quiet", "body_en": "Text"}
    made = editor.post("/alerts/new", fields, csrf_from="/alerts/new")
    campaign_id = int(made.headers["location"].rsplit("/", 1)[1])
    with unit_of_work(factory) as session:
        campaign = session.get(Campaign, campaign_id)
        assert campaign is not None and campaign.archived is False
    edited = editor.post(
        f"/alerts/{campaign_id}", {**fields, "archive": "1"}, csrf_from=f"/alerts/{campaign_id}"
    )
    assert edited.status_code == 303
    with unit_of_work(factory) as session:
        campaign = session.get(Campaign, campaign_id)
        assert campaign is not None and campaign.archived is True


def test_the_item_picker_searches_recent_items(
    site: ConsoleSite, factory: sessionmaker[Session], clock: FrozenClock
) -> None:
    """?q= filters the portal items offered; choosing one makes an alert about it."""
    add_items(factory, clock, "Court hearing moved", "Letters delivered")
    editor = signed_in(site, factory, "ed@example.org", "editor")
    page = editor.get("/alerts/new?q=court").text
    assert "Court hearing moved" in page and "Letters delivered" not in page
    made = editor.post(
        "/alerts/new",
        {"action": "save", "list": "urgent-actions", "item_ref": "Court hearing moved"},
        csrf_from="/alerts/new",
    )
    assert made.status_code == 303
    assert "Court hearing moved" in editor.get(made.headers["location"]).text


# --- digest, audit, staff ---------------------------------------------------------------------


def test_digest_page_leaves_an_item_out_and_puts_it_back(
    site: ConsoleSite, factory: sessionmaker[Session], clock: FrozenClock
) -> None:
    """The upcoming digest's items; exclude moves one to "left out"; editors cannot skip."""
    ids = add_items(factory, clock, "First item", "Second item")
    editor = signed_in(site, factory, "ed@example.org", "editor")
    assert "First item" in editor.get("/digest").text
    form = {"list": "weekly-digest", "item": str(ids[0])}
    assert editor.post("/digest/exclude", form, csrf_from="/digest").status_code == 303
    page = editor.get("/digest").text
    assert page.index("Left out") < page.index("First item")
    assert editor.post("/digest/include", form, csrf_from="/digest").status_code == 303
    assert "Left out" not in editor.get("/digest").text
    assert editor.post("/digest/skip", {"list": "weekly-digest"}).status_code == 403
    # A list that is not there (a forged form): the step's one line, not a server error.
    exclude_unknown = editor.post("/digest/exclude", {**form, "list": "no-such-list"})
    assert exclude_unknown.status_code == 409 and "no-such-list" in exclude_unknown.text


def test_audit_log_pages_and_a_csv_safe_for_spreadsheets(
    site: ConsoleSite, factory: sessionmaker[Session], clock: FrozenClock
) -> None:
    """Admins read every event, newest first; the CSV's formula-like cells are neutralised."""
    admin = signed_in(site, factory, "ad@example.org", "admin")
    with unit_of_work(factory) as session:
        record_event(session, now=clock.now(), actor="=HYPERLINK(\"x\")", action="test.formula",
                     client="+1", hash="@sum")  # fmt: skip
    page = admin.get("/audit").text
    assert "staff.signed_in" in page and "test.formula" in page
    body = admin.get("/audit.csv")
    assert body.headers["content-disposition"].startswith("attachment;")
    rows = list(csv.DictReader(io.StringIO(body.text)))
    formula = next(r for r in rows if r["action"] == "test.formula")
    assert formula["actor"] == '\'=HYPERLINK("x")' and formula["client"] == "'+1"
    assert formula["hash"] == "'@sum"
    assert any(r["action"] == "staff.signed_in" and r["actor"] == "ad@example.org" for r in rows)
    assert json.loads(rows[0]["detail"]) is not None


def test_staff_list_for_admins(site: ConsoleSite, factory: sessionmaker[Session]) -> None:
    """Every account, its role and state; changes stay in the CLI."""
    admin = signed_in(site, factory, "ad@example.org", "admin")
    with unit_of_work(factory) as session:
        add_staff(session, email="new@example.org", role="editor", name="", now=site.clock.now(),
                  actor="cli:test", settings=site.settings)  # fmt: skip
    page = admin.get("/staff").text
    assert "new@example.org" in page and "not enrolled yet" in page and "ad@example.org" in page


# --- enrolment, language, training ----------------------------------------------------------------


def test_enrolment_page_sets_the_password_and_shows_codes_once(
    site: ConsoleSite, factory: sessionmaker[Session], clock: FrozenClock
) -> None:
    """QR code as an image, otpauth link, text secret, new-password fields; the link works once."""
    with unit_of_work(factory) as session:
        url = add_staff(session, email="new@example.org", role="editor", name="",
                        now=clock.now(), actor="cli:test", settings=site.settings)  # fmt: skip
    path = "/enrol/" + url.rsplit("/enrol/", 1)[1]
    browser = site.client()
    page = browser.get(path).text
    assert '<img class="qr" src="data:image/svg+xml;base64,' in page and "<svg" not in page
    assert 'href="otpauth://totp/' in page and page.count('autocomplete="new-password"') == 2
    secret = page.split('<code id="secret" class="secret">')[1].split("<")[0]
    form = {"password": "correct horse battery staple 42",
            "password_again": "correct horse battery staple 42",
            "code": next_code(secret, clock), "csrf": csrf_of(page)}  # fmt: skip
    done = browser.post(path, form)
    assert done.status_code == 200 and done.text.count("<li><code>") == 10
    assert browser.get(path).status_code == 400


def test_language_switch_and_training_banner(
    factory: sessionmaker[Session], settings: Settings, clock: FrozenClock
) -> None:
    """?lang= chooses the interface language and is kept; training mode is said on every page."""
    with serve_console(console_settings(settings, training=True), factory, clock) as site:
        client = site.client()
        page = client.get("/signin?lang=be")
        assert '<html lang="be">' in page.text and "Рэжым трэніроўкі" in page.text
        assert '<html lang="be">' in client.get("/signin").text
        assert '<html lang="ru">' in client.get("/signin?lang=ru").text
        assert '<html lang="ru">' in client.get("/signin?lang=xx").text  # unknown: kept as was


# --- break glass, training -------------------------------------------------------------------


def submitted_alert(client: ConsoleClient, title: str = "Sign now") -> tuple[str, str]:
    """A draft made and submitted through the pages: its path and revision hash."""
    made = client.post(
        "/alerts/new",
        {"action": "save", "list": "urgent-actions", "title_en": title, "body_en": "Please."},
        csrf_from="/alerts/new",
    )
    path = made.headers["location"]
    assert client.post(f"{path}/submit", {}, csrf_from=path).status_code == 303
    page = client.get(path).text
    return path, page.split('id="revision-hash">')[1].split("<")[0]


def test_break_glass_sends_alone_with_a_reason_and_tells_every_approver(
    factory: sessionmaker[Session], settings: Settings, clock: FrozenClock, smtpd: SmtpServer
) -> None:
    """Only when [console] break_glass is on; a fresh code and a reason; approvers are mailed."""
    seed_people(factory, clock, 2)
    with serve_console(console_settings(settings, break_glass=True), factory, clock) as site:
        who = enrol_staff(factory, site.settings, clock, "ap@example.org", "approver")
        enrol_staff(factory, site.settings, clock, "other@example.org", "approver")
        client = site.client()
        client.sign_in(who)
        path, revision = submitted_alert(client)
        assert "Break glass" in client.get(path).text
        form = {"revision": revision, "reason": "the hearing is in an hour, no one answers",
                "code": next_code(who.secret, clock)}  # fmt: skip
        sent = client.post(f"{path}/break-glass", form, csrf_from=path)
        assert sent.status_code == 303 and sent.headers["location"].startswith("/campaigns/")
    told = [m for m in smtpd.messages() if m["To"] == "other@example.org"]
    assert len(told) == 2  # asked to approve at submission, then told of the break-glass send
    with unit_of_work(factory) as session:
        assert session.scalar(select(Event).where(Event.action == "alert.break_glass"))
        queued = session.scalars(select(Delivery.status)).all()
    assert queued == ["queued", "queued"]


def test_break_glass_is_not_there_when_off(
    site: ConsoleSite, factory: sessionmaker[Session]
) -> None:
    """Off by default: no form, and the route answers 404."""
    approver = signed_in(site, factory, "ap@example.org", "approver")
    path, revision = submitted_alert(approver)
    assert "Break glass" not in approver.get(path).text
    form = {"revision": revision, "reason": "x" * 30, "code": "000000"}
    assert approver.post(f"{path}/break-glass", form, csrf_from=path).status_code == 404


def test_a_wrong_step_up_code_approves_nothing(
    site: ConsoleSite, factory: sessionmaker[Session]
) -> None:
    """Approving needs a valid fresh code: a wrong one is refused, nothing is queued."""
    editor = signed_in(site, factory, "ed@example.org", "editor")
    path, revision = submitted_alert(editor)
    approver = signed_in(site, factory, "ap@example.org", "approver")
    refused = approver.post(
        f"{path}/approve", {"revision": revision, "code": "000000"}, csrf_from=path
    )
    assert refused.status_code == 400 and "That code is not valid." in refused.text
    with unit_of_work(factory) as session:
        assert session.scalar(select(Delivery)) is None
        assert session.scalar(select(Event).where(Event.action == "alert.approved")) is None


def test_training_alerts_go_only_to_the_staff(
    factory: sessionmaker[Session], settings: Settings, clock: FrozenClock, smtpd: SmtpServer
) -> None:
    """In training mode an approver may approve their own alert, and only staff get it."""
    seed_people(factory, clock, 2)
    with serve_console(console_settings(settings, training=True), factory, clock) as site:
        who = enrol_staff(factory, site.settings, clock, "ap@example.org", "approver")
        client = site.client()
        client.sign_in(who)
        path, revision = submitted_alert(client, "Practice alert")
        page = client.get(path).text
        assert "Training mode" in page and 'id="approve"' in page
        form = {"revision": revision, "code": next_code(who.secret, clock)}
        assert client.post(f"{path}/approve", form, csrf_from=path).status_code == 303
    got = [m["To"] for m in smtpd.messages() if "Practice alert" in str(m["Subject"])]
    assert got == ["ap@example.org"]
    with unit_of_work(factory) as session:
        assert session.scalar(select(Delivery)) is None


def test_an_alert_drafted_before_training_mode_and_sent_in_it_stays_out_of_the_archive(
    factory: sessionmaker[Session], settings: Settings, clock: FrozenClock, smtpd: SmtpServer
) -> None:
    """An alert drafted while training mode was off, then approved and sent as training once it
    was on: only staff get it, and it is marked training. Before, it finished unmarked, so the
    public archive listed a practice alert no reader was sent."""
    seed_people(factory, clock, 2)
    with serve_console(console_settings(settings), factory, clock) as site:
        who = enrol_staff(factory, site.settings, clock, "ap@example.org", "approver")
        client = site.client()
        client.sign_in(who)
        path, revision = submitted_alert(client, "Practice alert")
    with serve_console(console_settings(settings, training=True), factory, clock) as site:
        client = site.client()
        client.sign_in(who)
        form = {"revision": revision, "code": next_code(who.secret, clock)}
        assert client.post(f"{path}/approve", form, csrf_from=path).status_code == 303
    got = [m["To"] for m in smtpd.messages() if "Practice alert" in str(m["Subject"])]
    assert got == ["ap@example.org"]
    public = replace(settings, archive=replace(settings.archive, enabled=True, include_alerts=True))
    with unit_of_work(factory) as session:
        assert session.scalar(select(Delivery)) is None
        practice = session.scalars(select(Campaign).where(Campaign.title == "Practice alert")).one()
        assert practice.status == "finished" and practice.training
        assert not is_public(practice, public)
