"""The console's security properties, each tested through its pages (Starlette's TestClient).

Sessions, cookies, form tokens and origins, throttling, one answer for unknown accounts, TOTP
replay, roles, escaping of staff text, and who sees subscriber addresses.
"""

from __future__ import annotations

import logging
import re
import socket
import time
from collections.abc import Iterator
from http.cookies import SimpleCookie

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from newsletter.clock import FrozenClock
from newsletter.config import Settings
from newsletter.console_alerts import BODY_MAX_CHARS
from newsletter.console_security import CONSOLE_CSP
from newsletter.db import unit_of_work
from newsletter.db.models import Campaign, Event
from newsletter.staff import disable_staff
from tests.conftest import SmtpServer, make_settings
from tests.console_site import (
    ConsoleClient,
    ConsoleSite,
    Staffer,
    console_settings,
    csrf_of,
    declare_lists,
    enrol_staff,
    field_of,
    next_code,
    serve_console,
)
from tests.test_console import submitted_alert

EVIL = "https://evil.example"


@pytest.fixture
def settings(database_url: str, smtpd: SmtpServer) -> Settings:
    return console_settings(make_settings(database_url, smtpd))


@pytest.fixture
def editor(factory: sessionmaker[Session], settings: Settings, clock: FrozenClock) -> Staffer:
    declare_lists(factory)
    return enrol_staff(factory, settings, clock, "ed@example.org", "editor")


@pytest.fixture
def site(
    factory: sessionmaker[Session], settings: Settings, clock: FrozenClock
) -> Iterator[ConsoleSite]:
    with serve_console(settings, factory, clock) as served:
        yield served


@pytest.fixture
def client(site: ConsoleSite) -> ConsoleClient:
    return site.client()


def count(factory: sessionmaker[Session], model: type) -> int:
    with unit_of_work(factory) as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def set_cookie_of(response: object, name: str) -> str:
    """The raw Set-Cookie header that sets `name`."""
    for header in response.headers.get_list("set-cookie"):  # type: ignore[attr-defined]
        if header.startswith(name + "="):
            return str(header)
    raise AssertionError(f"no Set-Cookie for {name}")


def draft_form(title: str = "Write to the prosecutor") -> dict[str, str]:
    return {"action": "save", "list": "urgent-actions", "segment": "", "item_ref": "",
            "url": "", "title_en": title, "body_en": "Please *write* today."}  # fmt: skip


# --- headers -------------------------------------------------------------------------------


def test_every_page_has_the_strict_headers(client: ConsoleClient, editor: Staffer) -> None:
    """CSP without inline script, frame-ancestors 'none', no-referrer, nosniff, no-store."""
    pages = [client.get("/signin"), client.get("/nowhere"), client.get("/static/console.css")]
    client.sign_in(editor)
    pages += [client.get("/"), client.get("/alerts/new"), client.get("/audit")]
    for page in pages:
        h = page.headers
        assert h["content-security-policy"] == CONSOLE_CSP
        assert "script-src 'self';" in CONSOLE_CSP and "unsafe-inline" not in CONSOLE_CSP
        assert "frame-ancestors 'none'" in CONSOLE_CSP
        assert h["referrer-policy"] == "no-referrer"
        assert h["x-content-type-options"] == "nosniff"
        assert h["cache-control"] == "no-store"
        assert h["x-frame-options"] == "DENY"


def test_pages_have_no_inline_script_or_style(client: ConsoleClient, editor: Staffer) -> None:
    """Every script and stylesheet is a file from /static/: nothing inline, nothing foreign."""
    client.sign_in(editor)
    for path in ("/signin", "/", "/alerts/new", "/digest"):
        page = client.get(path).text
        assert not re.search(r"<script(?![^>]*\bsrc=\"/static/)", page), path
        assert "<style" not in page and " style=" not in page and " on" + "click" not in page
        assert not re.search(r'(src|href)="(https?:)?//', page), path


# --- cookies and sessions -------------------------------------------------------------------


def test_session_cookie_flags_over_http(client: ConsoleClient, editor: Staffer) -> None:
    """HttpOnly, SameSite=Strict, Path=/, no __Host- prefix on a plain-http base_url."""
    header = set_cookie_of(client.sign_in(editor), "newsletter_console").lower()
    assert "httponly" in header and "samesite=strict" in header and "path=/" in header
    assert "secure" not in header


def test_session_cookie_is_host_prefixed_and_secure_over_https(
    factory: sessionmaker[Session], settings: Settings, clock: FrozenClock, editor: Staffer
) -> None:
    """With an https base_url the cookies are __Host- prefixed, Secure, Path=/, no Domain.

    The test talks plain http to the server, so it hands the Secure cookies back itself.
    """
    with serve_console(settings, factory, clock, base_url="https://console.example.org") as s:
        client = s.client()
        page = client.get("/signin")
        pre = SimpleCookie(set_cookie_of(page, "__Host-newsletter_console_pre"))
        jar = {
            "cookie": f"__Host-newsletter_console_pre={pre['__Host-newsletter_console_pre'].value}"
        }
        form = {"email": editor.email, "password": editor.password, "csrf": csrf_of(page.text)}
        first = client.post("/signin", form, headers=jar)
        assert first.status_code == 200
        code = {"csrf": csrf_of(first.text), "pending": field_of(first.text, "pending"),
                "code": next_code(editor.secret, clock)}  # fmt: skip
        signed_in = client.post("/signin/code", code, headers=jar)
        header = set_cookie_of(signed_in, "__Host-newsletter_console")
        value = SimpleCookie(header)["__Host-newsletter_console"].value
        home = client.get("/", headers={"cookie": f"__Host-newsletter_console={value}"})
        assert home.status_code == 200 and editor.email in home.text
    for raw in (header, set_cookie_of(page, "__Host-newsletter_console_pre")):
        flags = raw.lower()
        assert "secure" in flags and "httponly" in flags and "samesite=strict" in flags
        assert "path=/" in flags and "domain=" not in flags


def test_sign_in_gives_a_new_session_id_and_ends_the_old(
    client: ConsoleClient, editor: Staffer
) -> None:
    """Signing in again makes a new cookie; the one from before stops working."""
    first = SimpleCookie(set_cookie_of(client.sign_in(editor), "newsletter_console"))
    old = first["newsletter_console"].value
    second = SimpleCookie(set_cookie_of(client.sign_in(editor), "newsletter_console"))
    assert second["newsletter_console"].value != old
    client.http.cookies.clear()
    client.http.cookies.set("newsletter_console", old)
    assert client.get("/").headers["location"] == "/signin"


def test_idle_sessions_expire(
    client: ConsoleClient, editor: Staffer, clock: FrozenClock, settings: Settings
) -> None:
    """Past [console] idle_minutes without a request, the session is over."""
    client.sign_in(editor)
    clock.advance(minutes=settings.console.idle_minutes - 1)
    assert client.get("/").status_code == 200
    clock.advance(minutes=settings.console.idle_minutes + 1)
    response = client.get("/")
    assert response.status_code == 303 and response.headers["location"] == "/signin"


def test_live_figures_polling_does_not_keep_a_session_from_going_idle(
    client: ConsoleClient, editor: Staffer, clock: FrozenClock, settings: Settings
) -> None:
    """A console left open on a watch page polls /api/progress every 2 s: that is the page,
    not its staffer, so past idle_minutes the session is over (the poll answers 401) although
    the page never stopped asking; a page opened in between still counts as use."""
    client.sign_in(editor)
    idle = settings.console.idle_minutes
    for _ in range(4):
        clock.advance(minutes=idle / 4)
        assert client.get("/api/progress").status_code == 200
    clock.advance(minutes=1)
    assert client.get("/api/progress").status_code == 401
    assert client.get("/").headers["location"] == "/signin"


def test_a_page_opened_between_polls_keeps_the_session(
    client: ConsoleClient, editor: Staffer, clock: FrozenClock, settings: Settings
) -> None:
    """Opening a page is use: the idle clock starts again from it, polls or not."""
    client.sign_in(editor)
    idle = settings.console.idle_minutes
    clock.advance(minutes=idle - 1)
    assert client.get("/").status_code == 200
    clock.advance(minutes=idle - 1)
    assert client.get("/api/progress").status_code == 200


def test_sessions_end_after_max_hours_however_busy(
    client: ConsoleClient, editor: Staffer, clock: FrozenClock, settings: Settings
) -> None:
    """A request every 20 minutes keeps a session only until [console] max_hours."""
    client.sign_in(editor)
    for _ in range(settings.console.max_hours * 3 - 1):
        clock.advance(minutes=20)
        assert client.get("/").status_code == 200
    clock.advance(minutes=20)
    assert client.get("/").status_code == 303


def test_a_disabled_account_is_signed_out_at_once(
    client: ConsoleClient, editor: Staffer, factory: sessionmaker[Session], clock: FrozenClock
) -> None:
    """`staff disable` ends a live session on its next request."""
    client.sign_in(editor)
    assert client.get("/").status_code == 200
    with unit_of_work(factory) as session:
        disable_staff(session, email=editor.email, now=clock.now(), actor="cli:test")
    assert client.get("/").status_code == 303
    assert client.get("/api/progress").status_code == 401


def test_sign_out_everywhere_ends_every_session(site: ConsoleSite, editor: Staffer) -> None:
    """A lost phone: from one browser, every other browser's session ends too."""
    laptop, phone = site.client(), site.client()
    laptop.sign_in(editor)
    phone.sign_in(editor)
    assert laptop.post("/signout-everywhere", {}).status_code == 303
    assert phone.get("/").status_code == 303 and laptop.get("/").status_code == 303


# --- form tokens and origins ----------------------------------------------------------------


@pytest.mark.parametrize(
    "headers, token",
    [
        ({}, ""),  # no token
        ({}, "forged"),  # a wrong one
        ({"origin": EVIL}, None),  # the right token from another site
        ({"origin": "null", "sec-fetch-site": "cross-site"}, None),
        ({"sec-fetch-site": "same-site"}, None),
        ({"host": "evil.example", "origin": "http://evil.example"}, None),  # Host proves nothing
    ],
)
def test_cross_site_or_tokenless_posts_get_403_and_change_nothing(
    client: ConsoleClient,
    editor: Staffer,
    factory: sessionmaker[Session],
    headers: dict[str, str],
    token: str | None,
) -> None:
    """A POST from elsewhere, or without the session's token, is refused before it acts."""
    client.sign_in(editor)
    real = csrf_of(client.get("/alerts/new").text)
    before = count(factory, Campaign)
    response = client.post(
        "/alerts/new", {**draft_form(), "csrf": real if token is None else token}, headers=headers
    )
    assert response.status_code == 403
    assert count(factory, Campaign) == before
    assert client.post("/alerts/new", draft_form(), csrf_from="/alerts/new").status_code == 303
    assert count(factory, Campaign) == before + 1


def test_sign_in_form_needs_its_pre_session_token(client: ConsoleClient, editor: Staffer) -> None:
    """Before sign-in the form token is bound to the browser's pre-session cookie."""
    form = {"email": editor.email, "password": editor.password}
    assert client.post("/signin", {**form, "csrf": ""}).status_code == 403
    stranger = csrf_of(client.get("/signin").text)
    client.http.cookies.clear()
    assert client.post("/signin", {**form, "csrf": stranger}).status_code == 403
    assert client.post("/signin", form, csrf_from="/signin").status_code == 200


def test_a_session_token_does_not_sign_another_session(
    site: ConsoleSite,
    factory: sessionmaker[Session],
    settings: Settings,
    clock: FrozenClock,
    editor: Staffer,
) -> None:
    """Each session has its own form token."""
    other = enrol_staff(factory, settings, clock, "other@example.org", "editor")
    a, b = site.client(), site.client()
    a.sign_in(editor)
    b.sign_in(other)
    token_a = csrf_of(a.get("/").text)
    assert b.post("/alerts/new", {**draft_form(), "csrf": token_a}).status_code == 403


def test_the_largest_compose_form_fits_and_a_larger_one_gets_a_page(
    client: ConsoleClient, editor: Staffer, settings: Settings, factory: sessionmaker[Session]
) -> None:
    """Three languages of the longest Cyrillic text (6 bytes a letter encoded) are saved; a body
    past [console] max_body_bytes gets the console's translated page, not bare text."""
    client.sign_in(editor)
    compose = client.get("/alerts/new").text
    assert compose.count(f'maxlength="{BODY_MAX_CHARS}"') == len(settings.render.languages)
    longest = ("Вызваліце палітвязняў " * BODY_MAX_CHARS)[:BODY_MAX_CHARS]
    form = {**draft_form(), "title_be": "Вызваліце", "title_ru": "Освободите"}
    for lang in settings.render.languages:
        form[f"body_{lang}"] = longest
    saved = client.post("/alerts/new", form, csrf_from="/alerts/new")
    assert saved.status_code == 303, saved.text[:200]
    big = "x" * (settings.console.max_body_bytes + 10)
    refused = client.post("/alerts/new?lang=ru", {**draft_form(), "body_en": big})
    assert refused.status_code == 413
    assert refused.headers["content-type"].startswith("text/html")
    assert "Форма слишком большая." in refused.text and 'class="error"' not in refused.text
    assert count(factory, Campaign) == 1


def test_posts_that_are_not_urlencoded_forms_are_refused(
    client: ConsoleClient, editor: Staffer, factory: sessionmaker[Session]
) -> None:
    """A text/plain or JSON body is none of our forms: 415, nothing saved."""
    client.sign_in(editor)
    token = csrf_of(client.get("/alerts/new").text)
    body = "&".join(f"{k}={v}" for k, v in {**draft_form(), "csrf": token}.items())
    for kind in ("text/plain", "application/json", ""):
        reply = client.http.post(
            "/alerts/new",
            content=body.encode(),
            headers={"content-type": kind, "origin": client.origin},
        )
        assert reply.status_code == 415, kind
    assert count(factory, Campaign) == 0


def test_an_aborted_post_leaves_no_traceback(site: ConsoleSite, editor: Staffer) -> None:
    """A client that goes away in the middle of its body: no "Exception in ASGI application"."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    keep = Keep(logging.DEBUG)
    logging.getLogger("uvicorn.error").addHandler(keep)
    try:
        port = int(site.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as raw:
            raw.sendall(
                b"POST /signin HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/x-www-form-urlencoded\r\n"
                b"Content-Length: 5000\r\n\r\nemail=a"
            )
            time.sleep(0.3)
        time.sleep(0.5)
        assert site.client().get("/healthz").status_code == 200
    finally:
        logging.getLogger("uvicorn.error").removeHandler(keep)
    assert [r.getMessage() for r in records if r.levelno >= logging.ERROR] == []


# --- sign-in ---------------------------------------------------------------------------------


def sign_in_answer(client: ConsoleClient, email: str, password: str) -> tuple[int, str]:
    response = client.post("/signin", {"email": email, "password": password}, csrf_from="/signin")
    body = re.sub(r'name="csrf" value="[^"]+"', "", response.text)
    return response.status_code, body.replace(email, "EMAIL")


def test_unknown_accounts_get_the_same_answer_as_wrong_passwords(
    client: ConsoleClient, editor: Staffer
) -> None:
    """Same status, same page: the console does not say which accounts exist."""
    wrong = sign_in_answer(client, editor.email, "not the password at all")
    unknown = sign_in_answer(client, "nobody@example.org", "not the password at all")
    assert wrong[0] == unknown[0] == 400
    assert wrong[1] == unknown[1]


def test_failed_sign_ins_are_throttled_with_retry_after(
    client: ConsoleClient, editor: Staffer, settings: Settings, factory: sessionmaker[Session]
) -> None:
    """Past [console] failures_per_account_client, 429 with Retry-After, even with the right
    password; audited."""
    for _ in range(settings.console.failures_per_account_client):
        assert sign_in_answer(client, editor.email, "wrong wrong wrong")[0] == 400
    response = client.post(
        "/signin", {"email": editor.email, "password": editor.password}, csrf_from="/signin"
    )
    assert response.status_code == 429
    assert int(response.headers["retry-after"]) > 0
    with unit_of_work(factory) as session:
        actions = set(session.scalars(select(Event.action)))
    assert {"staff.signin_failed", "staff.signin_throttled"} <= actions


def failed_clients(factory: sessionmaker[Session]) -> list[str]:
    with unit_of_work(factory) as session:
        events = session.scalars(select(Event).where(Event.action == "staff.signin_failed"))
        return [str(e.detail.get("client")) for e in events]


def test_forwarded_addresses_count_only_from_the_consoles_own_trusted_proxies(
    site: ConsoleSite,
    editor: Staffer,
    settings: Settings,
    factory: sessionmaker[Session],
    clock: FrozenClock,
) -> None:
    """By default X-Forwarded-For is ignored, even from loopback: a forged one neither dodges
    the throttle nor writes the audit log's address. Named in [console] trusted_proxies, the
    proxy's header is believed."""
    client = site.client()
    limit = settings.console.failures_per_account_client
    answers = []
    for n in range(limit + 1):
        reply = client.post(
            "/signin",
            {"email": editor.email, "password": "wrong wrong wrong"},
            csrf_from="/signin",
            headers={"x-forwarded-for": f"10.9.{n}.1"},
        )
        answers.append(reply.status_code)
    assert answers == [400] * limit + [429]
    assert set(failed_clients(factory)) == {"127.0.0.1"}
    proxied = console_settings(settings, trusted_proxies=("127.0.0.1",))
    with serve_console(proxied, factory, clock) as behind_proxy:
        reply = behind_proxy.client().post(
            "/signin",
            {"email": editor.email, "password": "wrong wrong wrong"},
            csrf_from="/signin",
            headers={"x-forwarded-for": "198.51.100.77"},
        )
    assert reply.status_code == 400
    assert failed_clients(factory)[-1] == "198.51.100.77"


def test_a_throttled_step_up_says_so_and_is_this_sessions_alone(
    site: ConsoleSite, editor: Staffer, factory: sessionmaker[Session], clock: FrozenClock
) -> None:
    """Wrong codes at the sign-in page (a password-holder) do not touch the owner's approval;
    the owner's own wrong codes throttle this session, with a line that says so."""
    approver = enrol_staff(factory, site.settings, clock, "ap@example.org", "approver")
    author = site.client()
    author.sign_in(editor)
    path, revision = submitted_alert(author)
    owner, other = site.client(), site.client()
    owner.sign_in(approver)
    other.sign_in(approver)
    attacker = site.client()
    first = attacker.post(
        "/signin", {"email": approver.email, "password": approver.password}, csrf_from="/signin"
    )
    for _ in range(site.settings.console.code_failures_per_account_client + 1):
        attacker.post(
            "/signin/code",
            {"csrf": csrf_of(first.text), "pending": field_of(first.text, "pending"), "code": "1"},
        )
    for _ in range(site.settings.console.step_up_failures_per_session):
        wrong = owner.post(
            f"{path}/approve", {"revision": revision, "code": "000000"}, csrf_from=path
        )
        assert wrong.status_code == 400 and "That code is not valid." in wrong.text
    form = {"revision": revision, "code": next_code(approver.secret, clock)}
    throttled = owner.post(f"{path}/approve", form, csrf_from=path)
    assert throttled.status_code == 429 and int(throttled.headers["retry-after"]) > 0
    assert "too many attempts" in throttled.text and "not valid" not in throttled.text
    form = {"revision": revision, "code": next_code(approver.secret, clock)}
    assert other.post(f"{path}/approve", form, csrf_from=path).status_code == 303


def test_a_totp_code_signs_in_once(
    client: ConsoleClient, editor: Staffer, clock: FrozenClock
) -> None:
    """The same code a second time (a replay) is refused, though still inside its window."""
    client.sign_in(editor)
    code = re.sub(r"\s", "", __import__("pyotp").TOTP(editor.secret).at(clock.now()))
    first = client.post(
        "/signin", {"email": editor.email, "password": editor.password}, csrf_from="/signin"
    )
    again = client.post(
        "/signin/code",
        {"csrf": csrf_of(first.text), "pending": field_of(first.text, "pending"), "code": code},
    )
    assert again.status_code == 400


def test_forms_use_the_standard_autocomplete_tokens(client: ConsoleClient, editor: Staffer) -> None:
    """username and current-password, then one-time-code."""
    page = client.get("/signin").text
    assert 'autocomplete="username"' in page and 'autocomplete="current-password"' in page
    step_two = client.post(
        "/signin", {"email": editor.email, "password": editor.password}, csrf_from="/signin"
    ).text
    assert 'autocomplete="one-time-code"' in step_two


# --- roles and what each sees -----------------------------------------------------------------


def test_editors_cannot_reach_admin_pages_or_approve(
    client: ConsoleClient, editor: Staffer, factory: sessionmaker[Session]
) -> None:
    """The audit log and staff list are for admins; approving for approvers (403 otherwise)."""
    client.sign_in(editor)
    assert client.get("/audit").status_code == 403
    assert client.get("/audit.csv").status_code == 403
    assert client.get("/staff").status_code == 403
    made = client.post("/alerts/new", draft_form(), csrf_from="/alerts/new")
    path = made.headers["location"]
    assert client.post(f"{path}/submit", {}).status_code == 303
    page = client.get(path).text
    assert 'id="approve"' not in page
    forged = client.post(f"{path}/approve", {"code": "123456", "revision": "x" * 64})
    assert forged.status_code == 403


def test_staff_text_is_escaped_in_the_console(client: ConsoleClient, editor: Staffer) -> None:
    """Script in a title and a body, as staff typed it, shows as text on the console's pages."""
    client.sign_in(editor)
    hostile = 'Free them <script>alert("x")</script><img src=x onerror=alert(1)>'
    form = {**draft_form(hostile), "body_en": "</textarea><script>alert(2)</script>"}
    made = client.post("/alerts/new", form, csrf_from="/alerts/new")
    assert made.status_code == 303, made.text
    path = made.headers["location"]
    for page in (client.get(path).text, client.get("/").text):
        assert "<script>alert" not in page and "<img src=x" not in page
        assert "</textarea><script>" not in page
    edit = client.get(path).text
    assert "&lt;script&gt;alert(&#34;x&#34;)" in edit and "&lt;/textarea&gt;&lt;script&gt;" in edit
