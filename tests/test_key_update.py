"""The plaintext key-problem notice and what its link may do: only take a new key (/new-key/).

That notice travels in the clear (the key is what cannot be used), so whoever reads it in
transit or in the mailbox holds its link. These tests play that reader: through the real sender
and a real aiosmtpd, keys made by gpg, pages served by a real uvicorn, SQLite and PostgreSQL.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from newsletter.clock import FrozenClock
from newsletter.db import unit_of_work
from newsletter.db.models import Delivery, DeliveryStatus, ReaderKey, Subscriber
from newsletter.errors import TokenError
from newsletter.readers import remove_key, set_key, set_reading
from newsletter.tokens import (
    KEY_UPDATE_MAX_AGE_DAYS,
    PURPOSES,
    make_copy_token,
    make_key_token,
    make_key_update_token,
    make_token,
    make_wrote_token,
    read_key_token,
    read_key_update_token,
    read_token,
)
from tests.conftest import SECRET, SmtpServer
from tests.gpg_keys import GpgHome
from tests.test_flow import prepare, send_digest
from tests.test_readers_send import (
    DISCREET_BASE,
    KEYED,
    inner,
    now_clock,  # noqa: F401
    reader_key,
    service_mail,
    settings_with,
    subscriber_id,
    to,
)
from tests.test_web import Site, add_person, form_token
from tests.test_web_readers import READER, Keys, keys  # noqa: F401
from tests.test_web_readers import site as readers_site  # noqa: F401
from tests.webserver import serve_pages

# What the preferences form takes besides a key: a post to /new-key/ carrying them changes none.
HOSTILE = {
    "on_key_problem": "plain",
    "remove_key": "1",
    "discreet": "off",
    "action": "leave",
    "language": "ru",
}


def state(factory: sessionmaker[Session], sid: int) -> tuple[str, str, str, str, list[str]]:
    """What the database holds: status, discreet, on_key_problem, language, and key statuses."""
    with unit_of_work(factory) as session:
        sub = session.get(Subscriber, sid)
        assert sub is not None
        rows = session.scalars(select(ReaderKey.status).where(ReaderKey.subscriber_id == sid))
        return sub.status, sub.discreet, sub.on_key_problem, sub.language, sorted(rows)


@pytest.fixture
def new_home(tmp_path: Path) -> Iterator[GpgHome]:
    """A second GnuPG home: the key the reader gives once theirs cannot be used."""
    home = GpgHome.make(tmp_path / "new-key")
    yield home
    home.close()


def test_the_plain_key_notice_opens_a_page_that_takes_a_new_key_and_nothing_else(
    factory: sessionmaker[Session],
    smtpd: SmtpServer,
    now_clock: FrozenClock,  # noqa: F811
    database_url: str,
    tmp_path: Path,
    new_home: GpgHome,
) -> None:
    """A discreet reader's key is removed: the plaintext notice carries no preferences link, and
    its link, posted with plain / remove key / discreet off / leave, changes none of them; a new
    key pasted there waits for its proof, which the reader follows; then the link is stale."""
    clock = now_clock
    prepare(factory, clock)
    old_home, armored = reader_key(tmp_path, KEYED)
    sid = subscriber_id(factory, KEYED)
    with unit_of_work(factory) as session:
        now = clock.now()
        set_key(session, subscriber_id=sid, data=armored, now=now, actor="t", confirmed=True)
        set_reading(session, subscriber_id=sid, discreet="envelope", now=now, actor="t")
        remove_key(session, subscriber_id=sid, now=now, actor="t", by_reader=False)
    with serve_pages(settings_with(database_url, smtpd), factory, clock) as (url, settings):
        send_digest(factory, settings, clock)
        service_mail(factory, settings, clock)
        [notice] = to(smtpd.messages(), KEYED)
        assert notice.get_content_type() == "multipart/alternative"  # plain: read by anyone
        text, html = notice.get_body(("plain",)), notice.get_body(("html",))
        assert text is not None and html is not None
        for part in (str(text.get_content()), str(html.get_content())):
            assert "/preferences/" not in part and "/u/" not in part
        [link] = re.findall(r"https?://\S+/new-key/\S+", str(text.get_content()))
        assert link.startswith(DISCREET_BASE)  # a discreet reader's links name no portal host
        page_url = url + urlsplit(link).path
        page = httpx.get(page_url)
        assert page.status_code == 200
        for field in ("on_key_problem", "remove_key", "discreet", "lists", "language"):
            assert f'name="{field}"' not in page.text
        assert 'value="leave"' not in page.text and KEYED not in page.text
        assert '<textarea id="key" name="key"' in page.text
        before = state(factory, sid)
        assert before == ("active", "envelope", "withhold", "en", ["removed"])

        hostile = httpx.post(page_url, data={"form_token": form_token(page.text), **HOSTILE})
        assert hostile.status_code == 200 and 'aria-invalid="true"' in hostile.text  # no key
        assert state(factory, sid) == before

        new_fpr = new_home.generate(f"Reader <{KEYED}>")
        new_home.add_key(new_fpr)
        data = {"form_token": form_token(page.text), "key": new_home.export(new_fpr), **HOSTILE}
        given = httpx.post(page_url, data=data)
        assert given.status_code == 303
        after = ("active", "envelope", "withhold", "en", ["pending", "removed"])
        assert state(factory, sid) == after
        shown = httpx.get(url + given.headers["location"]).text
        assert "Check your inbox for a message encrypted to this key" in shown
        assert new_fpr not in shown and new_fpr[-16:] not in shown.replace(" ", "")

        service_mail(factory, settings, clock)  # the proof, encrypted to the new key
        proof = inner(new_home, to(smtpd.messages(), KEYED)[-1]).get_body(("plain",))
        assert proof is not None
        [key_link] = re.findall(r"https?://\S+/key/\S+", str(proof.get_content()))
        key_page = url + urlsplit(key_link).path
        activated = httpx.post(key_page, data={"form_token": form_token(httpx.get(key_page).text)})
        assert activated.status_code == 200
        assert state(factory, sid) == ("active", "envelope", "withhold", "en", ["active"])
        assert httpx.get(page_url).status_code == 400  # a new key works: the notice is done
        with factory() as session:
            assert session.scalars(
                select(Delivery.status).where(Delivery.subscriber_id == sid)
            ).all() == [DeliveryStatus.WITHHELD]
    old_home.close()


def test_an_expired_key_update_link_is_refused(readers_site: Site) -> None:  # noqa: F811
    """The link works for KEY_UPDATE_MAX_AGE_DAYS, then the pages' one 400 for every bad link."""
    site = readers_site
    sid = add_person(site.factory, site.clock, READER)
    token = make_key_update_token(
        secret=SECRET, subscriber_id=sid, fingerprint="AB" * 20, issued_at=site.clock.now()
    )
    site.clock.advance(days=KEY_UPDATE_MAX_AGE_DAYS, seconds=-1)
    assert httpx.get(f"{site.url}/new-key/{token}").status_code == 200
    site.clock.advance(seconds=2)
    with pytest.raises(TokenError, match="expired"):
        read_key_update_token(token, secret=SECRET, now=site.clock.now())
    reply = httpx.get(f"{site.url}/new-key/{token}")
    assert reply.status_code == 400 and "<textarea" not in reply.text


def test_no_other_token_opens_the_key_update_page_nor_it_another(
    readers_site: Site,  # noqa: F811
) -> None:
    """Each token opens its own page only: a preferences (or any other) token at /new-key/ is
    400, and a /new-key/ token at /preferences/ (GET and POST), /key/ or any other page too."""
    site = readers_site
    sid = add_person(site.factory, site.clock, READER)
    now = site.clock.now()
    update = make_key_update_token(
        secret=SECRET, subscriber_id=sid, fingerprint="AB" * 20, issued_at=now
    )
    others = [
        make_token(secret=SECRET, purpose=p, subscriber_id=sid, list_id=1, issued_at=now)
        for p in PURPOSES
        if p != "key_update"
    ] + [
        make_key_token(secret=SECRET, subscriber_id=sid, fingerprint="AB" * 20, issued_at=now),
        make_copy_token(secret=SECRET, campaign_id=1, lang="en"),
        make_wrote_token(secret=SECRET, subscriber_id=sid, case_id=1),
    ]
    assert httpx.get(f"{site.url}/new-key/{update}").status_code == 200
    for other in others:
        assert httpx.get(f"{site.url}/new-key/{other}").status_code == 400, other
        assert httpx.post(f"{site.url}/new-key/{other}", data={"key": "x"}).status_code == 400
    for path in ("/u/", "/preferences/", "/confirm/", "/key/", "/wrote/"):
        assert httpx.get(f"{site.url}{path}{update}").status_code == 400, path
    assert httpx.get(f"{site.url}/w/{update}").status_code == 404  # no such web copy
    assert httpx.post(f"{site.url}/preferences/{update}", data=HOSTILE).status_code == 400
    with pytest.raises(TokenError):
        read_token(update, secret=SECRET, purpose="preferences")
    with pytest.raises(TokenError):
        read_key_token(update, secret=SECRET, max_age_seconds=3600, now=now)
    assert state(site.factory, sid) == ("active", "off", "withhold", "en", [])


def test_the_key_update_form_needs_its_own_form_token_and_origin(
    readers_site: Site,  # noqa: F811
    keys: Keys,  # noqa: F811
) -> None:
    """As every form behind a signed link: no form token, another page's, or another site's
    Origin is 403, and nothing is kept."""
    site = readers_site
    sid = add_person(site.factory, site.clock, READER)
    now = site.clock.now()
    url = f"{site.url}/new-key/" + make_key_update_token(
        secret=SECRET, subscriber_id=sid, fingerprint="AB" * 20, issued_at=now
    )
    prefs = f"{site.url}/preferences/{site.token('preferences', sid)}"
    _, armored = keys.good()
    ticket = form_token(httpx.get(url).text)
    assert httpx.post(url, data={"key": armored}).status_code == 403
    borrowed = form_token(httpx.get(prefs).text)
    assert httpx.post(url, data={"form_token": borrowed, "key": armored}).status_code == 403
    foreign = {"Origin": "https://evil.example"}
    reply = httpx.post(url, data={"form_token": ticket, "key": armored}, headers=foreign)
    assert reply.status_code == 403
    assert state(site.factory, sid)[4] == []
    assert httpx.post(url, data={"form_token": ticket, "key": armored}).status_code == 303
    assert state(site.factory, sid)[4] == ["pending"]


def test_a_revoked_key_pasted_on_the_key_update_page_marks_nothing(
    readers_site: Site,  # noqa: F811
    keys: Keys,  # noqa: F811
) -> None:
    """The page takes a new key only: the reader's own pending key, pasted again as revoked,
    is refused there with a reason, and stays pending (the preferences page would learn it)."""
    site = readers_site
    sid = add_person(site.factory, site.clock, READER)
    fpr, armored = keys.good()
    with unit_of_work(site.factory) as session:
        set_key(session, subscriber_id=sid, data=armored, now=site.clock.now(), actor="t")
    keys.home.revoke(fpr)
    url = f"{site.url}/new-key/" + make_key_update_token(
        secret=SECRET, subscriber_id=sid, fingerprint="AB" * 20, issued_at=site.clock.now()
    )
    ticket = form_token(httpx.get(url).text)
    reply = httpx.post(url, data={"form_token": ticket, "key": keys.home.export(fpr)})
    assert reply.status_code == 200
    assert "this key cannot be used any more: give a new one" in reply.text
    assert state(site.factory, sid)[4] == ["pending"]


@pytest.mark.parametrize("how", ["removed", "revoked"])
def test_the_unsubscribe_page_of_a_reader_whose_key_went_links_no_preferences(
    readers_site: Site,  # noqa: F811
    keys: Keys,  # noqa: F811
    how: str,
) -> None:
    """The List-Unsubscribe link of an older encrypted message travels in the clear: once the
    key is removed by an admin or revoked, its page still names no preferences link, and
    unsubscribing still works in one click."""
    site = readers_site
    sid = add_person(site.factory, site.clock, READER)
    fpr, armored = keys.good()
    with unit_of_work(site.factory) as session:
        now = site.clock.now()
        set_key(session, subscriber_id=sid, data=armored, now=now, actor="t", confirmed=True)
        if how == "removed":
            remove_key(session, subscriber_id=sid, now=now, actor="t", by_reader=False)
    if how == "revoked":
        keys.home.revoke(fpr)
        with unit_of_work(site.factory) as session:
            info = set_key(
                session, subscriber_id=sid, data=keys.home.export(fpr), now=now, actor="t"
            )
            assert info.revoked
    assert state(site.factory, sid)[4] == [how]
    url = f"{site.url}/u/{site.token('unsubscribe', sid)}"
    page = httpx.get(url)
    assert page.status_code == 200 and "<button" in page.text
    assert "/preferences/" not in page.text
    assert httpx.post(url, content=b"List-Unsubscribe=One-Click").status_code == 200
    assert site.status(sid) == "unsubscribed"
