"""`newsletter digest preview|send`: the weekly digest of new items."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from newsletter.assemble import assemble_digest
from newsletter.campaigns import start_campaign
from newsletter.cli import State, app, console, deliver_with_progress
from newsletter.cli.check import (
    ChromiumOption,
    ForceOption,
    ScreenshotOption,
    guarded,
    print_preview,
)
from newsletter.db.queries import audience_size
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
    screenshot: ScreenshotOption = False,
    chromium: ChromiumOption = None,
) -> None:
    """Write the next digest as .html, .txt and .eml files per language; sends nothing."""
    state: State = ctx.obj
    slug = list_slug or state.settings.digest.list
    browser = find_chromium(chromium) if screenshot else None
    session = state.factory()()
    try:  # assemble inside a transaction that is rolled back: a preview changes nothing
        campaign = assemble_digest(
            session=session, list_slug=slug, now=state.clock.now(), actor=state.actor
        )
        if campaign is None:
            console.print(f"nothing new since the last digest of '{slug}': nothing to preview")
            return
        report = preview_campaign(
            session,
            campaign,
            settings=state.settings,
            out_dir=out,
            stem="digest",
            now=state.clock.now(),
            langs=None if lang is None else {lang},
            chromium=browser,
        )
        n_items = len(campaign.items)
    finally:
        session.rollback()
        session.close()
    console.print(f"digest of {n_items} items for '{slug}'; wrote:")
    print_preview(report)


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
            session=session, list_slug=slug, now=state.clock.now(), actor=state.actor
        )
        if campaign is None:
            console.print(f"nothing new since the last digest of '{slug}': no digest sent")
            return
        # A refused digest rolls back with its assembly: the next run finds the same items.
        guarded(state, session, campaign, force=force)
        if dry_run:
            n = audience_size(session, campaign.list_id)
            console.print(
                f"would send a digest of {len(campaign.items)} items to {n} people "
                f"on '{slug}' (dry run: nothing changed)"
            )
            session.rollback()
            return
        queued = start_campaign(
            session=session,
            campaign=campaign,
            settings=state.settings,
            now=state.clock.now(),
            actor=state.actor,
        )
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
