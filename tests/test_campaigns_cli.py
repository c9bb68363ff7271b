"""Campaign staff watch campaigns from the CLI: counts, rate, time left, failures with replies."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.builders import run
from tests.conftest import SECRET
from tests.smtp_faults import Fault, FaultyHandler, faulty_smtpd

ROOT = Path(__file__).resolve().parents[1]


def newsletter(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run(list(args), tmp_path, {"NEWSLETTER_SECRET": SECRET, "COLUMNS": "200"})


def test_show_lists_failures_with_the_smtp_reply(tmp_path: Path, database_url: str) -> None:
    """`campaigns show --failures` names each refused address and the server's reply."""
    handler = FaultyHandler(
        faults=[Fault("RCPT", reply="550 5.1.1 no such mailbox", only="bob.placeholder")]
    )
    with faulty_smtpd(handler) as port:
        (tmp_path / "config.toml").write_text(
            f"[database]\nurl = '{database_url}'\n[smtp]\nhost = '127.0.0.1'\nport = {port}\n"
        )
        newsletter(tmp_path, "init")
        newsletter(
            tmp_path,
            "subscribers",
            "import",
            str(ROOT / "subscribers" / "example.csv"),
            "--confirmed",
        )
        newsletter(tmp_path, "ingest", str(ROOT / "newsletter" / "data" / "portal-feed.xml"))
        newsletter(tmp_path, "digest", "send")
    shown = newsletter(tmp_path, "campaigns", "show", "1", "--failures").stdout
    assert "bob.placeholder@example.org" in shown and "550 5.1.1 no such mailbox" in shown
    assert "anna.example@example.org" not in shown  # only failures are listed
    assert "done" in shown  # nothing left to send
    watched = newsletter(tmp_path, "campaigns", "show", "1", "--watch").stdout
    assert "finished" in watched  # a finished campaign ends the watch at once
    assert len(handler.received) == 8
