"""The supporters' pages, served by a real uvicorn on loopback, on SQLite and PostgreSQL."""

from __future__ import annotations

import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from newsletter.clock import FrozenClock
from newsletter.config import Settings
from newsletter.db import unit_of_work
from newsletter.db.models import Event, Subscriber, Subscription, SubscriptionStatus
from newsletter.lists import get_list, read_lists, sync_lists
from newsletter.subscriptions import subscribe
from newsletter.tokens import make_token
from tests.conftest import SECRET, make_settings
from tests.webserver import serve_pages

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Site:
    url: str
    settings: Settings
    factory: sessionmaker[Session]
    clock: FrozenClock

    def token(self, purpose: str, subscriber_id: int, slug: str = "weekly-digest") -> str:
        with unit_of_work(self.factory) as session:
            list_id = get_list(session, slug).id
        issued = self.clock.now() if purpose == "confirm" else None
        return make_token(
            secret=SECRET,
            purpose=purpose,
            subscriber_id=subscriber_id,
            list_id=list_id,
            issued_at=issued,
        )

    def status(self, subscriber_id: int, slug: str = "weekly-digest") -> str:
        with unit_of_work(self.factory) as session:
            list_id = get_list(session, slug).id
            return str(
                session.scalar(
                    select(Subscription.status).where(
                        Subscription.subscriber_id == subscriber_id,
                        Subscription.list_id == list_id,
                    )
                )
            )


def add_person(
    factory: sessionmaker[Session],
    clock: FrozenClock,
    email: str,
    *,
    language: str = "en",
    confirmed: bool = True,
    lists: tuple[str, ...] = ("weekly-digest",),
) -> int:
    with unit_of_work(factory) as session:
        result = subscribe(
            session=session,
            email=email,
            lists=[get_list(session, s) for s in lists],
            secret=SECRET,
            now=clock.now(),
            actor="test",
            confirmed=confirmed,
            language=language,
        )
    return result.subscriber_id


@pytest.fixture
def site(factory: sessionmaker[Session], database_url: str, clock: FrozenClock) -> Iterator[Site]:
    """The declared lists, and the pages served on a free loopback port."""
    with unit_of_work(factory) as session:
        sync_lists(session=session, specs=read_lists(ROOT / "subscribers" / "lists.toml"))
    with serve_pages(make_settings(database_url), factory, clock) as (url, settings):
        yield Site(url, settings, factory, clock)


def form_token(page: str) -> str:
    match = re.search(r'name="form_token" value="([^"]+)"', page)
    assert match, "the form carries no form token"
    return match.group(1)


def test_get_shows_the_list_and_changes_nothing(site: Site) -> None:
    """GET /u/TOKEN names the list, offers one button and a preferences link; changes nothing."""
    sid = add_person(site.factory, site.clock, "reader@example.org", language="be")
    reply = httpx.get(f"{site.url}/u/{site.token('unsubscribe', sid)}")
    assert reply.status_code == 200
    assert '<html lang="be">' in reply.text
    assert "Штотыднёвы дайджэст" in reply.text
    assert reply.text.count("<button") == 1
    assert 'href="/preferences/' in reply.text
    assert site.status(sid) == SubscriptionStatus.ACTIVE


def test_one_click_post_as_a_mail_client_sends_it(site: Site) -> None:
    """RFC 8058: a cookieless POST of List-Unsubscribe=One-Click unsubscribes; again is harmless."""
    sid = add_person(site.factory, site.clock, "reader@example.org")
    url = f"{site.url}/u/{site.token('unsubscribe', sid)}"
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    for _ in range(2):
        reply = httpx.post(url, content=b"List-Unsubscribe=One-Click", headers=headers)
        assert reply.status_code == 200
        assert site.status(sid) == SubscriptionStatus.UNSUBSCRIBED
    with unit_of_work(site.factory) as session:
        actions = list(session.scalars(select(Event.action).where(Event.actor == "web")))
    assert actions == ["subscriber.unsubscribed"]


@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(lambda t: t[:-2] + ("AA" if not t.endswith("AA") else "BB"), id="altered-sig"),
        pytest.param(lambda t: "Wzk5LDFd" + t[t.index(".") :], id="altered-payload"),
        pytest.param(lambda t: "not-a-token", id="garbage"),
        pytest.param(
            lambda t: make_token(
                secret="another-secret-" + "y" * 40,
                purpose="unsubscribe",
                subscriber_id=1,
                list_id=1,
            ),
            id="other-secret",
        ),
        pytest.param(
            lambda t: make_token(secret=SECRET, purpose="preferences", subscriber_id=1, list_id=1),
            id="wrong-purpose",
        ),
    ],
)
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_forged_token_gets_a_400_that_names_no_one(site: Site, mangle: object, method: str) -> None:
    """A forged or altered unsubscribe token gets the same 400 page and changes nothing."""
    sid = add_person(site.factory, site.clock, "victim@example.org")
    token = mangle(site.token("unsubscribe", sid))  # type: ignore[operator]
    reply = httpx.request(method, f"{site.url}/u/{token}")
    assert reply.status_code == 400
    assert "victim" not in reply.text and "Weekly digest" not in reply.text
    assert "This link does not work" in reply.text
    assert site.status(sid) == SubscriptionStatus.ACTIVE


def test_expired_confirmation_link_gets_the_same_400(site: Site) -> None:
    """A confirmation link older than [web] confirm_link_max_age_hours is refused like a forgery."""
    sid = add_person(site.factory, site.clock, "late@example.org", confirmed=False)
    token = site.token("confirm", sid)
    fresh = httpx.get(f"{site.url}/confirm/{token}")
    assert fresh.status_code == 200 and "Weekly digest" in fresh.text
    hours = site.settings.web.confirm_link_max_age_hours
    site.clock.advance(hours=hours, minutes=1)  # the same link, a week later
    reply = httpx.get(f"{site.url}/confirm/{token}")
    assert reply.status_code == 400
    assert "This link does not work" in reply.text
    untimed = make_token(secret=SECRET, purpose="confirm", subscriber_id=sid, list_id=1)
    assert httpx.get(f"{site.url}/confirm/{untimed}").status_code == 400
    assert site.status(sid) == SubscriptionStatus.PENDING


def test_every_page_carries_strict_security_headers(site: Site) -> None:
    """Pages, errors and 404s all carry CSP, no-referrer, nosniff, frame denial and no-store."""
    sid = add_person(site.factory, site.clock, "reader@example.org")
    for path in (f"/u/{site.token('unsubscribe', sid)}", "/u/forged", "/nothing-here"):
        headers = httpx.get(site.url + path).headers
        csp = headers["content-security-policy"]
        assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
        assert "script-src" not in csp
        assert headers["referrer-policy"] == "no-referrer"
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["x-frame-options"] == "DENY"
        assert headers["cache-control"] == "no-store"


def test_pages_load_nothing_from_anywhere(site: Site) -> None:
    """No page references a script, an image, a font or any other host."""
    sid = add_person(site.factory, site.clock, "reader@example.org")
    for purpose, prefix in (("unsubscribe", "u"), ("preferences", "preferences")):
        page = httpx.get(f"{site.url}/{prefix}/{site.token(purpose, sid)}").text
        assert "<script" not in page and "<img" not in page and "<link" not in page
        assert "http://" not in page and "https://" not in page


def test_preferences_save_lists_and_language(site: Site) -> None:
    """The preferences form saves chosen lists and language with a POST, then shows them."""
    sid = add_person(site.factory, site.clock, "reader@example.org")
    url = f"{site.url}/preferences/{site.token('preferences', sid)}"
    page = httpx.get(url).text
    with unit_of_work(site.factory) as session:
        alerts = get_list(session, "urgent-actions").id
    reply = httpx.post(
        url,
        data={"form_token": form_token(page), "lists": [str(alerts)], "language": "ru"},
    )
    assert reply.status_code == 303
    shown = httpx.get(site.url + reply.headers["location"])
    assert '<html lang="ru">' in shown.text and "Ваш выбор сохранён." in shown.text
    assert site.status(sid, "weekly-digest") == SubscriptionStatus.UNSUBSCRIBED
    assert site.status(sid, "urgent-actions") == SubscriptionStatus.ACTIVE
    with unit_of_work(site.factory) as session:
        assert session.get(Subscriber, sid).language == "ru"


@pytest.mark.parametrize(
    ("headers", "with_token"),
    [
        pytest.param({}, False, id="no-form-token"),
        pytest.param({"Origin": "https://evil.example"}, True, id="foreign-origin"),
        pytest.param({"Sec-Fetch-Site": "cross-site"}, True, id="cross-site-fetch"),
    ],
)
def test_cross_site_preference_posts_are_refused(
    site: Site, headers: dict[str, str], with_token: bool
) -> None:
    """A preferences POST without the page's form token, or from another site, changes nothing."""
    sid = add_person(site.factory, site.clock, "reader@example.org")
    url = f"{site.url}/preferences/{site.token('preferences', sid)}"
    data = {"language": "ru", "action": "leave"}
    if with_token:
        data["form_token"] = form_token(httpx.get(url).text)
    reply = httpx.post(url, data=data, headers=headers)
    assert reply.status_code == 403
    assert site.status(sid) == SubscriptionStatus.ACTIVE


def test_form_token_of_one_link_does_not_work_on_another(site: Site) -> None:
    """A form token is bound to the link it was served under."""
    mine = add_person(site.factory, site.clock, "mine@example.org")
    theirs = add_person(site.factory, site.clock, "theirs@example.org")
    my_page = httpx.get(f"{site.url}/preferences/{site.token('preferences', mine)}").text
    reply = httpx.post(
        f"{site.url}/preferences/{site.token('preferences', theirs)}",
        data={"form_token": form_token(my_page), "action": "leave", "language": "en"},
    )
    assert reply.status_code == 403
    assert site.status(theirs) == SubscriptionStatus.ACTIVE


def test_confirmation_needs_the_button_not_the_link(site: Site) -> None:
    """GET /confirm only asks; the POST from its page confirms and says so."""
    sid = add_person(site.factory, site.clock, "new@example.org", confirmed=False)
    url = f"{site.url}/confirm/{site.token('confirm', sid)}"
    page = httpx.get(url).text
    assert site.status(sid) == SubscriptionStatus.PENDING
    reply = httpx.post(url, data={"form_token": form_token(page)})
    assert reply.status_code == 200 and "Subscription confirmed" in reply.text
    assert site.status(sid) == SubscriptionStatus.ACTIVE


def test_short_load_loses_nothing(site: Site) -> None:
    """Several hundred requests, 16 at a time: every answer right, every unsubscribe recorded."""
    people = [add_person(site.factory, site.clock, f"p{i}@example.org") for i in range(60)]
    tokens = {sid: site.token("unsubscribe", sid) for sid in people}

    def hit(n: int) -> int:
        sid = people[n % len(people)]
        with httpx.Client(base_url=site.url, timeout=30) as client:
            page = client.get(f"/u/{tokens[sid]}")
            if page.status_code != 200:
                return page.status_code
            if n % 2 == 0:
                return client.post(
                    f"/u/{tokens[sid]}", data={"List-Unsubscribe": "One-Click"}
                ).status_code
            return client.get(f"/preferences/{site.token('preferences', sid)}").status_code

    with ThreadPoolExecutor(max_workers=16) as pool:
        codes = list(pool.map(hit, range(240)))
    assert codes == [200] * 240
    even = {people[n % len(people)] for n in range(0, 240, 2)}
    with unit_of_work(site.factory) as session:
        left = set(
            session.scalars(
                select(Subscription.subscriber_id).where(
                    Subscription.status == SubscriptionStatus.UNSUBSCRIBED
                )
            )
        )
        events = session.scalar(
            select(func.count()).where(Event.action == "subscriber.unsubscribed")
        )
    assert left == even
    assert events == len(even)
