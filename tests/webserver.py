"""A real uvicorn server on a free loopback port, in a thread, for web and browser tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import uvicorn
from sqlalchemy.orm import Session, sessionmaker

from newsletter.clock import Clock
from newsletter.config import Settings
from newsletter.devsmtp import free_port
from newsletter.web import create_app
from newsletter.webserver import listener_config


@contextmanager
def serve_pages(
    settings: Settings, factory: sessionmaker[Session], clock: Clock
) -> Iterator[tuple[str, Settings]]:
    """Serve create_app() as `newsletter web` does until the block ends; yields URL and settings.

    The settings' [web] base_url is the server's own URL, so links in emails reach it.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    settings = replace(settings, web=replace(settings.web, base_url=url))
    config = listener_config(
        create_app(settings, factory, clock), settings, host="127.0.0.1", port=port
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield url, settings
    finally:
        server.should_exit = True
        thread.join(timeout=10)
