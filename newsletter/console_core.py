"""What every console page shares: the database in a worker thread, the signed-in staffer, the
checked form, the language and the templates.

Pages call `staff()` for the signed-in session (a role guard when given roles), `form()` for a
POST's fields (origin and form token checked first, body capped) and `render()` for a page.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable, Collection
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs

from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool
from starlette.convertors import Convertor, register_url_convertor
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from newsletter import staff_sessions
from newsletter.clock import Clock
from newsletter.config import LANGUAGES, Settings
from newsletter.console_i18n import AUTONYMS, console_environment
from newsletter.console_security import (
    CookieJar,
    PreSessionForms,
    is_cross_site,
    tokens_equal,
    url_origin,
)
from newsletter.db import unit_of_work
from newsletter.errors import SignInError
from newsletter.sanitize import drop_controls
from newsletter.smtp import Transport, open_pool
from newsletter.staff_sessions import SessionInfo

T = TypeVar("T")
STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_FILES = {
    "console.css": "text/css; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
}
TransportFactory = Callable[[], AbstractAsyncContextManager[Transport]]
# A row id as the console's addresses and forms carry it: ASCII digits that fit every
# database's integer (a longer one overflows SQLite and PostgreSQL, "²" passes str.isdigit()).
ID_DIGITS = 18
FORM_TYPE = "application/x-www-form-urlencoded"


class IdConvertor(Convertor[int]):
    """`{id:id}` in a route: 1 to 18 ASCII digits; anything longer matches no route (404)."""

    regex = f"[0-9]{{1,{ID_DIGITS}}}"

    def convert(self, value: str) -> int:
        """The id as a number."""
        return int(value)

    def to_string(self, value: int) -> str:
        """The id as it appears in an address."""
        return str(value)


register_url_convertor("id", IdConvertor())


def parse_id(raw: str) -> int | None:
    """A query or form value as a row id, or None if it is not 1 to 18 ASCII digits."""
    if 0 < len(raw) <= ID_DIGITS and raw.isascii() and raw.isdigit():
        return int(raw)
    return None


class SignInNeeded(Exception):
    """No live session: a page sends the browser to /signin, an API answers 401."""


@dataclass(frozen=True)
class Form:
    """A POST's fields, checked: each name's first value, and every value by name."""

    fields: dict[str, list[str]] = field(default_factory=dict)

    def get(self, name: str, default: str = "") -> str:
        """The first value of a field, or the default."""
        values = self.fields.get(name)
        return values[0] if values else default

    def all(self, name: str) -> list[str]:
        """Every value of a field (checkboxes, multiple selects)."""
        return list(self.fields.get(name, []))


def form_fields(body: bytes) -> dict[str, list[str]]:
    """A urlencoded body's fields, each value without control characters: values are stored,
    looked up and rendered, and PostgreSQL refuses a NUL (sanitize.drop_controls)."""
    fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    return {name: [drop_controls(value) for value in values] for name, values in fields.items()}


def static_version(name: str) -> str:
    """A short hash of a static file, for URLs that change when the file does."""
    return hashlib.sha256((STATIC_DIR / name).read_bytes()).hexdigest()[:12]


class Console:
    """The settings, database, clock and mail transport the console's pages share."""

    def __init__(
        self,
        settings: Settings,
        factory: sessionmaker[Session],
        clock: Clock,
        transport_factory: TransportFactory | None = None,
    ) -> None:
        self.settings = settings
        self.factory = factory
        self.clock = clock
        self.transport_factory = transport_factory or self.default_transport
        self.origin = url_origin(settings.console.base_url)
        self.cookies = CookieJar(settings.console.base_url)
        self.pre_forms = PreSessionForms(settings.security.require_secret())
        self.static = {name: static_version(name) for name in STATIC_FILES}

    @asynccontextmanager
    async def default_transport(self) -> AsyncIterator[Transport]:
        """The relays' pool, as the sender opens it, for test sends and staff notices."""
        async with open_pool(self.settings, self.factory, self.clock) as pool:
            yield pool

    # --- the database ----------------------------------------------------------------------

    async def db(self, fn: Callable[..., T], /, **kw: Any) -> T:
        """Run fn(session, **kw) in one transaction, in a worker thread."""

        def run() -> T:
            with unit_of_work(self.factory) as session:
                return fn(session, **kw)

        return await run_in_threadpool(run)

    async def db_keeping_failures(self, fn: Callable[..., T], /, **kw: Any) -> T:
        """As db(), but a refused sign-in step still commits what it counted and recorded.

        The throttle's counts and the "signin_failed" events are written by the step that then
        raises SignInError; rolling them back would let an attacker guess without limit.
        """

        def run() -> T:
            session = self.factory()
            try:
                try:
                    result = fn(session, **kw)
                except SignInError:
                    session.commit()
                    raise
                session.commit()
                return result
            except BaseException:
                session.rollback()
                raise
            finally:
                session.close()

        return await run_in_threadpool(run)

    async def db_rolled_back(self, fn: Callable[..., T], /, **kw: Any) -> T:
        """Run fn(session, **kw) and roll back whatever it wrote (a check, a fresh render)."""

        def run() -> T:
            session = self.factory()
            try:
                return fn(session, **kw)
            finally:
                session.rollback()
                session.close()

        return await run_in_threadpool(run)

    # --- who is asking -----------------------------------------------------------------------

    def now(self) -> datetime:
        """The injected clock's time."""
        return self.clock.now()

    def client(self, request: Request) -> str:
        """The client's address (uvicorn believes X-Forwarded-For only from [console]
        trusted_proxies, none by default)."""
        return request.client.host if request.client else ""

    async def session_info(self, request: Request, *, activity: bool = True) -> SessionInfo | None:
        """The live session of the request's cookie, or None; looked up once per request.

        `activity=False` (a page's background polling) leaves the session's idle clock alone.
        """
        if "console_session" in request.scope:
            found: SessionInfo | None = request.scope["console_session"]
            return found
        cookie = request.cookies.get(self.cookies.session, "")
        info = None
        if cookie:
            info = await self.db(
                staff_sessions.current_session,
                cookie=cookie,
                now=self.now(),
                settings=self.settings,
                activity=activity,
            )
        request.scope["console_session"] = info
        return info

    async def staff(
        self, request: Request, *, roles: Collection[str] = (), activity: bool = True
    ) -> SessionInfo:
        """The signed-in session; SignInNeeded without one, 403 for a role not in `roles`."""
        info = await self.session_info(request, activity=activity)
        if info is None:
            raise SignInNeeded()
        if roles and info.staff.role not in roles:
            raise HTTPException(403)
        return info

    # --- forms -----------------------------------------------------------------------------

    async def read_body(self, request: Request) -> bytes:
        """The request body, refused with 413 past [console] max_body_bytes.

        The rest of a body too large is read and dropped (the listener caps it at twice the
        limit) before the answer: a browser still sending may show a reset, not the page.
        """
        limit = self.settings.console.max_body_bytes
        body = bytearray()  # appended to: a trickled body costs no copy per chunk
        async for chunk in request.stream():
            if len(body) <= limit:
                body += chunk
        if len(body) > limit:
            raise HTTPException(413)
        return bytes(body)

    async def form(self, request: Request, info: SessionInfo | None) -> Form:
        """A POST's fields, once its origin and form token are checked (403 otherwise) and its
        type is a urlencoded form (415 otherwise).

        With a session the token is the session's; without one, the signed pre-session token.
        """
        if is_cross_site(request, self.origin):
            raise HTTPException(403)
        # Our forms are all urlencoded; another type (text/plain, JSON) is not one of them.
        kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if kind != FORM_TYPE:
            raise HTTPException(415)
        fields = form_fields(await self.read_body(request))
        sent = (fields.get("csrf") or [""])[0]
        if info is not None:
            ok = tokens_equal(sent, info.csrf_token)
        else:
            pre = request.cookies.get(self.cookies.pre, "")
            ok = self.pre_forms.valid(sent, pre, now=self.now().timestamp())
        if not ok:
            raise HTTPException(403)
        return Form(fields)

    def pre_cookie(self, request: Request) -> str:
        """The browser's pre-session cookie, or a new one (set by render())."""
        value = request.cookies.get(self.cookies.pre, "")
        if not value:
            value = request.scope.setdefault("console_new_pre", PreSessionForms.new_cookie())
        return value

    # --- pages -----------------------------------------------------------------------------

    def language(self, request: Request, info: SessionInfo | None) -> str:
        """The interface language: ?lang=, else the language cookie, else the account's, else
        the browser's first of en/be/ru."""
        for choice in (
            request.query_params.get("lang", ""),
            request.cookies.get(self.cookies.lang, ""),
            info.staff.language if info is not None else "",
        ):
            if choice in LANGUAGES:
                return choice
        for part in request.headers.get("accept-language", "").split(","):
            tag = part.split(";")[0].strip().lower()[:2]
            if tag in LANGUAGES:
                return tag
        return "en"

    def training(self, info: SessionInfo | None) -> bool:
        """Whether the console is in training mode for this staffer."""
        return self.settings.console.training or (info is not None and info.staff.training)

    def render(
        self,
        request: Request,
        name: str,
        *,
        info: SessionInfo | None,
        status: int = 200,
        headers: dict[str, str] | None = None,
        **context: Any,
    ) -> HTMLResponse:
        """A page from templates/console in the staffer's language, with its form token."""
        lang = self.language(request, info)
        csrf = (
            info.csrf_token
            if info is not None
            else self.pre_forms.token(self.pre_cookie(request), now=self.now().timestamp())
        )
        page = console_environment(lang).get_template(f"console/{name}.html.j2")
        body = page.render(
            lang=lang,
            languages=AUTONYMS,
            brand=self.settings.brand,
            info=info,
            me=info.staff if info is not None else None,
            csrf=csrf,
            training=self.training(info),
            static=self.static,
            path=local_path(request.url.path),
            when=format_when,
            **context,
        )
        response = HTMLResponse(body, status_code=status, headers=headers)
        self.remember(request, response)
        return response

    def remember(self, request: Request, response: Response) -> None:
        """Set the cookies a page chose: a new pre-session cookie, a language from ?lang=."""
        new_pre = request.scope.get("console_new_pre")
        if new_pre:
            self.cookies.set(response, self.cookies.pre, new_pre, max_age=None)
        lang = request.query_params.get("lang", "")
        if lang in LANGUAGES:
            self.cookies.set(response, self.cookies.lang, lang, max_age=365 * 24 * 3600)


def local_path(path: str) -> str:
    """A request's path as a link on its page may use it: one leading slash, since a browser
    reads //host (and /\\host) in an href as another site's address."""
    return "/" + path.lstrip("/\\")


def format_when(value: datetime | None) -> str:
    """A time as the console shows it: UTC, to the minute."""
    if value is None:
        return "–"
    return value.strftime("%Y-%m-%d %H:%M UTC")
