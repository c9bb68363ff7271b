"""Sign-in in two steps, enrolment from the CLI's one-time link, sign-out (here or everywhere).

Every refusal of a sign-in step gets the same page and status whatever was wrong (an unknown
account, a wrong password, a disabled one): only throttling differs, with 429 and Retry-After.
"""

from __future__ import annotations

import base64

from sqlalchemy.orm import Session
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from newsletter import staff, staff_auth, staff_sessions
from newsletter.console_core import Console
from newsletter.console_i18n import N_, refusal_line
from newsletter.errors import PasswordPolicyError, SignInError, ThrottledError

WRONG = N_("The email address, password or code is wrong.")
BAD_LINK = N_("This enrolment link is not valid or has expired. Ask an admin for a new one.")


def routes(console: Console) -> list[Route]:
    """The sign-in, enrolment and sign-out routes."""
    pages = SignInPages(console)
    return [
        Route("/signin", pages.signin_page, methods=["GET"]),
        Route("/signin", pages.signin_post, methods=["POST"]),
        Route("/signin/code", pages.code_post, methods=["POST"]),
        Route("/enrol/{token}", pages.enrol_page, methods=["GET"]),
        Route("/enrol/{token}", pages.enrol_post, methods=["POST"]),
        Route("/signout", pages.signout_post, methods=["POST"]),
        Route("/signout-everywhere", pages.signout_everywhere_post, methods=["POST"]),
    ]


def standalone_svg(svg: str) -> str:
    """An inline SVG made a document an <img> can show: it needs the SVG namespace."""
    if svg.startswith("<svg ") and "xmlns=" not in svg[: svg.find(">")]:
        return '<svg xmlns="http://www.w3.org/2000/svg" ' + svg[len("<svg ") :]
    return svg


class SignInPages:
    """The pages before (and at the end of) a session."""

    def __init__(self, console: Console) -> None:
        self.c = console

    # --- sign in ---------------------------------------------------------------------------

    async def signin_page(self, request: Request) -> Response:
        """Step one: email address and password (signing in again ends the session before)."""
        return self.c.render(request, "signin", info=None, step="password", email="", error="")

    async def signin_post(self, request: Request) -> Response:
        """Check the password; on success show step two, the code."""
        form = await self.c.form(request, None)
        email = form.get("email").strip()[:320]
        try:
            pending = await self.c.db_keeping_failures(
                staff_auth.password_step,
                email=email,
                password=form.get("password")[:1024],
                client=self.c.client(request),
                now=self.c.now(),
                settings=self.c.settings,
            )
        except SignInError as e:
            return self.refused(request, e, step="password", email=email)
        return self.c.render(request, "signin", info=None, step="code", pending=pending, error="")

    async def code_post(self, request: Request) -> Response:
        """Check the code (or a recovery code); on success start a new session."""
        form = await self.c.form(request, None)
        pending = form.get("pending")[:2000]
        client = self.c.client(request)
        try:
            view = await self.c.db_keeping_failures(
                staff_auth.code_step,
                pending=pending,
                code=form.get("code").strip()[:64],
                client=client,
                now=self.c.now(),
                settings=self.c.settings,
            )
        except SignInError as e:
            return self.refused(request, e, step="code", pending=pending)
        old = request.cookies.get(self.c.cookies.session, "")
        cookie, _ = await self.c.db(self._start, old=old, staff_id=view.id, client=client)
        response = RedirectResponse("/", status_code=303)
        self.c.cookies.set(
            response,
            self.c.cookies.session,
            cookie,
            max_age=self.c.settings.console.max_hours * 3600,
        )
        self.c.cookies.clear(response, self.c.cookies.pre)
        return response

    def _start(
        self, session: Session, *, old: str, staff_id: int, client: str
    ) -> tuple[str, staff_sessions.SessionInfo]:
        """End the browser's earlier session, if any, and start a new one (a new id)."""
        now = self.c.now()
        if old:
            staff_sessions.end_session(session, cookie=old, now=now)
        return staff_sessions.start_session(
            session,
            staff_id=staff_id,
            client=client,
            now=now,
            settings=self.c.settings,
        )

    def refused(
        self, request: Request, e: SignInError, *, step: str, email: str = "", pending: str = ""
    ) -> Response:
        """The one answer to a refused step; throttling says how long to wait."""
        throttled = isinstance(e, ThrottledError)
        wait = e.retry_after if isinstance(e, ThrottledError) else 0
        return self.c.render(
            request,
            "signin",
            info=None,
            status=429 if throttled else 400,
            headers={"retry-after": str(wait)} if throttled else None,
            error="throttled" if throttled else refusal_line(WRONG, self.c.language(request, None)),
            retry_after=wait,
            step=step,
            email=email,
            pending=pending,
        )

    # --- enrolment -------------------------------------------------------------------------

    async def enrol_page(self, request: Request) -> Response:
        """The password form, with the TOTP secret as a QR code, a link and text."""
        return await self.enrol_form(request, error="")

    async def enrol_form(self, request: Request, *, error: str, status: int = 200) -> Response:
        """The enrolment page for the link's token, or the invalid-link page."""
        try:
            enrolment = await self.c.db(
                staff.begin_enrolment,
                token=request.path_params["token"],
                now=self.c.now(),
                settings=self.c.settings,
            )
        except SignInError:
            message = refusal_line(BAD_LINK, self.c.language(request, None))
            return self.c.render(request, "error", info=None, status=400, code=400, message=message)
        qr = base64.b64encode(standalone_svg(enrolment.qr_svg).encode("utf-8")).decode("ascii")
        return self.c.render(
            request,
            "enrol",
            info=None,
            status=status,
            enrolment=enrolment,
            qr_src=f"data:image/svg+xml;base64,{qr}",
            error=error,
        )

    async def enrol_post(self, request: Request) -> Response:
        """Set the password, check a first code, show the recovery codes once."""
        form = await self.c.form(request, None)
        try:
            codes = await self.c.db_keeping_failures(
                staff.complete_enrolment,
                token=request.path_params["token"],
                password=form.get("password")[:1024],
                password_again=form.get("password_again")[:1024],
                code=form.get("code").strip()[:64],
                now=self.c.now(),
                client=self.c.client(request),
            )
        except (PasswordPolicyError, SignInError) as e:  # the policy's or the code's refusal
            error = refusal_line(e, self.c.language(request, None))
            return await self.enrol_form(request, error=error, status=400)
        return self.c.render(request, "enrolled", info=None, codes=codes)

    # --- sign out --------------------------------------------------------------------------

    async def signout_post(self, request: Request) -> Response:
        """End this session and forget the cookie."""
        info = await self.c.staff(request)
        await self.c.form(request, info)
        cookie = request.cookies.get(self.c.cookies.session, "")
        await self.c.db(staff_sessions.end_session, cookie=cookie, now=self.c.now())
        return self.signed_out()

    async def signout_everywhere_post(self, request: Request) -> Response:
        """End every session of this staffer (a lost phone), this one included."""
        info = await self.c.staff(request)
        await self.c.form(request, info)
        await self.c.db(
            staff_sessions.revoke_sessions,
            staff_id=info.staff.id,
            now=self.c.now(),
            actor=info.staff.email,
        )
        return self.signed_out()

    def signed_out(self) -> Response:
        """Back to the sign-in page, without the session cookie."""
        response = RedirectResponse("/signin", status_code=303)
        self.c.cookies.clear(response, self.c.cookies.session)
        return response
