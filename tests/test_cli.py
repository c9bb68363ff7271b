"""The command line as people use it: real processes, a real SMTP server, a real SQLite file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer.main

from newsletter.cli import COMMANDS, app, command_name, load_commands
from tests.builders import run
from tests.conftest import SECRET, SmtpServer

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_FEED = ROOT / "newsletter" / "data" / "portal-feed.xml"


def all_commands() -> list[list[str]]:
    """Every command and group path of the CLI, e.g. ['digest', 'send']."""
    load_commands()

    root = typer.main.get_command(app)
    paths: list[list[str]] = []

    def walk(cmd: Any, path: list[str]) -> None:
        paths.append(path)
        if hasattr(cmd, "commands"):  # a group (typer vendors its own click)
            for name, sub in cmd.commands.items():
                walk(sub, [*path, name])

    walk(root, [])
    return paths


def test_every_command_has_help() -> None:
    """Each command and group answers --help with a description (and the README names it)."""
    readme = (ROOT / "README.md").read_text()
    paths = all_commands()
    assert ["demo"] in paths and ["digest", "send"] in paths and ["alert", "preview"] in paths
    for path in paths:
        result = subprocess.run(
            [sys.executable, "-m", "newsletter", *path, "--help"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, (path, result.stderr)
        assert "Usage:" in result.stdout
        if path:
            assert f"newsletter {' '.join(path)}" in readme, f"README lacks {path}"


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        pytest.param("[smtp]\nhots = 'x'\n", "unknown key 'smtp.hots'", id="unknown-key"),
        pytest.param("[smtp]\nport = 'x'\n", "'smtp.port' must be int", id="bad-value"),
        pytest.param("this is not toml", "not valid TOML", id="not-toml"),
    ],
)
def test_broken_config_gives_one_line_and_nonzero_exit(
    tmp_path: Path, config: str, expected: str
) -> None:
    """A broken config stops any command with one line, a non-zero code and no traceback."""
    (tmp_path / "config.toml").write_text(config)
    result = run(["ingest", str(SAMPLE_FEED)], cwd=tmp_path, ok=False)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0] and "config.toml" in lines[0]


def test_uninitialised_database_says_run_init(tmp_path: Path) -> None:
    """A command on a database that was never set up says what to do, in one line."""
    result = run(["ingest", str(SAMPLE_FEED)], cwd=tmp_path, ok=False)
    assert result.returncode != 0
    assert "newsletter init" in result.stderr and "Traceback" not in result.stderr


def write_config(tmp_path: Path, smtpd: SmtpServer, database_url: str) -> dict[str, str]:
    (tmp_path / "config.toml").write_text(
        f"[database]\nurl = '{database_url}'\n[smtp]\nhost = '{smtpd.host}'\nport = {smtpd.port}\n"
    )
    return {"NEWSLETTER_SECRET": SECRET}


def test_cli_flow_from_feed_to_mailbox(
    tmp_path: Path, smtpd: SmtpServer, database_url: str
) -> None:
    """init → import → ingest → preview → digest send → alert send, each as a separate process."""
    env = write_config(tmp_path, smtpd, database_url)
    run(["init"], tmp_path, env)
    out = run(
        [
            "subscribers",
            "import",
            str(ROOT / "subscribers" / "example.csv"),
            "--confirmed",
            "--json",
        ],
        tmp_path,
        env,
    ).stdout
    assert '"imported": 12' in out
    assert "10" in run(["ingest", str(SAMPLE_FEED)], tmp_path, env).stdout
    run(["digest", "preview", "--out", "pv"], tmp_path, env)
    for lang in ("en", "be", "ru"):
        for suffix in ("html", "txt", "eml"):
            assert (tmp_path / "pv" / f"digest.{lang}.{suffix}").stat().st_size > 500
    assert smtpd.messages() == []  # a preview sends nothing

    dry = run(["digest", "send", "--dry-run"], tmp_path, env).stdout
    assert "would send" in dry and smtpd.messages() == []
    sent = run(["digest", "send"], tmp_path, env).stdout
    assert "sent 9" in sent
    again = run(["digest", "send"], tmp_path, env).stdout
    assert "nothing new" in again
    assert len(smtpd.messages()) == 9

    urgent = "https://portal.example.org/?p="  # the sample feed's guids
    feed = SAMPLE_FEED.read_text()
    start = feed.index("urgent-action")
    guid_at = feed.rfind(urgent, 0, start)
    guid = feed[guid_at : feed.index("<", guid_at)]
    run(["alert", "send", "--item", guid, "--yes"], tmp_path, env)
    assert len(smtpd.messages()) == 9 + 8
    second = run(["alert", "send", "--item", guid, "--yes"], tmp_path, env).stdout
    assert "already sent" in second
    assert len(smtpd.messages()) == 17
    listing = run(["campaigns", "list", "--json"], tmp_path, env).stdout
    assert listing.count('"status": "finished"') == 2


def test_alert_from_staff_text(tmp_path: Path, smtpd: SmtpServer, database_url: str) -> None:
    """Staff write an alert in a text file; it is escaped, sent once, and previews first."""
    env = write_config(tmp_path, smtpd, database_url)
    run(["init"], tmp_path, env)
    run(
        ["subscribers", "import", str(ROOT / "subscribers" / "example.csv"), "--confirmed"],
        tmp_path,
        env,
    )
    body = tmp_path / "body.txt"
    body.write_text("Write to the prosecutor today.\n\n<script>alert(1)</script> & thanks")
    args = [
        "--title",
        "Act now for Viasna",
        "--body-file",
        str(body),
        "--url",
        "https://portal.example.org/act",
    ]
    run(["alert", "preview", *args, "--out", "pv"], tmp_path, env)
    assert "Act now for Viasna" in (tmp_path / "pv" / "alert.en.html").read_text()
    run(["alert", "send", *args, "--yes"], tmp_path, env)
    messages = smtpd.messages()
    assert len(messages) == 8
    html = messages[0].get_body(("html",)).get_content()
    assert "<script" not in html and "Write to the prosecutor today." in html


def urgent_guid() -> str:
    """The guid of the sample feed's urgent-action item."""
    feed = SAMPLE_FEED.read_text()
    guid_at = feed.rfind("https://portal.example.org/?p=", 0, feed.index("urgent-action"))
    return feed[guid_at : feed.index("<", guid_at)]


def test_alert_send_without_a_terminal_needs_yes(
    tmp_path: Path, smtpd: SmtpServer, database_url: str
) -> None:
    """No --yes and stdin not a terminal: one line, non-zero exit, nothing queued or sent."""
    env = write_config(tmp_path, smtpd, database_url)
    run(["init"], tmp_path, env)
    example = str(ROOT / "subscribers" / "example.csv")
    run(["subscribers", "import", example, "--confirmed"], tmp_path, env)
    run(["ingest", str(SAMPLE_FEED)], tmp_path, env)
    result = run(["alert", "send", "--item", urgent_guid()], tmp_path, env, ok=False)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--yes" in lines[0] and "Traceback" not in result.stderr
    assert json.loads(run(["campaigns", "list", "--json"], tmp_path, env).stdout) == []
    assert smtpd.messages() == []
    run(["alert", "send", "--item", urgent_guid(), "--yes"], tmp_path, env)
    assert len(smtpd.messages()) == 8


def test_alert_send_refuses_an_alert_held_for_approval(
    tmp_path: Path, smtpd: SmtpServer, database_url: str
) -> None:
    """An alert the scheduler held for approval is sent only by `alert approve`, never `send`."""
    from datetime import UTC, datetime

    from newsletter.alerts import alerts_for_urgent_items
    from newsletter.config import load_settings
    from newsletter.db import make_engine, make_sessionmaker, unit_of_work

    env = write_config(tmp_path, smtpd, database_url)
    run(["init"], tmp_path, env)
    run(["subscribers", "import", str(ROOT / "subscribers" / "example.csv"), "--confirmed"],
        tmp_path, env)  # fmt: skip
    run(["ingest", str(SAMPLE_FEED)], tmp_path, env)
    settings = load_settings(tmp_path / "config.toml", env)
    engine = make_engine(settings.database.url)
    with unit_of_work(make_sessionmaker(engine)) as session:  # the scheduler, in approve mode
        [held] = alerts_for_urgent_items(
            session=session, settings=settings, now=datetime(2014, 6, 10, 12, tzinfo=UTC)
        )
        held_id, guid = held.id, held.items[0].guid
    engine.dispose()
    result = run(["alert", "send", "--item", guid, "--yes"], tmp_path, env, ok=False)
    assert result.returncode != 0
    assert f"alert approve {held_id}" in result.stderr
    assert smtpd.messages() == []
    run(["alert", "approve", str(held_id)], tmp_path, env)
    assert len(smtpd.messages()) == 8


def in_new_process(*lines: str) -> str:
    """Run these lines of Python in a new interpreter; what it printed."""
    result = subprocess.run(
        [sys.executable, "-c", "\n".join(lines)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return result.stdout.strip()


@pytest.mark.parametrize(
    ("argv", "name"),
    [
        (["send", "--workers", "2"], "send"),
        (["--config", "send", "digest", "send"], "digest"),
        (["--config=x.toml", "--debug", "lists", "--help"], "lists"),
        (["--help"], None),
        (["--help", "send"], None),
        (["--config"], None),
        ([], None),
    ],
)
def test_the_command_is_the_first_argument_that_is_not_a_root_option(
    argv: list[str], name: str | None
) -> None:
    """--config's value is skipped, so a config file named like a command is not taken for one."""
    assert command_name(argv) == name


def test_each_command_is_registered_by_the_module_loaded_for_it_alone() -> None:
    """A command starts with only its own module loaded: the map from command to module must
    name the module that registers it, and every command module must be in the map."""
    unregistered = in_new_process(
        "import os, sys, typer.main",
        "from newsletter.cli import COMMANDS, app, load_commands",
        "for name in COMMANDS:",
        "    pid = os.fork()",
        "    if pid == 0:",
        "        load_commands([name, '--help'])",
        "        os._exit(0 if name in typer.main.get_command(app).commands else 1)",
        "    if os.waitpid(pid, 0)[1] != 0:",
        "        print(name)",
    )
    assert unregistered == ""
    helpers = {"__init__", "progress", "workers"}
    modules = {p.stem for p in (ROOT / "newsletter" / "cli").glob("*.py")} - helpers
    assert modules == set(COMMANDS.values())
    assert sorted(path[0] for path in all_commands() if len(path) == 1) == sorted(COMMANDS)


def test_a_command_starts_without_loading_the_others() -> None:
    """`newsletter send` leaves the web stack, OpenPGP's console pages and CSS inlining out."""
    loaded = in_new_process(
        "import sys",
        "from newsletter.cli import load_commands",
        "load_commands(['send'])",
        "others = ('starlette', 'premailer', 'newsletter.console', 'newsletter.cli.digest')",
        "print(sorted(m for m in others if m in sys.modules))",
    )
    assert loaded == "[]"


def test_loading_every_command_leaves_libpq_unloaded() -> None:
    """psycopg (and libpq, about 9 MB) is imported only where PostgreSQL is used: a process on
    SQLite, and every command's start, go without it."""
    loaded = in_new_process(
        "import sys",
        "from newsletter.cli import load_commands",
        "load_commands()",
        "import newsletter.ledger, newsletter.send, newsletter.service, newsletter.importer",
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'psycopg'))",
    )
    assert loaded == "[]"
