"""Readers at risk from the admin's command line: `subscribers add --discreet`, `subscribers show`,
`subscribers key` with keys made by GnuPG, and `subscribers forget` erasing keys (real processes,
SQLite and PostgreSQL)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from newsletter.db import unit_of_work
from newsletter.db.models import Event, KeyNotice, ReaderKey, Subscriber
from newsletter.openpgp import MAX_KEY_BYTES
from tests.builders import run
from tests.conftest import SECRET, SmtpServer
from tests.gpg_keys import GpgHome, gpg_time
from tests.test_cli import write_config
from tests.test_csv_hostile import cli_env, opened

ANN = "ann@example.org"
PENDING_NOTE = "waiting for the reader to follow the link sent encrypted to it"


@dataclass(frozen=True)
class Keys:
    """Key files made by gpg for Ann (and one for someone else)."""

    folder: Path
    fingerprint: str  # of the good key
    home: GpgHome  # holds the secret keys: reads what is sent encrypted to them

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.asc"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keys]:
    """good, second (another good one), expired, revoked, other-address and secret key files."""
    folder = tmp_path_factory.mktemp("keys")
    home = GpgHome.make(folder / "gnupg")
    past = gpg_time(datetime.now(UTC) - timedelta(days=30))

    def make(name: str, uid: str, *, expire: str = "1y", at: str = "") -> str:
        fpr = home.generate(uid, expire=expire, at=at)
        home.add_key(fpr, expire=expire, at=at)
        (folder / f"{name}.asc").write_text(home.export(fpr))
        return fpr

    try:
        good = make("good", f"Ann <{ANN}>")
        make("second", f"Ann Again <{ANN}>")
        make("expired", f"Ann Old <{ANN}>", expire="2d", at=past)
        revoked = make("revoked", f"Ann Revoked <{ANN}>")
        home.revoke(revoked)
        (folder / "revoked.asc").write_text(home.export(revoked))
        make("other", "Eve <eve@example.org>")
        (folder / "secret.asc").write_text(home.export_secret(good))
        (folder / "garbage.asc").write_bytes(b"-----BEGIN PGP PUBLIC KEY BLOCK-----\nnope\n")
        (folder / "huge.asc").write_bytes(b"A" * (MAX_KEY_BYTES * 4))
        yield Keys(folder, good, home)
    finally:
        home.close()


def setup_db(
    tmp_path: Path, database_url: str, *, discreet: str = "", smtpd: SmtpServer | None = None
) -> dict[str, str]:
    """A database with Ann on the weekly digest; with smtpd, the config points at it."""
    env = cli_env(tmp_path, database_url)
    if smtpd is not None:
        env = {**write_config(tmp_path, smtpd, database_url), "COLUMNS": "1000"}
    run(["init"], tmp_path, env)
    extra = ["--discreet", discreet] if discreet else []
    run(["subscribers", "add", ANN, "--list", "weekly-digest", "--confirmed", *extra],
        tmp_path, env)  # fmt: skip
    return env


def key_rows(database_url: str) -> list[tuple[str, str]]:
    """(status, fingerprint) of every stored key."""
    with opened(database_url) as factory, unit_of_work(factory) as session:
        rows = session.execute(select(ReaderKey.status, ReaderKey.fingerprint))
        return sorted((str(status), fpr) for status, fpr in rows)


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The refusal's only line: non-zero exit, no traceback, nothing on stdout."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def show(tmp_path: Path, env: dict[str, str]) -> tuple[str, dict[str, object]]:
    text = run(["subscribers", "show", ANN], tmp_path, env).stdout
    info = json.loads(run(["subscribers", "show", ANN, "--json"], tmp_path, env).stdout)
    return " ".join(text.replace("│", " ").split()), info  # table borders dropped


# --- add --discreet ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["pointer", "envelope"])
def test_add_with_a_discreet_mode_stores_it(tmp_path: Path, database_url: str, mode: str) -> None:
    """`add --discreet MODE --on-key-problem plain` stores both; show tells them."""
    env = cli_env(tmp_path, database_url)
    run(["init"], tmp_path, env)
    run(["subscribers", "add", ANN, "--list", "weekly-digest", "--confirmed",
         "--discreet", mode.upper(), "--on-key-problem", "plain"], tmp_path, env)  # fmt: skip
    text, info = show(tmp_path, env)
    assert info["discreet"] == mode and info["on_key_problem"] == "plain"
    assert f"discreet {mode}" in text and "on_key_problem plain" in text
    assert "key none" in text
    # Adding them to another list without the options keeps their choices.
    run(["subscribers", "add", ANN, "--list", "urgent-actions", "--confirmed"], tmp_path, env)
    assert show(tmp_path, env)[1]["discreet"] == mode


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        pytest.param("--discreet", "nope", "discreet must be one of", id="discreet"),
        pytest.param("--discreet", "=cmd|x", "discreet must be one of", id="formula"),
        pytest.param("--on-key-problem", "drop", "on_key_problem must be one of", id="choice"),
    ],
)
def test_add_with_a_bad_mode_adds_nobody(
    tmp_path: Path, sqlite_url: str, option: str, value: str, expected: str
) -> None:
    """A bad mode is one line and a non-zero exit; nobody is added."""
    env = cli_env(tmp_path, sqlite_url)
    run(["init"], tmp_path, env)
    args = ["subscribers", "add", ANN, "--list", "weekly-digest", "--confirmed", option, value]
    assert expected in one_error_line(run(args, tmp_path, env, ok=False))
    with opened(sqlite_url) as factory, unit_of_work(factory) as session:
        assert session.scalar(select(func.count()).select_from(Subscriber)) == 0


# --- subscribers key --------------------------------------------------------------------------


def events(database_url: str, action: str) -> int:
    with opened(database_url) as factory, unit_of_work(factory) as session:
        return int(session.scalar(select(func.count()).where(Event.action == action)) or 0)


def test_key_pending_then_confirmed_then_removed(
    tmp_path: Path, database_url: str, keys: Keys, smtpd: SmtpServer
) -> None:
    """A key given is pending (shown as waiting); --confirmed is active; --remove removes it."""
    env = setup_db(tmp_path, database_url, discreet="pointer", smtpd=smtpd)
    fpr = keys.fingerprint
    given = run(["subscribers", "key", ANN, "--file", str(keys.path("good"))], tmp_path, env)
    assert fpr in given.stdout and "pending" in given.stdout and "expires" in given.stdout
    assert key_rows(database_url) == [("pending", fpr)]
    # The proof went at once: encrypted to the key, discreet (Ann chose pointer), the link inside.
    [proof] = smtpd.messages()
    assert proof.get_content_type() == "multipart/encrypted"
    assert "notes.example.net" in str(proof["From"]) and str(proof["Subject"]) == "Weekly notes"
    encrypted = proof.get_payload()[1].get_payload(decode=True)  # type: ignore[index,union-attr]
    assert isinstance(encrypted, bytes)
    inside = keys.home.decrypt(encrypted).plaintext.decode()
    assert "/key/" in inside and fpr in inside
    text, info = show(tmp_path, env)
    assert f"pending key {fpr}: {PENDING_NOTE}" in text and "key none" in text
    assert info["key"] == {
        "active_fingerprint": None,
        "active_expires_at": None,
        "pending_fingerprint": fpr,
        "removed_by_admin": False,
        "revoked_fingerprint": None,
    }

    args = ["subscribers", "key", ANN, "--file", str(keys.path("good")), "--confirmed"]
    confirmed = run(args, tmp_path, env)
    assert fpr in confirmed.stdout and "active" in confirmed.stdout
    assert key_rows(database_url) == [("active", fpr)]
    text, info = show(tmp_path, env)
    assert f"key active {fpr}, expires 20" in text and "pending key" not in text
    key = info["key"]
    assert isinstance(key, dict) and key["active_fingerprint"] == fpr
    assert str(key["active_expires_at"]).startswith(str(datetime.now(UTC).year + 1))

    removed = run(["subscribers", "key", ANN, "--remove"], tmp_path, env)
    assert "key removed" in removed.stdout
    assert [status for status, _ in key_rows(database_url)] == ["removed"]
    text, info = show(tmp_path, env)
    assert "key removed by an admin" in text
    assert info["key"] == {
        "active_fingerprint": None,
        "active_expires_at": None,
        "pending_fingerprint": None,
        "removed_by_admin": True,
        "revoked_fingerprint": None,
    }
    again = run(["subscribers", "key", ANN, "--remove"], tmp_path, env)
    assert "nothing to do" in again.stdout
    assert "key removed by an admin" in show(tmp_path, env)[0]  # the mark stays
    assert events(database_url, "subscriber.key_set") == 2
    assert events(database_url, "subscriber.key_removed") == 1


def test_key_from_stdin(tmp_path: Path, sqlite_url: str, keys: Keys, smtpd: SmtpServer) -> None:
    """`--file -` reads the key from stdin; a new key waits while the active one stays."""
    env = setup_db(tmp_path, sqlite_url, smtpd=smtpd)
    run(["subscribers", "key", ANN, "--file", str(keys.path("good")), "--confirmed"],
        tmp_path, env)  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "newsletter", "subscribers", "key", ANN, "--file", "-"],
        cwd=tmp_path,
        env={**_plain_env(), **env},
        input=keys.path("second").read_text(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "pending" in result.stdout
    [(active, good), (pending, second)] = key_rows(sqlite_url)
    assert (active, good) == ("active", keys.fingerprint)
    assert pending == "pending" and second != keys.fingerprint and second in result.stdout


def _plain_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}


REFUSALS = [
    pytest.param("garbage", "not an OpenPGP public key", id="garbage"),
    pytest.param("expired", "expired", id="expired"),
    pytest.param("revoked", "revoked", id="revoked"),
    pytest.param("other", "not for ann@example.org", id="other-address"),
    pytest.param("secret", "secret key", id="secret-key"),
    pytest.param("missing", "No such file", id="missing-file"),
    pytest.param("huge", "too large", id="huge-file"),
    pytest.param("/dev/zero", "too large", id="endless-file"),
    pytest.param("folder", "cannot read", id="a-folder"),
]


@pytest.fixture(scope="module")
def template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite database with Ann in it, made once and copied by each refusal test."""
    folder = tmp_path_factory.mktemp("template")
    setup_db(folder, f"sqlite:///{folder / 'test.db'}")
    return folder / "test.db"


@pytest.mark.parametrize(("name", "expected"), REFUSALS)
def test_key_refusals_are_one_line_and_store_nothing(
    tmp_path: Path, keys: Keys, template_db: Path, name: str, expected: str
) -> None:
    """Every refused key file is one line, a non-zero exit, no traceback, and no key stored."""
    shutil.copy(template_db, tmp_path / "test.db")
    url = f"sqlite:///{tmp_path / 'test.db'}"
    env = cli_env(tmp_path, url)
    path = name if name.startswith("/") else str(keys.path(name))
    if name == "folder":
        path = str(keys.folder)
    line = one_error_line(run(["subscribers", "key", ANN, "--file", path], tmp_path, env, ok=False))
    assert expected in line, line
    assert key_rows(url) == []
    assert events(url, "subscriber.key_set") == 0


def test_key_needs_a_file_or_remove(tmp_path: Path, template_db: Path, keys: Keys) -> None:
    """Neither --file nor --remove, or both: one line; an unknown address: one line."""
    shutil.copy(template_db, tmp_path / "test.db")
    env = cli_env(tmp_path, f"sqlite:///{tmp_path / 'test.db'}")
    good = str(keys.path("good"))
    for args in ([ANN], [ANN, "--file", good, "--remove"], [ANN, "--remove", "--confirmed"]):
        one_error_line(run(["subscribers", "key", *args], tmp_path, env, ok=False))
    line = one_error_line(
        run(["subscribers", "key", "nobody@example.org", "--file", good], tmp_path, env, ok=False)
    )
    assert "no subscriber" in line


# --- forget -----------------------------------------------------------------------------------


def test_forget_erases_keys_notices_and_choices(
    tmp_path: Path, database_url: str, keys: Keys, smtpd: SmtpServer
) -> None:
    """`subscribers forget` deletes every key and key notice and resets the reading choices."""
    env = setup_db(tmp_path, database_url, discreet="pointer", smtpd=smtpd)
    run(["subscribers", "add", ANN, "--list", "weekly-digest", "--on-key-problem", "plain"],
        tmp_path, env)  # fmt: skip
    run(["subscribers", "key", ANN, "--file", str(keys.path("good")), "--confirmed"],
        tmp_path, env)  # fmt: skip
    run(["subscribers", "key", ANN, "--file", str(keys.path("second"))], tmp_path, env)
    with opened(database_url) as factory:
        add_notice(factory, keys.fingerprint)
    assert len(key_rows(database_url)) == 2
    run(["subscribers", "forget", ANN, "--yes"], tmp_path, env)
    assert key_rows(database_url) == []
    with opened(database_url) as factory, unit_of_work(factory) as session:
        assert session.scalar(select(func.count()).select_from(KeyNotice)) == 0
        [sub] = session.scalars(select(Subscriber))
        assert (sub.status, sub.discreet, sub.on_key_problem) == ("forgotten", "off", "withhold")


def add_notice(factory: sessionmaker[Session], fingerprint: str) -> None:
    with unit_of_work(factory) as session:
        sub_id = session.scalar(select(Subscriber.id))
        assert sub_id is not None
        session.add(
            KeyNotice(
                subscriber_id=sub_id,
                fingerprint=fingerprint,
                problem="expired",
                created_at=datetime.now(UTC),
            )
        )


def test_key_help(tmp_path: Path) -> None:
    """`subscribers key --help` names --file, --confirmed and --remove."""
    result = run(["subscribers", "key", "--help"], tmp_path, {"NEWSLETTER_SECRET": SECRET})
    for option in ("--file", "--confirmed", "--remove", "stdin"):
        assert option in result.stdout


@pytest.mark.parametrize("command", ["unsubscribe", "forget"])
def test_no_goodbye_to_a_discreet_reader(
    tmp_path: Path, sqlite_url: str, smtpd: SmtpServer, command: str
) -> None:
    """`--notify` sends a discreet reader no goodbye: it would be the one email naming us."""
    env = setup_db(tmp_path, sqlite_url, discreet="envelope", smtpd=smtpd)
    extra = ["--yes"] if command == "forget" else []
    done = run(["subscribers", command, ANN, "--notify", *extra], tmp_path, env)
    assert "no goodbye email" in done.stderr
    assert smtpd.messages() == []
    plain = "bob@example.org"
    run(["subscribers", "add", plain, "--list", "weekly-digest", "--confirmed"], tmp_path, env)
    run(["subscribers", command, plain, "--notify", *extra], tmp_path, env)
    assert [str(m["To"]) for m in smtpd.messages()] == [plain]  # others still get theirs
