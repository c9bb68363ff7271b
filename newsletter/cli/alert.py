"""`newsletter alert preview|send`: an urgent-action alert from an item or from staff text."""

from __future__ import annotations

import html
import sys
from pathlib import Path
from typing import Annotated

import typer
from sqlalchemy.orm import Session

from newsletter.assemble import assemble_alert
from newsletter.campaigns import render_campaign, start_campaign
from newsletter.cli import State, app, console, deliver_with_progress
from newsletter.db.models import Campaign, CampaignStatus
from newsletter.db.queries import audience_size
from newsletter.errors import CampaignError
from newsletter.message import ListInfo
from newsletter.preview import write_previews

alert_app = typer.Typer(help="Urgent-action alerts.", no_args_is_help=True)
app.add_typer(alert_app, name="alert")

Item = Annotated[str | None, typer.Option("--item", help="The portal item: its guid or link.")]
Title = Annotated[str | None, typer.Option("--title", help="Alert title, for an alert from text.")]
BodyFile = Annotated[
    Path | None,
    typer.Option(
        "--body-file", help="Alert text: plain text (blank lines between paragraphs) or .html."
    ),
]
Url = Annotated[str | None, typer.Option("--url", help="Where the call to action points.")]
ListSlug = Annotated[str | None, typer.Option("--list", help="List slug (default: [alerts] list).")]


def read_body(path: Path | None) -> str:
    """The body file as HTML: .html files as they are (sanitised later), text as paragraphs."""
    if path is None:
        return ""
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CampaignError(f"{path}: cannot read the body file: {e}") from None
    if path.suffix.lower() in (".html", ".htm"):
        return raw
    paragraphs = [p.strip() for p in raw.replace("\r\n", "\n").split("\n\n") if p.strip()]
    return "".join(f"<p>{html.escape(p).replace(chr(10), '<br>')}</p>" for p in paragraphs)


def _assemble(
    state: State,
    session: Session,
    item: str | None,
    title: str | None,
    body_file: Path | None,
    url: str | None,
    list_slug: str | None,
) -> tuple[Campaign, bool]:
    if not item and not (title and body_file):
        raise CampaignError("give --item GUID_OR_URL, or --title and --body-file")
    return assemble_alert(
        session=session,
        list_slug=list_slug or state.settings.alerts.list,
        now=state.clock.now(),
        actor=state.actor,
        item_ref=item,
        title=title or "",
        body_html=read_body(body_file),
        url=url or "",
        base_url=state.settings.web.base_url,
    )


@alert_app.command("preview")
def preview(
    ctx: typer.Context,
    item: Item = None,
    title: Title = None,
    body_file: BodyFile = None,
    url: Url = None,
    list_slug: ListSlug = None,
    out: Annotated[Path, typer.Option(help="Folder to write the files to.")] = Path("preview"),
) -> None:
    """Write the alert as .html, .txt and .eml files per language; sends nothing."""
    state: State = ctx.obj
    session = state.factory()()
    try:
        campaign, _ = _assemble(state, session, item, title, body_file, url, list_slug)
        ml = campaign.mailing_list
        paths = write_previews(
            variants=render_campaign(campaign, settings=state.settings),
            out_dir=out,
            stem="alert",
            mlist=ListInfo(ml.id, ml.slug, ml.list_id),
            settings=state.settings,
            now=state.clock.now(),
        )
        n, slug = audience_size(session, campaign.list_id), ml.slug
    finally:
        session.rollback()
        session.close()
    console.print(f"alert for '{slug}' would reach {n} people; wrote:")
    for path in paths:
        console.print(f"  {path}")


@alert_app.command("send")
def send(
    ctx: typer.Context,
    item: Item = None,
    title: Title = None,
    body_file: BodyFile = None,
    url: Url = None,
    list_slug: ListSlug = None,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    queue_only: Annotated[
        bool,
        typer.Option("--queue-only", help="Queue only; leave the sending to `newsletter send`."),
    ] = False,
) -> None:
    """Send an urgent alert now; the same alert asked for twice is sent once."""
    state: State = ctx.obj
    session = state.factory()()
    try:
        campaign, created = _assemble(state, session, item, title, body_file, url, list_slug)
        if not created and campaign.status in (CampaignStatus.FINISHED, CampaignStatus.CANCELLED):
            console.print(
                f"this alert was already sent as campaign {campaign.id} "
                f"({campaign.status}); nothing to do"
            )
            return
        n = audience_size(session, campaign.list_id)
        if not yes and sys.stdin.isatty():
            typer.confirm(
                f"Send this alert to {n} people on '{campaign.mailing_list.slug}'?", abort=True
            )
        queued = start_campaign(
            session=session,
            campaign=campaign,
            settings=state.settings,
            now=state.clock.now(),
            actor=state.actor,
        )
        session.commit()
        campaign_id = campaign.id
    finally:
        session.rollback()
        session.close()
    again = "" if created else " (resuming the existing campaign)"
    console.print(f"campaign {campaign_id}: alert queued for {queued} people{again}")
    if not queue_only:
        deliver_with_progress(state, campaign_id=campaign_id)
