"""`newsletter segments ...`: check who a segment reaches before sending to it."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table
from sqlalchemy import ColumnElement, select
from sqlalchemy.orm import Session

from newsletter.audience import count_selected, segment_where, show_selected
from newsletter.cli import State, app, console, print_json, say
from newsletter.db import unit_of_work
from newsletter.db.models import Segment
from newsletter.db.queries import stored_attribute_keys
from newsletter.segments import get_segment, rule_attributes

segments_app = typer.Typer(help="Check segments: rules that narrow a list.", no_args_is_help=True)
app.add_typer(segments_app, name="segments")

NameArg = Annotated[str | None, typer.Argument(help="A segment from subscribers/segments.toml.")]
RuleOption = Annotated[
    str | None, typer.Option(help="A rule to try instead of a named segment, e.g. 'lang = \"be\"'.")
]
ListOption = Annotated[
    str | None,
    typer.Option("--list", help="Only this list's audience (default: a campaign on any list)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def _where(session: Session, name: str | None, rule: str | None) -> ColumnElement[bool]:
    if (name is None) == (rule is None):
        raise typer.BadParameter("give a segment NAME or --rule, not both")
    where = segment_where(session, name=name, rule=rule)
    _warn_unknown_attributes(
        session, rule if rule is not None else get_segment(session, name or "").rule
    )
    return where


def _warn_unknown_attributes(session: Session, rule: str) -> None:
    """A warning for each attr.NAME nobody has: it compares as "" for everyone (a typo?)."""
    named = rule_attributes(rule)
    for key in sorted(named - stored_attribute_keys(session) if named else ()):
        say(
            "warning:", "yellow", f'nobody has the attribute {key!r}: attr.{key} is "" for everyone'
        )


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
    """How many people a campaign with this segment reaches (on one list, with --list)."""
    state: State = ctx.obj
    with unit_of_work(state.factory()) as session:
        where = _where(session, name, rule)
        n = count_selected(session, where=where, list_slug=list_slug)
    print_json({"count": n}) if as_json else console.print(str(n))


@segments_app.command("show")
def show(
    ctx: typer.Context,
    name: NameArg = None,
    rule: RuleOption = None,
    list_slug: ListOption = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many rows.")] = 20,
    as_json: JsonOption = False,
) -> None:
    """The first people a campaign with this segment reaches (address, name, language, country)."""
    state: State = ctx.obj
    with unit_of_work(state.factory()) as session:
        where = _where(session, name, rule)
        people = show_selected(session, where=where, list_slug=list_slug, limit=limit)
    rows = [(p.email, p.name, p.language, p.country) for p in people]
    if as_json:
        keys = ("email", "name", "language", "country")
        print_json([dict(zip(keys, r, strict=True)) for r in rows])
        return
    table = Table("email", "name", "language", "country")
    for r in rows:
        table.add_row(*r)
    console.print(table)
