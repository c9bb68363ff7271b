"""`newsletter demo`, the README's first command, does the whole flow and says what it did."""

from __future__ import annotations

import mailbox
import re
import tomllib
from email import message_from_bytes, policy
from pathlib import Path

from newsletter.tokens import read_token
from tests.builders import run


def test_demo_runs_the_whole_flow_and_its_links_verify(tmp_path: Path) -> None:
    """The demo ingests, sends digest and alert to its SMTP server, and keeps what it needs."""
    folder = tmp_path / "demo"
    result = run(["demo", "--dir", str(folder)], tmp_path, {"COLUMNS": "200"}, timeout=180)
    counts = dict(re.findall(r"│ ([A-Za-z ()]+?)\s+│ (\d+)\s+│", result.stdout))
    assert counts == {
        "items ingested": "10",
        "campaigns": "2",
        "recipients (deliveries)": "17",
        "messages sent": "17",
        "messages accepted by the SMTP server": "17",
    }
    assert (folder / "preview" / "digest.en.html").stat().st_size > 10_000
    box = mailbox.Maildir(folder / "maildir", create=False)
    messages = [message_from_bytes(box.get_bytes(k), policy=policy.default) for k in box.iterkeys()]
    assert len(messages) == 17
    secret = tomllib.loads((folder / "config.toml").read_text())["security"]["secret"]
    for msg in messages:
        token = re.search(r"/u/([^>]+)>", str(msg["List-Unsubscribe"]))
        assert token is not None
        claims = read_token(token.group(1), secret=secret, purpose="unsubscribe")
        assert claims.subscriber_id > 0


def test_demo_in_a_folder_it_cannot_use_says_so_in_one_line(tmp_path: Path) -> None:
    """A --dir that cannot be a folder is one line with advice, not a traceback."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = run(["demo", "--dir", str(blocker / "demo")], tmp_path, ok=False, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pass --dir" in lines[0], result.stderr
    assert "Traceback" not in result.stderr
