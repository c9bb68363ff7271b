"""Subscribers as CSV: reading rows (checked, one at a time) and writing an export.

A file is read by its header and streamed: each row comes with its line number and, when it
cannot be stored as it is, the reason (newsletter.importer writes the good rows). No reason names
anyone but the row's own values.

Spreadsheets run cells that look like formulas (OWASP "CSV injection"). Every cell we write
(export, rejects file, header included) that starts with = + - @ (or a form NFKC folds to one of
them: fullwidth, small), a tab, CR or LF, also after leading spaces or format characters (a
zero-width space, a BOM), or with ' itself, gets one leading ' (which spreadsheets show as
"text"); import removes exactly that one ', so an export reads back unchanged.
"""

from __future__ import annotations

import csv
import functools
import io
import stat
import string
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from newsletter.addresses import address_forms
from newsletter.config import LANGUAGES
from newsletter.db.models import (
    KeyStatus,
    MailingList,
    ReaderKey,
    Subscriber,
    SubscriberStatus,
    Subscription,
    SubscriptionStatus,
)
from newsletter.errors import AudienceError
from newsletter.openpgp import MAX_KEY_BYTES, kept_form
from newsletter.readers import parse_discreet, parse_key_problem

KNOWN_COLUMNS = (
    "email",
    "name",
    "language",
    "lists",
    "tags",
    "country",
    "discreet",
    "on_key_problem",
    "openpgp_key",
)
_KNOWN = frozenset(KNOWN_COLUMNS)  # for membership: a hash, not nine comparisons per cell
CHUNK_ROWS = 1000  # rows per written chunk on import, people per page on export
MAX_CELL_CHARS = 1000  # longer cells reject their row (names are then cut to 200)
# A header may have email and MAX_ATTRIBUTES custom columns (each may become an attribute of
# everyone): the other known columns and the rejects file's own are not counted, so a file export
# or a rejects file writes reads back. The importer keeps the stored custom keys within
# MAX_ATTRIBUTES too, so an export's header never has more.
MAX_COLUMNS = 200
MAX_ATTRIBUTES = MAX_COLUMNS - 1
MAX_ROW_CHARS = 1 << 20  # a longer row (all its lines) stops the file: no CSV row is that long
# The csv module's own cap on a cell (131,072 by default) raises in the middle of a quoted cell,
# and reading would go on inside it, taking the cell's text for rows. A cell cannot be longer
# than its row, which _Lines bounds; with this cap the csv module never stops on a cell first.
csv.field_size_limit(MAX_ROW_CHARS)
# Columns of the rejects file itself (its line and reason): import ignores them, so a rejects
# file read back stores neither, and a source's own `line` or `reason` columns are kept.
REJECTS_COLUMNS = ("rejected_line", "rejected_reason")
RawRow = dict[str, str | None]
RowResult = tuple[int, RawRow | None, str]
# A row with more fields than the header keeps the surplus ones in its RawRow under keys made of
# this prefix and their position: _header refuses a NUL in a name, so no column has such a key.
SURPLUS = "\x00"


@dataclass(frozen=True)
class SubscriberRow:
    email: str
    name: str = ""
    language: str = ""  # "" = not given: new people get "en", known people keep theirs
    country: str = ""
    lists: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    attributes: dict[str, str] = field(default_factory=dict)
    older_forms: tuple[str, ...] = ()  # forms of the address stored before (see address_forms)
    discreet: str = ""  # "" = not given: new people get "off" (see importer._fill_in)
    on_key_problem: str = ""  # "" = not given: new people get "withhold"
    openpgp_key: str = ""  # an armored public key (checked by the importer against the address)


# Cells a spreadsheet may take for a formula begin with one of these (OWASP's list: = + - @ tab
# CR; LF and the fullwidth and small forms, which some spreadsheets fold to ASCII, too).
FORMULA_STARTS = frozenset("=+-@\t\r\n\uff1d\uff0b\uff0d\uff20\ufe66\ufe62\ufe63\ufe6b")


def _first_significant(value: str) -> str:
    """The first character a spreadsheet acts on, NFKC-folded (so \ufe66 reads as =): leading
    spaces and format characters (zero-width space, BOM, bidi marks) are skipped."""
    for ch in value:
        if ch.isascii() and ch != " ":  # the common case: no Unicode tables
            return ch
        if ch == " " or unicodedata.category(ch) == "Cf":
            continue
        return unicodedata.normalize("NFKC", ch)[:1] or ch
    return ""


def _needs_quote(value: str) -> bool:
    return value[:1] == "'" or _first_significant(value) in FORMULA_STARTS


def neutralise_cell(value: str) -> str:
    """A cell a spreadsheet shows as text: one leading ' before anything that may start a formula.

    A value that starts with ' itself gets one too, so restore_cell removes exactly what was added.
    """
    return "'" + value if _needs_quote(value) else value


def restore_cell(value: str) -> str:
    """The value neutralise_cell was given: its one added leading ' removed, nothing else."""
    return value[1:] if value[:1] == "'" and _needs_quote(value[1:]) else value


def _split(value: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(filter(None, map(str.strip, value.split(";")))))


# The plain addresses nearly every file is made of: an ASCII dot-atom of these characters (a
# subset of RFC 5322 atext) before the @, and a domain already checked (see _address_forms).
_PLAIN_LOCAL = frozenset(string.ascii_letters + string.digits + "._+-")
_PLAIN_DOMAIN = frozenset(string.ascii_lowercase + string.digits + ".-")
_MAX_ADDRESS = 254  # email-validator's EMAIL_MAX_LENGTH (RFC 5321 with RFC 3696 errata)


@functools.lru_cache(maxsize=4096)
def _plain_domain(domain: str) -> bool:
    """Whether address_forms takes `a@domain` as it is: ASCII, one form, only its case changed."""
    if not domain.isascii() or not _PLAIN_DOMAIN.issuperset(domain.lower()):
        return False
    try:
        forms = address_forms("a@" + domain)
    except AudienceError:
        return False
    return forms == ("a@" + domain.lower(),)


def _address_forms(raw: str) -> tuple[str, ...]:
    """What addresses.address_forms returns, without its full check for plain addresses.

    email-validator checks the part after the @ on its own, so a domain is checked once (above)
    and a plain ASCII dot-atom before it needs no more than the checks here: then every form it
    measures has this address's length, and address_forms would give the address lowercased.
    Anything else, and every error message, comes from address_forms itself. No regular
    expression: set and split checks only, linear in the address's length.
    """
    text = raw.strip()
    local, _, domain = text.partition("@")
    if (
        len(text) <= _MAX_ADDRESS
        and _PLAIN_LOCAL.issuperset(local)
        and "" not in local.split(".")
        and _plain_domain(domain)
    ):
        return (text.lower(),)
    return address_forms(raw)


def parse_row(row: RawRow) -> SubscriberRow:
    """Turn one CSV row (read by header) into a checked SubscriberRow."""

    # Every cell stripped and restored once; header names arrive so already (see _read_rows).
    cells = {k: restore_cell(v.strip()) for k, v in row.items() if k and v}
    get = cells.get
    email = get("email", "")
    forms = _address_forms(email) if email else ()
    if not forms:
        raise AudienceError("missing email")
    language = get("language", "").lower()
    if language and language not in LANGUAGES:
        raise AudienceError(f"language must be one of {', '.join(LANGUAGES)}, not {language!r}")
    country = get("country", "").upper()
    if country and (len(country) != 2 or not country.isalpha() or not country.isascii()):
        raise AudienceError(f"country must be a two-letter code, not {country!r}")
    discreet = get("discreet", "")
    discreet = parse_discreet(discreet) if discreet else ""
    on_key_problem = get("on_key_problem", "")
    on_key_problem = parse_key_problem(on_key_problem) if on_key_problem else ""
    extra = {k: v for k, v in cells.items() if v and k not in _KNOWN and k not in REJECTS_COLUMNS}
    return SubscriberRow(
        email=forms[0],
        name=" ".join(get("name", "").split())[:200],
        language=language,
        country=country,
        lists=_split(get("lists", "")),
        tags=_split(get("tags", "")),
        attributes=extra,
        older_forms=forms[1:],
        discreet=discreet,
        on_key_problem=on_key_problem,
        openpgp_key=get("openpgp_key", ""),
    )


def merge_rows(first: SubscriberRow, later: SubscriberRow) -> SubscriberRow:
    """Two rows for one address become one: later values win, lists and tags add up."""
    return SubscriberRow(
        email=first.email,
        name=later.name or first.name,
        language=later.language or first.language,
        country=later.country or first.country,
        lists=tuple(dict.fromkeys(first.lists + later.lists)),
        tags=tuple(dict.fromkeys(first.tags + later.tags)),
        attributes={**first.attributes, **later.attributes},
        older_forms=first.older_forms,
        discreet=later.discreet or first.discreet,
        on_key_problem=later.on_key_problem or first.on_key_problem,
        openpgp_key=later.openpgp_key or first.openpgp_key,
    )


def count_lines(path: Path) -> int:
    """How many lines a file has (for a progress bar), reading it in blocks."""
    try:
        with path.open("rb") as handle:
            return sum(block.count(b"\n") for block in iter(lambda: handle.read(1 << 20), b""))
    except OSError as e:
        raise AudienceError(f"{path}: cannot open: {e.strerror}") from None


def check_regular_file(path: Path) -> None:
    """Refuse what is not a regular file (a pipe, a device, a folder): it would be read twice
    (lines counted, then rows), may never end, and opening a pipe waits for a writer."""
    try:
        mode = path.stat().st_mode
    except OSError as e:
        raise AudienceError(f"{path}: cannot open: {e.strerror}") from None
    if not stat.S_ISREG(mode):
        raise AudienceError(f"{path}: not a regular file (a pipe, device or folder): save it first")


def read_csv(path: Path) -> Iterator[RowResult]:
    """Stream (first line number, row or None, error) from a CSV file read by its header.

    A UTF-8 BOM and Windows line ends are fine. Bytes that are not UTF-8 spoil only their row:
    they are kept as surrogates while reading, and such a row is rejected. A file that cannot be
    read as CSV at all (its header, or a row longer than MAX_ROW_CHARS) stops with one line.
    """
    with _open(path) as handle:
        yield from _read_rows(handle, str(path))


def read_header(path: Path) -> list[str]:
    """The column names of a CSV file as read_csv reads them; [] when it has no usable header."""
    try:
        with _open(path) as handle:
            return _header(_Lines(handle, str(path)), str(path))
    except AudienceError:
        return []


def _open(path: Path) -> io.TextIOWrapper:
    try:
        return path.open(encoding="utf-8-sig", errors="surrogateescape", newline="")
    except OSError as e:
        raise AudienceError(f"{path}: cannot open: {e.strerror}") from None


class _Lines:
    """A file's lines for the csv module, refusing a row (over one or more lines) longer than
    MAX_ROW_CHARS: without a bound, a file with no line end (or one quote never closed) is read
    whole into memory before a single row comes out. `mark()` starts the next row's count."""

    def __init__(self, handle: io.TextIOBase | Any, where: str) -> None:
        self.readline = handle.readline
        self.where = where
        self.line = 0
        self.row_chars = 0

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        text: str = self.readline(MAX_ROW_CHARS + 1)
        if not text:
            raise StopIteration
        self.line += 1
        self.row_chars += len(text)
        if self.row_chars > MAX_ROW_CHARS:
            raise AudienceError(
                f"{self.where}: line {self.line}: a row longer than {MAX_ROW_CHARS:,} characters "
                "(is it a CSV file, with every quote closed?); nothing was imported"
            )
        return text

    def mark(self) -> None:
        """A row was read: the next one starts counting from here."""
        self.row_chars = 0


def column_name(text: str) -> str:
    """A column's name as import stores it (and a segment's attr.NAME is matched): stripped,
    its neutralising ' removed, lowercased."""
    return restore_cell(text.strip()).lower()


def _header(lines: _Lines, where: str) -> list[str]:
    """The checked column names: UTF-8 text, an email column, none twice, at most MAX_COLUMNS
    of email and custom ones."""
    try:
        first = next(csv.reader(lines, strict=True), [])
    except csv.Error as e:
        raise AudienceError(f"{where}: cannot read the header: {e}") from None
    lines.mark()
    if first:  # the codec removes one BOM; files joined with `cat` bring more
        first[0] = first[0].lstrip("\ufeff")
    names = [column_name(h) for h in first]
    if "email" not in names and len(names) == 1:  # what Excel saves in many locales
        if ";" in names[0]:
            raise AudienceError(f"{where}: columns separated by ';': save as comma-separated CSV")
        if "\t" in names[0]:
            raise AudienceError(f"{where}: columns separated by tabs: save as comma-separated CSV")
    if "email" not in names or any(_cell_problem(n) for n in names):
        raise AudienceError(
            f"{where}: the header must be UTF-8 text without control characters "
            "and have an 'email' column"
        )
    counted = sum(n not in _KNOWN and n not in REJECTS_COLUMNS for n in names) + 1  # and email
    if counted > MAX_COLUMNS:
        raise AudienceError(
            f"{where}: the header has {len(names):,} columns, {counted:,} of them email or "
            f"custom: more than {MAX_COLUMNS}; keep the columns you need"
        )
    twice = next((n for i, n in enumerate(names) if n and n in names[:i]), None)
    if twice is not None:  # a second value would silently replace the first
        raise AudienceError(f"{where}: the header names the column {twice!r} twice")
    return names


def _read_rows(handle: io.TextIOBase | Any, where: str) -> Iterator[RowResult]:
    lines = _Lines(handle, where)
    names = _header(lines, where)
    width = len(names)
    # strict: a quote left open is an error at the end of the file rather than a last row that
    # silently swallowed every line after it.
    reader = csv.reader(lines, strict=True)
    while True:
        start = lines.line + 1
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            lines.mark()
            span = f" (lines {start}-{lines.line})" if lines.line > start else ""
            yield start, None, f"unreadable row{span}: {e}"
            continue
        lines.mark()
        if not fields:
            continue  # a blank line, as csv.DictReader skips it
        if len(fields) > width:  # the surplus fields are kept for the rejects file
            longer: RawRow = dict(zip(names, fields, strict=False))
            longer.update((f"{SURPLUS}{i}", cell) for i, cell in enumerate(fields[width:]))
            yield start, longer, "more fields than the header has"
            continue
        # Only the cells the row has: work per row follows its length, not the header's.
        row: RawRow = dict(zip(names, fields, strict=False))
        yield start, row, _row_problem(row)


def surplus_cells(row: RawRow) -> list[str]:
    """The fields a row had past the header's columns (see SURPLUS), in their order."""
    return [value or "" for key, value in row.items() if key.startswith(SURPLUS)]


def _row_problem(row: RawRow) -> str:
    """Why a row cannot be stored as it is ("" when it can), naming the column, not the value."""
    for key, value in row.items():
        limit = MAX_KEY_BYTES if key == "openpgp_key" else MAX_CELL_CHARS
        problem = _cell_problem(value, limit) if value else ""
        if problem:
            return f"column {key!r}: {problem}"
    return ""


def _cell_problem(value: str, limit: int = MAX_CELL_CHARS) -> str:
    """What no database should be given: bytes that were not UTF-8, control characters
    (PostgreSQL refuses NUL outright), or a cell longer than its limit (an armored key's is
    openpgp.MAX_KEY_BYTES, any other's MAX_CELL_CHARS)."""
    if len(value) > limit:
        return f"longer than {limit} characters"
    if value.isprintable():  # the common case, checked in C
        return ""
    for ch in value:
        if "\udc80" <= ch <= "\udcff":
            return "not UTF-8 text (save the file as UTF-8)"
        if ch not in "\t\n\r" and unicodedata.category(ch) in ("Cc", "Cs"):
            return f"control character U+{ord(ch):04X}"
    return ""


# --- export ----------------------------------------------------------------------------------


def _exported(list_id: int | None) -> Any:
    """Active people; with a list, only its active members."""
    stmt = select(Subscriber).where(Subscriber.status == SubscriberStatus.ACTIVE)
    if list_id is not None:
        stmt = stmt.where(
            select(Subscription.id)
            .where(
                Subscription.subscriber_id == Subscriber.id,
                Subscription.list_id == list_id,
                Subscription.status == SubscriptionStatus.ACTIVE,
            )
            .exists()
        )
    return stmt


def _pages(session: Session, list_id: int | None, size: int) -> Iterator[list[Subscriber]]:
    """Exported people in pages by id (keyset paging: no long-open cursor, steady memory)."""
    last = 0
    while True:
        stmt = _exported(list_id).where(Subscriber.id > last).order_by(Subscriber.id).limit(size)
        page = list(session.scalars(stmt))
        if not page:
            return
        yield page
        last = page[-1].id
        session.expunge_all()


def export_columns(session: Session, *, list_id: int | None = None) -> list[str]:
    """The CSV header of an export: the columns import reads, then every custom attribute."""
    keys: set[str] = set()
    for page in _pages(session, list_id, CHUNK_ROWS):
        for sub in page:
            keys.update(sub.attributes or {})
    return [*KNOWN_COLUMNS, *sorted(keys - set(KNOWN_COLUMNS))]


def export_rows(
    session: Session, *, list_id: int | None = None, chunk_rows: int = CHUNK_ROWS
) -> Iterator[dict[str, str]]:
    """Active people as CSV rows import reads back; lists are their active subscriptions."""
    for page in _pages(session, list_id, chunk_rows):
        slugs: dict[int, list[str]] = {}
        stmt = (
            select(Subscription.subscriber_id, MailingList.slug)
            .join(MailingList, MailingList.id == Subscription.list_id)
            .where(
                Subscription.subscriber_id.in_([s.id for s in page]),
                Subscription.status == SubscriptionStatus.ACTIVE,
            )
            .order_by(MailingList.slug)
        )
        for sid, slug in session.execute(stmt):
            slugs.setdefault(sid, []).append(slug)
        keys = dict(  # active keys only: a pending one was never proven by its reader
            session.execute(
                select(ReaderKey.subscriber_id, ReaderKey.armored).where(
                    ReaderKey.subscriber_id.in_([s.id for s in page]),
                    ReaderKey.status == KeyStatus.ACTIVE,
                )
            ).all()
        )
        for sub in page:
            yield {
                **(sub.attributes or {}),
                "email": sub.email,
                "name": sub.name,
                "language": sub.language,
                "lists": ";".join(slugs.get(sub.id, [])),
                "tags": ";".join(sub.tags or []),
                "country": sub.country,
                "discreet": sub.discreet,
                "on_key_problem": sub.on_key_problem,
                # A key stored before only the reader's user ID was kept: that form now.
                "openpgp_key": kept_form(keys[sub.id], email=sub.email) if sub.id in keys else "",
            }


def shown_cell(value: str) -> str:
    """A cell as written to a file or a terminal: each control character (ESC, BEL, NUL...)
    and undecodable byte as U+FFFD, then neutralised. Tab, CR and LF stay (csv quotes them).

    What import refuses is never written, so a stored name holding an escape sequence neither
    drives the terminal an export is printed on nor keeps its owner out of a re-import.
    """
    if not value.isprintable():  # the common case, checked in C
        value = "".join(
            "\ufffd" if ch not in "\t\n\r" and unicodedata.category(ch) in ("Cc", "Cs") else ch
            for ch in value
        )
    return neutralise_cell(value)


def write_csv(rows: Iterable[dict[str, str]], columns: list[str], handle: Any) -> int:
    """Write rows under a header, every cell shown_cell; returns how many rows were written."""
    # CRLF line ends (RFC 4180): the csv module quotes a cell holding either, so a lone CR in a
    # value cannot end its row early.
    writer = csv.writer(handle, lineterminator="\r\n")
    writer.writerow([shown_cell(c) for c in columns])
    n = 0
    for row in rows:
        writer.writerow([shown_cell(_text(row.get(c))) for c in columns])
        n += 1
    return n


def _text(value: object) -> str:
    return "" if value is None else str(value)
