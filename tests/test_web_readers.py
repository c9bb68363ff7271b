"""Readers at risk on the web: discreet mail and OpenPGP keys on the preferences page, key
activation behind /key/TOKEN, a discreet reader's web copy behind /w/TOKEN, neutral titles, and
the forms' origins; served by a real uvicorn on loopback (SQLite and PostgreSQL), keys made by gpg.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlencode

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from newsletter.assemble import assemble_alert
from newsletter.clock import FrozenClock
from newsletter.config import Settings
from newsletter.db import unit_of_work
from newsletter.db.models import Campaign, CampaignStatus, Event, ReaderKey, Subscriber
from newsletter.enqueue import launch_campaign
from newsletter.i18n import gettext_for
from newsletter.lists import get_list, read_lists, sync_lists
from newsletter.readers import set_key, set_reading
from newsletter.tokens import make_copy_token, make_key_token
from newsletter.web import create_app
from tests.conftest import SECRET, SmtpServer, make_settings
from tests.gpg_keys import GpgHome, gpg_time
from tests.test_web import ROOT, Site, add_person, form_token
from tests.webserver import serve_pages

NOTES = "https://notes.example.net"  # [discreet] base_url: the mirror discreet links point at
MIRROR = "https://mirror.example.net"  # [web] mirror_urls
READER = "reader@example.org"
# Applied to our own pages only (small documents we made), never to outside text.
TITLE = re.compile(r"<title>([^<]*)</title>")
HEADER = re.compile(r"<header>([^<]*)</header>")


def reader_settings(database_url: str, smtp: SmtpServer | None = None) -> Settings:
    """Test settings with a discreet base URL and a mirror of their own."""
    base = make_settings(database_url, smtp)
    return replace(
        base,
        discreet=replace(base.discreet, base_url=NOTES),
        web=replace(base.web, mirror_urls=(MIRROR,)),
    )


@pytest.fixture
def site(factory: sessionmaker[Session], database_url: str, clock: FrozenClock) -> Iterator[Site]:
    """The declared lists, and the pages served on a free loopback port."""
    with unit_of_work(factory) as session:
        sync_lists(session=session, specs=read_lists(ROOT / "subscribers" / "lists.toml"))
    with serve_pages(reader_settings(database_url), factory, clock) as (url, settings):
        yield Site(url, settings, factory, clock)


@dataclass
class Keys:
    """Keys made by the real gpg, dated just before the test's frozen clock."""

    home: GpgHome
    clock: FrozenClock
    made: int = 0

    def make(
        self, uid: str = f"Reader <{READER}>", *, days_ago: int = 1, expire: str = "1y"
    ) -> str:
        """A new key with an encryption subkey; its fingerprint."""
        made = self.clock.now() - timedelta(days=days_ago)
        fpr = self.home.generate(uid, expire=expire, at=gpg_time(made))
        # A minute later: gpg refuses a subkey older than its primary key, which the faked
        # clock (running on from the faked instant) can make by a second.
        self.home.add_key(fpr, expire=expire, at=gpg_time(made + timedelta(minutes=1)))
        return fpr

    def good(self) -> tuple[str, str]:
        """A new usable key for READER: (fingerprint, armored public key)."""
        self.made += 1  # gpg makes one key per user ID unless told otherwise
        fpr = self.make(f"Reader {self.made} <{READER}>")
        return fpr, self.home.export(fpr)


@pytest.fixture
def keys(tmp_path: Path, clock: FrozenClock) -> Iterator[Keys]:
    """A GnuPG home of the test's own."""
    home = GpgHome.make(tmp_path / "gnupg")
    yield Keys(home, clock)
    home.close()


def prefs_url(site: Site, sid: int) -> str:
    return f"{site.url}/preferences/{site.token('preferences', sid)}"


def post_prefs(
    site: Site, url: str, headers: dict[str, str] | None = None, **fields: str | list[str]
) -> httpx.Response:
    """Post the preferences form as its page would, with these fields changed."""
    with unit_of_work(site.factory) as session:
        digest = get_list(session, "weekly-digest").id
    data: dict[str, str | list[str]] = {
        "form_token": form_token(httpx.get(url).text),
        "lists": [str(digest)],
        "language": "en",
        "action": "save",
    }
    data.update(fields)
    return httpx.post(url, data=data, headers=headers or {})


def reading(site: Site, sid: int) -> tuple[str, str, str, list[tuple[str, str]]]:
    """What the database holds: discreet, on_key_problem, language, and the (status, fpr) keys."""
    with unit_of_work(site.factory) as session:
        sub = session.get(Subscriber, sid)
        assert sub is not None
        rows = session.execute(
            select(ReaderKey.status, ReaderKey.fingerprint).where(ReaderKey.subscriber_id == sid)
        )
        return sub.discreet, sub.on_key_problem, sub.language, sorted((s, f) for s, f in rows)


def web_events(site: Site) -> list[str]:
    with unit_of_work(site.factory) as session:
        return list(session.scalars(select(Event.action).where(Event.actor == "web")))


def spaced(fpr: str) -> str:
    return " ".join(fpr[i : i + 4] for i in range(0, len(fpr), 4))


def test_discreet_and_key_problem_choices_are_saved_and_shown(site: Site) -> None:
    """The page offers off/envelope/pointer and withhold/plain; a POST saves them, recorded."""
    sid = add_person(site.factory, site.clock, READER)
    url = prefs_url(site, sid)
    page = httpx.get(url).text
    assert 'name="discreet" value="off" aria-describedby="discreet-off-help" checked' in page
    assert 'value="withhold" checked' in page
    assert "nothing outside the message names us" in page
    reply = post_prefs(site, url, discreet="pointer", on_key_problem="plain")
    assert reply.status_code == 303
    assert reading(site, sid)[:2] == ("pointer", "plain")
    shown = httpx.get(site.url + reply.headers["location"]).text
    assert 'value="pointer" aria-describedby="discreet-pointer-help" checked' in shown
    assert 'value="plain" checked' in shown
    assert "Your choices are saved." in shown
    assert web_events(site) == ["subscriber.reading"]


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"discreet": "loud"}, id="discreet"),
        pytest.param({"on_key_problem": "shout"}, id="on-key-problem"),
        pytest.param({"lists": "x"}, id="list-id"),
    ],
)
def test_a_crafted_choice_is_400_and_saves_nothing(site: Site, fields: dict[str, str]) -> None:
    """A value no form offers (only a crafted post sends one) is refused whole."""
    sid = add_person(site.factory, site.clock, READER)
    reply = post_prefs(site, prefs_url(site, sid), language="ru", **fields)
    assert reply.status_code == 400
    assert reading(site, sid) == ("off", "withhold", "en", [])
    assert web_events(site) == []


@pytest.mark.parametrize("newline", ["\r\n", "\n"])
def test_a_good_key_pasted_waits_for_its_link(site: Site, keys: Keys, newline: str) -> None:
    """A key pasted with CRLF or LF and junk whitespace around it is kept pending, and shown."""
    sid = add_person(site.factory, site.clock, READER)
    fpr, armored = keys.good()
    pasted = "\n \t\n" + armored.replace("\n", newline) + "  \n\n"
    reply = post_prefs(site, prefs_url(site, sid), key=pasted, discreet="envelope")
    assert reply.status_code == 303
    assert reading(site, sid) == ("envelope", "withhold", "en", [("pending", fpr)])
    page = httpx.get(site.url + reply.headers["location"]).text
    assert spaced(fpr) in page
    assert "Check your inbox for a message encrypted to this key" in page
    assert "-----BEGIN PGP" not in page.split("<textarea")[1].split("</textarea>")[0]
    assert sorted(web_events(site)) == ["subscriber.key_set", "subscriber.reading"]


KINDS = {
    "secret": "this is a secret key",
    "binary": "this is not text",
    "non-utf8": "this is not text",
    "nul": "this is not an OpenPGP public key",  # PostgreSQL would refuse the NUL if kept
    "html": "this is not an OpenPGP public key",
    "junk": "this is not an OpenPGP public key",
    "several": "this holds 2 keys",
    "other-address": f"this key is not for {READER}",
    "expired": "this key expired on",
    "revoked": "this key has been revoked",
}


def refused_key(kind: str, keys: Keys) -> bytes:
    """A key (or not) of this kind, as bytes a crafted form could carry."""
    if kind == "secret":
        return keys.home.export_secret(keys.make()).encode()
    if kind == "binary":
        return random.Random(7).randbytes(3000)
    if kind == "non-utf8":
        return "-----BEGIN PGP PUBLIC KEY BLOCK-----\nclé\n".encode("latin-1")
    if kind == "nul":
        return keys.good()[1].replace("\n=", "\x00\n=").encode()
    if kind == "html":
        return b"<html><body><script>alert(1)</script><p>-----BEGIN PGP</p></body></html>"
    if kind == "junk":
        return b"please encrypt my mail"
    if kind == "several":
        first, second = keys.good()[1], keys.home.export(keys.make(f"Other <{READER}>"))
        return (first + second).encode()
    if kind == "other-address":
        return keys.home.export(keys.make("Someone <someone@example.net>")).encode()
    if kind == "expired":
        return keys.home.export(keys.make(days_ago=800, expire="1y")).encode()
    fpr = keys.make()
    keys.home.revoke(fpr)
    return keys.home.export(fpr).encode()


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_refused_key_refuses_the_whole_form(site: Site, keys: Keys, kind: str) -> None:
    """A refused key: the page again (200) with the one-line reason beside the field, and
    nothing saved, not even the other choices on the form."""
    sid = add_person(site.factory, site.clock, READER)
    url = prefs_url(site, sid)
    with unit_of_work(site.factory) as session:
        alerts = get_list(session, "urgent-actions").id
    data = urlencode(
        {
            "form_token": form_token(httpx.get(url).text),
            "lists": str(alerts),
            "language": "ru",
            "discreet": "pointer",
            "on_key_problem": "plain",
            "action": "save",
            "key": refused_key(kind, keys),
        }
    )
    headers = {"content-type": "application/x-www-form-urlencoded"}
    reply = httpx.post(url, content=data.encode(), headers=headers)
    assert reply.status_code == 200
    problem = re.search(r'<p class="status problem" id="key-problem">([^<]*)</p>', reply.text)
    assert problem is not None and KINDS[kind] in problem.group(1)
    assert 'aria-describedby="key-help key-problem" aria-invalid="true"' in reply.text
    assert "Nothing was saved" in reply.text
    assert "PRIVATE KEY" not in reply.text and "<script>alert" not in reply.text
    # The choices sent are still marked, to be sent again with a better key.
    assert 'value="pointer" aria-describedby="discreet-pointer-help" checked' in reply.text
    assert reading(site, sid) == ("off", "withhold", "en", [])
    assert site.status(sid, "urgent-actions") == "None"
    assert web_events(site) == []


def test_bodies_past_the_forms_cap_get_413(
    factory: sessionmaker[Session], database_url: str, clock: FrozenClock
) -> None:
    """The preferences form takes a key past [web] max_body_bytes, up to its own cap; beyond is
    413 and one line. (The app itself: the listener in front caps at [web] max_body_bytes.)"""
    with unit_of_work(factory) as session:
        sync_lists(session=session, specs=read_lists(ROOT / "subscribers" / "lists.toml"))
    sid = add_person(factory, clock, READER)
    settings = reader_settings(database_url)
    site = Site(settings.web.base_url, settings, factory, clock)
    url = f"/preferences/{site.token('preferences', sid)}"

    async def exchange() -> list[httpx.Response]:
        app = create_app(settings, factory, clock)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=site.url) as client:
            token = form_token((await client.get(url)).text)
            fields = {"form_token": token, "language": "en", "action": "save"}
            big = urlencode({**fields, "key": "A" * 70_000})  # past 16 KiB, and 64 KiB of key
            huge = urlencode({**fields, "key": "A" * 300_000})
            return [
                await client.post(url, content=big.encode(), headers=FORM),
                await client.post(url, content=huge.encode(), headers=FORM),
                await client.post("/subscribe", content=b"x" * 20_000, headers=FORM),
            ]

    big, huge, signup = asyncio.run(exchange())
    assert big.status_code == 200 and "this key is too large" in big.text
    assert huge.status_code == 413 and "Too much was sent" in huge.text
    assert signup.status_code == 413
    with unit_of_work(factory) as session:
        assert session.scalars(select(ReaderKey)).all() == []


FORM = {"content-type": "application/x-www-form-urlencoded"}


def test_too_big_body_gets_413_from_the_listener(site: Site) -> None:
    """Through the real listener, a body past every cap is refused with 413 and one line."""
    sid = add_person(site.factory, site.clock, READER)
    reply = httpx.post(prefs_url(site, sid), content=b"key=" + b"A" * 400_000, headers=FORM)
    assert reply.status_code == 413
    assert len(reply.text.strip().splitlines()) == 1
    assert reading(site, sid)[3] == []


def pend(site: Site, keys: Keys, sid: int) -> str:
    """Paste a good key for the reader; its fingerprint."""
    fpr, armored = keys.good()
    assert post_prefs(site, prefs_url(site, sid), key=armored).status_code == 303
    return fpr


def key_url(site: Site, sid: int, fpr: str, *, secret: str = SECRET) -> str:
    token = make_key_token(
        secret=secret, subscriber_id=sid, fingerprint=fpr, issued_at=site.clock.now()
    )
    return f"{site.url}/key/{token}"


def test_get_key_never_activates_post_does_then_remove(site: Site, keys: Keys) -> None:
    """GET /key/TOKEN shows one button and changes nothing; its POST turns encryption on; the
    preferences page then shows the active key, and removing it leaves no key."""
    sid = add_person(site.factory, site.clock, READER)
    fpr = pend(site, keys, sid)
    url = key_url(site, sid, fpr)
    for _ in range(2):  # a mail scanner, then the reader
        page = httpx.get(url)
        assert page.status_code == 200 and page.text.count("<button") == 1
        assert "Activate this key" in page.text and spaced(fpr) in page.text
    assert reading(site, sid)[3] == [("pending", fpr)]
    done = httpx.post(url, data={"form_token": form_token(page.text)})
    assert done.status_code == 200 and "Encrypted mail is on" in done.text
    assert reading(site, sid)[3] == [("active", fpr)]
    again = httpx.get(url)  # a second click: already on, no button
    assert "Encrypted mail is on" in again.text and "<button" not in again.text
    prefs = httpx.get(prefs_url(site, sid)).text
    assert "Your emails are encrypted to this key:" in prefs and spaced(fpr) in prefs
    assert "It expires on November 22, 2027." in prefs
    assert post_prefs(site, prefs_url(site, sid), remove_key="1").status_code == 303
    assert reading(site, sid)[3] == []
    assert "You have given no key" in httpx.get(prefs_url(site, sid)).text
    assert web_events(site) == [
        "subscriber.key_set",
        "subscriber.key_confirmed",
        "subscriber.key_removed",
    ]


@pytest.mark.parametrize("bad", ["altered", "other-secret", "expired", "stale", "someone-else"])
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_bad_key_links_are_refused(site: Site, keys: Keys, bad: str, method: str) -> None:
    """A forged, expired or stale /key link gets the links' 400 page and activates nothing."""
    sid = add_person(site.factory, site.clock, READER)
    fpr = pend(site, keys, sid)
    url = key_url(site, sid, fpr)
    form = form_token(httpx.get(url).text)
    pending = fpr
    if bad == "altered":
        url = url[:-3] + ("AAA" if not url.endswith("AAA") else "BBB")
    elif bad == "other-secret":
        url = key_url(site, sid, fpr, secret="another-secret-" + "y" * 40)
    elif bad == "expired":
        site.clock.advance(hours=site.settings.web.confirm_link_max_age_hours, minutes=1)
    elif bad == "stale":  # a newer key was pasted since: the old link proves nothing now
        pending = pend(site, keys, sid)
    else:
        other = add_person(site.factory, site.clock, "other@example.org")
        url = key_url(site, other, fpr)
    reply = httpx.request(method, url, data={"form_token": form} if method == "POST" else None)
    assert reply.status_code in (400, 403)
    if reply.status_code == 400:
        assert "This link does not work" in reply.text
    assert reading(site, sid)[3] == [("pending", pending)]


def test_cross_site_posts_are_refused_and_our_mirrors_accepted(site: Site, keys: Keys) -> None:
    """Forms posted from [discreet] base_url or a mirror are ours; any other origin is not."""
    sid = add_person(site.factory, site.clock, READER)
    url = prefs_url(site, sid)
    for origin in ("https://evil.example", NOTES + ".evil.example", "http://notes.example.net"):
        reply = post_prefs(site, url, {"Origin": origin}, discreet="envelope")
        assert reply.status_code == 403
    assert post_prefs(site, url, {"Sec-Fetch-Site": "cross-site"}).status_code == 403
    assert reading(site, sid)[0] == "off"
    reply = post_prefs(site, url, {"Origin": NOTES}, discreet="envelope")
    assert reply.status_code == 303 and reading(site, sid)[0] == "envelope"
    reply = post_prefs(site, url, {"Origin": MIRROR}, discreet="pointer")
    assert reply.status_code == 303 and reading(site, sid)[0] == "pointer"
    fpr = pend(site, keys, sid)
    page = httpx.get(key_url(site, sid, fpr)).text
    evil = httpx.post(
        key_url(site, sid, fpr),
        data={"form_token": form_token(page)},
        headers={"Origin": "https://evil.example"},
    )
    assert evil.status_code == 403 and reading(site, sid)[3] == [("pending", fpr)]
    ours = httpx.post(
        key_url(site, sid, fpr), data={"form_token": form_token(page)}, headers={"Origin": NOTES}
    )
    assert ours.status_code == 200 and reading(site, sid)[3] == [("active", fpr)]


# --- the web copy ----------------------------------------------------------------------------


def alert(site: Site, title: str, *, launch: bool = True, archived: bool = True) -> int:
    """An alert to urgent-actions, launched (running) unless told; its id."""
    with unit_of_work(site.factory) as session:
        campaign, _ = assemble_alert(
            session=session,
            list_slug="urgent-actions",
            now=site.clock.now(),
            actor="test",
            title=title,
            body_html="<p>Write to the prison today.</p>",
            url="https://portal.example.org/act",
        )
        campaign.archived = archived
        if launch:
            launch_campaign(
                session=session,
                campaign=campaign,
                settings=site.settings,
                now=site.clock.now(),
                actor="test",
            )
        return campaign.id


def copy_url(site: Site, campaign_id: int, lang: str = "en") -> str:
    return f"{site.url}/w/{make_copy_token(secret=SECRET, campaign_id=campaign_id, lang=lang)}"


def test_web_copy_shows_the_campaign_and_nothing_personal(site: Site) -> None:
    """/w/TOKEN: the campaign's content, a neutral title, no reader, no link, no archive bar;
    unarchived campaigns too; drafts, cancelled campaigns and forged tokens are 404."""
    sid = add_person(site.factory, site.clock, "alesia.one@example.org", lists=("urgent-actions",))
    with unit_of_work(site.factory) as session:
        session.get(Subscriber, sid).name = "Alesia Recipient-One"  # type: ignore[union-attr]
    campaign_id = alert(site, "Write to Ales", archived=False)
    reply = httpx.get(copy_url(site, campaign_id, "be"))
    assert reply.status_code == 200
    page = reply.text
    assert "Write to the prison today." in page and '<html lang="be"' in page
    assert TITLE.findall(page) == [site.settings.discreet.subject("be")]
    for private in ("alesia", "Alesia", "Recipient-One", "/u/", "/preferences/", "%%"):
        assert private not in page
    assert "archive" not in page and "subscribe?" not in page
    english = "To change what you receive or to leave, use the links in the message that brought"
    note = gettext_for("be")(english + " you here.")
    assert note in page and not note.startswith(english)
    csp = reply.headers["content-security-policy"]
    assert "img-src" not in csp and "default-src 'none'" in csp
    assert reply.headers["cache-control"] == "public, max-age=300"
    assert reply.headers["x-robots-tag"] == "noindex, nofollow"
    draft = alert(site, "Not yet", launch=False)
    assert httpx.get(copy_url(site, draft)).status_code == 404
    with unit_of_work(site.factory) as session:
        session.get(Campaign, campaign_id).status = CampaignStatus.CANCELLED  # type: ignore[union-attr]
    assert httpx.get(copy_url(site, campaign_id)).status_code == 404
    forged = make_copy_token(secret="another-secret-" + "y" * 40, campaign_id=draft, lang="en")
    for path in (f"/w/{forged}", "/w/not-a-token", f"/w/{forged[:-2]}"):
        gone = httpx.get(site.url + path)
        assert gone.status_code == 404 and site.settings.brand.name not in gone.text


def test_web_copy_without_the_archive_and_in_the_default_language(
    factory: sessionmaker[Session], database_url: str, clock: FrozenClock, smtpd: SmtpServer
) -> None:
    """With [archive] off and only English rendered, a sent campaign's /w/ copy in Russian is the
    English one, immutable once finished; /archive is 404."""
    from tests.builders import deliver

    with unit_of_work(factory) as session:
        sync_lists(session=session, specs=read_lists(ROOT / "subscribers" / "lists.toml"))
    add_person(factory, clock, "clara@example.org", lists=("urgent-actions",))
    base = reader_settings(database_url, smtpd)
    settings = replace(
        base,
        archive=replace(base.archive, enabled=False),
        render=replace(base.render, languages=("en",)),
    )
    with serve_pages(settings, factory, clock) as (url, settings):
        site = Site(url, settings, factory, clock)
        campaign_id = alert(site, "Letters help")
        deliver(factory, settings, clock)
        assert len(smtpd.messages()) == 1
        reply = httpx.get(copy_url(site, campaign_id, "ru"))
        assert reply.status_code == 200 and '<html lang="en"' in reply.text
        assert TITLE.findall(reply.text) == [settings.discreet.subject("en")]
        assert reply.headers["cache-control"] == "public, max-age=31536000, immutable"
        assert httpx.get(f"{url}/archive").status_code == 404


# --- neutral titles --------------------------------------------------------------------------


def discreet_person(site: Site, email: str, *, confirmed: bool = True) -> int:
    sid = add_person(site.factory, site.clock, email, confirmed=confirmed, lists=("weekly-digest",))
    with unit_of_work(site.factory) as session:
        set_reading(
            session, subscriber_id=sid, discreet="envelope", now=site.clock.now(), actor="test"
        )
    return sid


def test_every_page_a_discreet_reader_reaches_names_nothing(site: Site, keys: Keys) -> None:
    """Titles, header and footer of every page behind a discreet reader's links (errors too)
    name neither the brand, nor a list, nor a host; a reader not discreet sees them as before."""
    sid = discreet_person(site, READER)
    new = discreet_person(site, "new@example.org", confirmed=False)
    pages: dict[str, httpx.Response] = {}
    prefs = prefs_url(site, sid)
    pages["preferences"] = httpx.get(prefs)
    pages["preferences-refused"] = post_prefs(site, prefs, key="not a key")
    unsubscribe = f"{site.url}/u/{site.token('unsubscribe', sid)}"
    pages["unsubscribe"] = httpx.get(unsubscribe)
    confirm = f"{site.url}/confirm/{site.token('confirm', new)}"
    pages["confirm"] = httpx.get(confirm)
    pages["confirmed"] = httpx.post(confirm, data={"form_token": form_token(pages["confirm"].text)})
    fpr = pend(site, keys, sid)
    key = key_url(site, sid, fpr)
    pages["key"] = httpx.get(key)
    pages["key-done"] = httpx.post(key, data={"form_token": form_token(pages["key"].text)})
    pages["copy"] = httpx.get(copy_url(site, alert(site, "Write to Ales")))
    pages["unsubscribed"] = httpx.post(unsubscribe)
    pages["stale-key"] = httpx.get(key_url(site, sid, "0" * 40))
    pages["forged-prefs"] = httpx.get(f"{site.url}/preferences/forged")
    pages["forged-copy"] = httpx.get(f"{site.url}/w/forged")
    pages["refused-post"] = httpx.post(prefs, data={"action": "leave"})
    assert pages["refused-post"].status_code == 403
    hosts = ("127.0.0.1", "portal.example.org", "notes.example.net", "mirror.example.net")
    brand = site.settings.brand
    with unit_of_work(site.factory) as session:
        names = [
            n
            for slug in ("weekly-digest", "urgent-actions")
            for n in get_list(session, slug).names.values()
        ]
    for name, reply in pages.items():
        assert reply.status_code < 500, name
        [title] = TITLE.findall(reply.text)
        head = reply.text.split("</head>")[0]
        for word in (brand.name, *names, *hosts):
            assert word not in title, (name, title, word)
        assert brand.name not in head and '<meta name="description' not in head, name
        if name != "copy":  # the copy's body is the email's, as every reader got it
            assert HEADER.findall(reply.text) == [site.settings.discreet.from_name], name
            assert brand.postal_address not in reply.text, name
    plain = add_person(site.factory, site.clock, "plain@example.org")
    ordinary = httpx.get(prefs_url(site, plain)).text
    assert f"Subscription settings · {brand.name}</title>" in ordinary
    assert f"<header>{brand.name}</header>" in ordinary and brand.postal_address in ordinary


def test_pasting_the_revocation_of_ones_key_stops_its_use(site: Site, keys: Keys) -> None:
    """The active key pasted again with its revocation: saved (not refused), marked revoked,
    shown so, and its /key link no longer valid; another person's revoked key is refused."""
    sid = add_person(site.factory, site.clock, READER)
    fpr, armored = keys.good()
    with unit_of_work(site.factory) as session:
        set_key(
            session,
            subscriber_id=sid,
            data=armored,
            now=site.clock.now(),
            actor="t",
            confirmed=True,
        )
    keys.home.revoke(fpr)
    revoked = keys.home.export(fpr)
    assert post_prefs(site, prefs_url(site, sid), key=revoked).status_code == 303
    assert reading(site, sid)[3] == [("revoked", fpr)]
    page = httpx.get(prefs_url(site, sid)).text
    assert "You revoked this key" in page and spaced(fpr) in page
    assert httpx.get(key_url(site, sid, fpr)).status_code == 400
    other = add_person(site.factory, site.clock, "other.reader@example.org")
    refused = post_prefs(site, prefs_url(site, other), key=revoked)
    assert refused.status_code == 200 and "revoked" in refused.text
    assert reading(site, other)[3] == []
