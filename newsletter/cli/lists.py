"""`newsletter lists ...`: the lists people subscribe to."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from sqlalchemy.orm import Session

from newsletter.cli import State, app, console, print_json, say
from newsletter.db import unit_of_work
from newsletter.lists import (
    DeclarationsReport,
    ListSpec,
    create_list,
    default_list_id,
    get_list,
    list_counts,
    list_overview,
    sync_declarations,
)

PROJECT = Path(__file__).resolve().parents[2]

lists_app = typer.Typer(help="Manage lists.", no_args_is_help=True)
app.add_typer(lists_app, name="lists")

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def default_lists_file() -> Path:
    """./subscribers/lists.toml if there is one, else the project's own."""
    local = Path("subscribers/lists.toml")
    return local if local.is_file() else PROJECT / "subscribers" / "lists.toml"


def apply_declarations(
    state: State, session: Session, lists_file: Path | None, segments_file: Path | None
) -> DeclarationsReport:
    """Apply the list declarations and the segments beside them (`init` and `lists sync`)."""
    lists_path = lists_file or default_lists_file()
    return sync_declarations(
        session=session,
        lists_file=lists_path,
        segments_file=segments_file or lists_path.with_name("segments.toml"),
        from_address=state.settings.mail.from_address,
    )


def say_declarations(report: DeclarationsReport) -> None:
    """What applying the declarations changed, and what is no longer declared but kept."""
    lists = report.lists
    console.print(
        f"lists: created {len(lists.created)}, updated {len(lists.updated)}; "
        f"segments: created {report.segments_created}, updated {report.segments_updated}"
    )
    for slug in lists.missing:
        say(
            "warning:",
            "yellow",
            f"list '{slug}' is in the database but no longer declared; "
            "it was kept with its subscriptions",
        )
    for name in report.segments_undeclared:
        say("warning:", "yellow", f"segment '{name}' is no longer declared; kept")


@lists_app.command("list")
def lists_list(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Show the lists with their kind and number of active subscribers."""
    state: State = ctx.obj
    with unit_of_work(state.factory()) as session:
        rows = list_overview(session)
    if as_json:
        print_json(
            [
                {"slug": r.slug, "kind": r.kind, "list_id": r.list_id, "active": r.active}
                for r in rows
            ]
        )
        return
    table = Table("slug", "kind", "List-Id", "active subscribers")
    for r in rows:
        table.add_row(r.slug, r.kind, r.list_id, str(r.active))
    console.print(table)


@lists_app.command("show")
def lists_show(ctx: typer.Context, slug: str, as_json: JsonOption = False) -> None:
    """Show one list: names, kind, double opt-in, List-Id and subscriptions by status."""
    state: State = ctx.obj
    with unit_of_work(state.factory()) as session:
        ml = get_list(session, slug)
        info = {
            "slug": ml.slug,
            "kind": ml.kind,
            "double_opt_in": ml.double_opt_in,
            "list_id": ml.list_id,
            "names": ml.names,
            "subscriptions": list_counts(session, ml.id),
        }
    if as_json:
        print_json(info)
        return
    for key, value in info.items():
        console.print(
            f"{key}: {json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else value}"
        )


@lists_app.command("create")
def lists_create(
    ctx: typer.Context,
    slug: str,
    kind: Annotated[str, typer.Option(help="digest or alerts.")],
    name: Annotated[
        list[str] | None, typer.Option(help="LANG=NAME, e.g. en='Weekly digest' (repeatable).")
    ] = None,
    double_opt_in: Annotated[
        bool, typer.Option("--double-opt-in/--no-double-opt-in", help="Ask new people to confirm.")
    ] = True,
    list_id: Annotated[
        str,
        typer.Option(help="The List-Id header (default: SLUG.<domain of [mail] from_address>)."),
    ] = "",
) -> None:
    """Create a list in the database (also declare it in subscribers/lists.toml to keep it)."""
    state: State = ctx.obj
    names = dict(part.split("=", 1) for part in name or [] if "=" in part)
    from_address = state.settings.mail.from_address
    spec = ListSpec(
        slug,
        kind,
        double_opt_in,
        list_id or default_list_id(slug, from_address=from_address),
        names,
    )
    with unit_of_work(state.factory()) as session:
        create_list(session=session, spec=spec, now=state.clock.now(), actor=state.actor)
    console.print(f"list '{slug}' created; declare it in subscribers/lists.toml to keep it there")


@lists_app.command("sync")
def lists_sync(
    ctx: typer.Context,
    file: Annotated[
        Path | None, typer.Argument(help="Declarations (default: subscribers/lists.toml).")
    ] = None,
    segments: Annotated[
        Path | None, typer.Option(help="Segments (default: segments.toml beside the lists).")
    ] = None,
) -> None:
    """Apply the list and segment declarations to the database."""
    state: State = ctx.obj
    with unit_of_work(state.factory()) as session:
        report = apply_declarations(state, session, file, segments)
    say_declarations(report)
