"""`newsletter segments ...`: check who a segment reaches before sending to it."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table
from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session

from newsletter.audience import get_list
from newsletter.cli import State, app, console, print_json
from newsletter.db import unit_of_work
from newsletter.db.models import Segment, Subscriber
from newsletter.db.queries import audience_query
from newsletter.segments import compile_rule, get_segment

segments_app = typer.Typer(help="Check segments: rules that narrow a list.", no_args_is_help=True)
app.add_typer(segments_app, name="segments")

NameArg = Annotated[str | None, typer.Argument(help="A segment from subscribers/segments.toml.")]
RuleOption = Annotated[
    str | None, typer.Option(help="A rule to try instead of a named segment, e.g. 'lang = \"be\"'.")
]
ListOption = Annotated[str | None, typer.Option("--list", help="Only active members of this list.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def _where(session: Session, name: str | None, rule: str | None) -> ColumnElement[bool]:
    if (name is None) == (rule is None):
        raise typer.BadParameter("give a segment NAME or --rule, not both")
    return compile_rule(rule if rule is not None else get_segment(session, name or "").rule)


def _people(session: Session, where: ColumnElement[bool], list_slug: str | None) -> Any:
    """The subscribers a segment selects: active people, on a list when one is given."""
    if list_slug:
        ids = audience_query(get_list(session, list_slug).id, where)
        return select(Subscriber).where(Subscriber.id.in_(ids))
    return select(Subscriber).where(Subscriber.status == "active", where)


@segments_app.command("list")
def list_(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Show the segments and their rules."""
    state: State = ctx.obj
    with unit_of_work(state.factory()) as session:
        rows = [(s.name, s.rule) for s in session.scalars(select(Segment).order_by(Segment.name))]
    if as_json:
        print_json([{"name": n, "rule": r} for n, r in rows])
        return
    table = Table("name", "rule")
    for name, rule in rows:
        table.add_row(name, rule)
    console.print(table)


@segments_app.command("count")
def count(
    ctx: typer.Context,
    name: NameArg = None,
    rule: RuleOption = None,
    list_slug: ListOption = None,
    as_json: JsonOption = False,
) -> None:
    """How many active people a segment selects (on a list, with --list)."""
    state: State = ctx.obj
    with unit_of_work(state.factory()) as session:
        people = _people(session, _where(session, name, rule), list_slug).subquery()
        n = int(session.scalar(select(func.count()).select_from(people)) or 0)
    print_json({"count": n}) if as_json else console.print(str(n))


@segments_app.command("show")
def show(
    ctx: typer.Context,
    name: NameArg = None,
    rule: RuleOption = None,
    list_slug: ListOption = None,
    limit: Annotated[int, typer.Option(help="At most this many rows.")] = 20,
    as_json: JsonOption = False,
) -> None:
    """The first people a segment selects (address, name, language, country)."""
    state: State = ctx.obj
    with unit_of_work(state.factory()) as session:
        stmt = _people(session, _where(session, name, rule), list_slug)
        subs = session.scalars(stmt.order_by(Subscriber.id).limit(limit))
        rows = [(s.email, s.name, s.language, s.country) for s in subs]
    if as_json:
        keys = ("email", "name", "language", "country")
        print_json([dict(zip(keys, r, strict=True)) for r in rows])
        return
    table = Table("email", "name", "language", "country")
    for r in rows:
        table.add_row(*r)
    console.print(table)
