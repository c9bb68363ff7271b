"""Tests for devsmtp.py: the local SMTP server keeps what it receives, through real smtplib."""

from __future__ import annotations

import mailbox
import smtplib
from email import message_from_bytes, policy
from pathlib import Path

import pytest

from newsletter.devsmtp import free_port, start_dev_smtp
from newsletter.errors import ConfigError

MESSAGE = (
    b"From: staff@example.org\r\nTo: reader@example.org\r\nSubject: Hello\r\n\r\nBody text.\r\n"
)


def send_one(maildir: Path) -> list[bytes]:
    """Start the server on `maildir`, send one message with smtplib, return what it kept."""
    port = free_port()
    controller = start_dev_smtp(host="127.0.0.1", port=port, maildir=maildir)
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            refused = client.sendmail("staff@example.org", ["reader@example.org"], MESSAGE)
        assert refused == {}
    finally:
        controller.stop()
    box = mailbox.Maildir(maildir, create=False)
    return [box.get_bytes(key) for key in box.iterkeys()]


@pytest.mark.parametrize(
    "layout",
    [
        pytest.param("missing", id="missing"),
        pytest.param("empty", id="exists-empty"),
        pytest.param("partial", id="exists-with-cur-only"),
        pytest.param("nested", id="missing-parents"),
    ],
)
def test_every_message_is_kept_whatever_the_folder_holds(tmp_path: Path, layout: str) -> None:
    """An existing empty folder (or one missing tmp/new) becomes a Maildir; nothing is refused."""
    maildir = tmp_path / "a" / "b" / "mail" if layout == "nested" else tmp_path / "mail"
    if layout in ("empty", "partial"):
        maildir.mkdir()
    if layout == "partial":
        (maildir / "cur").mkdir()
    [kept] = send_one(maildir)
    msg = message_from_bytes(kept, policy=policy.default)
    assert msg["Subject"] == "Hello" and msg["X-Delivered-To"] == "reader@example.org"
    assert msg.get_content().strip() == "Body text."
    assert send_one(maildir) != []  # and again, into the same Maildir


def test_a_file_in_the_way_is_one_clear_error(tmp_path: Path) -> None:
    """A --maildir that is a file stops with one ConfigError line naming it, before listening."""
    path = tmp_path / "mail"
    path.write_text("not a folder")
    with pytest.raises(ConfigError, match="cannot keep mail there") as caught:
        start_dev_smtp(host="127.0.0.1", port=free_port(), maildir=path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)
    assert path.read_text() == "not a folder"
