"""The staff console: a Starlette app on its own listener ([console] host and port).

Server-rendered pages (they work without script; static/console.js only refreshes the live
figures), server-side sessions (staff_sessions), a form token on every POST, the console's own
strict CSP. The pages live in console_signin (sign-in, enrolment, sign-out), console_alerts
(compose, preview, test, submit, approve), console_watch (dashboard, progress, campaigns, digest)
and console_admin (audit log, staff list); console_core holds what they share.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy.orm import Session, sessionmaker
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from newsletter import console_admin, console_alerts, console_signin, console_watch
from newsletter.audit import recorded_from
from newsletter.clock import Clock
from newsletter.config import Settings
from newsletter.console_core import (
    STATIC_DIR,
    STATIC_FILES,
    Console,
    SignInNeeded,
    TransportFactory,
)
from newsletter.console_i18n import refusal_line
from newsletter.console_security import ConsoleHeaders, PlainQueries
from newsletter.errors import NewsletterError

Handler = Callable[[Request, Exception], Awaitable[Response]]


def create_console_app(
    settings: Settings,
    factory: sessionmaker[Session],
    clock: Clock,
    transport_factory: TransportFactory | None = None,
) -> Starlette:
    """The console app; `transport_factory` opens the mail transport for tests and notices."""
    console = Console(settings, factory, clock, transport_factory)
    routes: list[BaseRoute] = [
        Route("/healthz", _healthz, methods=["GET"]),
        Route("/static/{name}", _static_endpoint(), methods=["GET"]),
        *console_signin.routes(console),
        *console_watch.routes(console),
        *console_alerts.routes(console),
        *console_admin.routes(console),
    ]
    handlers: dict[Any, Handler] = {
        SignInNeeded: _sign_in_needed,
        HTTPException: _error_page(console),
        ClientDisconnect: _client_gone,
        # Any step's refusal (a campaign, a list, a staff account...): its one line, never a 500.
        NewsletterError: _error_page(console),
    }
    app = Starlette(routes=routes, exception_handlers=handlers)
    app.state.console = True  # webserver.listener_web: the console's proxies and body cap
    app.add_middleware(AuditOrigin)
    app.add_middleware(PlainQueries)
    app.add_middleware(ConsoleHeaders)
    return app


class AuditOrigin:
    """Every event a console request records names the client address it came from."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the request with its client address as the audit origin."""
        client = scope.get("client")
        with recorded_from(client=client[0] if client else "", via="console"):
            await self.app(scope, receive, send)


async def _healthz(request: Request) -> Response:
    """A liveness answer for load balancers and tests."""
    return PlainTextResponse("ok")


def _static_endpoint() -> Callable[[Request], Awaitable[Response]]:
    """The console's CSS and script, read once; nothing else under /static/."""
    files = {name: (STATIC_DIR / name).read_bytes() for name in STATIC_FILES}

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in files:
            raise HTTPException(404)
        return Response(files[name], media_type=STATIC_FILES[name])

    return static


async def _client_gone(request: Request, exc: Exception) -> Response:
    """The client left (or the listener cut an oversized body) while its body was read: nobody
    reads the answer, and it is no error of ours to log."""
    return Response(status_code=400)


async def _sign_in_needed(request: Request, exc: Exception) -> Response:
    """No live session: pages go to /signin, the JSON API answers 401, a POST is refused."""
    if request.url.path.startswith("/api/"):
        return JSONResponse({"error": "signed out"}, status_code=401)
    if request.method != "GET":
        return PlainTextResponse("signed out", status_code=403)
    return RedirectResponse("/signin", status_code=303)


def _error_page(console: Console) -> Handler:
    """One page for refusals: HTTP errors by code, step errors with their one line."""

    async def error(request: Request, exc: Exception) -> Response:
        info = request.scope.get("console_session")
        if isinstance(exc, HTTPException):
            code, message = exc.status_code, ""
        else:  # a step refused: its one-line reason, in the staffer's language
            code, message = 409, refusal_line(exc, console.language(request, info))
        return console.render(request, "error", info=info, status=code, code=code, message=message)

    return error
