"""Does a staffer watching the dashboard slow the sender? A digest sent with and without it.

    .venv/bin/python benchmarks/console_dashboard.py [--n 100000] [--rounds 2]
        [--sink postfix|aiosmtpd] [--database URL] [--pool-size N] [--batch-size N]

The set-up is benchmarks/send.py's (same seed, same render-check-enqueue, the in-process sender,
a fresh database per send, Postfix smtp-sink by default when installed). Here the sender shares
one event loop with the staff console, as in `newsletter run`. Each send is timed end to end
(enqueue to last accept); sends without and with the console alternate, ABBA, `--rounds` pairs.

With the console, a poller in a process of its own (the browser) signs in through the pages
(password, then a recovery code) and every 2 s fetches /api/progress (what console.js does) and
reloads / with its stylesheet and script (a staffer pressing reload: no-store, so all three).
It reports its requests by status, so a signed-out poller (303s, 401s) is seen, not measured.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import html
import json
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import httpx  # noqa: E402
import pyotp  # noqa: E402
import uvicorn  # noqa: E402
from send import SECRET, Database, seed, start_sending  # noqa: E402
from sinks import start_sink, stop_sink  # noqa: E402

from newsletter.clock import SystemClock  # noqa: E402
from newsletter.config import Settings, load_settings  # noqa: E402
from newsletter.console import create_console_app  # noqa: E402
from newsletter.db import make_engine, make_sessionmaker, migrate, unit_of_work  # noqa: E402
from newsletter.devsmtp import free_port  # noqa: E402
from newsletter.send import deliver_queued  # noqa: E402
from newsletter.smtp import SmtpPool  # noqa: E402
from newsletter.staff import add_staff, begin_enrolment, complete_enrolment  # noqa: E402
from newsletter.webserver import listener_config  # noqa: E402

POLL_SECONDS = 2.0
PAGES = "/api/progress,/,/static/console.css,/static/console.js"
EMAIL = "watcher@example.org"
PASSWORD = "correct horse battery staple 42"
# Our own page's hidden fields; one attribute run each, no nested quantifiers: linear time.
_FIELD = re.compile(r'name="(csrf|pending)" value="([^"]*)"')


# --- the poller: a browser with the dashboard open ------------------------------------------


def fields(page: str) -> dict[str, str]:
    """The hidden form fields (token, pending sign-in) of a console page."""
    return {name: html.unescape(value) for name, value in _FIELD.findall(page)}


def sign_in(http: httpx.Client, code: str) -> None:
    """Both sign-in steps through the pages, as a browser sends them."""
    headers = {"origin": str(http.base_url).rstrip("/"), "sec-fetch-site": "same-origin"}
    first = http.get("/signin")
    step = http.post(
        "/signin",
        data={**fields(first.text), "email": EMAIL, "password": PASSWORD},
        headers=headers,
    )
    done = http.post("/signin/code", data={**fields(step.text), "code": code}, headers=headers)
    if done.status_code != 303 or done.headers.get("location") != "/":
        raise SystemExit(f"poller: sign-in refused ({step.status_code}, {done.status_code})")


def poll(url: str, code: str, paths: list[str]) -> None:
    """Sign in, say "ready", then poll and reload every 2 s until SIGTERM; print the counts."""
    statuses: Counter[str] = Counter()
    stop = False

    def on_term(signum: int, frame: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    with httpx.Client(base_url=url, timeout=30) as http:
        sign_in(http, code)
        print("ready", flush=True)
        while not stop:
            started = time.monotonic()
            for path in paths:
                statuses[f"{path} {http.get(path).status_code}"] += 1
            time.sleep(max(0.0, POLL_SECONDS - (time.monotonic() - started)))
    print(json.dumps(statuses), flush=True)


# --- the sends ------------------------------------------------------------------------------


def enrol_watcher(factory: Any, settings: Settings) -> str:
    """An editor enrolled through the step functions; one of their recovery codes."""
    now = datetime.now(UTC)
    with unit_of_work(factory) as s:
        link = add_staff(s, email=EMAIL, role="editor", name="", now=now, actor="bench",
                         settings=settings)  # fmt: skip
    token = link.rsplit("/enrol/", 1)[1]
    with unit_of_work(factory) as s:
        secret = begin_enrolment(s, token=token, now=now, settings=settings).totp_secret
    with unit_of_work(factory) as s:
        codes = complete_enrolment(
            s, token=token, password=PASSWORD, password_again=PASSWORD,
            code=pyotp.TOTP(secret).at(now), now=now, client="127.0.0.1",
        )  # fmt: skip
    return codes[0]


class QuietServer(uvicorn.Server):
    """uvicorn leaving the signals alone: the benchmark stops it itself."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def start_console(settings: Settings, factory: Any, port: int) -> tuple[Any, Any]:
    """The console served on this event loop, as `newsletter run` serves it; (server, task)."""
    app = create_console_app(settings, factory, SystemClock())
    config = listener_config(app, settings, host="127.0.0.1", port=port)
    config.log_level = "warning"
    server = QuietServer(config)
    sock = socket.create_server(("127.0.0.1", port))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    return server, task


def start_poller(url: str, code: str, paths: str) -> subprocess.Popen[str]:
    """The poller process, signed in and polling when this returns."""
    proc = subprocess.Popen(
        [sys.executable, __file__, "--poll", url, "--code", code, "--paths", paths],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        raise SystemExit("poller did not start")
    return proc


def stop_poller(proc: subprocess.Popen[str]) -> dict[str, int]:
    """Stop the poller; its requests by path and status."""
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    counts: dict[str, int] = json.loads(out.strip().splitlines()[-1])
    return counts


async def one_send(
    settings: Settings, factory: Any, n: int, *, console: bool, paths: str
) -> tuple[float, float, dict[str, int]]:
    """Seeded campaign → enqueue → deliver, timed; with the console watched, or not.

    Returns messages per second, this process's CPU seconds per 1000 messages (the sender and
    the console, not the poller or the sink), and the poller's requests by status.
    """
    cid = seed(factory, n)
    server = task = poller = None
    if console:
        code = enrol_watcher(factory, settings)
        server, task = await start_console(settings, factory, console_port(settings))
        poller = await asyncio.to_thread(start_poller, settings.console.base_url, code, paths)
    pool = SmtpPool(settings.smtp)
    try:
        t0, cpu0 = time.perf_counter(), cpu_seconds()
        await asyncio.to_thread(start_sending, factory, settings, cid)
        report = await deliver_queued(
            factory=factory, settings=settings, transport=pool, clock=SystemClock()
        )
        elapsed, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    finally:
        await pool.close()
        counts = await asyncio.to_thread(stop_poller, poller) if poller else {}
        if server is not None and task is not None:
            server.should_exit = True
            await task
    if report.sent != n:
        raise SystemExit(f"sent {report.sent} of {n}")
    return n / elapsed, cpu * 1000 / n, counts


def cpu_seconds() -> float:
    """User and system CPU time of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def console_port(settings: Settings) -> int:
    """The port in [console] base_url."""
    return int(settings.console.base_url.rsplit(":", 1)[1])


def make_settings(url: str, sink_port: int, args: argparse.Namespace) -> Settings:
    """send.py's settings, with a console base_url on a free port."""
    settings = load_settings(None, {"NEWSLETTER_SECRET": SECRET, "NEWSLETTER_DATABASE_URL": url})
    smtp = replace(settings.smtp, host="127.0.0.1", port=sink_port,
                   batch_size=args.batch_size, pool_size=args.pool_size)  # fmt: skip
    console = replace(settings.console, base_url=f"http://127.0.0.1:{free_port()}")
    return replace(settings, smtp=smtp, console=console)


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def listed(values: list[float]) -> str:
    return ", ".join(f"{v:,.0f}" for v in values)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=2, help="pairs of sends, ABBA order")
    ap.add_argument(
        "--sink",
        choices=["postfix", "aiosmtpd"],
        default="postfix" if Path("/usr/sbin/smtp-sink").exists() else "aiosmtpd",
    )
    ap.add_argument("--database", help="SQLAlchemy URL (PostgreSQL: the server to use)")
    # The configuration's defaults, as an operator gets them.
    ap.add_argument("--pool-size", type=int, default=Settings().smtp.pool_size)
    ap.add_argument("--batch-size", type=int, default=Settings().smtp.batch_size)
    ap.add_argument("--paths", default=PAGES, help="what the poller fetches every 2 s")
    ap.add_argument("--poll", help=argparse.SUPPRESS)
    ap.add_argument("--code", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.poll:
        poll(args.poll, args.code, args.paths.split(","))
        return
    order = [bool(i % 4 in (1, 2)) for i in range(2 * args.rounds)]  # off, on, on, off, ...
    work = Path(tempfile.mkdtemp(prefix="nl-bench-console-"))
    sink_port = free_port()
    sink = start_sink(args.sink, sink_port)
    time.sleep(0.5)
    databases = Database(args.database, work)
    rates: dict[bool, list[float]] = {False: [], True: []}
    cpus: dict[bool, list[float]] = {False: [], True: []}
    requests: Counter[str] = Counter()
    try:
        for i, console in enumerate(order):
            url = databases.fresh(f"r{i}")
            engine = make_engine(url)
            migrate(engine)
            settings = make_settings(url, sink_port, args)
            factory = make_sessionmaker(engine)
            rate, cpu, counts = asyncio.run(
                one_send(settings, factory, args.n, console=console, paths=args.paths)
            )
            engine.dispose()
            rates[console].append(rate)
            cpus[console].append(cpu)
            requests.update(counts)
            print(f"send {i + 1}: {'with' if console else 'without'} the console: "
                  f"{rate:,.0f} msg/s, {cpu * 1000:.0f} ms CPU per 1000", flush=True)  # fmt: skip
    finally:
        stop_sink(sink)
        databases.drop_all()
        shutil.rmtree(work, ignore_errors=True)
    where = "SQLite" if not args.database or args.database.startswith("sqlite") else "PostgreSQL"
    print(f"sink {args.sink}; {where}; recipients {args.n}; pool_size {args.pool_size}; "
          f"batch_size {args.batch_size}; {len(order)} sends, ABBA")  # fmt: skip
    print(f"console requests: {dict(sorted(requests.items()))}")
    refused = {k: v for k, v in requests.items() if not k.endswith(" 200")}
    if refused:
        raise SystemExit(f"the poller was refused: {refused}")
    off, on = mean(rates[False]), mean(rates[True])
    print(f"without the console: {off:,.0f} msg/s (each send: {listed(rates[False])})")
    print(
        f"with the dashboard open and refreshing every {POLL_SECONDS:.0f} s: {on:,.0f} msg/s "
        f"(each send: {listed(rates[True])})"
    )
    cpu_off, cpu_on = mean(cpus[False]), mean(cpus[True])
    print(
        f"sender process CPU per 1000 messages: {cpu_off * 1000:.0f} ms without, "
        f"{cpu_on * 1000:.0f} ms with ({(cpu_on - cpu_off) / cpu_off:+.1%})"
    )
    slowdown = (off - on) / off
    print(f"slowdown: {slowdown:.1%} ({'within' if slowdown <= 0.05 else 'OVER'} the 5% budget)")


if __name__ == "__main__":
    main()
