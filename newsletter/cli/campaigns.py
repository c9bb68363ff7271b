"""`newsletter campaigns list|show|pause|resume|cancel|retry`: watch and steer campaigns."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any

import typer
from rich.console import Group
from rich.live import Live
from rich.table import Table
from sqlalchemy import select
from sqlalchemy.orm import Session

from newsletter.campaigns import (
    cancel_campaign,
    get_campaign,
    pause_campaign,
    resume_campaign,
    retry_campaign,
)
from newsletter.cli import State, app, console, one_line, print_json
from newsletter.db import unit_of_work
from newsletter.db.models import Campaign, CampaignStatus
from newsletter.db.queries import delivery_counts
from newsletter.metrics import campaign_failures, campaign_progress

campaigns_app = typer.Typer(help="Campaigns: digests and alerts.", no_args_is_help=True)
app.add_typer(campaigns_app, name="campaigns")


# Deliveries by status, as `campaigns show` tabulates them.
SHOWN_COUNTS = ("sent", "queued", "deferred", "failed", "suppressed", "withheld")


@campaigns_app.command("list")
def list_(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option(min=1, help="At most this many, newest first.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """List campaigns, newest first, with their delivery counts."""
    state: State = ctx.obj
    with unit_of_work(state.factory()) as session:
        rows: list[dict[str, Any]] = []
        for c in session.scalars(select(Campaign).order_by(Campaign.id.desc()).limit(limit)):
            rows.append(
                {
                    "id": c.id,
                    "kind": c.kind,
                    "list": c.mailing_list.slug,
                    "status": c.status,
                    "created_at": c.created_at.isoformat(),
                    **delivery_counts(session, c.id),
                }
            )
    if as_json:
        print_json(rows)
        return
    table = Table("id", "kind", "list", "status", "created", "sent", "queued", "deferred", "failed")
    for r in rows:
        cells = [str(r.get(k, 0)) for k in ("id", "kind", "list", "status", "created_at")]
        cells[4] = cells[4][:16]
        table.add_row(*cells, *(str(r.get(k, 0)) for k in ("sent", "queued", "deferred", "failed")))
    console.print(table)


@campaigns_app.command("show")
def show(
    ctx: typer.Context,
    campaign_id: Annotated[int, typer.Argument(help="Campaign id.")],
    watch: Annotated[
        bool, typer.Option("--watch", help="Refresh every 2 s until it ends (Ctrl-C to stop).")
    ] = False,
    failures: Annotated[
        bool, typer.Option("--failures", help="List failed addresses with the SMTP reply.")
    ] = False,
    limit: Annotated[int, typer.Option(min=1, help="At most this many failures.")] = 100,
) -> None:
    """Show one campaign: what it carries, how its deliveries stand, rate and time left."""
    state: State = ctx.obj
    factory = state.factory()
    if not watch:
        with unit_of_work(factory) as session:
            console.print(describe(session, campaign_id, state.clock.now()))
            if failures:
                console.print(failure_table(session, campaign_id, limit))
        return
    with Live(console=console, auto_refresh=False) as live:
        while True:
            with unit_of_work(factory) as session:
                live.update(describe(session, campaign_id, state.clock.now()), refresh=True)
                status = get_campaign(session, campaign_id).status
            if status in (CampaignStatus.FINISHED, CampaignStatus.CANCELLED):
                break
            time.sleep(2)


def describe(session: Session, campaign_id: int, now: datetime) -> Group:
    """The campaign's header, items and a table of its progress."""
    c = get_campaign(session, campaign_id)
    progress = campaign_progress(session, c.id, now=now)
    # Plain strings, not Text: the console prints them literally, controls escaped.
    lines: list[Any] = [
        f"campaign {c.id}: {c.kind} to '{c.mailing_list.slug}', {c.status}",
        f"created {c.created_at:%Y-%m-%d %H:%M} UTC by {one_line(c.created_by)}"
        + (f", approved by {one_line(c.approved_by)}" if c.approved_by else ""),
    ]
    if c.pause_reason:
        lines.append(f"paused: {one_line(c.pause_reason)}")
    lines += [f"  - {one_line(title)}" for title in [i.title for i in c.items] or [c.title]]
    table = Table(
        "recipients",
        "sent",
        "queued",
        "deferred",
        "failed",
        "suppressed",
        "withheld",
        "per minute",
        "time left",
    )
    counts = progress.counts
    left = progress.time_left
    table.add_row(
        str(sum(counts.values())),
        *(str(counts.get(k, 0)) for k in SHOWN_COUNTS),
        str(progress.per_minute),
        str(left).split(".")[0] if left else ("-" if progress.pending else "done"),
    )
    return Group(*lines, table)


def failure_table(session: Session, campaign_id: int, limit: int) -> Table:
    """Failed addresses of a campaign with the server's last reply."""
    table = Table("address", "last SMTP reply", title="failed deliveries")
    for email, reply in campaign_failures(session, campaign_id, limit=limit):
        table.add_row(email, one_line(reply or ""))
    return table


def _change(ctx: typer.Context, campaign_id: int, verb: str, step: Callable[..., Campaign]) -> None:
    state: State = ctx.obj
    with unit_of_work(state.factory()) as session:
        c = step(session=session, campaign_id=campaign_id, now=state.clock.now(), actor=state.actor)
        console.print(f"campaign {c.id} {verb}: {c.status}")


@campaigns_app.command("pause")
def pause(
    ctx: typer.Context,
    campaign_id: Annotated[int, typer.Argument(help="Campaign id.")],
    reason: Annotated[str, typer.Option(help="Why, kept with the campaign.")] = "",
) -> None:
    """Pause a running campaign: senders stop claiming within a second, in-flight mail finishes."""
    state: State = ctx.obj
    why = reason or f"paused by {state.actor}"
    _change(ctx, campaign_id, "paused", functools.partial(pause_campaign, reason=why))


@campaigns_app.command("resume")
def resume(
    ctx: typer.Context, campaign_id: Annotated[int, typer.Argument(help="Campaign id.")]
) -> None:
    """Resume a paused campaign; only what was not sent goes out (run `newsletter send`)."""
    _change(ctx, campaign_id, "resumed", resume_campaign)


@campaigns_app.command("cancel")
def cancel(
    ctx: typer.Context, campaign_id: Annotated[int, typer.Argument(help="Campaign id.")]
) -> None:
    """Cancel a campaign for good; every delivery stays on record as it is."""
    _change(ctx, campaign_id, "cancelled", cancel_campaign)


@campaigns_app.command("retry")
def retry(
    ctx: typer.Context, campaign_id: Annotated[int, typer.Argument(help="Campaign id.")]
) -> None:
    """Queue a campaign's failed deliveries again (only those; bounced people stay out)."""
    state: State = ctx.obj
    with unit_of_work(state.factory()) as session:
        count = retry_campaign(
            session=session, campaign_id=campaign_id, now=state.clock.now(), actor=state.actor
        )
    console.print(f"campaign {campaign_id}: {count} failed deliveries queued again")
