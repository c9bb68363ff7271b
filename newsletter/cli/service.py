"""Service commands: init, ingest, send, dev-smtp, demo."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from newsletter.cli import State, app, console, deliver_with_progress, one_line
from newsletter.cli.lists import apply_declarations, say_declarations
from newsletter.config import FeedSource
from newsletter.db import make_sessionmaker, migrate, unit_of_work
from newsletter.errors import ConfigError
from newsletter.ingest import describe_report, ingest_all


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


@app.command()
def send(
    ctx: typer.Context,
    campaign: Annotated[int | None, typer.Option(help="Only this campaign's deliveries.")] = None,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            help="Sender processes on this machine (each with [smtp] pool_size connections); "
            "more machines may run `newsletter send` on the same PostgreSQL database at once.",
        ),
    ] = 1,
    worker_of: Annotated[
        str | None,
        typer.Option(hidden=True, help="Internal: run as worker I/N of `--workers N`."),
    ] = None,
) -> None:
    """Deliver everything that is queued and due, then exit."""
    if worker_of is None:
        deliver_with_progress(ctx.obj, campaign_id=campaign, workers=workers)
        return
    from newsletter.cli.workers import deliver_as_worker

    index, _, count = worker_of.partition("/")
    deliver_as_worker(ctx.obj, campaign_id=campaign, index=int(index), count=int(count))


@app.command("dev-smtp")
def dev_smtp(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8025,
    maildir: Annotated[Path, typer.Option(help="Where to keep received messages.")] = Path(
        "maildir"
    ),
) -> None:
    """Run a local SMTP server that keeps every message it receives in a Maildir."""
    from newsletter.devsmtp import start_dev_smtp

    controller = start_dev_smtp(host=host, port=port, maildir=maildir)
    console.print(
        f"dev SMTP server on {host}:{port}, keeping mail in {maildir.resolve()}; Ctrl-C to stop"
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        controller.stop()


@app.command()
def demo(
    directory: Annotated[
        Path | None,
        typer.Option(
            "--dir",
            help="Folder for the demo's database, previews and Maildir (default: a new one).",
        ),
    ] = None,
) -> None:
    """Run the whole flow once on embedded defaults and print a summary."""
    from newsletter.demo import run_demo

    summary = run_demo(directory=directory, say=lambda line: console.print(line))
    table = Table("what", "how many", title="newsletter demo")
    for what, n in summary.counts.items():
        table.add_row(what, str(n))
    console.print(table)
    for what, path in summary.paths.items():
        console.print(f"{what}: {path}")
