"""`newsletter bounces process MAILDIR`: apply bounces and complaints that arrived in a Maildir."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Annotated

import typer

from newsletter.bounces import UNREADABLE, process_maildir
from newsletter.cli import State, app, console
from newsletter.complaints import handle_return
from newsletter.db import unit_of_work
from newsletter.errors import ConfigError

bounces_app = typer.Typer(help="Bounces that come back after sending.", no_args_is_help=True)
app.add_typer(bounces_app, name="bounces")


@bounces_app.command("process")
def process(
    ctx: typer.Context,
    maildir: Annotated[Path, typer.Argument(help="Maildir that receives the bounce address.")],
    again: Annotated[
        bool, typer.Option("--all", help="Also messages already processed (marked seen).")
    ] = False,
) -> None:
    """Mark bounced deliveries failed and suppress hard bounces; processed mail is marked seen.

    Feedback-loop reports (spam complaints) unsubscribe and suppress the person and count on the
    campaign, which pauses itself past [smtp] complaint_pause_rate.

    A message that cannot be read is moved to the Maildir's .unreadable folder, one line each.
    A message applied that could not be marked seen is named in one line, and the exit code is 1;
    the next run reads it again, which changes nothing twice.
    """
    state: State = ctx.obj
    if not (maildir / "cur").is_dir() and not (maildir / "new").is_dir():
        raise ConfigError(f"{maildir}: not a Maildir (no cur/ or new/)")
    factory, counts = state.factory(), Counter[str]()

    def apply(raw: bytes) -> str:
        with unit_of_work(factory) as session:
            return handle_return(
                session=session, raw=raw, settings=state.settings, now=state.clock.now()
            )

    unmarked = 0
    for result in process_maildir(maildir, apply=apply, again=again):
        counts[result.outcome] += 1
        if result.outcome == "unreadable":
            line = f"set aside {result.name} in {UNREADABLE}: {result.reason}"
            console.print(line, markup=False, soft_wrap=True)
        if not result.marked:
            unmarked += 1
            line = f"applied {result.name} but could not mark it seen: {result.reason}"
            console.print(line, markup=False, soft_wrap=True)
    console.print(
        ", ".join(f"{what} {n}" for what, n in sorted(counts.items())) or "no new messages"
    )
    if unmarked:
        raise typer.Exit(1)
