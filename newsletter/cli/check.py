"""`newsletter check CAMPAIGN_ID [--force]`: the check that runs before every send, on demand."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated

import typer
from sqlalchemy.orm import Session

from newsletter.campaigns import get_campaign
from newsletter.check import CheckError, Problem, check_campaign, require_clean
from newsletter.cli import State, app, console, say
from newsletter.db.models import Campaign
from newsletter.enqueue import launch_campaign
from newsletter.preview import PreviewReport

ForceOption = Annotated[
    bool,
    typer.Option("--force", help="Send even if the check finds problems (recorded in the events)."),
]


@app.command("check")
def check(
    ctx: typer.Context,
    campaign_id: Annotated[int, typer.Argument(help="The campaign to check.")],
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Accept the problems found: record an override so the campaign may be sent.",
        ),
    ] = False,
) -> None:
    """Check a campaign's email before it is sent: size, unsubscribe, subject, safety, links."""
    state: State = ctx.obj
    session = state.factory()()
    try:
        campaign = get_campaign(session, campaign_id)
        if force:
            problems = guarded(state, session, campaign, force=True)
            session.commit()
        else:
            problems = check_campaign(session, campaign, state.settings)
            if problems:
                print_problems(problems)
                raise CheckError(campaign.id, problems)
    finally:
        session.rollback()
        session.close()
    if problems:
        console.print(f"campaign {campaign_id}: {len(problems)} problem(s) overridden (--force)")
    else:
        console.print(f"campaign {campaign_id} passes the check")


def guarded(state: State, session: Session, campaign: Campaign, *, force: bool) -> list[Problem]:
    """Run the pre-send check for a CLI edge: print every problem, stop unless forced."""
    try:
        problems = require_clean(
            session, campaign, state.settings, force=force, actor=state.actor, now=state.clock.now()
        )
    except CheckError as e:
        print_problems(e.problems)
        raise
    if problems:
        print_problems(problems, overridden=True)
    return problems


def launch(
    state: State,
    session: Session,
    campaign: Campaign,
    *,
    force: bool,
    on_checked: Callable[[Sequence[Problem]], None] | None = None,
) -> int:
    """Launch a campaign from a CLI edge through the gate: print every problem, stop unless forced.

    on_checked runs once the check lets the campaign through, before anything is queued, with
    the problems overridden (without it, they are printed).
    """

    def printed(overridden: Sequence[Problem]) -> None:
        if overridden:
            print_problems(overridden, overridden=True)

    try:
        return launch_campaign(
            session=session,
            campaign=campaign,
            settings=state.settings,
            now=state.clock.now(),
            actor=state.actor,
            force=force,
            on_checked=on_checked or printed,
        )
    except CheckError as e:
        print_problems(e.problems)
        raise


def print_problems(problems: Sequence[Problem], *, overridden: bool = False) -> None:
    """One line per problem on stderr."""
    label, style = ("overridden:", "yellow") if overridden else ("refused:", "red")
    for problem in problems:
        say(label, style, problem)


ScreenshotOption = Annotated[
    bool,
    typer.Option(
        "--screenshot",
        help="Also write PNGs of the HTML at 375 and 800 px, light and dark (needs chromium).",
    ),
]
ChromiumOption = Annotated[
    str | None,
    typer.Option("--chromium", help="The Chromium executable (default: chromium on PATH)."),
]


def print_preview(report: PreviewReport) -> None:
    """The files a preview wrote, any page that overflows a phone, and the check's verdict."""
    for path in [*report.files, *(shot.path for shot in report.screenshots)]:
        console.print(f"  {path}")
    for shot in report.screenshots:
        if shot.overflows:
            say(
                "warning:",
                "yellow",
                f"{shot.path.name} is {shot.page_width} px wide in a {shot.width} px window: "
                "readers would scroll sideways",
            )
    if report.problems:
        print_problems(report.problems)
        console.print(f"the check would refuse this email ({len(report.problems)} problem(s))")
    else:
        console.print("the check finds no problem")
