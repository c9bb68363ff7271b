"""`newsletter web`: the unsubscribe, preferences and confirmation pages alone."""

from __future__ import annotations

from typing import Annotated

import typer

from newsletter.cli import State, app, console


@app.command("web")
def web(
    ctx: typer.Context,
    host: Annotated[
        str | None, typer.Option(help="Address to listen on (default: [web] host).")
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="Port to listen on (default: [web] port).")
    ] = None,
) -> None:
    """Serve the supporters' pages (and the inbound SMTP unsubscribe when [inbound] is on)."""
    import uvicorn

    from newsletter.inbound import inbound_for
    from newsletter.logs import configure_logging
    from newsletter.web import create_app
    from newsletter.webserver import listener_config

    state: State = ctx.obj
    settings, factory = state.settings, state.factory()
    configure_logging(settings.logging)  # lines as `run` writes them: no address, no controls
    host, port = host or settings.web.host, port or settings.web.port
    inbound = inbound_for(settings, factory, state.clock)
    if inbound is not None:
        console.print(f"inbound SMTP on {settings.inbound.host}:{settings.inbound.port}")
    console.print(f"pages on http://{host}:{port} (links point at {settings.web.base_url})")
    try:
        # Run alone, it also mails the confirmations web signups queue (`run` has its sender).
        app = create_app(settings, factory, state.clock, send_confirmations=True)
        uvicorn.Server(listener_config(app, settings, host=host, port=port)).run()
    finally:
        if inbound is not None:
            inbound.stop()
