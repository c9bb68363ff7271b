"""`newsletter bounces process MAILDIR`: apply bounces that arrived in a Maildir."""

from __future__ import annotations

import mailbox
from collections import Counter
from pathlib import Path
from typing import Annotated

import typer

from newsletter.bounces import handle_bounce
from newsletter.cli import State, app, console
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
    """Mark bounced deliveries failed and suppress hard bounces; processed mail is marked seen."""
    state: State = ctx.obj
    if not (maildir / "cur").is_dir() and not (maildir / "new").is_dir():
        raise ConfigError(f"{maildir}: not a Maildir (no cur/ or new/)")
    box = mailbox.Maildir(maildir, factory=None, create=False)
    factory, counts = state.factory(), Counter[str]()
    for key in list(box.keys()):
        msg = box.get_message(key)
        if "S" in msg.get_flags() and not again:
            continue
        with unit_of_work(factory) as session:
            result = handle_bounce(
                session=session,
                raw=box.get_bytes(key),
                settings=state.settings,
                now=state.clock.now(),
            )
        counts[result] += 1
        msg.add_flag("S")
        msg.set_subdir("cur")
        box[key] = msg
    console.print(
        ", ".join(f"{what} {n}" for what, n in sorted(counts.items())) or "no new messages"
    )
