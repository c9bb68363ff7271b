"""`newsletter run`: the long-running service (scheduler, sender, web pages, staff console)."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from newsletter.cli import State, app
from newsletter.logs import configure_logging


@app.command()
def run(
    ctx: typer.Context,
    host: Annotated[str | None, typer.Option(help="Web address (default: [web] host).")] = None,
    port: Annotated[int | None, typer.Option(help="Web port (default: [web] port).")] = None,
    console_host: Annotated[
        str | None, typer.Option(help="Staff console address (default: [console] host).")
    ] = None,
    console_port: Annotated[
        int | None, typer.Option(help="Staff console port (default: [console] port).")
    ] = None,
    no_console: Annotated[
        bool, typer.Option("--no-console", help="Do not serve the staff console.")
    ] = False,
) -> None:
    """Run the service: scheduler, sender, web pages and staff console, until SIGTERM or Ctrl-C."""
    from newsletter.dkim import load_signer
    from newsletter.lock import check_clock
    from newsletter.send import Signers
    from newsletter.service import Service, run_service

    state: State = ctx.obj
    settings = state.settings
    settings.security.require_secret()
    # Every signing key, read now: one that cannot sign stops `run` here, in one line, instead
    # of a service that serves its pages while its sender cannot send.
    Signers.load(settings, load_signer(settings))
    configure_logging(settings.logging)
    engine = state.engine()
    factory = state.factory()
    check_clock(factory, settings)
    staff = None
    if not no_console:
        staff = (console_host or settings.console.host, console_port or settings.console.port)

    async def main() -> None:
        service = Service(settings=settings, engine=engine, factory=factory, clock=state.clock)
        await run_service(
            service,
            host=host or settings.web.host,
            port=port or settings.web.port,
            console=staff,
        )

    asyncio.run(main())
