"""Reading choices in CSV: `discreet` and `on_key_problem` columns are imported, checked row by row
(a bad value rejects only its row, in one line), never lower a known reader's protection, and
export then import round-trips them (SQLite, PostgreSQL, the real CLI)."""

from __future__ import annotations

import csv
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from newsletter.db import unit_of_work
from newsletter.db.models import ReaderKey, Subscriber, Subscription
from newsletter.importer import import_rows
from newsletter.lists import read_lists, sync_lists
from newsletter.subscriber_csv import FORMULA_STARTS, read_csv
from tests.builders import run
from tests.conftest import SECRET
from tests.gpg_keys import GpgHome
from tests.test_csv_hostile import cli_env, opened

ROOT = Path(__file__).resolve().parents[1]
NOW = datetime(2026, 11, 23, tzinfo=UTC)
HEADER = "email,name,lists,discreet,on_key_problem"

# (line as written, what the row's reason must contain; "" = the row is good)
ROWS = [
    ("ok1@example.org,One,weekly-digest,pointer,plain", ""),
    ("ok2@example.org,Two,weekly-digest,ENVELOPE , WITHHOLD", ""),
    ("ok3@example.org,Three,weekly-digest,,", ""),
    ("cmd@example.org,Cmd,weekly-digest,\"=cmd|' /C calc'!A0\",", "discreet must be one of"),
    ("nope@example.org,Nope,weekly-digest,,nope", "on_key_problem must be one of"),
    ("long@example.org,Long,weekly-digest," + "p" * 10_000 + ",", "longer than 1000"),
    ("nul@example.org,Nul,weekly-digest,poin\x00ter,", "U+0000"),
    ('crlf@example.org,Crlf,weekly-digest,"poin\r\nter",', "discreet must be one of"),
]
GOOD_STORED = {
    "ok1@example.org": ("pointer", "plain"),
    "ok2@example.org": ("envelope", "withhold"),
    "ok3@example.org": ("off", "withhold"),
}


@pytest.fixture
def lists(factory: sessionmaker[Session]) -> sessionmaker[Session]:
    with unit_of_work(factory) as session:
        sync_lists(session=session, specs=read_lists(ROOT / "subscribers" / "lists.toml"))
    return factory


def write_file(path: Path, lines: list[str]) -> Path:
    path.write_bytes(("\r\n".join([HEADER, *lines]) + "\r\n").encode())
    return path


def import_file(
    factory: sessionmaker[Session], path: Path
) -> tuple[dict[str, int], list[tuple[int, str]]]:
    with unit_of_work(factory) as session:
        report = import_rows(
            session=session,
            rows=read_csv(path),
            default_list=None,
            confirmed=True,
            secret=SECRET,
            now=NOW,
            actor="test",
        )
    return report.counts(), report.rejects


def choices(factory: sessionmaker[Session]) -> dict[str, tuple[str, str]]:
    with unit_of_work(factory) as session:
        rows = session.execute(
            select(Subscriber.email, Subscriber.discreet, Subscriber.on_key_problem)
        )
        return {email: (discreet, choice) for email, discreet, choice in rows}


def bad_lines() -> dict[int, str]:
    """The first line number of each bad row in the written file, with its expected reason."""
    expected, line = {}, 2
    for text, reason in ROWS:
        if reason:
            expected[line] = reason
        line += 1 + text.count("\r\n")
    return expected


def test_import_stores_choices_and_refuses_each_bad_value_alone(
    lists: sessionmaker[Session], tmp_path: Path
) -> None:
    """Good rows keep their choices (case and spaces forgiven); each bad row gets one line."""
    counts, rejects = import_file(lists, write_file(tmp_path / "p.csv", [r for r, _ in ROWS]))
    assert counts["imported"] == 3 and counts["rejected"] == 5
    assert choices(lists) == GOOD_STORED
    assert dict(rejects).keys() == bad_lines().keys()
    for line, reason in rejects:
        assert bad_lines()[line] in reason, (line, reason)
        assert "\n" not in reason and "\r" not in reason and "\x00" not in reason
        assert len(reason) < 200


def test_cli_import_sends_bad_rows_to_the_rejects_file(tmp_path: Path, database_url: str) -> None:
    """`subscribers import`: the good rows go in, each bad one is a row of the rejects file."""
    env = cli_env(tmp_path, database_url)
    run(["init"], tmp_path, env)
    path = write_file(tmp_path / "people.csv", [r for r, _ in ROWS])
    result = run(["subscribers", "import", str(path), "--json"], tmp_path, env)
    counts = json.loads(result.stdout)
    assert counts["imported"] == 3 and counts["rejected"] == 5
    assert "Traceback" not in result.stderr
    with (tmp_path / "people.rejects.csv").open(encoding="utf-8", newline="") as handle:
        header, *rows = list(csv.reader(handle))
    assert header == [
        "rejected_line",
        "rejected_reason",
        "email",
        "name",
        "lists",
        "discreet",
        "on_key_problem",
    ]
    assert {int(r[0]): r[1] for r in rows}.keys() == bad_lines().keys()
    for row in rows:
        assert bad_lines()[int(row[0])] in row[1]
        for cell in row:
            assert cell.lstrip(" ")[:1] not in FORMULA_STARTS, cell
    cmd = next(r for r in rows if r[2] == "cmd@example.org")
    assert cmd[5] == "'=cmd|' /C calc'!A0"  # kept, shown as text to a spreadsheet
    with opened(database_url) as factory:
        assert choices(factory) == GOOD_STORED


def test_a_file_never_lowers_a_known_readers_protection(
    lists: sessionmaker[Session], tmp_path: Path
) -> None:
    """For people already known: more discreet and `withhold` go in; less never does."""
    first = [
        "a@example.org,A,weekly-digest,pointer,withhold",
        "b@example.org,B,weekly-digest,envelope,plain",
        "c@example.org,C,weekly-digest,off,withhold",
        "d@example.org,D,weekly-digest,,",
    ]
    import_file(lists, write_file(tmp_path / "1.csv", first))
    second = [
        "a@example.org,A,weekly-digest,off,plain",
        "b@example.org,B,weekly-digest,pointer,withhold",
        "c@example.org,C,weekly-digest,envelope,plain",
        "d@example.org,D,weekly-digest,,",
    ]
    counts, rejects = import_file(lists, write_file(tmp_path / "2.csv", second))
    assert rejects == []
    assert counts["updated"] == 2 and counts["unchanged"] == 2
    assert choices(lists) == {
        "a@example.org": ("pointer", "withhold"),
        "b@example.org": ("pointer", "withhold"),
        "c@example.org": ("envelope", "withhold"),
        "d@example.org": ("off", "withhold"),
    }


def test_repeated_rows_merge_their_choices(lists: sessionmaker[Session], tmp_path: Path) -> None:
    """Two rows for one new address: the later non-empty value wins, as for other columns."""
    rows = [
        "x@example.org,X,weekly-digest,envelope,plain",
        "x@example.org,X,urgent-actions,pointer,",
    ]
    counts, _ = import_file(lists, write_file(tmp_path / "p.csv", rows))
    assert counts["imported"] == 1 and counts["duplicates"] == 1
    assert choices(lists) == {"x@example.org": ("pointer", "plain")}


def test_cli_export_then_import_round_trips_the_choices(tmp_path: Path, database_url: str) -> None:
    """Export writes both columns; importing it into an emptied database gives them back."""
    env = cli_env(tmp_path, database_url)
    run(["init"], tmp_path, env)
    people = [
        ("p@example.org", "pointer", "plain"),
        ("e@example.org", "envelope", "withhold"),
        ("o@example.org", "off", "plain"),
    ]
    for email, discreet, choice in people:
        run(["subscribers", "add", email, "--list", "weekly-digest", "--confirmed",
             "--discreet", discreet, "--on-key-problem", choice], tmp_path, env)  # fmt: skip
    exported = tmp_path / "export.csv"
    run(["subscribers", "export", "--out", str(exported)], tmp_path, env)
    with exported.open(encoding="utf-8", newline="") as handle:
        cells = list(csv.DictReader(handle))
    assert {(r["email"], r["discreet"], r["on_key_problem"]) for r in cells} == set(people)
    with opened(database_url) as factory:
        before = choices(factory)
        with unit_of_work(factory) as session:
            session.execute(delete(Subscription))
            session.execute(delete(Subscriber))
        assert choices(factory) == {}
    again = run(["subscribers", "import", str(exported), "--confirmed", "--json"], tmp_path, env)
    assert json.loads(again.stdout)["rejected"] == 0
    with opened(database_url) as factory:
        assert choices(factory) == before == {e: (d, c) for e, d, c in people}


def test_keys_travel_with_an_export_and_are_checked_on_import(
    tmp_path: Path, database_url: str
) -> None:
    """An active key is exported in `openpgp_key` and comes back active in an emptied database
    (a withhold reader stays encrypted); a pending key is not exported; a key for another
    address, or garbage, rejects only its row, in one line."""
    env = cli_env(tmp_path, database_url)
    run(["init"], tmp_path, env)
    home = GpgHome.make(tmp_path / "gnupg")
    try:
        files = {}
        for email in ("keyed@example.org", "waiting@example.org", "eve@example.org"):
            fpr = home.generate(f"Someone <{email}>")
            home.add_key(fpr)
            files[email] = tmp_path / f"{email}.asc"
            files[email].write_text(home.export(fpr))
            run(["subscribers", "add", email, "--list", "weekly-digest", "--confirmed"],
                tmp_path, env)  # fmt: skip
        run(["subscribers", "key", "keyed@example.org", "--file", str(files["keyed@example.org"]),
             "--confirmed"], tmp_path, env)  # fmt: skip
        run(["subscribers", "key", "waiting@example.org", "--file",
             str(files["waiting@example.org"])], tmp_path, env)  # fmt: skip
    finally:
        home.close()
    exported = tmp_path / "export.csv"
    run(["subscribers", "export", "--out", str(exported)], tmp_path, env)
    with exported.open(encoding="utf-8", newline="") as handle:
        cells = {r["email"]: r["openpgp_key"] for r in csv.DictReader(handle)}
    assert "BEGIN PGP PUBLIC KEY BLOCK" in cells["keyed@example.org"]
    assert cells["waiting@example.org"] == "" and cells["eve@example.org"] == ""
    with opened(database_url) as factory, unit_of_work(factory) as session:
        before = sorted(
            tuple(r) for r in session.execute(select(ReaderKey.status, ReaderKey.fingerprint))
        )
        session.execute(delete(ReaderKey))
        session.execute(delete(Subscription))
        session.execute(delete(Subscriber))
    hostile = tmp_path / "hostile.csv"
    with exported.open(encoding="utf-8", newline="") as src, hostile.open("w", newline="") as out:
        rows = list(csv.DictReader(src))
        writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\r\n")
        writer.writeheader()
        for row in rows:
            if row["email"] == "eve@example.org":  # someone else's key for eve: refused
                row["openpgp_key"] = cells["keyed@example.org"]
            if row["email"] == "waiting@example.org":
                row["openpgp_key"] = "-----BEGIN PGP PUBLIC KEY BLOCK-----\nnot a key\n"
            writer.writerow(row)
    done = run(["subscribers", "import", str(hostile), "--confirmed", "--json"], tmp_path, env)
    report = json.loads(done.stdout)
    assert (report["imported"], report["rejected"], report["keys"]) == (1, 2, 1)
    reasons = (tmp_path / "hostile.rejects.csv").read_text()
    assert reasons.count("openpgp_key:") == 2 and "not for eve@example.org" in reasons
    assert "BEGIN PGP" not in reasons  # a key cell is never copied to the rejects file
    with opened(database_url) as factory, unit_of_work(factory) as session:
        after = sorted(
            tuple(r) for r in session.execute(select(ReaderKey.status, ReaderKey.fingerprint))
        )
    assert [k for k in before if k[0] == "active"] == after
