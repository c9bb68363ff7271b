"""The web listener under hostile clients: idle, slow and oversized connections are cut.

Every server here is a real uvicorn on loopback, built by `listener_config` exactly as
`newsletter web` and `newsletter run` build theirs (and two tests start those commands). Clients
are raw sockets, so that they can be as slow and as idle as an attacker's. Linux routes all of
127.0.0.0/8 to loopback: a "normal" client connects from 127.0.0.2, so that it is another client
than the attacker's 127.0.0.1.
"""

from __future__ import annotations

import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from sqlalchemy.orm import Session, sessionmaker

from newsletter.clock import FrozenClock
from newsletter.config import Settings
from newsletter.db import make_engine, make_sessionmaker, migrate, unit_of_work
from newsletter.db.models import Subscriber, SubscriptionStatus
from newsletter.devsmtp import free_port
from newsletter.lists import get_list, read_lists, sync_lists
from newsletter.service import Service, create_service_app
from newsletter.tokens import make_token
from newsletter.web import create_app
from newsletter.webserver import listener_config
from tests.conftest import SECRET, make_settings
from tests.test_service import wait_for
from tests.test_web import Site, add_person, form_token

ROOT = Path(__file__).resolve().parents[1]
HEADER_TIMEOUT = 2.0
BUDGET = 10 * HEADER_TIMEOUT  # "does not hang" budget: ten times the configured time
METRICS_TOKEN = "m" * 40
HOOK_SECRET = "h" * 40
NORMAL = "127.0.0.2"  # a reader's address, not the attacker's
STRICT_HEADERS = {
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "cache-control": "no-store",
}


def tight(settings: Settings, url: str, **web: Any) -> Settings:
    """Settings with small listener limits, every client limited (no trusted proxy)."""
    limits: dict[str, Any] = {
        "base_url": url,
        "header_timeout_seconds": HEADER_TIMEOUT,
        "body_timeout_seconds": HEADER_TIMEOUT,
        "keep_alive_seconds": 1,
        "max_connections_per_client": 20,
        "max_header_bytes": 4096,
        "max_body_bytes": 4096,
        "trusted_proxies": (),
        **web,
    }
    return replace(
        settings,
        web=replace(settings.web, **limits),
        alerts=replace(settings.alerts, webhook_secret=HOOK_SECRET),
        metrics=replace(settings.metrics, token=METRICS_TOKEN),
    )


@dataclass
class Listener:
    url: str
    port: int
    settings: Settings
    factory: sessionmaker[Session]
    clock: FrozenClock


@contextmanager
def serve(app: Any, settings: Settings, port: int) -> Iterator[None]:
    """Serve an app on a loopback port with the listener `newsletter web` and `run` use."""
    server = uvicorn.Server(listener_config(app, settings, host="127.0.0.1", port=port))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def pages_app(settings: Settings, factory: sessionmaker[Session], clock: FrozenClock) -> Any:
    """What `newsletter web` serves."""
    return create_app(settings, factory, clock)


def service_app(settings: Settings, factory: sessionmaker[Session], clock: FrozenClock) -> Any:
    """What `newsletter run` serves."""
    engine = factory.kw["bind"]
    return create_service_app(
        Service(settings=settings, engine=engine, factory=factory, clock=clock)
    )


APPS = [pytest.param(pages_app, id="web"), pytest.param(service_app, id="run")]
AppMaker = Callable[[Settings, sessionmaker[Session], FrozenClock], Any]


@pytest.fixture
def sqlite_factory(sqlite_url: str) -> Iterator[sessionmaker[Session]]:
    """A migrated SQLite file with the declared lists."""
    engine = make_engine(sqlite_url)
    migrate(engine)
    factory = make_sessionmaker(engine)
    with unit_of_work(factory) as session:
        sync_lists(session=session, specs=read_lists(ROOT / "subscribers" / "lists.toml"))
    yield factory
    engine.dispose()


@contextmanager
def listening(
    make: AppMaker,
    factory: sessionmaker[Session],
    clock: FrozenClock,
    url: str,
    **web: Any,
) -> Iterator[Listener]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    settings = tight(make_settings(url), base, **web)
    with serve(make(settings, factory, clock), settings, port):
        yield Listener(base, port, settings, factory, clock)


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    """A raw TCP connection to the listener from a chosen loopback address."""
    return socket.create_connection(("127.0.0.1", port), timeout=BUDGET, source_address=(source, 0))


def read_to_close(sock: socket.socket, deadline: float) -> bytes | None:
    """All the server sends until it closes the connection; None if still open at the deadline."""
    data = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return None
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def status_of(reply: bytes | None) -> int | None:
    """The status code of a raw reply, None when there was none."""
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", reply or b"")
    return int(match.group(1)) if match else None


def headers_of(reply: bytes) -> dict[str, str]:
    """The header fields of a raw reply, lower-cased names."""
    head = reply.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")[1:]
    return {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in head)}


SLOW_HEADERS = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "


def slowloris(port: int, source: str, prefix: bytes, interval: float = 0.2) -> tuple[float, bytes]:
    """Send `prefix`, then one more byte every `interval` until the server closes.

    Returns the seconds it held out and all the server sent; gives up itself after BUDGET.
    """
    with connect(port, source) as sock:
        start = time.monotonic()
        sock.sendall(prefix)
        reply = b""
        while time.monotonic() - start < BUDGET:
            try:
                sock.sendall(b"a")
                sock.settimeout(interval)
                chunk = sock.recv(65536)
            except TimeoutError:
                continue  # still open: one more byte
            except OSError:
                break
            if not chunk:
                break
            reply += chunk
        return time.monotonic() - start, reply


def assert_strict_headers(headers: Any, where: str) -> None:
    """The security headers, and no server header."""
    for name, value in STRICT_HEADERS.items():
        assert headers.get(name) == value, f"{where}: {name} is {headers.get(name)!r}"
    assert "default-src 'none'" in headers.get("content-security-policy", ""), where
    assert "server" not in headers, f"{where}: a server header"


def normal_client() -> httpx.Client:
    """An ordinary HTTP client, from another address than the attacker's."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=NORMAL), timeout=BUDGET)


@pytest.mark.parametrize("make", APPS)
def test_idle_and_slow_clients_are_cut_while_a_reader_is_served(
    make: AppMaker, sqlite_factory: sessionmaker[Session], sqlite_url: str, clock: FrozenClock
) -> None:
    """300 idle connections and a slowloris: capped per client, cut in time; a reader gets 200."""
    with listening(make, sqlite_factory, clock, sqlite_url) as site:
        idle = [connect(site.port) for _ in range(300)]
        slow: dict[str, tuple[float, bytes]] = {}
        dripping = threading.Thread(
            target=lambda: slow.update(one=slowloris(site.port, "127.0.0.3", SLOW_HEADERS))
        )
        dripping.start()
        with normal_client() as client:
            reply = client.get(f"{site.url}/healthz")
        assert reply.status_code == 200  # while the idle ones hold their places
        deadline = time.monotonic() + BUDGET
        replies = [read_to_close(sock, deadline) for sock in idle]
        dripping.join(timeout=BUDGET * 2)
        for sock in idle:
            sock.close()
    assert None not in replies, "an idle connection was never closed"
    codes = Counter(status_of(r) for r in replies)
    assert set(codes) <= {408, 503}, codes
    assert 20 <= codes[408] < 100 and codes[503] > 200  # 20 held per client, the rest refused
    seconds, answer = slow["one"]
    assert status_of(answer) == 408  # it kept sending, but the header deadline is total
    assert seconds < BUDGET
    assert_strict_headers(headers_of(answer), "408")
    assert_strict_headers(headers_of(next(r for r in replies if status_of(r) == 503)), "503")


def test_total_cap_refuses_the_excess_and_frees_places(
    sqlite_factory: sessionmaker[Session], sqlite_url: str, clock: FrozenClock
) -> None:
    """Over [web] max_connections from many addresses: the excess gets 503, places come back."""
    with listening(
        pages_app,
        sqlite_factory,
        clock,
        sqlite_url,
        max_connections=30,
        max_connections_per_client=1000,
    ) as site:
        idle = [connect(site.port, f"127.0.1.{n % 10 + 1}") for n in range(100)]
        deadline = time.monotonic() + BUDGET
        replies = [read_to_close(sock, deadline) for sock in idle]
        for sock in idle:
            sock.close()
        with normal_client() as client:
            assert client.get(f"{site.url}/healthz").status_code == 200
    assert None not in replies
    codes = Counter(status_of(r) for r in replies)
    assert codes[503] >= 50 and codes[408] >= 30, codes


@pytest.mark.parametrize("make", APPS)
def test_keep_alive_idle_and_a_slow_second_request_are_cut(
    make: AppMaker, sqlite_factory: sessionmaker[Session], sqlite_url: str, clock: FrozenClock
) -> None:
    """After a reply: idle, the connection closes; a slow next request is cut too."""
    with listening(make, sqlite_factory, clock, sqlite_url) as site:
        with connect(site.port) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            reply = read_to_close(sock, time.monotonic() + BUDGET)
        assert status_of(reply) == 200  # then closed: 1 s of keep-alive
        first = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        seconds, answer = slowloris(site.port, "127.0.0.1", first + SLOW_HEADERS)
    assert status_of(answer) == 200  # the first request is answered, its slow follower is cut
    assert b"408 Request Timeout" in answer
    assert seconds < BUDGET


@pytest.mark.parametrize("make", APPS)
def test_slow_and_oversized_bodies_and_headers_are_refused(
    make: AppMaker, sqlite_factory: sessionmaker[Session], sqlite_url: str, clock: FrozenClock
) -> None:
    """A dripping body gets 408; one declared or sent over the cap 413; huge headers 431."""
    sid = add_person(sqlite_factory, clock, "reader@example.org")
    with unit_of_work(sqlite_factory) as session:
        list_id = get_list(session, "weekly-digest").id
    token = make_token(secret=SECRET, purpose="unsubscribe", subscriber_id=sid, list_id=list_id)
    post = f"POST /u/{token} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode()
    cases = {
        "declared too large": post + b"Content-Length: 1000000000\r\n\r\n",
        "endless chunks": post + b"Transfer-Encoding: chunked\r\n\r\n",
        "huge header": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 8000 + b"\r\n\r\n",
        "huge header, slowly": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 8000,
    }
    answers: dict[str, bytes | None] = {}
    with listening(make, sqlite_factory, clock, sqlite_url) as site:
        seconds, answers["dripping body"] = slowloris(
            site.port, "127.0.0.1", post + b"Content-Length: 100\r\n\r\n"
        )
        for name, request in cases.items():
            with connect(site.port) as sock:
                sock.sendall(request)
                if name == "endless chunks":
                    try:
                        for _ in range(100):  # 100 KiB, far over max_body_bytes (4 KiB)
                            sock.sendall(b"400\r\n" + b"a" * 1024 + b"\r\n")
                    except OSError:
                        pass  # cut off while sending: what is wanted
                answers[name] = read_to_close(sock, time.monotonic() + BUDGET)
    assert seconds < BUDGET  # 100 bytes at 5 a second would take 20 s: the deadline is total
    expected = {"dripping body": 408, "declared too large": 413, "endless chunks": 413}
    expected |= {"huge header": 431, "huge header, slowly": 431}
    for name, status in expected.items():
        assert status_of(answers[name]) == status, f"{name}: {answers[name]!r}"
        assert_strict_headers(headers_of(answers[name] or b""), name)
    with unit_of_work(sqlite_factory) as session:  # no half-read body unsubscribed anyone
        assert session.get(Subscriber, sid) is not None
    assert Site("", make_settings(sqlite_url), sqlite_factory, clock).status(sid) == "active"


@pytest.mark.parametrize("token", [None, METRICS_TOKEN], ids=["no-token", "token"])
def test_metrics_need_the_token_and_are_absent_without_one(
    sqlite_factory: sessionmaker[Session], sqlite_url: str, clock: FrozenClock, token: str | None
) -> None:
    """/metrics on the public port: 404 unless [metrics] token is set, then 401 without it."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    settings = tight(make_settings(sqlite_url), base)
    settings = replace(settings, metrics=replace(settings.metrics, token=token or ""))
    app = service_app(settings, sqlite_factory, clock)
    with serve(app, settings, port), normal_client() as client:
        bare = client.get(f"{base}/metrics")
        forged = client.get(f"{base}/metrics", headers={"Authorization": "Bearer " + "m" * 39})
        basic = client.get(f"{base}/metrics", headers={"Authorization": f"Basic {token}"})
        right = client.get(f"{base}/metrics", headers={"Authorization": f"Bearer {token}"})
    if token is None:
        assert [r.status_code for r in (bare, forged, basic, right)] == [404] * 4
        assert "newsletter_" not in bare.text + right.text
        return
    assert [r.status_code for r in (bare, forged, basic)] == [401] * 3
    assert "newsletter_" not in bare.text + forged.text + basic.text
    assert right.status_code == 200 and "newsletter_deliveries" in right.text


def test_every_reply_of_the_service_carries_the_security_headers(
    sqlite_factory: sessionmaker[Session], sqlite_url: str, clock: FrozenClock
) -> None:
    """`run`'s /healthz, /metrics, 404, 405, webhook replies: strict headers, no server header."""
    with (
        listening(service_app, sqlite_factory, clock, sqlite_url) as site,
        normal_client() as client,
    ):
        auth = {"Authorization": f"Bearer {METRICS_TOKEN}"}
        hook = f"{site.url}/hooks/ingest"
        replies = {
            "healthz": client.get(f"{site.url}/healthz"),
            "404": client.get(f"{site.url}/nothing-here"),
            "405": client.put(f"{site.url}/healthz"),
            "metrics": client.get(f"{site.url}/metrics", headers=auth),
            "metrics 401": client.get(f"{site.url}/metrics"),
            "hook forged": client.post(hook, headers={"X-Newsletter-Secret": "x"}),
            "hook": client.post(hook, headers={"X-Newsletter-Secret": HOOK_SECRET}),
        }
    expected = {"healthz": 200, "404": 404, "405": 405, "metrics": 200, "metrics 401": 401}
    expected |= {"hook forged": 404}
    for name, reply in replies.items():
        assert reply.status_code == expected.get(name, reply.status_code), name
        assert_strict_headers(reply.headers, name)


@pytest.mark.parametrize("make", APPS)
def test_a_server_error_carries_the_security_headers(
    make: AppMaker, sqlite_url: str, tmp_path: Path, clock: FrozenClock
) -> None:
    """A 500 (here: a page or /metrics on a database without tables) carries the headers too."""
    engine = make_engine(f"sqlite:///{tmp_path / 'empty.db'}")  # never migrated
    token = make_token(secret=SECRET, purpose="unsubscribe", subscriber_id=1, list_id=1)
    path = f"/u/{token}" if make is pages_app else "/metrics"
    with (
        listening(make, make_sessionmaker(engine), clock, sqlite_url) as site,
        normal_client() as client,
    ):
        reply = client.get(site.url + path, headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    engine.dispose()
    assert reply.status_code == 500
    assert_strict_headers(reply.headers, "500")


@pytest.fixture
def pages(
    sqlite_factory: sessionmaker[Session], sqlite_url: str, clock: FrozenClock
) -> Iterator[Site]:
    """The pages, served as `newsletter web` serves them."""
    with listening(pages_app, sqlite_factory, clock, sqlite_url) as site:
        yield Site(site.url, site.settings, site.factory, site.clock)


def test_forged_host_with_matching_origin_is_refused(pages: Site) -> None:
    """The Origin check compares with [web] base_url, not with the Host header the client wrote."""
    sid = add_person(pages.factory, pages.clock, "reader@example.org")
    url = f"{pages.url}/preferences/{pages.token('preferences', sid)}"
    data = {"form_token": form_token(httpx.get(url).text), "action": "leave", "language": "en"}
    forged = {"Host": "evil.example", "Origin": "http://evil.example"}
    reply = httpx.post(url, data=data, headers=forged)
    assert reply.status_code == 403
    assert pages.status(sid) == SubscriptionStatus.ACTIVE
    own = {"Origin": pages.url}  # the page's own origin still passes
    assert httpx.post(url, data=data, headers=own).status_code == 303
    assert pages.status(sid) == SubscriptionStatus.UNSUBSCRIBED


def test_expired_preferences_form_is_shown_again_with_the_choices(pages: Site) -> None:
    """A preferences page left open over a day: nothing saved, a plain note, the choices kept."""
    sid = add_person(pages.factory, pages.clock, "reader@example.org", language="be")
    url = f"{pages.url}/preferences/{pages.token('preferences', sid)}"
    old = form_token(httpx.get(url).text)
    with unit_of_work(pages.factory) as session:
        alerts = get_list(session, "urgent-actions").id
        digest = get_list(session, "weekly-digest").id
    pages.clock.advance(hours=25)
    choices = {"form_token": old, "lists": [str(alerts)], "language": "ru", "action": "save"}
    reply = httpx.post(url, data=choices)
    assert reply.status_code == 200
    assert "ваш выбар яшчэ не захаваны" in reply.text  # said plainly, in the reader's language
    assert re.search(rf'value="{alerts}" checked', reply.text)  # the posted choices
    assert not re.search(rf'value="{digest}" checked', reply.text)
    assert re.search(r'value="ru" lang="ru" checked', reply.text)
    assert pages.status(sid, "weekly-digest") == SubscriptionStatus.ACTIVE  # nothing saved
    assert pages.status(sid, "urgent-actions") != SubscriptionStatus.ACTIVE
    again = httpx.post(url, data={**choices, "form_token": form_token(reply.text)})
    assert again.status_code == 303  # the page offered again saves them
    assert pages.status(sid, "urgent-actions") == SubscriptionStatus.ACTIVE
    assert pages.status(sid, "weekly-digest") == SubscriptionStatus.UNSUBSCRIBED
    with unit_of_work(pages.factory) as session:
        assert session.get(Subscriber, sid).language == "ru"


def test_expired_confirmation_form_asks_for_the_click_again(pages: Site) -> None:
    """A confirmation page left open over a day: nothing confirmed, the button offered again."""
    sid = add_person(pages.factory, pages.clock, "new@example.org", confirmed=False)
    url = f"{pages.url}/confirm/{pages.token('confirm', sid)}"
    old = form_token(httpx.get(url).text)
    pages.clock.advance(hours=25)
    reply = httpx.post(url, data={"form_token": old})
    assert reply.status_code == 200 and "nothing has been confirmed yet" in reply.text
    assert pages.status(sid) == SubscriptionStatus.PENDING
    again = httpx.post(url, data={"form_token": form_token(reply.text)})
    assert again.status_code == 200 and "Subscription confirmed" in again.text
    assert pages.status(sid) == SubscriptionStatus.ACTIVE


def lower_open_files() -> None:
    """In the child: a soft open-files limit of 256 under a hard one of 4096."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 4096))


@contextmanager
def serving(
    tmp_path: Path, command: str, port: int, config: str, preexec: Callable[[], None]
) -> Iterator[subprocess.Popen[bytes]]:
    """`newsletter COMMAND --port PORT` on a new SQLite database with `config` added, its
    stderr in server.log, once /healthz answers; stopped with SIGTERM at the end."""
    (tmp_path / "config.toml").write_text(
        f"[database]\nurl = 'sqlite:///{tmp_path / 'n.db'}'\n{config}"
    )
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")},
        "NEWSLETTER_SECRET": SECRET,
    }
    newsletter = [sys.executable, "-m", "newsletter"]
    subprocess.run([*newsletter, "init"], cwd=tmp_path, env=env, check=True, capture_output=True)
    with (tmp_path / "server.log").open("w") as log:
        proc = subprocess.Popen(
            [*newsletter, command, "--port", str(port)],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
            preexec_fn=preexec,
        )
        try:
            wait_for(f"http://127.0.0.1:{port}/healthz")
            yield proc
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)


@pytest.mark.skipif(not Path("/proc/self/limits").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("command", ["web", "run"])
def test_the_commands_serve_with_the_limits(tmp_path: Path, command: str) -> None:
    """`newsletter web` and `run`: per-client cap, slowloris cut, metrics token, files limit."""
    if resource.getrlimit(resource.RLIMIT_NOFILE)[1] < 4096:
        pytest.skip("the hard open-files limit is below 4096")
    port = free_port()
    config = (
        f"[web]\nbase_url = 'http://127.0.0.1:{port}'\nheader_timeout_seconds = {HEADER_TIMEOUT}\n"
        "max_connections_per_client = 3\ntrusted_proxies = []\n"
        f"[metrics]\ntoken = '{METRICS_TOKEN}'\n"
    )
    with ExitStack() as stack:
        proc = stack.enter_context(serving(tmp_path, command, port, config, lower_open_files))
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        idle = [stack.enter_context(connect(port)) for _ in range(4)]
        fourth = read_to_close(idle[3], time.monotonic() + BUDGET)
        seconds, answer = slowloris(port, "127.0.0.3", SLOW_HEADERS)
        with normal_client() as client:
            healthz = client.get(f"http://127.0.0.1:{port}/healthz")
            metrics = client.get(f"http://127.0.0.1:{port}/metrics")
            authorized = client.get(
                f"http://127.0.0.1:{port}/metrics",
                headers={"Authorization": f"Bearer {METRICS_TOKEN}"},
            )
        held = [read_to_close(s, time.monotonic() + BUDGET) for s in idle[:3]]
    soft = re.search(r"Max open files\s+(\d+)\s+(\d+)", limits)
    assert soft and soft.group(1) == soft.group(2) == "4096"  # raised from 256 at startup
    assert status_of(fourth) == 503  # the fourth from one client
    assert [status_of(r) for r in held] == [408] * 3  # the three held ones, cut in time
    assert status_of(answer) == 408 and seconds < BUDGET
    assert healthz.status_code == 200 and "server" not in healthz.headers
    assert_strict_headers(healthz.headers, f"{command} /healthz")
    if command == "run":
        assert metrics.status_code == 401 and authorized.status_code == 200
    else:  # the pages alone serve no metrics at all
        assert metrics.status_code == authorized.status_code == 404


def test_a_bounced_reader_rejoining_from_preferences_is_told_why(pages: Site) -> None:
    """A hard-bounced address cannot rejoin from an old preferences page: a plain note, 409."""
    from newsletter.db.queries import mark_bounced
    from newsletter.subscriptions import unsubscribe

    sid = add_person(pages.factory, pages.clock, "reader@example.org", language="ru")
    with unit_of_work(pages.factory) as session:
        digest = get_list(session, "weekly-digest").id
        alerts = get_list(session, "urgent-actions").id
        unsubscribe(session=session, subscriber_id=sid, list_id=alerts, now=pages.clock.now(),
                    actor="t")  # fmt: skip
        mark_bounced(session, sid)
    url = f"{pages.url}/preferences/{pages.token('preferences', sid)}"
    choices = {"lists": [str(digest), str(alerts)], "language": "ru", "action": "save"}
    reply = httpx.post(url, data={**choices, "form_token": form_token(httpx.get(url).text)})
    assert reply.status_code == 409
    assert "нельзя вернуть в рассылку" in reply.text  # in the reader's language
    assert re.search(rf'value="{alerts}" checked', reply.text)  # their choices still marked
    assert pages.status(sid, "urgent-actions") != SubscriptionStatus.ACTIVE
    assert_strict_headers(reply.headers, "409")


LOCAL = "http://127.0.0.1"


def pinned_open_files() -> None:
    """In the child: an open-files limit of 300 that cannot be raised (the warning's cause)."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (300, 300))


@pytest.mark.parametrize("command", ["web", "console"])
def test_the_listeners_log_as_the_service_does(tmp_path: Path, command: str) -> None:
    """`newsletter web` and `console` log through the service's formatter (time, level, logger;
    addresses masked, controls escaped), not Python's bare last-resort handler: here the
    warning that the open-files limit caps the connections."""
    port = free_port()
    config = f"[web]\nbase_url = '{LOCAL}:{port}'\n[console]\nbase_url = '{LOCAL}:{port}'\n"
    with serving(tmp_path, command, port, config, pinned_open_files):
        pass
    lines = (tmp_path / "server.log").read_text().splitlines()
    warning = [line for line in lines if "open-files limit 300" in line]
    assert warning and re.match(r"\S+ \S+ WARNING newsletter\.web: open-files", warning[0])
