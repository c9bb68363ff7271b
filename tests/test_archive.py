"""The archive: a web copy of every sent campaign with nothing personal in it, the list of them, the
Atom feed, the emails' "Open in a browser" and mirror links; on SQLite and PostgreSQL."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import feedparser
import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from newsletter.assemble import assemble_alert, assemble_digest
from newsletter.clock import FrozenClock
from newsletter.config import Settings
from newsletter.db import unit_of_work
from newsletter.db.models import Campaign, Subscriber
from newsletter.enqueue import launch_campaign
from newsletter.lists import get_list
from newsletter.subscriptions import subscribe
from newsletter.tokens import make_token
from tests.builders import deliver, run
from tests.conftest import SECRET, SmtpServer
from tests.test_cli import write_config
from tests.test_flow import ingest
from tests.test_signup import lists_synced, serve_public, signup_settings

PEOPLE = [
    ("Alesia Recipient-One", "alesia.one@example.org", "be"),
    ("Boris Recipient-Two", "boris.two@example.org", "ru"),
    ("Clara Recipient-Three", "clara.three@example.org", "en"),
]
MIRRORS = ("https://mirror-a.example.net", "https://mirror-b.example.net/news")


@dataclasses.dataclass
class Archive:
    url: str
    settings: Settings
    factory: sessionmaker[Session]
    clock: FrozenClock
    http: httpx.Client

    def send_alert(self, title: str, *, archived: bool = True) -> Campaign:
        """An alert from staff text, sent to every member of urgent-actions."""
        with unit_of_work(self.factory) as session:
            campaign, _ = assemble_alert(
                session=session,
                list_slug="urgent-actions",
                now=self.clock.now(),
                actor="test",
                title=title,
                body_html="<p>Write to the prison today.</p>",
                url="https://portal.example.org/act",
            )
            campaign.archived = archived
            launch_campaign(
                session=session,
                campaign=campaign,
                settings=self.settings,
                now=self.clock.now(),
                actor="test",
            )
        deliver(self.factory, self.settings, self.clock)
        self.clock.advance(minutes=5)
        return self.campaign(title)

    def campaign(self, title: str) -> Campaign:
        with unit_of_work(self.factory) as session:
            campaign = session.scalar(select(Campaign).where(Campaign.title == title))
            assert campaign is not None
            session.expunge(campaign)
            return campaign


def add_people(factory: sessionmaker[Session], clock: FrozenClock) -> list[int]:
    ids = []
    with unit_of_work(factory) as session:
        lists = [get_list(session, "weekly-digest"), get_list(session, "urgent-actions")]
        for name, email, lang in PEOPLE:
            result = subscribe(
                session=session,
                email=email,
                lists=lists,
                secret=SECRET,
                now=clock.now(),
                actor="test",
                confirmed=True,
                name=name,
                language=lang,
            )
            ids.append(result.subscriber_id)
    return ids


@pytest.fixture
def archive(
    factory: sessionmaker[Session], database_url: str, clock: FrozenClock, smtpd: SmtpServer
) -> Iterator[Archive]:
    lists_synced(factory)
    add_people(factory, clock)
    settings = signup_settings(database_url, smtpd, mirror_urls=MIRRORS, email_mirror_be=MIRRORS[1])
    with (
        serve_public(settings, factory, clock) as (url, settings),
        httpx.Client(timeout=30) as http,
    ):
        yield Archive(url, settings, factory, clock, http)


def personal_strings(archive: Archive) -> list[str]:
    """Every recipient's name, address, id-bearing tokens and link pages: none may be public."""
    found = []
    with unit_of_work(archive.factory) as session:
        people = list(session.scalars(select(Subscriber)))
        list_ids = [get_list(session, s).id for s in ("weekly-digest", "urgent-actions")]
    for person in people:
        found += [person.name, person.email, person.email.split("@")[0]]
        for purpose in ("unsubscribe", "preferences"):
            for list_id in list_ids:
                found.append(
                    make_token(
                        secret=SECRET, purpose=purpose, subscriber_id=person.id, list_id=list_id
                    )
                )
    return [*found, "/u/", "/preferences/", "%%"]


@pytest.mark.parametrize("lang", ["en", "be", "ru"])
def test_web_copy_has_nothing_personal_and_links_only_relatively(
    archive: Archive, smtpd: SmtpServer, lang: str
) -> None:
    """Against every recipient: no name, address or token; /subscribe instead of their links; no
    link to the main host; immutable once sent; the mirrors listed."""
    campaign = archive.send_alert("Free the prisoners")
    page = archive.http.get(f"{archive.url}/archive/{campaign.slug}/{lang}")
    assert page.status_code == 200
    for needle in personal_strings(archive):
        assert needle not in page.text, needle
    assert archive.url not in page.text and "127.0.0.1" not in page.text
    assert f'href="../../subscribe?lang={lang}"' in page.text
    assert "Write to the prison today." in page.text
    assert page.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    for mirror in MIRRORS:
        assert f'href="{mirror}"' in page.text
    assert len(smtpd.messages()) == len(PEOPLE)


def test_web_copy_drops_its_self_link_whatever_the_title(archive: Archive) -> None:
    """A title naming the header's class (it is in <head> too, its quotes as written) leaves
    the "Open in a browser" paragraph out of the web copy all the same."""
    title = 'Court date set (class="webcopy fine")'
    campaign = archive.send_alert(title)
    page = archive.http.get(f"{archive.url}/archive/{campaign.slug}/en")
    assert page.status_code == 200
    assert "Open in a browser" not in page.text
    assert archive.url not in page.text and "127.0.0.1" not in page.text
    assert 'Court date set (class="webcopy fine")' in page.text


def test_each_email_links_to_its_web_copy_and_one_mirror(
    archive: Archive, smtpd: SmtpServer
) -> None:
    """HTML "Open in a browser" and the text URL; be names its own mirror, others the first."""
    campaign = archive.send_alert("Letters for Ales")
    by_lang = {lang: email for _, email, lang in PEOPLE}
    for mail in smtpd.messages():
        lang = next(k for k, v in by_lang.items() if v in mail["To"])
        html = mail.get_body(("html",)).get_content()  # type: ignore[union-attr]
        text = mail.get_body(("plain",)).get_content()  # type: ignore[union-attr]
        own = f"{archive.url}/archive/{campaign.slug}/{lang}"
        mirror = f"{MIRRORS[1] if lang == 'be' else MIRRORS[0]}/archive/{campaign.slug}/{lang}"
        assert f'href="{own}"' in html and f'href="{mirror}"' in html
        assert own in text.split() and mirror in text.split()
        assert archive.http.get(own).status_code == 200


def test_unsent_kept_out_and_training_campaigns_are_not_public(archive: Archive) -> None:
    """A draft, a campaign sent with --no-archive: 404, not listed; their emails link nowhere."""
    with unit_of_work(archive.factory) as session:
        draft, _ = assemble_alert(
            session=session,
            list_slug="urgent-actions",
            now=archive.clock.now(),
            actor="test",
            title="Embargoed",
            body_html="<p>Not yet.</p>",
        )
        session.flush()
        draft_slug = draft.slug
    kept = archive.send_alert("Kept out", archived=False)
    for slug in (draft_slug, kept.slug, "no-such-campaign"):
        assert archive.http.get(f"{archive.url}/archive/{slug}/en").status_code == 404
    listing = archive.http.get(f"{archive.url}/archive?lang=en").text
    assert "Embargoed" not in listing and "Kept out" not in listing
    assert archive.http.get(f"{archive.url}/archive/x/xx").status_code == 404


def test_archive_lists_newest_first_in_pages_and_the_feed_is_atom(archive: Archive) -> None:
    """/archive per language, newest first, paged; /archive/feed.xml parses as Atom 1.0."""
    settings = replace(archive.settings, archive=replace(archive.settings.archive, page_size=2))
    first = archive.send_alert("First alert")
    archive.send_alert("Second alert")
    third = archive.send_alert("Third alert")
    with (
        serve_public(settings, archive.factory, archive.clock) as (url, _),
        httpx.Client(timeout=30) as http,
    ):
        page1 = http.get(f"{url}/archive?lang=en")
        page2 = http.get(f"{url}/archive?lang=en&page=2")
        assert http.get(f"{url}/archive?lang=en&page=3").status_code == 404
        assert http.get(f"{url}/archive?page=-1").status_code == 404
        feed = http.get(f"{url}/archive/feed.xml?lang=be")
    assert page1.text.index("Third alert") < page1.text.index("Second alert")
    assert "First alert" not in page1.text and "First alert" in page2.text
    assert f'href="archive/{third.slug}/en"' in page1.text and 'rel="next"' in page1.text
    assert page1.headers["cache-control"] == "public, max-age=300"
    assert url not in page1.text
    assert feed.headers["content-type"].startswith("application/atom+xml")
    parsed = feedparser.parse(
        feed.content,
        response_headers={
            "content-location": f"{url}/archive/feed.xml",
            "content-type": feed.headers["content-type"],
        },
    )
    assert not parsed.bozo and parsed.version == "atom10"
    assert parsed.feed.language == "be" and parsed.feed.author
    assert [e.title.rpartition(": ")[2] for e in parsed.entries] == ["Third alert", "Second alert"]
    newest = parsed.entries[0]
    assert newest.link == f"{url}/archive/{third.slug}/be"
    assert newest.id.startswith("urn:uuid:") and newest.updated_parsed is not None
    assert first.slug not in feed.text  # the feed carries the newest page only


def test_archive_off_and_alerts_left_out(archive: Archive) -> None:
    """[archive] include_alerts = false: alerts 404; enabled = false: every archive page 404."""
    campaign = archive.send_alert("An alert")
    no_alerts = replace(
        archive.settings, archive=replace(archive.settings.archive, include_alerts=False)
    )
    off = replace(archive.settings, archive=replace(archive.settings.archive, enabled=False))
    for settings, paths in (
        (no_alerts, [f"/archive/{campaign.slug}/en"]),
        (off, ["/archive", "/archive/feed.xml", f"/archive/{campaign.slug}/en"]),
    ):
        with (
            serve_public(settings, archive.factory, archive.clock) as (url, _),
            httpx.Client(timeout=30) as http,
        ):
            for path in paths:
                assert http.get(f"{url}{path}").status_code == 404, path
            if settings is no_alerts:
                assert "An alert" not in http.get(f"{url}/archive").text


def test_digest_web_copy(archive: Archive) -> None:
    """A digest's web copy too: items there, personal links gone."""
    ingest(archive.factory, archive.clock)
    with unit_of_work(archive.factory) as session:
        campaign = assemble_digest(
            session=session, list_slug="weekly-digest", now=archive.clock.now(), actor="test"
        )
        assert campaign is not None
        launch_campaign(
            session=session,
            campaign=campaign,
            settings=archive.settings,
            now=archive.clock.now(),
            actor="test",
        )
        slug = campaign.slug
    deliver(archive.factory, archive.settings, archive.clock)
    page = archive.http.get(f"{archive.url}/archive/{slug}/ru")
    assert page.status_code == 200
    for needle in personal_strings(archive):
        assert needle not in page.text, needle


def test_alert_send_no_archive(tmp_path: Path, smtpd: SmtpServer, database_url: str) -> None:
    """`alert send --no-archive`: sent, kept out of the archive, no browser link in the email."""
    env = write_config(tmp_path, smtpd, database_url)
    run(["init"], tmp_path, env)
    run(
        ["subscribers", "add", "a@example.org", "--list", "urgent-actions", "--confirmed"],
        tmp_path,
        env,
    )
    (tmp_path / "body.txt").write_text("Act now.")
    run(
        ["alert", "send", "--title", "Quiet", "--body-file", "body.txt", "--yes", "--no-archive"],
        tmp_path,
        env,
    )
    run(["alert", "send", "--title", "Loud", "--body-file", "body.txt", "--yes"], tmp_path, env)
    quiet, loud = smtpd.messages()
    assert "/archive/" not in quiet.as_string() and "/archive/" in loud.as_string()
