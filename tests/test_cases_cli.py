"""`newsletter actions ...` in a fresh process, as an admin uses it: real databases and SMTP."""

from __future__ import annotations

import json
from datetime import date, timedelta
from pathlib import Path

import pytest

from tests.builders import run
from tests.conftest import SmtpServer
from tests.test_cases import LETTERS, TARGETS
from tests.test_cli import ROOT, write_config

DEADLINE = (date.today() + timedelta(days=20)).isoformat()


@pytest.fixture
def ready(tmp_path: Path, smtpd: SmtpServer, database_url: str) -> dict[str, str]:
    """An initialised service with the example people, and a case's files in tmp_path."""
    env = write_config(tmp_path, smtpd, database_url)
    run(["init"], tmp_path, env)
    run(["subscribers", "import", str(ROOT / "subscribers" / "example.csv"), "--confirmed"],
        tmp_path, env)  # fmt: skip
    (tmp_path / "targets.toml").write_text(TARGETS, encoding="utf-8")
    for lang, text in LETTERS.items():
        (tmp_path / f"letter-{lang}.txt").write_text(text, encoding="utf-8")
    (tmp_path / "case.txt").write_text("Ales Bialiatski is serving ten years.\n\nWrite now.")
    (tmp_path / "update.txt").write_text("He was moved to another prison.")
    return env


def create_args(title: str = "Free Ales Bialiatski") -> list[str]:
    return [
        "actions", "create", "--title", title, "--body-file", "case.txt",
        "--deadline", DEADLINE, "--target-file", "targets.toml",
        "--letter", "en=letter-en.txt", "--letter", "be=letter-be.txt",
        "--letter", "ru=letter-ru.txt", "--person", "Ales Bialiatski", "--person-private",
    ]  # fmt: skip


def test_create_send_update_close_from_the_command_line(
    tmp_path: Path, smtpd: SmtpServer, ready: dict[str, str]
) -> None:
    year = date.today().strftime("%y")
    made = run(create_args(), tmp_path, ready)
    assert f"UA 1/{year}" in made.stdout and "draft" in made.stdout
    [row] = json.loads(run(["actions", "list", "--json"], tmp_path, ready).stdout)
    assert (row["reference"], row["status"], row["deadline"]) == (f"UA 1/{year}", "draft", DEADLINE)
    run(["actions", "send", "1", "--yes"], tmp_path, ready)
    assert len(smtpd.messages()) == 8
    again = run(["actions", "send", "1", "--yes"], tmp_path, ready, ok=False)
    assert again.returncode != 0 and "already" in again.stderr
    assert len(smtpd.messages()) == 8  # asked twice, sent once
    run(["actions", "update", f"UA 1/{year}", "--body-file", "update.txt", "--yes"],
        tmp_path, ready)  # fmt: skip
    assert len(smtpd.messages()) == 16
    run(["actions", "close", "1", "--outcome", "released", "--yes"], tmp_path, ready)
    assert len(smtpd.messages()) == 24
    shown = json.loads(run(["actions", "show", "1", "--json"], tmp_path, ready).stdout)
    assert (shown["status"], shown["outcome"], shown["recipients"]) == ("closed", "released", 8)
    assert [m["role"] for m in shown["messages"]] == ["first", "update", "closing"]
    assert shown["person_public"] is False and len(shown["targets"]) == 2
    text = run(["actions", "show", "1"], tmp_path, ready).stdout
    assert "initials only" in text and "closed (released)" in text


@pytest.mark.parametrize(
    ("files", "args", "expected"),
    [
        ({"t.toml": "[[target]]\nname = 'X'\n"}, ["--target-file", "t.toml"], "email or a postal"),
        ({"t.toml": "[[target]\nname="}, ["--target-file", "t.toml"], "not valid TOML"),
        (
            {"t.toml": "[[target]]\nname='X'\nemail='not an address'\n"},
            ["--target-file", "t.toml"],
            "invalid address",
        ),
        (
            {"t.toml": "[[target]]\nname='X'\nemail='a@b.org'\nfax='1'\n"},
            ["--target-file", "t.toml"],
            "unknown field 'fax'",
        ),
        ({"l.txt": "Subject: only a subject\n"}, ["--letter", "en=l.txt"], "the letter is empty"),
        ({"l.txt": "x"}, ["--letter", "de=l.txt"], "language must be one of"),
        ({"l.bin": b"\xff\xfe".decode("latin-1")}, ["--letter", "en=l.bin"], "cannot read"),
        ({}, ["--deadline", "20/12/2026"], "expected YYYY-MM-DD"),
        ({}, ["--target-file", "missing.toml"], "cannot read"),
    ],
)
def test_hostile_case_files_give_one_line_and_write_nothing(
    tmp_path: Path, ready: dict[str, str], files: dict[str, str], args: list[str], expected: str
) -> None:
    for name, content in files.items():
        data = content.encode("latin-1") if name.endswith(".bin") else content.encode()
        (tmp_path / name).write_bytes(data)
    result = run(["actions", "create", "--title", "T", *args], tmp_path, ready, ok=False)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert json.loads(run(["actions", "list", "--json"], tmp_path, ready).stdout) == []


def test_a_draft_without_targets_letters_or_deadline_is_not_sent(
    tmp_path: Path, smtpd: SmtpServer, ready: dict[str, str]
) -> None:
    made = run(["actions", "create", "--title", "Draft only"], tmp_path, ready)
    assert "no targets" in made.stderr and "no deadline" in made.stderr
    result = run(["actions", "send", "1", "--yes"], tmp_path, ready, ok=False)
    assert result.returncode != 0 and "not ready" in result.stderr
    assert smtpd.messages() == []
    run(["actions", "edit", "1", "--target-file", "targets.toml", "--letter", "en=letter-en.txt",
         "--deadline", DEADLINE], tmp_path, ready)  # fmt: skip
    run(["actions", "send", "1", "--yes"], tmp_path, ready)
    assert len(smtpd.messages()) == 8
    edited = run(["actions", "edit", "1", "--title", "New"], tmp_path, ready, ok=False)
    assert edited.returncode != 0 and "only its deadline" in edited.stderr


def test_preview_writes_each_language_and_sends_nothing(
    tmp_path: Path, smtpd: SmtpServer, ready: dict[str, str]
) -> None:
    run(create_args(), tmp_path, ready)
    run(["actions", "preview", "1", "--out", "out"], tmp_path, ready)
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert any(name.endswith(".html") for name in written) and len(written) >= 6
    page = next((tmp_path / "out").glob("*be*.html")).read_text()
    assert "Вызваліце Алеся Бяляцкага" in page
    assert smtpd.messages() == []
    [row] = json.loads(run(["actions", "list", "--json"], tmp_path, ready).stdout)
    assert row["status"] == "draft"
