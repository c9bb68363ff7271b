"""`newsletter subscribers ...`: people, one by one and from CSV."""

from __future__ import annotations

import asyncio
import csv
import fcntl
import json
import os
import signal
import stat
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import FrameType
from typing import Annotated, Any, TextIO

import typer
from rich.table import Table
from sqlalchemy.exc import OperationalError

from newsletter.audience import list_people
from newsletter.cli import State, app, console, err_console, print_json, say, terminal_text
from newsletter.db import unit_of_work
from newsletter.errors import AudienceError
from newsletter.importer import ImportReport, import_rows
from newsletter.lists import get_list
from newsletter.openpgp import MAX_KEY_BYTES
from newsletter.readers import key_view, remove_key, set_key
from newsletter.subscriber_csv import (
    REJECTS_COLUMNS,
    RawRow,
    check_regular_file,
    count_lines,
    export_columns,
    export_rows,
    read_csv,
    read_header,
    restore_cell,
    shown_cell,
    surplus_cells,
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
    """A rejected row's cells for the rejects file, the openpgp_key cell blanked; fields past
    the header's columns follow them, so a fixed row loses nothing."""
    raw = raw or {}
    cells = ["" if h.strip().lower() == "openpgp_key" else raw.get(h) or "" for h in header]
    return cells + surplus_cells(raw)


def check_writable_path(path: Path) -> None:
    """Refuse to put a file in place of something that is not a regular file.

    A device, a pipe, a folder, or a link to one (`/dev/stdout`, `/proc/self/fd/1`): renaming a
    file over it would not write through it but replace it, as root even in /dev.
    """
    try:
        mode = path.lstat().st_mode
        if stat.S_ISLNK(mode):  # a link to a regular file is replaced as before
            mode = path.stat().st_mode
    except FileNotFoundError:  # a new file, or a link to none: nothing is replaced
        return
    except OSError as e:
        raise AudienceError(f"{path}: cannot write: {e.strerror or type(e).__name__}") from None
    if not stat.S_ISREG(mode):
        raise AudienceError(f"{path}: not a regular file (a folder, device, pipe or link to one)")


class PrivateFile:
    """A text file only its owner may read, written beside `path` and put in place whole.

    Exports and rejects hold people's addresses: written to a new file made with mode 0600 in
    the same folder, then renamed over `path`, so no other account can read it, no link or file
    someone else made there is written through, and an interruption leaves no half file. The
    temporary file stays locked (flock) while it is open, so one that a killed run (SIGKILL,
    a power cut) left behind is told from one in use, and removed by the next run.
    """

    def __init__(self, path: Path) -> None:
        check_writable_path(path)
        self.path = path
        remove_stale_temporaries(path)
        try:
            fd, temporary = tempfile.mkstemp(
                dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
            )
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            raise self.error(e) from None
        self.temporary = Path(temporary)
        self.handle = os.fdopen(fd, "w", encoding="utf-8", newline="")

    def error(self, e: OSError) -> AudienceError:
        """The one line an OSError on this file becomes."""
        return AudienceError(f"{self.path}: cannot write: {e.strerror or type(e).__name__}")

    def sync(self) -> None:
        """Write out everything, on disk (fsync) before it counts; the file stays open (locked)."""
        try:
            self.handle.flush()
            os.fsync(self.handle.fileno())
        except OSError as e:
            raise self.error(e) from None

    def put_in_place(self) -> None:
        """Rename the synced temporary file over `path`, then close it."""
        try:
            os.replace(self.temporary, self.path)
        except OSError as e:
            raise self.error(e) from None
        with suppress(OSError):
            self.handle.close()

    def discard(self) -> None:
        """Remove and close the temporary file (it was not put in place)."""
        with suppress(FileNotFoundError):
            os.unlink(self.temporary)
        with suppress(OSError):
            self.handle.close()


# The characters tempfile.mkstemp draws a name's 8 random ones from.
_TEMPORARY_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_")


def _our_temporary(name: str, prefix: str) -> bool:
    """Whether `name` is one PrivateFile gives: PREFIX, 8 of mkstemp's characters, .tmp."""
    middle = name.removeprefix(prefix).removesuffix(".tmp")
    return (
        len(name) == len(prefix) + 8 + len(".tmp")
        and name.startswith(prefix)
        and name.endswith(".tmp")
        and _TEMPORARY_CHARACTERS.issuperset(middle)
    )


def remove_stale_temporaries(path: Path) -> None:
    """Remove the temporary files for `path` that runs killed outright left behind.

    Only regular files named as PrivateFile names them, owned by this account and not locked:
    a run still writing one holds its lock, and a killed run's lock went with it.
    """
    prefix = f".{path.name}."
    try:
        names = [e.name for e in os.scandir(path.parent) if _our_temporary(e.name, prefix)]
    except OSError:
        return  # the folder cannot be listed: mkstemp will say what is wrong
    for name in names:
        candidate = path.parent / name
        with suppress(OSError):  # gone, or not ours to remove: left as it is
            fd = os.open(candidate, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            try:
                info = os.fstat(fd)
                if stat.S_ISREG(info.st_mode) and info.st_uid == os.getuid():
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # in use: raises
                    os.unlink(candidate)
            finally:
                os.close(fd)


def _terminate(signum: int, frame: FrameType | None) -> None:
    # A second SIGTERM is ignored: it would break off the cleanup the first one runs.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """For the block, SIGTERM (a plain `kill`) raises KeyboardInterrupt, as Ctrl-C does.

    Only while a command writes a file of addresses: its cleanup then removes the temporary
    file. The sender has its own SIGTERM handling, so this is not installed process-wide.
    """
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM noted, not acted on, during the block; then raised (KeyboardInterrupt).

    Python runs signal handlers in the main thread only, so swapping the handlers holds them
    whatever other threads (a progress bar's) the process has, where blocking them would not.
    """
    held: list[int] = []

    def note(signum: int, frame: FrameType | None) -> None:
        held.append(signum)

    previous = {sig: signal.signal(sig, note) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if held:
        raise KeyboardInterrupt


@contextmanager
def private_file(path: Path) -> Iterator[TextIO]:
    """A PrivateFile's handle, put in place when the block ends well, else removed."""
    file = PrivateFile(path)
    try:
        try:
            yield file.handle
        except OSError as e:
            raise file.error(e) from None
        file.sync()
        file.put_in_place()
    finally:
        file.discard()


class RejectsFile:
    """Rejected rows: their line, reason and own columns, in a PrivateFile.

    Cells are written as import would read them, neutralised against spreadsheet formulas, with
    control characters and undecodable bytes shown as U+FFFD. Its own columns have names import
    ignores (REJECTS_COLUMNS), so a source's `line` or `reason` is kept and a rejects file read
    back stores neither. The file is written whole and synced before the import commits, and
    put in place only after: an import that stopped leaves none, one that went through its own.
    """

    def __init__(self, path: Path, source: Path) -> None:
        self.header = [h for h in read_header(source) if h not in REJECTS_COLUMNS]
        self.file = PrivateFile(path)  # made now: a path that cannot take it stops the import
        self.writer: Any = None

    def write(self, line: int, reason: str, raw: RawRow | None) -> None:
        """Add one rejected row (the header first)."""
        try:
            if self.writer is None:
                self.writer = csv.writer(self.file.handle)
                self.writer.writerow([_reject_cell(c) for c in [*REJECTS_COLUMNS, *self.header]])
            # A key cell is left out: it may hold a secret key pasted by mistake.
            cells = [str(line), reason, *_rejected_cells(raw, self.header)]
            self.writer.writerow([_reject_cell(c) for c in cells])
        except OSError as e:
            raise self.file.error(e) from None


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
    state: State = ctx.obj
    secret = state.settings.security.require_secret()
    check_regular_file(file)
    rejects_path = rejects or file.with_suffix(".rejects.csv")
    if rejects_path.resolve() == file.resolve():  # it would replace the file being imported
        raise AudienceError(f"{rejects_path}: the rejects file cannot be the file imported")
    with sigterm_as_interrupt():
        rejects_file = RejectsFile(rejects_path, file)  # before anything is written
        try:
            try:
                report = _import_file(state, file, rejects_file, list_slug, confirmed, secret)
            except BaseException:
                rejects_file.file.discard()
                raise
        except KeyboardInterrupt:
            say("interrupted:", "yellow", "nothing imported")
            raise typer.Exit(130) from None
        except OperationalError as e:
            if not _busy(e):
                raise
            raise AudienceError("database busy: nothing imported; try again") from None
        try:
            with signals_held():  # the import went in: its rejects file goes in place with it
                _put_rejects_in_place(rejects_file, report)
        except KeyboardInterrupt:
            pass  # too late to stop anything: the import is reported as it went
    counts = report.counts()
    if as_json:
        print_json({**counts, "rejects_file": str(rejects_path) if report.rejected else None})
    else:
        console.print(
            ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in counts.items()), soft_wrap=True
        )
    if report.rejected:
        err_console.print(f"{report.rejected} rows rejected: see {rejects_path}", soft_wrap=True)
    if report.kept_out:
        err_console.print(
            f"{report.kept_out} people kept out: they unsubscribed, bounced or were forgotten",
            soft_wrap=True,
        )
    if report.pending or (report.keys and not confirmed):  # keys wait for their proof mail
        say_confirmations(state)


def _put_rejects_in_place(rejects_file: RejectsFile, report: ImportReport) -> None:
    """After the commit: the rejects file in place (or removed, when nothing was rejected)."""
    if not report.rejected:
        rejects_file.file.discard()
        return
    try:
        rejects_file.file.put_in_place()
    except AudienceError as e:
        where = rejects_file.file.temporary
        raise AudienceError(f"{e}; the import went through, its rejects are in {where}") from e


def _import_file(
    state: State,
    file: Path,
    rejects_file: RejectsFile,
    list_slug: str | None,
    confirmed: bool,
    secret: str,
) -> ImportReport:
    """Import the file in one transaction, with a progress bar; the rejects file is written
    whole and on disk before the commit.

    KeyboardInterrupt (Ctrl-C, or SIGTERM) means nothing was committed. One that comes during
    the commit is held until it is recorded; one after it is too late to stop anything, so the
    report is returned and the caller puts the rejects file in place.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    total = max(count_lines(file) - 1, 0)
    progress = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    )
    committed = False
    try:
        with progress, unit_of_work(state.factory()) as session:
            task = progress.add_task("importing", total=total)
            report = import_rows(
                session=session,
                rows=read_csv(file),
                default_list=list_slug,
                confirmed=confirmed,
                secret=secret,
                now=state.clock.now(),
                actor=state.actor,
                source=file.name,
                on_reject=rejects_file.write,
                on_progress=lambda line: progress.update(task, completed=min(line - 1, total)),
            )
            rejects_file.file.sync()  # on disk before the commit: no import without its rejects
            with signals_held():
                session.commit()
                committed = True
    except KeyboardInterrupt:
        if not committed:
            raise
    return report


def _busy(error: OperationalError) -> bool:
    """Whether SQLite gave up waiting for another writer (its busy timeout)."""
    name = getattr(error.orig, "sqlite_errorname", "")
    return name in ("SQLITE_BUSY", "SQLITE_LOCKED") or "database is locked" in str(error.orig)


class TerminalText:
    """A text stream for a terminal: what is written passes through terminal_text first."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        """Write `text` with its bidi and separator controls escaped."""
        return self.stream.write(terminal_text(text))


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
            # On a terminal, bidi and separator controls are shown escaped as every command
            # shows outside text; a pipe or a file gets the exact data, which import reads back.
            handle = TerminalText(sys.stdout) if sys.stdout.isatty() else sys.stdout
            n = write_csv(rows, columns, handle)
        else:
            with sigterm_as_interrupt(), private_file(out) as handle:
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
    if not yes:
        if not sys.stdin.isatty():  # a script or a pipe: nobody to ask
            raise AudienceError(
                "not forgotten: there is no terminal to confirm on; add --yes to erase"
            )
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
