"""`newsletter alert send` on a real terminal: asked with the database free, as `actions send`."""

from __future__ import annotations

import time
from pathlib import Path

from sqlalchemy import func, select

from newsletter.db import unit_of_work
from newsletter.db.models import Campaign, Event
from tests.builders import run
from tests.conftest import SmtpServer
from tests.test_cli import ROOT, write_config
from tests.test_cli_actions_prompt import on_a_terminal, opened, write_lock_is_free

SEND = ["alert", "send", "--title", "Write to the prosecutor", "--body-file", "alert.txt"]


def people(tmp_path: Path, smtpd: SmtpServer, url: str) -> dict[str, str]:
    """The example people (8 of them on urgent-actions) and an alert's text in alert.txt."""
    env = write_config(tmp_path, smtpd, url)
    run(["init"], tmp_path, env)
    run(["subscribers", "import", str(ROOT / "subscribers" / "example.csv"), "--confirmed"],
        tmp_path, env)  # fmt: skip
    (tmp_path / "alert.txt").write_text("He was moved to a punishment cell.\n\nWrite today.")
    return env


def counts(url: str) -> dict[str, int]:
    """How many campaigns there are, and events of the actions an alert's send records."""
    with opened(url) as factory, unit_of_work(factory) as session:
        found = {"campaigns": session.scalar(select(func.count()).select_from(Campaign)) or 0}
        for action in ("alert.created", "campaign.checked", "campaign.started"):
            stmt = select(func.count()).select_from(Event).where(Event.action == action)
            found[action] = session.scalar(stmt) or 0
    return found


def test_alert_send_asks_with_the_database_free_then_sends_once(
    tmp_path: Path, smtpd: SmtpServer, database_url: str
) -> None:
    """The summary and the question come before anything is kept; yes sends it, audited once."""
    env = people(tmp_path, smtpd, database_url)
    with on_a_terminal(SEND, tmp_path, env) as terminal:
        shown = terminal.prompt()
        assert "subject: Urgent action: Write to the prosecutor" in shown
        assert "Send this alert to 8 people on 'urgent-actions'? [y/N]:" in shown
        if database_url.startswith("sqlite"):
            assert write_lock_is_free(database_url)
        assert terminal.answer("y") == 0, terminal.text()
    assert "alert queued for 8 people" in terminal.text()
    assert "resuming" not in terminal.text()
    assert len(smtpd.messages()) == 8
    assert counts(database_url) == {
        "campaigns": 1,
        "alert.created": 1,
        "campaign.checked": 1,
        "campaign.started": 1,
    }


def test_alert_send_refuses_what_changed_while_it_asked(
    tmp_path: Path, smtpd: SmtpServer, sqlite_url: str
) -> None:
    """Someone joins the list while staff read "8 people": the join goes through at once (it
    waited 30 s and failed), and the yes sends nothing; asked again, it goes to the 9."""
    env = people(tmp_path, smtpd, sqlite_url)
    with on_a_terminal(SEND, tmp_path, env) as terminal:
        assert "to 8 people" in terminal.prompt()
        started = time.monotonic()
        join = ["subscribers", "add", "new.reader@example.org", "--list", "urgent-actions"]
        run([*join, "--confirmed"], tmp_path, env)
        assert time.monotonic() - started < 20
        assert terminal.answer("y") == 1
    errors = [line for line in terminal.text().splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "the alert changed while you were asked" in errors[0]
    assert smtpd.messages() == []
    assert counts(sqlite_url) == dict.fromkeys(
        ("campaigns", "alert.created", "campaign.checked", "campaign.started"), 0
    )
    again = run([*SEND, "--yes"], tmp_path, env)
    assert "alert queued for 9 people" in again.stdout
    assert len(smtpd.messages()) == 9
