"""`newsletter campaigns list|show|pause|resume|cancel|retry`: watch and steer campaigns."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.table import Table
from sqlalchemy import select

from newsletter.campaigns import (
    cancel_campaign,
    get_campaign,
    pause_campaign,
    resume_campaign,
    retry_campaign,
)
from newsletter.cli import State, app, console
from newsletter.db import unit_of_work
from newsletter.db.models import Campaign
from newsletter.db.queries import delivery_counts

campaigns_app = typer.Typer(help="Campaigns: digests and alerts.", no_args_is_help=True)
app.add_typer(campaigns_app, name="campaigns")


@campaigns_app.command("list")
def list_(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 20,
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
        console.print_json(json.dumps(rows))
        return
    table = Table("id", "kind", "list", "status", "created", "sent", "queued", "deferred", "failed")
    for r in rows:
        cells = [str(r.get(k, 0)) for k in ("id", "kind", "list", "status", "created_at")]
        cells[4] = cells[4][:16]
        table.add_row(*cells, *(str(r.get(k, 0)) for k in ("sent", "queued", "deferred", "failed")))
    console.print(table)


@campaigns_app.command("show")
def show(
    ctx: typer.Context, campaign_id: Annotated[int, typer.Argument(help="Campaign id.")]
) -> None:
    """Show one campaign: what it carries and how its deliveries stand."""
    state: State = ctx.obj
    with unit_of_work(state.factory()) as session:
        c = get_campaign(session, campaign_id)
        counts = delivery_counts(session, c.id)
        console.print(f"campaign {c.id}: {c.kind} to '{c.mailing_list.slug}', {c.status}")
        if c.pause_reason:
            console.print(f"paused: {c.pause_reason}")
        console.print(f"created {c.created_at:%Y-%m-%d %H:%M} UTC by {c.created_by}")
        for item in c.items:
            console.print(f"  - {item.title}")
        if c.title:
            console.print(f"  - {c.title}")
        console.print(", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "no deliveries")


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
