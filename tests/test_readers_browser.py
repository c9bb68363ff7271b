"""Readers at risk in Debian's chromium: the preferences page's discreet-mail and OpenPGP sections
in each state, the key activation page and its answer, and a discreet web copy, at 375 px with
axe-core's WCAG 2.1 AA rules; and a reader who pastes a key and chooses discreet mail."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from newsletter.clock import FrozenClock
from newsletter.db import unit_of_work
from newsletter.lists import read_lists, sync_lists
from newsletter.readers import set_key, set_reading
from newsletter.tokens import make_copy_token, make_key_token
from tests.browser_checks import check_page
from tests.conftest import SECRET
from tests.test_web import ROOT, Site, add_person
from tests.test_web_readers import READER, Keys, alert, keys, reader_settings, reading, spaced
from tests.webserver import serve_pages

__all__ = ["keys"]  # the fixture, shared with test_web_readers


@pytest.fixture
def served(factory: sessionmaker[Session], database_url: str, clock: FrozenClock) -> Iterator[Site]:
    """The declared lists, and the pages served as `newsletter web` serves them."""
    with unit_of_work(factory) as session:
        sync_lists(session=session, specs=read_lists(ROOT / "subscribers" / "lists.toml"))
    with serve_pages(reader_settings(database_url), factory, clock) as (url, settings):
        yield Site(url, settings, factory, clock)


def discreet_reader(site: Site, mode: str = "pointer") -> int:
    sid = add_person(site.factory, site.clock, READER, language="be")
    with unit_of_work(site.factory) as session:
        set_reading(session, subscriber_id=sid, discreet=mode, now=site.clock.now(), actor="t")
    return sid


def give_key(site: Site, sid: int, keys: Keys, *, confirmed: bool) -> str:
    fpr, armored = keys.good()
    with unit_of_work(site.factory) as session:
        set_key(
            session,
            subscriber_id=sid,
            data=armored,
            now=site.clock.now(),
            actor="t",
            confirmed=confirmed,
        )
    return fpr


def no_key(site: Site, keys: Keys, page: Any) -> None:
    sid = discreet_reader(site)
    page.goto(f"{site.url}/preferences/{site.token('preferences', sid)}")


def pending_key(site: Site, keys: Keys, page: Any) -> None:
    sid = discreet_reader(site)
    give_key(site, sid, keys, confirmed=False)
    page.goto(f"{site.url}/preferences/{site.token('preferences', sid)}")


def active_key(site: Site, keys: Keys, page: Any) -> None:
    sid = discreet_reader(site, "envelope")
    give_key(site, sid, keys, confirmed=True)
    page.goto(f"{site.url}/preferences/{site.token('preferences', sid)}")


def refused_key(site: Site, keys: Keys, page: Any) -> None:
    sid = discreet_reader(site)
    page.goto(f"{site.url}/preferences/{site.token('preferences', sid)}")
    page.fill("#key", keys.home.export(keys.make("Someone <someone@example.net>")))
    page.click("button[value=save]")


def key_link(site: Site, keys: Keys, page: Any) -> None:
    sid = discreet_reader(site)
    fpr = give_key(site, sid, keys, confirmed=False)
    token = make_key_token(
        secret=SECRET, subscriber_id=sid, fingerprint=fpr, issued_at=site.clock.now()
    )
    page.goto(f"{site.url}/key/{token}")


def key_on(site: Site, keys: Keys, page: Any) -> None:
    key_link(site, keys, page)
    page.click("button[type=submit]")


def unsubscribe_at_risk(site: Site, keys: Keys, page: Any) -> None:
    """The unsubscribe page of a reader with a key and discreet mail: its link travels in the
    clear, so it offers no way to the preferences that would turn those off."""
    sid = discreet_reader(site, "envelope")
    give_key(site, sid, keys, confirmed=True)
    page.goto(f"{site.url}/u/{site.token('unsubscribe', sid)}")
    assert page.locator("a[href*='/preferences/']").count() == 0


def web_copy(site: Site, keys: Keys, page: Any) -> None:
    campaign_id = alert(site, "Write to Ales")
    token = make_copy_token(secret=SECRET, campaign_id=campaign_id, lang="be")
    page.goto(f"{site.url}/w/{token}")


STATES: dict[str, tuple[Callable[[Site, Keys, Any], None], str]] = {
    "no-key": (no_key, "#key"),
    "pending-key": (pending_key, ".fpr"),
    "active-key": (active_key, ".fpr"),
    "refused-key": (refused_key, "#key-problem"),
    "key-link": (key_link, "button[type=submit]"),
    "key-on": (key_on, "[role=status]"),
    "web-copy": (web_copy, "h1"),
    "unsubscribe-at-risk": (unsubscribe_at_risk, "form"),
}


@pytest.mark.parametrize("state", list(STATES))
def test_reader_pages_fit_a_phone_and_pass_axe(
    served: Site, keys: Keys, browser: Any, state: str
) -> None:
    """At 375 px: no sideways scrolling, the state's own element shown, no WCAG AA violation."""
    reach, selector = STATES[state]
    page = browser.new_page(viewport={"width": 375, "height": 740})
    try:
        reach(served, keys, page)
        check_page(page, selector, state)
    finally:
        page.close()


def test_a_reader_pastes_a_key_and_chooses_discreet_mail(
    served: Site, keys: Keys, browser: Any
) -> None:
    """In the browser: choose the discreet note and withhold-or-plain, paste a key, save; the
    database holds them, the page shows the pending key; the emailed link then activates it."""
    sid = add_person(served.factory, served.clock, READER)
    fpr, armored = keys.good()
    page = browser.new_page(viewport={"width": 375, "height": 740})
    try:
        page.goto(f"{served.url}/preferences/{served.token('preferences', sid)}")
        page.check("input[name=discreet][value=pointer]")
        page.check("input[name=on_key_problem][value=plain]")
        page.fill("#key", armored)
        page.click("button[value=save]")
        page.locator("[role=status]").wait_for()
        assert reading(served, sid) == ("pointer", "plain", "en", [("pending", fpr)])
        assert spaced(fpr) in page.locator(".fpr").first.inner_text()
        assert page.title() == "Subscription settings"  # discreet from now on: no brand
        token = make_key_token(
            secret=SECRET, subscriber_id=sid, fingerprint=fpr, issued_at=served.clock.now()
        )
        page.goto(f"{served.url}/key/{token}")
        assert reading(served, sid)[3] == [("pending", fpr)]
        page.click("button[type=submit]")
        page.locator("h1", has_text="Encrypted mail is on").wait_for()
        assert reading(served, sid)[3] == [("active", fpr)]
    finally:
        page.close()
