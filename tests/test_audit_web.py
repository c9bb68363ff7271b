"""An attacker's look at the public pages: what a link travelling in the clear may open, the
signup form's field cap and its confirmations per inbox, and tokens spelled another way; served
by a real uvicorn on loopback, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import string
import time

import httpx
import pytest
from sqlalchemy import func, select
from starlette.requests import Request
from starlette.types import Message

from newsletter.config import WebSettings
from newsletter.db import unit_of_work
from newsletter.db.models import Event, Subscriber, SubscriptionStatus
from newsletter.lists import get_list
from newsletter.readers import set_key, set_reading
from newsletter.tokens import make_key_token, make_wrote_token
from newsletter.web import body_limit, read_capped_body
from tests.conftest import SECRET, SmtpServer
from tests.test_signup import Signup
from tests.test_signup import site as signup_site  # noqa: F401
from tests.test_web import Site, add_person, form_token
from tests.test_web_readers import Keys, keys  # noqa: F401
from tests.test_web_readers import site as readers_site  # noqa: F401


def test_a_keyed_or_discreet_readers_unsubscribe_link_opens_no_preferences(
    readers_site: Site,  # noqa: F811
    keys: Keys,  # noqa: F811
) -> None:
    """The unsubscribe link rides in the clear (List-Unsubscribe, on encrypted mail too): for a
    reader with a key or discreet mail, its page hands out no preferences link, whose form could
    remove the key or turn discreet mail off; unsubscribing still works in one click."""
    site = readers_site
    keyed = add_person(site.factory, site.clock, "reader@example.org")
    discreet = add_person(site.factory, site.clock, "quiet@example.org")
    plain = add_person(site.factory, site.clock, "plain@example.org")
    _, armored = keys.good()
    with unit_of_work(site.factory) as session:
        now = site.clock.now()
        set_key(session, subscriber_id=keyed, data=armored, now=now, actor="t", confirmed=True)
        set_reading(session, subscriber_id=discreet, discreet="envelope", now=now, actor="t")
    for sid in (keyed, discreet):
        url = f"{site.url}/u/{site.token('unsubscribe', sid)}"
        page = httpx.get(url)
        assert page.status_code == 200
        assert "/preferences/" not in page.text
        assert httpx.post(url, content=b"List-Unsubscribe=One-Click").status_code == 200
        assert site.status(sid) == SubscriptionStatus.UNSUBSCRIBED
    page = httpx.get(f"{site.url}/u/{site.token('unsubscribe', plain)}")
    assert 'href="/preferences/' in page.text


def test_a_signup_post_with_more_fields_than_the_form_is_a_400(
    signup_site: Signup,  # noqa: F811
) -> None:
    """More fields than any form has: one plain 400 with the pages' headers, no server error,
    and nobody signed up."""
    site = signup_site
    ticket = site.ticket()
    site.clock.advance(seconds=60)
    body = f"form_token={ticket}&email=victim%40example.org&lists=weekly-digest&" + "&".join(
        f"x{n}=1" for n in range(30)
    )
    reply = site.http.post(
        f"{site.url}/subscribe",
        content=body,
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert reply.status_code == 400
    assert reply.headers["x-content-type-options"] == "nosniff"
    assert reply.headers["cache-control"] == "no-store"
    with unit_of_work(site.factory) as session:
        assert session.scalar(select(func.count()).select_from(Subscriber)) == 0


def test_tagged_and_dotted_forms_of_one_inbox_get_one_confirmation(
    signup_site: Signup,  # noqa: F811
    smtpd: SmtpServer,
) -> None:
    """A stranger cannot fill someone's inbox with confirmations by writing their address as
    a+1@, a+2@ or a.b@gmail.com, each from another client: one inbox, one confirmation within
    confirm_resend_hours; another person's address still gets theirs."""
    site = signup_site
    forms = [
        "victim@gmail.com",
        "victim+1@gmail.com",
        "victim+news@gmail.com",
        "v.ictim@gmail.com",
        "V.I.C.T.I.M+x@googlemail.com",
        "other+tag@example.org",
        "other@example.org",
    ]
    for n, address in enumerate(forms):
        assert site.post(address, client=f"10.9.{n}.1").status_code == 200
    site.mail_confirmations()
    sent = [str(m["To"]) for m in smtpd.messages()]
    assert sent == ["victim@gmail.com", "other+tag@example.org"]


def mangled(token: str) -> list[str]:
    """The same token spelled otherwise: padded, with stray characters, its last bits changed."""
    payload, signature = token.rsplit(".", 1)
    last = signature[-1]
    alphabet = string.ascii_letters + string.digits + "-_"
    sibling = next(c for c in alphabet if c != last and _same_bytes(signature, c))
    return [
        token + "=",
        f"{payload}.!!!!{signature}",
        f"{payload}.{signature[:-1]}{sibling}",
    ]


def _same_bytes(signature: str, last: str) -> bool:
    def raw(s: str) -> bytes:
        return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))

    return raw(signature) == raw(signature[:-1] + last)


@pytest.mark.parametrize("purpose", ["unsubscribe", "preferences", "confirm", "wrote", "key"])
def test_a_token_spelled_another_way_is_refused(
    readers_site: Site,  # noqa: F811
    keys: Keys,  # noqa: F811
    purpose: str,
) -> None:
    """A signed link has one spelling: padded, with stray characters or other trailing bits it
    is refused as an altered one (itsdangerous alone reads them all as the same token), and the
    one-click POST changes nothing."""
    site = readers_site
    sid = add_person(site.factory, site.clock, "reader@example.org")
    now = site.clock.now()
    if purpose == "wrote":
        token = make_wrote_token(secret=SECRET, subscriber_id=sid, case_id=1)
    elif purpose == "key":
        fpr, armored = keys.good()
        with unit_of_work(site.factory) as session:
            set_key(session, subscriber_id=sid, data=armored, now=now, actor="t")
        token = make_key_token(secret=SECRET, subscriber_id=sid, fingerprint=fpr, issued_at=now)
    else:
        token = site.token(purpose, sid)
    path = "/u/" if purpose == "unsubscribe" else f"/{purpose}/"
    assert httpx.get(f"{site.url}{path}{token}").status_code in (200, 404)  # the real one opens
    for other in mangled(token):
        for method in ("GET", "POST"):
            reply = httpx.request(method, f"{site.url}{path}{other}")
            assert reply.status_code == 400, (method, other)
    assert site.status(sid) == SubscriptionStatus.ACTIVE


def test_a_body_trickled_in_small_chunks_is_gathered_in_linear_time() -> None:
    """A body trickled in small ASGI messages is gathered, not copied whole for every chunk.

    4 MiB in 256-byte chunks: gathered in a bytearray it takes milliseconds; copying what came
    so far for each chunk (the old `bytes +=`) took 13 s here. The budget, 2 s, leaves a loaded
    machine forty times what it needs and still fails the quadratic way by a factor of six.
    The preferences form's own limit (about 213 kB) fed a byte at a time cost 1.7 s of the
    event loop that every page shares.
    """
    limit, size = 4 * 1024 * 1024, 256
    chunks = limit // size
    sent = 0

    async def receive() -> Message:
        nonlocal sent
        sent += 1
        return {"type": "http.request", "body": b"x" * size, "more_body": sent < chunks}

    request = Request({"type": "http", "method": "POST", "path": "/", "headers": []}, receive)
    started = time.perf_counter()
    body = asyncio.run(read_capped_body(request, limit))
    assert len(body) == limit
    assert time.perf_counter() - started < 2.0
    assert body_limit("/preferences/x", WebSettings()) < limit  # the case it stands for


def test_list_ids_of_no_list_are_not_kept_in_the_audit_log(
    readers_site: Site,  # noqa: F811
) -> None:
    """A preferences post may carry up to 100 "lists" of thousands of digits each: the lists
    that exist are saved, and the event keeps only those, not 200 kB of whatever was sent
    (again and again, with the language switched each time)."""
    site = readers_site
    sid = add_person(site.factory, site.clock, "reader@example.org")
    url = f"{site.url}/preferences/{site.token('preferences', sid)}"
    with unit_of_work(site.factory) as session:
        digest = get_list(session, "weekly-digest").id
    junk = ["9" * 4000 + str(n) for n in range(40)]
    for language in ("be", "ru"):
        page = httpx.get(url)
        data = {
            "form_token": form_token(page.text),
            "lists": [str(digest), *junk],
            "language": language,
            "action": "save",
        }
        assert httpx.post(url, data=data).status_code == 303
    assert site.status(sid) == SubscriptionStatus.ACTIVE
    with unit_of_work(site.factory) as session:
        details = list(
            session.scalars(select(Event.detail).where(Event.action == "subscriber.preferences"))
        )
    assert [d["lists"] for d in details] == [[digest], [digest]]
