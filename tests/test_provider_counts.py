"""Messages sent today by the recipients' provider, in `status --json` and /metrics, and the
bulk-sender warning (5,000 a day to Gmail or Outlook) while `newsletter doctor` does not pass."""

from __future__ import annotations

import json
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import insert, select
from sqlalchemy.orm import Session, sessionmaker

from newsletter.audit import record_event
from newsletter.clock import FrozenClock
from newsletter.db import unit_of_work
from newsletter.db.models import Campaign, Delivery, MailingList, Subscriber
from newsletter.devsmtp import free_port
from newsletter.metrics import BULK_SENDER_DAILY, provider_of, render_metrics
from newsletter.status import service_status
from tests.conftest import make_settings
from tests.sender_cli import NewsletterCli
from tests.test_console_i18n import render_console
from tests.test_web_hardening import METRICS_TOKEN, serve, service_app, tight

# address -> provider; every one gets a message today
ADDRESSES = {
    "a@gmail.com": "gmail",
    "B@GoogleMail.com": "gmail",
    "c@outlook.com": "outlook",
    "d@hotmail.co.uk": "outlook",
    "e@live.fr": "outlook",
    "f@msn.com": "outlook",
    "g@yahoo.co.jp": "yahoo",
    "h@ymail.com": "yahoo",
    "i@aol.com": "yahoo",
    "j@example.org": "others",
    "k@notgmail.com": "others",
    "l@gmail.com.example.net": "others",
    "m@mail.yahoo.example": "others",
    # the registrable domain decides: a provider's name, then exactly a known public suffix
    "n@live.example.org": "others",
    "o@yahoo.evil.example": "others",
    "p@gmail.co.uk": "others",
    "q@outlook.fr": "outlook",
    "R@OUTLOOK.DE": "outlook",
    "s@windowslive.com": "outlook",
    "t@aol.co.uk": "yahoo",
    "u@yahoo.co.uk": "yahoo",
    "v@rocketmail.com": "yahoo",
}
TODAY = {"gmail": 2, "outlook": 7, "yahoo": 6, "others": 7}


@pytest.mark.parametrize(("address", "provider"), ADDRESSES.items())
def test_provider_of_an_address(address: str, provider: str) -> None:
    """The domain decides: gmail, outlook, yahoo (their families), the rest is others."""
    assert provider_of(address) == provider


def seed(factory: sessionmaker[Session], now: datetime, *, gmail_bulk: int = 0) -> None:
    """A campaign sent today to ADDRESSES (and gmail_bulk more Gmail readers); a message sent
    two days ago and one still queued, which do not count."""
    with unit_of_work(factory) as session:
        ml = MailingList(slug="weekly", name="Weekly", kind="digest", list_id="weekly.example.org")
        session.add(ml)
        session.flush()
        campaign = Campaign(
            kind="digest", list_id=ml.id, dedupe_key="t", created_at=now, status="finished"
        )
        session.add(campaign)
        session.flush()
        emails = [*ADDRESSES, *(f"bulk{i}@gmail.com" for i in range(gmail_bulk))]
        session.execute(insert(Subscriber), [{"email": e, "created_at": now} for e in emails])
        ids = {e: i for e, i in session.execute(select(Subscriber.email, Subscriber.id))}
        rows = [
            {"campaign_id": campaign.id, "subscriber_id": ids[e], "status": "sent"}
            | {"next_attempt_at": now, "created_at": now, "sent_at": now}
            for e in emails
        ]
        old = Campaign(kind="digest", list_id=ml.id, dedupe_key="old", created_at=now)
        session.add(old)
        session.flush()
        rows += [
            {"campaign_id": old.id, "subscriber_id": ids["a@gmail.com"], "status": "sent"}
            | {"next_attempt_at": now, "created_at": now, "sent_at": now - timedelta(days=2)},
            {"campaign_id": old.id, "subscriber_id": ids["c@outlook.com"], "status": "queued"}
            | {"next_attempt_at": now, "created_at": now, "sent_at": None},
        ]
        session.execute(insert(Delivery), rows)


def doctor(factory: sessionmaker[Session], now: datetime, *, passed: bool) -> None:
    """The audit event `newsletter doctor` records after a run."""
    with unit_of_work(factory) as session:
        record_event(session, now=now, actor="doctor", action="doctor.checked", passed=passed)


def dashboard(factory: sessionmaker[Session], database_url: str, now: datetime) -> str:
    """The console's dashboard in Belarusian, its service part as the console builds it."""
    settings = make_settings(database_url)
    with unit_of_work(factory) as session:
        status = service_status(session, settings=settings, now=now)
    return render_console("be", "dashboard", service=status, sending=[], held=[], finished=[])


def test_status_json_counts_todays_messages_by_provider(
    tmp_path: Path, factory: sessionmaker[Session], database_url: str
) -> None:
    """`status --json`: today's (UTC) messages by provider, no warning under the threshold."""
    seed(factory, datetime.now(UTC))
    cli = NewsletterCli(tmp_path, f"[database]\nurl = '{database_url}'\n")
    day = json.loads(cli.run("status", "--json"))["providers_today"]
    assert day["sent"] == TODAY
    assert day["doctor_passed"] is None and day["bulk_sender_warning"] == []
    assert day["day_start"].endswith("T00:00:00+00:00")
    text = cli.run("status")
    assert all(p in text for p in TODAY) and "warning" not in text


def test_past_the_bulk_threshold_warns_until_doctor_passes(
    tmp_path: Path, factory: sessionmaker[Session], database_url: str
) -> None:
    """5,000 to Gmail today: a warning while doctor never ran or failed, none once it passed."""
    now = datetime.now(UTC)
    seed(factory, now, gmail_bulk=BULK_SENDER_DAILY)
    cli = NewsletterCli(tmp_path, f"[database]\nurl = '{database_url}'\n")

    def warning() -> list[str]:
        return list(
            json.loads(cli.run("status", "--json"))["providers_today"]["bulk_sender_warning"]
        )

    assert warning() == ["gmail"]
    assert "Сёння больш за 5000 лістоў у Gmail" in dashboard(factory, database_url, now)
    assert "warning: over 5000 messages today to gmail" in " ".join(cli.run("status").split())
    doctor(factory, now, passed=False)
    assert warning() == ["gmail"]
    doctor(factory, now + timedelta(seconds=1), passed=True)
    assert warning() == []
    page = dashboard(factory, database_url, now)
    assert "bulk-sender-warning" not in page and "<td>5002</td>" in page
    doctor(factory, now + timedelta(seconds=2), passed=False)  # the latest run decides
    assert warning() == ["gmail"]


def test_metrics_show_todays_messages_by_provider(
    database_url: str, factory: sessionmaker[Session]
) -> None:
    """/metrics (the real service app on loopback): one gauge per provider, and the warning."""
    now = datetime.now(UTC)
    seed(factory, now)
    port = free_port()
    settings = tight(make_settings(database_url), f"http://127.0.0.1:{port}")
    app = service_app(settings, factory, FrozenClock(now))
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}
    )
    with serve(app, settings, port), urllib.request.urlopen(request, timeout=10) as response:
        text = response.read().decode()
    for provider, n in TODAY.items():
        assert f'newsletter_sent_today{{provider="{provider}"}} {n}\n' in text
    assert "newsletter_bulk_sender_warning 0\n" in text
    with unit_of_work(factory) as session:  # tomorrow, nothing sent yet
        later = render_metrics(session, scheduler_active=False, now=now + timedelta(days=1))
    assert 'newsletter_sent_today{provider="gmail"} 0\n' in later
