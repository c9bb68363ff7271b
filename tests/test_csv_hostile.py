"""Hostile CSV and outside text: a bad value rejects only its row, no error names anyone, exports
are safe to open in a spreadsheet and read back unchanged, every address taken can be
delivered, and the CLI prints outside text as text (SQLite, PostgreSQL, the real CLI)."""

from __future__ import annotations

import csv
import io
import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from newsletter.addresses import address_forms, normalise_email
from newsletter.db import make_engine, make_sessionmaker, unit_of_work
from newsletter.db.models import (
    Campaign,
    CampaignKind,
    CampaignStatus,
    Delivery,
    DeliveryStatus,
    Source,
    Subscriber,
    Subscription,
    Suppression,
)
from newsletter.errors import AudienceError, PermanentDeliveryError
from newsletter.importer import import_rows
from newsletter.lists import get_list, read_lists, sync_lists
from newsletter.message import Recipient, format_to
from newsletter.subscriber_csv import FORMULA_STARTS, neutralise_cell, read_csv, restore_cell
from newsletter.subscriptions import find_subscriber, forget, subscribe
from newsletter.suppression import hash_address
from tests.conftest import SECRET, SmtpServer
from tests.test_audience import _snapshot as snapshot
from tests.test_cli import run, write_config

ROOT = Path(__file__).resolve().parents[1]
LISTS = ROOT / "subscribers" / "lists.toml"
NOW = datetime(2026, 11, 23, tzinfo=UTC)

# Good rows around one bad one: nothing of these may appear in the bad row's reason or output.
GOOD = [
    ("alice.private@example.org", "Alice Private"),
    ("bob.private@example.org", "Bob Private"),
    ("carol.private@example.org", "Carol Private"),
]


@pytest.fixture
def lists(factory: sessionmaker[Session]) -> sessionmaker[Session]:
    with unit_of_work(factory) as session:
        sync_lists(session=session, specs=read_lists(LISTS))
    return factory


def write_rows(path: Path, bad: str) -> Path:
    """A CSV of the good rows with `bad` (a whole line) as line 3."""
    lines = ["email,name,lists,tags,=city"]
    lines += [f"{e},{n},weekly-digest,press,Vilnius" for e, n in GOOD[:1]]
    lines.append(bad)
    lines += [f"{e},{n},weekly-digest,press,Vilnius" for e, n in GOOD[1:]]
    path.write_bytes(("\n".join(lines) + "\n").encode("utf-8", "surrogateescape"))
    return path


def import_file(factory: sessionmaker[Session], path: Path) -> tuple[dict[str, int], list[Any]]:
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


def emails(factory: sessionmaker[Session]) -> set[str]:
    with unit_of_work(factory) as session:
        return set(session.scalars(select(Subscriber.email)))


def assert_names_nobody(output: str) -> None:
    """No good row's address or name (nor any part of them) in an error or reason."""
    for email, name in GOOD:
        for secret in (email, email.split("@")[0], name, name.split()[0]):
            assert secret not in output, secret


BAD_ROWS = [
    pytest.param("nul@example.org,Nul\x00Name,weekly-digest,,", "U+0000", id="nul-in-name"),
    pytest.param("nul2@example.org,Name,weekly-digest,a\x00b,", "U+0000", id="nul-in-tags"),
    pytest.param("esc@example.org,Esc\x1b[31m,weekly-digest,,", "U+001B", id="esc-in-name"),
    pytest.param("c1@example.org,Name,weekly-digest,,Vil\x85nius", "U+0085", id="c1-in-attribute"),
    pytest.param("del@example.org,Name,weekly-digest,,x\x7f", "U+007F", id="del-in-attribute"),
    pytest.param("n\x00ul@example.org,Name,weekly-digest,,", "U+0000", id="nul-in-email"),
    pytest.param("long@example.org,Name,weekly-digest,," + "x" * 5000, "longer", id="over-long"),
    pytest.param("latin@example.org,Jos\udce9,weekly-digest,,", "UTF-8", id="not-utf8"),
]


@pytest.mark.parametrize(("bad", "reason_part"), BAD_ROWS)
def test_a_bad_value_rejects_only_its_row(
    lists: sessionmaker[Session], tmp_path: Path, bad: str, reason_part: str
) -> None:
    """A control character, an over-long cell or bad UTF-8 rejects its row; the rest go in."""
    counts, rejects = import_file(lists, write_rows(tmp_path / "p.csv", bad))
    assert emails(lists) == {e for e, _ in GOOD}
    assert counts["imported"] == 3 and counts["rejected"] == 1
    [(line, reason)] = rejects
    assert line == 3 and reason_part in reason
    assert_names_nobody(reason)
    assert "\x00" not in reason and "\x1b" not in reason


def add_refusal(engine: Engine) -> None:
    """Make the database itself refuse one name, as it would a value no check foresaw."""
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            conn.execute(
                text(
                    "CREATE TRIGGER refuse_name BEFORE INSERT ON subscribers "
                    "WHEN NEW.name = 'Refuse Me' BEGIN SELECT RAISE(ABORT, 'refused'); END"
                )
            )
        else:
            conn.execute(
                text(
                    "ALTER TABLE subscribers ADD CONSTRAINT refuse_name CHECK (name <> 'Refuse Me')"
                )
            )


def test_a_row_the_database_refuses_is_rejected_alone_in_one_transaction(
    lists: sessionmaker[Session], tmp_path: Path
) -> None:
    """A row the database refuses is rejected by itself; the import stays one transaction."""
    bind = lists.kw["bind"]
    add_refusal(bind)
    path = write_rows(tmp_path / "p.csv", "refused@example.org,Refuse Me,weekly-digest,,")
    counts, rejects = import_file(lists, path)
    assert rejects == [(3, "the database refused this row (IntegrityError)")]
    assert counts["imported"] == 3 and emails(lists) == {e for e, _ in GOOD}
    # The chunk's savepoint nests in the import's transaction: failing afterwards keeps nothing.
    (tmp_path / "q.csv").write_text("email,lists\nlater@example.org,weekly-digest\n")
    with pytest.raises(RuntimeError), unit_of_work(lists) as session:
        import_rows(
            session=session,
            rows=read_csv(tmp_path / "q.csv"),
            default_list=None,
            confirmed=True,
            secret=SECRET,
            now=NOW,
            actor="test",
            chunk_rows=1,
        )
        raise RuntimeError("after the import")
    assert "later@example.org" not in emails(lists)


@contextmanager
def opened(url: str) -> Iterator[sessionmaker[Session]]:
    """Sessions on the database a CLI run made, the engine closed afterwards."""
    engine = make_engine(url)
    try:
        yield make_sessionmaker(engine)
    finally:
        engine.dispose()


def cli_env(tmp_path: Path, database_url: str) -> dict[str, str]:
    (tmp_path / "config.toml").write_text(f"[database]\nurl = '{database_url}'\n")
    return {"NEWSLETTER_SECRET": SECRET, "COLUMNS": "1000"}  # wide: no cell wraps


def test_cli_import_with_a_nul_row_imports_the_rest_and_names_nobody(
    tmp_path: Path, database_url: str
) -> None:
    """`subscribers import`: a NUL in one row rejects that row only, on either database."""
    env = cli_env(tmp_path, database_url)
    run(["init"], tmp_path, env)
    path = write_rows(tmp_path / "people.csv", "nul@example.org,=Nul\x00Name,weekly-digest,,")
    result = run(["subscribers", "import", str(path), "--confirmed", "--json"], tmp_path, env)
    assert '"imported": 3' in result.stdout and '"rejected": 1' in result.stdout
    assert_names_nobody(result.stdout + result.stderr)
    with (tmp_path / "people.rejects.csv").open(encoding="utf-8", newline="") as handle:
        [header, row] = list(csv.reader(handle))
    assert header == [
        "rejected_line",
        "rejected_reason",
        "email",
        "name",
        "lists",
        "tags",
        "'=city",
    ]
    assert row[0] == "3" and "U+0000" in row[1]
    assert row[3] == "'=Nul\ufffdName"  # shown, neutralised, and no NUL in the file
    assert_names_nobody(",".join(row))


def test_cli_database_error_is_shown_without_its_values(tmp_path: Path, database_url: str) -> None:
    """A database error outside an import is one line naming its kind, never the row's data."""
    env = cli_env(tmp_path, database_url)
    run(["init"], tmp_path, env)
    with opened(database_url) as factory:
        add_refusal(factory.kw["bind"])
    args = ["subscribers", "add", GOOD[0][0], "--name", "Refuse Me", "--list", "weekly-digest"]
    result = run(args, tmp_path, env, ok=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "database error IntegrityError" in result.stderr
    assert "Refuse Me" not in result.stderr and GOOD[0][0] not in result.stderr
    assert "INSERT" not in result.stderr


# --- spreadsheets --------------------------------------------------------------------------

DANGEROUS = ["=1+2", "+1", "-2", "@SUM(A1)", "\tx", "\rx", "\nx", "\uff1d1", " =1"]
TRICKY = ["'=q", "'plain", "''", "'", "plain", "a=b"]


@pytest.mark.parametrize("value", [*DANGEROUS, *TRICKY, ""])
def test_neutralise_then_restore_is_exact(value: str) -> None:
    """What export writes, import reads back exactly; a formula never leads a written cell."""
    cell = neutralise_cell(value)
    assert restore_cell(cell) == value
    assert cell.lstrip(" ")[:1] not in FORMULA_STARTS


def test_cli_export_is_neutralised_and_reads_back_unchanged(
    tmp_path: Path, database_url: str
) -> None:
    """Cells (header too) that could run as formulas get a leading '; import reverses it."""
    env = cli_env(tmp_path, database_url)
    run(["init"], tmp_path, env)
    source = tmp_path / "people.csv"
    values = [*DANGEROUS, *TRICKY]
    with source.open("w", encoding="utf-8", newline="") as handle:
        out = csv.writer(handle)
        rows = [[f"p{i}@example.org", v, "weekly-digest", v, v] for i, v in enumerate(values)]
        rows.append(["-dash@example.org", "@Ann", "weekly-digest", "=x;y", "+7"])
        for row in [["email", "name", "lists", "tags", "=cmd"], *rows]:
            out.writerow([neutralise_cell(cell) for cell in row])  # as an export writes them
    run(["subscribers", "import", str(source), "--confirmed"], tmp_path, env)
    with opened(database_url) as factory:
        check_round_trip(tmp_path, env, factory)


def check_round_trip(tmp_path: Path, env: dict[str, str], factory: sessionmaker[Session]) -> None:
    """Export is neutralised; importing it into an emptied database gives the same state."""
    with unit_of_work(factory) as session:  # values import itself strips, set directly
        session.execute(
            update(Subscriber)
            .where(Subscriber.email == "p0@example.org")
            .values(attributes={"=cmd": "\tTAB", "\rkey": "\nLF"})
        )
        before = snapshot(session)
    assert before["p9@example.org"][0] == "'=q" and before["p9@example.org"][4] == {"=cmd": "'=q"}
    assert before["-dash@example.org"][3] == ["=x", "y"]
    exported = tmp_path / "export.csv"
    run(["subscribers", "export", "--out", str(exported)], tmp_path, env)
    with exported.open(encoding="utf-8", newline="") as handle:
        cells = list(csv.reader(handle))
    assert "'=cmd" in cells[0] and "'\rkey" in cells[0]
    for cell in (c for row in cells for c in row):
        assert cell.lstrip(" ")[:1] not in FORMULA_STARTS, cell
    flat = {c for row in cells for c in row}
    assert {"'=1+2", "'+1", "'-2", "'@SUM(A1)", "''=q", "'''", "'-dash@example.org"} <= flat
    with unit_of_work(factory) as session:
        session.execute(Subscription.__table__.delete())
        session.execute(Subscriber.__table__.delete())
    again = run(["subscribers", "import", str(exported), "--confirmed", "--json"], tmp_path, env)
    assert '"rejected": 0' in again.stdout
    with unit_of_work(factory) as session:
        assert snapshot(session) == before


# --- addresses -------------------------------------------------------------------------------


def test_idna_domain_is_stored_as_its_a_label(lists: sessionmaker[Session], tmp_path: Path) -> None:
    """user@Bücher.example goes in as user@xn--bcher-kva.example; a non-ASCII local part not."""
    path = tmp_path / "p.csv"
    path.write_text(
        "email,lists\nUser@Bücher.example,weekly-digest\nJosé@example.org,weekly-digest\n",
        encoding="utf-8",
    )
    _, rejects = import_file(lists, path)
    assert emails(lists) == {"user@xn--bcher-kva.example"}
    [(line, reason)] = rejects
    assert line == 3 and "SMTPUTF8" in reason and "ASCII" in reason
    with unit_of_work(lists) as session, pytest.raises(AudienceError, match="SMTPUTF8"):
        subscribe(
            session=session,
            email="josé@example.org",
            lists=[get_list(session, "weekly-digest")],
            secret=SECRET,
            now=NOW,
            actor="test",
        )


def _candidates() -> Iterator[str]:
    """Addresses with every ASCII character (and some others) in each part."""
    extra = ["ü", "\u00a0", "\u202e", "\u2028", "\uff20", "\u0430", "\ud800"]
    for ch in [*map(chr, range(128)), *extra]:
        yield f"a{ch}b@example.org"
        yield f"{ch}@example.org"
        yield f"a@ex{ch}ample.org"
        yield f'"a{ch}b"@example.org'
    yield from ["a@[192.0.2.1]", "a@[IPv6:2001:db8::1]", "a b@example.org", "@example.org"]
    yield from ["a@bücher.example", "a@xn--bcher-kva.example", "a@EXAMPLE.org", "a@localhost"]


def test_every_address_taken_is_one_the_sender_can_use() -> None:
    """Whatever import or add accepts, the sender's own check accepts too; nothing else is."""
    accepted = 0
    for raw in _candidates():
        try:
            address = normalise_email(raw)
        except AudienceError:
            continue
        accepted += 1
        format_to(Recipient(subscriber_id=1, email=address, name="Ann"))  # must not raise
    assert accepted > 50
    for raw in ["ü@example.org", '"a b"@example.org', "a@[192.0.2.1]", "a<b@example.org"]:
        with pytest.raises(AudienceError):
            normalise_email(raw)
        with pytest.raises(PermanentDeliveryError):
            format_to(Recipient(subscriber_id=1, email=raw, name=""))


def test_people_stored_before_the_a_label_rule_are_still_found_and_kept_out(
    lists: sessionmaker[Session], tmp_path: Path
) -> None:
    """Rows and suppressions kept under the Unicode form still count for the A-label form."""
    with unit_of_work(lists) as session:
        session.add(Subscriber(email="left@bücher.example", status="unsubscribed", created_at=NOW))
        session.add(
            Suppression(
                email_hash=hash_address("gone@bücher.example", secret=SECRET),
                reason="forgotten",
                created_at=NOW,
            )
        )
        session.add(Subscriber(email="old@bücher.example", status="active", created_at=NOW))
    path = tmp_path / "p.csv"
    path.write_text(
        "email,lists,name\nleft@xn--bcher-kva.example,weekly-digest,L\n"
        "gone@bücher.example,weekly-digest,G\nold@bücher.example,weekly-digest,Old\n",
        encoding="utf-8",
    )
    counts, _ = import_file(lists, path)
    assert counts["kept_out"] == 2 and counts["imported"] == 0 and counts["updated"] == 1
    assert address_forms("old@bücher.example") == (
        "old@xn--bcher-kva.example",
        "old@bücher.example",
    )
    with unit_of_work(lists) as session:
        assert find_subscriber(session, "left@bücher.example").status == "unsubscribed"
        old = find_subscriber(session, "old@xn--bcher-kva.example")
        assert old.email == "old@xn--bcher-kva.example"  # now deliverable
        session.add(Subscriber(email="josé@example.org", status="active", created_at=NOW))
        session.flush()
        assert forget(session=session, email="josé@example.org", secret=SECRET, now=NOW, actor="t")


def test_idna_address_is_delivered_to_its_a_label(
    tmp_path: Path, smtpd: SmtpServer, database_url: str
) -> None:
    """An imported internationalised domain gets mail: RCPT TO carries the xn-- form."""
    env = write_config(tmp_path, smtpd, database_url)
    run(["init"], tmp_path, env)
    people = tmp_path / "people.csv"
    people.write_text(
        "email,lists\nreader@Bücher.example,urgent-actions\nпочта@example.org,urgent-actions\n",
        encoding="utf-8",
    )
    imported = run(["subscribers", "import", str(people), "--confirmed", "--json"], tmp_path, env)
    assert '"imported": 1' in imported.stdout and '"rejected": 1' in imported.stdout
    rejects = (tmp_path / "people.rejects.csv").read_text(encoding="utf-8")
    assert "SMTPUTF8" in rejects
    body = tmp_path / "body.txt"
    body.write_text("Write to the prosecutor today.")
    args = ["--title", "Act now", "--body-file", str(body), "--url", "https://portal.example.org/a"]
    run(["alert", "send", *args, "--yes"], tmp_path, env)
    [message] = smtpd.messages()
    assert message["X-Delivered-To"] == "reader@xn--bcher-kva.example"
    assert "reader@xn--bcher-kva.example" in message["To"]


# --- outside text on a terminal --------------------------------------------------------------

HOSTILE = "[/x] [bold red]boom[/bold red] \x1b[31mred\x1b]0;title\x07 \u202eevil"


def assert_literal(output: str) -> None:
    """Markup shown as typed; no control or bidi character reaches the terminal."""
    assert "[/x] [bold red]boom[/bold red]" in output
    for ch in ("\x1b", "\x07", "\u202e", "\x9b"):
        assert ch not in output
    assert "\\u001b[31mred" in output
    assert "Traceback" not in output and "internal error" not in output


@pytest.fixture
def hostile_http() -> Iterator[str]:
    """A feed server whose every reply is a 503 with Rich markup and escapes in its reason."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(30)
    phrase = ("[/x] [bold red]boom[/bold red] \x1b[31mred").encode("latin-1")

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                conn.sendall(
                    b"HTTP/1.1 503 "
                    + phrase
                    + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}/feed.xml"
    server.close()
    thread.join(timeout=5)


def test_cli_prints_outside_text_as_text(
    tmp_path: Path, sqlite_url: str, hostile_http: str
) -> None:
    """A reason phrase, a stored error, an SMTP reply and a name are printed literally."""
    env = cli_env(tmp_path, sqlite_url)
    run(["init"], tmp_path, env)
    ingest = run(["ingest", hostile_http], tmp_path, env, ok=False)
    assert ingest.returncode == 1  # the source failed; the run did not crash
    assert "[/x] [bold red]boom[/bold red]" in ingest.stdout and "\x1b" not in ingest.stdout
    # fetch drops the ESC from the reason phrase itself (clean_text); the rest prints as text
    assert "[31mred" in ingest.stdout
    run(["subscribers", "add", "ann@example.org", "--list", "weekly-digest", "--confirmed"],
        tmp_path, env)  # fmt: skip
    with opened(sqlite_url) as factory, unit_of_work(factory) as session:
        # `subscribers add --name` refuses control characters now; one stored before is shown.
        session.execute(update(Subscriber).values(name=" ".join(HOSTILE.split())))
        campaign_id = seed_failure(session)
        session.add(Source(url="https://feeds.example.org/x", last_error=HOSTILE))
    outputs = {
        "status": run(["status"], tmp_path, env),
        "show": run(["campaigns", "show", str(campaign_id), "--failures"], tmp_path, env),
        "subscriber": run(["subscribers", "show", "ann@example.org"], tmp_path, env),
        "list": run(["subscribers", "list"], tmp_path, env),
        "json": run(["subscribers", "show", "ann@example.org", "--json"], tmp_path, env),
    }
    for name, result in outputs.items():
        if name != "json":
            assert_literal(" ".join((result.stdout + result.stderr).split()))
    assert "\x1b" not in outputs["json"].stdout and "\u202e" not in outputs["json"].stdout
    assert json.loads(outputs["json"].stdout)["name"] == " ".join(HOSTILE.split())


def seed_failure(session: Session) -> int:
    """A campaign with one failed delivery whose stored SMTP reply is hostile."""
    ml = get_list(session, "weekly-digest")
    sub = find_subscriber(session, "ann@example.org")
    campaign = Campaign(
        kind=CampaignKind.ALERT,
        list_id=ml.id,
        dedupe_key="hostile",
        title="Title " + HOSTILE,
        status=CampaignStatus.RUNNING,
        pause_reason="",
        created_at=NOW,
    )
    session.add(campaign)
    session.flush()
    session.add(
        Delivery(
            campaign_id=campaign.id,
            subscriber_id=sub.id,
            status=DeliveryStatus.FAILED,
            next_attempt_at=NOW + timedelta(hours=1),
            created_at=NOW,
            last_reply="550 " + HOSTILE,
        )
    )
    return campaign.id


def test_import_reads_neutralised_cells_as_they_were(
    lists: sessionmaker[Session], tmp_path: Path
) -> None:
    """Import removes the one ' export added, in the header too; nothing else."""
    buffer = io.StringIO()
    csv.writer(buffer).writerow(["email", "name", "'=cmd"])
    csv.writer(buffer).writerow(["'=x@example.org", "'@Ann", "'+1"])
    path = tmp_path / "p.csv"
    path.write_text(buffer.getvalue(), encoding="utf-8")
    with unit_of_work(lists) as session:
        import_rows(
            session=session,
            rows=read_csv(path),
            default_list="weekly-digest",
            confirmed=True,
            secret=SECRET,
            now=NOW,
            actor="test",
        )
        sub = session.scalar(select(Subscriber))
        assert sub is not None
        assert (sub.email, sub.name, sub.attributes) == ("=x@example.org", "@Ann", {"=cmd": "+1"})


def test_an_address_the_sender_would_refuse_is_refused_on_the_way_in() -> None:
    """One rule (addresses.header_problem) for import and send: "=?" is refused at the door."""
    from newsletter.addresses import normalise_email
    from newsletter.errors import AudienceError

    with pytest.raises(AudienceError, match="encoded-word"):
        normalise_email("=?utf-8?q?=0D=0A?=@example.org")
