"""`newsletter send --workers N`: N sender processes on this machine under one progress bar.

Each worker is a `newsletter send` process of its own (its own event loop, GIL and connection
pool) that claims batches from the shared database exactly as a worker on another machine
would: PostgreSQL's `FOR UPDATE SKIP LOCKED` (or SQLite's write lock) keeps them apart, and a
worker that dies leaves its claims to the lease. Workers report each batch as one JSON line on
stdout; this parent adds them up for the progress bar and the summary, and passes SIGTERM and
SIGINT on, so a stop is as graceful as with one process. Any other line a worker prints (a
library's warning, a print left in a plugin) is passed on to stderr, made safe for a terminal:
it must not stop the parent, which would take the workers down with it mid-send.

A relay's `rate_per_second` and `hourly_limit` hold for the whole group: each of N workers takes
1/N of them (and 1/N of the last hour's sends, for the hourly cap).
"""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, fields, replace
from types import FrameType
from typing import IO, Any

from newsletter.cli import State, one_line
from newsletter.cli.progress import done_count, print_summary, progress_stats, send_progress
from newsletter.config import Settings
from newsletter.errors import ConfigError, WorkerError
from newsletter.send import SendReport, count_due_now, deliver_all


def report_to_json(report: SendReport) -> str:
    """One line of JSON for a report."""
    return json.dumps(asdict(report), separators=(",", ":"))


def report_from_json(data: dict[str, Any]) -> SendReport:
    """The report a worker printed; ValueError for keys or values of any other shape."""
    counts = {f.name for f in fields(SendReport)} - {"finished", "paused", "stopped"}
    if not set(data) <= counts | {"finished", "paused", "stopped"}:
        raise ValueError("unknown keys")
    if any(type(data.get(k, 0)) is not int for k in counts):  # bool is an int: not here
        raise ValueError("a count is not a whole number")
    finished, paused = data.get("finished", []), data.get("paused", {})
    if not isinstance(finished, list) or any(type(c) is not int for c in finished):
        raise ValueError("finished is not a list of campaign ids")
    if not isinstance(paused, dict) or any(not isinstance(r, str) for r in paused.values()):
        raise ValueError("paused is not campaigns and reasons")
    if not isinstance(data.get("stopped", False), bool):
        raise ValueError("stopped is not true or false")
    report = SendReport(**{k: data[k] for k in counts | {"stopped"} if k in data})
    report.finished = list(finished)
    report.paused = {int(c): r for c, r in paused.items()}
    return report


def check_shares(settings: Settings, count: int) -> None:
    """Refuse a worker count that would leave a worker no share of a relay's hourly cap.

    A share of 0 would read as "no cap" in that worker, so the group could pass the cap.
    """
    smtp = settings.smtp
    caps = [("[smtp] hourly_limit", smtp.hourly_limit)]
    caps += [(f"relay {r.label} hourly_limit", r.hourly_limit) for r in smtp.relays]
    for name, limit in caps:
        if 0 < limit < count:
            raise ConfigError(
                f"{name} = {limit} is smaller than --workers {count}: use at most {limit} workers"
            )


def share_of(settings: Settings, index: int, count: int) -> Settings:
    """Settings with every relay's rate and hourly cap cut to worker `index`'s share of `count`."""

    def part(limit: int) -> int:
        return limit // count + (1 if index < limit % count else 0)

    smtp = settings.smtp
    relays = tuple(
        replace(r, rate_per_second=r.rate_per_second / count, hourly_limit=part(r.hourly_limit))
        for r in smtp.relays
    )
    smtp = replace(
        smtp,
        rate_per_second=smtp.rate_per_second / count,
        hourly_limit=part(smtp.hourly_limit),
        relays=relays,
    )
    return replace(settings, smtp=smtp)


def deliver_as_worker(
    state: State, *, campaign_id: int | None, index: int, count: int
) -> SendReport:
    """Run as worker `index` of `count`: each batch's report and then the total, as JSON lines."""

    def emit(batch: SendReport) -> None:
        sys.stdout.write(report_to_json(batch) + "\n")
        sys.stdout.flush()

    report = deliver_all(
        factory=state.factory(),
        settings=share_of(state.settings, index, count),
        clock=state.clock,
        campaign_id=campaign_id,
        on_batch=emit,
        share=(index, count),
        handle_signals=True,
    )
    sys.stdout.write(json.dumps({"final": asdict(report)}) + "\n")
    sys.stdout.flush()
    return report


def worker_argv(state: State, *, campaign_id: int | None, index: int, count: int) -> list[str]:
    """The command line of one worker process."""
    argv = [sys.executable, "-m", "newsletter"]
    if state.config:
        argv += ["--config", state.config]
    if state.debug:
        argv.append("--debug")
    argv += ["send", "--worker-of", f"{index}/{count}"]
    if campaign_id is not None:
        argv += ["--campaign", str(campaign_id)]
    return argv


Lines = queue.SimpleQueue[tuple[int, str | None]]

MAX_SHOWN = 500  # characters of a stray worker line shown on stderr


def worker_report(line: str) -> tuple[bool, SendReport] | None:
    """A worker's report (and whether it is its final one), or None for any other line."""
    try:
        data = json.loads(line)
        final = isinstance(data, dict) and set(data) == {"final"}
        report = report_from_json(data["final"] if final else data)
    except (ValueError, TypeError, AttributeError, RecursionError):  # not JSON, or not a report
        return None
    return final, report


def stray_line(index: int, line: str) -> str:
    """A line a worker printed that is not a report, as one safe line for stderr."""
    text = line.rstrip("\r\n")
    cut = "…" if len(text) > MAX_SHOWN else ""
    return f"worker #{index}: {one_line(text[:MAX_SHOWN])}{cut}"


def _read_lines(index: int, stream: IO[str], into: Lines) -> None:
    for line in stream:
        into.put((index, line))
    into.put((index, None))


def deliver_with_workers(state: State, *, campaign_id: int | None, workers: int) -> SendReport:
    """Start `workers` sender processes, show their progress as one, and sum up what they did."""
    check_shares(state.settings, workers)
    total = count_due_now(factory=state.factory(), clock=state.clock, campaign_id=campaign_id)
    started, seen, finals = time.monotonic(), SendReport(), SendReport()
    lines: Lines = queue.SimpleQueue()
    procs = [
        subprocess.Popen(
            worker_argv(state, campaign_id=campaign_id, index=i, count=workers),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(workers)
    ]
    readers = [
        threading.Thread(target=_read_lines, args=(i, p.stdout, lines), daemon=True)
        for i, p in enumerate(procs)
    ]
    for reader in readers:
        reader.start()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def pass_on(signum: int, _frame: FrameType | None) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    for sig in previous:
        signal.signal(sig, pass_on)
    try:
        with send_progress(total) as progress:
            task = progress.add_task(f"sending ({workers} workers)", total=total, stats="")
            open_streams = workers
            while open_streams:
                try:
                    index, line = lines.get(timeout=0.5)
                except queue.Empty:
                    continue
                if line is None:
                    open_streams -= 1
                    continue
                got = worker_report(line)
                if got is None:
                    progress.console.print(stray_line(index, line), markup=False, soft_wrap=True)
                    continue
                final, report = got
                if final:
                    finals.add(report)
                    continue
                seen.add(report)
                progress.update(
                    task, completed=done_count(seen), stats=progress_stats(seen, started)
                )
        codes = [proc.wait() for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stdout:
                proc.stdout.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print_summary(finals, seconds=time.monotonic() - started)
    failed = [(i, code) for i, code in enumerate(codes) if code != 0]
    if failed:
        raise WorkerError(
            "sender worker(s) failed: "
            + ", ".join(f"#{i} exited {code}" for i, code in failed)
            + "; what they sent is recorded, run `newsletter send` again for the rest"
        )
    return finals
