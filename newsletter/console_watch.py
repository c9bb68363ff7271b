"""The dashboard, its live figures (/api/progress), a campaign's watch page, and the digest.

Pause is open to every staffer (a brake anyone may pull); resume, cancel, retry and sending or
skipping a digest reach subscribers, so they need an approver or an admin.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from newsletter import approvals, campaigns, compose, console_queries, digest_control
from newsletter.config import Settings
from newsletter.console_core import Console, parse_id
from newsletter.db.models import Campaign, ListKind, MailingList
from newsletter.status import service_status

MAY_SEND = ("approver", "admin")


def routes(console: Console) -> list[Route]:
    """The dashboard, progress, watch and digest routes."""
    pages = WatchPages(console)
    return [
        Route("/", pages.dashboard, methods=["GET"]),
        Route("/api/progress", pages.progress, methods=["GET"]),
        Route("/campaigns/{id:id}", pages.watch, methods=["GET"]),
        Route("/campaigns/{id:id}/{action:str}", pages.campaign_action, methods=["POST"]),
        Route("/digest", pages.digest, methods=["GET"]),
        Route("/digest/{action:str}", pages.digest_action, methods=["POST"]),
    ]


@dataclass(frozen=True)
class HeldAlert:
    """An alert not sent yet, as the dashboard lists it."""

    id: int
    title: str
    list_slug: str
    author: str
    status: str
    revision: approvals.RevisionView | None
    needed: int
    training: bool


def dashboard_data(session: Session, *, settings: Settings, now: datetime) -> dict[str, Any]:
    """What the dashboard shows: sending, held, finished, the next digest and the sources."""
    status = service_status(session, settings=settings, now=now)
    held = []
    for c in compose.console_drafts(session):
        state = approvals.approval_state(session, campaign_id=c.id, settings=settings)
        held.append(
            HeldAlert(
                c.id,
                c.title,
                c.mailing_list.slug,
                c.created_by,
                c.status,
                state.revision,
                state.needed,
                c.training,
            )
        )
    return {
        "service": status,
        "sending": console_queries.sending(session, now=now),
        "held": held,
        "finished": console_queries.finished(session, now=now),
    }


def progress_data(session: Session, *, now: datetime, campaign_id: int | None) -> list[Any]:
    """The live figures: every campaign sending, or one campaign."""
    if campaign_id is None:
        return console_queries.sending(session, now=now)
    return [
        console_queries.campaign_progress(
            session, campaigns.get_campaign(session, campaign_id), now=now
        )
    ]


def watch_data(
    session: Session, *, campaign_id: int, now: datetime, with_addresses: bool
) -> dict[str, Any]:
    """One campaign's progress and failures."""
    campaign = campaigns.get_campaign(session, campaign_id)
    return {
        "progress": console_queries.campaign_progress(session, campaign, now=now),
        "failures": console_queries.failures(session, campaign_id, with_addresses=with_addresses),
        "pause_reason": campaign.pause_reason,
        "started_at": campaign.started_at,
        "finished_at": campaign.finished_at,
    }


def digest_data(session: Session, *, settings: Settings, now: datetime) -> list[Any]:
    """The upcoming digest of every digest list."""
    slugs = session.scalars(
        select(MailingList.slug)
        .where(MailingList.kind == ListKind.DIGEST)
        .order_by(MailingList.slug)
    )
    return [
        digest_control.upcoming_digest(session, list_slug=slug, settings=settings, now=now)
        for slug in list(slugs)
    ]


class WatchPages:
    """What staff watch: the dashboard, one campaign, the digest."""

    def __init__(self, console: Console) -> None:
        self.c = console

    async def dashboard(self, request: Request) -> Response:
        """Campaigns sending, held for approval and finished; the next digest; the sources."""
        info = await self.c.staff(request)
        data = await self.c.db(dashboard_data, settings=self.c.settings, now=self.c.now())
        return self.c.render(request, "dashboard", info=info, **data)

    async def progress(self, request: Request) -> Response:
        """JSON for console.js: each campaign's counts, rate and time left."""
        await self.c.staff(request, activity=False)  # polled every 2 s: not someone's activity
        raw = request.query_params.get("campaign", "")
        campaign_id = parse_id(raw)
        rows = await self.c.db(progress_data, now=self.c.now(), campaign_id=campaign_id)
        return JSONResponse({"campaigns": [p.as_json() for p in rows]})

    async def watch(self, request: Request) -> Response:
        """One campaign: live figures, failures with the relay's reply, the controls."""
        info = await self.c.staff(request)
        data = await self.c.db(
            watch_data,
            campaign_id=request.path_params["id"],
            now=self.c.now(),
            with_addresses=info.staff.is_admin(),
        )
        return self.c.render(
            request, "campaign", info=info, may_send=info.staff.role in MAY_SEND, **data
        )

    async def campaign_action(self, request: Request) -> Response:
        """Pause, resume, cancel or retry, through the same steps as the CLI."""
        action = request.path_params["action"]
        if action not in ("pause", "resume", "cancel", "retry"):
            raise HTTPException(404)
        info = await self.c.staff(request, roles=() if action == "pause" else MAY_SEND)
        form = await self.c.form(request, info)
        kw: dict[str, Any] = {
            "campaign_id": request.path_params["id"],
            "now": self.c.now(),
            "actor": info.staff.email,
        }
        if action == "pause":
            kw["reason"] = (
                form.get("reason").strip()[:200] or f"paused in the console by {info.staff.email}"
            )

        def run(session: Session) -> object:
            if action == "pause":
                return campaigns.pause_campaign(session=session, **kw)
            if action == "resume":
                return campaigns.resume_campaign(session=session, **kw)
            if action == "cancel":
                return campaigns.cancel_campaign(session=session, **kw)
            return campaigns.retry_campaign(session=session, **kw)

        await self.c.db(run)
        return RedirectResponse(f"/campaigns/{kw['campaign_id']}", status_code=303)

    async def digest(self, request: Request) -> Response:
        """The next digest of each list: its items, the ones left out, when it goes."""
        info = await self.c.staff(request)
        digests = await self.c.db(digest_data, settings=self.c.settings, now=self.c.now())
        return self.c.render(
            request, "digest", info=info, digests=digests, may_send=info.staff.role in MAY_SEND
        )

    async def digest_action(self, request: Request) -> Response:
        """Leave an item out, put it back, send the digest now, or skip it this week."""
        action = request.path_params["action"]
        if action not in ("exclude", "include", "send", "skip"):
            raise HTTPException(404)
        roles = MAY_SEND if action in ("send", "skip") else ()
        info = await self.c.staff(request, roles=roles)
        form = await self.c.form(request, info)
        slug = form.get("list")[:100]
        kw: dict[str, Any] = {"list_slug": slug, "now": self.c.now(), "actor": info.staff.email}
        if action in ("exclude", "include"):
            item_id = parse_id(form.get("item"))
            if item_id is None:
                raise HTTPException(400)
            kw["item_id"] = item_id

        def run(session: Session) -> object:
            if action == "exclude":
                digest_control.exclude_item(session, **kw)
            elif action == "include":
                digest_control.include_item(session, **kw)
            elif action == "skip":
                return digest_control.skip_digest(session, settings=self.c.settings, **kw)
            else:
                return digest_control.send_digest_now(session, settings=self.c.settings, **kw)
            return None

        result = await self.c.db(run)
        if action == "send" and isinstance(result, Campaign):
            return RedirectResponse(f"/campaigns/{result.id}", status_code=303)
        return RedirectResponse("/digest", status_code=303)
