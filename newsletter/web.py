"""The supporters' pages: unsubscribe, preferences, confirmation, key activation, a new key (the
plaintext key-problem notice's /new-key/: a key and nothing else, for KEY_UPDATE_MAX_AGE_DAYS)
and an urgent action's "I sent my letter" (/wrote/, counted once per reader, nothing else kept)
behind signed links; a discreet reader's web copy (/w/); and the public pages: the signup form
(signup.py) and the archive of web copies (archive.py), a case's messages with where the case
stands now.

GET never changes state (mail scanners follow links); every change is a POST. The signed token in
the URL is the authority: it names the subscriber and the list and needs no login or cookie, so
a mail client's RFC 8058 one-click POST works as it is. The forms also carry a signed per-form
token bound to the URL's token, and an Origin other than [web] base_url's (never the Host header,
which the client writes; [discreet] base_url's and the mirrors' are ours too) or a cross-site
Sec-Fetch-Site is refused. A forged, altered or expired link gets the same 400 page, which names
no one; a form left open too long is shown again with the choices it carried, to be sent once
more.

The public pages link only relatively (never to [web] base_url), so a mirror serving this same app
serves them whole. Signup and token pages are no-store; a sent campaign's web copy is public and
immutable; only /subscribe?embed=1 may be framed, and only by [web] signup_origins.

Readers at risk: a reader who chose discreet mail gets pages whose <title>, header and footer name
neither the portal nor the organisation (base.html.j2's `discreet`); so does every error page
under a signed link's path, which cannot tell whose link it was. The preferences form also takes
their discreet mode and an OpenPGP public key (readers.py), saved with the rest in one transaction
or, when the key is refused, not at all.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import random
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlsplit

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

from newsletter import archive, cases, readers, signup
from newsletter.clock import Clock
from newsletter.config import LANGUAGES, Settings, WebSettings
from newsletter.db import unit_of_work
from newsletter.db.models import (
    ActionCase,
    CaseStatus,
    DiscreetMode,
    KeyProblemChoice,
    MailingList,
    Subscriber,
    SubscriberStatus,
    Subscription,
    SubscriptionStatus,
)
from newsletter.errors import AudienceError, KeptOutError, TokenError
from newsletter.i18n import N_, TEMPLATES_DIR, gettext_for, web_environment
from newsletter.openpgp import MAX_KEY_BYTES, KeyProblem
from newsletter.readers import KeyView
from newsletter.subscriptions import (
    LinkView,
    Membership,
    confirm_by_link,
    link_view,
    save_preferences,
    unsubscribe_by_link,
)
from newsletter.tokens import (
    PAGE_PATHS,
    KeyClaims,
    TokenClaims,
    make_token,
    page_path,
    read_copy_token,
    read_key_token,
    read_key_update_token,
    read_token,
    read_wrote_token,
)

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
_RANDOM = random.SystemRandom()
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


# The paths of the pages behind signed links: their error pages cannot tell whose link it was, so
# they are discreet for everyone.
TOKEN_PATHS = tuple(PAGE_PATHS.values())


def body_limit(path: str, web: WebSettings) -> int:
    """The largest request body a path takes: [web] max_body_bytes, more for the preferences form.

    The preferences and key update forms carry a pasted public key of up to
    openpgp.MAX_KEY_BYTES, which the browser's percent-encoding can make up to three times larger
    (a byte as %XX).
    """
    if path.startswith((PAGE_PATHS["preferences"], PAGE_PATHS["key_update"])):
        return 3 * MAX_KEY_BYTES + web.max_body_bytes
    return web.max_body_bytes


@dataclass(frozen=True)
class Reading:
    """How a subscriber reads their mail: discreet or not, their keys, what a key problem does."""

    discreet: str = DiscreetMode.OFF.value
    on_key_problem: str = KeyProblemChoice.WITHHOLD.value
    keys: KeyView = field(default_factory=KeyView)

    @property
    def is_discreet(self) -> bool:
        """Whether their pages must not name the portal."""
        return self.discreet != DiscreetMode.OFF


@dataclass(frozen=True)
class Choices:
    """What a preferences form asks to save; None leaves a reading setting as it is."""

    list_ids: set[int]
    language: str
    leave: bool
    discreet: str | None = None
    on_key_problem: str | None = None
    key: bytes = b""
    remove_key: bool = False


@dataclass(frozen=True)
class Wrote:
    """What an "I sent my letter" link finds: which page to show, in which language.

    `page` is "form" (the button), "done" (counted), "left" (forgotten, or off the case's list),
    "neutral" (a discreet reader, who was never to get the link), "gone" (no such case) or
    "closed" (the count is final: nothing more is kept).
    """

    page: str
    lang: str
    discreet: bool = False
    reference: str = ""
    title: str = ""


def read_reading(session: Session, subscriber_id: int) -> Reading:
    """A subscriber's reading settings (the defaults for someone missing or forgotten)."""
    sub = session.get(Subscriber, subscriber_id)
    if sub is None or sub.status == SubscriberStatus.FORGOTTEN:
        return Reading()
    return Reading(sub.discreet, sub.on_key_problem, readers.key_view(session, subscriber_id))


async def read_capped_body(request: Request, limit: int) -> bytes:
    """A request's body, refused with 413 as soon as it passes `limit` bytes.

    Gathered in a bytearray: a body trickled in tiny chunks must not cost a copy of all that came
    before for each one (quadratic, on the event loop every page shares).
    """
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(413)
    return bytes(body)


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
        # Who may post the forms behind signed links: our pages, wherever they are served.
        self.form_origins = {
            self.origin,
            _origin(settings.discreet.links_base(settings.web.base_url)),
            *(_origin(u) for u in settings.web.mirror_urls),
        }
        # Who may post the signup form: our pages, a mirror's, and the portal's.
        self.signup_origins = {
            self.origin,
            *(_origin(u) for u in settings.web.mirror_urls),
            *(_origin(u) for u in settings.web.signup_origins),
        }

    # --- helpers ---------------------------------------------------------------------------

    def render(
        self, name: str, lang: str, status: int = 200, *, discreet: bool = False, **context: Any
    ) -> HTMLResponse:
        """A page from templates/web in a language; a discreet one names neither us nor the list."""
        page = web_environment(lang).get_template(f"web/{name}.html.j2")
        body = page.render(
            lang=lang,
            css=CSS,
            brand=self.settings.brand,
            languages=AUTONYMS,
            discreet=discreet,
            neutral_name=self.settings.discreet.from_name,
            **context,
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
    ) -> tuple[LinkView, Reading]:
        """Run one subscriptions step for the link's subscriber and list, and read how they read
        their mail: one transaction, in a worker thread."""

        def run() -> tuple[LinkView, Reading]:
            with unit_of_work(self.factory) as session:
                person = action(
                    session, subscriber_id=claims.subscriber_id, list_id=claims.list_id, **kw
                )
                return person, read_reading(session, claims.subscriber_id)

        return await run_in_threadpool(run)

    def form_token(self, url_token: str) -> str:
        """A signed token for a form, bound to the link it was served under, dated by the clock."""
        return str(self.forms.dumps([_digest(url_token), int(self.clock.now().timestamp())]))

    def check_form(self, request: Request, fields: dict[str, list[str]]) -> bool:
        """Refuse a cross-site post, or one without this page's form token; True if it expired."""
        if _cross_site(request, self.form_origins, strict=True):
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
        """The request body, refused past the path's limit (body_limit)."""
        return await read_capped_body(request, body_limit(request.url.path, self.settings.web))

    # --- unsubscribe -----------------------------------------------------------------------

    async def unsubscribe_page(self, request: Request) -> Response:
        """What you are leaving, one button, and a link to preferences (none for a reader who has
        or had a key, or has discreet mail: this link is the one that travels in the clear)."""
        claims = self.claims(request, "unsubscribe")
        person, reading = await self.step(link_view, claims, allow_gone=True)
        # Someone forgotten may have chosen discreet mail: their page names no one either.
        discreet = reading.is_discreet or person.gone
        if person.gone:
            return self.render(
                "unsubscribed", person.language, discreet=discreet, list_name=person.list_name
            )
        # The unsubscribe link travels in the clear (List-Unsubscribe, even on encrypted mail):
        # for a reader with discreet mail or any key (a removed or revoked one too: their older
        # encrypted mail still carries this link) it must not open the page that turns those off.
        guarded = reading.is_discreet or _has_had_key(reading.keys)
        return self.render(
            "unsubscribe",
            person.language,
            discreet=discreet,
            list_name=person.list_name,
            subscribed=person.subscribed_to(claims.list_id),
            preferences_url="" if guarded else self.preferences_url(person, claims.list_id),
        )

    async def unsubscribe_post(self, request: Request) -> Response:
        """Unsubscribe at once: the page's button and a mail client's one-click alike."""
        if _cross_site(request, self.form_origins, strict=False):
            raise HTTPException(403)
        claims = self.claims(request, "unsubscribe")
        await self.read_body(request)  # List-Unsubscribe=One-Click or the button: either will do
        person, reading = await self.step(unsubscribe_by_link, claims, now=self.clock.now())
        return self.render(
            "unsubscribed",
            person.language,
            discreet=reading.is_discreet or person.gone,
            list_name=person.list_name,
        )

    # --- preferences -----------------------------------------------------------------------

    async def preferences_page(self, request: Request) -> Response:
        """The lists, language, discreet mail and key a subscriber can choose, saved with a POST."""
        claims = self.claims(request, "preferences")
        person, reading = await self.step(link_view, claims)
        marked = Choices(
            list_ids={m.list_id for m in person.active},
            language=person.language,
            leave=False,
            discreet=reading.discreet,
            on_key_problem=reading.on_key_problem,
        )
        saved = request.query_params.get("saved") == "1"
        return self.preferences_form(request, person, reading, marked, saved=saved)

    def preferences_form(
        self,
        request: Request,
        person: LinkView,
        reading: Reading,
        marked: Choices,
        *,
        saved: bool = False,
        expired: bool = False,
        bounced: bool = False,
        key_problem: str = "",
    ) -> Response:
        """The preferences form with these choices marked (a pasted key is never shown again)."""
        keys = reading.keys
        expires = keys.active_expires_at
        return self.render(
            "preferences",
            person.language,
            status=409 if bounced else 200,
            discreet=reading.is_discreet,
            person=person,
            checked=marked.list_ids,
            checked_language=marked.language,
            checked_discreet=marked.discreet or reading.discreet,
            # Offered once a neutral host is set, and always to someone discreet already.
            discreet_offered=self.settings.discreet.configured or reading.is_discreet,
            checked_key_problem=marked.on_key_problem or reading.on_key_problem,
            keys=keys,
            active_fpr=_spaced(keys.active_fingerprint),
            active_expires=_day(expires, person.language) if expires else "",
            pending_fpr=_spaced(keys.pending_fingerprint),
            revoked_fpr=_spaced(keys.revoked_fingerprint),
            form_token=self.form_token(request.path_params["token"]),
            saved=saved,
            expired=expired,
            bounced=bounced,
            key_problem=key_problem,
            key_again=bool(marked.key.strip()) and not key_problem,
        )

    async def preferences_post(self, request: Request) -> Response:
        """Save every choice of the form in one transaction, then show it again (post/redirect/get).

        A refused key refuses the whole form: nothing is saved, and the page says why.
        """
        claims = self.claims(request, "preferences")
        raw = _form_bytes(await self.read_body(request))
        fields = {name: [v.decode("utf-8", "replace") for v in vs] for name, vs in raw.items()}
        expired = self.check_form(request, fields)
        if wrong := _preferences_problem(raw):
            return self.form_refused(request, wrong)
        marked = _choices(fields, key=(raw.get("key") or [b""])[0])
        if expired:  # nothing saved: the same choices again, under a fresh form token
            person, reading = await self.step(link_view, claims)
            return self.preferences_form(request, person, reading, marked, expired=True)
        try:
            await run_in_threadpool(self._save, claims, marked)
        except KeptOutError:  # nothing saved: say why, with their choices still marked
            person, reading = await self.step(link_view, claims)
            return self.preferences_form(request, person, reading, marked, bounced=True)
        except KeyProblem as problem:  # nothing saved: the reason, next to the key field
            person, reading = await self.step(link_view, claims)
            reason = _key_reason(problem, person.language)
            return self.preferences_form(request, person, reading, marked, key_problem=reason)
        except AudienceError:  # gone meanwhile (forgotten): nothing to save, no one to name
            raise HTTPException(400) from None
        return RedirectResponse(f"{request.url.path}?saved=1", status_code=303)

    def _save(self, claims: TokenClaims, chosen: Choices) -> None:
        """One transaction: lists and language, then discreet mail and the key (or leave all)."""
        now, sid = self.clock.now(), claims.subscriber_id
        key = "" if chosen.leave else _pasted_key(chosen.key)
        with unit_of_work(self.factory) as session:
            save_preferences(
                session,
                subscriber_id=sid,
                list_ids=set() if chosen.leave else chosen.list_ids,
                language=chosen.language,
                leave=chosen.leave,
                now=now,
            )
            if chosen.leave:  # leaving needs no valid key, nor a change of envelope
                return
            readers.set_reading(
                session,
                subscriber_id=sid,
                discreet=chosen.discreet,
                on_key_problem=chosen.on_key_problem,
                now=now,
                actor="web",
            )
            if chosen.remove_key:
                readers.remove_key(session, subscriber_id=sid, now=now, actor="web", by_reader=True)
            if key:
                readers.set_key(session, subscriber_id=sid, data=key, now=now, actor="web")

    def form_refused(self, request: Request, problem: str) -> Response:
        """400 for a form no page of ours sends, saying in one line what was wrong with it
        (discreet, as every page under a signed link's path: it cannot tell whose link it is)."""
        lang = _accepted_language(request)
        reason = gettext_for(lang)(problem)
        return self.render("error", lang, 400, discreet=True, kind="form", problem=reason)

    # --- confirmation ----------------------------------------------------------------------

    async def confirm_page(self, request: Request) -> Response:
        """Ask for the click that confirms; a mail scanner fetching the link confirms nothing."""
        claims = self.claims(request, "confirm")
        person, reading = await self.step(link_view, claims)
        return self.confirm_form(request, person, reading)

    def confirm_form(
        self, request: Request, person: LinkView, reading: Reading, *, expired: bool = False
    ) -> Response:
        """The page with the one button that confirms the waiting lists."""
        return self.render(
            "confirm",
            person.language,
            discreet=reading.is_discreet,
            waiting=person.waiting,
            form_token=self.form_token(request.path_params["token"]),
            expired=expired,
        )

    async def confirm_post(self, request: Request) -> Response:
        """Confirm every list waiting for this subscriber and say so."""
        claims = self.claims(request, "confirm")
        fields = parse_qs((await self.read_body(request)).decode("utf-8", "replace"))
        if self.check_form(request, fields):  # left open too long: ask for the click again
            person, reading = await self.step(link_view, claims)
            return self.confirm_form(request, person, reading, expired=True)
        person, reading = await self.step(
            confirm_by_link, claims, secret=self.secret, now=self.clock.now()
        )
        return self.render(
            "confirmed", person.language, discreet=reading.is_discreet, active=person.active
        )

    # --- key activation --------------------------------------------------------------------

    def key_claims(self, request: Request) -> KeyClaims:
        """Verify a /key/ link: signed, and no older than a confirmation link may be."""
        return read_key_token(
            request.path_params["token"],
            secret=self.secret,
            max_age_seconds=self.settings.web.confirm_link_max_age_hours * 3600,
            now=self.clock.now(),
        )

    def _key_state(self, claims: KeyClaims) -> tuple[str, Reading]:
        """The reader's language and reading; a link to a key neither pending nor active is
        stale."""
        with unit_of_work(self.factory) as session:
            sub = session.get(Subscriber, claims.subscriber_id)
            reading = read_reading(session, claims.subscriber_id)
            if sub is None or sub.status == SubscriberStatus.FORGOTTEN:
                raise TokenError("this link is not valid")
            known = (reading.keys.pending_fingerprint, reading.keys.active_fingerprint)
            if claims.fingerprint not in known:
                raise TokenError("this link is not valid")
            lang = sub.language if sub.language in LANGUAGES else "en"
            return lang, reading

    async def key_page(self, request: Request) -> Response:
        """GET /key/TOKEN: one button that activates the key; the GET itself changes nothing."""
        claims = self.key_claims(request)
        lang, reading = await run_in_threadpool(self._key_state, claims)
        if reading.keys.pending_fingerprint != claims.fingerprint:  # active already
            return self.key_done(lang, reading, claims)
        return self.key_form(request, lang, reading, claims)

    def key_form(
        self,
        request: Request,
        lang: str,
        reading: Reading,
        claims: KeyClaims,
        *,
        expired: bool = False,
    ) -> Response:
        """The page with the one button that activates the key the link names."""
        return self.render(
            "key",
            lang,
            discreet=reading.is_discreet,
            fpr=_spaced(claims.fingerprint),
            form_token=self.form_token(request.path_params["token"]),
            expired=expired,
        )

    def key_done(self, lang: str, reading: Reading, claims: KeyClaims) -> Response:
        """Encrypted mail is on."""
        return self.render(
            "key_done", lang, discreet=reading.is_discreet, fpr=_spaced(claims.fingerprint)
        )

    async def key_post(self, request: Request) -> Response:
        """POST /key/TOKEN: the pending key becomes the one their mail is encrypted to."""
        claims = self.key_claims(request)
        fields = parse_qs((await self.read_body(request)).decode("utf-8", "replace"))
        if self.check_form(request, fields):  # left open too long: ask for the click again
            lang, reading = await run_in_threadpool(self._key_state, claims)
            return self.key_form(request, lang, reading, claims, expired=True)

        def confirm() -> tuple[str, Reading]:
            with unit_of_work(self.factory) as session:
                readers.confirm_key(
                    session,
                    subscriber_id=claims.subscriber_id,
                    fingerprint=claims.fingerprint,
                    now=self.clock.now(),
                )
            return self._key_state(claims)

        try:
            lang, reading = await run_in_threadpool(confirm)
        except AudienceError:  # the reader is gone: the link is as good as forged
            raise TokenError("this link is not valid") from None
        return self.key_done(lang, reading, claims)

    # --- a new key, from the plaintext key-problem notice -------------------------------------

    def key_update_claims(self, request: Request) -> KeyClaims:
        """Verify a /new-key/ link: signed for this page only, and not older than it may be."""
        return read_key_update_token(
            request.path_params["token"], secret=self.secret, now=self.clock.now()
        )

    def _key_update_state(self, claims: KeyClaims) -> tuple[str, Reading]:
        """The reader's language and reading; the link is stale once another key is active."""
        with unit_of_work(self.factory) as session:
            sub = session.get(Subscriber, claims.subscriber_id)
            reading = read_reading(session, claims.subscriber_id)
            if sub is None or sub.status == SubscriberStatus.FORGOTTEN:
                raise TokenError("this link is not valid")
            active = reading.keys.active_fingerprint
            if active and active != claims.fingerprint:  # a new key works: the notice is done
                raise TokenError("this link is not valid")
            lang = sub.language if sub.language in LANGUAGES else "en"
            return lang, reading

    async def key_update_page(self, request: Request) -> Response:
        """GET /new-key/TOKEN: a form that takes a new key and nothing else; the GET changes
        nothing."""
        claims = self.key_update_claims(request)
        lang, reading = await run_in_threadpool(self._key_update_state, claims)
        # What the last post did, said only while it is still so.
        keys = reading.keys
        holds = {"sent": bool(keys.pending_fingerprint), "renewed": bool(keys.active_fingerprint)}
        done = request.query_params.get("done", "")
        return self.key_update_form(request, lang, reading, done=done if holds.get(done) else "")

    def key_update_form(
        self,
        request: Request,
        lang: str,
        reading: Reading,
        *,
        done: str = "",
        expired: bool = False,
        key_problem: str = "",
    ) -> Response:
        """The page with one field, the new key (no fingerprint, address or list is shown);
        `done` says what the last post did: "sent" (a proof is on its way) or "renewed"."""
        return self.render(
            "key_update",
            lang,
            discreet=reading.is_discreet,
            form_token=self.form_token(request.path_params["token"]),
            done=done,
            expired=expired,
            key_problem=key_problem,
        )

    async def key_update_post(self, request: Request) -> Response:
        """POST /new-key/TOKEN: keep the pasted key pending its proof, as the preferences page
        does; every other field is ignored (this link travels in the clear)."""
        claims = self.key_update_claims(request)
        raw = _form_bytes(await self.read_body(request))
        fields = {name: [v.decode("utf-8", "replace") for v in vs] for name, vs in raw.items()}
        expired = self.check_form(request, fields)
        lang, reading = await run_in_threadpool(self._key_update_state, claims)
        if expired:  # nothing saved: the form again, under a fresh form token
            return self.key_update_form(request, lang, reading, expired=True)
        try:
            done = await run_in_threadpool(self._save_new_key, claims, (raw.get("key") or [b""])[0])
        except KeyProblem as problem:  # nothing saved: the reason, next to the key field
            reason = _key_reason(problem, lang)
            return self.key_update_form(request, lang, reading, key_problem=reason)
        except AudienceError:  # gone meanwhile (forgotten): no one to name
            raise TokenError("this link is not valid") from None
        return RedirectResponse(f"{request.url.path}?done={done}", status_code=303)

    def _save_new_key(self, claims: KeyClaims, data: bytes) -> str:
        """One transaction: the key, pending until proven (readers.set_key, as the preferences
        page keeps it); a revocation is not learnt here (this page only takes a new key).
        "sent" when a proof is owed, "renewed" when it was their active key, newer."""
        key = _pasted_key(data)
        with unit_of_work(self.factory) as session:
            info = readers.set_key(
                session,
                subscriber_id=claims.subscriber_id,
                data=key,
                now=self.clock.now(),
                actor="web",
            )
            if info.revoked:  # raised: the transaction is rolled back, nothing is marked
                raise KeyProblem.of(N_("this key cannot be used any more: give a new one"))
            pending = readers.key_view(session, claims.subscriber_id).pending_fingerprint
            return "sent" if pending == info.fingerprint else "renewed"

    # --- "I sent my letter" ----------------------------------------------------------------

    def _wrote(self, token: str, *, fallback_lang: str, record: bool) -> Wrote:
        """Read (and with `record`, count) a reader's "I sent my letter", in one transaction.

        Nothing is counted for someone forgotten or no longer on the case's list, nor for a
        discreet reader (never sent the link: nothing is to be known about them), nor for a case
        that is gone; and nothing but the (case, reader) pair is ever kept: no time, no address.
        """
        subscriber_id, case_id = read_wrote_token(token, secret=self.secret)
        with unit_of_work(self.factory) as session:
            sub = session.get(Subscriber, subscriber_id)
            if sub is None or sub.status == SubscriberStatus.FORGOTTEN:
                # Who it was is unknowable now, and so is whether they chose discreet pages.
                return Wrote("left", fallback_lang, discreet=True)
            lang = sub.language if sub.language in LANGUAGES else "en"
            if sub.discreet != DiscreetMode.OFF:
                return Wrote("neutral", lang, discreet=True)
            case = session.get(ActionCase, case_id)
            if case is None or case.status == CaseStatus.DRAFT:
                return Wrote("gone", lang)
            if case.status == CaseStatus.CLOSED:  # the count is final: nothing more is kept
                return Wrote("closed", lang)
            on_list = session.scalar(
                select(Subscription.status).where(
                    Subscription.subscriber_id == sub.id, Subscription.list_id == case.list_id
                )
            )
            if sub.status == SubscriberStatus.UNSUBSCRIBED or on_list != SubscriptionStatus.ACTIVE:
                return Wrote("left", lang)
            # Neither page tells whether or how many have written: a live count, posted again
            # and again, would time each reader's click, and whoever holds a reader's link (a
            # seized phone's mail) would learn that they wrote. The count shows once closed.
            if record:
                cases.record_wrote(session, case_id=case.id, subscriber_id=sub.id)
                return Wrote("done", lang, reference=case.reference, title=case.title)
            return Wrote("form", lang, reference=case.reference, title=case.title)

    def wrote_answer(self, request: Request, found: Wrote, *, expired: bool = False) -> Response:
        """The page for what the link found: the button, the thanks, or why nothing counts."""
        if found.page == "form":
            return self.render(
                "wrote",
                found.lang,
                reference=found.reference,
                title=found.title,
                expired=expired,
                form_token=self.form_token(request.path_params["token"]),
            )
        if found.page == "done":
            return self.render(
                "wrote_done",
                found.lang,
                reference=found.reference,
                title=found.title,
            )
        status = 404 if found.page == "gone" else 200
        return self.render(
            "wrote_not_counted", found.lang, status, discreet=found.discreet, why=found.page
        )

    async def wrote_page(self, request: Request) -> Response:
        """GET /wrote/TOKEN: the case and one button; the GET itself records nothing."""
        found = await run_in_threadpool(
            self._wrote,
            request.path_params["token"],
            fallback_lang=_accepted_language(request),
            record=False,
        )
        return self.wrote_answer(request, found)

    async def wrote_post(self, request: Request) -> Response:
        """POST /wrote/TOKEN: count the reader's letter once, and thank them."""
        token = request.path_params["token"]
        read_wrote_token(token, secret=self.secret)  # a forged link: the links' 400, first
        fields = parse_qs((await self.read_body(request)).decode("utf-8", "replace"))
        lang = _accepted_language(request)
        if self.check_form(request, fields):  # left open too long: ask for the click again
            found = await run_in_threadpool(self._wrote, token, fallback_lang=lang, record=False)
            return self.wrote_answer(request, found, expired=True)
        found = await run_in_threadpool(self._wrote, token, fallback_lang=lang, record=True)
        return self.wrote_answer(request, found)

    # --- a discreet reader's web copy ------------------------------------------------------

    async def discreet_copy(self, request: Request) -> Response:
        """GET /w/TOKEN: a launched campaign's web copy that names no one, with a neutral title.

        Public or not, archive on or off: the signed link (the same for every reader) is the
        authority. A forged link, a draft or a cancelled campaign is 404.
        """
        try:
            campaign_id, lang = read_copy_token(request.path_params["token"], secret=self.secret)
        except TokenError:
            raise HTTPException(404) from None
        if lang not in LANGUAGES:
            raise HTTPException(404)
        default = self.settings.render.default_language

        def read() -> tuple[archive.Entry, str, str, str] | None:
            with unit_of_work(self.factory) as session:
                found = archive.find_campaign_copy(
                    session, campaign_id=campaign_id, lang=lang, default_lang=default
                )
                if found is None:
                    return None
                entry, variant = found
                return entry, variant.lang, variant.html, variant.link_nonce

        found = await run_in_threadpool(read)
        if found is None:
            raise HTTPException(404)
        entry, shown_lang, html, nonce = found
        env = web_environment(shown_lang)
        page = archive.make_discreet_copy(
            html,
            nonce,
            note_html=env.get_template("web/copy_note.html.j2").render(lang=shown_lang),
            title=self.settings.discreet.subject(shown_lang),
        )
        cache = IMMUTABLE if entry.finished else SHORT_PUBLIC
        # Unlike the archive's copies, no image either: a logo fetched from the portal's host
        # would tell anyone watching the reader's connection where they read.
        headers = self.archive_headers(cache, inline_styles=True, images=False)
        headers["x-robots-tag"] = "noindex, nofollow"
        return HTMLResponse(page, headers=headers)

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
        discreet: bool = False,
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
            checked_discreet=discreet,
            discreet_offered=self.settings.discreet.configured,
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
        try:
            fields = parse_qs(body.decode("utf-8", "replace"), max_num_fields=20)
        except ValueError:  # more fields than the form has: a bot's post, not a server error
            raise HTTPException(400) from None
        # Our pages send no Referrer, so our own posts carry Origin null, as do another site's
        # no-referrer page's: Sec-Fetch-Site tells them apart. A post with a ticket comes from
        # our form (the embedded one included: our page in their frame posts same-origin); one
        # from elsewhere would sign up whoever its page named. The portal's plain form carries
        # no ticket and only opens our form, filled in.
        site = request.headers.get("sec-fetch-site")
        if site is not None and site != "same-origin" and fields.get("form_token"):
            return self.render("error", _accepted_language(request), 403, kind="403-signup")

        def first(name: str) -> str:
            return (fields.get(name) or [""])[0]

        lang = first("language") if first("language") in LANGUAGES else _accepted_language(request)
        wanted = tuple(s for s in fields.get("lists", []) if s in self._signup_slugs())
        # Asked for at signup, the confirmation itself comes discreet; any other value: not.
        discreet = first("discreet") == "envelope" and self.settings.discreet.configured
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
            self._signup_step, verdict, ticket, client, address, lang, wanted, discreet
        )
        shown = first("email")[:320]
        if verdict is signup.Verdict.THROTTLED:
            response = self.render("error", lang, 429, kind="429")
            response.headers.update({"retry-after": str(wait), "cache-control": NO_STORE})
            return response

        def again(problem: str, status: int = 400) -> Awaitable[Response]:
            """The form once more, as it was filled in, with what to do."""
            return self.signup_form(
                request,
                lang,
                status=status,
                problem=problem,
                email=shown,
                checked=wanted,
                discreet=discreet,
            )

        if verdict is signup.Verdict.NO_TICKET:
            return await again("continue", 200)
        if verdict not in (signup.Verdict.ACCEPTED, signup.Verdict.HONEYPOT):
            return await again("retry")
        if verdict is signup.Verdict.ACCEPTED and address is None:
            return await again("address")
        if verdict is signup.Verdict.ACCEPTED and not wanted:
            return await again("lists")
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
        discreet: bool,
    ) -> tuple[signup.Verdict, int]:
        """One transaction: use up the post's ticket and, when all passed, count it against the
        client's limit and sign up.

        Two posts for one new address at once may both insert it: the loser's transaction is
        run again, and then finds the row the winner made.
        """
        for attempt in range(3):
            try:
                return self._signup_once(verdict, ticket, client, address, lang, wanted, discreet)
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
        discreet: bool,
    ) -> tuple[signup.Verdict, int]:
        now = self.clock.now()
        if ticket is None:  # no ticket, a forged one or the honeypot: refused with no database
            return verdict, 0
        with unit_of_work(self.factory) as session:
            wait = signup.client_wait(session, client=client, settings=self.settings, now=now)
            if wait:
                return signup.Verdict.THROTTLED, wait
            if not signup.claim_ticket(session, ticket):
                return signup.Verdict.REUSED, 0
            if verdict is signup.Verdict.ACCEPTED and address is not None and wanted:
                signup.count_signup(session, client=client, settings=self.settings, now=now)
                signup.request_signup(
                    session,
                    address=address,
                    language=lang,
                    list_slugs=wanted,
                    settings=self.settings,
                    now=now,
                    discreet=discreet,
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

    def archive_headers(
        self, cache: str, *, inline_styles: bool = False, images: bool = True
    ) -> dict[str, str]:
        """Public caching; a web copy may carry the email's inline styles and (images) its logo."""
        style = "'unsafe-inline'" if inline_styles else f"'sha256-{CSS_HASH}'"
        image_src = ""
        logo = self.settings.brand.logo_url
        if inline_styles and logo and images:
            image_src = f"; img-src {_origin(logo)}"
        csp = (
            f"default-src 'none'; style-src {style}{image_src}; form-action 'none'; "
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
        """GET /archive/{slug}/{lang}: a campaign's web copy, with nothing personal in it.

        A case's message is its public copy (archive.find_web_copy), under a box saying where the
        case stands now: that changes with the case, so it is never cached long.
        """
        slug, lang = request.path_params["slug"], request.path_params["lang"]
        if lang not in LANGUAGES or len(slug) > 120:
            raise HTTPException(404)

        def read() -> archive.WebCopy | None:
            with unit_of_work(self.factory) as session:
                return archive.find_web_copy(session, slug=slug, lang=lang, settings=self.settings)

        found = await run_in_threadpool(read)
        if found is None:
            raise HTTPException(404)
        env = web_environment(lang)
        context: dict[str, Any] = {
            "root": "../../",
            "lang": lang,
            "mirrors": self.settings.web.mirror_urls,
        }
        banner = env.get_template("web/archive_banner.html.j2").render(context)
        if found.case is not None:
            banner += self.case_box(found.case, context)
        page = archive.make_web_copy(
            found.html,
            found.nonce,
            note_html=env.get_template("web/archive_note.html.j2").render(context),
            banner_html=banner,
        )
        cache = IMMUTABLE if found.entry.finished and found.case is None else SHORT_PUBLIC
        return HTMLResponse(page, headers=self.archive_headers(cache, inline_styles=True))

    def case_box(self, state: archive.CaseState, context: dict[str, Any]) -> str:
        """Where a case stands now, for the top of its messages' web copies."""
        lang = str(context["lang"])
        deadline = format_date(state.deadline, format="long", locale=lang) if state.deadline else ""
        return (
            web_environment(lang)
            .get_template("web/archive_case.html.j2")
            .render(context, case=state, deadline=deadline)
        )

    # --- errors ----------------------------------------------------------------------------

    async def token_error(self, request: Request, exc: Exception) -> Response:
        """One page for every bad link, whatever was wrong with it (naming no one, nor us)."""
        return self.render("error", _accepted_language(request), 400, discreet=True, kind="link")

    async def http_error(self, request: Request, exc: Exception) -> Response:
        """Plain pages for 4xx answers (not found, refused, too large); discreet under a signed
        link's path, where the page cannot tell whose link it was."""
        code = exc.status_code if isinstance(exc, HTTPException) else 500
        discreet = request.url.path.startswith(TOKEN_PATHS)
        return self.render(
            "error", _accepted_language(request), code, discreet=discreet, kind=str(code)
        )


async def healthz(request: Request) -> Response:
    """A liveness answer for load balancers and tests."""
    return PlainTextResponse("ok")


def create_app(
    settings: Settings,
    factory: sessionmaker[Session],
    clock: Clock,
    *,
    send_confirmations: bool = False,
    confirm_delay: tuple[float, float] = signup.CONFIRM_DELAY_SECONDS,
) -> Starlette:
    """The web app: the supporters' and public pages, with strict headers.

    With send_confirmations (`newsletter web`, which runs alone), the app also mails the
    confirmations signups queue, in rounds a random `confirm_delay` (seconds, least and most)
    apart; under `newsletter run` the service's sender does it instead.
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
            ("key", "GET", pages.key_page),
            ("key", "POST", pages.key_post),
            ("key_update", "GET", pages.key_update_page),
            ("key_update", "POST", pages.key_update_post),
            ("copy", "GET", pages.discreet_copy),
            ("wrote", "GET", pages.wrote_page),
            ("wrote", "POST", pages.wrote_post),
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
    # Starlette's slash redirect writes an absolute Location from the Host header, which the
    # client writes: /u/TOKEN/ would send a reader's token to any host. A stray slash is a 404.
    app.router.redirect_slashes = False
    app.add_middleware(SecurityHeaders)
    if send_confirmations:
        app.add_middleware(ConfirmationSender, pages=pages, delay=confirm_delay)
    return app


class ConfirmationSender:
    """Starts the confirmation sender with the first request (the listener runs no lifespan)."""

    def __init__(self, app: ASGIApp, pages: Pages, delay: tuple[float, float]) -> None:
        self.app = app
        self.pages = pages
        self.delay = delay
        self.task: asyncio.Task[None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on, starting the sender first if it is not running."""
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(_keep_confirming(self.pages, self.delay))
        await self.app(scope, receive, send)


async def _keep_confirming(pages: Pages, delay: tuple[float, float]) -> None:
    """Send owed confirmations and forget stale signups, in rounds a random delay apart.

    A post never wakes the sender: mail leaving (or the work of preparing it) right after a post
    would tell whoever posted that the address was owed a confirmation, i.e. not subscribed. What
    is owed stays in the database (confirm_sent_at unset) until a round sends it, so a stop
    between the post and the round loses nothing: the next process sends it.
    """
    from newsletter.notices import send_confirmations
    from newsletter.smtp import open_pool

    settings = pages.settings
    while True:
        # Random, not periodic: a fixed period would let a poster time a post just before a
        # round and watch that round. SystemRandom: nothing outside may predict the next round.
        await asyncio.sleep(_RANDOM.uniform(*delay))
        try:
            async with open_pool(settings, pages.factory, pages.clock) as pool:
                await send_confirmations(
                    factory=pages.factory, settings=settings, transport=pool, clock=pages.clock
                )
            await run_in_threadpool(_purge, pages)
        except Exception:  # a database or SMTP hiccup: the next round tries again
            log.exception("sending confirmations failed; the next round tries again")


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


def _cross_site(request: Request, origins: Collection[str], *, strict: bool) -> bool:
    """Whether a post comes from another site (by Origin, and when strict, Sec-Fetch-Site).

    `origins` are those of [web] base_url, [discreet] base_url and [web] mirror_urls, exactly: the
    Host header is the client's to write, so a forged Host with a matching Origin proves nothing.
    Under Referrer-Policy no-referrer browsers send `Origin: null` for our own forms, so null
    passes; the form token is what proves the post came from our page.
    """
    sent = request.headers.get("origin")
    if sent and sent != "null" and sent not in origins:
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


def _form_bytes(body: bytes) -> dict[str, list[bytes]]:
    """A urlencoded form's fields as bytes, so a value that is not UTF-8 reaches its checker as
    it was sent (latin-1 maps each byte to one character and back)."""
    fields: dict[str, list[bytes]] = {}
    try:
        pairs = parse_qsl(body.decode("latin-1"), encoding="latin-1", max_num_fields=100)
    except ValueError:  # more fields than any of our forms has
        raise HTTPException(400) from None
    for name, value in pairs:
        fields.setdefault(name, []).append(value.encode("latin-1"))
    return fields


# What a preferences post may carry besides the key, and what each field may say.
_DISCREET_WORDS = frozenset(m.value for m in DiscreetMode)
_KEY_PROBLEM_WORDS = frozenset(c.value for c in KeyProblemChoice)


def _preferences_problem(raw: dict[str, list[bytes]]) -> str | None:
    """What is wrong with a preferences post our page would never send (untranslated), or None.

    The pasted key is not looked at here: its own checks say what is wrong with it.
    """
    text: dict[str, list[str]] = {}
    for name, values in raw.items():
        if name == "key":
            continue
        try:
            text[name] = [v.decode("utf-8") for v in values]
        except UnicodeDecodeError:
            return N_("Something sent with the form is not text.")
    if not all(v in LANGUAGES for v in text.get("language", [""])):
        return N_("The language sent is not one this page offers.")
    try:  # a number no list has is left out when saving; one past int()'s digit cap is not one
        if not all(v.isascii() and v.isdigit() and int(v) >= 0 for v in text.get("lists", [])):
            return N_("The lists sent are not ones this page offers.")
    except ValueError:
        return N_("The lists sent are not ones this page offers.")
    if not all(v.strip().lower() in _DISCREET_WORDS | {""} for v in text.get("discreet", [])):
        return N_("The choice of discreet emails sent is not one this page offers.")
    words = _KEY_PROBLEM_WORDS | {""}
    if not all(v.strip().lower() in words for v in text.get("on_key_problem", [])):
        return N_("The choice for a key that cannot be used is not one this page offers.")
    return None


def _choices(fields: dict[str, list[str]], *, key: bytes) -> Choices:
    """What a preferences form asks for (_preferences_problem has checked its fields)."""
    list_ids = {int(v) for v in fields.get("lists", [])}

    def first(name: str) -> str | None:
        values = fields.get(name)
        return values[0] if values else None

    return Choices(
        list_ids=list_ids,
        language=first("language") or "",
        leave=first("action") == "leave",
        discreet=first("discreet"),
        on_key_problem=first("on_key_problem"),
        key=key,
        remove_key=first("remove_key") == "1",
    )


def _pasted_key(data: bytes) -> str:
    """A pasted key as text, without the blank lines and spaces around it; KeyProblem if it is
    not UTF-8 (an armored key is ASCII, so this is garbage or a binary key)."""
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError:
        problem = KeyProblem.of(
            N_("this is not text: paste the armored key, from its -----BEGIN PGP line on")
        )
        problem.code = "not_text"
        raise problem from None


def _key_reason(problem: KeyProblem, lang: str) -> str:
    """A refused key's one-line reason, in the page's language when it was written for that."""
    if problem.template:
        return gettext_for(lang)(problem.template) % dict(problem.params)
    return str(problem)


def _spaced(fingerprint: str) -> str:
    """A fingerprint in groups of four, as people read it out and as a phone can wrap it."""
    return " ".join(fingerprint[i : i + 4] for i in range(0, len(fingerprint), 4))


def _has_had_key(keys: KeyView) -> bool:
    """Whether a reader has a key row of any kind: active, pending, removed or revoked."""
    return bool(
        keys.active_fingerprint
        or keys.pending_fingerprint
        or keys.removed
        or keys.revoked_fingerprint
    )


def _digest(url_token: str) -> str:
    return hashlib.sha256(url_token.encode()).hexdigest()[:32]


def _accepted_language(request: Request) -> str:
    """The first of en/be/ru the browser accepts, for pages that know no subscriber."""
    for part in request.headers.get("accept-language", "").split(","):
        tag = part.split(";")[0].strip().lower()[:2]
        if tag in LANGUAGES:
            return tag
    return "en"
