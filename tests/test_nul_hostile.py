"""NUL and other control characters from outside, on PostgreSQL, which refuses NUL in text.

SQLite stores what PostgreSQL refuses ("PostgreSQL text fields cannot contain NUL (0x00)
bytes"), so every test here runs on PostgreSQL. Each entry point is sent the hostile value as an
attacker (or a careless paste) would: the public pages and the console over real HTTP, feeds
from a real HTTP server, returns through the real inbound SMTP server, files and arguments
through the real command line. The answer must be one clear line or the value stored cleaned:
never a 500, a crashed run or a half-written state. Controls other than NUL matter too: MJML's
parser refuses them, so one in a feed item or an alert body stopped the whole render.
"""

from __future__ import annotations

import os
import smtplib
import subprocess
import unicodedata
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from newsletter.assemble import assemble_digest
from newsletter.bounces import verp_address
from newsletter.clock import FrozenClock
from newsletter.config import Settings, SourcesSettings
from newsletter.db import unit_of_work
from newsletter.db.models import (
    Campaign,
    Delivery,
    Item,
    MailingList,
    ReaderKey,
    Segment,
    Source,
    Staff,
    Subscriber,
)
from newsletter.devsmtp import free_port
from newsletter.inbound import inbound_for
from newsletter.ingest import ingest_all
from newsletter.lists import read_lists, sync_lists
from newsletter.variants import render_campaign
from tests.builders import run
from tests.conftest import SECRET, FeedHttp, SmtpServer, make_settings, rss
from tests.console_site import ConsoleSite, console_settings, serve_console
from tests.gpg_keys import sequoia_key
from tests.test_approvals import seed_people
from tests.test_bounces import dsn
from tests.test_complaints import ARF
from tests.test_console import sending_alert, signed_in
from tests.test_send import seed
from tests.test_web import ROOT, Site, add_person, form_token
from tests.test_web import site as site  # the fixture

# PostgreSQL only: SQLite takes a NUL, so the same tests there would prove nothing.
pytestmark = pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def has_controls(text: str) -> bool:
    """Whether text holds a control character other than tab and line breaks, or U+FFFE/FFFF."""
    return any(
        (unicodedata.category(c) == "Cc" and c not in "\t\n\r") or c in "\ufffe\uffff" for c in text
    )


def newsletter(tmp_path: Path, database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`newsletter ARGS` in a fresh process on the test's (migrated) database."""
    env = {"NEWSLETTER_SECRET": SECRET, "NEWSLETTER_DATABASE_URL": database_url, "COLUMNS": "200"}
    return run(list(args), tmp_path, env, ok=False)


def one_line(stderr: str) -> str:
    """The only line on stderr (the test fails if there are more)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


# --- the public pages ------------------------------------------------------------------------


def test_signup_with_nul_gets_the_form_again_and_keeps_nothing(site: Site) -> None:
    """A NUL in the address (or in every field) is a 400 form again; nobody is stored."""
    token = form_token(httpx.get(f"{site.url}/subscribe").text)
    site.clock.advance(seconds=60)
    body = f"email=a%00b%40example.org&lists=weekly-digest&language=en%00&form_token={token}"
    reply = httpx.post(f"{site.url}/subscribe", content=body, headers=FORM)
    assert reply.status_code == 400 and "<form" in reply.text
    junk = "email=%00&lists=%00&language=%00&form_token=%00&website=&pow=%00&discreet=%00"
    assert httpx.post(f"{site.url}/subscribe", content=junk, headers=FORM).status_code == 400
    with unit_of_work(site.factory) as session:
        assert session.scalar(select(func.count()).select_from(Subscriber)) == 0


@pytest.mark.parametrize(
    ("field", "status"),
    [("language", 400), ("discreet", 400), ("on_key_problem", 400), ("lists", 400), ("key", 200)],
)
def test_preferences_with_nul_save_nothing(site: Site, field: str, status: int) -> None:
    """Each field of the preferences form with a NUL: refused whole, nothing saved."""
    sid = add_person(site.factory, site.clock, "reader@example.org")
    url = f"{site.url}/preferences/{site.token('preferences', sid)}"
    token = form_token(httpx.get(url).text)
    fields = {"form_token": token, "language": "be", "lists": "1", field: "x\x00y"}
    body = "&".join(f"{k}={quote(v)}" for k, v in fields.items())
    reply = httpx.post(url, content=body, headers={**FORM, "origin": site.url})
    assert reply.status_code == status
    with unit_of_work(site.factory) as session:
        person = session.get(Subscriber, sid)
        assert person is not None and person.language == "en"
        assert session.scalar(select(func.count()).select_from(ReaderKey)) == 0


def test_link_posts_and_queries_with_nul_never_500(site: Site) -> None:
    """One-click POST with a NUL in its body still unsubscribes; a NUL in a link or a query
    parameter is the usual 400 or 404."""
    sid = add_person(site.factory, site.clock, "reader@example.org")
    url = f"{site.url}/u/{site.token('unsubscribe', sid)}"
    reply = httpx.post(url, content=b"List-Unsubscribe=One-Click%00", headers=FORM)
    assert reply.status_code == 200 and site.status(sid) == "unsubscribed"
    for path in ("/u/x%00y", "/preferences/%00", "/confirm/a%00", "/key/%00", "/wrote/%00"):
        assert (
            httpx.post(site.url + path, content=b"form_token=%00", headers=FORM).status_code == 400
        )
    for path in ("/archive?page=%00&lang=%00", "/archive/feed.xml?lang=%00", "/w/%00"):
        assert httpx.get(site.url + path).status_code in (200, 400, 404), path


def test_a_pasted_key_with_nul_is_stored_re_armored(site: Site) -> None:
    """A key whose user ID or armor header holds NUL and controls is taken, and what is stored
    is Sequoia's own armor of it, with no NUL."""
    sid = add_person(site.factory, site.clock, "reader@example.org")
    url = f"{site.url}/preferences/{site.token('preferences', sid)}"
    odd_uid = str(sequoia_key("Re\x00ad\x01er <reader@example.org>").extract_certificate())
    first, *rest = str(sequoia_key("Reader <reader@example.org>").extract_certificate()).split("\n")
    odd_header = "\n".join([first, "Comment: a\x00b\x1b[31m", *rest])
    for key in (odd_uid, odd_header):
        token = form_token(httpx.get(url).text)
        body = f"form_token={token}&language=en&lists=1&key={quote(key)}"
        reply = httpx.post(url, content=body, headers={**FORM, "origin": site.url})
        assert reply.status_code == 303
    with unit_of_work(site.factory) as session:
        armored = session.scalars(select(ReaderKey.armored)).all()
    assert len(armored) == 1 and "\x00" not in armored[0]


# --- the console -----------------------------------------------------------------------------


@pytest.fixture
def settings(database_url: str, smtpd: SmtpServer) -> Settings:
    return console_settings(make_settings(database_url, smtpd))


@pytest.fixture
def console(
    factory: sessionmaker[Session], settings: Settings, clock: FrozenClock
) -> Iterator[ConsoleSite]:
    seed_people(factory, clock, 2)
    with serve_console(settings, factory, clock) as served:
        yield served


def test_console_form_values_are_stored_without_controls(
    console: ConsoleSite, factory: sessionmaker[Session]
) -> None:
    """A draft whose list, title and text carry NUL and controls is saved, cleaned (was a 500:
    the list was looked up with its NUL)."""
    editor = signed_in(console, factory, "ed@example.org", "editor")
    draft = {
        "list": "urgent-actions\x00",
        "segment": "",
        "title_en": "Free\x00 them\x01",
        "body_en": "Write\x00 to\x0b him\x1b today.\ufffe",
    }
    reply = editor.post("/alerts/new", draft)
    assert reply.status_code == 303, reply.text
    assert editor.get(reply.headers["location"]).status_code == 200
    with unit_of_work(factory) as session:
        campaign = session.scalars(select(Campaign)).one()
        stored = (campaign.title, campaign.body_html, repr(campaign.source_text))
    assert campaign.title == "Free them"
    assert "<p>Write to<br>\nhim today.</p>" in campaign.body_html  # a VT is a line break
    assert not any(has_controls(text) or "\\x" in text for text in stored), stored


def test_console_pause_reason_is_stored_without_controls(
    console: ConsoleSite, factory: sessionmaker[Session], settings: Settings, clock: FrozenClock
) -> None:
    """A pause reason with a NUL pauses the campaign, the reason cleaned (was a 500)."""
    campaign_id = sending_alert(factory, settings, clock)
    editor = signed_in(console, factory, "ed@example.org", "editor")
    reply = editor.post(f"/campaigns/{campaign_id}/pause", {"reason": "relay\x00 down\x01"})
    assert reply.status_code == 303, reply.text
    with unit_of_work(factory) as session:
        campaign = session.get(Campaign, campaign_id)
        assert campaign is not None
        assert (campaign.status, campaign.pause_reason) == ("paused", "relay down")


@pytest.mark.parametrize(
    "path",
    [
        "/alerts/new?q=%00",
        "/alerts/new?list=urgent-actions%00&segment=%00",
        "/api/recipients?list=%00",
        "/alerts/new?item=%01",
        "/alerts/new?q=%C2%85",
    ],
)
def test_console_queries_with_controls_get_one_line_400(
    console: ConsoleSite, factory: sessionmaker[Session], path: str
) -> None:
    """A control character in a query parameter is a 400 with one line (was a 500 for %00)."""
    editor = signed_in(console, factory, "ed@example.org", "editor")
    reply = editor.get(path)
    assert (reply.status_code, reply.text) == (400, "a control character in the address")
    assert reply.headers["content-security-policy"]  # the console's headers, as on every answer
    assert editor.get("/alerts/new?q=free%09them").status_code == 200  # a tab is no control
    assert editor.get("/alerts/new?q=%D0%92%D1%8F%D1%81%D0%BD%D0%B0").status_code == 200


def test_console_signin_with_nul_is_refused_in_one_line(console: ConsoleSite) -> None:
    """Sign-in and enrolment with NUL in every field: refused with the form again (400)."""
    client = console.client()
    hostile = {"email": "ed\x00@example.org", "password": "x\x00" * 8}
    assert client.post("/signin", hostile, csrf_from="/signin").status_code == 400
    code = {"pending": "p\x00", "code": "1\x00"}
    assert client.post("/signin/code", code, csrf_from="/signin").status_code == 400
    enrol = {"password": "p\x00", "password_again": "p\x00", "code": "\x00"}
    assert client.post("/enrol/a%00b", enrol, csrf_from="/signin").status_code in (400, 404)


# --- feeds -----------------------------------------------------------------------------------


def test_feeds_with_nul_are_refused_and_control_references_dropped(
    factory: sessionmaker[Session], clock: FrozenClock, feed_http: FeedHttp, database_url: str
) -> None:
    """A raw NUL or &#0; is malformed XML: refused in one line, nothing stored. Escaped HTML
    with control references (&#x1; &#xB; &#xFFFE;) is stored without them, and the digest
    renders (one "&#x1;" in an item made MJML refuse every digest)."""
    item = {"title": "T", "link": "https://portal.example.org/1", "guid": "g", "date": clock.now()}
    feed = rss([item])
    feed_http.documents.update(
        {
            "/raw": feed.replace(b"<title>T</title>", b"<title>T\x00</title>"),
            "/ref": feed.replace(b"<title>T</title>", b"<title>T&#0;</title>"),
            "/html": feed.replace(
                b"Summary.", b"Sum &amp;#x1;&amp;#xB;&amp;#0;&amp;#xFFFE; \xc2\x85mary."
            ),
        }
    )
    sources = [(f"{feed_http.base}/{name}", name, "en") for name in ("raw", "ref", "html")]
    settings = SourcesSettings(timeout_seconds=5.0, max_bytes=200_000)
    reports = ingest_all(factory=factory, sources=sources, settings=settings, clock=clock)
    assert [r.new for r in reports] == [0, 0, 1]
    assert all("not well-formed XML" in (r.error or "") for r in reports[:2])
    with unit_of_work(factory) as session:
        errors = session.scalars(select(Source.last_error).order_by(Source.name)).all()
        assert not any(has_controls(e or "") or "\n" in (e or "") for e in errors)
        summary = session.scalars(select(Item.summary_html)).one()
        assert not has_controls(summary) and "Sum" in summary and "mary." in summary
        sync_lists(session=session, specs=read_lists(ROOT / "subscribers" / "lists.toml"))
        campaign = assemble_digest(
            session=session, list_slug="weekly-digest", now=clock.now(), actor="t"
        )
        assert campaign is not None
        variants = render_campaign(campaign, settings=make_settings(database_url))
    assert all("mary." in v.html for v in variants)


# --- returns: bounces, complaints, the unsubscribe mailto --------------------------------------


def test_returns_with_nul_bytes_are_applied_with_clean_text(
    factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """Through the inbound SMTP server: a hard and a soft bounce whose Diagnostic-Code holds
    NUL, bytes that are not UTF-8 and an escape sequence, a complaint with NUL in its report
    and an unsubscribe mail with NUL in its subject. All are taken; the text kept is clean."""
    seed(factory, clock, 3)
    base = make_settings(database_url)
    settings = replace(base, inbound=replace(base.inbound, enabled=True, port=free_port()))
    with unit_of_work(factory) as session:
        ids = list(session.scalars(select(Delivery.id).order_by(Delivery.id)))
    hostile = b"mailbox \x00 says \xff\xfe no \x1b[31m =?utf-8?q?=00?="
    hard = dsn("x", "person0@example.net", "failed", "5.1.1", b"", "")
    soft = dsn("x", "person1@example.net", "delayed", "4.4.7", b"", "")
    verp = verp_address(ids[2], settings=settings)
    arf = (ARF / "jmrp-verp-only.eml").read_text().replace("%%VERP%%", verp)
    arf = arf.replace("User-Agent: ", "User-Agent: \x00").replace("\n", "\r\n")
    sends = [
        (verp_address(ids[0], settings=settings), hard.replace(b"mailbox says no", hostile)),
        (verp_address(ids[1], settings=settings), soft.replace(b"mailbox says no", hostile)),
        ("bounces@portal.example.org", arf.encode()),
        ("unsubscribe@portal.example.org", b"Subject: unsubscribe a\x00b\xff\r\n\r\nx\r\n"),
    ]
    controller = inbound_for(settings, factory, clock)
    try:
        with smtplib.SMTP("127.0.0.1", settings.inbound.port, timeout=10) as client:
            for to, raw in sends:
                assert client.sendmail("", [to], raw) == {}
    finally:
        controller.stop()
    with unit_of_work(factory) as session:
        deliveries = session.scalars(select(Delivery).order_by(Delivery.id)).all()
        people = session.scalars(select(Subscriber.status).order_by(Subscriber.id)).all()
    assert [d.status for d in deliveries] == ["failed", "queued", "queued"]
    assert people == ["bounced", "active", "unsubscribed"]
    for delivery in deliveries[:2]:
        reply = delivery.last_reply or ""
        assert "mailbox" in reply and "no" in reply and not has_controls(reply)


# --- files and the command line ----------------------------------------------------------------


LISTS = """\
[[lists]]
slug = "weekly-digest"
kind = "digest"
list_id = "weekly.example.org"
name = {{ en = "Weekly{en}" }}
"""
SEGMENTS = '[[segments]]\nname = "city"\nrule = "attr.city = \\"Vil{city}nius\\""\n'


@pytest.mark.parametrize(
    ("en", "city", "where"),
    [("\\u0000", "", "lists[0]: 'names.en'"), ("", "\\u0000", "segments[0]")],
    ids=["list-name", "segment-rule"],
)
def test_list_and_segment_files_with_nul_are_refused_in_one_line(
    tmp_path: Path,
    database_url: str,
    factory: sessionmaker[Session],
    en: str,
    city: str,
    where: str,
) -> None:
    """`lists sync` with a NUL in a list's name or a segment's rule: one line naming the file
    and the entry, exit 1, nothing written (was "internal error: database error DataError")."""
    (tmp_path / "lists.toml").write_text(LISTS.format(en=en))
    (tmp_path / "segments.toml").write_text(SEGMENTS.format(city=city))
    done = newsletter(tmp_path, database_url, "lists", "sync", str(tmp_path / "lists.toml"))
    assert done.returncode == 1
    line = one_line(done.stderr)
    assert where in line and "control character (U+0000)" in line and "Traceback" not in line
    with unit_of_work(factory) as session:
        assert session.scalar(select(func.count()).select_from(MailingList)) == 0
        assert session.scalar(select(func.count()).select_from(Segment)) == 0


def test_lists_create_refuses_a_control_character_in_one_line(
    tmp_path: Path, database_url: str, factory: sessionmaker[Session]
) -> None:
    """`lists create` with an escape sequence in a name: refused (it would reach every message
    of the list, where MJML refuses it), and no list is made."""
    args = ["lists", "create", "press", "--kind", "digest", "--name", "en=Press\x1b[2J"]
    done = newsletter(tmp_path, database_url, *args)
    assert done.returncode == 1
    assert "'names.en' holds a control character (U+001B)" in one_line(done.stderr)
    with unit_of_work(factory) as session:
        assert session.scalar(select(func.count()).select_from(MailingList)) == 0


def test_alert_body_file_with_controls_renders(
    tmp_path: Path, database_url: str, factory: sessionmaker[Session], clock: FrozenClock
) -> None:
    """`alert preview --body-file` whose text holds NUL, a vertical tab and other controls
    renders without them (was "the MJML template is not valid")."""
    seed_people(factory, clock, 1)
    (tmp_path / "body.txt").write_bytes(b"Write\x00 to\x0b him\x01 today.\n")
    out = tmp_path / "out"
    done = newsletter(
        tmp_path, database_url, "alert", "preview", "--title", "Free\x01 him",
        "--body-file", str(tmp_path / "body.txt"), "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    html = (out / "alert.en.html").read_text(encoding="utf-8")
    assert "Write to him today." in html and not has_controls(html)


def test_an_argument_that_is_not_utf8_is_refused_in_one_line(
    tmp_path: Path, database_url: str, factory: sessionmaker[Session]
) -> None:
    """An argument typed in a terminal that is not UTF-8 reaches Python as lone surrogates,
    which no database driver can encode: one line saying so, not an internal error."""
    not_utf8 = os.fsdecode(b"Ale\xf1")  # latin-1, as a legacy terminal sends it
    args = ["staff", "add", "s@example.org", "--role", "editor", "--name", not_utf8]
    done = newsletter(tmp_path, database_url, *args)
    assert done.returncode == 2
    assert "not UTF-8" in done.stderr and "internal error" not in one_line(done.stderr)
    with unit_of_work(factory) as session:
        assert session.scalar(select(func.count()).select_from(Staff)) == 0
