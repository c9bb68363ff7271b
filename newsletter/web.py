"""The supporters' pages: unsubscribe, preferences and confirmation behind signed links; and the
public pages: the signup form (signup.py) and the archive of web copies (archive.py).

GET never changes state (mail scanners follow links); every change is a POST. The signed token in
the URL is the authority: it names the subscriber and the list and needs no login or cookie, so
a mail client's RFC 8058 one-click POST works as it is. The forms also carry a signed per-form
token bound to the URL's token, and an Origin other than [web] base_url's (never the Host header,
which the client writes) or a cross-site Sec-Fetch-Site is refused. A forged, altered or expired
link gets the same 400 page, which names no one; a form left open too long is shown again with
the choices it carried, to be sent once more.

The public pages link only relatively (never to [web] base_url), so a mirror serving this same app
serves them whole. Signup and token pages are no-store; a sent campaign's web copy is public and
immutable; only /subscribe?embed=1 may be framed, and only by [web] signup_origins.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from babel.dates import format_date
from itsdangerous import BadSignature, URLSafeSerializer
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from newsletter import archive, signup
from newsletter.clock import Clock
from newsletter.config import LANGUAGES, Settings
from newsletter.db import unit_of_work
from newsletter.db.models import MailingList
from newsletter.errors import AudienceError, KeptOutError, TokenError
from newsletter.i18n import TEMPLATES_DIR, gettext_for, web_environment
from newsletter.subscriptions import (
    LinkView,
    Membership,
    confirm_by_link,
    link_view,
    save_preferences,
    unsubscribe_by_link,
)
from newsletter.tokens import TokenClaims, make_token, page_path, read_token

log = logging.getLogger("newsletter.web")
FORM_MAX_AGE_SECONDS = 24 * 3600
AUTONYMS = {"en": "English", "be": "Беларуская", "ru": "Русский"}
CSS = (TEMPLATES_DIR / "web" / "style.css").read_text(encoding="utf-8")
CSS_HASH = base64.b64encode(hashlib.sha256(CSS.encode()).digest()).decode()
STATIC_DIR = Path(__file__).resolve().parent / "static"
SIGNUP_JS = (STATIC_DIR / "signup.js").read_bytes()
NO_STORE = "no-store"
# A sent campaign's web copy never changes: a CDN or a mirror may keep it for a year.
IMMUTABLE = "public, max-age=31536000, immutable"
# The archive's list and feed, and a web copy still sending: public, but they change.
SHORT_PUBLIC = "public, max-age=300"
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


async def read_capped_body(request: Request, limit: int) -> bytes:
    """A request's body, refused with 413 as soon as it passes `limit` bytes."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(413)
    return body


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
                own_frame_rule = "x-frame-options" in headers
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
                framable = "frame-ancestors 'none'" not in headers["content-security-policy"]
                if framable and not own_frame_rule:
                    # A page framable by named origins (the embedded form): X-Frame-Options can
                    # name none of them, and the default DENY would win.
                    del headers["x-frame-options"]
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
        # Who may post the signup form: our pages, a mirror's, and the portal's.
        self.signup_origins = {
            self.origin,
            *(_origin(u) for u in settings.web.mirror_urls),
            *(_origin(u) for u in settings.web.signup_origins),
        }
        # Set when a signup queues a confirmation, so a sender waiting in this process wakes.
        self.confirmations_owed = asyncio.Event()

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
        return await read_capped_body(request, self.settings.web.max_body_bytes)

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

    # --- signing up ------------------------------------------------------------------------

    def signup_headers(self, embed: bool) -> dict[str, str]:
        """No-store, our own script only, and framing by the portal's origins for ?embed=1."""
        ancestors = "'none'"
        if embed and self.settings.web.signup_origins:
            ancestors = " ".join(self.settings.web.signup_origins)
        csp = (
            f"default-src 'none'; style-src 'sha256-{CSS_HASH}'; script-src 'self'; "
            f"form-action 'self'; base-uri 'none'; frame-ancestors {ancestors}"
        )
        return {"content-security-policy": csp, "cache-control": NO_STORE}

    def signup_lists(self) -> list[Membership]:
        """The lists a person may sign up for on the web: the digest's and the alerts'."""
        slugs = (self.settings.digest.list, self.settings.alerts.list)
        with unit_of_work(self.factory) as session:
            rows = session.scalars(select(MailingList).where(MailingList.slug.in_(slugs)))
            found = {ml.slug: ml for ml in rows}
        return [
            Membership(ml.id, ml.slug, dict(ml.names or {}), ml.kind, None)
            for ml in (found[s] for s in slugs if s in found)
        ]

    async def signup_form(
        self,
        request: Request,
        lang: str,
        *,
        status: int = 200,
        problem: str = "",
        email: str = "",
        checked: tuple[str, ...] = (),
    ) -> Response:
        """The signup form with a fresh ticket, in a language, prefilled as given."""
        embed = request.query_params.get("embed") == "1"
        lists = await run_in_threadpool(self.signup_lists)
        response = self.render(
            "subscribe",
            lang,
            status,
            root="",
            action="subscribe?embed=1" if embed else "subscribe",
            form_token=signup.issue_ticket(secret=self.secret, now=self.clock.now()),
            pow_bits=self.settings.web.signup_pow_bits,
            min_seconds=self.settings.web.signup_min_seconds,
            lists=lists,
            checked=checked,
            checked_language=lang,
            email=email,
            problem=problem,
        )
        response.headers.update(self.signup_headers(embed))
        return response

    async def subscribe_page(self, request: Request) -> Response:
        """GET /subscribe: the form, in ?lang= or the browser's language."""
        lang = request.query_params.get("lang", "")
        return await self.signup_form(
            request, lang if lang in LANGUAGES else _accepted_language(request)
        )

    async def subscribe_post(self, request: Request) -> Response:
        """POST /subscribe: every check of signup.py; the same answer whoever the address is."""
        embed = request.query_params.get("embed") == "1"
        sent = request.headers.get("origin")
        if sent and sent != "null" and sent not in self.signup_origins:
            raise HTTPException(403)
        body = await self.read_body(request)
        fields = parse_qs(body.decode("utf-8", "replace"), max_num_fields=20)

        def first(name: str) -> str:
            return (fields.get(name) or [""])[0]

        lang = first("language") if first("language") in LANGUAGES else _accepted_language(request)
        wanted = tuple(s for s in fields.get("lists", []) if s in self._signup_slugs())
        verdict, ticket = signup.judge_form(
            token=first("form_token"),
            answer=first("pow"),
            honeypot=first("website"),
            secret=self.secret,
            web=self.settings.web,
            now=self.clock.now(),
        )
        address = signup.parse_address(first("email"))
        client = request.client.host if request.client else ""
        verdict, wait = await run_in_threadpool(
            self._signup_step, verdict, ticket, client, address, lang, wanted
        )
        shown = first("email")[:320]
        if verdict is signup.Verdict.THROTTLED:
            response = self.render("error", lang, 429, kind="429")
            response.headers.update({"retry-after": str(wait), "cache-control": NO_STORE})
            return response
        if verdict is signup.Verdict.NO_TICKET:
            return await self.signup_form(
                request, lang, problem="continue", email=shown, checked=wanted
            )
        if verdict not in (signup.Verdict.ACCEPTED, signup.Verdict.HONEYPOT):
            return await self.signup_form(
                request, lang, status=400, problem="retry", email=shown, checked=wanted
            )
        if verdict is signup.Verdict.ACCEPTED and address is None:
            return await self.signup_form(
                request, lang, status=400, problem="address", email=shown, checked=wanted
            )
        if verdict is signup.Verdict.ACCEPTED and not wanted:
            return await self.signup_form(
                request, lang, status=400, problem="lists", email=shown, checked=wanted
            )
        self.confirmations_owed.set()
        response = self.render("subscribe_sent", lang, root="")
        response.headers.update(self.signup_headers(embed))
        return response

    def _signup_slugs(self) -> tuple[str, str]:
        return (self.settings.digest.list, self.settings.alerts.list)

    def _signup_step(
        self,
        verdict: signup.Verdict,
        ticket: signup.Ticket | None,
        client: str,
        address: str | None,
        lang: str,
        wanted: tuple[str, ...],
    ) -> tuple[signup.Verdict, int]:
        """One transaction: count the post, use up its ticket, and sign up when all passed.

        Two posts for one new address at once may both insert it: the loser's transaction is
        run again, and then finds the row the winner made.
        """
        for attempt in range(3):
            try:
                return self._signup_once(verdict, ticket, client, address, lang, wanted)
            except IntegrityError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _signup_once(
        self,
        verdict: signup.Verdict,
        ticket: signup.Ticket | None,
        client: str,
        address: str | None,
        lang: str,
        wanted: tuple[str, ...],
    ) -> tuple[signup.Verdict, int]:
        now = self.clock.now()
        with unit_of_work(self.factory) as session:
            wait = signup.count_post(session, client=client, settings=self.settings, now=now)
            if wait:
                return signup.Verdict.THROTTLED, wait
            if ticket is not None and not signup.claim_ticket(session, ticket):
                return signup.Verdict.REUSED, 0
            if verdict is signup.Verdict.ACCEPTED and address is not None and wanted:
                signup.request_signup(
                    session,
                    address=address,
                    language=lang,
                    list_slugs=wanted,
                    settings=self.settings,
                    now=now,
                )
        return verdict, 0

    async def signup_script(self, request: Request) -> Response:
        """The form's proof-of-work solver, served from here (CSP script-src 'self')."""
        return Response(
            SIGNUP_JS,
            media_type="text/javascript; charset=utf-8",
            headers={"cache-control": "public, max-age=3600"},
        )

    # --- the archive -----------------------------------------------------------------------

    def archive_headers(self, cache: str, *, inline_styles: bool = False) -> dict[str, str]:
        """Public caching; a web copy may carry the email's inline styles and its logo."""
        style = "'unsafe-inline'" if inline_styles else f"'sha256-{CSS_HASH}'"
        images = ""
        logo = self.settings.brand.logo_url
        if inline_styles and logo:
            images = f"; img-src {_origin(logo)}"
        csp = (
            f"default-src 'none'; style-src {style}{images}; form-action 'none'; "
            "base-uri 'none'; frame-ancestors 'none'"
        )
        return {"content-security-policy": csp, "cache-control": cache}

    def archive_lang(self, request: Request) -> str:
        lang = request.query_params.get("lang", "")
        return lang if lang in LANGUAGES else _accepted_language(request)

    async def archive_page(self, request: Request) -> Response:
        """GET /archive: the sent campaigns in a language, newest first, paged."""
        if not self.settings.archive.enabled:
            raise HTTPException(404)
        lang = self.archive_lang(request)
        page = _page_number(request.query_params.get("page", "1"))

        def read() -> tuple[list[archive.Entry], bool]:
            with unit_of_work(self.factory) as session:
                return archive.list_entries(session, lang=lang, page=page, settings=self.settings)

        entries, older = await run_in_threadpool(read)
        if page > 1 and not entries:
            raise HTTPException(404)
        response = self.render(
            "archive",
            lang,
            root="",
            entries=[
                {"slug": e.slug, "subject": e.subject, "kind": e.kind, "day": _day(e.sent_at, lang)}
                for e in entries
            ],
            page=page,
            newer=page > 1,
            older=older,
            mirrors=self.settings.web.mirror_urls,
        )
        response.headers.update(self.archive_headers(SHORT_PUBLIC))
        response.headers["vary"] = "accept-language"
        return response

    async def archive_feed(self, request: Request) -> Response:
        """GET /archive/feed.xml: the newest campaigns as an Atom feed, per language."""
        if not self.settings.archive.enabled:
            raise HTTPException(404)
        lang = self.archive_lang(request)

        def read() -> tuple[list[archive.Entry], Any]:
            with unit_of_work(self.factory) as session:
                entries, _ = archive.list_entries(
                    session, lang=lang, page=1, settings=self.settings
                )
                return entries, archive.latest_change(session, settings=self.settings)

        entries, updated = await run_in_threadpool(read)
        brand = self.settings.brand.name
        _ = gettext_for(lang)
        body = archive.atom_feed(
            entries, lang=lang, title=f"{brand}: {_('Past emails')}", author=brand, updated=updated
        )
        headers = self.archive_headers(SHORT_PUBLIC)
        headers["vary"] = "accept-language"
        return Response(body, media_type="application/atom+xml; charset=utf-8", headers=headers)

    async def archive_copy(self, request: Request) -> Response:
        """GET /archive/{slug}/{lang}: a campaign's web copy, with nothing personal in it."""
        slug, lang = request.path_params["slug"], request.path_params["lang"]
        if lang not in LANGUAGES or len(slug) > 120:
            raise HTTPException(404)

        def read() -> tuple[archive.Entry, str, str] | None:
            with unit_of_work(self.factory) as session:
                found = archive.find_copy(session, slug=slug, lang=lang, settings=self.settings)
                return None if found is None else (found[0], found[1].html, found[1].link_nonce)

        found = await run_in_threadpool(read)
        if found is None:
            raise HTTPException(404)
        entry, html, nonce = found
        env = web_environment(lang)
        context = {"root": "../../", "lang": lang, "mirrors": self.settings.web.mirror_urls}
        page = archive.make_web_copy(
            html,
            nonce,
            note_html=env.get_template("web/archive_note.html.j2").render(context),
            banner_html=env.get_template("web/archive_banner.html.j2").render(context),
        )
        cache = IMMUTABLE if entry.finished else SHORT_PUBLIC
        return HTMLResponse(page, headers=self.archive_headers(cache, inline_styles=True))

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


def create_app(
    settings: Settings,
    factory: sessionmaker[Session],
    clock: Clock,
    *,
    send_confirmations: bool = False,
) -> Starlette:
    """The web app: the supporters' and public pages, with strict headers.

    With send_confirmations (`newsletter web`, which runs alone), the app also mails the
    confirmations signups queue, at once and then every [schedule] send_interval_seconds;
    under `newsletter run` the service's sender does it instead.
    """
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
    routes += [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/subscribe", pages.subscribe_page, methods=["GET"]),
        Route("/subscribe", pages.subscribe_post, methods=["POST"]),
        Route("/static/signup.js", pages.signup_script, methods=["GET"]),
        Route("/archive", pages.archive_page, methods=["GET"]),
        Route("/archive/feed.xml", pages.archive_feed, methods=["GET"]),
        Route("/archive/{slug}/{lang}", pages.archive_copy, methods=["GET"]),
    ]
    handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
        TokenError: pages.token_error,
        HTTPException: pages.http_error,
    }
    app = Starlette(routes=routes, exception_handlers=handlers)
    app.add_middleware(SecurityHeaders)
    if send_confirmations:
        app.add_middleware(ConfirmationSender, pages=pages)
    return app


class ConfirmationSender:
    """Starts the confirmation sender with the first request (the listener runs no lifespan)."""

    def __init__(self, app: ASGIApp, pages: Pages) -> None:
        self.app = app
        self.pages = pages
        self.task: asyncio.Task[None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on, starting the sender first if it is not running."""
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(_keep_confirming(self.pages))
        await self.app(scope, receive, send)


async def _keep_confirming(pages: Pages) -> None:
    """Send owed confirmations and forget stale signups; wake early when a signup is queued."""
    from newsletter.notices import send_confirmations
    from newsletter.smtp import open_pool

    settings, interval = pages.settings, pages.settings.schedule.send_interval_seconds
    while True:
        pages.confirmations_owed.clear()
        try:
            async with open_pool(settings, pages.factory, pages.clock) as pool:
                await send_confirmations(
                    factory=pages.factory, settings=settings, transport=pool, clock=pages.clock
                )
            await run_in_threadpool(_purge, pages)
        except Exception:  # a database or SMTP hiccup: the next round tries again
            log.exception("sending confirmations failed; retrying in %ss", interval)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(pages.confirmations_owed.wait(), timeout=interval)


def _purge(pages: Pages) -> None:
    with unit_of_work(pages.factory) as session:
        signup.purge_signups(session, now=pages.clock.now(), settings=pages.settings)


def _page_number(value: str) -> int:
    """A page number from the query; anything else is 404 (a short decimal only)."""
    if not (value.isascii() and value.isdigit() and 0 < len(value) < 6) or int(value) < 1:
        raise HTTPException(404)
    return int(value)


def _day(value: datetime, lang: str) -> str:
    return str(format_date(value, format="long", locale=lang))


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
