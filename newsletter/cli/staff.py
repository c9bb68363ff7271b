"""`newsletter staff ...`: console accounts, their roles, training mode and sessions."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from newsletter.cli import State, app, console, print_json
from newsletter.db import unit_of_work
from newsletter.errors import StaffError
from newsletter.staff import (
    ROLES,
    StaffView,
    add_staff,
    disable_staff,
    find_staff,
    list_staff,
    reset_staff,
    set_role,
    set_training,
)
from newsletter.staff_sessions import revoke_sessions

staff_app = typer.Typer(help="Manage staff accounts for the console.", no_args_is_help=True)
sessions_app = typer.Typer(help="Console sessions of staff accounts.", no_args_is_help=True)
app.add_typer(staff_app, name="staff")
staff_app.add_typer(sessions_app, name="sessions")

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
EmailArg = Annotated[str, typer.Argument(help="The staff member's email address.")]
ROLE_HELP = f"One of {', '.join(ROLES)}."


def _say_link(state: State, url: str, as_json: bool) -> None:
    if as_json:
        print_json({"enrol_url": url})
        return
    hours = state.settings.console.enrol_hours
    console.print(f"enrolment link (one use, expires in {hours} hours): {url}")


def _row(view: StaffView) -> dict[str, object]:
    return {
        "email": view.email,
        "name": view.name,
        "role": view.role,
        "enrolled": view.enrolled,
        "disabled": view.disabled,
        "training": view.training,
    }


@staff_app.command("add")
def staff_add(
    ctx: typer.Context,
    email: EmailArg,
    role: Annotated[str, typer.Option(help=ROLE_HELP)],
    name: Annotated[str, typer.Option(help="The name shown in the console.")] = "",
    as_json: JsonOption = False,
) -> None:
    """Add a staff account and print its one-time enrolment link."""
    state: State = ctx.obj
    with unit_of_work(state.factory()) as session:
        url = add_staff(
            session,
            email=email,
            role=role,
            name=name,
            now=state.clock.now(),
            actor=state.actor,
            settings=state.settings,
        )
    _say_link(state, url, as_json)


@staff_app.command("list")
def staff_list(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Show every staff account: role, enrolled, disabled, training (no secrets)."""
    state: State = ctx.obj
    with unit_of_work(state.factory()) as session:
        rows = [_row(v) for v in list_staff(session)]
    if as_json:
        print_json(rows)
        return
    table = Table("email", "name", "role", "enrolled", "disabled", "training")
    for r in rows:
        table.add_row(
            *(("yes" if v else "no") if isinstance(v, bool) else str(v) for v in r.values())
        )
    console.print(table)


@staff_app.command("disable")
def staff_disable(ctx: typer.Context, email: EmailArg) -> None:
    """Disable an account: its sessions end at once and it can no longer sign in."""
    state: State = ctx.obj
    with unit_of_work(state.factory()) as session:
        view = disable_staff(session, email=email, now=state.clock.now(), actor=state.actor)
    console.print(f"{view.email} disabled; its sessions have ended")


@staff_app.command("reset")
def staff_reset(ctx: typer.Context, email: EmailArg, as_json: JsonOption = False) -> None:
    """Clear an account's password, second factor and sessions; print a new enrolment link."""
    state: State = ctx.obj
    with unit_of_work(state.factory()) as session:
        url = reset_staff(
            session, email=email, now=state.clock.now(), actor=state.actor, settings=state.settings
        )
    _say_link(state, url, as_json)


@staff_app.command("role")
def staff_role(
    ctx: typer.Context, email: EmailArg, role: Annotated[str, typer.Argument(help=ROLE_HELP)]
) -> None:
    """Change an account's role."""
    state: State = ctx.obj
    with unit_of_work(state.factory()) as session:
        view = set_role(session, email=email, role=role, now=state.clock.now(), actor=state.actor)
    console.print(f"{view.email} is now {view.role}")


@staff_app.command("training")
def staff_training(
    ctx: typer.Context,
    email: EmailArg,
    on: Annotated[
        bool, typer.Option("--on/--off", help="Training: alerts go only to staff addresses.")
    ],
) -> None:
    """Turn training mode on or off for one account."""
    state: State = ctx.obj
    with unit_of_work(state.factory()) as session:
        view = set_training(
            session, email=email, training=on, now=state.clock.now(), actor=state.actor
        )
    console.print(f"training {'on' if view.training else 'off'} for {view.email}")


@sessions_app.command("revoke")
def sessions_revoke(
    ctx: typer.Context,
    email: Annotated[
        str | None, typer.Argument(help="Whose sessions to end (or --all).", show_default=False)
    ] = None,
    everyone: Annotated[bool, typer.Option("--all", help="End every staff session.")] = False,
) -> None:
    """End the console sessions of one account, or of everyone with --all."""
    state: State = ctx.obj
    if (email is None) == (not everyone):
        raise StaffError("give either an email address or --all")
    with unit_of_work(state.factory()) as session:
        staff_id = None
        if email is not None:
            staff = find_staff(session, email)
            if staff is None:
                raise StaffError(f"no staff account for {email}: see `newsletter staff list`")
            staff_id = staff.id
        ended = revoke_sessions(
            session, staff_id=staff_id, now=state.clock.now(), actor=state.actor
        )
    console.print(f"{ended} session{'s' if ended != 1 else ''} ended")
