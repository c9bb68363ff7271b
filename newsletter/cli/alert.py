"""`newsletter alert preview|send`: an urgent-action alert from an item or from staff text."""

from __future__ import annotations

import html
import sys
from pathlib import Path
from typing import Annotated

import typer
from sqlalchemy import select
from sqlalchemy.orm import Session

from newsletter.alerts import approve_alert, is_held_for_approval
from newsletter.assemble import assemble_alert
from newsletter.audience import audience_size
from newsletter.check import CheckError
from newsletter.cli import State, app, console, one_line
from newsletter.cli.check import (
    ChromiumOption,
    ForceOption,
    ScreenshotOption,
    launch,
    print_preview,
    print_problems,
)
from newsletter.cli.progress import deliver_with_progress
from newsletter.db import unit_of_work
from newsletter.db.models import Campaign, CampaignStatus, Variant
from newsletter.errors import CampaignError
from newsletter.preview import preview_campaign
from newsletter.screenshot import find_chromium

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
SegmentName = Annotated[
    str | None, typer.Option("--segment", help="Only the list's members in this segment.")
]


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
    segment: str | None,
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
        segment=segment,
    )


@alert_app.command("preview")
def preview(
    ctx: typer.Context,
    item: Item = None,
    title: Title = None,
    body_file: BodyFile = None,
    url: Url = None,
    list_slug: ListSlug = None,
    segment: SegmentName = None,
    out: Annotated[Path, typer.Option(help="Folder to write the files to.")] = Path("preview"),
    screenshot: ScreenshotOption = False,
    chromium: ChromiumOption = None,
) -> None:
    """Write the alert as .html, .txt and .eml files per language; sends nothing."""
    state: State = ctx.obj
    browser = find_chromium(chromium) if screenshot else None
    session = state.factory()()
    try:
        campaign, _ = _assemble(state, session, item, title, body_file, url, list_slug, segment)
        report = preview_campaign(
            session,
            campaign,
            settings=state.settings,
            out_dir=out,
            stem="alert",
            now=state.clock.now(),
            chromium=browser,
        )
        n = audience_size(session, campaign.list_id, campaign.segment_id)
        slug = campaign.mailing_list.slug
    finally:
        session.rollback()
        session.close()
    console.print(f"alert for '{slug}' would reach {n} people; wrote:")
    print_preview(report)


@alert_app.command("send")
def send(
    ctx: typer.Context,
    item: Item = None,
    title: Title = None,
    body_file: BodyFile = None,
    url: Url = None,
    list_slug: ListSlug = None,
    segment: SegmentName = None,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    queue_only: Annotated[
        bool,
        typer.Option("--queue-only", help="Queue only; leave the sending to `newsletter send`."),
    ] = False,
    force: ForceOption = False,
    no_archive: Annotated[
        bool,
        typer.Option(
            "--no-archive",
            help="Keep it out of the public archive and feed (no web copy, no browser link).",
        ),
    ] = False,
) -> None:
    """Send an urgent alert now; the same alert asked for twice is sent once."""
    state: State = ctx.obj
    if not yes and not sys.stdin.isatty():  # a script or a pipe: nobody to ask
        raise CampaignError(
            "not sent: there is no terminal to confirm on; add --yes to send "
            "(see it first with `newsletter alert preview`)"
        )
    session = state.factory()()
    try:
        campaign, created = _assemble(
            state, session, item, title, body_file, url, list_slug, segment
        )
        if not created and campaign.status in (CampaignStatus.FINISHED, CampaignStatus.CANCELLED):
            console.print(
                f"this alert was already sent as campaign {campaign.id} "
                f"({campaign.status}); nothing to do"
            )
            return
        if not created and is_held_for_approval(session, campaign):
            raise CampaignError(
                f"campaign {campaign.id} is this alert, held for approval: send it with "
                f"`newsletter alert approve {campaign.id}` (see it first with `alert preview`)"
            )
        if no_archive:  # before it is rendered: the emails then carry no "Open in a browser"
            campaign.archived = False

        def confirm() -> None:
            n = audience_size(session, campaign.list_id, campaign.segment_id)
            show_summary(session, campaign, n, state.settings.render.default_language)
            if not yes:
                typer.confirm(
                    f"Send this alert to {n} people on '{campaign.mailing_list.slug}'?",
                    abort=True,
                )

        queued = launch(state, session, campaign, force=force, confirm=confirm)
        session.commit()
        campaign_id = campaign.id
    finally:
        session.rollback()
        session.close()
    again = "" if created else " (resuming the existing campaign)"
    console.print(f"campaign {campaign_id}: alert queued for {queued} people{again}")
    if not queue_only:
        deliver_with_progress(state, campaign_id=campaign_id)


def show_summary(session: Session, campaign: Campaign, recipients: int, lang: str) -> None:
    """What staff are about to send: subject, the first lines of the text, how many people."""
    variant = session.scalar(
        select(Variant).where(Variant.campaign_id == campaign.id, Variant.lang == lang)
    )
    if variant is not None:
        console.print(f"subject: {one_line(variant.subject)}")
        lines = [line for line in variant.text.splitlines() if line.strip()][:8]
        console.print("\n".join(f"  | {one_line(line)}" for line in lines))
    console.print(f"recipients: {recipients} on '{campaign.mailing_list.slug}'")


@alert_app.command("approve")
def approve(
    ctx: typer.Context,
    campaign_id: Annotated[int, typer.Argument(help="The held alert's campaign id.")],
    force: ForceOption = False,
    queue_only: Annotated[
        bool,
        typer.Option("--queue-only", help="Queue only; leave the sending to `newsletter send`."),
    ] = False,
) -> None:
    """Approve an alert held for a person (alerts.mode = "approve") and send it."""
    state: State = ctx.obj
    with unit_of_work(state.factory()) as session:
        try:
            queued = approve_alert(
                session=session,
                campaign_id=campaign_id,
                settings=state.settings,
                now=state.clock.now(),
                actor=state.actor,
                force=force,
            )
        except CheckError as e:
            print_problems(e.problems)
            raise
    console.print(f"campaign {campaign_id}: approved by {state.actor}, queued for {queued} people")
    if not queue_only:
        deliver_with_progress(state, campaign_id=campaign_id)
