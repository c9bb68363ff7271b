"""`newsletter alert preview|send`: an urgent-action alert from an item or from staff text."""

from __future__ import annotations

import html
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from newsletter.alerts import approve_alert, is_held_for_approval
from newsletter.approvals import revision_hash
from newsletter.assemble import assemble_alert
from newsletter.audience import audience_size
from newsletter.check import CheckError, Problem, stored_variants
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

T = TypeVar("T")

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


class Asked(Exception):
    """The first pass of a sending step reached its question: what to ask, and what it shows."""

    def __init__(self, question: str, seen: str) -> None:
        super().__init__(question)
        self.question, self.seen = question, seen


@dataclass
class Confirmation:
    """A person's yes to one sending step, asked while no transaction is open.

    Asking inside the transaction would hold SQLite's write lock while the person thinks, and
    every other writer (an unsubscribe, the sender) would wait, then fail. So without --yes the
    step runs twice: the first pass goes as far as the question (the campaign made, checked and
    counted), raises Asked and is rolled back, nothing of it kept; the person is asked; the
    second pass runs for real and goes on only if what it would send is what was confirmed.
    """

    yes: bool
    confirmed: str | None = None  # what the person saw when they said yes

    @property
    def showing(self) -> bool:
        """Whether this pass prints what is about to be sent (not again after the question)."""
        return self.confirmed is None

    def ask(self, question: str, seen: str, *, what: str) -> None:
        """Stop the first pass to ask; in the second, refuse if `seen` is not what was confirmed."""
        if self.yes:
            return
        if self.confirmed is None:
            raise Asked(question, seen)
        if seen != self.confirmed:
            raise CampaignError(
                f"not sent: {what} changed while you were asked (its text, its audience or "
                "the check's findings); run the command again to see it as it is now"
            )

    def run(self, factory: sessionmaker[Session], step: Callable[[Session], T]) -> T:
        """Run the step in a transaction and commit it; without --yes, ask between two passes."""
        try:
            return _committed(factory, step)
        except Asked as asked:  # its transaction is rolled back and closed: no lock is held
            typer.confirm(asked.question, abort=True)
            self.confirmed = asked.seen
        return _committed(factory, step)


def _committed(factory: sessionmaker[Session], step: Callable[[Session], T]) -> T:
    session = factory()
    try:
        result = step(session)
        session.commit()
        return result
    finally:
        session.rollback()
        session.close()


def seen(
    session: Session,
    campaign: Campaign,
    *,
    question: str,
    recipients: int,
    overridden: Sequence[Problem],
) -> str:
    """What a person confirms: the question, the problems overridden and the email itself.

    The email as rendered for the check, hashed as an approved revision is; its web copy's
    slug is left out as its link nonce is (both drawn anew when a campaign is made again).
    """
    slug = campaign.slug or ""
    variants = [
        replace(v, html=v.html.replace(slug, ""), text=v.text.replace(slug, "")) if slug else v
        for v in stored_variants(session, campaign)
    ]
    digest = revision_hash(
        variants, list_id=campaign.list_id, segment_id=campaign.segment_id, recipients=recipients
    )
    return "\n".join([question, *(str(p) for p in overridden), digest])


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
    confirmation = Confirmation(yes=yes)

    def step(session: Session) -> tuple[int, int, bool] | None:
        campaign, created = _assemble(
            state, session, item, title, body_file, url, list_slug, segment
        )
        if not created and campaign.status in (CampaignStatus.FINISHED, CampaignStatus.CANCELLED):
            console.print(
                f"this alert was already sent as campaign {campaign.id} "
                f"({campaign.status}); nothing to do"
            )
            return None
        if not created and is_held_for_approval(session, campaign):
            raise CampaignError(
                f"campaign {campaign.id} is this alert, held for approval: send it with "
                f"`newsletter alert approve {campaign.id}` (see it first with `alert preview`)"
            )
        if no_archive:  # before it is rendered: the emails then carry no "Open in a browser"
            campaign.archived = False

        def checked(overridden: Sequence[Problem]) -> None:
            n = audience_size(session, campaign.list_id, campaign.segment_id)
            if confirmation.showing:
                print_problems(overridden, overridden=True)
                show_summary(session, campaign, n, state.settings.render.default_language)
            question = f"Send this alert to {n} people on '{campaign.mailing_list.slug}'?"
            shown = seen(session, campaign, question=question, recipients=n, overridden=overridden)
            confirmation.ask(question, shown, what="the alert")

        queued = launch(state, session, campaign, force=force, on_checked=checked)
        return campaign.id, queued, created

    done = confirmation.run(state.factory(), step)
    if done is None:
        return
    campaign_id, queued, created = done
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
