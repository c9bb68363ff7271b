"""The supporters' pages: unsubscribe, preferences and confirmation, behind signed links.

GET never changes state (mail scanners follow links); every change is a POST. The signed token in
the URL is the authority: it names the subscriber and the list and needs no login or cookie, so
a mail client's RFC 8058 one-click POST works as it is. The forms also carry a signed per-form
token bound to the URL's token, and an Origin other than [web] base_url's (never the Host header,
which the client writes) or a cross-site Sec-Fetch-Site is refused. A forged, altered or expired
link gets the same 400 page, which names no one; a form left open too long is shown again with
the choices it carried, to be sent once more.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

from itsdangerous import BadSignature, URLSafeSerializer
from sqlalchemy.orm import Session, sessionmaker
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from newsletter.clock import Clock
from newsletter.config import LANGUAGES, Settings
from newsletter.db import unit_of_work
from newsletter.errors import AudienceError, KeptOutError, TokenError
from newsletter.i18n import TEMPLATES_DIR, web_environment
from newsletter.subscriptions import (
    LinkView,
    confirm_by_link,
    link_view,
    save_preferences,
    unsubscribe_by_link,
)
from newsletter.tokens import TokenClaims, make_token, page_path, read_token

FORM_MAX_AGE_SECONDS = 24 * 3600
AUTONYMS = {"en": "English", "be": "Беларуская", "ru": "Русский"}
CSS = (TEMPLATES_DIR / "web" / "style.css").read_text(encoding="utf-8")
CSS_HASH = base64.b64encode(hashlib.sha256(CSS.encode()).digest()).decode()
SECURITY_HEADERS = {
    "content-security-policy": (
        f"default-src 'none'; style-src 'sha256-{CSS_HASH}'; form-action 'self'; "
        "base-uri 'none'; frame-ancestors 'none'"
    ),
    "referrer-policy": "no-referrer",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
    "permissions-policy": "interest-cohort=(), camera=(), microphone=(), geolocation=()",
    # The pages carry personal choices: no shared cache may keep them.
    "cache-control": "no-store",
}


class SecurityHeaders:
    """Adds the strict headers to every response, error pages included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on, adding the headers as the response starts."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)


class Pages:
    """The routes, with the settings, database and clock they share."""

    def __init__(self, settings: Settings, factory: sessionmaker[Session], clock: Clock) -> None:
        self.settings = settings
        self.factory = factory
        self.clock = clock
        self.secret = settings.security.require_secret()
        self.forms = URLSafeSerializer(self.secret, salt="newsletter.web-form")
        self.origin = _origin(settings.web.base_url)

    # --- helpers ---------------------------------------------------------------------------

    def render(self, name: str, lang: str, status: int = 200, **context: Any) -> HTMLResponse:
        """A page from templates/web in a language."""
        page = web_environment(lang).get_template(f"web/{name}.html.j2")
        body = page.render(
            lang=lang, css=CSS, brand=self.settings.brand, languages=AUTONYMS, **context
        )
        return HTMLResponse(body, status_code=status)

    def claims(self, request: Request, purpose: str) -> TokenClaims:
        """Verify the URL's token for a purpose; confirmation links expire, others do not."""
        max_age = None
        if purpose == "confirm":
            max_age = self.settings.web.confirm_link_max_age_hours * 3600
        return read_token(
            request.path_params["token"],
            secret=self.secret,
            purpose=purpose,
            max_age_seconds=max_age,
            now=self.clock.now(),
        )

    async def step(
        self, action: Callable[..., LinkView], claims: TokenClaims, **kw: Any
    ) -> LinkView:
        """Run one subscriptions step for the link's subscriber and list: one transaction, in a
        worker thread."""

        def run() -> LinkView:
            with unit_of_work(self.factory) as session:
                return action(
                    session, subscriber_id=claims.subscriber_id, list_id=claims.list_id, **kw
                )

        return await run_in_threadpool(run)

    def form_token(self, url_token: str) -> str:
        """A signed token for a form, bound to the link it was served under, dated by the clock."""
        return str(self.forms.dumps([_digest(url_token), int(self.clock.now().timestamp())]))

    def check_form(self, request: Request, fields: dict[str, list[str]]) -> bool:
        """Refuse a cross-site post, or one without this page's form token; True if it expired."""
        if _cross_site(request, self.origin, strict=True):
            raise HTTPException(403)
        sent = (fields.get("form_token") or [""])[0]
        try:
            value = self.forms.loads(sent)
        except BadSignature:
            raise HTTPException(403) from None
        if not (
            isinstance(value, list)
            and len(value) == 2
            and isinstance(value[0], str)
            and isinstance(value[1], int)
            and hmac.compare_digest(value[0], _digest(request.path_params["token"]))
        ):
            raise HTTPException(403)
        return self.clock.now().timestamp() - value[1] > FORM_MAX_AGE_SECONDS

    def preferences_url(self, person: LinkView, list_id: int) -> str:
        """The preferences link for the subscriber on an unsubscribe page."""
        token = make_token(
            secret=self.secret,
            purpose="preferences",
            subscriber_id=person.subscriber_id,
            list_id=list_id,
        )
        return page_path("preferences", token)

    async def read_body(self, request: Request) -> bytes:
        """The request body, refused past [web] max_body_bytes."""
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.settings.web.max_body_bytes:
                raise HTTPException(413)
        return body

    # --- unsubscribe -----------------------------------------------------------------------

    async def unsubscribe_page(self, request: Request) -> Response:
        """What you are leaving, one button, and a link to preferences."""
        claims = self.claims(request, "unsubscribe")
        person = await self.step(link_view, claims, allow_gone=True)
        if person.gone:
            return self.render("unsubscribed", person.language, list_name=person.list_name)
        return self.render(
            "unsubscribe",
            person.language,
            list_name=person.list_name,
            subscribed=person.subscribed_to(claims.list_id),
            preferences_url=self.preferences_url(person, claims.list_id),
        )

    async def unsubscribe_post(self, request: Request) -> Response:
        """Unsubscribe at once: the page's button and a mail client's one-click alike."""
        if _cross_site(request, self.origin, strict=False):
            raise HTTPException(403)
        claims = self.claims(request, "unsubscribe")
        await self.read_body(request)  # List-Unsubscribe=One-Click or the button: either will do
        person = await self.step(unsubscribe_by_link, claims, now=self.clock.now())
        return self.render("unsubscribed", person.language, list_name=person.list_name)

    # --- preferences -----------------------------------------------------------------------

    async def preferences_page(self, request: Request) -> Response:
        """The lists and language a subscriber can choose, in a form saved with a POST."""
        claims = self.claims(request, "preferences")
        person = await self.step(link_view, claims)
        active = {m.list_id for m in person.active}
        return self.preferences_form(
            request, person, active, person.language, saved=request.query_params.get("saved") == "1"
        )

    def preferences_form(
        self,
        request: Request,
        person: LinkView,
        checked: set[int],
        language: str,
        *,
        saved: bool = False,
        expired: bool = False,
        bounced: bool = False,
    ) -> Response:
        """The preferences form with these lists and this language marked."""
        return self.render(
            "preferences",
            person.language,
            status=409 if bounced else 200,
            person=person,
            checked=checked,
            checked_language=language,
            form_token=self.form_token(request.path_params["token"]),
            saved=saved,
            expired=expired,
            bounced=bounced,
        )

    async def preferences_post(self, request: Request) -> Response:
        """Save the chosen lists and language, then show the form again (post/redirect/get)."""
        claims = self.claims(request, "preferences")
        fields = parse_qs((await self.read_body(request)).decode("utf-8", "replace"))
        expired = self.check_form(request, fields)
        try:
            chosen = {int(v) for v in fields.get("lists", [])}
        except ValueError:
            raise HTTPException(400) from None
        language = (fields.get("language") or [""])[0]
        if expired:  # nothing saved: the same choices again, under a fresh form token
            person = await self.step(link_view, claims)
            return self.preferences_form(request, person, chosen, language, expired=True)
        leave_all = (fields.get("action") or [""])[0] == "leave"
        list_ids = set() if leave_all else chosen
        try:
            await run_in_threadpool(self._save, claims, list_ids, language, leave_all)
        except KeptOutError:  # nothing saved: say why, with their choices still marked
            person = await self.step(link_view, claims)
            return self.preferences_form(request, person, chosen, language, bounced=True)
        return RedirectResponse(f"{request.url.path}?saved=1", status_code=303)

    def _save(self, claims: TokenClaims, list_ids: set[int], language: str, leave: bool) -> None:
        try:
            with unit_of_work(self.factory) as session:
                save_preferences(
                    session,
                    subscriber_id=claims.subscriber_id,
                    list_ids=list_ids,
                    language=language,
                    leave=leave,
                    now=self.clock.now(),
                )
        except KeptOutError:
            raise
        except AudienceError:
            raise HTTPException(400) from None

    # --- confirmation ----------------------------------------------------------------------

    async def confirm_page(self, request: Request) -> Response:
        """Ask for the click that confirms; a mail scanner fetching the link confirms nothing."""
        claims = self.claims(request, "confirm")
        person = await self.step(link_view, claims)
        return self.confirm_form(request, person)

    def confirm_form(
        self, request: Request, person: LinkView, *, expired: bool = False
    ) -> Response:
        """The page with the one button that confirms the waiting lists."""
        return self.render(
            "confirm",
            person.language,
            waiting=person.waiting,
            form_token=self.form_token(request.path_params["token"]),
            expired=expired,
        )

    async def confirm_post(self, request: Request) -> Response:
        """Confirm every list waiting for this subscriber and say so."""
        claims = self.claims(request, "confirm")
        fields = parse_qs((await self.read_body(request)).decode("utf-8", "replace"))
        if self.check_form(request, fields):  # left open too long: ask for the click again
            person = await self.step(link_view, claims)
            return self.confirm_form(request, person, expired=True)
        person = await self.step(confirm_by_link, claims, secret=self.secret, now=self.clock.now())
        return self.render("confirmed", person.language, active=person.active)

    # --- errors ----------------------------------------------------------------------------

    async def token_error(self, request: Request, exc: Exception) -> Response:
        """One page for every bad link, whatever was wrong with it."""
        return self.render("error", _accepted_language(request), 400, kind="link")

    async def http_error(self, request: Request, exc: Exception) -> Response:
        """Plain pages for 4xx answers (not found, refused, too large)."""
        code = exc.status_code if isinstance(exc, HTTPException) else 500
        return self.render("error", _accepted_language(request), code, kind=str(code))


async def healthz(request: Request) -> Response:
    """A liveness answer for load balancers and tests."""
    return PlainTextResponse("ok")


def create_app(settings: Settings, factory: sessionmaker[Session], clock: Clock) -> Starlette:
    """The web app: unsubscribe, preferences and confirmation pages, with strict headers."""
    pages = Pages(settings, factory, clock)
    routes = [
        Route(page_path(purpose, "{token}"), endpoint, methods=[method])
        for purpose, method, endpoint in (
            ("unsubscribe", "GET", pages.unsubscribe_page),
            ("unsubscribe", "POST", pages.unsubscribe_post),
            ("preferences", "GET", pages.preferences_page),
            ("preferences", "POST", pages.preferences_post),
            ("confirm", "GET", pages.confirm_page),
            ("confirm", "POST", pages.confirm_post),
        )
    ]
    routes.append(Route("/healthz", healthz, methods=["GET"]))
    handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
        TokenError: pages.token_error,
        HTTPException: pages.http_error,
    }
    app = Starlette(routes=routes, exception_handlers=handlers)
    app.add_middleware(SecurityHeaders)
    return app


def _cross_site(request: Request, origin: str, *, strict: bool) -> bool:
    """Whether a post comes from another site (by Origin, and when strict, Sec-Fetch-Site).

    `origin` is [web] base_url's: the Host header is the client's to write, so a forged Host with
    a matching Origin proves nothing. Under Referrer-Policy no-referrer browsers send
    `Origin: null` for our own forms, so null passes; the form token is what proves the post came
    from our page.
    """
    sent = request.headers.get("origin")
    if sent and sent != "null" and sent != origin:
        return True
    site = request.headers.get("sec-fetch-site")
    return strict and site is not None and site not in ("same-origin", "none")


def _origin(url: str) -> str:
    """A URL's origin as browsers write it: lower case, no default port, no user or path."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    default = {"http": 80, "https": 443}.get(parts.scheme)
    port = f":{parts.port}" if parts.port and parts.port != default else ""
    return f"{parts.scheme}://{host}{port}"


def _digest(url_token: str) -> str:
    return hashlib.sha256(url_token.encode()).hexdigest()[:32]


def _accepted_language(request: Request) -> str:
    """The first of en/be/ru the browser accepts, for pages that know no subscriber."""
    for part in request.headers.get("accept-language", "").split(","):
        tag = part.split(";")[0].strip().lower()[:2]
        if tag in LANGUAGES:
            return tag
    return "en"
