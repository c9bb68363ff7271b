"""Signing up on the web, served by a real uvicorn on loopback, on SQLite and PostgreSQL, with the
confirmations sent to a real aiosmtpd: double opt-in, no enumeration, no mail-bombing, no bots."""

from __future__ import annotations

import re
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import httpx
import pytest
import uvicorn
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from newsletter.clock import FrozenClock
from newsletter.config import Settings
from newsletter.db import unit_of_work
from newsletter.db.models import (
    ConfirmationMark,
    Subscriber,
    Subscription,
    SubscriptionStatus,
    UsedChallenge,
)
from newsletter.db.queries import mark_bounced
from newsletter.devsmtp import free_port
from newsletter.lists import read_lists, sync_lists
from newsletter.notices import send_confirmations
from newsletter.proof_of_work import solve
from newsletter.signup import purge_signups
from newsletter.smtp import open_pool
from newsletter.subscriptions import forget, unsubscribe
from newsletter.web import create_app
from newsletter.webserver import listener_config
from tests.conftest import SECRET, SmtpServer, make_settings
from tests.test_web import ROOT, add_person

# Applied to our own pages only (a fixed, small document), not to outside text.
TICKET = re.compile(r'name="form_token" value="([^"]+)"')
BITS = 8  # cheap for the tests; the default (16) is exercised by the browser test's script


@contextmanager
def serve_public(
    settings: Settings,
    factory: sessionmaker[Session],
    clock: FrozenClock,
    *,
    send_confirmations: bool = False,
    confirm_delay: tuple[float, float] = (0.1, 0.5),
) -> Iterator[tuple[str, Settings]]:
    """Serve create_app() as `newsletter web` does (optionally mailing confirmations itself, in
    rounds `confirm_delay` seconds apart: shorter than the service's, for the tests' sake)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    settings = replace(settings, web=replace(settings.web, base_url=url))
    app = create_app(
        settings,
        factory,
        clock,
        send_confirmations=send_confirmations,
        confirm_delay=confirm_delay,
    )
    server = uvicorn.Server(listener_config(app, settings, host="127.0.0.1", port=port))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield url, settings
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def signup_settings(database_url: str, smtp: SmtpServer | None = None, **web: object) -> Settings:
    """Test settings with a cheap proof of work and the portal's origin allowed."""
    base = make_settings(database_url, smtp)
    values = {"signup_pow_bits": BITS, "signup_origins": ("http://127.0.0.1:9",), **web}
    return replace(base, web=replace(base.web, **values))  # type: ignore[arg-type]


@dataclass
class Signup:
    url: str
    settings: Settings
    factory: sessionmaker[Session]
    clock: FrozenClock
    http: httpx.Client

    def ticket(self, lang: str = "en") -> str:
        """Open the form, as a browser does, and return its ticket."""
        page = self.http.get(f"{self.url}/subscribe?lang={lang}")
        assert page.status_code == 200
        match = TICKET.search(page.text)
        assert match is not None
        return match.group(1)

    def post(
        self,
        email: str,
        *,
        ticket: str | None = None,
        lists: tuple[str, ...] = ("weekly-digest",),
        lang: str = "en",
        solved: bool = True,
        answer: str | None = None,
        honeypot: str = "",
        wait: float = 5,
        client: str = "",
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        """Post the form as its page would (after `wait` seconds on the clock)."""
        if ticket is None:
            ticket = self.ticket(lang)
        self.clock.advance(seconds=wait)
        pow_answer = answer if answer is not None else (solve(ticket, BITS) if solved else "")
        data = {
            "form_token": ticket,
            "pow": pow_answer,
            "email": email,
            "language": lang,
            "lists": list(lists),
            "website": honeypot,
        }
        sent = dict(headers or {})
        if client:
            sent["x-forwarded-for"] = client
        return self.http.post(f"{self.url}/subscribe", data=data, headers=sent)

    def people(self) -> dict[str, dict[str, str]]:
        """Every subscriber's lists and statuses, by address."""
        with unit_of_work(self.factory) as session:
            rows = session.execute(
                select(Subscriber.email, Subscription.status, Subscription.list_id).join(
                    Subscription, Subscription.subscriber_id == Subscriber.id
                )
            ).all()
        found: dict[str, dict[str, str]] = {}
        for email, status, list_id in rows:
            found.setdefault(email, {})[str(list_id)] = status
        return found

    def active(self) -> int:
        with unit_of_work(self.factory) as session:
            return int(
                session.scalar(
                    select(func.count()).where(Subscription.status == SubscriptionStatus.ACTIVE)
                )
                or 0
            )

    def mail_confirmations(self) -> tuple[int, int]:
        """Send what is owed, as `newsletter run` or `newsletter web` does."""
        import asyncio

        async def run() -> tuple[int, int]:
            async with open_pool(self.settings, self.factory, self.clock) as pool:
                return await send_confirmations(
                    factory=self.factory, settings=self.settings, transport=pool, clock=self.clock
                )

        return asyncio.run(run())


def lists_synced(factory: sessionmaker[Session]) -> None:
    with unit_of_work(factory) as session:
        sync_lists(session=session, specs=read_lists(ROOT / "subscribers" / "lists.toml"))


@pytest.fixture
def site(
    factory: sessionmaker[Session], database_url: str, clock: FrozenClock, smtpd: SmtpServer
) -> Iterator[Signup]:
    """The declared lists and the pages, with the confirmations going to aiosmtpd."""
    lists_synced(factory)
    with (
        serve_public(signup_settings(database_url, smtpd), factory, clock) as (url, settings),
        httpx.Client(timeout=30) as http,
    ):
        yield Signup(url, settings, factory, clock, http)


def test_form_is_no_store_scripted_from_self_and_framed_only_by_the_portal(site: Signup) -> None:
    """/subscribe: no-store, script-src 'self', DENY; ?embed=1 framable by signup_origins only."""
    page = site.http.get(f"{site.url}/subscribe")
    assert page.headers["cache-control"] == "no-store"
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert page.headers["x-frame-options"] == "DENY"
    assert '<script src="static/signup.js" defer></script>' in page.text
    assert "<script>" not in page.text  # nothing inline
    embed = site.http.get(f"{site.url}/subscribe?embed=1")
    assert "frame-ancestors http://127.0.0.1:9;" in embed.headers["content-security-policy"] + ";"
    assert "x-frame-options" not in embed.headers
    assert 'action="subscribe?embed=1"' in embed.text
    script = site.http.get(f"{site.url}/static/signup.js")
    assert script.headers["content-type"].startswith("text/javascript")
    assert (
        "frame-ancestors 'none'"
        in site.http.get(f"{site.url}/archive").headers["content-security-policy"]
    )


def test_signup_is_pending_until_the_emailed_link_is_clicked(
    site: Signup, smtpd: SmtpServer
) -> None:
    """A post subscribes nobody: one confirmation, in the chosen language; its button confirms."""
    answer = site.post("new@example.org", lists=("weekly-digest", "urgent-actions"), lang="be")
    assert answer.status_code == 200 and answer.headers["cache-control"] == "no-store"
    assert site.active() == 0
    assert set(site.people()["new@example.org"].values()) == {"pending"}
    assert site.mail_confirmations() == (1, 0)
    [mail] = smtpd.messages()
    assert mail["To"] == "new@example.org"
    text = mail.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert "Пацвердзіць" in text or "пацвердз" in text.lower()
    link = re.search(r"http://127\.0\.0\.1:\d+/confirm/\S+", text)
    assert link is not None
    page = site.http.get(link.group(0))
    assert site.active() == 0  # opening the link confirms nothing
    token = TICKET.search(page.text)
    assert token is not None
    site.http.post(link.group(0), data={"form_token": token.group(1)})
    assert site.active() == 2


KINDS = ("new", "subscribed", "unsubscribed", "bounced", "forgotten", "plausible")


def make_kinds(site: Signup) -> dict[str, str]:
    """One address of each kind the form must not tell apart."""
    now = site.clock.now()
    add_person(site.factory, site.clock, "subscribed@example.org")
    left = add_person(site.factory, site.clock, "unsubscribed@example.org")
    bounced = add_person(site.factory, site.clock, "bounced@example.org")
    add_person(site.factory, site.clock, "forgotten@example.org")
    with unit_of_work(site.factory) as session:
        unsubscribe(session=session, subscriber_id=left, list_id=None, now=now, actor="t")
        mark_bounced(session, bounced)
        forget(session=session, email="forgotten@example.org", secret=SECRET, now=now, actor="t")
    return {
        "new": "new@example.org",
        "subscribed": "subscribed@example.org",
        "unsubscribed": "unsubscribed@example.org",
        "bounced": "bounced@example.org",
        "forgotten": "forgotten@example.org",
        # Valid syntax, a domain nobody registered: no DNS is asked, so it is taken like the rest.
        "plausible": "nobody@no-such-domain-4e7a1c.org",
    }


def test_every_kind_of_address_gets_the_same_bytes(site: Signup, capsys: object) -> None:
    """New, subscribed, unsubscribed, bounced, forgotten, plausible: same status, same bytes."""
    addresses = make_kinds(site)
    answers: dict[str, list[bytes]] = {k: [] for k in KINDS}
    heads: set[tuple[tuple[str, str], ...]] = set()
    times: dict[str, list[float]] = {k: [] for k in KINDS}
    for round_ in range(3):
        for kind in KINDS:
            ticket = site.ticket()
            site.clock.advance(seconds=5)
            data = {
                "form_token": ticket,
                "pow": solve(ticket, BITS),
                "email": addresses[kind],
                "language": "en",
                "lists": ["weekly-digest"],
                "website": "",
            }
            started = time.perf_counter()
            r = site.http.post(
                f"{site.url}/subscribe", data=data, headers={"x-forwarded-for": f"10.0.{round_}.1"}
            )
            times[kind].append(time.perf_counter() - started)
            assert r.status_code == 200, (kind, r.text)
            answers[kind].append(r.content)
            heads.add(tuple(sorted((k, v) for k, v in r.headers.items() if k != "date")))
    bodies = {body for kind in KINDS for body in answers[kind]}
    assert len(bodies) == 1
    assert len(heads) == 1
    print({k: round(statistics.median(v) * 1000, 1) for k, v in times.items()})  # ms, in -s
    people = site.people()
    assert set(people["subscribed@example.org"].values()) == {"active"}  # no second one
    assert "pending" in people["unsubscribed@example.org"].values()  # waits for a fresh click


def test_fifty_posts_for_one_address_send_one_email(site: Signup, smtpd: SmtpServer) -> None:
    """50 posts (from 50 clients) for one address: one confirmation within confirm_resend_hours;
    one more only after it, and never for someone already subscribed."""
    add_person(site.factory, site.clock, "subscribed@example.org")
    for n in range(50):
        lists = ("weekly-digest",) if n % 2 else ("weekly-digest", "urgent-actions")
        assert site.post("victim@example.org", lists=lists, client=f"10.1.{n}.1").status_code == 200
        site.post("subscribed@example.org", client=f"10.2.{n}.1")
        if n % 10 == 0:
            site.mail_confirmations()
    site.mail_confirmations()
    assert [m["To"] for m in smtpd.messages()] == ["victim@example.org"]
    site.clock.advance(hours=25)
    site.post("victim@example.org", client="10.3.0.1")
    site.mail_confirmations()
    assert [m["To"] for m in smtpd.messages()] == ["victim@example.org"] * 2


def test_fifty_posts_from_one_client_are_throttled_in_the_database(
    site: Signup, factory: sessionmaker[Session], clock: FrozenClock
) -> None:
    """signups_per_hour (10) posts per client, then 429 with Retry-After; a second process on the
    same database agrees; another client is not affected."""
    codes = [site.post(f"p{n}@example.org", client="203.0.113.7").status_code for n in range(25)]
    with serve_public(site.settings, factory, clock) as (other, _):
        ticket = site.ticket()
        clock.advance(seconds=5)
        data = {
            "form_token": ticket,
            "pow": solve(ticket, BITS),
            "email": "z@example.org",
            "language": "en",
            "lists": ["weekly-digest"],
            "website": "",
        }
        elsewhere = site.http.post(
            f"{other}/subscribe", data=data, headers={"x-forwarded-for": "203.0.113.7"}
        )
    codes += [site.post(f"q{n}@example.org", client="203.0.113.7").status_code for n in range(24)]
    assert codes.count(200) == 10 and codes.count(429) == 39
    assert elsewhere.status_code == 429 and int(elsewhere.headers["retry-after"]) > 0
    assert site.post("x@example.org", client="198.51.100.1").status_code == 200
    assert len(site.people()) == 11
    # The same /64 is one client.
    v6 = [site.post(f"v{n}@example.org", client=f"2001:db8::{n}").status_code for n in range(12)]
    assert v6.count(429) == 2


def test_honeypot_too_fast_reused_and_forged_posts_subscribe_nobody(
    site: Signup, smtpd: SmtpServer
) -> None:
    """The bot layers: each refused post leaves no subscriber and sends nothing."""
    assert site.post("a@example.org", honeypot="http://spam.example").status_code == 200
    assert site.post("b@example.org", wait=0.5).status_code == 400  # too fast, with script
    assert site.post("c@example.org", solved=False, wait=4).status_code == 400  # no script: 8 s
    ticket = site.ticket()
    assert site.post("d@example.org", ticket=ticket, answer="12345x").status_code == 400
    forged = ticket[:-2] + ("AA" if not ticket.endswith("AA") else "BB")
    assert site.post("e@example.org", ticket=forged, answer=solve(forged, BITS)).status_code == 400
    fine = site.ticket()
    answer = solve(fine, BITS)
    assert site.post("f@example.org", ticket=fine, answer=answer).status_code == 200
    again = site.post("g@example.org", ticket=fine, answer=answer)
    assert again.status_code == 400 and "press the button again" in again.text
    assert site.post("h@example.org", solved=False, wait=9).status_code == 200  # no script, slow
    assert set(site.people()) == {"f@example.org", "h@example.org"}
    site.mail_confirmations()
    assert sorted(m["To"] for m in smtpd.messages()) == ["f@example.org", "h@example.org"]


@pytest.mark.parametrize(
    ("email", "ok", "stored"),
    [
        pytest.param("Reader@Example.ORG", True, "reader@example.org", id="normalised"),
        pytest.param("user@bücher.example", True, "user@xn--bcher-kva.example", id="idn"),
        pytest.param("a@example.org\r\nBcc: b@example.org", False, None, id="crlf"),
        pytest.param("a@example.org\n", False, None, id="trailing-lf"),
        pytest.param("a\x00@example.org", False, None, id="nul"),
        pytest.param("a@exa\u200bmple.org", False, None, id="zero-width"),
        pytest.param("not an address", False, None, id="syntax"),
        pytest.param("ünïcode@example.org", False, None, id="smtputf8"),
    ],
)
def test_addresses_are_checked_for_syntax_only(
    site: Signup, email: str, ok: bool, stored: str | None
) -> None:
    """email-validator without DNS; IDN as A-label; CR, LF and control characters refused."""
    answer = site.post(email)
    assert answer.status_code == (200 if ok else 400)
    assert list(site.people()) == ([stored] if stored else [])
    if not ok:
        assert "name@example.org" in answer.text


def test_origin_portal_form_and_cross_site(site: Signup) -> None:
    """The portal's plain form (no ticket) gets our form back, prefilled; other sites get 403."""
    portal = {"origin": "http://127.0.0.1:9"}
    data = {"email": "p@example.org", "language": "ru", "lists": ["urgent-actions"]}
    first = site.http.post(f"{site.url}/subscribe", data=data, headers=portal)
    assert first.status_code == 200 and 'value="p@example.org"' in first.text
    assert 'value="urgent-actions" checked' in first.text and 'lang="ru"' in first.text
    assert site.people() == {}
    evil = site.http.post(
        f"{site.url}/subscribe", data=data, headers={"origin": "https://x.example"}
    )
    assert evil.status_code == 403
    assert site.post("p@example.org", headers=portal, lang="ru").status_code == 200
    assert list(site.people()) == ["p@example.org"]


def test_each_layer_stops_its_bots(site: Signup, capsys: pytest.CaptureFixture[str]) -> None:
    """A mix of automated posts: which layer stopped how many (figures for the README)."""
    stopped: dict[str, int] = {}

    def tally(layer: str, response: httpx.Response) -> None:
        stopped[layer] = stopped.get(layer, 0) + 1

    for n in range(20):  # fills every field it finds
        tally("honeypot", site.post(f"hp{n}@example.org", honeypot="x", client=f"10.9.{n}.1"))
    for n in range(20):  # posts as soon as it has the page, and runs no script
        r = site.post(f"fast{n}@example.org", solved=False, wait=0, client=f"10.8.{n}.1")
        assert r.status_code == 400
        tally("fill time", r)
    ticket = site.ticket()
    answer = solve(ticket, BITS)
    for n in range(20):  # replays one solved form
        r = site.post(f"rp{n}@example.org", ticket=ticket, answer=answer, client=f"10.7.{n}.1")
        tally("single-use ticket" if n else "passed (first replay)", r)
    for n in range(20):  # guesses answers
        r = site.post(f"pw{n}@example.org", answer=str(n), client=f"10.6.{n}.1")
        tally("proof of work" if r.status_code == 400 else "passed (lucky guess)", r)
    for n in range(40):  # one client, solving everything honestly
        r = site.post(f"fl{n}@example.org", client="10.5.0.1")
        tally("client limit" if r.status_code == 429 else "passed (under the limit)", r)
    print(stopped)
    assert stopped["honeypot"] == 20 and stopped["fill time"] == 20
    assert stopped["single-use ticket"] == 19 and stopped["client limit"] == 30
    assert stopped["proof of work"] >= 18  # 1 in 256 guesses may pass 8 bits
    assert len(site.people()) == 1 + 10 + stopped.get("passed (lucky guess)", 0)


def test_purge_forgets_unconfirmed_signups_marks_and_tickets(
    site: Signup, factory: sessionmaker[Session], clock: FrozenClock
) -> None:
    """After the link's life, an unconfirmed web signup is erased; marks and tickets expire."""
    add_person(factory, clock, "stays@example.org")
    site.post("never@example.org")
    site.mail_confirmations()
    with unit_of_work(factory) as session:
        assert session.scalar(select(func.count()).select_from(ConfirmationMark)) == 1
        assert purge_signups(session, now=clock.now(), settings=site.settings) == 0
    clock.advance(hours=site.settings.web.confirm_link_max_age_hours + 25)
    with unit_of_work(factory) as session:
        assert purge_signups(session, now=clock.now(), settings=site.settings) == 1
    with unit_of_work(factory) as session:
        assert session.scalar(select(func.count()).select_from(ConfirmationMark)) == 0
        assert session.scalar(select(func.count()).select_from(UsedChallenge)) == 0
    assert list(site.people()) == ["stays@example.org"]


def test_newsletter_web_alone_mails_confirmations(
    factory: sessionmaker[Session], database_url: str, clock: FrozenClock, smtpd: SmtpServer
) -> None:
    """`newsletter web` without `newsletter run`: the confirmation still goes out, in its round."""
    lists_synced(factory)
    settings = signup_settings(database_url, smtpd)
    with (
        serve_public(settings, factory, clock, send_confirmations=True) as (url, settings),
        httpx.Client(timeout=30) as http,
    ):
        site = Signup(url, settings, factory, clock, http)
        assert site.post("alone@example.org").status_code == 200
        deadline = time.monotonic() + 10
        while not smtpd.messages() and time.monotonic() < deadline:
            time.sleep(0.05)
    assert [m["To"] for m in smtpd.messages()] == ["alone@example.org"]
