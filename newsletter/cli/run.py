"""`newsletter run` (the long-running service) and `newsletter status`."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer
from rich.table import Table

from newsletter.cli import State, app, console, one_line, print_json
from newsletter.db import unit_of_work
from newsletter.logs import configure_logging
from newsletter.status import service_status


@app.command()
def run(
    ctx: typer.Context,
    host: Annotated[str | None, typer.Option(help="Web address (default: [web] host).")] = None,
    port: Annotated[int | None, typer.Option(help="Web port (default: [web] port).")] = None,
) -> None:
    """Run the service: scheduler, sender and web pages, until SIGTERM or Ctrl-C."""
    from newsletter.service import Service, run_service

    state: State = ctx.obj
    settings = state.settings
    settings.security.require_secret()
    configure_logging(settings.logging)
    engine = state.engine()

    async def main() -> None:
        service = Service(
            settings=settings, engine=engine, factory=state.factory(), clock=state.clock
        )
        await run_service(service, host=host or settings.web.host, port=port or settings.web.port)

    asyncio.run(main())


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
    columns = ("id", "kind", "list", "status", "queued", "sent", "deferred", "failed")
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
