"""An attacker's audit of the staff console: hostile numbers in addresses and forms, approval
races, and what revoked sessions and forged audit text can still do."""

from __future__ import annotations

import http.client
import threading
import time
from dataclasses import replace

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from newsletter.approvals import Approver, approve, revision_hash
from newsletter.check import stored_variants
from newsletter.clock import FrozenClock
from newsletter.config import Settings
from newsletter.db import unit_of_work
from newsletter.db.models import (
    Approval,
    Campaign,
    CampaignKind,
    CampaignRevision,
    CampaignStatus,
    Delivery,
    Event,
    MailingList,
    Variant,
)
from newsletter.digest_control import next_slot
from newsletter.errors import ApprovalError
from newsletter.staff import disable_staff, set_role
from tests.conftest import SmtpServer
from tests.console_site import (
    ConsoleSite,
    Staffer,
    csrf_of,
    enrol_staff,
)
from tests.test_approvals import APPROVER, SECOND, deliveries, drafted, seed_people, submitted
from tests.test_console import settings, signed_in, site
from tests.test_digest_control import add_items, scheduler

__all__ = ["settings", "site"]  # the fixtures, shared with test_console


HUGE = "9" * 30
SUPERSCRIPT = "\u00b2"  # str.isdigit() says yes, int() says no


@pytest.mark.parametrize(
    "path",
    [
        f"/api/progress?campaign={SUPERSCRIPT}",
        f"/api/progress?campaign={HUGE}",
        f"/api/progress?campaign={'9' * 5000}",
        f"/audit?page={SUPERSCRIPT}",
        f"/audit?page={'9' * 5000}",
        f"/campaigns/{HUGE}",
        f"/alerts/{HUGE}",
        f"/alerts/{HUGE}/preview/en",
    ],
)
def test_hostile_numbers_in_addresses_get_an_answer_not_a_500(
    site: ConsoleSite, factory: sessionmaker[Session], path: str
) -> None:
    """A number no campaign or page can have is a 4xx (or the first page), never a crash."""
    admin = signed_in(site, factory, "admin@example.org", "admin")
    reply = admin.get(path)
    assert reply.status_code < 500, (path, reply.status_code)


@pytest.mark.parametrize("item", [SUPERSCRIPT, HUGE, "9" * 5000])
def test_hostile_item_numbers_in_the_digest_form_get_a_400(
    site: ConsoleSite, factory: sessionmaker[Session], item: str
) -> None:
    """Leaving out an item numbered "²" or past any integer is a 400, not a crash."""
    editor = signed_in(site, factory, "ed@example.org", "editor")
    reply = editor.post(
        "/digest/exclude", {"list": "weekly-digest", "item": item}, csrf_from="/digest"
    )
    assert reply.status_code == 400


# --- approvals racing each other -------------------------------------------------------------


def approve_while_another_is_open(
    factory: sessionmaker[Session],
    settings: Settings,
    clock: FrozenClock,
    first: Approver,
    second: Approver,
) -> tuple[int | None, object]:
    """`first` approves in a transaction left open; `second` approves meanwhile, in a thread;
    then the first commits. Returns the first's result and the second's (or its error)."""
    settings = replace(settings, alerts=replace(settings.alerts, approvals_required=2))
    seed_people(factory, clock, 2)
    cid = drafted(factory, settings, clock)
    digest = submitted(factory, settings, clock, cid)
    outcome: list[object] = []

    def other() -> None:
        try:
            with unit_of_work(factory) as session:
                theirs = approve(
                    session, campaign_id=cid, revision_hash=digest, approver=second,
                    settings=settings, now=clock.now(),
                )  # fmt: skip
            outcome.append(theirs)
        except Exception as e:  # the test looks at what it was
            outcome.append(e)

    session = factory()
    try:
        mine = approve(
            session, campaign_id=cid, revision_hash=digest, approver=first,
            settings=settings, now=clock.now(),
        )  # fmt: skip
        thread = threading.Thread(target=other)
        thread.start()
        time.sleep(0.5)  # the other approval runs (or waits) while this one is open
        session.commit()
    finally:
        session.close()
    thread.join(timeout=60)
    assert outcome, "the second approval never finished"
    return mine, outcome[0]


def test_two_approvers_at_once_launch_the_alert(
    factory: sessionmaker[Session], settings: Settings, clock: FrozenClock
) -> None:
    """With two approvals required, two approvers approving at the same moment send it: neither
    may count only their own approval and leave the alert stuck with two and unsent."""
    mine, theirs = approve_while_another_is_open(factory, settings, clock, APPROVER, SECOND)
    assert mine is None
    assert theirs == 2
    with unit_of_work(factory) as session:
        assert session.scalar(select(func.count()).select_from(Delivery)) == 2


def test_one_approver_twice_at_once_is_one_approval_and_a_clear_refusal(
    factory: sessionmaker[Session], settings: Settings, clock: FrozenClock
) -> None:
    """A double-clicked approve: the second is refused as already approved, not a crash."""
    mine, theirs = approve_while_another_is_open(factory, settings, clock, APPROVER, APPROVER)
    assert mine is None
    assert isinstance(theirs, ApprovalError) and "already" in str(theirs)
    with unit_of_work(factory) as session:
        assert session.scalar(select(func.count()).select_from(Approval)) == 1
        assert session.scalar(select(func.count()).select_from(Delivery)) == 0


@pytest.mark.parametrize("change", ["disabled", "made an editor"])
def test_an_approval_stops_counting_when_its_account_is_disabled_or_demoted(
    factory: sessionmaker[Session], settings: Settings, clock: FrozenClock, change: str
) -> None:
    """Two approvals required: one from an account disabled (a stolen phone) or demoted since
    does not make a second person's approval enough to send; a third person's does."""
    settings = replace(settings, alerts=replace(settings.alerts, approvals_required=2))
    seed_people(factory, clock, 2)
    first, second, third = (
        enrol_staff(factory, settings, clock, f"ap{i}@example.org", "approver") for i in (1, 2, 3)
    )
    cid = drafted(factory, settings, clock)
    digest = submitted(factory, settings, clock, cid)

    def approving(who: Staffer) -> int | None:
        with unit_of_work(factory) as session:
            return approve(session, campaign_id=cid, revision_hash=digest, approver=who,
                           settings=settings, now=clock.now())  # fmt: skip

    assert approving(first) is None
    with unit_of_work(factory) as session:
        if change == "disabled":
            disable_staff(session, email=first.email, now=clock.now(), actor="cli:test")
        else:
            set_role(session, email=first.email, role="editor", now=clock.now(), actor="cli:test")
    assert approving(second) is None
    assert deliveries(factory, cid) == 0
    assert approving(third) == 2


@pytest.mark.parametrize("step", ["edit", "submit"])
def test_an_edit_or_submission_racing_the_approval_cannot_change_the_alert_once_sent(
    site: ConsoleSite, factory: sessionmaker[Session], clock: FrozenClock, step: str
) -> None:
    """An editor saves (or submits again) while the approval that launches the alert is being
    committed: refused once the launch is in; what goes out is the approved revision."""
    editor = signed_in(site, factory, "ed@example.org", "editor")
    made = editor.post(
        "/alerts/new",
        {"action": "save", "list": "urgent-actions", "title_en": "Approved", "body_en": "Text."},
        csrf_from="/alerts/new",
    )
    path = made.headers["location"]
    cid = int(path.rsplit("/", 1)[1])
    assert editor.post(f"{path}/submit", {}, csrf_from=path).status_code == 303
    page = editor.get(path).text
    digest = page.split('id="revision-hash">')[1].split("<")[0]
    token = csrf_of(page)
    edit = {"csrf": token, "action": "save", "list": "urgent-actions", "title_en": "EDITED",
            "body_en": "Unapproved text."}  # fmt: skip
    target, form = (path, edit) if step == "edit" else (f"{path}/submit", {"csrf": token})
    replies: list[int] = []
    session = factory()
    try:
        launched = approve(
            session, campaign_id=cid, revision_hash=digest, approver=APPROVER,
            settings=site.settings, now=clock.now(),
        )  # fmt: skip
        assert launched == 3
        thread = threading.Thread(
            target=lambda: replies.append(editor.post(target, form).status_code)
        )
        thread.start()
        time.sleep(0.5)  # the edit runs (or waits) while the launch is not yet committed
        session.commit()
    finally:
        session.close()
    thread.join(timeout=60)
    assert replies and 400 <= replies[0] < 500
    with unit_of_work(factory) as check:
        campaign = check.get(Campaign, cid)
        assert campaign is not None and campaign.title == "Approved"
        stored = stored_variants(check, campaign)
        assert stored
        assert check.scalar(select(func.count()).select_from(CampaignRevision)) == 1
        assert revision_hash(stored, list_id=campaign.list_id, segment_id=None, recipients=3) == (
            digest
        )


@pytest.mark.parametrize(
    "path", ["//evil.example/signin", "/\\evil.example/signin", "/%09/evil.example/signin"]
)
def test_the_language_links_never_point_off_site(site: ConsoleSite, path: str) -> None:
    """A link to https://console//evil.example makes a 404 page whose language links must stay
    on the console (a browser reads //host or /\\host in an href as another site's address)."""
    host, port = site.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("GET", path)  # sent as written: httpx would tidy the path first
        reply = conn.getresponse()
        page = reply.read().decode()
    finally:
        conn.close()
    assert reply.status == 404
    links = [part.split('"', 1)[0] for part in page.split('href="')[1:]]
    assert any("lang=be" in link for link in links)
    off_site = [link for link in links if link.replace("\t", "").startswith(("//", "/\\"))]
    assert not off_site, links


# --- test sends and the digest's skip --------------------------------------------------------


def draft_row(factory: sessionmaker[Session], clock: FrozenClock, kind: str, key: str) -> int:
    """A draft campaign that is not a console alert (a digest, a case message), as its own
    steps leave it: on the alert list, with a text only its audience should see."""
    with unit_of_work(factory) as session:
        ml = session.scalars(select(MailingList).where(MailingList.slug == "urgent-actions")).one()
        campaign = Campaign(
            kind=kind, list_id=ml.id, status=CampaignStatus.DRAFT, dedupe_key=key,
            title="Private to its readers", body_html="<p>Private to its readers.</p>",
            created_at=clock.now(),
        )  # fmt: skip
        session.add(campaign)
        session.flush()
        return campaign.id


def count_rows(factory: sessionmaker[Session], model: type, **where: object) -> int:
    with unit_of_work(factory) as session:
        query = select(func.count()).select_from(model).filter_by(**where)
        return int(session.scalar(query) or 0)


def test_a_test_send_is_only_of_a_console_alert_draft_and_stores_nothing(
    site: ConsoleSite, factory: sessionmaker[Session], clock: FrozenClock, smtpd: SmtpServer
) -> None:
    """A digest or a case message is refused before anything is rendered or sent; a console
    draft's test, and an alert's held from the feed or the CLI, are sent from a fresh render
    that is not stored."""
    editor = signed_in(site, factory, "ed@example.org", "editor")
    digest = draft_row(factory, clock, CampaignKind.DIGEST, "digest:test:1-2")
    case = draft_row(factory, clock, CampaignKind.ALERT, "case:1:first:0")
    for cid in (digest, case):
        reply = editor.post(f"/alerts/{cid}/test", {"addresses": "outsider@evil.example"})
        assert reply.status_code in (400, 404), (cid, reply.status_code)
        assert count_rows(factory, Variant, campaign_id=cid) == 0
    assert smtpd.messages() == []
    assert count_rows(factory, Event, action="alert.test_sent") == 0
    cid = drafted(factory, site.settings, clock)
    reply = editor.post(f"/alerts/{cid}/test", {"addresses": "coach@staff.example.org"})
    assert reply.status_code == 200 and len(smtpd.messages()) == 1
    assert count_rows(factory, Variant, campaign_id=cid) == 0
    held = draft_row(factory, clock, CampaignKind.ALERT, "alert:2:text:0123")  # from the feed/CLI
    reply = editor.post(f"/alerts/{held}/test", {"addresses": "coach@staff.example.org"})
    assert reply.status_code == 200 and len(smtpd.messages()) == 2
    assert count_rows(factory, Variant, campaign_id=held) == 0


def test_skipping_the_digest_in_the_console_claims_the_schedulers_slot(
    site: ConsoleSite, factory: sessionmaker[Session], clock: FrozenClock, smtpd: SmtpServer
) -> None:
    """As skip_digest with the settings does: the slot is the list's, so items that arrive
    before it are not sent then."""
    add_items(factory, clock, "Skipped in the console")
    approver = signed_in(site, factory, "appr@example.org", "approver")
    slot = next_slot(site.settings, clock.now(), after=None)
    reply = approver.post("/digest/skip", {"list": "weekly-digest"}, csrf_from="/digest")
    assert reply.status_code == 303
    with unit_of_work(factory) as session:
        ml = session.scalars(select(MailingList).where(MailingList.slug == "weekly-digest")).one()
        assert slot is not None and ml.last_digest_slot == slot
    add_items(factory, clock, "Arrived after the skip")
    clock.advance(days=1)
    assert scheduler(factory, site.settings, clock).run_digests() == []
    assert smtpd.messages() == []
