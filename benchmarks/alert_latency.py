"""How long an urgent alert waits behind a big digest: webhook call to the last alert accepted.

    .venv/bin/python benchmarks/alert_latency.py [--digest 100000] [--alert 10000]
                                                [--sink postfix|aiosmtpd] [--head-start 5000]
                                                [--profile FILE [--gil]]

A real `newsletter run` process (SQLite, the default settings) starts sending a digest to
--digest readers through a local SMTP sink. Once --head-start digest messages are out, the portal
publishes an urgent item and calls POST /hooks/ingest; the alert (auto mode) goes to --alert
other readers. Prints the webhook's answer time and the time from the call to the last alert
message accepted by the sink (the delivery's sent_at, written right after the sink's 250).
With --profile, py-spy samples the service from just before the call for --profile-seconds;
benchmarks/profile_summary.py reads the file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import func, insert, select  # noqa: E402

from newsletter.config import load_settings  # noqa: E402
from newsletter.db import make_engine, make_sessionmaker, unit_of_work  # noqa: E402
from newsletter.db.models import (  # noqa: E402
    Campaign,
    Delivery,
    DeliveryStatus,
    MailingList,
    Subscriber,
    Subscription,
)
from newsletter.devsmtp import free_port  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from send import (  # noqa: E402
    CEILING_SESSIONS,
    deliveries_by_language,
    mix_ceiling,
    sample_messages,
)
from sinks import start_sink, stop_sink  # noqa: E402

SECRET = "benchmark-secret-" + "s" * 32
HOOK = "benchmark-hook-" + "h" * 32


def feed(items: list[tuple[str, datetime, bool]]) -> bytes:
    """An RSS feed of (slug, date, urgent) items."""
    entries = "".join(
        f"<item><title>{slug.replace('-', ' ').title()}</title>"
        f"<link>https://portal.example.org/{slug}</link><guid>{slug}</guid>"
        f"<pubDate>{format_datetime(when)}</pubDate>"
        f"<category>{'urgent-action' if urgent else 'Viasna'}</category>"
        f"<description>Write to the authorities today. {'Details. ' * 40}</description></item>"
        for slug, when, urgent in items
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?><rss version="2.0"><channel><title>Portal</title>'
        f"<link>https://portal.example.org/</link><description>d</description>{entries}"
        "</channel></rss>"
    ).encode()


def serve_feed(documents: dict[str, bytes]) -> tuple[ThreadingHTTPServer, str]:
    """A local portal serving `documents["/feed"]`."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = documents.get(self.path, b"")
            self.send_response(200 if body else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}/feed"


def seed(url: str, digest: int, alert: int) -> None:
    """Readers of the digest list and (other) readers of the urgent-actions list."""
    factory = make_sessionmaker(make_engine(url))
    now = datetime.now(UTC)
    with unit_of_work(factory) as session:
        lists = {ml.slug: ml.id for ml in session.scalars(select(MailingList))}
        for start, count, slug in ((0, digest, "weekly-digest"), (digest, alert, "urgent-actions")):
            for chunk in range(start, start + count, 10_000):
                stop = min(start + count, chunk + 10_000)
                ids = session.scalars(
                    insert(Subscriber).returning(Subscriber.id),
                    [
                        {
                            "email": f"reader{i}@example.net",
                            "name": f"Reader {i}",
                            "language": ("en", "be", "ru")[i % 3],
                            "created_at": now,
                        }
                        for i in range(chunk, stop)
                    ],
                ).all()
                session.execute(
                    insert(Subscription),
                    [
                        {
                            "subscriber_id": sid,
                            "list_id": lists[slug],
                            "status": "active",
                            "created_at": now,
                        }
                        for sid in ids
                    ],
                )


def counts(url: str) -> dict[str, int]:
    """Sent deliveries per campaign kind, and alert deliveries in all."""
    factory = make_sessionmaker(make_engine(url))
    with unit_of_work(factory) as session:
        rows = session.execute(
            select(Campaign.kind, Delivery.status, func.count())
            .join(Campaign, Campaign.id == Delivery.campaign_id)
            .group_by(Campaign.kind, Delivery.status)
        ).all()
    out: dict[str, int] = {}
    for kind, status, n in rows:
        out[f"{kind}_{status}"] = n
        out[f"{kind}_total"] = out.get(f"{kind}_total", 0) + n
    return out


def alert_span(url: str) -> tuple[datetime | None, datetime | None]:
    """When the first and the last alert message were accepted (their sent_at)."""
    factory = make_sessionmaker(make_engine(url))
    with unit_of_work(factory) as session:
        first, last = session.execute(
            select(func.min(Delivery.sent_at), func.max(Delivery.sent_at))
            .join(Campaign, Campaign.id == Delivery.campaign_id)
            .where(Campaign.kind == "alert", Delivery.status == DeliveryStatus.SENT)
        ).one()
        return first, last


def newsletter(cwd: Path, *args: str) -> None:
    env = {**os.environ, "NEWSLETTER_SECRET": SECRET}
    subprocess.run(
        [sys.executable, "-m", "newsletter", *args],
        cwd=cwd,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )


def stop(run: subprocess.Popen[bytes]) -> None:
    """Stop `newsletter run` gracefully, once."""
    if run.poll() is None:
        run.send_signal(signal.SIGTERM)
        run.wait(timeout=60)


def alert_ceiling(work: Path, url: str, sink: str, port: int) -> tuple[int, float, float]:
    """(messages, seconds, mean bytes): the sink's own time for the alert's messages, by
    language as sent, with a minimal client; what no sender can beat on this machine."""
    settings = load_settings(work / "config.toml", {"NEWSLETTER_SECRET": SECRET})
    factory = make_sessionmaker(make_engine(url))
    with contextlib.closing(factory()) as session:
        cid = session.scalar(select(Campaign.id).where(Campaign.kind == "alert"))
        assert cid is not None
        messages = sample_messages(session, settings, cid)
        readers = deliveries_by_language(session, cid)
        session.rollback()
    total = sum(readers.values())
    rate = mix_ceiling(sink, port, messages, readers)
    mean = sum(len(messages[lang]) * n for lang, n in readers.items()) / total
    return total, total / rate, mean


def start_profile(pid: int, path: str, seconds: float, gil: bool) -> subprocess.Popen[bytes]:
    """py-spy sampling process `pid` into `path` (raw collapsed stacks) for `seconds`."""
    spy = Path(sys.executable).parent / "py-spy"
    command = [str(spy), "record", "--pid", str(pid), "--rate", "250", "--format", "raw"]
    command += ["--duration", str(max(1, round(seconds))), "--output", path]
    spy_run = subprocess.Popen([*command, *(["--gil"] if gil else [])], stdout=subprocess.DEVNULL)
    time.sleep(0.5)  # py-spy attaches before the call it is meant to see
    return spy_run


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) each thread of process `pid` has used so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    out: dict[int, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            out[int(task.name)] = (int(fields[11]) + int(fields[12])) / ticks
    return out


def wait(predicate: Any, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--digest", type=int, default=100_000)
    parser.add_argument("--alert", type=int, default=10_000)
    parser.add_argument("--head-start", type=int, default=5_000)
    default_sink = (
        "postfix"
        if shutil.which("smtp-sink") or Path("/usr/sbin/smtp-sink").exists()
        else "aiosmtpd"
    )
    parser.add_argument("--sink", choices=("postfix", "aiosmtpd"), default=default_sink)
    parser.add_argument("--profile", metavar="FILE", help="py-spy samples of the service, raw")
    parser.add_argument("--profile-seconds", type=float, default=4.0)
    parser.add_argument("--gil", action="store_true", help="with --profile: the GIL holder only")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="alert-latency-"))
    url = f"sqlite:///{work / 'n.db'}"
    documents: dict[str, bytes] = {}
    httpd, feed_url = serve_feed(documents)
    sink_port, web_port = free_port(), free_port()
    (work / "config.toml").write_text(
        f"[database]\nurl = '{url}'\n[smtp]\nport = {sink_port}\n"
        f"[sources]\nfeeds = [{{ url = '{feed_url}' }}]\n"
        f"[alerts]\nmode = 'auto'\nwebhook_secret = '{HOOK}'\n"
        "[schedule]\nsend_interval_seconds = 1\npoll_minutes = 600\n"
    )
    now = datetime.now(UTC)
    documents["/feed"] = feed([("weekly-news", now - timedelta(hours=2), False)])
    newsletter(work, "init")
    seed(url, args.digest, args.alert)
    newsletter(work, "ingest")
    newsletter(work, "digest", "send", "--queue-only")
    sink = start_sink(args.sink, sink_port)
    env = {**os.environ, "NEWSLETTER_SECRET": SECRET}
    log = (work / "run.log").open("w")
    run = subprocess.Popen(
        [sys.executable, "-m", "newsletter", "run", "--port", str(web_port)],
        cwd=work,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    try:
        wait(lambda: counts(url).get("digest_sent", 0) >= args.head_start, 300, "the head start")
        documents["/feed"] = feed(
            [
                ("weekly-news", now - timedelta(hours=2), False),
                ("urgent-letter", datetime.now(UTC), True),
            ]
        )
        request = urllib.request.Request(
            f"http://127.0.0.1:{web_port}/hooks/ingest",
            method="POST",
            headers={"X-Newsletter-Secret": HOOK},
        )
        spy = (
            start_profile(run.pid, args.profile, args.profile_seconds, args.gil)
            if args.profile
            else None
        )
        cpu_before = thread_cpu(run.pid)
        called = datetime.now(UTC)
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
        answered = datetime.now(UTC)
        at_call = counts(url)
        wait(lambda: counts(url).get("alert_sent", 0) >= args.alert, 600, "the alert")
        cpu_after = thread_cpu(run.pid)
        done = datetime.now(UTC)
        first, last = alert_span(url)
        after = counts(url)
        if spy is not None:
            spy.wait(timeout=60)
        stop(run)
        alone = alert_ceiling(work, url, args.sink, sink_port)
    finally:
        stop(run)
        log.close()
        stop_sink(sink)
        httpd.shutdown()
    assert first is not None and last is not None
    print(f"sink: {args.sink}; digest readers {args.digest:,}, alert readers {args.alert:,}")
    print(f"webhook answered in {(answered - called).total_seconds():.2f} s: {answer['sources']}")
    print(f"digest messages sent before the call: {at_call.get('digest_sent', 0):,}")
    print(
        f"alert: {after.get('alert_sent', 0):,} accepted; first one "
        f"{(first - called).total_seconds():.1f} s after the webhook call, last one "
        f"{(last - called).total_seconds():.1f} s after it"
    )
    print(
        f"digest messages sent when the alert was done: {after.get('digest_sent', 0):,} "
        f"of {after.get('digest_total', 0):,}"
    )
    print(
        f"the sink alone, for the same {alone[0]:,} alert messages (smtp-source, "
        f"{CEILING_SESSIONS} sessions, mean {alone[2]:,.0f} bytes): {alone[1]:.1f} s"
    )
    span = (done - called).total_seconds()
    used = sorted((cpu_after[tid] - cpu_before.get(tid, 0.0) for tid in cpu_after), reverse=True)
    print(
        f"service CPU from the call to the last alert seen ({span:.1f} s): "
        f"{sum(used) / span:.2f} cores; busiest threads "
        + ", ".join(f"{u / span:.2f}" for u in used[:4])
    )
    print(f"work folder (database, run.log): {work}")


if __name__ == "__main__":
    main()
