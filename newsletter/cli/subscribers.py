"""`newsletter subscribers ...`: people, one by one and from CSV."""

from __future__ import annotations

import asyncio
import csv
import json
import sys
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Annotated, Any, TextIO

import typer
from rich.table import Table

from newsletter.audience import list_people
from newsletter.cli import State, app, console, err_console, print_json
from newsletter.db import unit_of_work
from newsletter.errors import AudienceError
from newsletter.importer import import_rows
from newsletter.lists import get_list
from newsletter.subscriber_csv import (
    RawRow,
    count_lines,
    export_columns,
    export_rows,
    neutralise_cell,
    read_csv,
    restore_cell,
    write_csv,
)
from newsletter.subscriptions import (
    find_subscriber,
    forget,
    subscribe,
    subscriber_details,
    unsubscribe,
)

subscribers_app = typer.Typer(help="Manage subscribers.", no_args_is_help=True)
app.add_typer(subscribers_app, name="subscribers")

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
EmailArg = Annotated[str, typer.Argument(help="The subscriber's email address.")]


def send_owed_confirmations(state: State) -> tuple[int, int]:
    """Send the double opt-in emails still owed; returns (sent, not sent yet)."""
    from newsletter.notices import send_confirmations
    from newsletter.smtp import open_pool

    async def run() -> tuple[int, int]:
        factory = state.factory()
        async with open_pool(state.settings, factory, state.clock) as pool:
            return await send_confirmations(
                factory=factory, settings=state.settings, transport=pool, clock=state.clock
            )

    return asyncio.run(run())


def say_confirmations(state: State) -> None:
    """Send owed confirmation emails and say how it went, in one line."""
    sent, unsent = send_owed_confirmations(state)
    if sent or unsent:
        err_console.print(
            f"confirmation emails sent: {sent}"
            + (
                f"; {unsent} not sent (SMTP refused or unreachable), retried next time"
                if unsent
                else ""
            )
        )


@subscribers_app.command("add")
def add(
    ctx: typer.Context,
    email: EmailArg,
    lists: Annotated[list[str], typer.Option("--list", help="A list to join (repeatable).")],
    name: Annotated[str, typer.Option(help="Their name.")] = "",
    language: Annotated[str, typer.Option(help="en, be or ru.")] = "",
    country: Annotated[str, typer.Option(help="Two-letter country code.")] = "",
    tags: Annotated[list[str] | None, typer.Option("--tag", help="A tag (repeatable).")] = None,
    confirmed: Annotated[
        bool, typer.Option("--confirmed", help="They already confirmed (no opt-in email).")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Add a subscriber; double opt-in lists send a confirmation email first."""
    state: State = ctx.obj
    secret = state.settings.security.require_secret()
    with unit_of_work(state.factory()) as session:
        result = subscribe(
            session=session,
            email=email,
            lists=[get_list(session, slug) for slug in lists],
            secret=secret,
            now=state.clock.now(),
            actor=state.actor,
            confirmed=confirmed,
            name=name,
            language=language.lower(),
            country=country,
            tags=tags or (),
        )
    if as_json:
        print_json({"id": result.subscriber_id, "active": result.active, "pending": result.pending})
    else:
        console.print(
            f"subscriber {result.subscriber_id}: active on {', '.join(result.active) or 'no list'}"
            + (f"; awaiting confirmation on {', '.join(result.pending)}" if result.pending else "")
        )
    if result.pending:
        say_confirmations(state)


@contextmanager
def rejects_writer(path: Path, source: Path) -> Iterator[Any]:
    """A sink for rejected rows: line, reason and the row's own columns, opened on first use.

    Cells are written as import would read them, neutralised against spreadsheet formulas, with
    control characters and undecodable bytes shown as U+FFFD.
    """
    header = _header(source)
    state: dict[str, Any] = {"n": 0}
    handle: TextIO | None = None
    try:

        def write(line: int, reason: str, raw: RawRow | None) -> None:
            nonlocal handle
            if handle is None:
                handle = path.open("w", encoding="utf-8", newline="")
                state["writer"] = csv.writer(handle)
                state["writer"].writerow([_reject_cell(c) for c in ["line", "reason", *header]])
            cells = [str(line), reason, *((raw or {}).get(h) or "" for h in header)]
            state["writer"].writerow([_reject_cell(c) for c in cells])
            state["n"] += 1

        yield write
    finally:
        if handle is not None:
            handle.close()


def _header(source: Path) -> list[str]:
    try:
        with source.open(encoding="utf-8-sig", errors="replace", newline="") as handle:
            first = next(csv.reader(handle), [])
    except (OSError, csv.Error):
        return []
    names = [restore_cell(h.strip()).lower() for h in first]
    return [h for h in names if h not in ("line", "reason")]


def _reject_cell(value: str) -> str:
    """A cell of the rejects file: readable, safe to open, and read back as it was read."""
    shown = "".join(
        "\ufffd" if ch not in "\t\n\r" and unicodedata.category(ch) in ("Cc", "Cs") else ch
        for ch in value
    )
    return neutralise_cell(restore_cell(shown))


@subscribers_app.command("import")
def import_(
    ctx: typer.Context,
    file: Annotated[
        Path,
        typer.Argument(
            help="CSV with an 'email' column; also name, language, "
            "lists, tags, country and any custom columns."
        ),
    ],
    list_slug: Annotated[
        str | None, typer.Option("--list", help="List for rows without a 'lists' column.")
    ] = None,
    confirmed: Annotated[
        bool, typer.Option("--confirmed", help="The people already confirmed (no opt-in mail).")
    ] = False,
    rejects: Annotated[
        Path | None, typer.Option(help="Where to write rejected rows (default: FILE.rejects.csv).")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Import subscribers from CSV; bad rows go to a rejects file, good rows go in."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    state: State = ctx.obj
    secret = state.settings.security.require_secret()
    total = max(count_lines(file) - 1, 0)
    rejects_path = rejects or file.with_suffix(".rejects.csv")
    progress = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    )
    with progress, rejects_writer(rejects_path, file) as on_reject:
        task = progress.add_task("importing", total=total)
        with unit_of_work(state.factory()) as session:
            report = import_rows(
                session=session,
                rows=read_csv(file),
                default_list=list_slug,
                confirmed=confirmed,
                secret=secret,
                now=state.clock.now(),
                actor=state.actor,
                source=file.name,
                on_reject=on_reject,
                on_progress=lambda line: progress.update(task, completed=min(line - 1, total)),
            )
    counts = report.counts()
    if as_json:
        print_json({**counts, "rejects_file": str(rejects_path) if report.rejected else None})
    else:
        console.print(", ".join(f"{k.replace('_', ' ')} {v}" for k, v in counts.items()))
    if report.rejected:
        err_console.print(f"{report.rejected} rows rejected: see {rejects_path}")
    if report.kept_out:
        err_console.print(
            f"{report.kept_out} people kept out: they unsubscribed, bounced or were forgotten"
        )
    if report.pending:
        say_confirmations(state)


@subscribers_app.command("export")
def export(
    ctx: typer.Context,
    out: Annotated[Path | None, typer.Option(help="File to write (default: stdout).")] = None,
    list_slug: Annotated[str | None, typer.Option("--list", help="Only this list.")] = None,
) -> None:
    """Write active subscribers as CSV, with the columns `import` reads."""
    state: State = ctx.obj
    with unit_of_work(state.factory()) as session:
        list_id = get_list(session, list_slug).id if list_slug else None
        columns = export_columns(session, list_id=list_id)
        rows = export_rows(session, list_id=list_id)
        if out is None:
            n = write_csv(rows, columns, sys.stdout)
        else:
            with out.open("w", encoding="utf-8", newline="") as handle:
                n = write_csv(rows, columns, handle)
    if out is not None:
        err_console.print(f"exported {n} subscribers to {out}")


@subscribers_app.command("show")
def show(ctx: typer.Context, email: EmailArg, as_json: JsonOption = False) -> None:
    """Show one subscriber: details, lists and how many emails they were sent."""
    state: State = ctx.obj
    with unit_of_work(state.factory()) as session:
        info = subscriber_details(session, email)
    if as_json:
        print_json(info)
        return
    table = Table("field", "value", show_header=False)
    for key, value in info.items():
        table.add_row(
            key,
            json.dumps(value, ensure_ascii=False)
            if isinstance(value, (dict, list))
            else str(value),
        )
    console.print(table)


@subscribers_app.command("list")
def list_(
    ctx: typer.Context,
    list_slug: Annotated[str | None, typer.Option("--list", help="Only this list.")] = None,
    segment: Annotated[str | None, typer.Option(help="Only people in this segment.")] = None,
    status: Annotated[
        str | None, typer.Option(help="Only this status: active, unsubscribed, bounced.")
    ] = None,
    limit: Annotated[int, typer.Option(help="At most this many rows.")] = 50,
    as_json: JsonOption = False,
) -> None:
    """List subscribers (address, name, language, status); with --list or --segment, an audience."""
    state: State = ctx.obj
    with unit_of_work(state.factory()) as session:
        people = list_people(
            session, list_slug=list_slug, segment=segment, status=status, limit=limit
        )
    rows = [(p.email, p.name, p.language, p.status) for p in people]
    if as_json:
        keys = ("email", "name", "language", "status")
        print_json([dict(zip(keys, r, strict=True)) for r in rows])
        return
    table = Table("email", "name", "language", "status")
    for r in rows:
        table.add_row(*r)
    console.print(table)


@subscribers_app.command("unsubscribe")
def unsubscribe_(
    ctx: typer.Context,
    email: EmailArg,
    list_slug: Annotated[
        str | None, typer.Option("--list", help="Only this list (default: every list).")
    ] = None,
    notify: Annotated[
        bool, typer.Option("--notify", help="Send them a goodbye email (only when leaving all).")
    ] = False,
) -> None:
    """Unsubscribe someone from one list or from everything; the sender honours it at once."""
    state: State = ctx.obj
    with unit_of_work(state.factory()) as session:
        sub = find_subscriber(session, email)
        list_id = get_list(session, list_slug).id if list_slug else None
        changed = unsubscribe(
            session=session,
            subscriber_id=sub.id,
            list_id=list_id,
            now=state.clock.now(),
            actor=state.actor,
        )
        address, lang = sub.email, sub.language
    what = f"'{list_slug}'" if list_slug else "every list"
    console.print(f"unsubscribed from {what}" if changed else f"already off {what}; nothing to do")
    if notify and list_id is None and changed:
        _goodbye(state, address, lang, "unsubscribed")


@subscribers_app.command("forget")
def forget_(
    ctx: typer.Context,
    email: EmailArg,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    notify: Annotated[
        bool, typer.Option("--notify", help="Tell them by email that their data was erased.")
    ] = False,
) -> None:
    """Erase a person's data; only a keyed hash stays, so they are never mailed again."""
    state: State = ctx.obj
    secret = state.settings.security.require_secret()
    if not yes and sys.stdin.isatty():
        typer.confirm("Erase this person's data for good?", abort=True)
    lang = "en"
    with unit_of_work(state.factory()) as session:
        with suppress(AudienceError):
            lang = find_subscriber(session, email).language
        found = forget(
            session=session, email=email, secret=secret, now=state.clock.now(), actor=state.actor
        )
    console.print(
        "forgotten: their data is erased; only a keyed hash of the address is kept"
        if found
        else "no such subscriber; the address's keyed hash is kept so it is never mailed"
    )
    if notify and found:
        _goodbye(state, email, lang, "forgotten")


def _goodbye(state: State, email: str, lang: str, reason: str) -> None:
    from newsletter.notices import send_goodbye
    from newsletter.smtp import open_pool

    async def run() -> bool:
        async with open_pool(state.settings, state.factory(), state.clock) as pool:
            return await send_goodbye(
                email=email,
                lang=lang,
                reason=reason,
                settings=state.settings,
                transport=pool,
                now=state.clock.now(),
            )

    sent = asyncio.run(run())
    err_console.print("goodbye email sent" if sent else "goodbye email NOT sent (SMTP refused it)")
