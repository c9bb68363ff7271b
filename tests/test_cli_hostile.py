"""The admin CLI against hostile files and paths: imports are all-or-nothing with their rejects
file, cell text is never read as rows, devices and pipes are never replaced or read, erasing
asks, and broken declarations or a busy database are one line (SQLite, PostgreSQL, the real CLI).
"""

from __future__ import annotations

import csv
import json
import os
import pty
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from newsletter.db import unit_of_work
from newsletter.db.models import Subscriber
from newsletter.subscriber_csv import neutralise_cell, restore_cell
from tests.builders import run
from tests.test_csv_hostile import cli_env, emails, opened


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8", newline="")
    return path


def read_rows(path: Path) -> list[list[str]]:
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.reader(handle))


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one line a refused command prints (never an internal error or a traceback)."""
    assert result.returncode not in (0, 70), result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


PEOPLE = "email,name,lists\nann@example.org,Ann,weekly-digest\nnot-an-address,Bob,weekly-digest\n"


# --- 1. the rejects file and the import are all-or-nothing ------------------------------------


@pytest.mark.parametrize("where", ["folder", "missing-folder"])
def test_cli_an_unwritable_rejects_path_stops_the_import_before_anything_is_written(
    tmp_path: Path, database_url: str, where: str
) -> None:
    """Attack: --rejects names a folder (or a file in no folder). The rows were committed, then
    writing the rejects failed: exit 1, rows in, rejects lost. Now nothing is imported."""
    env = cli_env(tmp_path, database_url)
    run(["init"], tmp_path, env)
    people = write(tmp_path / "people.csv", PEOPLE)
    rejects = tmp_path / "rejdir"
    if where == "folder":
        rejects.mkdir()
    else:
        rejects = rejects / "r.csv"
    args = ["subscribers", "import", str(people), "--confirmed", "--rejects", str(rejects)]
    line = one_error_line(run(args, tmp_path, env, ok=False))
    assert str(rejects) in line
    with opened(database_url) as factory:
        assert emails(factory) == set()
    assert [p.name for p in tmp_path.rglob(".*")] == []  # no temporary file left


def test_cli_the_rejects_file_is_in_place_after_an_import_that_went_through(
    tmp_path: Path, database_url: str
) -> None:
    """The other half: a good import leaves its rejects file, whole, and no temporary file."""
    env = cli_env(tmp_path, database_url)
    run(["init"], tmp_path, env)
    people = write(tmp_path / "people.csv", PEOPLE)
    run(["subscribers", "import", str(people), "--confirmed"], tmp_path, env)
    rows = read_rows(tmp_path / "people.rejects.csv")
    assert [r[2] for r in rows] == ["email", "not-an-address"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    with opened(database_url) as factory:
        assert emails(factory) == {"ann@example.org"}


# --- 2. a cell longer than the csv module's own limit ------------------------------------------


def test_cli_text_inside_a_cell_over_the_csv_field_limit_is_never_read_as_rows(
    tmp_path: Path, database_url: str
) -> None:
    """Attack (the probe's midfield3.csv): a quoted cell of 200,000 characters whose text holds
    a line `evil@example.org,x,urgent-actions`. The csv module stopped at 131,072 characters and
    reading went on inside the cell, importing `evil`. Now the cell is read whole: its row is
    rejected (too long a name) and the next row goes in."""
    env = cli_env(tmp_path, database_url)
    run(["init"], tmp_path, env)
    cell = "A" * 200_000 + "\n\nevil@example.org,x,weekly-digest\n"
    people = write(
        tmp_path / "mid.csv",
        f'email,name,lists\nmid5@example.org,"{cell}",weekly-digest\n'
        "mid6@example.org,ok,weekly-digest\n",
    )
    result = run(["subscribers", "import", str(people), "--confirmed", "--json"], tmp_path, env)
    counts = json.loads(result.stdout)
    assert (counts["imported"], counts["rejected"]) == (1, 1)
    with opened(database_url) as factory:
        assert emails(factory) == {"mid6@example.org"}


# --- 3 and 5. devices, pipes and links are neither replaced nor read --------------------------


@pytest.mark.parametrize("shape", ["fifo", "link-to-fifo", "folder"])
def test_cli_export_and_rejects_never_replace_what_is_not_a_regular_file(
    tmp_path: Path, database_url: str, shape: str
) -> None:
    """Attack: `--out /dev/stdout` (a link to a device) as root: the export was renamed over it,
    leaving everyone's data in /dev. A FIFO and a link to one stand in for the device here. Now
    such a path is refused in one line and left as it was."""
    env = cli_env(tmp_path, database_url)
    run(["init"], tmp_path, env)
    people = write(tmp_path / "people.csv", PEOPLE)
    target = tmp_path / "target"
    if shape == "folder":
        target.mkdir()
    else:
        os.mkfifo(tmp_path / "fifo")
        if shape == "fifo":
            target = tmp_path / "fifo"
        else:
            target.symlink_to(tmp_path / "fifo")
    before = os.lstat(target).st_mode
    line = one_error_line(
        run(["subscribers", "export", "--out", str(target)], tmp_path, env, False)
    )
    assert "not a regular file" in line
    args = ["subscribers", "import", str(people), "--confirmed", "--rejects", str(target)]
    line = one_error_line(run(args, tmp_path, env, ok=False, timeout=30))
    assert "not a regular file" in line
    assert os.lstat(target).st_mode == before
    assert not stat.S_ISREG(os.stat(target).st_mode)
    with opened(database_url) as factory:
        assert emails(factory) == set()


@pytest.mark.parametrize("shape", ["fifo", "folder"])
def test_cli_import_reads_only_a_regular_file(tmp_path: Path, sqlite_url: str, shape: str) -> None:
    """Attack: importing a FIFO (or /dev/zero, a process substitution) hung: the lines were
    counted, then the file opened again. Now anything but a regular file is one line."""
    env = cli_env(tmp_path, sqlite_url)
    run(["init"], tmp_path, env)
    source = tmp_path / "source.csv"
    if shape == "fifo":
        os.mkfifo(source)
    else:
        source.mkdir()
    line = one_error_line(run(["subscribers", "import", str(source)], tmp_path, env, False, 30))
    assert "not a regular file" in line


# --- 4. forget asks ------------------------------------------------------------------------------


def test_cli_forget_without_a_terminal_needs_yes(tmp_path: Path, database_url: str) -> None:
    """Attack: `echo n | newsletter subscribers forget ADDRESS` erased them without asking. Now,
    as `alert send`, it refuses without a terminal unless --yes is given."""
    env = cli_env(tmp_path, database_url)
    run(["init"], tmp_path, env)
    add = ["subscribers", "add", "ann@example.org", "--list", "weekly-digest", "--confirmed"]
    run(add, tmp_path, env)
    line = one_error_line(run(["subscribers", "forget", "ann@example.org"], tmp_path, env, False))
    assert "no terminal" in line and "--yes" in line
    with opened(database_url) as factory:
        assert emails(factory) == {"ann@example.org"}
    run(["subscribers", "forget", "ann@example.org", "--yes"], tmp_path, env)
    with opened(database_url) as factory:
        assert "ann@example.org" not in emails(factory)


# --- 6. bidi controls on a terminal ---------------------------------------------------------------


def export_on_a_terminal(tmp_path: Path, env: dict[str, str]) -> str:
    """What `subscribers export` prints to a terminal (a pseudo-terminal's other end)."""
    leader, follower = pty.openpty()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "newsletter", "subscribers", "export"],
        cwd=tmp_path,
        env={**full_env, **env},
        stdin=subprocess.DEVNULL,
        stdout=follower,
        stderr=subprocess.DEVNULL,
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the other end closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert process.wait(timeout=60) == 0
    os.close(leader)
    return b"".join(chunks).decode("utf-8")


def test_cli_export_escapes_bidi_controls_on_a_terminal_and_keeps_them_in_a_pipe(
    tmp_path: Path, sqlite_url: str
) -> None:
    """Attack: a name with U+202E (right-to-left override) reordered what the terminal showed
    of the export. Now on a terminal it is shown as \\u202e; a pipe still gets the exact name,
    which import reads back."""
    env = cli_env(tmp_path, sqlite_url)
    run(["init"], tmp_path, env)
    name = "Ann \u202eevil\u2066x\u2069"
    run(
        ["subscribers", "add", "ann@example.org", "--list", "weekly-digest", "--name", name],
        tmp_path,
        env,
    )
    shown = export_on_a_terminal(tmp_path, env)
    assert "\\u202e" in shown and "\u202e" not in shown and "\u2066" not in shown
    assert "ann@example.org" in shown
    piped = run(["subscribers", "export"], tmp_path, env).stdout
    assert name in piped


# --- 7. broken declarations and a busy database are one line -----------------------------------


@pytest.mark.parametrize(
    ("lists", "segments", "problem"),
    [
        pytest.param('lists = ["x"]\n', None, "must be a table", id="lists-of-strings"),
        pytest.param('lists = "abc"\n', None, "'lists' must be tables", id="lists-a-string"),
        pytest.param(
            '[[lists]]\nslug = "a"\nkind = "digest"\nname = ["a"]\n', None, "'name'", id="name"
        ),
        pytest.param(
            '[[lists]]\nslug = "a"\nkind = "digest"\n[[lists]]\nslug = "a"\nkind = "alerts"\n',
            None,
            "declared twice",
            id="slug-twice",
        ),
        pytest.param("", 'segments = ["x"]\n', "'segments' must be tables", id="segments"),
        pytest.param(
            "",
            '[[segments]]\nname = "late"\nrule = "subscribed_after = 9999-12-31"\n',
            None,
            id="last-day",
        ),
    ],
)
def test_cli_broken_declarations_are_one_line(
    tmp_path: Path, database_url: str, lists: str, segments: str | None, problem: str | None
) -> None:
    """Attack: lists.toml or segments.toml of the wrong shape, a slug declared twice, the last
    day there is: each was an internal error (exit 70). Now a line naming the file (or, for the
    last day, a segment that selects nobody)."""
    env = cli_env(tmp_path, database_url)
    run(["init"], tmp_path, env)
    declared = write(tmp_path / "lists.toml", lists)
    args = ["lists", "sync", str(declared)]
    if segments is not None:
        args += ["--segments", str(write(tmp_path / "segments.toml", segments))]
    result = run(args, tmp_path, env, ok=problem is None)
    if problem is not None:
        line = one_error_line(result)
        assert problem in line and str(tmp_path) in line


def test_cli_a_rule_on_the_last_day_counts_nobody(tmp_path: Path, database_url: str) -> None:
    """`subscribed_after = 9999-12-31` overflowed (an internal error); nobody is after it."""
    env = cli_env(tmp_path, database_url)
    run(["init"], tmp_path, env)
    add = ["subscribers", "add", "ann@example.org", "--list", "weekly-digest", "--confirmed"]
    run(add, tmp_path, env)
    args = ["segments", "count", "--rule", "subscribed_after = 9999-12-31", "--json"]
    assert json.loads(run(args, tmp_path, env).stdout) == {"count": 0}
    args = ["segments", "count", "--rule", "subscribed_before = 9999-12-31", "--json"]
    assert json.loads(run(args, tmp_path, env).stdout) == {"count": 1}


def test_cli_an_import_behind_another_writer_says_busy(tmp_path: Path, sqlite_url: str) -> None:
    """Attack: an import waiting past SQLite's busy timeout (30 s) behind another import was an
    internal error. Now it is one line saying nothing was imported."""
    env = cli_env(tmp_path, sqlite_url)
    run(["init"], tmp_path, env)
    people = write(tmp_path / "people.csv", PEOPLE)
    holder = sqlite3.connect(tmp_path / "test.db", isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # another writer, holding the lock
        result = run(["subscribers", "import", str(people)], tmp_path, env, False, 120)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert "database busy: nothing imported; try again" in one_error_line(result)
    assert not (tmp_path / "people.rejects.csv").exists()


# --- 8. formulas behind small forms and format characters --------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "\ufe66SUM(A1)",
        "\ufe62 1",
        "\ufe63 1",
        "\ufe6bx",
        "\u200b=1",
        "\ufeff+1",
        "\u200e -1",
        " \u2060@x",
    ],
)
def test_small_forms_and_format_characters_before_a_formula_are_neutralised(value: str) -> None:
    """Attack: ﹦ ﹢ ﹣ ﹫ (small forms a spreadsheet may fold to = + - @), or a zero-width space
    or BOM before =, passed unquoted. Now they get the leading ' and read back exactly."""
    cell = neutralise_cell(value)
    assert cell == "'" + value
    assert restore_cell(cell) == value
    assert neutralise_cell("a\ufe66") == "a\ufe66"  # only a leading one counts


# --- 9. a source's own `line` and `reason` columns ---------------------------------------------


def test_cli_a_sources_line_and_reason_columns_are_kept_apart_from_the_rejects_own(
    tmp_path: Path, database_url: str
) -> None:
    """Attack: a source with `line` and `reason` columns lost them in the rejects file, and a
    rejects file read back stored its line and reason as attributes of everyone. Now the
    rejects file's own columns are rejected_line and rejected_reason, which import ignores."""
    env = cli_env(tmp_path, database_url)
    run(["init"], tmp_path, env)
    people = write(
        tmp_path / "people.csv",
        "email,lists,line,reason\nann@example.org,weekly-digest,L1,R1\n"
        "bob-at-example.org,weekly-digest,L2,R2\n",
    )
    run(["subscribers", "import", str(people), "--confirmed"], tmp_path, env)
    rejects = tmp_path / "people.rejects.csv"
    header, row = read_rows(rejects)
    assert header == ["rejected_line", "rejected_reason", "email", "lists", "line", "reason"]
    assert row[0] == "3" and row[2:] == ["bob-at-example.org", "weekly-digest", "L2", "R2"]
    fixed = write(tmp_path / "fixed.csv", rejects.read_text(encoding="utf-8").replace("-at-", "@"))
    run(["subscribers", "import", str(fixed), "--confirmed"], tmp_path, env)
    with opened(database_url) as factory, unit_of_work(factory) as session:
        attributes = dict(session.execute(select(Subscriber.email, Subscriber.attributes)).all())
    assert attributes["bob@example.org"] == {"line": "L2", "reason": "R2"}
    assert attributes["ann@example.org"] == {"line": "L1", "reason": "R1"}


# --- 10. Ctrl-C and the summary line --------------------------------------------------------------


def test_cli_ctrl_c_during_an_import_says_nothing_was_imported(
    tmp_path: Path, sqlite_url: str
) -> None:
    """Ctrl-C during an import exited 130 without a word. Now one line says nothing went in."""
    env = cli_env(tmp_path, sqlite_url)
    run(["init"], tmp_path, env)
    rows = "".join(f"p{i}@example.org,weekly-digest\n" for i in range(300_000))
    people = write(tmp_path / "people.csv", "email,lists\n" + rows)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "newsletter", "subscribers", "import", str(people)],
        cwd=tmp_path,
        env={**full_env, **env},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".people.rejects.csv.*")):  # made just before the import
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert [line for line in err.splitlines() if line.strip()] == ["interrupted: nothing imported"]
    with opened(sqlite_url) as factory:
        assert emails(factory) == set()
    assert list(tmp_path.glob(".people.rejects.csv.*")) == []


def test_cli_the_import_summary_is_one_line_in_a_pipe(tmp_path: Path, sqlite_url: str) -> None:
    """The summary wrapped at 80 columns when stdout was not a terminal; now it is one line."""
    env = {**cli_env(tmp_path, sqlite_url), "COLUMNS": ""}
    run(["init"], tmp_path, env)
    people = write(tmp_path / "people.csv", PEOPLE)
    out = run(["subscribers", "import", str(people), "--confirmed"], tmp_path, env).stdout
    [line] = out.splitlines()
    assert line.startswith("imported 1, ") and line.endswith(", keys 0") and len(line) > 80
