"""`newsletter ingest`: fetch and store new portal items."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from newsletter.cli import State, app, console, one_line
from newsletter.config import FeedSource
from newsletter.errors import ConfigError
from newsletter.ingest import describe_report, ingest_all


@app.command()
def ingest(
    ctx: typer.Context,
    sources: Annotated[
        list[str] | None,
        typer.Argument(help="Feed URLs or files; none = every source in [sources] feeds."),
    ] = None,
) -> None:
    """Fetch and store new portal items; one bad source never stops the others."""
    state: State = ctx.obj
    settings = state.settings
    feeds = [FeedSource(url=s) for s in sources] if sources else list(settings.sources.feeds)
    if not feeds:
        raise ConfigError(
            f"{settings.source_path}: no sources: give a URL or file, or set [sources] feeds"
        )
    reports = ingest_all(
        factory=state.factory(),
        sources=[(f.url, f.name, f.lang) for f in feeds],
        settings=settings.sources,
        clock=state.clock,
    )
    table = Table("source", "new", "updated", "unchanged", "result")
    for r in reports:
        result = describe_report(r)  # an error, busy, not modified or ok; and any redirect
        table.add_row(r.source, str(r.new), str(r.updated), str(r.unchanged), one_line(result))
    console.print(table)
    if any(r.error for r in reports):
        raise typer.Exit(1)
