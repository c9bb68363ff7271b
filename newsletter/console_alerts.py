"""Compose an alert, preview it, send a test, submit it, approve it (or break glass).

The preview frame shows the variant the sender would send: the revision's stored variants once
submitted, else a fresh render through the same path (rolled back, nothing stored), with the
reader's personal links made inert. Approving needs a fresh second-factor code first.
"""

from __future__ import annotations

import logging
import re
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from newsletter import approvals, compose, console_queries, staff, staff_auth, staff_notices
from newsletter.campaigns import get_campaign
from newsletter.check import check_campaign, stored_variants
from newsletter.config import Settings
from newsletter.console_core import Console, Form
from newsletter.console_i18n import N_, refusal_line
from newsletter.console_security import PREVIEW_CSP
from newsletter.db.models import CampaignKind, CampaignStatus
from newsletter.errors import (
    ApprovalError,
    CampaignError,
    NewsletterError,
    SignInError,
    ThrottledError,
)
from newsletter.render import RenderedVariant, personalise
from newsletter.smtp import Result
from newsletter.staff_sessions import SessionInfo
from newsletter.test_send import MAX_TEST_ADDRESSES, send_test, send_training
from newsletter.variants import render_campaign

log = logging.getLogger("newsletter.console")
APPROVERS = ("approver", "admin")
# Our own rendered email, not outside text; no nested quantifiers, so linear time.
_DARK_MEDIA = re.compile(r"@media\s*\(\s*prefers-color-scheme\s*:\s*dark\s*\)")
_COLOR_SCHEME = re.compile(r'<meta name="color-scheme" content="light dark"\s*/?>')
_ADDRESS_SPLIT = re.compile(r"[\s,;]+")  # one character class, repeated: linear
PICKER_LIMIT = 20
# A language's text at most, as the compose form's textareas say (maxlength); [console]
# max_body_bytes holds three of them percent-encoded.
BODY_MAX_CHARS = 20000


def routes(console: Console) -> list[Route]:
    """The compose, preview, test, submit and approval routes."""
    pages = AlertPages(console)
    return [
        Route("/alerts/new", pages.new_page, methods=["GET"]),
        Route("/alerts/new", pages.new_post, methods=["POST"]),
        Route("/alerts/{id:id}", pages.alert_page, methods=["GET"]),
        Route("/alerts/{id:id}", pages.edit_post, methods=["POST"]),
        Route("/alerts/{id:id}/preview/{lang:str}", pages.preview_frame, methods=["GET"]),
        Route("/alerts/{id:id}/test", pages.test_post, methods=["POST"]),
        Route("/alerts/{id:id}/submit", pages.submit_post, methods=["POST"]),
        Route("/alerts/{id:id}/approve", pages.approve_post, methods=["POST"]),
        Route("/alerts/{id:id}/break-glass", pages.break_glass_post, methods=["POST"]),
        Route("/api/recipients", pages.recipients_api, methods=["GET"]),
    ]


# --- the pieces the pages read, each in one transaction ----------------------------------


def compose_choices(
    session: Session, *, query: str, list_slug: str, segment: str, languages: tuple[str, ...]
) -> dict[str, Any]:
    """The lists, segments and picker items to choose from, and the chosen audience's counts."""
    lists = console_queries.mailing_lists(session)
    slug = list_slug or (lists[0].slug if lists else "")
    counts: dict[str, int] = {}
    if slug:
        counts = compose.recipients_by_language(
            session, list_slug=slug, segment=segment or None, languages=languages
        )
    items = compose.recent_items(session, query=query, limit=PICKER_LIMIT)
    return {
        "lists": [(m.slug, m.name) for m in lists],
        "segments": console_queries.segment_names(session),
        "items": [(i.guid or i.link, i.title, i.published_at) for i in items],
        "counts": counts,
        "chosen_list": slug,
    }


def alert_data(session: Session, *, campaign_id: int, settings: Settings) -> dict[str, Any]:
    """An alert's draft, approval state, check verdict and recipient counts (rolled back after)."""
    campaign = get_campaign(session, campaign_id)
    if campaign.kind != CampaignKind.ALERT:
        raise HTTPException(404)
    draft = compose.draft_input(campaign)
    state = approvals.approval_state(session, campaign_id=campaign_id, settings=settings)
    try:
        problems = [str(p) for p in check_campaign(session, campaign, settings)]
    except NewsletterError as e:  # a render the check could not make: say why
        problems = [str(e)]
    return {
        "campaign_id": campaign.id,
        "campaign_status": campaign.status,
        "editable": campaign.status == CampaignStatus.DRAFT and campaign.started_at is None,
        "title": campaign.title,
        "draft": draft,
        "state": state,
        "problems": problems,
        "training_campaign": campaign.training,
    }


def preview_variant(
    session: Session, *, campaign_id: int, lang: str, settings: Settings
) -> RenderedVariant:
    """The variant of a language as it will go out: the open revision's, else a fresh render."""
    campaign = get_campaign(session, campaign_id)
    state = approvals.approval_state(session, campaign_id=campaign_id, settings=settings)
    submitted = state.revision is not None and not state.revision.voided
    variants = stored_variants(session, campaign) if submitted else []
    if not variants:
        variants = render_campaign(campaign, settings=settings)
    by_lang = {v.lang: v for v in variants}
    found = by_lang.get(lang) or by_lang.get(settings.render.default_language)
    if found is None:
        raise HTTPException(404)
    return found


def frame_html(variant: RenderedVariant, *, dark: bool) -> str:
    """A variant's HTML for the preview frame: inert personal links, dark rules forced if asked."""
    page, _ = personalise(variant, unsubscribe_url="#unsubscribe", preferences_url="#preferences")
    if dark:
        page = _DARK_MEDIA.sub("@media all", page)
        page = _COLOR_SCHEME.sub('<meta name="color-scheme" content="dark">', page)
    return page


def approver_emails(session: Session, *, author: str) -> list[str]:
    """Who may approve: enrolled approvers and admins, the author left out."""
    emails = staff.active_staff_emails(session, roles=APPROVERS)
    return [e for e in emails if e.lower() != author.lower()]


def is_training_alert(session: Session, *, campaign_id: int, settings: Settings) -> bool:
    """Whether an alert is a training one (the console's mode or its author's account)."""
    return approvals.is_training(get_campaign(session, campaign_id), settings)


def draft_from_form(form: Form, languages: tuple[str, ...]) -> compose.DraftInput:
    """The compose form's fields as a DraftInput (lengths capped; the steps check the rest)."""
    texts = {}
    for lang in languages:
        title = form.get(f"title_{lang}").strip()[:500]
        body = form.get(f"body_{lang}").replace("\r\n", "\n")[:BODY_MAX_CHARS]
        if title or body.strip():
            texts[lang] = compose.LanguageText(title=title, body=body)
    return compose.DraftInput(
        list_slug=form.get("list")[:100],
        segment=form.get("segment")[:100] or None,
        item_ref=form.get("item_ref")[:2000] or None,
        texts=texts,
        url=form.get("url").strip()[:2000],
        archive=form.get("archive") == "1",
    )


def save_edit(
    session: Session,
    *,
    campaign_id: int,
    draft: compose.DraftInput,
    settings: Settings,
    now: datetime,
    actor: str,
) -> None:
    """Save an edited draft once its row is locked: an edit racing the approval that launches
    the alert waits for it, then finds it started and changes nothing."""
    approvals.lock_alert(session, campaign_id)
    compose.update_draft(
        session, campaign_id=campaign_id, draft=draft, settings=settings, now=now, actor=actor
    )


def parse_addresses(raw: str) -> list[str]:
    """The test addresses typed in: split on commas, semicolons and spaces, duplicates dropped."""
    return list(dict.fromkeys(a for a in _ADDRESS_SPLIT.split(raw[:2000]) if a))


class AlertPages:
    """An alert from the first draft to its approval."""

    def __init__(self, console: Console) -> None:
        self.c = console
        self.languages = console.settings.render.languages

    # --- compose ---------------------------------------------------------------------------

    async def new_page(self, request: Request) -> Response:
        """An empty compose form; ?q= filters the item picker, ?list=&segment= the counts."""
        info = await self.c.staff(request)
        q = request.query_params
        draft = compose.DraftInput(
            list_slug=q.get("list", "")[:100],
            segment=q.get("segment", "")[:100] or None,
            item_ref=q.get("item", "")[:2000] or None,
            texts={},
        )
        return await self.compose_page(request, info, draft, campaign_id=None)

    async def compose_page(
        self,
        request: Request,
        info: SessionInfo,
        draft: compose.DraftInput,
        *,
        campaign_id: int | None,
        error: str = "",
        status: int = 200,
    ) -> Response:
        """The compose form filled with a draft, with the picker and the recipient counts."""
        choices = await self.c.db(
            compose_choices,
            query=request.query_params.get("q", "")[:200],
            list_slug=draft.list_slug,
            segment=draft.segment or "",
            languages=self.languages,
        )
        return self.c.render(
            request,
            "compose",
            info=info,
            status=status,
            draft=draft,
            campaign_id=campaign_id,
            langs=self.languages,
            q=request.query_params.get("q", "")[:200],
            error=error,
            **choices,
        )

    async def new_post(self, request: Request) -> Response:
        """Save a new draft (or, with action=count, only show the recipient counts)."""
        info = await self.c.staff(request)
        form = await self.c.form(request, info)
        draft = draft_from_form(form, self.languages)
        if form.get("action") == "count":
            return await self.compose_page(request, info, draft, campaign_id=None)
        try:
            campaign = await self.c.db(
                compose.create_draft,
                draft=draft,
                settings=self.c.settings,
                now=self.c.now(),
                actor=info.staff.email,
                training=self.c.training(info),
            )
        except NewsletterError as e:
            error = refusal_line(e, self.c.language(request, info))
            return await self.compose_page(
                request, info, draft, campaign_id=None, error=error, status=400
            )
        return RedirectResponse(f"/alerts/{campaign.id}", status_code=303)

    async def edit_post(self, request: Request) -> Response:
        """Save an edited draft: a new revision is needed, earlier approvals are void."""
        info = await self.c.staff(request)
        form = await self.c.form(request, info)
        campaign_id = request.path_params["id"]
        draft = draft_from_form(form, self.languages)
        if form.get("action") == "count":
            return await self.compose_page(request, info, draft, campaign_id=campaign_id)
        try:
            await self.c.db(
                save_edit,
                campaign_id=campaign_id,
                draft=draft,
                settings=self.c.settings,
                now=self.c.now(),
                actor=info.staff.email,
            )
        except NewsletterError as e:
            error = refusal_line(e, self.c.language(request, info))
            return await self.compose_page(
                request, info, draft, campaign_id=campaign_id, error=error, status=400
            )
        return RedirectResponse(f"/alerts/{campaign_id}", status_code=303)

    async def recipients_api(self, request: Request) -> Response:
        """JSON for console.js: the recipient count per language of a list and segment."""
        await self.c.staff(request)
        slug = request.query_params.get("list", "")[:100]
        segment = request.query_params.get("segment", "")[:100] or None
        try:
            counts = await self.c.db(
                compose.recipients_by_language,
                list_slug=slug,
                segment=segment,
                languages=self.languages,
            )
        except NewsletterError:
            raise HTTPException(400) from None
        return JSONResponse({"counts": counts})

    # --- the alert page: preview, verdict, test, submit, approve ----------------------------

    async def alert_page(self, request: Request, **extra: Any) -> Response:
        """The draft with its previews, check verdict, test form and approval state."""
        info = await self.c.staff(request)
        return await self.show_alert(request, info, request.path_params["id"], **extra)

    async def show_alert(
        self,
        request: Request,
        info: SessionInfo,
        campaign_id: int,
        *,
        status: int = 200,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> Response:
        """The alert page for a campaign, with any results or errors of the last action."""
        data = await self.c.db_rolled_back(
            alert_data, campaign_id=campaign_id, settings=self.c.settings
        )
        query = request.query_params.get("q", "")[:200]
        choices = await self.c.db(
            compose_choices,
            query=query,
            list_slug=data["draft"].list_slug,
            segment=data["draft"].segment or "",
            languages=self.languages,
        )
        q = request.query_params
        lang = q.get("preview", "")
        scheme = q.get("scheme", "light")
        return self.c.render(
            request,
            "alert",
            info=info,
            status=status,
            headers=headers,
            langs=self.languages,
            preview_lang=lang if lang in self.languages else self.languages[0],
            scheme="dark" if scheme == "dark" else "light",
            can_approve=data["state"].can_approve(info.staff),
            break_glass=self.c.settings.console.break_glass,
            max_test=MAX_TEST_ADDRESSES,
            test_results=extra.pop("test_results", None),
            error=extra.pop("error", ""),
            notice=extra.pop("notice", ""),
            q=query,
            **{**choices, **data},
        )

    async def preview_frame(self, request: Request) -> Response:
        """One variant's HTML for the sandboxed frame, light or dark."""
        await self.c.staff(request)
        lang = request.path_params["lang"]
        if lang not in self.languages:
            raise HTTPException(404)
        variant = await self.c.db_rolled_back(
            preview_variant,
            campaign_id=request.path_params["id"],
            lang=lang,
            settings=self.c.settings,
        )
        dark = request.query_params.get("scheme") == "dark"
        return HTMLResponse(
            frame_html(variant, dark=dark),
            headers={"content-security-policy": PREVIEW_CSP, "x-frame-options": "SAMEORIGIN"},
        )

    async def test_post(self, request: Request) -> Response:
        """Send the alert to up to five addresses, marked as a test, never counted."""
        info = await self.c.staff(request)
        form = await self.c.form(request, info)
        campaign_id = request.path_params["id"]
        addresses = parse_addresses(form.get("addresses")) or [info.staff.email]
        lang = form.get("lang")
        try:
            async with self.c.transport_factory() as transport:
                results = await send_test(
                    factory=self.c.factory,
                    settings=self.c.settings,
                    campaign_id=campaign_id,
                    addresses=addresses,
                    actor=info.staff.email,
                    now=self.c.now(),
                    transport=transport,
                    lang=lang if lang in self.languages else None,
                )
        except CampaignError as e:  # a bad address, too many, no such draft
            error = refusal_line(e, self.c.language(request, info))
            return await self.show_alert(request, info, campaign_id, status=400, error=error)
        return await self.show_alert(request, info, campaign_id, test_results=results)

    async def submit_post(self, request: Request) -> Response:
        """Freeze the draft as a revision and ask the approvers, by a neutral email."""
        info = await self.c.staff(request)
        await self.c.form(request, info)
        campaign_id = request.path_params["id"]
        await self.c.db(
            approvals.submit_for_approval,
            campaign_id=campaign_id,
            settings=self.c.settings,
            now=self.c.now(),
            actor=info.staff.email,
        )
        to = await self.c.db(approver_emails, author=info.staff.email)
        url = f"{self.c.settings.console.base_url}/alerts/{campaign_id}"
        messages = [
            staff_notices.approval_request_message(
                to=address, console_url=url, settings=self.c.settings, now=self.c.now()
            )
            for address in to
        ]
        await self.mail(messages)
        return RedirectResponse(f"/alerts/{campaign_id}", status_code=303)

    async def step_up(
        self, request: Request, info: SessionInfo, form: Form, campaign_id: int, *, purpose: str
    ) -> Response | None:
        """Check the fresh second-factor code sent with the form; the alert page again if wrong."""
        try:
            await self.c.db_keeping_failures(
                staff_auth.verify_step_up,
                staff_id=info.staff.id,
                session_id=info.session_id,
                code=form.get("code").strip()[:64],
                now=self.c.now(),
                settings=self.c.settings,
                purpose=purpose,
            )
        except ThrottledError as e:  # its own line: the code may well be right
            error = refusal_line(e, self.c.language(request, info))
            headers = {"retry-after": str(e.retry_after)}
            return await self.show_alert(
                request, info, campaign_id, status=429, headers=headers, error=error
            )
        except SignInError:
            error = refusal_line(N_("That code is not valid."), self.c.language(request, info))
            return await self.show_alert(request, info, campaign_id, status=400, error=error)
        return None

    async def approve_post(self, request: Request) -> Response:
        """Approve the revision the approver looked at, after a fresh second-factor code."""
        info = await self.c.staff(request, roles=APPROVERS)
        form = await self.c.form(request, info)
        campaign_id = request.path_params["id"]
        refused = await self.step_up(request, info, form, campaign_id, purpose="approve")
        if refused is not None:
            return refused
        try:
            queued = await self.c.db(
                approvals.approve,
                campaign_id=campaign_id,
                revision_hash=form.get("revision")[:64],
                approver=info.staff,
                settings=self.c.settings,
                now=self.c.now(),
            )
        except ApprovalError as e:
            error = refusal_line(e, self.c.language(request, info))
            return await self.show_alert(request, info, campaign_id, status=409, error=error)
        if queued is None:
            return RedirectResponse(f"/alerts/{campaign_id}", status_code=303)
        await self.send_if_training(campaign_id, actor=info.staff.email)
        return RedirectResponse(f"/campaigns/{campaign_id}", status_code=303)

    async def break_glass_post(self, request: Request) -> Response:
        """Send alone, with a fresh code and a written reason; every approver is told at once."""
        if not self.c.settings.console.break_glass:
            raise HTTPException(404)
        info = await self.c.staff(request, roles=APPROVERS)
        form = await self.c.form(request, info)
        campaign_id = request.path_params["id"]
        reason = form.get("reason").strip()[:2000]
        refused = await self.step_up(request, info, form, campaign_id, purpose="break-glass")
        if refused is not None:
            return refused
        try:
            await self.c.db(
                approvals.break_glass,
                campaign_id=campaign_id,
                revision_hash=form.get("revision")[:64],
                staff=info.staff,
                reason=reason,
                settings=self.c.settings,
                now=self.c.now(),
            )
        except ApprovalError as e:
            error = refusal_line(e, self.c.language(request, info))
            return await self.show_alert(request, info, campaign_id, status=409, error=error)
        await self.send_if_training(campaign_id, actor=info.staff.email)
        to = await self.c.db(approver_emails, author=info.staff.email)
        url = f"{self.c.settings.console.base_url}/campaigns/{campaign_id}"
        await self.mail(
            [
                staff_notices.break_glass_message(
                    to=address,
                    console_url=url,
                    actor=info.staff.email,
                    reason=reason,
                    settings=self.c.settings,
                    now=self.c.now(),
                )
                for address in to
            ]
        )
        return RedirectResponse(f"/campaigns/{campaign_id}", status_code=303)

    async def send_if_training(self, campaign_id: int, *, actor: str) -> None:
        """An approved training alert goes to the staff's own addresses now, never the list."""
        training = await self.c.db(
            is_training_alert, campaign_id=campaign_id, settings=self.c.settings
        )
        if not training:
            return
        async with self.c.transport_factory() as transport:
            await send_training(
                factory=self.c.factory,
                settings=self.c.settings,
                campaign_id=campaign_id,
                actor=actor,
                now=self.c.now(),
                transport=transport,
            )

    async def mail(self, messages: list[Any]) -> None:
        """Send staff notices over one transport; a failure is logged, never the request's."""
        if not messages:
            return
        sender = self.c.settings.mail.from_address
        try:
            async with self.c.transport_factory() as transport:
                for msg in messages:
                    outcome = await transport.send(
                        msg.as_bytes(), sender=sender, recipient=str(msg["To"])
                    )
                    if outcome.result != Result.SENT:
                        log.warning("staff notice not sent: %s", outcome.reply[:200])
        except Exception:  # the relay is down: the approvers still see it on the dashboard
            log.exception("staff notices not sent")
