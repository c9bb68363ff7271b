"""`newsletter send`: deliver everything queued and due (with `--workers N`, N processes)."""

from __future__ import annotations

from typing import Annotated

import typer

from newsletter.cli import app
from newsletter.cli.progress import deliver_with_progress


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
