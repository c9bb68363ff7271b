"""How long ingesting a long feed takes the first time and each time after, unchanged.

    .venv/bin/python benchmarks/ingest_again.py [--items 70000] [--runs 3] [--database URL]

A file source of `--items` tiny RSS items is ingested `--runs` times, an hour apart on a frozen
clock, into a new SQLite database (or the PostgreSQL server given, whose `sources` and `items`
must be empty). Compare two checkouts by running this script with PYTHONPATH set to each.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy.orm import sessionmaker

from newsletter.clock import FrozenClock
from newsletter.config import SourcesSettings
from newsletter.db import make_engine, migrate
from newsletter.ingest import ingest_all


def main() -> None:
    """Write the feed, ingest it --runs times and print each run's wall and CPU time."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=70_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--database", help="SQLAlchemy URL (default: a new SQLite file)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="ingest-again-"))
    feed = folder / "feed.xml"
    items = "".join(f"<item><guid>{i}</guid><title>t</title></item>" for i in range(args.items))
    feed.write_text(
        '<?xml version="1.0" encoding="utf-8"?><rss version="2.0"><channel><title>x</title>'
        f"{items}</channel></rss>",
        encoding="utf-8",
    )
    engine = make_engine(args.database or f"sqlite:///{folder}/db.sqlite")
    migrate(engine)
    factory = sessionmaker(bind=engine)
    settings = SourcesSettings(max_bytes=feed.stat().st_size + 1)
    start = datetime(2026, 12, 7, tzinfo=UTC)
    print(f"feed: {args.items:,} items, {feed.stat().st_size:,} bytes; database {engine.url!r}")
    for run in range(args.runs):
        clock = FrozenClock(start + timedelta(hours=run))
        wall, cpu = time.perf_counter(), time.process_time()
        [report] = ingest_all(
            factory=factory, sources=[(str(feed), "long", "en")], settings=settings, clock=clock
        )
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        print(
            f"run {run + 1}: {wall:.2f} s, {cpu:.2f} s of CPU; new {report.new:,}, unchanged"
            f" {report.unchanged:,}, not modified {report.not_modified}, error {report.error}"
        )
    engine.dispose()


if __name__ == "__main__":
    main()
