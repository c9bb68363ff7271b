"""DKIM: mail sent by a real `newsletter send` with [dkim] configured verifies with dkimpy."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from email import message_from_bytes, policy
from pathlib import Path

import dkim
import pytest
from dkim import dknewkey
from sqlalchemy.orm import Session, sessionmaker

from newsletter.clock import FrozenClock
from newsletter.db import unit_of_work
from newsletter.db.models import Subscriber, Subscription
from newsletter.dkim import load_signer
from newsletter.readers import set_reading
from tests.conftest import SmtpServer
from tests.sender_cli import NewsletterCli
from tests.smtp_faults import FaultyHandler, faulty_smtpd
from tests.test_flow import prepare, send_digest
from tests.test_readers_send import service_mail, settings_with
from tests.test_send import deliver, seed, settings_for

SELECTOR, DOMAIN = "news2026", "portal.example.org"
PROMISED = {
    "from",
    "subject",
    "date",
    "message-id",
    "list-id",
    "list-unsubscribe",
    "list-unsubscribe-post",
}


@pytest.fixture(scope="module")
def dkim_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """A fresh RSA key (dkimpy's own key generator) and the TXT record that publishes it."""
    folder = tmp_path_factory.mktemp("dkim")
    key, txt = folder / "dkim.key", folder / "dkim.txt"
    dknewkey.GenRSAKeys(str(key), verbose=False)
    dknewkey.ExtractRSADnsPublicKey(str(key), str(txt), verbose=False)
    return key, txt.read_bytes()


def dns_with(record: bytes) -> Callable[..., bytes | None]:
    """A resolver that knows one TXT record: our selector's."""

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        wanted = f"{SELECTOR}._domainkey.{DOMAIN}."
        return record if name.decode().lower().rstrip(".") + "." == wanted else None

    return lookup


def signed_headers(raw: bytes) -> set[str]:
    """The h= list of the message's DKIM-Signature, lower-cased."""
    msg = message_from_bytes(raw, policy=policy.default)
    tags = dict(
        tag.strip().split("=", 1) for tag in "".join(str(msg["DKIM-Signature"]).split()).split(";")
    )
    return {name.lower() for name in tags["h"].split(":")}


def test_sent_mail_carries_a_valid_signature_over_the_promised_headers(
    tmp_path: Path,
    factory: sessionmaker[Session],
    clock: FrozenClock,
    database_url: str,
    dkim_key: tuple[Path, bytes],
) -> None:
    """Every message verifies against the published key and signs From…List-Unsubscribe-Post."""
    key, record = dkim_key
    seed(factory, clock, 4)  # names: none, ASCII, Cyrillic, quotes and a backslash
    handler = FaultyHandler()
    with faulty_smtpd(handler) as port:
        cli = NewsletterCli(
            tmp_path,
            f"[database]\nurl = '{database_url}'\n[smtp]\nhost = '127.0.0.1'\nport = {port}\n"
            f"[dkim]\nselector = '{SELECTOR}'\ndomain = '{DOMAIN}'\nkey_file = '{key}'\n",
        )
        cli.run("send")
    assert len(handler.received) == 4
    resolver = dns_with(record)
    for _sender, _rcpts, raw in handler.received:
        assert raw.startswith(b"DKIM-Signature:")
        assert dkim.verify(raw, dnsfunc=resolver), raw[:400]
        assert signed_headers(raw) >= PROMISED


@pytest.mark.parametrize(
    ("old", "new"),
    [
        pytest.param(b"Subject: ", b"Subject: Re: ", id="subject-changed"),
        pytest.param(b"List-Unsubscribe: <http", b"List-Unsubscribe: <ftp", id="unsubscribe-link"),
        pytest.param(b"Read more.", b"Read less.", id="body-changed"),
    ],
)
def test_a_changed_message_no_longer_verifies(
    tmp_path: Path,
    factory: sessionmaker[Session],
    clock: FrozenClock,
    database_url: str,
    dkim_key: tuple[Path, bytes],
    old: bytes,
    new: bytes,
) -> None:
    """The signature binds the headers and body: any change on the way makes it fail."""
    key, record = dkim_key
    seed(factory, clock, 1)
    handler = FaultyHandler()
    with faulty_smtpd(handler) as port:
        settings = settings_for(database_url, port)
        settings = replace(
            settings,
            dkim=replace(settings.dkim, selector=SELECTOR, domain=DOMAIN, key_file=str(key)),
        )
        deliver(factory, settings, clock, signer=load_signer(settings))
    raw = handler.received[0][2]
    assert dkim.verify(raw, dnsfunc=dns_with(record))
    assert old in raw
    assert not dkim.verify(raw.replace(old, new, 1), dnsfunc=dns_with(record))


def test_each_identity_signs_with_its_own_key_campaigns_and_notices_alike(
    tmp_path: Path,
    factory: sessionmaker[Session],
    smtpd: SmtpServer,
    clock: FrozenClock,
    database_url: str,
    dkim_key: tuple[Path, bytes],
) -> None:
    """A discreet reader's digest and confirmation carry the neutral domain's signature (d=),
    which verifies; the portal's readers' mail carries the portal's."""
    key, record = dkim_key
    base = settings_with(database_url, smtpd)
    neutral = "notes.example.net"
    settings = replace(
        base,
        dkim=replace(base.dkim, selector=SELECTOR, domain=DOMAIN, key_file=str(key)),
        discreet=replace(
            base.discreet, dkim_selector=SELECTOR, dkim_domain=neutral, dkim_key_file=str(key)
        ),
    )
    prepare(factory, clock)
    with unit_of_work(factory) as session:
        quiet = session.query(Subscriber).filter_by(email="dzmitry.uzor@example.org").one()
        set_reading(
            session, subscriber_id=quiet.id, discreet="envelope", now=clock.now(), actor="t"
        )
        session.query(Subscription).filter_by(subscriber_id=quiet.id).first().status = "pending"  # type: ignore[union-attr]
    send_digest(factory, settings, clock)
    service_mail(factory, settings, clock)
    box = smtpd.maildir
    raws = [p.read_bytes() for p in sorted(box.glob("new/*"))]
    kinds = set()
    for raw in raws:
        msg = message_from_bytes(raw, policy=policy.default)
        d = "".join(str(msg["DKIM-Signature"]).split()).split("d=")[1].split(";")[0]
        discreet = "dzmitry.uzor" in str(msg["To"])
        assert d == (neutral if discreet else DOMAIN)
        kinds.add((discreet, msg["Auto-Submitted"] is not None))
        wanted = f"{SELECTOR}._domainkey.{d}."

        def lookup(name: bytes, timeout: int = 5, wanted: str = wanted) -> bytes | None:
            return record if name.decode().lower().rstrip(".") + "." == wanted else None

        body = raw.split(b"\r\n", 2)[2] if raw.startswith(b"Return-Path") else raw
        assert dkim.verify(body, dnsfunc=lookup), (d, msg["Subject"])
    assert (True, True) in kinds and (False, False) in kinds  # a discreet notice, a digest
