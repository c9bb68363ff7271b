"""`newsletter console`: the staff console alone, on its own listener ([console] host, port).

(Not cli/console.py: importing a submodule named `console` would replace the package's `console`
printer that every command module imports.)
"""

from __future__ import annotations

from typing import Annotated

import typer

from newsletter.cli import State, app, console


@app.command("console")
def console_command(
    ctx: typer.Context,
    host: Annotated[
        str | None, typer.Option(help="Address to listen on (default: [console] host).")
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="Port to listen on (default: [console] port).")
    ] = None,
) -> None:
    """Serve the staff console (sign-in, alerts, approvals, progress) on its own listener."""
    import uvicorn

    from newsletter.console import create_console_app
    from newsletter.logs import configure_logging
    from newsletter.webserver import listener_config

    state: State = ctx.obj
    settings, factory = state.settings, state.factory()
    configure_logging(settings.logging)  # lines as `run` writes them: no address, no controls
    settings.security.require_secret()
    host, port = host or settings.console.host, port or settings.console.port
    console.print(
        f"staff console on http://{host}:{port} (links point at {settings.console.base_url})"
    )
    app_ = create_console_app(settings, factory, state.clock)
    uvicorn.Server(listener_config(app_, settings, host=host, port=port)).run()
