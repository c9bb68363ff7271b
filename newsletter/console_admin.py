"""For admins: the audit log (paged, and as CSV safe to open in a spreadsheet) and the staff list.

Staff accounts change only from the CLI (`newsletter staff ...`); the console lists them.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from sqlalchemy.orm import Session
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from newsletter import console_queries, staff
from newsletter.console_core import Console, parse_id
from newsletter.db.models import Event
from newsletter.subscriber_csv import neutralise_cell

PAGE_SIZE = 50
CSV_BATCH = 1000
CSV_COLUMNS = ("id", "at", "actor", "action", "client", "campaign", "hash", "detail")
ADMIN = ("admin",)


def routes(console: Console) -> list[Route]:
    """The audit log and staff list routes."""
    pages = AdminPages(console)
    return [
        Route("/audit", pages.audit, methods=["GET"]),
        Route("/audit.csv", pages.audit_csv, methods=["GET"]),
        Route("/staff", pages.staff_list, methods=["GET"]),
    ]


def event_row(event: Event) -> dict[str, str]:
    """An event as the log shows it: who, when, what, from where, on which revision."""
    detail = dict(event.detail or {})
    return {
        "id": str(event.id),
        "at": event.at.isoformat(),
        "actor": event.actor,
        "action": event.action,
        "client": str(detail.pop("client", "")),
        "campaign": str(detail.pop("campaign", "")),
        "hash": str(detail.pop("hash", detail.pop("revision_hash", ""))),
        "detail": json.dumps(detail, ensure_ascii=False, sort_keys=True, default=str),
    }


def events_csv(session: Session) -> str:
    """The whole audit log as CSV, oldest first, every cell neutralised (no formulas)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    after = 0
    while batch := console_queries.all_events(session, after=after, size=CSV_BATCH):
        for event in batch:
            row = event_row(event)
            writer.writerow([neutralise_cell(row[c]) for c in CSV_COLUMNS])
        after = batch[-1].id
    return out.getvalue()


class AdminPages:
    """Pages for admins only."""

    def __init__(self, console: Console) -> None:
        self.c = console

    async def audit(self, request: Request) -> Response:
        """One page of the audit log, newest first."""
        info = await self.c.staff(request, roles=ADMIN)
        raw = request.query_params.get("page", "0")
        page = min(parse_id(raw) or 0, 10**6)

        def read(session: Session) -> tuple[list[dict[str, str]], bool]:
            events, more = console_queries.events_page(session, page=page, size=PAGE_SIZE)
            return [event_row(e) for e in events], more

        rows, more = await self.c.db(read)
        return self.c.render(request, "audit", info=info, rows=rows, page=page, more=more)

    async def audit_csv(self, request: Request) -> Response:
        """The audit log as a CSV download."""
        await self.c.staff(request, roles=ADMIN)
        body = await self.c.db(events_csv)
        stamp = self.c.now().strftime("%Y%m%d-%H%M")
        return Response(
            body,
            media_type="text/csv; charset=utf-8",
            headers={"content-disposition": f'attachment; filename="audit-{stamp}.csv"'},
        )

    async def staff_list(self, request: Request) -> Response:
        """Every staff account, its role and state (changes stay in the CLI)."""
        info = await self.c.staff(request, roles=ADMIN)
        people: list[Any] = await self.c.db(staff.list_staff)
        return self.c.render(request, "staff", info=info, people=people)
