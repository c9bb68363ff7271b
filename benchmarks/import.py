"""Import a generated CSV of N made-up people into a fresh SQLite file and print rows per second.

    .venv/bin/python benchmarks/import.py [ROWS] [--url DATABASE_URL] [--chunk ROWS]

Run it twice on one database (--url) to see a re-import, which changes nothing.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import secrets
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.orm import Session

from newsletter.db import make_engine, make_sessionmaker, migrate, unit_of_work
from newsletter.importer import import_rows
from newsletter.lists import read_lists, sync_lists
from newsletter.subscriber_csv import CHUNK_ROWS, read_csv

ROOT = Path(__file__).resolve().parents[1]


def write_people(path: Path, rows: int) -> None:
    """A CSV of made-up people with every column import reads, and a custom one."""
    rng = random.Random(1)
    with path.open("w", encoding="utf-8", newline="") as handle:
        out = csv.writer(handle)
        out.writerow(["email", "name", "language", "lists", "tags", "country", "city"])
        for i in range(rows):
            out.writerow(
                [
                    f"person{i}@example.org",
                    f"Person {i}",
                    rng.choice(["en", "be", "ru"]),
                    rng.choice(["weekly-digest", "urgent-actions", "weekly-digest;urgent-actions"]),
                    rng.choice(["", "press", "volunteer;press"]),
                    rng.choice(["LT", "PL", "DE", "BY"]),
                    rng.choice(["Vilnius", "Warsaw", ""]),
                ]
            )


def backend_cpu(session: Session) -> float | None:
    """CPU seconds the PostgreSQL process serving this session has used so far, when the
    server runs on this machine (its /proc entry is readable); else None."""
    if session.get_bind().dialect.name != "postgresql":
        return None
    pid = session.scalar(text("SELECT pg_backend_pid()"))
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def main() -> None:
    """Generate, import, and print the figure."""
    parser = argparse.ArgumentParser()
    parser.add_argument("rows", nargs="?", type=int, default=100_000)
    parser.add_argument("--url", default="")
    parser.add_argument("--chunk", type=int, default=CHUNK_ROWS, help="rows per written chunk")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="newsletter-import-"))
    url = args.url or f"sqlite:///{folder / 'bench.db'}"
    engine = make_engine(url)
    migrate(engine)
    factory = make_sessionmaker(engine)
    with unit_of_work(factory) as session:
        sync_lists(session=session, specs=read_lists(ROOT / "subscribers" / "lists.toml"))
    path = folder / "people.csv"
    write_people(path, args.rows)
    started, cpu = time.perf_counter(), time.process_time()
    with unit_of_work(factory) as session:
        db_cpu = backend_cpu(session)
        report = import_rows(
            session=session,
            rows=read_csv(path),
            default_list=None,
            confirmed=True,
            secret=secrets.token_urlsafe(32),
            now=datetime.now(UTC),
            actor="benchmark",
            chunk_rows=args.chunk,
        )
        if db_cpu is not None:
            db_cpu = (backend_cpu(session) or 0.0) - db_cpu
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    backend = url.split(":")[0]
    print(
        f"{args.rows} rows in {seconds:.1f} s = {args.rows / seconds:,.0f} rows/s ({backend});"
        f" this process's CPU {cpu:.1f} s"
        + (f", the database's {db_cpu:.1f} s" if db_cpu is not None else "")
        + " (the rest is waiting: the commit's disk writes, or a busy machine)"
    )
    print(report.counts())


if __name__ == "__main__":
    main()
