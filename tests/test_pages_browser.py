"""Every supporters' page, in each of its states, in a real browser at 375 px, with axe-core.

Each state is reached as a reader reaches it (a link, a click, a form left open too long), then the
page must not scroll sideways on a phone and must pass axe-core's WCAG 2.1 A and AA rules.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from newsletter.clock import FrozenClock
from newsletter.db import unit_of_work
from newsletter.db.queries import mark_bounced
from newsletter.lists import get_list, read_lists, sync_lists
from newsletter.subscriptions import unsubscribe
from newsletter.tokens import make_key_update_token
from tests.browser_checks import check_page
from tests.conftest import SECRET, make_settings
from tests.gpg_keys import sequoia_key
from tests.test_web import ROOT, Site, add_person
from tests.webserver import serve_pages


@pytest.fixture
def served(factory: sessionmaker[Session], database_url: str, clock: FrozenClock) -> Iterator[Site]:
    """The declared lists, and the pages served as `newsletter web` serves them."""
    with unit_of_work(factory) as session:
        sync_lists(session=session, specs=read_lists(ROOT / "subscribers" / "lists.toml"))
    with serve_pages(make_settings(database_url), factory, clock) as (url, settings):
        yield Site(url, settings, factory, clock)


def unsubscribe_page(site: Site, page: Any) -> None:
    sid = add_person(site.factory, site.clock, "reader@example.org", language="be")
    page.goto(f"{site.url}/u/{site.token('unsubscribe', sid)}")


def unsubscribed_page(site: Site, page: Any) -> None:
    unsubscribe_page(site, page)
    page.click("button[type=submit]")


def preferences_page(site: Site, page: Any) -> None:
    sid = add_person(site.factory, site.clock, "reader@example.org", language="ru")
    page.goto(f"{site.url}/preferences/{site.token('preferences', sid)}")


def preferences_saved(site: Site, page: Any) -> None:
    preferences_page(site, page)
    page.click("button[value=save]")


def preferences_expired(site: Site, page: Any) -> None:
    preferences_page(site, page)
    site.clock.advance(hours=25)
    page.click("button[value=save]")


def preferences_bounced(site: Site, page: Any) -> None:
    sid = add_person(
        site.factory, site.clock, "gone@example.org", lists=("weekly-digest", "urgent-actions")
    )
    with unit_of_work(site.factory) as session:
        alerts = get_list(session, "urgent-actions").id
        unsubscribe(session=session, subscriber_id=sid, list_id=alerts, now=site.clock.now(),
                    actor="t")  # fmt: skip
        mark_bounced(session, sid)
    page.goto(f"{site.url}/preferences/{site.token('preferences', sid)}")
    page.check(f"input[value='{alerts}']")
    page.click("button[value=save]")


def preferences_refused(site: Site, page: Any) -> None:
    """A post with a language the form never offers: the one-line refusal page."""
    preferences_page(site, page)
    page.eval_on_selector("input[name=language]:checked", "input => { input.value = 'xx'; }")
    with page.expect_response(lambda response: response.request.method == "POST") as answer:
        page.click("button[value=save]")
    assert answer.value.status == 400  # the refusal page, not the form again


def confirm_page(site: Site, page: Any) -> None:
    sid = add_person(site.factory, site.clock, "new@example.org", confirmed=False)
    page.goto(f"{site.url}/confirm/{site.token('confirm', sid)}")


def confirmed_page(site: Site, page: Any) -> None:
    confirm_page(site, page)
    page.click("button[type=submit]")


def confirm_expired(site: Site, page: Any) -> None:
    confirm_page(site, page)
    site.clock.advance(hours=25)
    page.click("button[type=submit]")


def key_update_page(site: Site, page: Any) -> None:
    """The link of a plaintext key-problem notice: a new key, and nothing else."""
    sid = add_person(site.factory, site.clock, "reader@example.org", language="be")
    token = make_key_update_token(
        secret=SECRET, subscriber_id=sid, fingerprint="AB" * 20, issued_at=site.clock.now()
    )
    page.goto(f"{site.url}/new-key/{token}")


def key_update_sent(site: Site, page: Any) -> None:
    key_update_page(site, page)
    page.fill("#key", str(sequoia_key("Reader <reader@example.org>").extract_certificate()))
    page.click("button[type=submit]")


def key_update_expired(site: Site, page: Any) -> None:
    key_update_page(site, page)
    site.clock.advance(hours=25)
    page.click("button[type=submit]")


def key_update_refused(site: Site, page: Any) -> None:
    key_update_page(site, page)
    page.fill("#key", "not a key")
    page.click("button[type=submit]")


def error_page(site: Site, page: Any) -> None:
    page.goto(f"{site.url}/u/not-a-real-token")


STATES: dict[str, tuple[Callable[[Site, Any], None], str]] = {
    "unsubscribe": (unsubscribe_page, "form"),
    "unsubscribed": (unsubscribed_page, "h1"),
    "preferences": (preferences_page, "form"),
    "preferences-saved": (preferences_saved, "[role=status], .status"),
    "preferences-expired": (preferences_expired, "[role=alert]"),
    "preferences-bounced": (preferences_bounced, "[role=alert]"),
    "preferences-refused": (preferences_refused, "h1"),
    "confirm": (confirm_page, "form"),
    "confirmed": (confirmed_page, "h1"),
    "confirm-expired": (confirm_expired, "[role=alert], .status"),
    "key-update": (key_update_page, "form"),
    "key-update-sent": (key_update_sent, "[role=status]"),
    "key-update-expired": (key_update_expired, "[role=alert]"),
    "key-update-refused": (key_update_refused, "#key-problem"),
    "error": (error_page, "h1"),
}


@pytest.mark.parametrize("state", list(STATES))
def test_each_page_fits_a_phone_and_passes_axe(
    served: Site,
    browser: Any,
    state: str,
) -> None:
    """At 375 px: no sideways scrolling, the state's own element shown, no WCAG AA violation."""
    reach, selector = STATES[state]
    page = browser.new_page(viewport={"width": 375, "height": 740})
    try:
        reach(served, page)
        check_page(page, selector, state)
    finally:
        page.close()
