"""`newsletter dev-smtp`: a local SMTP server that keeps what it receives."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from newsletter.cli import app, console


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
