"""200 clients at once on loopback for 30 s: signups posted through every check, archive pages read.

    .venv/bin/python benchmarks/signup_load.py [--clients 200] [--seconds 30] [--bits 12]
                                                [--database-url postgresql+psycopg://...]

A real `newsletter web` process (its own database: a SQLite file, or --database-url) serves the
pages. Each client loops: GET /subscribe, read /archive, a web copy and the feed while the form's
minimum fill time passes, solve the proof of work, POST the form (as its own client address, sent
as X-Forwarded-For from 127.0.0.1, a trusted proxy). Twenty clients share one address, so they
are meant to meet the 429 of [web] signups_per_hour; a fifth of the posts name addresses other
clients post too. Prints latency percentiles, every status seen, and checks the database: each
address that was answered 200 is there once, pending, with one confirmation owed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from sqlalchemy import func, select  # noqa: E402

from newsletter.assemble import assemble_alert  # noqa: E402
from newsletter.clock import SystemClock  # noqa: E402
from newsletter.config import load_settings  # noqa: E402
from newsletter.db import make_engine, make_sessionmaker, migrate, unit_of_work  # noqa: E402
from newsletter.db.models import (  # noqa: E402
    Campaign,
    ConfirmationMark,
    Subscriber,
    Subscription,
    SubscriptionStatus,
)
from newsletter.devsmtp import free_port  # noqa: E402
from newsletter.enqueue import launch_campaign  # noqa: E402
from newsletter.lists import read_lists, sync_lists  # noqa: E402
from newsletter.proof_of_work import solve  # noqa: E402
from newsletter.send import deliver_all  # noqa: E402

SECRET = "benchmark-secret-" + "x" * 40
# Applied to our own form page only, not to outside text.
TICKET = re.compile(r'name="form_token" value="([^"]+)"')
SHARED = "192.0.2.1"  # the twenty clients behind one address


def prepare(url: str, folder: Path, bits: int) -> tuple[Path, str]:
    """The database (lists, one sent alert for the archive) and the config `web` reads."""
    config = folder / "config.toml"
    config.write_text(
        f"[database]\nurl = '{url}'\n[security]\nsecret = '{SECRET}'\n"
        f"[web]\nsignup_pow_bits = {bits}\nmax_connections = 2000\n"
        "[smtp]\nhost = '127.0.0.1'\nport = 9\n"
    )
    settings = load_settings(config, {})
    engine = make_engine(url)
    migrate(engine)
    factory = make_sessionmaker(engine)
    clock = SystemClock()
    with unit_of_work(factory) as session:
        sync_lists(session=session, specs=read_lists(ROOT / "subscribers" / "lists.toml"))
        campaign, _ = assemble_alert(
            session=session,
            list_slug="urgent-actions",
            now=clock.now(),
            actor="benchmark",
            title="Write to the prisoners",
            body_html="<p>Letters help.</p>",
        )
        launch_campaign(
            session=session,
            campaign=campaign,
            settings=settings,
            now=clock.now(),
            actor="benchmark",
        )
    deliver_all(factory=factory, settings=settings, clock=clock)  # nobody yet: finishes it
    with unit_of_work(factory) as session:
        slug = session.scalar(select(Campaign.slug))
    engine.dispose()
    assert slug
    return config, slug


class Stats:
    def __init__(self) -> None:
        self.latency: dict[str, list[float]] = {"get": [], "post": []}
        self.status: Counter[str] = Counter()
        self.accepted: set[str] = set()
        self.errors: list[str] = []


async def client(n: int, base: str, slug: str, bits: int, deadline: float, stats: Stats) -> None:
    """One reader (or bot) looping until the deadline."""
    ip = SHARED if n < 20 else f"10.{n // 250}.{n % 250}.{1 + n % 200}"
    lang = ("en", "be", "ru")[n % 3]
    async with httpx.AsyncClient(base_url=base, timeout=60) as http:
        seq = 0
        while time.monotonic() < deadline:
            seq += 1
            form = await timed(http.get(f"/subscribe?lang={lang}"), "get", stats, "form")
            shown = time.monotonic()  # the ticket is dated when the server answered
            match = TICKET.search(form.text) if form is not None else None
            if match is None:
                continue
            for path in ("/archive", f"/archive/{slug}/{lang}", "/archive/feed.xml"):
                await timed(
                    http.get(f"{path}?lang={lang}" if "feed" in path else path),
                    "get",
                    stats,
                    "read",
                )
            await asyncio.sleep(max(0.0, shown + 3.2 - time.monotonic()))
            ticket = match.group(1)
            email = (
                f"shared{(n * 7 + seq) % 50}@example.org"
                if seq % 5 == 0
                else (f"c{n}-{seq}@example.org")
            )
            data = {
                "form_token": ticket,
                "pow": solve(ticket, bits),
                "email": email,
                "language": lang,
                "lists": ["weekly-digest", "urgent-actions"][: 1 + n % 2],
                "website": "",
            }
            answer = await timed(
                http.post("/subscribe", data=data, headers={"x-forwarded-for": ip}),
                "post",
                stats,
                "post",
            )
            if answer is not None and answer.status_code == 200:
                stats.accepted.add(email)


async def timed(request: object, kind: str, stats: Stats, label: str) -> httpx.Response | None:
    started = time.perf_counter()
    try:
        response: httpx.Response = await request  # type: ignore[misc]
    except httpx.HTTPError as e:
        stats.errors.append(f"{label}: {type(e).__name__}")
        return None
    stats.latency[kind].append(time.perf_counter() - started)
    stats.status[f"{label} {response.status_code}"] += 1
    intended = response.status_code == 200 or (label == "post" and response.status_code == 429)
    if not intended:
        stats.errors.append(f"{label}: {response.status_code}")
    return response


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] * 1000 if len(values) > 1 else 0.0


def check_database(url: str, stats: Stats) -> list[str]:
    """Every accepted address once, pending only, with one mark (one confirmation) each."""
    problems = []
    engine = make_engine(url)
    with unit_of_work(make_sessionmaker(engine)) as session:
        emails = list(session.scalars(select(Subscriber.email)))
        active = session.scalar(
            select(func.count()).where(Subscription.status == SubscriptionStatus.ACTIVE)
        )
        marks = session.scalar(select(func.count()).select_from(ConfirmationMark))
    engine.dispose()
    if len(emails) != len(set(emails)):
        problems.append("an address is there twice")
    if set(emails) != stats.accepted:
        problems.append(f"{len(set(emails) ^ stats.accepted)} addresses lost or extra")
    if active:
        problems.append(f"{active} subscriptions active before any click")
    if marks != len(stats.accepted):
        problems.append(f"{marks} confirmation marks for {len(stats.accepted)} addresses")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--bits", type=int, default=12)
    parser.add_argument("--database-url", default="")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="signup-load-"))
    url = args.database_url or f"sqlite:///{folder / 'load.db'}"
    config, slug = prepare(url, folder, args.bits)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    server = subprocess.Popen(
        [sys.executable, "-m", "newsletter", "--config", str(config), "web", "--port", str(port)],
        cwd=folder,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                if httpx.get(f"{base}/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        stats = Stats()

        async def all_clients() -> None:
            deadline = time.monotonic() + args.seconds
            await asyncio.gather(
                *(client(n, base, slug, args.bits, deadline, stats) for n in range(args.clients))
            )

        started = time.monotonic()
        asyncio.run(all_clients())
        elapsed = time.monotonic() - started
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    db = "PostgreSQL" if url.startswith("postgresql") else "SQLite"
    print(f"{args.clients} clients, {elapsed:.1f} s, {db}, proof of work {args.bits} bits")
    for kind, values in stats.latency.items():
        print(
            f"  {kind}: {len(values)} requests, p50 {percentile(values, 50):.0f} ms, "
            f"p95 {percentile(values, 95):.0f} ms, p99 {percentile(values, 99):.0f} ms"
        )
    print("  statuses:", dict(sorted(stats.status.items())))
    print(
        f"  errors (other than the intended 429s): {len(stats.errors)}",
        dict(Counter(stats.errors)) if stats.errors else "",
    )
    problems = check_database(url, stats)
    print(
        f"  accepted addresses: {len(stats.accepted)};",
        "database: " + ("; ".join(problems) if problems else "each once, pending, one mark"),
    )


if __name__ == "__main__":
    main()
