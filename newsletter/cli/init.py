"""`newsletter init`: create or upgrade the database, apply the declarations."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from newsletter.cli import State, app, console
from newsletter.cli.lists import apply_declarations, say_declarations
from newsletter.db import make_sessionmaker, migrate, unit_of_work


@app.command()
def init(
    ctx: typer.Context,
    lists: Annotated[
        Path | None,
        typer.Option(help="List declarations to apply (default: subscribers/lists.toml)."),
    ] = None,
) -> None:
    """Create or upgrade the database, then apply the list and segment declarations."""
    state: State = ctx.obj
    engine = state.engine(checked=False)
    migrate(engine)
    with unit_of_work(make_sessionmaker(engine)) as session:
        report = apply_declarations(state, session, lists, None)
    console.print(f"database ready: {engine.url.render_as_string(hide_password=True)}")
    say_declarations(report)
