"""Send a real digest campaign to N subscribers through a local SMTP sink and print figures.

    .venv/bin/python benchmarks/send.py [--n 100000] [--sink postfix|aiosmtpd]

Prints messages per second end to end (enqueue to last accept), render time per variant, peak
memory of this process, and the sink's own ceiling for the same message bytes measured in the same
run with a minimal client (Postfix smtp-source, or one reused smtplib connection for aiosmtpd).
"""

from __future__ import annotations

import argparse
import asyncio
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
sys.path.insert(0, str(ROOT))

from sqlalchemy import insert, select  # noqa: E402

from newsletter.campaigns import render_campaign, start_campaign, store_variants  # noqa: E402
from newsletter.clock import SystemClock  # noqa: E402
from newsletter.config import load_settings  # noqa: E402
from newsletter.db import make_engine, make_sessionmaker, migrate, unit_of_work  # noqa: E402
from newsletter.db.models import Campaign, Item, MailingList, Source, Subscriber, Subscription  # noqa: E402
from newsletter.devsmtp import free_port  # noqa: E402
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


def start_sink(kind: str, port: int) -> subprocess.Popen[bytes] | object:
    if kind == "postfix":
        return subprocess.Popen(
            ["/usr/sbin/smtp-sink", "-u", "nobody", f"127.0.0.1:{port}", "256"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    from aiosmtpd.controller import Controller

    class Sink:
        async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
            return "250 OK"

    c = Controller(Sink(), hostname="127.0.0.1", port=port)
    c.start()
    return c


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
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="nl-bench-"))
    url = f"sqlite:///{work / 'bench.db'}"
    port = free_port()
    sink = start_sink(args.sink, port)
    time.sleep(0.5)
    settings = load_settings(None, {"NEWSLETTER_SECRET": "b" * 40, "NEWSLETTER_DATABASE_URL": url})
    settings = replace(
        settings, smtp=replace(settings.smtp, host="127.0.0.1", port=port, batch_size=500)
    )
    engine = make_engine(url)
    migrate(engine)
    factory = make_sessionmaker(engine)
    cid = seed(factory, args.n)
    clock = SystemClock()
    t0 = time.perf_counter()
    with unit_of_work(factory) as s:
        campaign = s.get(Campaign, cid)
        r = time.perf_counter()
        variants = render_campaign(campaign, settings=settings)
        render_ms = (time.perf_counter() - r) * 1000 / len(variants)
        store_variants(s, campaign, variants)
        start_campaign(
            session=s, campaign=campaign, settings=settings, now=clock.now(), actor="bench"
        )

    captured: list[bytes] = []

    async def run() -> None:
        pool = SmtpPool(settings.smtp)
        orig = pool.send

        async def send(message: bytes, *, sender: str, recipient: str):  # type: ignore[no-untyped-def]
            if not captured:
                captured.append(message)
            return await orig(message, sender=sender, recipient=recipient)

        pool.send = send  # type: ignore[method-assign]
        try:
            report = await deliver_queued(
                factory=factory, settings=settings, transport=pool, clock=clock
            )
            assert report.sent == args.n, report
        finally:
            await pool.close()

    asyncio.run(run())
    elapsed = time.perf_counter() - t0
    rate = args.n / elapsed
    top = ceiling(args.sink, port, captured[0], min(args.n, 20000))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"sink {args.sink}; recipients {args.n}; message {len(captured[0]) / 1024:.1f} KB")
    print(f"end to end (enqueue to last accept): {rate:,.0f} msg/s in {elapsed:.1f} s")
    print(f"render per variant: {render_ms:.1f} ms")
    print(f"sink ceiling, same bytes, minimal client: {top:,.0f} msg/s; ratio {rate / top:.0%}")
    print(f"peak memory (ru_maxrss): {peak:.0f} MB")
    if hasattr(sink, "terminate"):
        sink.terminate()  # type: ignore[union-attr]
    else:
        sink.stop()  # type: ignore[attr-defined]
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
