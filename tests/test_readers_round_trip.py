"""The issue's round trip, each step as a person does it: a key made with gpg, given with
`newsletter subscribers key`, its proof decrypted with gpg and followed in the real web pages,
then `newsletter digest send` to aiosmtpd, read back with gpg (SQLite and PostgreSQL)."""

from __future__ import annotations

import re
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path

import httpx
from sqlalchemy.orm import Session, sessionmaker

from newsletter.clock import SystemClock
from tests.builders import run
from tests.conftest import SECRET, SmtpServer, make_settings
from tests.gpg_keys import GpgHome
from tests.test_cli import ROOT, SAMPLE_FEED
from tests.test_readers_send import bodies, encrypted_payload
from tests.test_web import form_token
from tests.webserver import serve_pages

READER = "bob.placeholder@example.org"
PLAIN = "anna.example@example.org"


def test_key_given_proven_and_used_from_the_command_line_and_the_web(
    tmp_path: Path, smtpd: SmtpServer, database_url: str, factory: sessionmaker[Session]
) -> None:
    """`subscribers key` mails the proof encrypted; gpg reads it; its link, followed in the web
    pages, turns encryption on; `digest send` then gives this reader PGP/MIME whose inside is
    what a plain reader reads, and everyone else ordinary mail."""
    home = GpgHome.make(tmp_path / "gnupg")
    fpr = home.generate(f"Bob <{READER}>")
    home.add_key(fpr)
    key_file = tmp_path / "bob.asc"
    key_file.write_text(home.export(fpr))
    settings = make_settings(database_url, smtpd)
    with serve_pages(settings, factory, SystemClock()) as (url, _):
        (tmp_path / "config.toml").write_text(
            f"[database]\nurl = '{database_url}'\n"
            f"[smtp]\nhost = '{smtpd.host}'\nport = {smtpd.port}\n"
            f"[web]\nbase_url = '{url}'\n"
        )
        env = {"NEWSLETTER_SECRET": SECRET}
        run(["init"], tmp_path, env)
        csv = str(ROOT / "subscribers" / "example.csv")
        run(["subscribers", "import", csv, "--confirmed"], tmp_path, env)
        given = run(["subscribers", "key", READER, "--file", str(key_file)], tmp_path, env)
        assert fpr in given.stdout and "pending" in given.stdout

        [proof] = smtpd.messages()
        assert str(proof["To"]).endswith(f"<{READER}>") or str(proof["To"]) == READER
        inside = message_from_bytes(
            home.decrypt(encrypted_payload(proof)).plaintext, policy=policy.default
        )
        assert isinstance(inside, EmailMessage)
        text = inside.get_body(("plain",))
        assert text is not None
        [link] = re.findall(rf"{re.escape(url)}/key/\S+", str(text.get_content()))
        page = httpx.get(link)
        assert page.status_code == 200
        done = httpx.post(link, data={"form_token": form_token(page.text)})
        assert done.status_code == 200 and "Encrypted mail is on" in done.text

    run(["ingest", str(SAMPLE_FEED)], tmp_path, env)
    assert "sent 9" in run(["digest", "send"], tmp_path, env).stdout
    digests = smtpd.messages()[1:]
    [secret] = [m for m in digests if READER in str(m["To"])]
    [plain] = [m for m in digests if PLAIN in str(m["To"])]
    others = [m for m in digests if m is not secret]
    assert all(m.get_content_type() == "multipart/alternative" for m in others)
    assert str(secret["Subject"]) == "[...]"
    assert "/u/" in str(secret["List-Unsubscribe"])
    opened = message_from_bytes(
        home.decrypt(encrypted_payload(secret)).plaintext, policy=policy.default
    )
    assert isinstance(opened, EmailMessage)
    assert opened.get_content_type() == "multipart/alternative"
    assert str(opened["Subject"]) == str(plain["Subject"])
    assert bodies(opened) == bodies(plain)
    home.close()
