"""Through a real browser: the unsubscribe link of a received campaign email, end to end."""

from __future__ import annotations

import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from email.message import EmailMessage
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from newsletter.assemble import assemble_alert
from newsletter.clock import FrozenClock
from newsletter.config import Settings
from newsletter.db import unit_of_work
from newsletter.db.models import Delivery, DeliveryStatus, Subscriber, Subscription
from newsletter.enqueue import launch_campaign
from newsletter.lists import get_list
from tests.conftest import SmtpServer, make_settings
from tests.test_flow import deliver, prepare
from tests.webserver import serve_pages

READER = "dzmitry.uzor@example.org"  # on urgent-actions, reads in Belarusian


@pytest.fixture
def served(
    factory: sessionmaker[Session], smtpd: SmtpServer, clock: FrozenClock, database_url: str
) -> Iterator[tuple[str, Settings]]:
    """The example audience and sample feed, and the pages on a free loopback port."""
    prepare(factory, clock)
    with serve_pages(make_settings(database_url, smtpd), factory, clock) as served:
        yield served


def send_alert(
    factory: sessionmaker[Session], settings: Settings, clock: FrozenClock, title: str
) -> int:
    with unit_of_work(factory) as session:
        campaign, _ = assemble_alert(
            session=session,
            list_slug="urgent-actions",
            now=clock.now(),
            actor="test",
            title=title,
            body_html="<p>Write to the prison today.</p>",
        )
        launch_campaign(
            session=session, campaign=campaign, settings=settings, now=clock.now(), actor="test"
        )
        cid = campaign.id
    # Playwright's sync API keeps an event loop in this thread; the sender needs its own.
    with ThreadPoolExecutor(1) as pool:
        pool.submit(deliver, factory, settings, clock).result()
    return cid


def received_by(smtpd: SmtpServer, address: str) -> list[EmailMessage]:
    return [m for m in smtpd.messages() if str(m["X-Delivered-To"]) == address]


def unsubscribe_links(msg: EmailMessage) -> tuple[str, str]:
    """(the link in the text part, the https URL in List-Unsubscribe)."""
    text = msg.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    header = re.search(r"<(http[^>]+)>", str(msg["List-Unsubscribe"]))
    body = re.search(r"(http://\S+/u/\S+)", text)
    assert header and body
    return body.group(1), header.group(1)


def subscription_status(factory: sessionmaker[Session], email: str) -> set[str]:
    """The reader's status on urgent-actions, the list the alerts go to."""
    with unit_of_work(factory) as session:
        sid = session.scalar(select(Subscriber.id).where(Subscriber.email == email))
        alerts = get_list(session, "urgent-actions").id
        return set(
            session.scalars(
                select(Subscription.status).where(
                    Subscription.subscriber_id == sid, Subscription.list_id == alerts
                )
            )
        )


def test_clicking_unsubscribe_in_a_browser_stops_the_next_campaign(
    browser: Any,
    served: tuple[str, Settings],
    factory: sessionmaker[Session],
    smtpd: SmtpServer,
    clock: FrozenClock,
) -> None:
    """Open the received link in chromium, press the button: the next campaign skips that reader."""
    url, settings = served
    send_alert(factory, settings, clock, "First alert")
    [first] = received_by(smtpd, READER)
    link, header_link = unsubscribe_links(first)
    assert link == header_link and link.startswith(url)
    page = browser.new_page()
    page.goto(link)
    assert page.locator("html").get_attribute("lang") == "be"
    assert "Тэрміновыя акцыі" in page.locator("main").inner_text()
    assert subscription_status(factory, READER) == {"active"}  # opening the page changed nothing
    page.get_by_role("button").click()
    page.wait_for_selector("[role=status]")
    assert "Тэрміновыя акцыі" in page.locator("[role=status]").inner_text()
    page.close()
    assert subscription_status(factory, READER) == {"unsubscribed"}
    clock.advance(minutes=5)
    second = send_alert(factory, settings, clock, "Second alert")
    assert len(received_by(smtpd, READER)) == 1
    with unit_of_work(factory) as session:
        queued = session.scalars(
            select(Delivery.status)
            .join(Subscriber, Subscriber.id == Delivery.subscriber_id)
            .where(Delivery.campaign_id == second, Subscriber.email == READER)
        ).all()
    assert queued == []  # not even queued: they left before the campaign was made
    assert len(smtpd.messages()) > 2  # the others still got it


def test_one_click_post_exactly_as_a_mail_client_sends_it(
    served: tuple[str, Settings],
    factory: sessionmaker[Session],
    smtpd: SmtpServer,
    clock: FrozenClock,
) -> None:
    """The List-Unsubscribe URL POSTed with List-Unsubscribe=One-Click, no cookie, unsubscribes."""
    _url, settings = served
    send_alert(factory, settings, clock, "First alert")
    [msg] = received_by(smtpd, READER)
    _, target = unsubscribe_links(msg)
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    reply = httpx.post(
        target,
        content=msg["List-Unsubscribe-Post"].encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert reply.status_code == 200
    assert subscription_status(factory, READER) == {"unsubscribed"}


def test_in_flight_campaign_honours_an_unsubscribe_made_after_enqueue(
    served: tuple[str, Settings],
    factory: sessionmaker[Session],
    smtpd: SmtpServer,
    clock: FrozenClock,
) -> None:
    """A reader who leaves after a campaign was queued is skipped when the sender claims the row."""
    _url, settings = served
    send_alert(factory, settings, clock, "First alert")
    [msg] = received_by(smtpd, READER)
    _, target = unsubscribe_links(msg)
    with unit_of_work(factory) as session:
        campaign, _ = assemble_alert(
            session=session,
            list_slug="urgent-actions",
            now=clock.now(),
            actor="test",
            title="Queued alert",
            body_html="<p>Now.</p>",
        )
        launch_campaign(
            session=session, campaign=campaign, settings=settings, now=clock.now(), actor="t"
        )
        cid = campaign.id
    httpx.post(target, data={"List-Unsubscribe": "One-Click"})
    with ThreadPoolExecutor(1) as pool:
        pool.submit(deliver, factory, settings, clock).result()
    assert len(received_by(smtpd, READER)) == 1
    with unit_of_work(factory) as session:
        status = session.scalar(
            select(Delivery.status)
            .join(Subscriber, Subscriber.id == Delivery.subscriber_id)
            .where(Delivery.campaign_id == cid, Subscriber.email == READER)
        )
    assert status == DeliveryStatus.SUPPRESSED


def test_forged_token_in_the_browser_shows_a_page_that_names_no_one(
    browser: Any,
    served: tuple[str, Settings],
    factory: sessionmaker[Session],
    clock: FrozenClock,
    smtpd: SmtpServer,
) -> None:
    """A tampered link shows the 400 page, with no name, address or list, and no button."""
    _url, settings = served
    send_alert(factory, settings, clock, "First alert")
    link, _ = unsubscribe_links(received_by(smtpd, READER)[0])
    page = browser.new_page()
    response = page.goto(link[:-3] + "abc")
    assert response.status == 400
    text = page.locator("body").inner_text()
    assert "This link does not work" in text
    assert "Urgent" not in text and "dzmitry" not in text.lower()
    assert page.get_by_role("button").count() == 0
    page.close()
    assert subscription_status(factory, READER) == {"active"}
