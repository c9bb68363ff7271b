"""`newsletter campaigns list|show`: what was sent, to how many, how it went."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.table import Table
from sqlalchemy import select

from newsletter.campaigns import get_campaign
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
        console.print(f"created {c.created_at:%Y-%m-%d %H:%M} UTC by {c.created_by}")
        for item in c.items:
            console.print(f"  - {item.title}")
        if c.title:
            console.print(f"  - {c.title}")
        console.print(", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "no deliveries")
