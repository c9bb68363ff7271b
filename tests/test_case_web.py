"""Urgent-action cases on the web: the "I sent my letter" page behind /wrote/TOKEN (GET records
nothing, POST counts a reader once, forged links and other sites refused, discreet and departed
readers not counted), and a case message's web copies (the public copy, where the case stands now,
no reader's link); served by a real uvicorn on loopback (SQLite and PostgreSQL), the case made and
sent with the real functions of cases.py, and the pages checked in Debian's chromium.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from typing import Any

import httpx
import pytest
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session, sessionmaker

from newsletter.case_files import Letter, Target
from newsletter.cases import CaseDraft, close_case, create_case, send_first, send_update
from newsletter.cases import wrote_count as count_in_db
from newsletter.clock import FrozenClock
from newsletter.db import unit_of_work
from newsletter.db.models import (
    ActionCase,
    CaseLetter,
    CaseMessage,
    Event,
    Subscriber,
    SubscriberStatus,
    Variant,
)
from newsletter.i18n import gettext_for
from newsletter.readers import set_reading
from newsletter.render import wrote_section
from newsletter.subscriptions import forget, unsubscribe
from newsletter.tokens import make_copy_token, make_token, make_wrote_token
from tests.browser_checks import check_page
from tests.builders import deliver
from tests.conftest import SECRET, SmtpServer, make_settings
from tests.test_web import ROOT, Site, add_person, form_token
from tests.webserver import serve_pages

PERSON = "Maria Kalesnikava"  # not to be named on the web: the copies show "M. K."
TITLE = "Letters for a prisoner of conscience"
URGENT = ("urgent-actions",)
OTHER_SECRET = "another-secret-" + "y" * 40


@dataclass
class Case:
    id: int
    reference: str
    first: int  # the first message's campaign
    slug: str


@pytest.fixture
def site(
    factory: sessionmaker[Session], database_url: str, clock: FrozenClock, smtpd: SmtpServer
) -> Iterator[Site]:
    """The declared lists, and the pages served on a free loopback port, mail to aiosmtpd."""
    from newsletter.lists import read_lists, sync_lists

    with unit_of_work(factory) as session:
        sync_lists(session=session, specs=read_lists(ROOT / "subscribers" / "lists.toml"))
    with serve_pages(make_settings(database_url, smtpd), factory, clock) as (url, settings):
        yield Site(url, settings, factory, clock)


def reader(site: Site, email: str, language: str = "en") -> int:
    return add_person(site.factory, site.clock, email, language=language, lists=URGENT)


def open_case(site: Site, *, person_public: bool = False) -> Case:
    """A case made and its first message sent (queued) with cases.py, as `actions send` does."""
    draft = CaseDraft(
        title=TITLE,
        body_html="<p>He was sentenced for his work as a human rights defender.</p>",
        person=PERSON,
        person_public=person_public,
        deadline=date(2026, 12, 4),
        targets=(Target(name="Prosecutor General", email="prosecutor@example.by"),),
        letters={"en": Letter("Release him", "Please release him at once.")},
    )
    with unit_of_work(site.factory) as session:
        case = create_case(
            session, settings=site.settings, now=site.clock.now(), actor="test", draft=draft
        )
        campaign, queued = send_first(
            session, case=case, settings=site.settings, now=site.clock.now(), actor="test"
        )
        assert queued > 0
        return Case(case.id, case.reference, campaign.id, campaign.slug or "")


def wrote_url(site: Site, sid: int, case_id: int, *, secret: str = SECRET) -> str:
    return f"{site.url}/wrote/{make_wrote_token(secret=secret, subscriber_id=sid, case_id=case_id)}"


def counted(site: Site, case_id: int) -> int:
    with unit_of_work(site.factory) as session:
        return count_in_db(session, case_id)


def events(site: Site) -> int:
    with unit_of_work(site.factory) as session:
        return int(session.scalar(select(func.count()).select_from(Event)) or 0)


def post_wrote(url: str, headers: dict[str, str] | None = None) -> httpx.Response:
    """Open the page as the reader does, then press its button."""
    return httpx.post(url, data={"form_token": form_token(httpx.get(url).text)}, headers=headers)


# --- "I sent my letter" ------------------------------------------------------------------------


def test_the_emailed_link_shows_the_case_and_its_get_records_nothing(
    site: Site, smtpd: SmtpServer
) -> None:
    """The link in the first message's email opens a page in the reader's language naming the
    case, with one button; opening it (a mail scanner, then the reader) records nothing."""
    reader(site, "alesia@example.org", "be")
    case = open_case(site)
    deliver(site.factory, site.settings, site.clock)
    [mail] = smtpd.messages()
    text = mail.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    [link] = [word for word in text.split() if "/wrote/" in word]
    assert link.startswith(f"{site.url}/wrote/")
    before = events(site)
    for _ in range(2):
        page = httpx.get(link)
        assert page.status_code == 200 and '<html lang="be">' in page.text
        assert page.text.count("<button") == 1 and page.text.count("<form") == 1
        assert gettext_for("be")("I sent my letter") in page.text
        assert case.reference in page.text and TITLE in page.text
        assert page.headers["cache-control"] == "no-store"
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert counted(site, case.id) == 0 and events(site) == before


def without_form_token(page: str) -> str:
    """A page with its form token's value blanked (it is dated, so two fetches differ)."""
    return re.sub(r'name="form_token" value="[^"]*"', 'name="form_token" value=""', page)


def test_a_post_counts_a_reader_once_however_often(site: Site) -> None:
    """Three posts by one reader count 1; a second reader makes 2; and nothing else is kept
    about them (no event, no other row). Neither page says whether or how many have written:
    posted again and again, a live count would time each reader's click, and the link's page
    would tell whoever holds a reader's mail (a seized phone) that they wrote."""
    one, two = reader(site, "one@example.org"), reader(site, "two@example.org", "ru")
    case = open_case(site)
    before = events(site)
    url = wrote_url(site, one, case.id)
    before_writing = httpx.get(url)
    for _ in range(3):
        done = post_wrote(url)
        assert done.status_code == 200 and "Thank you for writing" in done.text
        assert "said they wrote" not in done.text
        assert case.reference in done.text
    assert counted(site, case.id) == 1
    again = httpx.get(url)  # the reader comes back: the page as it was before they wrote
    assert without_form_token(again.text) == without_form_token(before_writing.text)
    done = post_wrote(wrote_url(site, two, case.id))
    assert '<html lang="ru">' in done.text
    assert gettext_for("ru")("Thank you for writing") in done.text
    assert "2 " not in done.text.split("</h1>", 1)[1].split("</main>", 1)[0]
    assert counted(site, case.id) == 2 and events(site) == before
    with unit_of_work(site.factory) as session:
        rows = session.execute(select(CaseLetter.case_id, CaseLetter.subscriber_id)).all()
    assert sorted(tuple(r) for r in rows) == [(case.id, one), (case.id, two)]


@pytest.mark.parametrize("method", ["GET", "POST"])
@pytest.mark.parametrize("bad", ["altered", "other-secret", "other-purpose", "garbage"])
def test_a_forged_link_gets_the_400_page_and_counts_nothing(
    site: Site, method: str, bad: str
) -> None:
    """An altered token, one signed with another secret or made for another page: the links'
    400 page, discreet (no brand), and nothing counted."""
    sid = reader(site, "reader@example.org")
    case = open_case(site)
    good = wrote_url(site, sid, case.id)
    form = form_token(httpx.get(good).text)
    token = good.rsplit("/", 1)[1]
    if bad == "altered":
        token = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    elif bad == "other-secret":
        token = wrote_url(site, sid, case.id, secret=OTHER_SECRET).rsplit("/", 1)[1]
    elif bad == "other-purpose":  # an unsubscribe token naming the same numbers
        token = make_token(secret=SECRET, purpose="unsubscribe", subscriber_id=sid, list_id=case.id)
    else:
        token = "not-a-token"
    data = {"form_token": form} if method == "POST" else None
    reply = httpx.request(method, f"{site.url}/wrote/{token}", data=data)
    assert reply.status_code == 400 and "This link does not work" in reply.text
    assert site.settings.brand.name not in reply.text
    assert counted(site, case.id) == 0


def test_a_post_from_another_site_or_without_the_form_is_refused(site: Site) -> None:
    """Another origin, a cross-site fetch, or no (or another link's) form token: 403, nothing
    counted; our own origin and a browser's `Origin: null` pass."""
    sid, other = reader(site, "reader@example.org"), reader(site, "other@example.org")
    case = open_case(site)
    url = wrote_url(site, sid, case.id)
    form = form_token(httpx.get(url).text)
    for headers in (
        {"Origin": "https://evil.example"},
        {"Origin": site.url + ".evil.example"},
        {"Sec-Fetch-Site": "cross-site"},
    ):
        reply = httpx.post(url, data={"form_token": form}, headers=headers)
        assert reply.status_code == 403, headers
    assert httpx.post(url, data={}).status_code == 403
    elsewhere = form_token(httpx.get(wrote_url(site, other, case.id)).text)
    assert httpx.post(url, data={"form_token": elsewhere}).status_code == 403
    assert counted(site, case.id) == 0
    ours = httpx.post(url, data={"form_token": form}, headers={"Origin": site.url})
    assert ours.status_code == 200 and counted(site, case.id) == 1
    null = httpx.post(
        wrote_url(site, other, case.id), data={"form_token": elsewhere}, headers={"Origin": "null"}
    )
    assert null.status_code == 200 and counted(site, case.id) == 2


def test_a_form_left_open_too_long_is_shown_again_and_counts_nothing(site: Site) -> None:
    sid = reader(site, "reader@example.org")
    case = open_case(site)
    url = wrote_url(site, sid, case.id)
    form = form_token(httpx.get(url).text)
    site.clock.advance(hours=25)
    reply = httpx.post(url, data={"form_token": form})
    assert reply.status_code == 200 and 'role="alert"' in reply.text
    assert reply.text.count("<button") == 1 and counted(site, case.id) == 0
    assert post_wrote(url).status_code == 200 and counted(site, case.id) == 1


def test_a_discreet_reader_is_never_counted(site: Site) -> None:
    """A reader who chose discreet mail was never sent the link: whether they open it or post
    it (with a form got before they chose), a neutral page naming nothing, and nothing kept."""
    sid = reader(site, "quiet@example.org")
    case = open_case(site)
    url = wrote_url(site, sid, case.id)
    form = form_token(httpx.get(url).text)
    with unit_of_work(site.factory) as session:
        set_reading(
            session, subscriber_id=sid, discreet="envelope", now=site.clock.now(), actor="t"
        )
    before = events(site)
    for reply in (httpx.get(url), httpx.post(url, data={"form_token": form})):
        assert reply.status_code == 200 and "Nothing was recorded." in reply.text
        assert "<button" not in reply.text
        for named in (case.reference, TITLE, site.settings.brand.name, "127.0.0.1"):
            assert named not in reply.text, named
    assert counted(site, case.id) == 0 and events(site) == before


def test_departed_readers_and_missing_cases_are_not_counted(site: Site) -> None:
    """Someone off the case's list, someone forgotten, a case that is not there: a clear page
    each, and nothing counted."""
    left, gone = reader(site, "left@example.org"), reader(site, "gone@example.org")
    case = open_case(site)
    forms = {sid: form_token(httpx.get(wrote_url(site, sid, case.id)).text) for sid in (left, gone)}
    with unit_of_work(site.factory) as session:
        unsubscribe(
            session=session, subscriber_id=left, list_id=None, now=site.clock.now(), actor="t"
        )
        forget(
            session=session,
            email="gone@example.org",
            secret=SECRET,
            now=site.clock.now(),
            actor="t",
        )
        assert session.get(Subscriber, gone).status == SubscriberStatus.FORGOTTEN  # type: ignore[union-attr]
    for sid in (left, gone):
        url = wrote_url(site, sid, case.id)
        for reply in (httpx.get(url), httpx.post(url, data={"form_token": forms[sid]})):
            assert reply.status_code == 200 and "Nothing was counted" in reply.text
            assert "<button" not in reply.text
    forgotten = httpx.get(wrote_url(site, gone, case.id))
    assert site.settings.brand.name not in forgotten.text  # who it was cannot be known
    assert counted(site, case.id) == 0
    keeper = reader(site, "keeper@example.org")
    url = wrote_url(site, keeper, case.id)
    form = form_token(httpx.get(url).text)
    with unit_of_work(site.factory) as session:  # withdrawn while the page was open
        session.execute(delete(ActionCase).where(ActionCase.id == case.id))
    for reply in (httpx.get(url), httpx.post(url, data={"form_token": form})):
        assert reply.status_code == 404 and "This case is not here" in reply.text
        assert "<button" not in reply.text
    with unit_of_work(site.factory) as session:
        assert session.scalar(select(func.count()).select_from(CaseLetter)) == 0


# --- the web copies ----------------------------------------------------------------------------


def archive_copy(site: Site, slug: str, lang: str = "en") -> httpx.Response:
    reply = httpx.get(f"{site.url}/archive/{slug}/{lang}")
    assert reply.status_code == 200, reply.status_code
    return reply


def box(page: str) -> str:
    """The box saying where the case stands (our own small template, searched as text)."""
    match = re.search(r'<div role="region".*?</div>', page, re.DOTALL)
    assert match, "no case box"
    return match.group(0)


def no_reader_link(page: str) -> None:
    assert "/wrote/" not in page and "%%" not in page and "WROTE" not in page
    assert "I sent my letter" not in page and "/u/" not in page and "/preferences/" not in page


def test_a_case_messages_archive_copy_is_public_and_says_where_the_case_stands(
    site: Site, smtpd: SmtpServer
) -> None:
    """The first message's copy: initials for a person not to be named, no reader's link, the
    case open with its count; after an update and the closing, the same copy says closed and
    why, links the others, and was never to be cached long."""
    sid = reader(site, "reader@example.org")
    case = open_case(site)
    deliver(site.factory, site.settings, site.clock)
    mail = smtpd.messages()[0].get_body(("html",)).get_content()  # type: ignore[union-attr]
    assert PERSON in mail and "/wrote/" in mail  # the email names him, and carries the link
    with unit_of_work(site.factory) as session:  # the variant keeps the section, to cut
        variant = session.scalar(
            select(Variant).where(Variant.campaign_id == case.first, Variant.lang == "en")
        )
        assert variant is not None and wrote_section(variant.link_nonce)[0] in variant.html
    reply = archive_copy(site, case.slug)
    page = reply.text
    assert PERSON not in page and "M. K." in page
    no_reader_link(page)
    assert reply.headers["cache-control"] == "public, max-age=300"
    assert f"<strong>{case.reference}</strong> · Open</p>" in box(page)
    assert "Deadline for letters: December 4, 2026" in box(page)
    assert "said they wrote" not in box(page)  # no live count: it could time one click
    assert "<a " not in box(page)  # no other message yet
    assert post_wrote(wrote_url(site, sid, case.id)).status_code == 200
    assert "said they wrote" not in box(archive_copy(site, case.slug).text)

    with unit_of_work(site.factory) as session:
        row = session.get(ActionCase, case.id)
        assert row is not None
        update, _ = send_update(
            session,
            case=row,
            body_html="<p>He was moved to another prison.</p>",
            include_new=False,
            settings=site.settings,
            now=site.clock.now(),
            actor="test",
        )
        update_slug = update.slug
    assert "Open, updated 1 time</p>" in box(archive_copy(site, case.slug).text)
    with unit_of_work(site.factory) as session:
        row = session.get(ActionCase, case.id)
        assert row is not None
        closing, _ = close_case(
            session,
            case=row,
            outcome="released",
            body_html="<p>He is free.</p>",
            settings=site.settings,
            now=site.clock.now(),
            actor="test",
        )
        assert closing is not None
        closing_slug = closing.slug
    page = archive_copy(site, case.slug).text
    assert "Closed: the person was released" in box(page) and "Open" not in box(page)
    assert "1 person has said they wrote." in box(page)  # final once closed
    assert "Write now" not in page and "mailto:" not in page  # closed: nothing to act on
    assert f'href="../../archive/{update_slug}/en"' in box(page)
    assert f'href="../../archive/{closing_slug}/en"' in box(page)
    no_reader_link(page)
    closing_page = archive_copy(site, closing_slug or "").text
    assert f'href="../../archive/{case.slug}/en"' in box(closing_page)
    assert PERSON not in closing_page
    no_reader_link(closing_page)

    with unit_of_work(site.factory) as session:  # staff change the case row: seen at once
        row = session.get(ActionCase, case.id)
        assert row is not None
        row.outcome = "no-change"
    assert "Closed: no change" in box(archive_copy(site, case.slug).text)
    be = archive_copy(site, case.slug, "be").text
    assert gettext_for("be")("Closed: no change") in be and PERSON not in be


def test_without_its_public_copy_a_case_message_is_shown_only_if_he_may_be_named(
    site: Site,
) -> None:
    """A message whose public copy is missing (made before copies were kept) falls back to the
    email's variant only when the person may be named; else there is no web copy."""
    reader(site, "reader@example.org")
    case = open_case(site)
    with unit_of_work(site.factory) as session:
        message = session.get(CaseMessage, case.first)
        assert message is not None and message.copies
        message.copies = {}
    assert httpx.get(f"{site.url}/archive/{case.slug}/en").status_code == 404
    with unit_of_work(site.factory) as session:
        row = session.get(ActionCase, case.id)
        assert row is not None
        row.person_public = True
    page = archive_copy(site, case.slug).text
    assert PERSON in page
    no_reader_link(page)


def test_the_discreet_copy_of_a_first_message_has_no_reader_link(site: Site) -> None:
    """/w/TOKEN shows the email as readers got it, less the "I sent my letter" section."""
    reader(site, "reader@example.org")
    case = open_case(site)
    for lang in ("en", "be"):
        token = make_copy_token(secret=SECRET, campaign_id=case.first, lang=lang)
        reply = httpx.get(f"{site.url}/w/{token}")
        assert reply.status_code == 200
        no_reader_link(reply.text)
        assert gettext_for(lang)("I sent my letter") not in reply.text
        assert TITLE in reply.text


# --- in the browser ------------------------------------------------------------------------------


def wrote_form(site: Site, page: Any) -> None:
    sid = reader(site, "reader@example.org", "be")
    page.goto(wrote_url(site, sid, open_case(site).id))


def wrote_done(site: Site, page: Any) -> None:
    wrote_form(site, page)
    page.click("button[type=submit]")
    page.locator("[role=status]").wait_for()


def wrote_left(site: Site, page: Any) -> None:
    sid = reader(site, "reader@example.org", "ru")
    case = open_case(site)
    with unit_of_work(site.factory) as session:
        unsubscribe(
            session=session, subscriber_id=sid, list_id=None, now=site.clock.now(), actor="t"
        )
    page.goto(wrote_url(site, sid, case.id))


def wrote_neutral(site: Site, page: Any) -> None:
    sid = reader(site, "reader@example.org")
    case = open_case(site)
    with unit_of_work(site.factory) as session:
        set_reading(session, subscriber_id=sid, discreet="pointer", now=site.clock.now(), actor="t")
    page.goto(wrote_url(site, sid, case.id))


def wrote_gone(site: Site, page: Any) -> None:
    sid = reader(site, "reader@example.org")
    page.goto(wrote_url(site, sid, open_case(site).id + 1000))


def case_copy(site: Site, page: Any) -> None:
    sid = reader(site, "reader@example.org")
    case = open_case(site)
    with unit_of_work(site.factory) as session:
        session.add(CaseLetter(case_id=case.id, subscriber_id=sid))
        row = session.get(ActionCase, case.id)
        assert row is not None
        close_case(
            session,
            case=row,
            outcome="improved",
            body_html="<p>He sees a doctor now.</p>",
            settings=site.settings,
            now=site.clock.now(),
            actor="test",
        )
    page.goto(f"{site.url}/archive/{case.slug}/be")


STATES = {
    "wrote-form": (wrote_form, "button[type=submit]"),
    "wrote-done": (wrote_done, "[role=status]"),
    "wrote-left": (wrote_left, "h1"),
    "wrote-neutral": (wrote_neutral, "h1"),
    "wrote-gone": (wrote_gone, "h1"),
    "case-copy": (case_copy, "[role=region] a"),
}


@pytest.mark.parametrize("state", list(STATES))
def test_case_pages_fit_a_phone_and_pass_axe(site: Site, browser: Any, state: str) -> None:
    """At 375 px: the state's element shown, no sideways scrolling, no WCAG 2.1 AA violation."""
    reach, selector = STATES[state]
    page = browser.new_page(viewport={"width": 375, "height": 740})
    try:
        reach(site, page)
        check_page(page, selector, state)
    finally:
        page.close()


def test_a_reader_says_they_wrote_in_the_browser(site: Site, browser: Any) -> None:
    """The button, pressed in chromium (its own Origin and Sec-Fetch-Site), counts once."""
    sid = reader(site, "reader@example.org")
    case = open_case(site)
    page = browser.new_page(viewport={"width": 375, "height": 740})
    try:
        page.goto(wrote_url(site, sid, case.id))
        page.click("button[type=submit]")
        page.locator("[role=status]", has_text="Every letter shows").wait_for()
        assert counted(site, case.id) == 1
        page.go_back()
        page.reload()
        page.click("button[type=submit]")
        page.locator("[role=status]", has_text="Every letter shows").wait_for()
    finally:
        page.close()
    assert counted(site, case.id) == 1
