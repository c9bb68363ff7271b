"""`newsletter status`: next digest, campaigns sending, last poll of each source, sent today."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from newsletter.cli import State, app, console, one_line, print_json
from newsletter.db import unit_of_work
from newsletter.metrics import BULK_SENDER_DAILY
from newsletter.status import service_status


@app.command()
def status(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """What is scheduled next, what is sending, and the last ingest of each source."""
    state: State = ctx.obj
    with unit_of_work(state.factory()) as session:
        report = service_status(session, settings=state.settings, now=state.clock.now())
    if as_json:
        print_json(report.as_json())
        return
    next_digest = report.next_digest
    console.print(f"scheduler: {report.scheduler}")
    console.print(f"next digest: {next_digest:%Y-%m-%d %H:%M %Z}" if next_digest else "no digest")
    columns = ("id", "kind", "list", "status", "queued", "sent", "deferred", "failed", "complaints")
    table = Table(*columns, title="campaigns not finished")
    for c in report.campaigns:
        table.add_row(*(str(c.get(k, 0)) for k in columns))
    console.print(table)
    sources_table = Table("source", "last poll (UTC)", "last error", title="sources")
    for s in report.sources:
        when = f"{s.last_fetched_at:%Y-%m-%d %H:%M}" if s.last_fetched_at else "never"
        stale = " (stale)" if report.is_stale(s) else ""
        sources_table.add_row(s.url, when + stale, one_line(s.last_error or ""))
    console.print(sources_table)
    day = report.providers
    providers_table = Table(
        *day.counts, title=f"sent since {day.day_start:%Y-%m-%d %H:%M} UTC, by provider"
    )
    providers_table.add_row(*(str(n) for n in day.counts.values()))
    console.print(providers_table)
    if day.warning:
        console.print(
            f"warning: over {BULK_SENDER_DAILY} messages today to {', '.join(day.over_bulk)}"
            " (the bulk-sender threshold) and `newsletter doctor` has not passed"
            + (" (never run)" if day.doctor_passed is None else ""),
            markup=False,
            soft_wrap=True,
        )
