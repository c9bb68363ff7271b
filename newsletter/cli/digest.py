"""`newsletter digest preview|send`: the weekly digest of new items."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from sqlalchemy.orm import Session

from newsletter.assemble import assemble_digest, last_digest
from newsletter.audience import audience_size
from newsletter.cli import State, app, console
from newsletter.cli.check import (
    ChromiumOption,
    ForceOption,
    ScreenshotOption,
    guarded,
    launch,
    print_preview,
)
from newsletter.cli.progress import deliver_with_progress
from newsletter.db.models import Campaign
from newsletter.preview import preview_campaign
from newsletter.screenshot import find_chromium

digest_app = typer.Typer(help="The weekly digest of new portal items.", no_args_is_help=True)
app.add_typer(digest_app, name="digest")

ListOption = Annotated[
    str | None, typer.Option("--list", help="List slug (default: [digest] list).")
]


@digest_app.command("preview")
def preview(
    ctx: typer.Context,
    list_slug: ListOption = None,
    lang: Annotated[str | None, typer.Option(help="Only this language (en, be, ru).")] = None,
    out: Annotated[Path, typer.Option(help="Folder to write the files to.")] = Path("preview"),
    last: Annotated[
        bool, typer.Option("--last", help="The digest that went out last, not the next one.")
    ] = False,
    screenshot: ScreenshotOption = False,
    chromium: ChromiumOption = None,
) -> None:
    """Write the next digest (or the last one sent) as .html, .txt and .eml per language."""
    state: State = ctx.obj
    slug = list_slug or state.settings.digest.list
    browser = find_chromium(chromium) if screenshot else None
    session = state.factory()()
    try:  # assemble inside a transaction that is rolled back: a preview changes nothing
        campaign = _to_preview(state, session, slug, last=last)
        if campaign is None:
            console.print(_nothing_to_preview(session, slug, last=last))
            return
        report = preview_campaign(
            session,
            campaign,
            settings=state.settings,
            out_dir=out,
            stem="digest",
            now=campaign.started_at or state.clock.now(),
            langs=None if lang is None else {lang},
            chromium=browser,
        )
        what = _describe(campaign) if last else "digest"
        n_items = len(campaign.items)
    finally:
        session.rollback()
        session.close()
    console.print(f"{what} of {n_items} items for '{slug}'; wrote:")
    print_preview(report)


def _to_preview(state: State, session: Session, slug: str, *, last: bool) -> Campaign | None:
    if last:
        return last_digest(session=session, list_slug=slug)
    return assemble_digest(
        session=session,
        list_slug=slug,
        now=state.clock.now(),
        actor=state.actor,
        settings=state.settings,
    )


def _nothing_to_preview(session: Session, slug: str, *, last: bool) -> str:
    if last:
        return f"no digest of '{slug}' has gone out yet: nothing to preview"
    message = f"nothing new since the last digest of '{slug}': nothing to preview"
    if last_digest(session=session, list_slug=slug) is not None:
        message += "; `digest preview --last` shows the digest that went out"
    return message


def _describe(campaign: Campaign) -> str:
    sent = f"{campaign.started_at:%Y-%m-%d %H:%M} UTC" if campaign.started_at else "?"
    return f"last digest (campaign {campaign.id}, sent {sent})"


@digest_app.command("send")
def send(
    ctx: typer.Context,
    list_slug: ListOption = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Say what would be sent; change nothing.")
    ] = False,
    queue_only: Annotated[
        bool,
        typer.Option(
            "--queue-only", help="Queue the deliveries and leave the sending to `newsletter send`."
        ),
    ] = False,
    force: ForceOption = False,
) -> None:
    """Assemble the digest of new items, check it, queue it for the list and deliver it."""
    state: State = ctx.obj
    slug = list_slug or state.settings.digest.list
    session = state.factory()()
    try:
        campaign = assemble_digest(
            session=session,
            list_slug=slug,
            now=state.clock.now(),
            actor=state.actor,
            settings=state.settings,
        )
        if campaign is None:
            console.print(f"nothing new since the last digest of '{slug}': no digest sent")
            return
        # A refused digest rolls back with its assembly: the next run finds the same items.
        if dry_run:
            guarded(state, session, campaign, force=force)
            n = audience_size(session, campaign.list_id)
            console.print(
                f"would send a digest of {len(campaign.items)} items to {n} people "
                f"on '{slug}' (dry run: nothing changed)"
            )
            session.rollback()
            return
        queued = launch(state, session, campaign, force=force)
        session.commit()
        campaign_id, n_items = campaign.id, len(campaign.items)
    finally:
        session.rollback()
        session.close()
    console.print(
        f"campaign {campaign_id}: digest of {n_items} items queued for {queued} people on '{slug}'"
    )
    if not queue_only:
        deliver_with_progress(state, campaign_id=campaign_id)
