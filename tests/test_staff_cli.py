"""`newsletter staff`: an admin manages console accounts from the shell, one line per answer."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pyotp
from sqlalchemy import select

from newsletter.clock import SystemClock
from newsletter.db import make_engine, make_sessionmaker, unit_of_work
from newsletter.db.models import Event
from newsletter.staff import begin_enrolment, complete_enrolment, find_staff
from newsletter.staff_sessions import current_session, start_session
from tests.builders import run
from tests.conftest import SECRET, make_settings
from tests.test_staff import PASSWORD


def newsletter(tmp_path: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    return run(list(args), tmp_path, {"NEWSLETTER_SECRET": SECRET, "COLUMNS": "200"}, ok=ok)


def test_staff_round_trip(tmp_path: Path, database_url: str) -> None:
    """add prints a link that enrols; list shows it; role, training, sessions revoke, disable."""
    (tmp_path / "config.toml").write_text(f"[database]\nurl = '{database_url}'\n")
    newsletter(tmp_path, "init")
    added = newsletter(
        tmp_path, "staff", "add", "Ola@Example.org", "--role", "editor", "--name", "Ola"
    )
    assert "expires in 24 hours" in added.stdout
    url = json.loads(
        newsletter(tmp_path, "staff", "add", "ana@example.org", "--role", "admin", "--json").stdout
    )["enrol_url"]
    assert url.startswith("http://127.0.0.1:8001/enrol/")
    token = url.rsplit("/", 1)[1]

    settings, now = make_settings(database_url), SystemClock().now()
    factory = make_sessionmaker(make_engine(database_url))
    with unit_of_work(factory) as session:
        secret = begin_enrolment(session, token=token, now=now, settings=settings).totp_secret
        complete_enrolment(
            session,
            token=token,
            password=PASSWORD,
            password_again=PASSWORD,
            code=pyotp.TOTP(secret).at(now),
            now=now,
            client="c",
        )
    listed = json.loads(newsletter(tmp_path, "staff", "list", "--json").stdout)
    assert listed == [
        {
            "email": "ana@example.org",
            "name": "",
            "role": "admin",
            "enrolled": True,
            "disabled": False,
            "training": False,
        },
        {
            "email": "ola@example.org",
            "name": "Ola",
            "role": "editor",
            "enrolled": False,
            "disabled": False,
            "training": False,
        },
    ]
    table = newsletter(tmp_path, "staff", "list").stdout
    assert "ola@example.org" in table and secret not in table

    assert (
        "now approver"
        in newsletter(tmp_path, "staff", "role", "ola@example.org", "approver").stdout
    )
    assert (
        "training on" in newsletter(tmp_path, "staff", "training", "ola@example.org", "--on").stdout
    )
    reset = json.loads(newsletter(tmp_path, "staff", "reset", "ola@example.org", "--json").stdout)
    assert reset["enrol_url"] != url

    with unit_of_work(factory) as session:
        ana = find_staff(session, "ana@example.org")
        assert ana is not None
        cookie, _ = start_session(session, staff_id=ana.id, client="c", now=now, settings=settings)
    assert (
        "1 session ended"
        in newsletter(tmp_path, "staff", "sessions", "revoke", "ana@example.org").stdout
    )
    with unit_of_work(factory) as session:
        assert current_session(session, cookie=cookie, now=now, settings=settings) is None
    assert "0 sessions ended" in newsletter(tmp_path, "staff", "sessions", "revoke", "--all").stdout
    assert "disabled" in newsletter(tmp_path, "staff", "disable", "ana@example.org").stdout
    with unit_of_work(factory) as session:
        actors = set(session.scalars(select(Event.actor).where(Event.action.like("staff.%"))))
        assert {a for a in actors if a.startswith("cli:")} and "ana@example.org" in actors
    factory.kw["bind"].dispose()


def test_staff_errors_are_one_line(tmp_path: Path, sqlite_url: str) -> None:
    """Unknown account, unknown role, a duplicate or a bad address: one line, non-zero exit."""
    (tmp_path / "config.toml").write_text(f"[database]\nurl = '{sqlite_url}'\n")
    newsletter(tmp_path, "init")
    newsletter(tmp_path, "staff", "add", "ola@example.org", "--role", "editor")
    for args, message in [
        (["staff", "add", "ola@example.org", "--role", "editor"], "already has a staff account"),
        (["staff", "add", "x@example.org", "--role", "root"], "unknown role 'root'"),
        (["staff", "add", "not an address", "--role", "editor"], "invalid address"),
        (["staff", "disable", "nobody@example.org"], "no staff account"),
        (["staff", "sessions", "revoke"], "either an email address or --all"),
        (["staff", "sessions", "revoke", "nobody@example.org"], "no staff account"),
    ]:
        result = newsletter(tmp_path, *args, ok=False)
        assert result.returncode == 1 and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_every_staff_command_has_help(tmp_path: Path) -> None:
    """Each staff command explains itself."""
    for args in (
        ["staff"],
        ["staff", "add"],
        ["staff", "list"],
        ["staff", "disable"],
        ["staff", "reset"],
        ["staff", "role"],
        ["staff", "training"],
        ["staff", "sessions", "revoke"],
    ):
        shown = newsletter(tmp_path, *args, "--help").stdout
        assert "Usage" in shown and len(shown.splitlines()) > 4
