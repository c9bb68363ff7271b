"""`newsletter run` (the long-running service) and `newsletter status`."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Annotated

import typer
from rich.table import Table
from sqlalchemy import select

from newsletter.cli import State, app, console, one_line, print_json
from newsletter.db import unit_of_work
from newsletter.db.models import Campaign, CampaignStatus
from newsletter.db.queries import delivery_counts
from newsletter.lock import lock_holder
from newsletter.logs import configure_logging
from newsletter.metrics import source_states
from newsletter.schedule import LOCK_NAME, digest_trigger


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
    now = state.clock.now()
    trigger = digest_trigger(state.settings)
    next_digest = trigger.get_next_fire_time(None, now)
    with unit_of_work(state.factory()) as session:
        holder = lock_holder(session, LOCK_NAME)
        sending = [
            {
                "id": c.id,
                "kind": c.kind,
                "list": c.mailing_list.slug,
                "status": c.status,
                **delivery_counts(session, c.id),
            }
            for c in session.scalars(
                select(Campaign).where(
                    Campaign.status.in_(
                        (CampaignStatus.RUNNING, CampaignStatus.PAUSED, CampaignStatus.DRAFT)
                    )
                )
            )
        ]
        sources = source_states(session)
    report = {
        "scheduler": holder or "not running",
        "next_digest": next_digest.isoformat() if next_digest else None,
        "next_poll_within_minutes": state.settings.schedule.poll_minutes,
        "campaigns": sending,
        "sources": [
            {
                "url": s.url,
                "last_fetched_at": s.last_fetched_at.isoformat() if s.last_fetched_at else None,
                "last_error": s.last_error,
            }
            for s in sources
        ],
    }
    if as_json:
        print_json(report)
        return
    console.print(f"scheduler: {report['scheduler']}")
    console.print(f"next digest: {next_digest:%Y-%m-%d %H:%M %Z}" if next_digest else "no digest")
    table = Table(
        "id",
        "kind",
        "list",
        "status",
        "queued",
        "sent",
        "deferred",
        "failed",
        title="campaigns not finished",
    )
    for c in sending:
        table.add_row(
            *(
                str(c.get(k, 0))
                for k in ("id", "kind", "list", "status", "queued", "sent", "deferred", "failed")
            )
        )
    console.print(table)
    sources_table = Table("source", "last poll (UTC)", "last error", title="sources")
    for s in sources:
        when = f"{s.last_fetched_at:%Y-%m-%d %H:%M}" if s.last_fetched_at else "never"
        age = now - s.last_fetched_at if s.last_fetched_at else None
        stale = age is not None and age > timedelta(hours=1)
        sources_table.add_row(
            s.url, when + (" (stale)" if stale else ""), one_line(s.last_error or "")
        )
    console.print(sources_table)
