"""Test sends: marked [TEST], inert personal links, no delivery, at most five clean addresses."""

from __future__ import annotations

import asyncio
import re

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from newsletter.clock import FrozenClock
from newsletter.config import Settings
from newsletter.db import unit_of_work
from newsletter.db.models import Delivery, Event
from newsletter.errors import CampaignError
from newsletter.smtp import SmtpPool
from newsletter.test_send import MAX_TEST_ADDRESSES, clean_addresses, inert_url, send_test
from newsletter.tokens import PAGE_PATHS, make_token
from tests.conftest import SmtpServer, make_settings
from tests.test_approvals import AUTHOR, drafted, seed_people

TOKEN_PATH = re.compile(r"/(?:u|unsubscribe|preferences|p)/[A-Za-z0-9_.-]{20,}")


@pytest.fixture
def settings(database_url: str, smtpd: SmtpServer) -> Settings:
    return make_settings(database_url, smtpd)


def run_test_send(
    factory: sessionmaker[Session],
    settings: Settings,
    clock: FrozenClock,
    cid: int,
    addresses: list[str],
    lang: str | None = None,
) -> list[tuple[str, str]]:
    async def run() -> list[tuple[str, str]]:
        pool = SmtpPool(settings.smtp)
        try:
            return await send_test(
                factory=factory, settings=settings, campaign_id=cid, addresses=addresses,
                actor=AUTHOR.email, now=clock.now(), transport=pool, lang=lang,
            )  # fmt: skip
        finally:
            await pool.close()

    return asyncio.run(run())


def test_a_test_arrives_marked_with_no_working_token_and_no_delivery(
    factory: sessionmaker[Session], settings: Settings, clock: FrozenClock, smtpd: SmtpServer
) -> None:
    seed_people(factory, clock, 2)
    cid = drafted(factory, settings, clock)
    outcomes = run_test_send(
        factory, settings, clock, cid, [AUTHOR.email, "Coach@Staff.example.org", AUTHOR.email]
    )
    assert outcomes == [(AUTHOR.email, "sent"), ("Coach@staff.example.org", "sent")]
    messages = smtpd.messages()
    assert len(messages) == 2
    base = settings.web.base_url
    for msg in messages:
        assert str(msg["Subject"]).startswith("[TEST] Urgent action: Write to the prisoner")
        assert msg["List-Unsubscribe"] is None
        html = msg.get_body(("html",)).get_content()  # type: ignore[union-attr]
        text = msg.get_body(("plain",)).get_content()  # type: ignore[union-attr]
        assert "Please <strong>write</strong> a letter." in html
        for body in (html, text):
            assert inert_url(settings, cid) in body
            # No link to a supporter's own pages (only the public web copy may be linked).
            for path in PAGE_PATHS.values():
                assert f"{base}{path}" not in body
            assert "%%" not in body
    with unit_of_work(factory) as session:
        assert session.scalar(select(func.count()).select_from(Delivery)) == 0
        event = session.scalars(select(Event).where(Event.action == "alert.test_sent")).one()
        assert event.detail == {
            "campaign": cid,
            "lang": "en",
            "addresses": 2,
            "to": [AUTHOR.email, "Coach@staff.example.org"],  # where the unapproved text went
            "sent": 2,
        }
        assert event.actor == AUTHOR.email


def test_a_test_in_another_language(
    factory: sessionmaker[Session], settings: Settings, clock: FrozenClock, smtpd: SmtpServer
) -> None:
    seed_people(factory, clock, 1)
    cid = drafted(factory, settings, clock)
    run_test_send(factory, settings, clock, cid, [AUTHOR.email], lang="ru")
    (msg,) = smtpd.messages()
    assert str(msg["Subject"]).startswith("[TEST] Срочн")


def test_no_real_token_even_for_a_real_subscriber_shape(settings: Settings) -> None:
    # What a real link would carry; the inert link has nothing like it.
    token = make_token(secret="s" * 32, purpose="unsubscribe", subscriber_id=1, list_id=1)
    assert token not in inert_url(settings, 1)
    assert not TOKEN_PATH.search(inert_url(settings, 1))


@pytest.mark.parametrize(
    ("addresses", "message"),
    [
        ([], "at least one"),
        (["a@example.org\r\nBcc: x@example.org"], "line breaks"),
        (["not an address"], "not an email address"),
        ([f"p{i}@example.org" for i in range(MAX_TEST_ADDRESSES + 1)], "at most 5"),
    ],
)
def test_bad_address_lists_are_refused_in_one_line(addresses: list[str], message: str) -> None:
    with pytest.raises(CampaignError, match=message) as info:
        clean_addresses(addresses)
    assert "\n" not in str(info.value)


def test_five_addresses_with_repeats_are_fine() -> None:
    many = [f"p{i}@example.org" for i in range(MAX_TEST_ADDRESSES)] + ["P0@example.org", " "]
    assert len(clean_addresses(many)) == MAX_TEST_ADDRESSES


def test_a_refused_list_sends_nothing(
    factory: sessionmaker[Session], settings: Settings, clock: FrozenClock, smtpd: SmtpServer
) -> None:
    seed_people(factory, clock, 1)
    cid = drafted(factory, settings, clock)
    with pytest.raises(CampaignError):
        run_test_send(factory, settings, clock, cid, ["ok@example.org", "bad\n@example.org"])
    assert smtpd.messages() == []
