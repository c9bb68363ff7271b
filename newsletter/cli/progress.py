"""The sending progress bar and summary that `send`, `digest send` and `alert send` print."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from newsletter.cli import State, console, err_console, say
from newsletter.send import SendReport

REFRESH_SECONDS = 0.1  # how often the sending figures are brought up to date


def send_progress(total: int) -> Progress:
    """The sending progress bar: done of total, then sent/deferred/failed and the rate."""
    return Progress(
        TextColumn("{task.description}", style="progress.description", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}", markup=False),
        console=err_console,
        transient=True,
        disable=total == 0,
    )


def deliver_with_progress(
    state: State, *, campaign_id: int | None = None, workers: int = 1
) -> SendReport:
    """Deliver what is due (of one campaign, or all), with a progress bar and a summary.

    SIGTERM and SIGINT stop gracefully: in-flight messages finish and are recorded, claims not
    yet attempted are released, and the command exits 0. With `workers` > 1 that many sender
    processes share the work (newsletter.cli.workers) under this one progress bar.
    """
    import time

    from newsletter.lock import check_clock
    from newsletter.send import count_due_now, deliver_all

    factory = state.factory()
    check_clock(factory, state.settings)
    if workers > 1:
        from newsletter.cli.workers import deliver_with_workers

        return deliver_with_workers(state, campaign_id=campaign_id, workers=workers)
    total = count_due_now(factory=factory, clock=state.clock, campaign_id=campaign_id)
    started, seen = time.monotonic(), SendReport()
    shown = [started]
    with send_progress(total) as progress:
        task = progress.add_task("sending", total=total, stats="")

        def advance(batch: SendReport) -> None:
            seen.add(batch)
            # The bar is drawn ten times a second; outcomes come in thousands a second, each
            # on the sender's own thread, so the figures are made for the bar no more often.
            if (now := time.monotonic()) - shown[0] >= REFRESH_SECONDS:
                shown[0] = now
                progress.update(
                    task, completed=done_count(seen), stats=progress_stats(seen, started)
                )

        report = deliver_all(
            factory=factory,
            settings=state.settings,
            clock=state.clock,
            campaign_id=campaign_id,
            on_batch=advance,
            handle_signals=True,
        )
    print_summary(report, seconds=time.monotonic() - started)
    return report


def done_count(report: SendReport) -> int:
    """Deliveries that reached an outcome (for the progress bar)."""
    return report.sent + report.deferred + report.failed + report.suppressed + report.withheld


def progress_stats(report: SendReport, started: float) -> str:
    """The progress bar's counts and rate."""
    import time

    rate = report.sent / max(time.monotonic() - started, 1e-6)
    return f"sent {report.sent} deferred {report.deferred} failed {report.failed} {rate:,.0f}/s"


def print_summary(report: SendReport, *, seconds: float) -> None:
    """One line of counts, then one line per campaign paused, and a note after a stop."""
    rate = report.sent / seconds if seconds > 0 else 0.0
    console.print(
        f"sent {report.sent}, deferred {report.deferred}, failed {report.failed}, "
        f"skipped (left the list, or nothing of a case to follow) {report.suppressed}"
        + (f", withheld (key unusable) {report.withheld}" if report.withheld else "")
        + f" in {seconds:.1f}s ({rate:,.0f}/s)"
        + (f"; finished campaign {', '.join(map(str, report.finished))}" if report.finished else "")
    )
    for cid, reason in report.paused.items():
        say(f"campaign {cid} paused:", "yellow", reason)
    if report.stopped:
        err_console.print(
            f"stopped on request; {report.released} claimed deliveries released for the next run"
        )
