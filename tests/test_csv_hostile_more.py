"""More hostile CSV and signals: SIGTERM and a late Ctrl-C never part an import from its rejects
file nor leave addresses in a temporary file, a segment names a column as the file does, export
then import round-trips at the column cap, surplus fields are kept, Excel's files get one clear
line (SQLite, PostgreSQL, the real CLI in real processes)."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from newsletter.db import unit_of_work
from newsletter.db.models import Subscriber
from newsletter.errors import AudienceError
from newsletter.segments import compile_rule
from newsletter.subscriber_csv import (
    KNOWN_COLUMNS,
    MAX_ATTRIBUTES,
    REJECTS_COLUMNS,
    read_csv,
)
from tests.builders import run
from tests.test_cli_hostile import read_rows, write
from tests.test_csv_hostile import cli_env, emails, import_file, lists, opened

__all__ = ["lists"]  # a fixture, used by name

PEOPLE = "email,name,lists\nann@example.org,Ann,weekly-digest\nnot-an-address,Bob,weekly-digest\n"


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def run_patched(
    patch: str, args: list[str], cwd: Path, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """`newsletter ARGS` in a fresh process that first runs `patch` (Python code): a signal
    sent at an exact point, which no timing could hit every time."""
    start = f"import sys\nfrom newsletter.cli import main\nsys.argv = ['newsletter', *{args!r}]\n"
    code = f"{patch}\n{start}main()\n"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env={**full_env, **env},
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


# --- 1. SIGTERM (a plain `kill`) cleans up as Ctrl-C does --------------------------------------

# A SIGTERM to itself while the rejects file is being written (after its first row).
TERM_ON_REJECT = """
import os, signal
import newsletter.cli.subscribers as cli
write = cli.RejectsFile.write
def on_reject(self, line, reason, raw):
    write(self, line, reason, raw)
    os.kill(os.getpid(), signal.SIGTERM)
cli.RejectsFile.write = on_reject
"""

# A SIGTERM to itself while the export is being written (after its header).
TERM_ON_EXPORT = """
import os, signal
import newsletter.cli.subscribers as cli
write_csv = cli.write_csv
def terminated(rows, columns, handle):
    handle.write(",".join(columns) + "\\r\\n")
    handle.flush()
    os.kill(os.getpid(), signal.SIGTERM)
    return write_csv(rows, columns, handle)
cli.write_csv = terminated
"""


def test_cli_sigterm_during_an_import_leaves_no_temporary_file(
    tmp_path: Path, database_url: str
) -> None:
    """Attack: `kill PID` while an import writes its rejects. The process died on the spot and a
    hidden .people.rejects.csv.XXXX.tmp holding addresses stayed for good. Now SIGTERM stops it
    as Ctrl-C does: nothing imported, one line, no temporary file."""
    env = cli_env(tmp_path, database_url)
    run(["init"], tmp_path, env)
    people = write(tmp_path / "people.csv", PEOPLE)
    args = ["subscribers", "import", str(people), "--confirmed"]
    result = run_patched(TERM_ON_REJECT, args, tmp_path, env)
    assert result.returncode == 130, result.stderr
    assert [x for x in result.stderr.splitlines() if x.strip()] == ["interrupted: nothing imported"]
    assert hidden(tmp_path) == []
    assert not (tmp_path / "people.rejects.csv").exists()
    with opened(database_url) as factory:
        assert emails(factory) == set()


def test_cli_sigterm_during_an_export_leaves_no_temporary_file(
    tmp_path: Path, database_url: str
) -> None:
    """The same for `export --out`: its half-written .export.csv.XXXX.tmp stayed behind."""
    env = cli_env(tmp_path, database_url)
    run(["init"], tmp_path, env)
    people = write(tmp_path / "people.csv", PEOPLE)
    run(["subscribers", "import", str(people), "--confirmed"], tmp_path, env)
    (tmp_path / "people.rejects.csv").unlink()
    out = tmp_path / "export.csv"
    result = run_patched(
        TERM_ON_EXPORT, ["subscribers", "export", "--out", str(out)], tmp_path, env
    )
    assert result.returncode == 130, result.stderr
    assert "Traceback" not in result.stderr
    assert hidden(tmp_path) == [] and not out.exists()


def test_cli_temporary_files_a_killed_run_left_are_removed_and_none_in_use(
    tmp_path: Path, sqlite_url: str
) -> None:
    """SIGKILL cannot be caught: the temporary file of a run killed so stayed. Now the next run
    removes ours (exact name, owned by us, not locked by a live run), and nothing else."""
    env = cli_env(tmp_path, sqlite_url)
    run(["init"], tmp_path, env)
    stale = write(tmp_path / ".export.csv.abc_1234.tmp", "ann@example.org\n")
    in_use = write(tmp_path / ".export.csv.zzzz9999.tmp", "bob@example.org\n")
    others = [
        write(tmp_path / name, "x\n")
        for name in (".export.csv.abc.tmp", ".export.csv.ABCD1234.tmp", ".other.csv.abcd1234.tmp")
    ]
    link = tmp_path / ".export.csv.link1234.tmp"
    link.symlink_to(others[0])
    with in_use.open("rb") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)  # as a live run holds its own
        run(["subscribers", "export", "--out", str(tmp_path / "export.csv")], tmp_path, env)
    assert not stale.exists()
    assert in_use.exists() and link.is_symlink() and all(p.exists() for p in others)
    assert (tmp_path / "export.csv").exists()


# --- 2. Ctrl-C as the import commits --------------------------------------------------------------

# SIGINT to itself right after the import's commit returns, or as its session closes after it
# (where the probe's late Ctrl-C landed once in 60 runs).
INTERRUPT_AFTER = """
import os, signal
from sqlalchemy.orm import Session
import newsletter.cli.subscribers as cli
armed = []
import_rows = cli.import_rows
def importing(**kw):
    armed.append(True)
    return import_rows(**kw)
cli.import_rows = importing
real = getattr(Session, {hook!r})
def hooked(self):
    real(self)
    if armed and armed.pop():
        os.kill(os.getpid(), signal.SIGINT)
setattr(Session, {hook!r}, hooked)
"""


@pytest.mark.parametrize("hook", ["commit", "close"])
def test_cli_ctrl_c_once_the_import_committed_reports_it_and_keeps_its_rejects(
    tmp_path: Path, database_url: str, hook: str
) -> None:
    """Attack: Ctrl-C just as the import commits. It said "interrupted: nothing imported" (exit
    130) and threw the rejects file away, though every good row was in. Now an interruption
    met during the commit waits for it, and one after it is too late: the import is reported
    and its rejects file is in place."""
    env = cli_env(tmp_path, database_url)
    run(["init"], tmp_path, env)
    people = write(tmp_path / "people.csv", PEOPLE)
    args = ["subscribers", "import", str(people), "--confirmed", "--json"]
    result = run_patched(INTERRUPT_AFTER.format(hook=hook), args, tmp_path, env)
    assert result.returncode == 0, result.stderr
    assert "nothing imported" not in result.stderr
    assert json.loads(result.stdout)["imported"] == 1
    assert [r[2] for r in read_rows(tmp_path / "people.rejects.csv")] == [
        "email",
        "not-an-address",
    ]
    assert hidden(tmp_path) == []
    with opened(database_url) as factory:
        assert emails(factory) == {"ann@example.org"}


# --- 3. a segment names a custom column as the file spells it ---------------------------------


def test_a_segment_names_a_custom_column_as_the_file_spells_it(
    lists: sessionmaker[Session], tmp_path: Path
) -> None:
    """Attack: a file's column `City`, stored as `city`; the segment `attr.City = "Vilnius"`
    matched nobody, so `not attr.City = "Vilnius"` reached everybody, Vilnius included. Now the
    name is matched as import stores it."""
    people = write(
        tmp_path / "p.csv",
        "email,City,lists\nv1@example.org,Vilnius,weekly-digest\n"
        "v2@example.org,Vilnius,weekly-digest\nm@example.org,Minsk,weekly-digest\n",
    )
    import_file(lists, people)

    def selected(rule: str) -> set[str]:
        with unit_of_work(lists) as session:
            return set(session.scalars(select(Subscriber.email).where(compile_rule(rule))))

    vilnius = {"v1@example.org", "v2@example.org"}
    assert selected('attr.City = "Vilnius"') == selected('attr.city = "Vilnius"') == vilnius
    assert selected('not attr.CITY = "Vilnius"') == {"m@example.org"}
    assert selected('attr.City in ("Minsk")') == {"m@example.org"}


def test_cli_segments_warn_of_an_attribute_nobody_has(tmp_path: Path, database_url: str) -> None:
    """Attack: a typo in a segment's attribute (`attr.citi`) matched nobody, and its negation
    everybody, without a word. `segments count` and `show` now warn of each attr.NAME that no
    one has, in one line; a name someone has (in any case) brings no warning."""
    env = cli_env(tmp_path, database_url)
    run(["init"], tmp_path, env)
    people = write(tmp_path / "p.csv", "email,City,lists\nv@example.org,Vilnius,weekly-digest\n")
    run(["subscribers", "import", str(people), "--confirmed"], tmp_path, env)
    typo = run(["segments", "count", "--rule", 'not attr.citi = "Vilnius"'], tmp_path, env)
    assert typo.stdout.strip() == "1"
    [warning] = typo.stderr.strip().splitlines()
    assert warning.startswith("warning:") and "'citi'" in warning
    shown = run(["segments", "show", "--rule", 'attr.CITY = "Vilnius"'], tmp_path, env)
    assert "v@example.org" in shown.stdout and "warning" not in shown.stderr


# --- 4. export then import round-trips at the column cap -----------------------------------------


def test_cli_an_export_of_the_widest_import_imports_back(tmp_path: Path, database_url: str) -> None:
    """Attack: email and 199 custom columns import; their export (9 known columns and the 199)
    was refused as "more than 200 columns". Now only email and custom columns count, so the
    export, and a rejects file of it, read back."""
    env = cli_env(tmp_path, database_url)
    run(["init"], tmp_path, env)
    names = [f"q{i}" for i in range(MAX_ATTRIBUTES)]
    wide = write(
        tmp_path / "wide.csv",
        ",".join(["email", *names])
        + "\n"
        + ",".join(["w@example.org"] + ["v"] * len(names))
        + "\n",
    )
    run(
        ["subscribers", "import", str(wide), "--list", "weekly-digest", "--confirmed"],
        tmp_path,
        env,
    )
    out = tmp_path / "export.csv"
    run(["subscribers", "export", "--out", str(out)], tmp_path, env)
    assert len(read_rows(out)[0]) == len(KNOWN_COLUMNS) + MAX_ATTRIBUTES
    result = run(["subscribers", "import", str(out), "--json"], tmp_path, env)
    counts = json.loads(result.stdout)
    assert (counts["unchanged"], counts["rejected"]) == (1, 0)
    rejects = write(
        tmp_path / "r.csv",
        ",".join([*REJECTS_COLUMNS, *read_rows(out)[0]]) + "\n1,x,not-an-address\n",
    )
    assert [error for _, _, error in read_csv(rejects)] == [""]


def test_stored_custom_keys_stay_within_the_cap_across_imports(
    lists: sessionmaker[Session], tmp_path: Path
) -> None:
    """Attack: files each under the cap, with other custom columns: stored keys piled up past it,
    and the export no longer imported. Now a row bringing a key past the cap is rejected,
    naming the column; rows with known keys still go in."""
    first = [f"a{i:03}" for i in range(MAX_ATTRIBUTES - 1)]
    import_file(
        lists,
        write(
            tmp_path / "one.csv",
            ",".join(["email", "lists", *first])
            + "\nann@example.org,weekly-digest,"
            + ",".join(["v"] * len(first))
            + "\n",
        ),
    )
    second = write(
        tmp_path / "two.csv",
        "email,lists,a000,new1,new2\n"
        "bob@example.org,weekly-digest,v,x,\n"  # one new key: the last one the cap allows
        "cid@example.org,weekly-digest,v,,y\n"  # a second: past the cap
        "dan@example.org,weekly-digest,v,x,\n",  # a key now known
    )
    counts, rejects = import_file(lists, second)
    assert counts["imported"] == 2 and counts["rejected"] == 1
    [(line, reason)] = rejects
    assert line == 3 and "'new2'" in reason and str(MAX_ATTRIBUTES) in reason
    with unit_of_work(lists) as session:
        keys = set().union(*session.scalars(select(Subscriber.attributes)))
    assert len(keys) == MAX_ATTRIBUTES and "new2" not in keys


# --- 5. surplus fields are kept in the rejects file ----------------------------------------------


def test_cli_a_row_with_more_fields_keeps_them_all_in_the_rejects_file(
    tmp_path: Path, database_url: str
) -> None:
    """Attack: an unquoted comma in a name shifts the row; its fields past the header's were
    dropped from the rejects file, so fixing and importing it lost them. Now they follow the
    header's columns, neutralised as every cell written is."""
    env = cli_env(tmp_path, database_url)
    run(["init"], tmp_path, env)
    people = write(
        tmp_path / "people.csv",
        "email,name,lists\r\nann@example.org,Smith, Ann,weekly-digest,=HYPERLINK(1)\r\n"
        "ok@example.org,Ok,weekly-digest\r\n",
    )
    run(["subscribers", "import", str(people), "--confirmed"], tmp_path, env)
    [header, row] = read_rows(tmp_path / "people.rejects.csv")
    assert header == [*REJECTS_COLUMNS, "email", "name", "lists"]
    assert row[2:] == ["ann@example.org", "Smith", " Ann", "weekly-digest", "'=HYPERLINK(1)"]
    with opened(database_url) as factory:
        assert emails(factory) == {"ok@example.org"}


# --- 6. Excel's files -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param(
            b"\xef\xbb\xbfemail;name;lists\r\nanna@example.org;Anna;weekly-digest\r\n",
            "columns separated by ';'",
            id="semicolons",
        ),
        pytest.param(
            b"email\tname\r\nanna@example.org\tAnna\r\n", "columns separated by tabs", id="tabs"
        ),
    ],
)
def test_excel_separators_are_named_in_one_line(tmp_path: Path, data: bytes, message: str) -> None:
    """Excel (be, ru and most European locales) saves "CSV" with ';': the answer said the file
    had no 'email' column. Now it names the separator."""
    path = tmp_path / "excel.csv"
    path.write_bytes(data)
    with pytest.raises(AudienceError, match=message) as raised:
        list(read_csv(path))
    assert "\n" not in str(raised.value) and "save as comma-separated CSV" in str(raised.value)


def test_two_byte_order_marks_are_read_past(lists: sessionmaker[Session], tmp_path: Path) -> None:
    """`cat a.csv b.csv` of two BOM files, or a tool adding one more: the first name was
    "\\ufeffemail" and the file was refused. Now extra BOMs before the header are dropped."""
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbf\xef\xbb\xbfemail,lists\r\nanna@example.org,weekly-digest\r\n")
    counts, rejects = import_file(lists, path)
    assert counts["imported"] == 1 and rejects == []
