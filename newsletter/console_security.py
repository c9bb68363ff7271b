"""The console's request guards: strict headers, cookies, and the checks every POST passes.

A state-changing request must come from the console's own pages: its Origin, when the browser
names one, must be [console] base_url's origin (never the Host header, which the client writes),
its Sec-Fetch-Site, when sent, same-origin, and its `csrf` field must equal the session's form
token (or, before sign-in, a signed token bound to a pre-session cookie). Anything else is a 403
that changes nothing. A query string with a control character is a 400 (PlainQueries).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from urllib.parse import unquote, urlsplit

from itsdangerous import BadSignature, URLSafeSerializer
from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from newsletter.sanitize import drop_controls

PRE_FORM_MAX_AGE = 3600  # a sign-in or enrolment form left open longer is shown again
CONSOLE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "frame-src 'self'; connect-src 'self'; form-action 'self'; base-uri 'none'; "
    "frame-ancestors 'none'"
)
# The preview frame holds an email: its own inline styles, remote images, no script at all.
PREVIEW_CSP = (
    "sandbox; frame-ancestors 'self'; default-src 'none'; img-src https: data:; "
    "style-src 'unsafe-inline'"
)
CONSOLE_HEADERS = {
    "content-security-policy": CONSOLE_CSP,
    "referrer-policy": "no-referrer",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
    "permissions-policy": "interest-cohort=(), camera=(), microphone=(), geolocation=()",
    "cache-control": "no-store",
}


class ConsoleHeaders:
    """Adds the console's headers to every response that has not set its own."""

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
                for name, value in CONSOLE_HEADERS.items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)


class PlainQueries:
    """Answers 400 to a query string with a control character (%00 …) before any page runs.

    The pages look query values up in the database (a list, a segment, a search), and
    PostgreSQL refuses a NUL in text; none of our links carries a control character.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Refuse the request, or pass it on."""
        query = unquote(scope.get("query_string", b"").decode("utf-8", "replace"))
        if scope["type"] == "http" and drop_controls(query) != query:
            refused = PlainTextResponse("a control character in the address", status_code=400)
            await refused(scope, receive, send)
            return
        await self.app(scope, receive, send)


def url_origin(url: str) -> str:
    """A URL's origin as browsers write it: lower case, no default port, no user or path."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    default = {"http": 80, "https": 443}.get(parts.scheme)
    port = f":{parts.port}" if parts.port and parts.port != default else ""
    return f"{parts.scheme}://{host}{port}"


def is_cross_site(request: Request, origin: str) -> bool:
    """Whether a request comes from anywhere but the console's own pages.

    Under Referrer-Policy no-referrer browsers send `Origin: null` for a same-origin form post,
    so null passes here; Sec-Fetch-Site and the form token prove the rest.
    """
    sent = request.headers.get("origin")
    if sent and sent != "null" and sent != origin:
        return True
    site = request.headers.get("sec-fetch-site")
    return site is not None and site not in ("same-origin", "none")


def tokens_equal(sent: str, expected: str) -> bool:
    """Compare two tokens in constant time (hashed first, so lengths leak nothing either)."""
    a = hashlib.sha256(sent.encode("utf-8", "replace")).digest()
    b = hashlib.sha256(expected.encode("utf-8", "replace")).digest()
    return hmac.compare_digest(a, b) and bool(expected)


class CookieJar:
    """The console's cookie names and flags: `__Host-` and Secure when base_url is https."""

    def __init__(self, base_url: str) -> None:
        self.secure = urlsplit(base_url).scheme == "https"
        prefix = "__Host-" if self.secure else ""
        self.session = f"{prefix}newsletter_console"
        self.pre = f"{prefix}newsletter_console_pre"
        self.lang = f"{prefix}newsletter_console_lang"

    def set(self, response: Response, name: str, value: str, *, max_age: int | None) -> None:
        """Set one cookie: HttpOnly, SameSite=Strict, Path=/, Secure over https."""
        response.set_cookie(
            name,
            value,
            max_age=max_age,
            path="/",
            secure=self.secure,
            httponly=True,
            samesite="strict",
        )

    def clear(self, response: Response, name: str) -> None:
        """Remove a cookie (with the same flags, as __Host- cookies require)."""
        response.delete_cookie(name, path="/", secure=self.secure, httponly=True, samesite="strict")


class PreSessionForms:
    """Form tokens before sign-in: signed, dated by the clock, bound to a pre-session cookie."""

    def __init__(self, secret: str) -> None:
        self.serializer = URLSafeSerializer(secret, salt="newsletter.console-pre")

    @staticmethod
    def new_cookie() -> str:
        """A fresh random pre-session cookie value."""
        return secrets.token_urlsafe(24)

    def token(self, cookie: str, *, now: float) -> str:
        """The form token for pages served now to the holder of this cookie."""
        return str(self.serializer.dumps([_digest(cookie), int(now)]))

    def valid(self, token: str, cookie: str, *, now: float) -> bool:
        """Whether a posted token was made for this cookie within PRE_FORM_MAX_AGE."""
        try:
            value = self.serializer.loads(token)
        except BadSignature:
            return False
        if not (
            cookie
            and isinstance(value, list)
            and len(value) == 2
            and isinstance(value[0], str)
            and isinstance(value[1], int)
        ):
            return False
        return 0 <= now - value[1] <= PRE_FORM_MAX_AGE and tokens_equal(value[0], _digest(cookie))


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:32]
