"""`newsletter subscribers ...`: people, one by one and from CSV."""

from __future__ import annotations

import asyncio
import csv
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
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
from newsletter.openpgp import MAX_KEY_BYTES
from newsletter.readers import key_view, remove_key, set_key
from newsletter.subscriber_csv import (
    RawRow,
    count_lines,
    export_columns,
    export_rows,
    read_csv,
    read_header,
    restore_cell,
    shown_cell,
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
    discreet: Annotated[
        str | None,
        typer.Option(
            help="off, envelope (neutral sender and subject) or pointer (also only a neutral "
            "note and a link in the body); default: theirs, or off for someone new."
        ),
    ] = None,
    on_key_problem: Annotated[
        str | None,
        typer.Option(
            help="withhold or plain: what they get when their key becomes unusable; "
            "default: theirs, or withhold for someone new."
        ),
    ] = None,
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
            discreet=discreet,
            on_key_problem=on_key_problem,
        )
    if as_json:
        print_json({"id": result.subscriber_id, "active": result.active, "pending": result.pending})
    else:
        console.print(
            f"subscriber {result.subscriber_id}: active on {', '.join(result.active) or 'no list'}"
            + (f"; awaiting confirmation on {', '.join(result.pending)}" if result.pending else "")
        )
    if discreet and discreet.strip().lower() != "off":
        warn_unconfigured_discreet(state)
    if result.pending:
        say_confirmations(state)


def warn_unconfigured_discreet(state: State) -> None:
    """Say so when discreet mail is chosen while its neutral host is not set."""
    if not state.settings.discreet.configured:
        err_console.print(
            "warning: [discreet] base_url is not set: a discreet reader's links (List-Unsubscribe "
            "too) name [web] base_url's host until it is"
        )


def _rejected_cells(raw: RawRow | None, header: list[str]) -> list[str]:
    """A rejected row's cells for the rejects file, the openpgp_key cell blanked."""
    return ["" if h.strip().lower() == "openpgp_key" else (raw or {}).get(h) or "" for h in header]


@contextmanager
def private_file(path: Path) -> Iterator[TextIO]:
    """A text file only its owner may read, put in place whole when the block ends well.

    Exports and rejects hold people's addresses: written to a new file made with mode 0600 in
    the same folder, then renamed over `path`, so no other account can read it, no link or file
    someone else made there is written through, and an interruption leaves no half file.
    """
    try:
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise AudienceError(f"{path}: cannot write: {e.strerror or type(e).__name__}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            yield handle
        os.replace(temporary, path)
    except OSError as e:
        raise AudienceError(f"{path}: cannot write: {e.strerror or type(e).__name__}") from None
    finally:
        with suppress(FileNotFoundError):
            os.unlink(temporary)


@contextmanager
def rejects_writer(path: Path, source: Path) -> Iterator[Any]:
    """A sink for rejected rows: line, reason and the row's own columns, opened on first use.

    Cells are written as import would read them, neutralised against spreadsheet formulas, with
    control characters and undecodable bytes shown as U+FFFD. The file (see private_file) is
    put in place only when the import went through: one stopped imported nothing.
    """
    header = [h for h in read_header(source) if h not in ("line", "reason")]
    with ExitStack() as files:
        writer: Any = None

        def write(line: int, reason: str, raw: RawRow | None) -> None:
            nonlocal writer
            if writer is None:
                writer = csv.writer(files.enter_context(private_file(path)))
                writer.writerow([_reject_cell(c) for c in ["line", "reason", *header]])
            # A key cell is left out: it may hold a secret key pasted by mistake.
            cells = [str(line), reason, *_rejected_cells(raw, header)]
            writer.writerow([_reject_cell(c) for c in cells])

        yield write


def _reject_cell(value: str) -> str:
    """A cell of the rejects file: readable, safe to open, and read back as it was read."""
    return shown_cell(restore_cell(value))


@subscribers_app.command("import")
def import_(
    ctx: typer.Context,
    file: Annotated[
        Path,
        typer.Argument(
            help="CSV with an 'email' column; also name, language, lists, tags, "
            "country, discreet, on_key_problem, openpgp_key (an armored public key: active with "
            "--confirmed, else pending until its proof) and any custom columns."
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
    if rejects_path.resolve() == file.resolve():  # it would replace the file being imported
        raise AudienceError(f"{rejects_path}: the rejects file cannot be the file imported")
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
    if report.pending or (report.keys and not confirmed):  # keys wait for their proof mail
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
            with private_file(out) as handle:
                n = write_csv(rows, columns, handle)
    if out is not None:
        err_console.print(f"exported {n} subscribers to {out}")


@subscribers_app.command("show")
def show(ctx: typer.Context, email: EmailArg, as_json: JsonOption = False) -> None:
    """Show one subscriber: details, lists, emails sent, reading choices and key."""
    state: State = ctx.obj
    with unit_of_work(state.factory()) as session:
        info = subscriber_details(session, email)
    if as_json:
        print_json(info)
        return
    table = Table("field", "value", show_header=False)
    for key, value in info.items():
        if key == "key":
            for label, text in key_rows(value):
                table.add_row(label, text)
            continue
        table.add_row(
            key,
            json.dumps(value, ensure_ascii=False)
            if isinstance(value, (dict, list))
            else str(value),
        )
    console.print(table)


PENDING_NOTE = "waiting for the reader to follow the link sent encrypted to it"


def key_rows(key: dict[str, Any]) -> list[tuple[str, str]]:
    """The key state of subscriber_details as (label, text) rows for a person to read."""
    rows: list[tuple[str, str]] = []
    if key["active_fingerprint"]:
        rows.append(("key", f"active {key['active_fingerprint']}, {_expiry(key)}"))
    elif key["removed_by_admin"]:
        rows.append(("key", "removed by an admin (their on_key_problem applies)"))
    elif key.get("revoked_fingerprint"):
        rows.append(("key", f"revoked {key['revoked_fingerprint']} (their on_key_problem applies)"))
    else:
        rows.append(("key", "none"))
    if key["pending_fingerprint"]:
        rows.append(("pending key", f"{key['pending_fingerprint']}: {PENDING_NOTE}"))
    return rows


def _expiry(key: dict[str, Any]) -> str:
    expires = key["active_expires_at"]
    return f"expires {expires}" if expires else "does not expire"


def read_key_file(name: str) -> bytes:
    """A key file's bytes (stdin for -), never reading more than one byte past MAX_KEY_BYTES."""
    if name == "-":
        data = sys.stdin.buffer.read(MAX_KEY_BYTES + 1)
    else:
        try:
            with open(name, "rb") as handle:
                data = handle.read(MAX_KEY_BYTES + 1)
        except OSError as e:
            raise AudienceError(f"{name}: cannot read: {e.strerror or type(e).__name__}") from None
    where = "stdin" if name == "-" else name
    if len(data) > MAX_KEY_BYTES:
        raise AudienceError(
            f"{where}: too large for a public key (more than {MAX_KEY_BYTES // 1024} KB)"
        )
    if not data.strip():
        raise AudienceError(f"{where}: empty, not a public key")
    return data


@subscribers_app.command("key")
def key_(
    ctx: typer.Context,
    email: EmailArg,
    file: Annotated[
        str | None,
        typer.Option(
            "--file",
            metavar="KEY.asc",
            help="Their OpenPGP public key (armoured or binary); - reads it from stdin.",
        ),
    ] = None,
    confirmed: Annotated[
        bool,
        typer.Option(
            "--confirmed",
            help="You verified the key another way: active at once, no encrypted confirmation.",
        ),
    ] = False,
    remove: Annotated[
        bool,
        typer.Option("--remove", help="Take their key off; their on_key_problem then applies."),
    ] = False,
) -> None:
    """Set a reader's OpenPGP key (pending until they follow the link sent encrypted to it).

    With --remove, take it off instead.
    """
    state: State = ctx.obj
    if remove == (file is not None):
        raise AudienceError("give either --file KEY.asc or --remove")
    if remove and confirmed:
        raise AudienceError("--confirmed goes with --file, not with --remove")
    if file is None:
        _remove_key(state, email)
        return
    data = read_key_file(file)
    with unit_of_work(state.factory()) as session:
        sub_id = find_subscriber(session, email).id
        info = set_key(
            session,
            subscriber_id=sub_id,
            data=data,
            now=state.clock.now(),
            actor=state.actor,
            confirmed=confirmed,
        )
    if info.revoked:  # the revocation of their own key: learnt, never used again
        console.print(
            f"subscriber {sub_id}: key {info.fingerprint} is revoked and will not be used again; "
            "their on_key_problem applies"
        )
        return
    expiry = f"expires {info.expires_at.isoformat()}" if info.expires_at else "does not expire"
    status = "active" if confirmed else f"pending, {PENDING_NOTE}"
    console.print(f"subscriber {sub_id}: key {info.fingerprint} {status}; {expiry}")
    if not confirmed:
        say_confirmations(state)


def _remove_key(state: State, email: str) -> None:
    with unit_of_work(state.factory()) as session:
        sub_id = find_subscriber(session, email).id
        view = key_view(session, sub_id)
        # A key already removed stays on record as removed: removing it again must not erase
        # that mark, or the reader's on_key_problem would stop applying.
        removed = bool(view.active_fingerprint or view.pending_fingerprint) and remove_key(
            session, subscriber_id=sub_id, now=state.clock.now(), actor=state.actor, by_reader=False
        )
    console.print(
        f"subscriber {sub_id}: key removed; their on_key_problem applies"
        if removed
        else f"subscriber {sub_id}: no key to remove; nothing to do"
    )


@subscribers_app.command("list")
def list_(
    ctx: typer.Context,
    list_slug: Annotated[str | None, typer.Option("--list", help="Only this list.")] = None,
    segment: Annotated[str | None, typer.Option(help="Only people in this segment.")] = None,
    status: Annotated[
        str | None, typer.Option(help="Only this status: active, unsubscribed, bounced.")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many rows.")] = 50,
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
        address, lang, discreet = sub.email, sub.language, sub.discreet
    what = f"'{list_slug}'" if list_slug else "every list"
    console.print(f"unsubscribed from {what}" if changed else f"already off {what}; nothing to do")
    if notify and list_id is None and changed:
        _goodbye(state, address, lang, "unsubscribed", discreet)


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
    lang, discreet = "en", "off"
    with unit_of_work(state.factory()) as session:
        with suppress(AudienceError):
            person = find_subscriber(session, email)
            lang, discreet = person.language, person.discreet  # read before forget resets them
        found = forget(
            session=session, email=email, secret=secret, now=state.clock.now(), actor=state.actor
        )
    console.print(
        "forgotten: their data is erased; only a keyed hash of the address is kept"
        if found
        else "no such subscriber; the address's keyed hash is kept so it is never mailed"
    )
    if notify and found:
        _goodbye(state, email, lang, "forgotten", discreet)


def _goodbye(state: State, email: str, lang: str, reason: str, discreet: str) -> None:
    if discreet != "off":  # the one email their inbox must not show: nothing is sent
        err_console.print("no goodbye email: this reader chose discreet mail")
        return
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
