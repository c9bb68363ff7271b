"""Send a real digest campaign to N subscribers through a local SMTP sink and print figures.

    .venv/bin/python benchmarks/send.py [--n 100000] [--sink postfix|aiosmtpd]
        [--database URL] [--workers 1,2 | --cli] [--pool-size 4] [--batch-size 500]

The readers are a third each in English, Belarusian and Russian, so the campaign goes out in
three variants; after the send the deliveries sent per language are counted and printed.

Prints messages per second end to end (enqueue to last accept), render time per variant, CPU
per message, peak memory, and the sink's own ceiling for the mix actually sent, measured in the
same run with a minimal client before and after the sends; the ratio is against their mean.

The ceiling: one sample message per language, built as the sender builds it. With Postfix,
smtp-source (`-s 10 -d`: 10 sessions, each reusing its connection as our sender does) sends each
language's message for that language's share of the count, the three runs one after another;
the ceiling is the total count over the total time. With aiosmtpd, one reused smtplib connection
sends the same shares, one language after another (the aiosmtpd sink runs in a process of its own,
so its CPU is never counted as the sender's).

CPU per message is user+sys time over messages sent, for the timed stretch only (the ceiling
runs are outside it): of this process and of its finished children (RUSAGE_CHILDREN counts only
children waited for; smtp-sink is one too, but it runs until the end, so it is never counted).

Without --workers the sender runs in this process (SQLite file by default). With --workers 1,2
each count gets a fresh database, and `newsletter send --workers N` runs as a real command; a
PostgreSQL --database URL names the server: the benchmark creates a database of its own there
and drops it afterwards.

With --cli the operator's command `newsletter --config FILE digest send` does the whole job on
its default settings (the config file sets only the database URL, the sink's host and port, and
the secret). No command sends an already prepared campaign, so the benchmark seeds readers and
items but no campaign: the command assembles the digest from the items, checks, renders, queues
and sends it. Timed from the campaign's start (before render and check, as in the other modes)
to the last accept, both read from the database; the command's wall time and its CPU are printed
too.

The last line is `RESULT {json}` per run, for benchmarks/cost_plot.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import smtplib
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SECRET = "b" * 40
LANGUAGES = ("en", "be", "ru")
CEILING_SESSIONS = 10
sys.path.insert(0, str(ROOT))

from sqlalchemy import Connection, create_engine, func, insert, make_url, select, text  # noqa: E402
from sqlalchemy.orm import Session, sessionmaker  # noqa: E402

from newsletter.assemble import assemble_digest  # noqa: E402
from newsletter.clock import SystemClock  # noqa: E402
from newsletter.config import Settings, SmtpSettings, load_settings  # noqa: E402
from newsletter.db import make_engine, make_sessionmaker, migrate, unit_of_work  # noqa: E402
from newsletter.db.models import (  # noqa: E402
    Campaign,
    Delivery,
    Item,
    MailingList,
    Source,
    Subscriber,
    Subscription,
    Variant,
)
from newsletter.devsmtp import free_port  # noqa: E402
from newsletter.enqueue import launch_campaign  # noqa: E402
from newsletter.variants import render_campaign, store_variants  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sinks import start_delay, start_sink, stop_sink  # noqa: E402

from newsletter.send import TemplateCache, deliver_queued, prepare_jobs  # noqa: E402
from newsletter.smtp import SmtpPool  # noqa: E402
from newsletter.smtp_wire import Wire  # noqa: E402


def seed(factory: sessionmaker[Session], n: int) -> int:
    """n subscribers in three languages, ten items, one digest campaign (not yet started)."""
    seed_audience(factory, n)
    with unit_of_work(factory) as s:
        ml = s.scalars(select(MailingList)).one()
        items = list(s.scalars(select(Item).order_by(Item.id)))
        now = datetime.now(UTC)
        c = Campaign(kind="digest", list_id=ml.id, dedupe_key="bench", created_at=now, items=items)
        s.add(c)
        s.flush()
        return c.id


def seed_audience(factory: sessionmaker[Session], n: int) -> None:
    """n subscribers in three languages on the weekly digest list, and ten new items."""
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
                        "language": LANGUAGES[i % 3],
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


def deliveries_by_language(session: Session, cid: int, status: str | None = None) -> dict[str, int]:
    """A campaign's deliveries (of one status, or all) counted by the reader's language."""
    stmt = (
        select(Subscriber.language, func.count())
        .join(Delivery, Delivery.subscriber_id == Subscriber.id)
        .where(Delivery.campaign_id == cid)
        .group_by(Subscriber.language)
    )
    if status is not None:
        stmt = stmt.where(Delivery.status == status)
    return {lang: count for lang, count in session.execute(stmt)}


def sample_messages(session: Session, settings: Settings, cid: int) -> dict[str, bytes]:
    """One message per language, built as the sender builds them (nothing is claimed)."""
    first: dict[str, int] = {}
    for lang in LANGUAGES:
        found = session.scalar(
            select(Delivery.id)
            .join(Subscriber, Subscriber.id == Delivery.subscriber_id)
            .where(Delivery.campaign_id == cid, Subscriber.language == lang)
            .limit(1)
        )
        if found is not None:
            first[lang] = found
    jobs, _ = prepare_jobs(
        session,
        list(first.values()),
        settings=settings,
        templates=TemplateCache(settings),
        signer=None,
        now=datetime.now(UTC),
    )
    lang_of = {did: lang for lang, did in first.items()}
    return {lang_of[job.delivery_id]: unstuffed(job.payload()) for job in jobs}


def unstuffed(message: bytes) -> bytes:
    """The message as the server keeps it (the sender may hand over the dot-stuffed wire form)."""
    if not isinstance(message, Wire):
        return message
    plain = message.replace(b"\n..", b"\n.")
    return plain[1:] if plain.startswith(b"..") else plain


def sample_message(factory: sessionmaker[Session], settings: Settings, cid: int) -> bytes:
    """The first recipient's message bytes, built as the sender builds them (nothing is claimed)."""
    with contextlib.closing(factory()) as s:
        try:
            first = s.scalar(select(Delivery.id).where(Delivery.campaign_id == cid).limit(1))
            assert first is not None
            jobs, _ = prepare_jobs(
                s,
                [first],
                settings=settings,
                templates=TemplateCache(settings),
                signer=None,
                now=datetime.now(UTC),
            )
            return unstuffed(jobs[0].payload())
        finally:
            s.rollback()


def sample_prepared(
    factory: sessionmaker[Session], settings: Settings, cid: int
) -> tuple[dict[str, bytes], dict[str, int]]:
    """The queued campaign's sample message and reader count per language; nothing is written."""
    with contextlib.closing(factory()) as s:
        try:
            return sample_messages(s, settings, cid), deliveries_by_language(s, cid)
        finally:
            s.rollback()


def sample_rehearsed(
    factory: sessionmaker[Session], settings: Settings
) -> tuple[dict[str, bytes], dict[str, int]]:
    """As `digest send` would make them: assemble, check, queue, sample, then roll it all back."""
    with contextlib.closing(factory()) as s:
        try:
            now = datetime.now(UTC)
            campaign = assemble_digest(
                session=s, list_slug=settings.digest.list, now=now, actor="bench"
            )
            assert campaign is not None, "nothing to assemble"
            launch_campaign(session=s, campaign=campaign, settings=settings, now=now, actor="bench")
            return sample_messages(s, settings, campaign.id), deliveries_by_language(s, campaign.id)
        finally:
            s.rollback()


def shares(count: int, readers: dict[str, int]) -> dict[str, int]:
    """count split over the languages in proportion to their readers (the sum is count)."""
    total, out, given = sum(readers.values()), {}, 0
    langs = sorted(readers)
    for lang in langs[:-1]:
        out[lang] = round(count * readers[lang] / total)
        given += out[lang]
    out[langs[-1]] = count - given
    return out


def ceiling(kind: str, port: int, message: bytes, count: int) -> float:
    """The sink's own rate for one message with a minimal client (as mix_ceiling)."""
    return mix_ceiling(kind, port, {"all": message}, {"all": count})


def mix_ceiling(kind: str, port: int, messages: dict[str, bytes], split: dict[str, int]) -> float:
    """The sink's own rate for this mix of messages with a minimal client (see the docstring)."""
    total, elapsed = 0, 0.0
    if kind != "postfix":
        conn = smtplib.SMTP("127.0.0.1", port)
    for lang, count in split.items():
        if count <= 0:
            continue
        if kind == "postfix":
            elapsed += smtp_source(port, messages[lang], count)
        else:
            t = time.perf_counter()
            for _ in range(count):
                conn.sendmail("a@example.org", ["b@example.net"], messages[lang])
            elapsed += time.perf_counter() - t
        total += count
    if kind != "postfix":
        conn.quit()
    return total / elapsed


def smtp_source(port: int, message: bytes, count: int) -> float:
    """Seconds Postfix smtp-source takes to send count copies of message over reused sessions."""
    with tempfile.NamedTemporaryFile(suffix=".eml") as f:
        # smtp-source appends CRLF to each line it reads: give it LF lines, so the bytes on the
        # wire are the message's own (CRLF lines would go out as CR CR LF).
        f.write(message.replace(b"\r\n", b"\n"))
        f.flush()
        t = time.perf_counter()
        subprocess.run(
            [
                "/usr/sbin/smtp-source",
                "-s",
                str(CEILING_SESSIONS),
                "-d",
                "-m",
                str(count),
                "-F",
                f.name,
                f"127.0.0.1:{port}",
            ],
            check=True,
        )
        return time.perf_counter() - t


def start_sending(factory: sessionmaker[Session], settings: Settings, cid: int) -> float:
    """Render the campaign once per language, check and enqueue it; returns ms per variant."""
    with unit_of_work(factory) as s:
        campaign = s.get(Campaign, cid)
        assert campaign is not None
        r = time.perf_counter()
        variants = render_campaign(campaign, settings=settings)
        render_ms = (time.perf_counter() - r) * 1000 / len(variants)
        store_variants(s, campaign, variants)
        launch_campaign(
            session=s, campaign=campaign, settings=settings, now=datetime.now(UTC), actor="bench"
        )
    return render_ms


def send_in_process(factory: sessionmaker[Session], settings: Settings, n: int) -> None:
    """Deliver everything queued over one SmtpPool in this process."""

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


# Set from --profile: the newsletter command runs under py-spy, which writes its samples here.
PROFILE: list[str] = []


def newsletter_command() -> list[str]:
    """The `newsletter` entry point of this environment, as an operator runs it."""
    script = Path(sys.executable).parent / "newsletter"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "newsletter"]
    if not PROFILE:
        return command
    spy = Path(sys.executable).parent / "py-spy"
    path, *extra = PROFILE
    return [
        str(spy),
        "record",
        "--subprocesses",
        "--rate",
        "250",
        "--format",
        "raw",
        *extra,
        "--output",
        path,
        "--",
        *command,
    ]


def run_newsletter(work: Path, config: Path, *args: str) -> tuple[str, float]:
    """Run `newsletter --config CONFIG ARGS` with no NEWSLETTER_* variables.

    Returns its stdout and its peak memory in MB: the largest VmHWM of it and its worker
    processes, read from /proc while they run. (ru_maxrss is no use here: a child started from
    this process records this process's resident set, grown by seeding, when it execs.)
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    peak = 0
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        child = subprocess.Popen(
            [*newsletter_command(), "--config", str(config), *args],
            cwd=work,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
        )
        while child.poll() is None:
            peak = max([peak, *(high_water_kb(pid) for pid in process_tree(child.pid))])
            time.sleep(0.2)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if child.returncode != 0:
        raise SystemExit(f"newsletter {' '.join(args)} failed: {stdout}{stderr}")
    return stdout, peak / 1024


def process_tree(pid: int) -> list[int]:
    """pid and its descendants (Linux /proc)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                todo += [int(p) for p in task.read_text().split()]
    return found


def high_water_kb(pid: int) -> int:
    """A process's peak resident set so far (VmHWM), 0 once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def send_with_workers(work: Path, settings: Settings, workers: int, n: int) -> float:
    """`newsletter send --workers N` as the operator would run it."""
    smtp = settings.smtp
    config = work / f"config-{workers}.toml"
    config.write_text(
        f"[database]\nurl = '{settings.database.url}'\n"
        f"[smtp]\nhost = '{smtp.host}'\nport = {smtp.port}\npool_size = {smtp.pool_size}\n"
        f"batch_size = {smtp.batch_size}\n[security]\nsecret = '{SECRET}'\n"
    )
    out, peak = run_newsletter(work, config, "send", "--workers", str(workers))
    if f"sent {n}," not in out:
        raise SystemExit(f"newsletter send did not send {n}: {out}")
    return peak


def send_with_cli(work: Path, url: str, port: int, n: int) -> tuple[str, float]:
    """`newsletter --config FILE digest send` on default settings: its summary line and peak MB."""
    config = work / "config-cli.toml"
    config.write_text(
        f"[database]\nurl = '{url}'\n[smtp]\nhost = '127.0.0.1'\nport = {port}\n"
        f"[security]\nsecret = '{SECRET}'\n"
    )
    out, peak = run_newsletter(work, config, "digest", "send")
    if f"sent {n}," not in out:
        raise SystemExit(f"newsletter digest send did not send {n}: {out}")
    # Rich wraps lines at 80 columns when stdout is not a terminal: join the summary again.
    return " ".join(out[out.index("sent ") :].split()), peak


def last_campaign_span(factory: sessionmaker[Session]) -> tuple[int, float]:
    """The newest campaign's id and seconds from its start to its last accepted message."""
    with unit_of_work(factory) as s:
        campaign = s.scalars(select(Campaign).order_by(Campaign.id.desc()).limit(1)).one()
        last = s.scalar(
            select(func.max(Delivery.sent_at)).where(Delivery.campaign_id == campaign.id)
        )
        assert campaign.started_at is not None and last is not None
        return campaign.id, (last - campaign.started_at).total_seconds()


def cpu_seconds() -> tuple[float, float]:
    """user+sys seconds so far of this process and of its children waited for."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def machine_busy() -> float:
    """CPU seconds every process on this machine has used so far (Linux /proc/stat): the
    sender, the database server and the sink together."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def cpu_delta(start: tuple[float, float], end: tuple[float, float]) -> tuple[float, float]:
    """end - start, per part."""
    return end[0] - start[0], end[1] - start[1]


def peak_mb(who: int) -> float:
    """Peak resident memory in MB (ru_maxrss is in KB on Linux)."""
    return resource.getrusage(who).ru_maxrss / 1024


class Database:
    """A fresh database per run: a SQLite file, or a database of its own on a PostgreSQL server."""

    def __init__(self, url: str | None, work: Path) -> None:
        self.server, self.work, self.made = url, work, list[str]()

    def fresh(self, tag: str) -> str:
        """The URL of a new, empty database."""
        if not self.server or self.server.startswith("sqlite"):
            return f"sqlite:///{self.work / f'bench-{tag}.db'}"
        name = f"nl_bench_{os.getpid()}_{tag}"
        with self._admin() as conn:
            conn.execute(text(f'create database "{name}"'))
        self.made.append(name)
        return str(make_url(self.server).set(database=name).render_as_string(hide_password=False))

    def drop_all(self) -> None:
        """Drop the databases made on a PostgreSQL server."""
        for name in self.made:
            with self._admin() as conn:
                conn.execute(text(f'drop database if exists "{name}" with (force)'))

    @contextlib.contextmanager
    def _admin(self) -> Iterator[Connection]:
        assert self.server is not None
        engine = create_engine(self.server, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                yield conn
        finally:
            engine.dispose()


def bench_settings(url: str, port: int, args: argparse.Namespace) -> Settings:
    """The settings the in-process and worker senders use: the sink, the pool and batch sizes."""
    settings = load_settings(None, {"NEWSLETTER_SECRET": SECRET, "NEWSLETTER_DATABASE_URL": url})
    smtp = replace(
        settings.smtp,
        host="127.0.0.1",
        port=port,
        batch_size=args.batch_size,
        pool_size=args.pool_size,
    )
    return replace(settings, smtp=smtp)


def parse_args() -> argparse.Namespace:
    """The command line."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument(
        "--sink",
        choices=["postfix", "aiosmtpd"],
        default="postfix"
        if shutil.which("smtp-sink") or Path("/usr/sbin/smtp-sink").exists()
        else "aiosmtpd",
    )
    ap.add_argument("--database", help="SQLAlchemy URL (PostgreSQL: the server to use)")
    how = ap.add_mutually_exclusive_group()
    how.add_argument("--workers", help="comma-separated worker counts, e.g. 1,2")
    how.add_argument(
        "--cli", action="store_true", help="run `newsletter digest send` on default settings"
    )
    ap.add_argument(
        "--profile",
        metavar="FILE",
        help="sample the newsletter command with py-spy (every thread, GIL or not) into FILE, "
        "in py-spy's raw (collapsed stacks) format; benchmarks/profile_summary.py reads it",
    )
    ap.add_argument(
        "--gil",
        action="store_true",
        help="with --profile: sample only the thread holding the GIL (Python's own CPU time)",
    )
    ap.add_argument(
        "--relay-rtt-ms",
        type=float,
        default=0.0,
        help="send through a proxy adding this round trip, as to a relay that far away; "
        "the ceiling stays the sink's own, on loopback",
    )
    # The configuration's defaults, so a run without these measures what an operator gets.
    ap.add_argument("--pool-size", type=int, default=SmtpSettings().pool_size)
    ap.add_argument("--batch-size", type=int, default=SmtpSettings().batch_size)
    return ap.parse_args()


@dataclass
class Mix:
    """What the ceiling is measured on: a message per language, its readers and its share."""

    messages: dict[str, bytes]
    readers: dict[str, int]
    split: dict[str, int]
    before: float = 0.0


def measure_mix(
    kind: str, port: int, n: int, sample: tuple[dict[str, bytes], dict[str, int]]
) -> Mix:
    """The sample messages with their shares of min(n, 20000), and the ceiling before sending."""
    messages, readers = sample
    mix = Mix(messages, readers, shares(min(n, 20000), readers))
    mix.before = mix_ceiling(kind, port, mix.messages, mix.split)
    return mix


def run_cli(
    work: Path, factory: sessionmaker[Session], url: str, port: int, n: int
) -> tuple[int, dict[str, Any]]:
    """`newsletter digest send` timed and costed; returns the campaign it made and figures."""
    c0, t0 = cpu_seconds(), time.perf_counter()
    u0, m0 = resource.getrusage(resource.RUSAGE_CHILDREN), machine_busy()
    summary, peak = send_with_cli(work, url, port, n)
    machine = machine_busy() - m0
    wall = time.perf_counter() - t0
    own, kids = cpu_delta(c0, cpu_seconds())
    u1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    user, system = u1.ru_utime - u0.ru_utime, u1.ru_stime - u0.ru_stime
    cid, elapsed = last_campaign_span(factory)
    return cid, {
        "seconds": elapsed,
        "own_cpu": own,
        "children_cpu": kids,
        "peak_mb": peak,
        "note": f"command wall time {wall:.1f} s (CPU per message: user "
        f"{user * 1000 / n:.3f} ms, system {system * 1000 / n:.3f} ms; the whole machine's, "
        f"sender, database and sink: {machine * 1000 / n:.3f} ms), its own summary: "
        f"{summary}",
    }


def run_sender(
    work: Path,
    factory: sessionmaker[Session],
    settings: Settings,
    cid: int,
    workers: int,
    args: argparse.Namespace,
    mix: Mix | None,
    sink_port: int,
) -> tuple[Mix, dict[str, Any]]:
    """Enqueue and send in this process (workers 0) or with `newsletter send --workers N`.

    The first run measures the ceiling between enqueue and send, outside the timed stretches.
    """
    c0, t0 = cpu_seconds(), time.perf_counter()
    render_ms = start_sending(factory, settings, cid)
    queued, c1 = time.perf_counter() - t0, cpu_seconds()
    if mix is None:
        sample = sample_prepared(factory, settings, cid)
        mix = measure_mix(args.sink, sink_port, args.n, sample)
    c2, t1, m1 = cpu_seconds(), time.perf_counter(), machine_busy()
    if workers:
        peak = send_with_workers(work, settings, workers, args.n)
    else:
        send_in_process(factory, settings, args.n)
        peak = peak_mb(resource.RUSAGE_SELF)
    elapsed = queued + time.perf_counter() - t1
    machine = machine_busy() - m1
    (own_q, kids_q), (own_s, kids_s) = cpu_delta(c0, c1), cpu_delta(c2, cpu_seconds())
    return mix, {
        "seconds": elapsed,
        "own_cpu": own_q + own_s,
        "children_cpu": kids_q + kids_s,
        "peak_mb": peak,
        "note": f"render per variant: {render_ms:.1f} ms; the whole machine's CPU per message "
        f"while sending (sender, database, sink): {machine * 1000 / args.n:.3f} ms",
    }


def main() -> None:
    """Seed, send, measure, print."""
    args = parse_args()
    if args.profile:
        PROFILE.append(str(Path(args.profile).resolve()))
        PROFILE.extend(["--gil"] if args.gil else [])
    work = Path(tempfile.mkdtemp(prefix="nl-bench-"))
    port = free_port()
    sink = start_sink(args.sink, port)
    relay, proxy = port, None  # where the sender sends: the sink, or a delaying proxy to it
    if args.relay_rtt_ms:
        relay = free_port()
        proxy = start_delay(relay, port, args.relay_rtt_ms)
    databases = Database(args.database, work)
    if args.cli:
        counts = [-1]
    else:
        counts = [int(w) for w in args.workers.split(",")] if args.workers else [0]
    results: list[dict[str, Any]] = []
    mix: Mix | None = None
    try:
        for workers in counts:
            url = databases.fresh("cli" if workers < 0 else f"w{workers}")
            settings = bench_settings(url, relay, args)
            engine = make_engine(url)
            migrate(engine)
            factory = make_sessionmaker(engine)
            if workers < 0:
                seed_audience(factory, args.n)
                before = peak_mb(resource.RUSAGE_SELF)
                mix = measure_mix(args.sink, port, args.n, sample_rehearsed(factory, settings))
                cid, run = run_cli(work, factory, url, relay, args.n)
            else:
                cid = seed(factory, args.n)
                before = peak_mb(resource.RUSAGE_SELF)
                mix, run = run_sender(work, factory, settings, cid, workers, args, mix, port)
            with unit_of_work(factory) as s:
                sent = deliveries_by_language(s, cid, status="sent")
                n_variants = s.scalar(
                    select(func.count()).select_from(Variant).where(Variant.campaign_id == cid)
                )
            engine.dispose()
            own, kids = run.pop("own_cpu"), run.pop("children_cpu")
            results.append(
                {
                    "label": "cli"
                    if workers < 0
                    else f"workers {workers}"
                    if workers
                    else "in-process",
                    "recipients": args.n,
                    "msg_per_s": args.n / run["seconds"],
                    "cpu_ms_per_msg": (own + kids) * 1000 / args.n,
                    "cpu_self_ms_per_msg": own * 1000 / args.n,
                    "cpu_children_ms_per_msg": kids * 1000 / args.n,
                    "before_mb": before,
                    "sent_by_language": sent,
                    "variants": n_variants,
                    **run,
                }
            )
        assert mix is not None
        top_before = mix.before
        top_after = mix_ceiling(args.sink, port, mix.messages, mix.split)
    finally:
        stop_sink(sink)
        if proxy is not None:
            stop_sink(proxy)
        databases.drop_all()
        shutil.rmtree(work, ignore_errors=True)
    top = (top_before + top_after) / 2
    where = "SQLite" if not args.database or args.database.startswith("sqlite") else "PostgreSQL"
    sizes, readers, split = {k: len(m) for k, m in mix.messages.items()}, mix.readers, mix.split
    mean_size = sum(sizes[lang] * readers[lang] for lang in sizes) / sum(readers.values())
    sending = (
        "defaults" if args.cli else f"pool_size {args.pool_size}; batch_size {args.batch_size}"
    )
    print(f"sink {args.sink}; {where}; recipients {args.n}; {sending}")
    if args.relay_rtt_ms:
        pool = SmtpSettings().pool_size if args.cli else args.pool_size
        print(
            f"relay round trip {args.relay_rtt_ms:g} ms (a delaying proxy): {pool} connections "
            f"at one round trip a message can do at most {pool * 1000 / args.relay_rtt_ms:,.0f} "
            f"msg/s, at two {pool * 500 / args.relay_rtt_ms:,.0f}"
        )
    print(
        "message bytes per language: "
        + ", ".join(f"{lang} {sizes[lang]:,} ({readers[lang]} readers)" for lang in sizes)
        + f"; mean weighted by readers {mean_size:,.0f}"
    )
    client = (
        f"smtp-source -s {CEILING_SESSIONS} -d, one language after another"
        if args.sink == "postfix"
        else "one smtplib connection"
    )
    print(
        f"sink ceiling, same mix ({', '.join(f'{k} {v}' for k, v in split.items())} messages, "
        f"{client}): "
        f"{top_before:,.0f} msg/s before, {top_after:,.0f} after; mean {top:,.0f}"
    )
    base = results[0]["msg_per_s"]
    for r in results:
        who = {"in-process": "in-process sender", "cli": "newsletter digest send"}.get(
            r["label"], f"{r['label']} process(es)"
        )
        print(
            f"{who}: end to end (enqueue to last accept) {r['msg_per_s']:,.0f} msg/s in "
            f"{r['seconds']:.1f} s; ratio {r['msg_per_s'] / top:.0%} of ceiling; "
            f"x{r['msg_per_s'] / base:.2f} of the first; peak memory {r['peak_mb']:.0f} MB "
            f"(benchmark process before sending: {r['before_mb']:.0f} MB)"
        )
        print(
            f"  CPU per message {r['cpu_ms_per_msg']:.3f} ms (this process "
            f"{r['cpu_self_ms_per_msg']:.3f}, children {r['cpu_children_ms_per_msg']:.3f}); "
            f"{r['variants']} variants; sent by language: "
            + ", ".join(f"{k} {v}" for k, v in sorted(r["sent_by_language"].items()))
        )
        if r["note"]:
            print(f"  {r['note']}")
        if (
            len(r["sent_by_language"]) != len(LANGUAGES)
            or sum(r["sent_by_language"].values()) != args.n
        ):
            print(f"  WARNING: expected {args.n} sent in {len(LANGUAGES)} languages")
    for r in results:
        record = {
            **r,
            "sink": args.sink,
            "database": where,
            "ceiling_before": top_before,
            "ceiling_after": top_after,
            "ratio": r["msg_per_s"] / top,
            "message_bytes": sizes,
            "mean_message_bytes": mean_size,
        }
        print("RESULT " + json.dumps(record, sort_keys=True))


if __name__ == "__main__":
    main()
