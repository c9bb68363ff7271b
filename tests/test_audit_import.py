"""Audit of CSV import and export: hostile files (very wide headers, rows without end, quotes
never closed, a column named twice) and the files an export or an import leaves for others to
open (SQLite, PostgreSQL, the real CLI)."""

from __future__ import annotations

import csv
import os
import stat
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from newsletter.db import unit_of_work
from newsletter.db.models import MailingList, Subscriber, Subscription
from newsletter.errors import AudienceError
from newsletter.lists import read_lists, sync_lists
from newsletter.subscriber_csv import MAX_COLUMNS, MAX_ROW_CHARS, read_csv
from tests.builders import run
from tests.test_csv_hostile import cli_env, emails, import_file, lists, opened

__all__ = ["lists"]  # the fixture, used by name


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8", newline="")
    return path


@contextmanager
def umask(mask: int) -> Iterator[None]:
    """The usual umask of a shared machine for the processes started inside."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


# --- hostile files ---------------------------------------------------------------------------


def test_a_header_wider_than_max_columns_is_refused(tmp_path: Path) -> None:
    """Attack: a header of many columns, then short rows. csv.DictReader filled every missing
    column of every row, so a 700 KB file took a minute per 2,000 rows, and each column could
    become an attribute of everyone exported. Now a header over MAX_COLUMNS is refused."""
    header = ",".join(["email", *(f"c{i}" for i in range(MAX_COLUMNS))])
    path = write(tmp_path / "wide.csv", header + "\nann@example.org\n")
    with pytest.raises(AudienceError, match=f"more than {MAX_COLUMNS}"):
        list(read_csv(path))
    at_limit = write(tmp_path / "ok.csv", header.rsplit(",", 1)[0] + "\nann@example.org\n")
    [(line, row, error)] = list(read_csv(at_limit))
    assert (line, error) == (2, "") and row == {"email": "ann@example.org"}


def test_cli_refuses_a_header_of_a_hundred_thousand_columns_at_once(
    tmp_path: Path, database_url: str
) -> None:
    """Attack: 100,000 columns and 5,000 one-cell rows (before: minutes of CPU on 1 MB). Now one
    line, quickly, and nobody imported."""
    env = cli_env(tmp_path, database_url)
    run(["init"], tmp_path, env)
    header = ",".join(["email", *(f"c{i}" for i in range(100_000))])
    rows = "".join(f"p{i}@example.org\n" for i in range(5000))
    path = write(tmp_path / "wide.csv", header + "\n" + rows)
    result = run(
        ["subscribers", "import", str(path), "--list", "weekly-digest"], tmp_path, env, ok=False
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "100,001 columns" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    with opened(database_url) as factory:
        assert emails(factory) == set()


def test_a_header_naming_a_column_twice_is_refused(tmp_path: Path) -> None:
    """Attack: `email,name,EMAIL`: the second address silently replaced the first, so the row
    imported someone its first column did not name. Now the header is refused."""
    path = write(tmp_path / "twice.csv", "email,name,EMAIL\nann@example.org,Ann,bob@example.org\n")
    with pytest.raises(AudienceError, match="'email' twice"):
        list(read_csv(path))


def test_rows_after_an_unreadable_row_keep_their_line_numbers(tmp_path: Path) -> None:
    """Attack: a row the csv module cannot read (a cell over its field limit, once; now that
    limit is MAX_ROW_CHARS, a quote closed mid-cell). The next row was reported one line too
    early (csv.DictReader keeps its line count only for rows it returns), so the rejects file
    pointed at the wrong line. Now every row has its own line."""
    path = write(
        tmp_path / "big.csv",
        f'email,name\nann@example.org,"{"x" * 200_000}"x\nbob@example.org,Bob\nbad,Carl\n',
    )
    got = [(line, error.split(":")[0]) for line, _row, error in read_csv(path)]
    assert got == [(2, "unreadable row"), (3, ""), (4, "")]
    long_cell = write(tmp_path / "long.csv", f"email,name\nann@example.org,{'x' * 200_000}\n")
    [(line, _row, error)] = list(read_csv(long_cell))  # read whole, rejected for its length
    assert (line, error) == (2, "column 'name': longer than 1000 characters")


SWALLOWED = ["bob@example.org,Bob,weekly-digest", "cat@example.org,Cat,weekly-digest"]


@pytest.mark.parametrize(
    ("rows", "imported"),
    [
        pytest.param(['ann@example.org,"Ann,weekly-digest', *SWALLOWED], set(), id="at-the-end"),
        pytest.param(
            [
                'ann@example.org,"Ann,weekly-digest',
                SWALLOWED[0],
                'cat@example.org,"Cat"s,weekly-digest',
                "dan@example.org,Dan,weekly-digest",
            ],
            {"dan@example.org"},
            id="closed-later",
        ),
    ],
)
def test_a_quote_never_closed_rejects_the_rows_it_swallowed(
    lists: sessionmaker[Session], tmp_path: Path, rows: list[str], imported: set[str]
) -> None:
    """Attack: a stray quote in one row. The csv module read the lines after it into that row's
    name: Bob and Cat were neither imported nor rejected, and their addresses were stored in
    Ann's name. Now the row is rejected, naming the lines it spans, and nothing of it stored."""
    path = write(tmp_path / "q.csv", "\n".join(["email,name,lists", *rows]) + "\n")
    counts, rejects = import_file(lists, path)
    assert counts["rejected"] == 1 and rejects[0][0] == 2
    assert "lines 2-4" in rejects[0][1]
    with unit_of_work(lists) as session:
        names = list(session.scalars(select(Subscriber.name)))
    assert not any("@" in name for name in names)
    assert emails(lists) == imported


def test_a_row_without_end_stops_the_file_in_bounded_memory(tmp_path: Path) -> None:
    """Attack: 40 MB with no line end. The whole line was read into memory before the csv
    module refused it, and the import went on. Now reading stops at MAX_ROW_CHARS with one
    line, having held about that much."""
    path = tmp_path / "endless.csv"
    with path.open("w", encoding="utf-8") as handle:
        handle.write("email,name\nann@example.org,")
        for _ in range(40):
            handle.write("x" * 1_000_000)
    tracemalloc.start()
    try:
        with pytest.raises(AudienceError, match="line 2: a row longer than"):
            list(read_csv(path))
        _now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * MAX_ROW_CHARS < 40_000_000


def test_cli_a_stopped_import_imports_nobody_and_leaves_no_rejects_file(
    tmp_path: Path, database_url: str
) -> None:
    """Attack: a good row, a bad one, then a row without end. The rejects file of an import that
    was rolled back said the other rows went in. Now nothing is imported and no rejects file is
    left; the error is one line."""
    env = cli_env(tmp_path, database_url)
    run(["init"], tmp_path, env)
    path = write(
        tmp_path / "people.csv",
        "email,lists\nann@example.org,weekly-digest\nnot-an-address,weekly-digest\n"
        "bob@example.org," + "x" * (MAX_ROW_CHARS + 10),
    )
    result = run(["subscribers", "import", str(path), "--confirmed"], tmp_path, env, ok=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "line 4: a row longer than" in result.stderr
    assert not (tmp_path / "people.rejects.csv").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    with opened(database_url) as factory:
        assert emails(factory) == set()


# --- files left for others to open -----------------------------------------------------------


def test_cli_export_and_rejects_files_only_their_owner_can_read(
    tmp_path: Path, database_url: str
) -> None:
    """Attack: another account on the machine reads the export (every reader's address) or the
    rejects file, made 0644 under the usual umask; or plants a link where the export goes, to
    have it written through. Now both files are 0600 and a planted link is replaced, not
    followed."""
    env = cli_env(tmp_path, database_url)
    run(["init"], tmp_path, env)
    people = write(
        tmp_path / "people.csv",
        "email,name,lists\nann@example.org,Ann,weekly-digest\nbad,Bob,weekly-digest\n",
    )
    victim = write(tmp_path / "victim.txt", "keep me\n")
    out = tmp_path / "export.csv"
    out.symlink_to(victim)
    with umask(0o022):
        run(["subscribers", "import", str(people), "--confirmed"], tmp_path, env)
        run(["subscribers", "export", "--out", str(out)], tmp_path, env)
    rejects = tmp_path / "people.rejects.csv"
    for path in (out, rejects):
        mode = os.lstat(path).st_mode
        assert stat.S_ISREG(mode) and stat.S_IMODE(mode) == 0o600, (path, oct(mode))
    assert victim.read_text() == "keep me\n"
    with out.open(encoding="utf-8", newline="") as handle:
        assert [r[0] for r in csv.reader(handle)] == ["email", "ann@example.org"]
    assert "bad" in rejects.read_text(encoding="utf-8")


def test_cli_export_to_a_missing_folder_is_one_line(tmp_path: Path, database_url: str) -> None:
    """An export to a folder that does not exist is one line (before: an internal error)."""
    env = cli_env(tmp_path, database_url)
    run(["init"], tmp_path, env)
    result = run(
        ["subscribers", "export", "--out", str(tmp_path / "nope" / "x.csv")],
        tmp_path,
        env,
        ok=False,
    )
    assert result.returncode == 1 and "internal error" not in result.stderr
    assert "cannot write" in result.stderr and len(result.stderr.strip().splitlines()) == 1


# --- lists and the command line --------------------------------------------------------------


OLD_LIST = {"name": "Old", "names": {}, "kind": "digest", "double_opt_in": True, "list_id": "old.x"}


@pytest.mark.parametrize(
    "slug",
    [
        pytest.param("weekly;digest", id="csv-separator"),
        pytest.param(" weekly", id="leading-space"),
        pytest.param("weekly digest", id="space"),
        pytest.param("weekly\u202edigest", id="bidi-override"),
        pytest.param("w\u0435ekly-digest", id="cyrillic-look-alike"),
        pytest.param("-weekly", id="reads-as-an-option"),
        pytest.param("x" * 65, id="too-long"),
    ],
)
def test_a_slug_that_cannot_round_trip_or_be_told_apart_is_refused(
    tmp_path: Path, slug: str, factory: sessionmaker[Session]
) -> None:
    """Attack: a list slug with ';' (the separator of the CSV `lists` cell), spaces, a bidi
    override or a look-alike letter. Such a list was created: its members' export never read
    back, and terminals and pages showed it as another list. Now a new list with such a slug is
    refused; one made before the rule is kept (an upgrade must not lock its people out)."""
    path = tmp_path / "lists.toml"
    path.write_text(f"[[lists]]\nslug = '{slug}'\nkind = 'digest'\n", encoding="utf-8")
    specs = read_lists(path, from_address="news@portal.example.org")
    with unit_of_work(factory) as session, pytest.raises(AudienceError, match="'slug' must be"):
        sync_lists(session=session, specs=specs)
    with unit_of_work(factory) as session:
        assert session.scalar(select(func.count()).select_from(MailingList)) == 0
        session.add(MailingList(slug=slug, digest_cursor=0, **OLD_LIST))  # made before the rule
    with unit_of_work(factory) as session:
        assert sync_lists(session=session, specs=specs).created == ()


def test_cli_lists_create_refuses_a_slug_with_the_csv_separator(
    tmp_path: Path, database_url: str
) -> None:
    """`lists create 'a;b'` is one line and creates nothing."""
    env = cli_env(tmp_path, database_url)
    run(["init"], tmp_path, env)
    result = run(["lists", "create", "a;b", "--kind", "digest"], tmp_path, env, ok=False)
    assert result.returncode == 1 and "'slug' must be" in result.stderr
    assert "a;b" not in run(["lists", "list"], tmp_path, env).stdout


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["segments", "show", "--rule", 'lang = "en"'], id="segments-show"),
        pytest.param(["subscribers", "list"], id="subscribers-list"),
    ],
)
def test_cli_a_negative_limit_is_refused(
    tmp_path: Path, database_url: str, args: list[str]
) -> None:
    """Attack: `--limit -1`. SQLite read LIMIT -1 as no limit and listed everyone; PostgreSQL
    refused the statement (an internal error). Now the option is refused on both."""
    env = cli_env(tmp_path, database_url)
    run(["init"], tmp_path, env)
    result = run([*args, "--limit", "-1"], tmp_path, env, ok=False)
    assert result.returncode == 2 and "internal error" not in result.stderr
    assert "--limit" in result.stderr


def test_cli_rejects_file_cannot_be_the_file_imported(tmp_path: Path, database_url: str) -> None:
    """Attack (or typo): `--rejects` naming the file being imported. Its first reject truncated
    the file while it was read, so the rows after were lost. Now refused before reading."""
    env = cli_env(tmp_path, database_url)
    run(["init"], tmp_path, env)
    rows = "".join(f"p{i}@example.org,weekly-digest\n" for i in range(3000))
    text = "email,lists\nbad,weekly-digest\n" + rows
    path = write(tmp_path / "people.csv", text)
    args = ["subscribers", "import", str(path), "--confirmed", "--rejects", "./people.csv"]
    result = run(args, tmp_path, env, ok=False)
    assert result.returncode == 1 and "cannot be the file imported" in result.stderr
    assert path.read_text(encoding="utf-8") == text
    with opened(database_url) as factory:
        assert emails(factory) == set()


def test_cli_export_of_a_name_with_escapes_is_safe_on_a_terminal_and_reads_back(
    tmp_path: Path, database_url: str
) -> None:
    """Attack: a name holding ESC sequences and BEL (`subscribers add --name` stored it before
    it refused control characters; such a name may still be in a database). `subscribers
    export` to a terminal wrote them raw, retitling and recolouring it, and the exported row
    was refused on import, so export then import lost that reader. Now each such character is
    written as U+FFFD and the reader reads back, still on their list."""
    env = cli_env(tmp_path, database_url)
    run(["init"], tmp_path, env)
    hostile = "Ann \x1b]0;pwned\x07 \x1b[31mred"
    add = ["subscribers", "add", "ann@example.org", "--list", "weekly-digest", "--confirmed"]
    run(add, tmp_path, env)
    with opened(database_url) as factory, unit_of_work(factory) as session:
        session.execute(Subscriber.__table__.update().values(name=hostile))
    shown = run(["subscribers", "export"], tmp_path, env).stdout
    assert "\x1b" not in shown and "\x07" not in shown
    assert "Ann \ufffd]0;pwned\ufffd \ufffd[31mred" in shown
    out = write(tmp_path / "export.csv", shown)
    with opened(database_url) as factory:
        with unit_of_work(factory) as session:
            session.execute(Subscription.__table__.delete())
            session.execute(Subscriber.__table__.delete())
        again = run(["subscribers", "import", str(out), "--confirmed", "--json"], tmp_path, env)
        assert '"rejected": 0' in again.stdout and '"imported": 1' in again.stdout
        with unit_of_work(factory) as session:
            [name] = session.scalars(select(Subscriber.name))
            assert name.startswith("Ann \ufffd]0;pwned")
    listed = run(["subscribers", "list", "--list", "weekly-digest", "--json"], tmp_path, env)
    assert "ann@example.org" in listed.stdout


def test_cli_add_refuses_a_name_with_a_control_character(tmp_path: Path, database_url: str) -> None:
    """Attack: `subscribers add --name` with an escape sequence (or a NUL). Import refused such
    a name, `add` stored it: it then drove the terminal of whoever listed or exported readers,
    and the reader's exported row never read back. Now it is one line and adds no one."""
    env = cli_env(tmp_path, database_url)
    run(["init"], tmp_path, env)
    result = run(
        ["subscribers", "add", "ann@example.org", "--list", "weekly-digest", "--confirmed",
         "--name", "Ann \x1b]0;owned\x07"],
        tmp_path, env, ok=False,
    )  # fmt: skip
    assert result.returncode == 1 and "control character (U+001B)" in result.stderr
    assert "ann@example.org" not in run(["subscribers", "list"], tmp_path, env).stdout
