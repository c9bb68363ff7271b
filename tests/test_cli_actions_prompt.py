"""`newsletter actions send` on a real terminal: the question is asked with the database free.

Asked inside the transaction that had written the campaign, the [y/N] prompt held SQLite's write
lock while the person thought: a reader's unsubscribe waited 30 s, then failed. Now the command
asks between a rolled-back first pass and the real one, which refuses what changed meanwhile.
"""

from __future__ import annotations

import os
import pty
import re
import select
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import func
from sqlalchemy import select as sql_select
from sqlalchemy.orm import Session, sessionmaker

from newsletter.db import make_engine, make_sessionmaker, unit_of_work
from newsletter.db.models import Campaign, Event
from tests.builders import run
from tests.conftest import SmtpServer
from tests.test_cases import LETTERS, TARGETS
from tests.test_cases_cli import create_args
from tests.test_cli import ROOT, write_config

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class Terminal:
    """A command running on a pseudo-terminal, as staff run it at a prompt."""

    def __init__(self, process: subprocess.Popen[bytes], leader: int) -> None:
        self.process, self.leader, self.output = process, leader, b""

    def prompt(self, timeout: float = 90) -> str:
        """Everything printed up to the [y/N] question (which must come)."""
        end = time.monotonic() + timeout
        while not self.output.rstrip().endswith(b"[y/N]:"):
            assert time.monotonic() < end, self.text()
            ready, _, _ = select.select([self.leader], [], [], 1)
            if ready:
                try:
                    self.output += os.read(self.leader, 65536)
                except OSError:  # the command ended without asking
                    raise AssertionError(self.text()) from None
        return self.text()

    def answer(self, reply: str, timeout: float = 120) -> int:
        """Type the reply; the command's exit code once it ends."""
        os.write(self.leader, reply.encode() + b"\n")
        while True:
            try:
                chunk = os.read(self.leader, 65536)
            except OSError:  # the other end closed
                break
            if not chunk:
                break
            self.output += chunk
        return self.process.wait(timeout=timeout)

    def text(self) -> str:
        """What the terminal showed, without colours and carriage returns."""
        return ANSI.sub("", self.output.decode("utf-8", "replace")).replace("\r", "")


@contextmanager
def on_a_terminal(args: list[str], cwd: Path, env: dict[str, str]) -> Iterator[Terminal]:
    """Run `newsletter ARGS` with a pseudo-terminal as its stdin, stdout and stderr."""
    leader, follower = pty.openpty()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "newsletter", *args],
        cwd=cwd,
        env={**full_env, **env, "COLUMNS": "1000"},
        stdin=follower,
        stdout=follower,
        stderr=follower,
    )
    os.close(follower)
    try:
        yield Terminal(process, leader)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(leader)


def write_lock_is_free(url: str) -> bool:
    """Whether another writer gets SQLite's write lock within a second."""
    connection = sqlite3.connect(url.removeprefix("sqlite:///"), timeout=1.0, isolation_level=None)
    try:
        connection.execute("BEGIN IMMEDIATE")
        connection.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError:  # "database is locked"
        return False
    finally:
        connection.close()


@contextmanager
def opened(url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(url)
    try:
        yield make_sessionmaker(engine)
    finally:
        engine.dispose()


def counts(url: str) -> dict[str, int]:
    """How many campaigns there are, and events of the actions a send records."""
    with opened(url) as factory, unit_of_work(factory) as session:
        found = {"campaigns": session.scalar(sql_select(func.count()).select_from(Campaign)) or 0}
        for action in ("campaign.checked", "campaign.started", "case.sent"):
            stmt = sql_select(func.count()).select_from(Event).where(Event.action == action)
            found[action] = session.scalar(stmt) or 0
    return found


def case_made(tmp_path: Path, smtpd: SmtpServer, url: str) -> dict[str, str]:
    """The example people, and case 1 ready to send to the 8 of them on urgent-actions."""
    env = write_config(tmp_path, smtpd, url)
    run(["init"], tmp_path, env)
    run(["subscribers", "import", str(ROOT / "subscribers" / "example.csv"), "--confirmed"],
        tmp_path, env)  # fmt: skip
    (tmp_path / "targets.toml").write_text(TARGETS, encoding="utf-8")
    for lang, text in LETTERS.items():
        (tmp_path / f"letter-{lang}.txt").write_text(text, encoding="utf-8")
    (tmp_path / "case.txt").write_text("Ales Bialiatski is serving ten years.\n\nWrite now.")
    run(create_args(), tmp_path, env)
    return env


def test_actions_send_asks_with_the_database_free_then_sends_once(
    tmp_path: Path, smtpd: SmtpServer, database_url: str
) -> None:
    """At the prompt, other writers go on; yes sends what was shown, audited once."""
    env = case_made(tmp_path, smtpd, database_url)
    with on_a_terminal(["actions", "send", "1"], tmp_path, env) as terminal:
        assert "Send the first message of UA 1/" in terminal.prompt()
        assert "to 8 people? [y/N]:" in terminal.text()
        if database_url.startswith("sqlite"):
            assert write_lock_is_free(database_url)
        assert terminal.answer("y") == 0, terminal.text()
    assert "campaign" in terminal.text() and "first message queued for 8 people" in terminal.text()
    assert len(smtpd.messages()) == 8
    # The first pass left nothing: one campaign, checked, started and sent once.
    assert counts(database_url) == {
        "campaigns": 1,
        "campaign.checked": 1,
        "campaign.started": 1,
        "case.sent": 1,
    }


def test_actions_send_refuses_what_changed_while_it_asked(
    tmp_path: Path, smtpd: SmtpServer, sqlite_url: str
) -> None:
    """A reader unsubscribes while staff read the question: the unsubscribe goes through at
    once (it waited 30 s and failed), and the yes to "8 people" sends nothing to 7."""
    env = case_made(tmp_path, smtpd, sqlite_url)
    with on_a_terminal(["actions", "send", "1"], tmp_path, env) as terminal:
        assert "to 8 people? [y/N]:" in terminal.prompt()
        started = time.monotonic()
        left = run(["subscribers", "unsubscribe", "anna.example@example.org"], tmp_path, env)
        assert time.monotonic() - started < 20, left.stderr
        assert terminal.answer("y") == 1
    errors = [line for line in terminal.text().splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "changed while you were asked" in errors[0], terminal.text()
    assert "Traceback" not in terminal.text()
    assert smtpd.messages() == []
    assert counts(sqlite_url) == {
        "campaigns": 0,
        "campaign.checked": 0,
        "campaign.started": 0,
        "case.sent": 0,
    }
    again = run(["actions", "send", "1", "--yes"], tmp_path, env)
    assert "queued for 7 people" in again.stdout
    assert len(smtpd.messages()) == 7


def test_actions_close_asks_with_the_database_free_for_a_sent_case_and_a_draft(
    tmp_path: Path, smtpd: SmtpServer, sqlite_url: str
) -> None:
    """The closing message's question, and a draft's own (no message to check), both asked
    with no write lock held; yes then closes each."""
    env = case_made(tmp_path, smtpd, sqlite_url)
    run(["actions", "send", "1", "--yes"], tmp_path, env)
    run(["actions", "create", "--title", "Only a draft"], tmp_path, env)
    assert len(smtpd.messages()) == 8
    with on_a_terminal(["actions", "close", "1", "--outcome", "released"], tmp_path, env) as one:
        assert "Send the closing message of UA 1/" in one.prompt()
        assert write_lock_is_free(sqlite_url)
        assert one.answer("y") == 0, one.text()
    assert len(smtpd.messages()) == 16
    with on_a_terminal(["actions", "close", "2", "--outcome", "released"], tmp_path, env) as two:
        assert "Close the draft UA 2/" in two.prompt()
        assert write_lock_is_free(sqlite_url)
        assert two.answer("y") == 0, two.text()
    assert "no message to send" in two.text()
    assert len(smtpd.messages()) == 16
    shown = run(["actions", "list", "--json"], tmp_path, env).stdout
    assert shown.count('"closed"') == 2
