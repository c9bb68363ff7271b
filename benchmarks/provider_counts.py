"""What the console's dashboard and /metrics pay for today's messages by provider.

    .venv/bin/python benchmarks/provider_counts.py [--n 100000] [--database URL]

Seeds N readers across seven domains (Gmail, Outlook, Yahoo and four others) and one message
sent today to each, then times metrics.provider_counts against its floor: a bare count of the
same messages with the same join (the rows must be read either way). Prints both and the
ratio; asserts nothing about time. Without --database, a fresh SQLite file; a PostgreSQL URL
is used as given (its tables are created in the database the URL names, so use a scratch one).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from newsletter.db import make_engine, make_sessionmaker, migrate, unit_of_work
from newsletter.db.models import Campaign, Delivery, MailingList, Subscriber
from newsletter.metrics import day_start, provider_counts

DOMAINS = (
    "gmail.com",
    "hotmail.co.uk",
    "yahoo.com",
    "example.org",
    "mail.ru",
    "tut.by",
    "proton.me",
)


def seed(url: str, n: int, now: datetime) -> Callable[[], Session]:
    """A migrated database with n readers, each sent one message today."""
    engine = make_engine(url)
    migrate(engine)
    factory = make_sessionmaker(engine)
    with unit_of_work(factory) as session:
        ml = MailingList(slug="w", name="W", kind="digest", list_id="w.example.org")
        session.add(ml)
        session.flush()
        campaign = Campaign(
            kind="digest", list_id=ml.id, dedupe_key="bench", created_at=now, status="finished"
        )
        session.add(campaign)
        session.flush()
        readers = [{"email": f"p{i}@{DOMAINS[i % 7]}", "created_at": now} for i in range(n)]
        session.execute(insert(Subscriber), readers)
        ids = list(session.scalars(select(Subscriber.id)))
        sent = {"status": "sent", "next_attempt_at": now, "created_at": now, "sent_at": now}
        rows = [{"campaign_id": campaign.id, "subscriber_id": i} | sent for i in ids]
        session.execute(insert(Delivery), rows)
    return factory


def floor(session: Session, *, since: datetime) -> int:
    """The same messages, counted without naming providers."""
    stmt = (
        select(func.count())
        .select_from(Delivery)
        .join(Subscriber, Subscriber.id == Delivery.subscriber_id)
        .where(Delivery.sent_at >= since)
    )
    return int(session.scalar(stmt) or 0)


def median_ms(factory: Callable[[], Session], action: Callable[[Session], object]) -> float:
    """Median wall time of five runs, each in its own session."""
    samples = []
    for _ in range(5):
        with unit_of_work(factory) as session:  # type: ignore[arg-type]
            started = time.perf_counter()
            action(session)
            samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def main() -> None:
    """Seed, time, print."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--database", default="")
    args = parser.parse_args()
    url = args.database or f"sqlite:///{tempfile.mkdtemp(prefix='provider-counts-')}/p.db"
    now = datetime.now(UTC)
    since = day_start(now)
    factory = seed(url, args.n, now)
    with unit_of_work(factory) as session:
        print(f"{args.n:,} messages sent today: {provider_counts(session, since=since)}")
    ours = median_ms(factory, lambda s: provider_counts(s, since=since))
    bare = median_ms(factory, lambda s: floor(s, since=since))
    print(f"provider_counts: {ours:.0f} ms; a bare count of the same rows: {bare:.0f} ms; "
          f"ratio {ours / bare:.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
