"""Send a real digest campaign to N subscribers through a local SMTP sink and print figures.

    .venv/bin/python benchmarks/send.py [--n 100000] [--sink postfix|aiosmtpd]
        [--database URL] [--workers 1,2] [--pool-size 4] [--batch-size 500]

Prints messages per second end to end (enqueue to last accept), render time per variant, peak
memory, and the sink's own ceiling for the same message bytes measured in the same run with a
minimal client (Postfix smtp-source, or one reused smtplib connection for aiosmtpd), before and
after the sends; the ratio is against their mean.

Without --workers the sender runs in this process (SQLite file by default). With --workers 1,2
each count gets a fresh database, and `newsletter send --workers N` runs as a real command; a
PostgreSQL --database URL names the server: the benchmark creates a database of its own there
and drops it afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECRET = "b" * 40
NEWSLETTER = [sys.executable, "-m", "newsletter"]
sys.path.insert(0, str(ROOT))

from sqlalchemy import create_engine, insert, make_url, select, text  # noqa: E402

from newsletter.clock import SystemClock  # noqa: E402
from newsletter.config import load_settings  # noqa: E402
from newsletter.db import make_engine, make_sessionmaker, migrate, unit_of_work  # noqa: E402
from newsletter.db.models import (  # noqa: E402
    Campaign,
    Delivery,
    Item,
    MailingList,
    Source,
    Subscriber,
    Subscription,
)
from newsletter.devsmtp import free_port  # noqa: E402
from newsletter.enqueue import launch_campaign  # noqa: E402
from newsletter.variants import render_campaign, store_variants  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sinks import start_sink, stop_sink  # noqa: E402

from newsletter.send import deliver_queued  # noqa: E402
from newsletter.smtp import SmtpPool  # noqa: E402


def seed(factory, n: int) -> int:  # type: ignore[no-untyped-def]
    """n subscribers in three languages, ten items, one digest campaign (not yet started)."""
    now = datetime.now(UTC)
    with unit_of_work(factory) as s:
        ml = MailingList(
            slug="weekly-digest", name="Weekly", kind="digest", list_id="weekly.example.org"
        )
        src = Source(url="bench", name="bench")
        s.add_all([ml, src])
        s.flush()
        for chunk in range(0, n, 10000):
            s.execute(
                insert(Subscriber),
                [
                    {
                        "email": f"p{i}@example.net",
                        "name": f"Person {i}",
                        "language": "enbe ru"[i % 3 * 2 : i % 3 * 2 + 2].strip() or "ru",
                        "created_at": now,
                    }
                    for i in range(chunk, min(n, chunk + 10000))
                ],
            )
        ids = s.scalars(select(Subscriber.id)).all()
        for chunk in range(0, len(ids), 10000):
            s.execute(
                insert(Subscription),
                [
                    {"subscriber_id": sid, "list_id": ml.id, "status": "active", "created_at": now}
                    for sid in ids[chunk : chunk + 10000]
                ],
            )
        items = [
            Item(
                source_id=src.id,
                guid=f"g{i}",
                link=f"https://portal.example.org/{i}",
                title=f"Item {i}: Viasna news about human rights defenders",
                summary_html="<p>" + "Summary of the news item. " * 20 + "</p>",
                published_at=now,
                categories=["news"],
                content_hash=str(i),
                ingested_at=now,
                updated_at=now,
            )
            for i in range(10)
        ]
        s.add_all(items)
        c = Campaign(kind="digest", list_id=ml.id, dedupe_key="bench", created_at=now, items=items)
        s.add(c)
        s.flush()
        return c.id


def ceiling(kind: str, port: int, message: bytes, count: int) -> float:
    """The sink's own rate for these message bytes with a minimal client."""
    if kind == "postfix":
        with tempfile.NamedTemporaryFile(suffix=".eml") as f:
            f.write(message)
            f.flush()
            t = time.perf_counter()
            subprocess.run(
                [
                    "/usr/sbin/smtp-source",
                    "-s",
                    "4",
                    "-m",
                    str(count),
                    "-F",
                    f.name,
                    f"127.0.0.1:{port}",
                ],
                check=True,
            )
            return count / (time.perf_counter() - t)
    import smtplib

    conn = smtplib.SMTP("127.0.0.1", port)
    t = time.perf_counter()
    for _ in range(count):
        conn.sendmail("a@example.org", ["b@example.net"], message)
    rate = count / (time.perf_counter() - t)
    conn.quit()
    return rate


def sample_message(factory, settings, cid: int) -> bytes:  # type: ignore[no-untyped-def]
    """One recipient's message bytes, built as the sender builds them (nothing is claimed)."""
    from newsletter.send import TemplateCache, prepare_jobs

    with unit_of_work(factory) as s:
        first = s.scalar(select(Delivery.id).where(Delivery.campaign_id == cid).limit(1))
        jobs, _ = prepare_jobs(
            s,
            [first],
            settings=settings,
            templates=TemplateCache(settings),
            signer=None,
            now=datetime.now(UTC),
        )
    return jobs[0].message


def start_sending(factory, settings, cid: int) -> float:  # type: ignore[no-untyped-def]
    """Render the campaign once per language, check and enqueue it; returns ms per variant."""
    with unit_of_work(factory) as s:
        campaign = s.get(Campaign, cid)
        r = time.perf_counter()
        variants = render_campaign(campaign, settings=settings)
        render_ms = (time.perf_counter() - r) * 1000 / len(variants)
        store_variants(s, campaign, variants)
        launch_campaign(
            session=s, campaign=campaign, settings=settings, now=datetime.now(UTC), actor="bench"
        )
    return render_ms


def send_in_process(factory, settings, n: int) -> None:  # type: ignore[no-untyped-def]
    async def run() -> None:
        pool = SmtpPool(settings.smtp)
        try:
            report = await deliver_queued(
                factory=factory, settings=settings, transport=pool, clock=SystemClock()
            )
            assert report.sent == n, report
        finally:
            await pool.close()

    asyncio.run(run())


def send_with_workers(work: Path, settings, workers: int, n: int) -> None:  # type: ignore[no-untyped-def]
    """`newsletter send --workers N` as the operator would run it."""
    smtp = settings.smtp
    config = work / f"config-{workers}.toml"
    config.write_text(
        f"[database]\nurl = '{settings.database.url}'\n"
        f"[smtp]\nhost = '{smtp.host}'\nport = {smtp.port}\npool_size = {smtp.pool_size}\n"
        f"batch_size = {smtp.batch_size}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    env["NEWSLETTER_SECRET"] = SECRET
    done = subprocess.run(
        [*NEWSLETTER, "--config", str(config), "send", "--workers", str(workers)],
        cwd=work,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0 or f"sent {n}," not in done.stdout:
        raise SystemExit(f"newsletter send failed: {done.stdout}{done.stderr}")


class Database:
    """A fresh database per run: a SQLite file, or a database of its own on a PostgreSQL server."""

    def __init__(self, url: str | None, work: Path) -> None:
        self.server, self.work, self.made = url, work, []

    def fresh(self, tag: str) -> str:
        if not self.server or self.server.startswith("sqlite"):
            return f"sqlite:///{self.work / f'bench-{tag}.db'}"
        name = f"nl_bench_{os.getpid()}_{tag}"
        with self._admin() as conn:
            conn.execute(text(f'create database "{name}"'))
        self.made.append(name)
        return str(make_url(self.server).set(database=name).render_as_string(hide_password=False))

    def drop_all(self) -> None:
        for name in self.made:
            with self._admin() as conn:
                conn.execute(text(f'drop database if exists "{name}" with (force)'))

    @contextlib.contextmanager
    def _admin(self):  # type: ignore[no-untyped-def]
        engine = create_engine(self.server, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                yield conn
        finally:
            engine.dispose()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument(
        "--sink",
        choices=["postfix", "aiosmtpd"],
        default="postfix"
        if shutil.which("smtp-sink") or Path("/usr/sbin/smtp-sink").exists()
        else "aiosmtpd",
    )
    ap.add_argument("--database", help="SQLAlchemy URL (PostgreSQL: the server to use)")
    ap.add_argument("--workers", help="comma-separated worker counts, e.g. 1,2")
    ap.add_argument("--pool-size", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=500)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="nl-bench-"))
    port = free_port()
    sink = start_sink(args.sink, port)
    time.sleep(0.5)
    databases = Database(args.database, work)
    counts = [int(w) for w in args.workers.split(",")] if args.workers else [0]
    results, message, render_ms = [], b"", 0.0
    try:
        for workers in counts:
            url = databases.fresh(f"w{workers}")
            settings = load_settings(
                None, {"NEWSLETTER_SECRET": SECRET, "NEWSLETTER_DATABASE_URL": url}
            )
            smtp = replace(
                settings.smtp,
                host="127.0.0.1",
                port=port,
                batch_size=args.batch_size,
                pool_size=args.pool_size,
            )
            settings = replace(settings, smtp=smtp)
            engine = make_engine(url)
            migrate(engine)
            factory = make_sessionmaker(engine)
            cid = seed(factory, args.n)
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            t0 = time.perf_counter()
            render_ms = start_sending(factory, settings, cid)
            queued = time.perf_counter() - t0
            if not message:  # the ceiling is measured outside the timed stretches
                message = sample_message(factory, settings, cid)
                top_before = ceiling(args.sink, port, message, min(args.n, 20000))
            t0 = time.perf_counter() - queued
            if workers:
                send_with_workers(work, settings, workers, args.n)
                peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
            else:
                send_in_process(factory, settings, args.n)
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            elapsed = time.perf_counter() - t0
            engine.dispose()
            results.append((workers, args.n / elapsed, elapsed, peak, before))
        top_after = ceiling(args.sink, port, message, min(args.n, 20000))
    finally:
        stop_sink(sink)
        databases.drop_all()
        shutil.rmtree(work, ignore_errors=True)
    top = (top_before + top_after) / 2
    where = "SQLite" if not args.database or args.database.startswith("sqlite") else "PostgreSQL"
    print(
        f"sink {args.sink}; {where}; recipients {args.n}; message {len(message) / 1024:.1f} KB; "
        f"pool_size {args.pool_size}; batch_size {args.batch_size}"
    )
    print(f"render per variant: {render_ms:.1f} ms")
    print(
        f"sink ceiling, same bytes, minimal client: {top_before:,.0f} msg/s before, "
        f"{top_after:,.0f} after; mean {top:,.0f}"
    )
    base = results[0][1]
    for workers, rate, elapsed, peak, before in results:
        who = f"{workers} worker process(es)" if workers else "in-process sender"
        print(
            f"{who}: end to end (enqueue to last accept) {rate:,.0f} msg/s in {elapsed:.1f} s; "
            f"ratio {rate / top:.0%} of ceiling; x{rate / base:.2f} of the first; "
            f"peak memory {peak:.0f} MB (benchmark process before sending: {before:.0f} MB)"
        )


if __name__ == "__main__":
    main()
