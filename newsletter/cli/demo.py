"""`newsletter demo`: the whole flow once, on embedded defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from newsletter.cli import app, console


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
