"""`newsletter run`: the scheduler, the sender, the web pages and the staff console in one process.

The staff console has a listener of its own ([console] host and port), apart from the public
pages', so that the pages can face the internet without it.

Only the holder of the scheduler lease schedules; any number of processes may send. A second
`newsletter run` on the same database stands by, sending and serving pages, and takes over the
schedule within one lease (`[schedule] lock_seconds`) if the holder stops renewing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import math
import os
import random
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route

from newsletter import fetch, render, schedule
from newsletter.clock import Clock
from newsletter.config import Settings
from newsletter.db import unit_of_work
from newsletter.dkim import DkimSigner, load_signer
from newsletter.errors import ConfigError
from newsletter.inbound import inbound_for
from newsletter.metrics import render_metrics
from newsletter.notices import send_confirmations
from newsletter.schedule import Scheduler
from newsletter.send import SendControl, SendReport, deliver_queued
from newsletter.signup import CONFIRM_DELAY_SECONDS
from newsletter.smtp import SmtpPool, open_pool
from newsletter.webserver import listener_config

log = logging.getLogger("newsletter.service")


_RANDOM = random.SystemRandom()  # nothing outside may predict the next round


@dataclass
class Service:
    """Everything one `newsletter run` process shares between its tasks."""

    settings: Settings
    engine: Engine
    factory: sessionmaker[Session]
    clock: Clock
    holder: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    active: bool = False
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    last_send: SendReport | None = None
    control: SendControl = field(default_factory=SendControl)
    # Owed confirmations go at a random moment in this range after the last round of them (see
    # signup.CONFIRM_DELAY_SECONDS); the first round at once.
    confirm_delay: tuple[float, float] = CONFIRM_DELAY_SECONDS
    confirm_at: float = 0.0  # time.monotonic() of the next round of confirmations

    def __post_init__(self) -> None:
        self.scheduler = Scheduler(
            factory=self.factory, settings=self.settings, clock=self.clock, holder=self.holder
        )


async def keep_lock(service: Service) -> None:
    """Take or renew the scheduler lease every third of its length; catch up when gained."""
    period = max(service.settings.schedule.lock_seconds / 3, 1)
    catch_up: asyncio.Task[None] | None = None
    while not service.stop.is_set():
        try:
            held = await asyncio.to_thread(service.scheduler.hold_lock)
        except Exception as error:  # a database hiccup must not end the lease's keeping
            # Not renewed, so perhaps no longer ours: stand by until a renewal succeeds.
            log.warning("scheduler lock not renewed (%s)", type(error).__name__)
            held = False
        if held and not service.active:
            log.info("scheduler lock taken by %s", service.holder)
            service.active = True
            # A slot missed while nobody held the lock (else the minute's poll makes it).
            try:
                await asyncio.to_thread(schedule.job_digests)
            except Exception:  # must not end the lease's keeping either
                log.exception("catch-up digests failed")
            # Not awaited here: a slow source must not hold up renewing the lease.
            catch_up = asyncio.create_task(_catch_up_poll())
        elif not held and service.active:
            log.warning("scheduler lock lost; standing by")
            service.active = False
        await _sleep(service, period)
    if catch_up is not None:
        await catch_up  # bounded by the fetch deadline
    if service.active:
        service.active = False
        try:
            await asyncio.to_thread(service.scheduler.let_go)
        except Exception as error:  # the lease then runs out by itself
            log.warning("scheduler lock not released (%s)", type(error).__name__)


async def _catch_up_poll() -> None:
    """The poll owed when the lease is gained, on a worker thread."""
    try:
        await asyncio.to_thread(schedule.job_poll)
    except Exception:  # a database hiccup: the next scheduled poll tries again
        log.exception("catch-up poll failed")


async def keep_sending(service: Service) -> None:
    """Deliver whatever is due (alerts first) and owed confirmations; then wait and look again.

    One pool serves every round, so each relay's hourly cap counts what this service sent, on
    top of the last hour's sends it was seeded with from the database when it opened (at start,
    and again after a failure). Idle connections are closed between rounds.
    """
    interval = service.settings.schedule.send_interval_seconds
    while not service.stop.is_set():
        try:
            # Read again after a failure: a key that could not be read may have been fixed.
            signer = load_signer(service.settings)
            async with open_pool(service.settings, service.factory, service.clock) as pool:
                while not service.stop.is_set():
                    await send_round(service, pool, signer)
                    await pool.close_idle()
                    await _sleep(service, interval)
        except ConfigError as error:  # a signing key replaced by one that cannot sign
            log.error("sender cannot send: %s; trying again in %ss", error, interval)
            await _sleep(service, interval)
        except Exception:  # a database or network hiccup must not end the service
            log.exception("sender failed; retrying in %ss", interval)
            await _sleep(service, interval)


async def send_round(service: Service, pool: SmtpPool, signer: DkimSigner | None) -> None:
    """One round: owed confirmations when their moment has come, then every due delivery."""
    if time.monotonic() >= service.confirm_at:
        service.confirm_at = time.monotonic() + _RANDOM.uniform(*service.confirm_delay)
        await send_confirmations(
            factory=service.factory, settings=service.settings, transport=pool, clock=service.clock
        )
    report = await deliver_queued(
        factory=service.factory,
        settings=service.settings,
        transport=pool,
        clock=service.clock,
        control=service.control,
        signer=signer,
    )
    for cid, reason in report.paused.items():
        log.warning("campaign %d paused: %s", cid, reason)
    if report.sent or report.failed or report.deferred:
        log.info("sent %d, deferred %d, failed %d", report.sent, report.deferred, report.failed)
        service.last_send = report


async def _sleep(service: Service, seconds: float) -> None:
    """Sleep, but wake at once when the service is asked to stop."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(service.stop.wait(), timeout=seconds)


async def ingest_now(service: Service) -> Response:
    """POST /hooks/ingest: ingest every source now and answer with what each one did.

    The ingest runs on worker threads (the event loop keeps serving) and answers within about
    [sources] timeout_seconds, since all sources are fetched at once under that deadline. One
    ingest per source at a time: when a source is already being ingested (another call, a
    scheduled poll, `newsletter ingest`, another process), it is skipped and the answer is
    409 Conflict with Retry-After, as the running ingest may have started before the caller's
    news was published. The other sources are still ingested and listed.
    """
    reports = await asyncio.to_thread(service.scheduler.poll_sources, force=True)
    body: dict[str, Any] = {
        "sources": [
            {
                "source": r.source,
                "new": r.new,
                "updated": r.updated,
                "error": r.error,
                "busy": r.busy,
                "redirected_to": r.redirected_to,
            }
            for r in reports
        ]
    }
    if not any(r.busy for r in reports):
        return JSONResponse(body)
    body["error"] = "an ingest of a source is already running; retry shortly"
    retry = str(math.ceil(service.settings.sources.timeout_seconds))
    return JSONResponse(body, status_code=409, headers={"Retry-After": retry})


def create_service_app(service: Service) -> Starlette:
    """The web pages plus /healthz, /metrics (behind [metrics] token) and POST /hooks/ingest."""

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok", "scheduler": service.active})

    async def metrics(request: Request) -> Response:
        token = service.settings.metrics.token
        if not token:  # not configured: not there
            return PlainTextResponse("not found", status_code=404)
        if not _bearer_matches(request.headers.get("authorization", ""), token):
            return PlainTextResponse(
                "unauthorized", status_code=401, headers={"www-authenticate": "Bearer"}
            )

        def render() -> str:
            with unit_of_work(service.factory) as session:
                return render_metrics(
                    session, scheduler_active=service.active, now=service.clock.now()
                )

        return PlainTextResponse(
            await asyncio.to_thread(render), media_type="text/plain; version=0.0.4"
        )

    async def hook_ingest(request: Request) -> Response:
        secret = service.settings.alerts.webhook_secret
        given = request.headers.get("x-newsletter-secret", "")
        if not secret or not _same_secret(given, secret):
            return PlainTextResponse("not found", status_code=404)
        return await ingest_now(service)

    routes: list[Any] = [
        Route("/healthz", healthz),
        Route("/metrics", metrics),
        Route("/hooks/ingest", hook_ingest, methods=["POST"]),
    ]
    pages = _pages_app(service)
    if pages is not None:
        routes.append(Mount("/", app=pages))
    return Starlette(routes=routes)


def _bearer_matches(authorization: str, token: str) -> bool:
    """Whether an Authorization header carries the token, compared in constant time."""
    scheme, _, given = authorization.partition(" ")
    return _same_secret(given.strip(), token) and scheme.lower() == "bearer"


def _same_secret(given: str, expected: str) -> bool:
    """Whether a header carries a secret, compared in constant time."""
    # Hashing first makes the comparison's time independent of the lengths as well.
    sent = hashlib.sha256(given.encode()).digest()
    wanted = hashlib.sha256(expected.encode()).digest()
    return hmac.compare_digest(sent, wanted)


def _pages_app(service: Service) -> Any:
    """The supporters' pages (unsubscribe, preferences, confirm), when that module is present."""
    try:
        from newsletter.web import create_app
    except ImportError:
        return None
    return create_app(settings=service.settings, factory=service.factory, clock=service.clock)


def _console_app(service: Service) -> Any:
    """The staff console app, when that module is present."""
    try:
        from newsletter.console import create_console_app
    except ImportError:
        return None
    return create_console_app(service.settings, service.factory, service.clock)


def console_server(service: Service, *, host: str, port: int) -> tuple[Any, socket.socket] | None:
    """The console's server and its bound socket; a taken port is logged, not fatal.

    The socket is bound here, before uvicorn starts: uvicorn would end the whole process on a
    port it cannot bind, and a second `newsletter run` on this machine must keep sending.
    """
    app = _console_app(service)
    if app is None:
        return None
    try:
        sock = socket.create_server((host, port), family=_family(host), reuse_port=False)
    except OSError as e:
        log.error("staff console not started on %s:%d: %s", host, port, e)
        return None
    config = listener_config(app, service.settings, host=host, port=port)
    return _QuietServer(config), sock


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def start_inbound_safely(service: Service) -> Any:
    """The inbound SMTP server, if configured; a taken port is logged, not fatal."""
    try:
        return inbound_for(service.settings, service.factory, service.clock)
    except Exception as e:  # e.g. a second `run` on the same machine: the first one receives
        log.error("inbound SMTP not started: %s", e)
        return None


def warm_up(settings: Settings) -> None:
    """Ready what the first urgent alert would load on its way: the email templates, the
    fetching code. A failure is logged, the service goes on."""
    try:
        render.warm_up(settings)
    except Exception as error:  # a broken template is reported when a campaign is rendered
        log.warning("could not ready the email templates: %s", error)
    try:
        fetch.warm_up(settings.sources)
    except Exception as error:  # the first fetch loads it, then
        log.warning("could not ready the fetching code: %s", error)


class _QuietServer(uvicorn.Server):
    """uvicorn without its own signal handling: the service stops all its tasks together."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def run_service(
    service: Service,
    *,
    host: str,
    port: int,
    console: tuple[str, int] | None = None,
) -> None:
    """Run until SIGTERM or SIGINT, then stop cleanly: finish the batch, free the lock.

    `console` is the staff console's (host, port), None to serve no console.
    """
    schedule.register(service.scheduler, active=lambda: service.active)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.stop.set)
    apscheduler = schedule.make_apscheduler(engine=service.engine, settings=service.settings)
    apscheduler.start()
    config = listener_config(create_service_app(service), service.settings, host=host, port=port)
    server = _QuietServer(config)
    tasks = [
        asyncio.create_task(keep_lock(service)),
        asyncio.create_task(keep_sending(service)),
        asyncio.create_task(server.serve()),
        # In a thread: the first urgent alert should not pay for compiling the templates.
        asyncio.create_task(asyncio.to_thread(warm_up, service.settings)),
    ]
    staff = console_server(service, host=console[0], port=console[1]) if console else None
    if staff is not None:
        tasks.append(asyncio.create_task(staff[0].serve(sockets=[staff[1]])))
        log.info("staff console on http://%s:%d", *console)  # type: ignore[misc]
    inbound = start_inbound_safely(service)
    log.info("service %s listening on http://%s:%d", service.holder, host, port)
    await service.stop.wait()
    log.info("stopping")
    service.control.request_stop()  # in-flight messages finish; nothing new starts
    server.should_exit = True
    if staff is not None:
        staff[0].should_exit = True
    apscheduler.shutdown(wait=False)
    await asyncio.gather(*tasks)
    if inbound is not None:
        inbound.stop()
    schedule.unregister()
