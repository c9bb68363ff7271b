"""`newsletter subscribers ...` and `newsletter lists ...`: the audience from the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from sqlalchemy import func, select

from newsletter.audience import import_rows, read_csv, read_lists, sync_lists
from newsletter.cli import State, app, console, err_console
from newsletter.cli.service import default_lists_file
from newsletter.db import unit_of_work
from newsletter.db.models import MailingList, Subscriber, Subscription, SubscriptionStatus

subscribers_app = typer.Typer(help="Manage subscribers.", no_args_is_help=True)
lists_app = typer.Typer(help="Manage lists.", no_args_is_help=True)
app.add_typer(subscribers_app, name="subscribers")
app.add_typer(lists_app, name="lists")

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


@subscribers_app.command("import")
def import_(
    ctx: typer.Context,
    file: Annotated[
        Path,
        typer.Argument(
            help="CSV with an 'email' column; also name, language, "
            "lists, tags, country and any custom columns."
        ),
    ],
    list_slug: Annotated[
        str | None, typer.Option("--list", help="List for rows without a 'lists' column.")
    ] = None,
    confirmed: Annotated[
        bool, typer.Option("--confirmed", help="The people already confirmed (no opt-in mail).")
    ] = False,
    rejects: Annotated[
        Path | None, typer.Option(help="Where to write rejected rows (default: FILE.rejects.csv).")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Import subscribers from CSV; bad rows go to a rejects file, good rows go in."""
    state: State = ctx.obj
    secret = state.settings.security.require_secret()
    with unit_of_work(state.factory()) as session:
        report = import_rows(
            session=session,
            rows=read_csv(file),
            default_list=list_slug,
            confirmed=confirmed,
            secret=secret,
            now=state.clock.now(),
            actor=state.actor,
        )
    if report.rejects:
        path = rejects or file.with_suffix(".rejects.csv")
        path.write_text(
            "line,reason\n"
            + "".join(
                f'{line},"{reason.replace(chr(34), chr(39))}"\n' for line, reason in report.rejects
            ),
            encoding="utf-8",
        )
        err_console.print(f"{len(report.rejects)} rows rejected: see {path}")
    counts = {
        "imported": report.imported,
        "updated": report.updated,
        "unchanged": report.unchanged,
        "kept_out": report.kept_out,
        "rejected": len(report.rejects),
    }
    if as_json:
        console.print_json(json.dumps(counts))
    else:
        console.print(", ".join(f"{k.replace('_', ' ')} {v}" for k, v in counts.items()))


@subscribers_app.command("list")
def list_(
    ctx: typer.Context,
    list_slug: Annotated[str | None, typer.Option("--list", help="Only this list.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many rows.")] = 50,
    as_json: JsonOption = False,
) -> None:
    """List subscribers (address, name, language, status)."""
    state: State = ctx.obj
    with unit_of_work(state.factory()) as session:
        stmt = select(Subscriber).order_by(Subscriber.id).limit(limit)
        if list_slug:
            stmt = stmt.join(Subscription).join(MailingList).where(MailingList.slug == list_slug)
        rows = [(s.email, s.name, s.language, s.status) for s in session.scalars(stmt)]
    if as_json:
        console.print_json(
            json.dumps(
                [dict(zip(("email", "name", "language", "status"), r, strict=True)) for r in rows]
            )
        )
        return
    table = Table("email", "name", "language", "status")
    for r in rows:
        table.add_row(*r)
    console.print(table)


@lists_app.command("list")
def lists_list(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Show the lists with their kind and number of active subscribers."""
    state: State = ctx.obj
    with unit_of_work(state.factory()) as session:
        active = (
            select(func.count())
            .where(
                Subscription.list_id == MailingList.id,
                Subscription.status == SubscriptionStatus.ACTIVE,
            )
            .scalar_subquery()
        )
        rows = session.execute(
            select(MailingList.slug, MailingList.kind, MailingList.list_id, active).order_by(
                MailingList.slug
            )
        ).all()
    if as_json:
        console.print_json(
            json.dumps(
                [{"slug": r[0], "kind": r[1], "list_id": r[2], "active": r[3]} for r in rows]
            )
        )
        return
    table = Table("slug", "kind", "List-Id", "active subscribers")
    for slug, kind, list_id, n in rows:
        table.add_row(slug, kind, list_id, str(n))
    console.print(table)


@lists_app.command("sync")
def lists_sync(
    ctx: typer.Context,
    file: Annotated[
        Path | None, typer.Argument(help="Declarations (default: subscribers/lists.toml).")
    ] = None,
) -> None:
    """Apply the list declarations to the database."""
    state: State = ctx.obj
    with unit_of_work(state.factory()) as session:
        report = sync_lists(session=session, specs=read_lists(file or default_lists_file()))
    console.print(f"lists: created {len(report.created)}, updated {len(report.updated)}")
    for slug in report.missing:
        err_console.print(f"[yellow]warning:[/yellow] list '{slug}' is no longer declared; kept")
