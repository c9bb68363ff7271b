"""Audit of what comes back from the outside world: DSNs, feedback reports, and the doctor's DNS.

Against real parts, as the other tests: mail really sent through aiosmtpd and returned through
handle_return on a real database (SQLite and PostgreSQL), the doctor against the loopback DNS
server of tests/dns_server.py (and, here, a slow one built on its answers).
"""

from __future__ import annotations

import logging
import smtplib
import socketserver
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from newsletter.bounces import parse_verp
from newsletter.clock import FrozenClock
from newsletter.complaints import handle_return
from newsletter.config import load_settings
from newsletter.db import unit_of_work
from newsletter.db.models import (
    Delivery,
    Event,
    Subscriber,
    Subscription,
    SubscriptionStatus,
    Suppression,
)
from newsletter.devsmtp import free_port
from newsletter.dns_records import AuthoritativeDns
from newsletter.doctor import Finding, check_dns, passed
from newsletter.inbound import inbound_for
from newsletter.lists import read_lists, sync_lists
from newsletter.spf import check_host
from newsletter.subscriptions import forget
from tests.conftest import SECRET, make_settings
from tests.dns_server import Zone, answer, serve_dns
from tests.smtp_faults import FaultyHandler, faulty_smtpd
from tests.test_bounces import BOUNCE_ADDRESS, dsn, second_campaign, send_everyone, send_queued
from tests.test_doctor import (
    DOMAIN,
    NOW,
    RELAY,
    ROOT,
    SELECTOR,
    _pem,
    by_check,
    dkim_txt,
    doctor,
    good_zone,
    write_config,
)
from tests.test_inbound import reader
from tests.test_send import deliver, seed, settings_for


@pytest.fixture(scope="module")
def key() -> bytes:
    """The configured DKIM key (PEM)."""
    return _pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))


# --- bounces -------------------------------------------------------------------------------


def apply(factory: sessionmaker[Session], database_url: str, raw: bytes, to: str) -> str:
    """One returned message applied as the inbound server and `bounces process` apply it."""
    with unit_of_work(factory) as session:
        return handle_return(
            session=session,
            raw=raw,
            envelope_recipients=[to],
            settings=make_settings(database_url),
            now=NOW,
        )


def test_a_dsn_status_with_a_comment_is_still_a_hard_bounce(
    factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """ "Status: 5.1.1 (bad destination mailbox address)", as some servers write it (an RFC 822
    comment after the code), is a hard bounce, not a delay that leaves the dead address mailed."""
    sent = send_everyone(factory, clock, database_url, ["gone"])["gone"]
    to = sent.envelope_from
    raw = dsn(to, "person0@example.net", "failed", "5.1.1", sent.headers, "text/rfc822-headers")
    raw = raw.replace(b"Status: 5.1.1\r\n", b"Status: 5.1.1 (bad destination mailbox address)\r\n")
    assert apply(factory, database_url, raw, to) == "hard"
    with unit_of_work(factory) as session:
        delivery = session.get(Delivery, sent.delivery_id)
        assert delivery is not None and delivery.status == "failed"
        person = session.get(Subscriber, delivery.subscriber_id)
        assert person is not None and person.status == "bounced"


def test_a_bounce_keeps_no_address_the_remote_server_named(
    factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """A hard bounce from an alias names the forwarding target, and the reader's address with a
    +tag: neither is kept in the delivery's reply or in the audit events, which outlive
    `subscribers forget`."""
    sent = send_everyone(factory, clock, database_url, ["alias"])["alias"]
    to = sent.envelope_from
    raw = dsn(to, "private.name@forward.example", "failed", "5.1.1", sent.headers, "")
    raw = raw.replace(b"mailbox says no", b"mailbox says no (alias of PERSON0+news@example.net)", 1)
    assert b"private.name@forward.example" in raw
    assert apply(factory, database_url, raw, to) == "hard"
    with unit_of_work(factory) as session:
        forget(session=session, email="person0@example.net", secret=SECRET, now=NOW, actor="test")
    with unit_of_work(factory) as session:
        kept = [str(e.detail) for e in session.scalars(select(Event))]
        kept += [str(d.last_reply) for d in session.scalars(select(Delivery))]
    assert any("5.1.1" in text for text in kept)  # the reply itself is kept
    assert not [text for text in kept if "@" in text]


def test_the_same_bounce_twice_writes_once(
    factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """One DSN sent to the inbound server for the VERP address twice in one message, then again
    in a later session: one delivery.bounced and one subscriber.bounced event, not three each
    (the audit events are append-only: a forger repeating their own bounce filled them)."""
    sent = send_everyone(factory, clock, database_url, ["gone"])["gone"]
    to = sent.envelope_from
    raw = dsn(to, "person0@example.net", "failed", "5.1.1", sent.headers, "text/rfc822-headers")
    base = make_settings(database_url)
    settings = replace(base, inbound=replace(base.inbound, enabled=True, port=free_port()))
    controller = inbound_for(settings, factory, clock)
    try:
        for _ in range(2):
            with smtplib.SMTP("127.0.0.1", settings.inbound.port, timeout=10) as client:
                assert client.sendmail("", [to, to.upper()], raw) == {}
    finally:
        controller.stop()
    assert apply(factory, database_url, raw, to) == "hard again"
    with unit_of_work(factory) as session:
        actions = list(session.scalars(select(Event.action)))
        person = session.scalars(select(Subscriber)).one()
    assert (actions.count("delivery.bounced"), actions.count("subscriber.bounced")) == (1, 1)
    assert person.status == "bounced"


@pytest.mark.parametrize(
    ("status", "verp", "outcome", "delivery_status"),
    [
        ("5.7.26", True, "refused", "failed"),  # Gmail: unauthenticated (a DMARC mistake)
        ("5.7.1", True, "refused", "failed"),  # a provider's policy or spam block
        ("5.6.0", True, "refused", "failed"),  # content
        ("5.1.7", True, "refused", "failed"),  # our sender's address, not the reader's
        ("5.7.26", False, "refused", "sent"),  # named by Message-ID only: a note
        ("5.1.1", True, "hard", "failed"),  # the mailbox: still suppressed
        ("5.0.0", True, "hard", "failed"),  # undetermined, as MTAs write "550 user unknown"
    ],
)
def test_a_permanent_failure_not_about_the_mailbox_suppresses_no_one(
    factory: sessionmaker[Session],
    clock: FrozenClock,
    database_url: str,
    status: str,
    verp: bool,
    outcome: str,
    delivery_status: str,
) -> None:
    """Behind a relay, the providers' refusals come back as DSNs: a DMARC or policy rejection
    (5.7.x) of one message fails that delivery but keeps the reader, as the sender does for a
    5xx after RCPT; only a mailbox status (X.0.0, X.1.x, X.2.x) suppresses."""
    sent = send_everyone(factory, clock, database_url, ["reader"])["reader"]
    to = sent.envelope_from if verp else BOUNCE_ADDRESS
    raw = dsn(to, "person0@example.net", "failed", status, sent.headers, "text/rfc822-headers")
    assert apply(factory, database_url, raw, to) == outcome
    with unit_of_work(factory) as session:
        delivery = session.get(Delivery, sent.delivery_id)
        assert delivery is not None and delivery.status == delivery_status
        person = session.get(Subscriber, delivery.subscriber_id)
        assert person is not None
        held = session.scalar(select(func.count()).select_from(Suppression))
        statuses = set(
            session.scalars(
                select(Subscription.status).where(Subscription.subscriber_id == person.id)
            )
        )
    suppressed = outcome == "hard"
    assert (person.status, held) == (("bounced", 1) if suppressed else ("active", 0))
    assert statuses == {"active"}
    assert status in (delivery.last_reply or "")


@pytest.mark.parametrize("status", ["5.1.1(comment)", "(5.1.1)", "5.1", "6.1.1", "5.1.1.1"])
def test_a_status_that_is_no_code_is_never_hard(
    factory: sessionmaker[Session], clock: FrozenClock, database_url: str, status: str
) -> None:
    """Only a well-formed class 5 code is hard; anything else is noted as soft, nobody bounced."""
    sent = send_everyone(factory, clock, database_url, ["x"])["x"]
    to = sent.envelope_from
    raw = dsn(to, "person0@example.net", "failed", "5.1.1", sent.headers, "text/rfc822-headers")
    raw = raw.replace(b"Status: 5.1.1\r\n", f"Status: {status}\r\n".encode())
    assert apply(factory, database_url, raw, to) == "soft"
    with unit_of_work(factory) as session:
        assert session.scalar(select(func.count()).select_from(Suppression)) == 0


def test_a_bounce_address_with_a_plus_still_names_its_deliveries(
    factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """[mail] bounce_address = "news+bounces@...": mail really goes out with VERP senders under
    it, and a hard bounce to one is applied, where every bounce was "unknown delivery"."""
    seed(factory, clock, 1)
    base = make_settings(database_url)
    mail = replace(base.mail, bounce_address="News+Bounces@portal.example.org")
    handler = FaultyHandler()
    with faulty_smtpd(handler) as port:
        settings = replace(settings_for(database_url, port), mail=mail)
        deliver(factory, settings, clock)
    ((sender, _rcpts, raw),) = handler.received
    assert sender.startswith("News+Bounces+")
    assert parse_verp(sender, settings=settings) is not None
    assert parse_verp(sender.replace("News+Bounces+", "News+"), settings=settings) is None
    headers = raw.split(b"\r\n\r\n")[0]
    returned = dsn(sender, "person0@example.net", "failed", "5.1.1", headers, "")
    with unit_of_work(factory) as session:
        outcome = handle_return(
            session=session, raw=returned, envelope_recipients=[sender], settings=settings, now=NOW
        )
    assert outcome == "hard"


def test_an_old_verp_address_never_names_another_readers_delivery(
    factory: sessionmaker[Session],
    clock: FrozenClock,
    database_url: str,
) -> None:
    """A reader forgotten (their deliveries deleted) keeps the VERP address of their last
    message; a bounce sent to it later must not suppress whoever got the next delivery.

    SQLite gave a deleted highest id again (INTEGER PRIMARY KEY without AUTOINCREMENT), and the
    VERP signature covers the delivery id alone: the forgotten reader's old address then named
    the victim's delivery of the next campaign. Migration 0009 declares AUTOINCREMENT.
    """
    sent = send_everyone(factory, clock, database_url, ["victim", "leaver"])
    leaver = sent["leaver"]
    with unit_of_work(factory) as session:
        forget(
            session=session, email="person1@example.net", secret=SECRET, now=clock.now(), actor="t"
        )
    second_campaign(factory, clock)
    send_queued(factory, clock, database_url, ["victim"])
    raw = dsn(
        leaver.envelope_from, "person1@example.net", "failed", "5.1.1", b"", ""
    )  # the leaver's own old VERP address, from the Return-Path of the mail they kept
    apply(factory, database_url, raw, leaver.envelope_from)
    with unit_of_work(factory) as session:
        victim = session.scalars(
            select(Subscriber).where(Subscriber.email == "person0@example.net")
        ).one()
        assert victim.status == "active"
        assert session.scalar(select(func.count()).select_from(Suppression)) == 1  # forgotten


# --- the inbound server ------------------------------------------------------------------


@pytest.mark.parametrize("charset", ["idna", "undefined"])
def test_an_encoded_subject_in_an_unusable_charset_is_read_not_retried(
    factory: sessionmaker[Session],
    clock: FrozenClock,
    database_url: str,
    caplog: pytest.LogCaptureFixture,
    charset: str,
) -> None:
    """A subject in a charset whose codec cannot decode with errors="replace" is read as ASCII
    like an unknown one: the unsubscribe is applied and answered 250, where it was 451 (try
    again, for days) with an error logged each time."""
    with unit_of_work(factory) as session:
        sync_lists(session=session, specs=read_lists(ROOT / "subscribers" / "lists.toml"))
    sid, token = reader(factory, clock)
    base = make_settings(database_url)
    settings = replace(base, inbound=replace(base.inbound, enabled=True, port=free_port()))
    caplog.set_level(logging.INFO, logger="newsletter.inbound")
    controller = inbound_for(settings, factory, clock)
    try:
        with smtplib.SMTP("127.0.0.1", settings.inbound.port, timeout=10) as client:
            client.ehlo()
            client.mail("reader@example.org")
            client.rcpt(settings.mail.unsubscribe_address)
            subject = f"=?{charset}?q?unsubscribe_{token}?="
            code, _ = client.data(f"Subject: {subject}\r\n\r\nplease\r\n".encode())
    finally:
        controller.stop()
    assert code == 250
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    with unit_of_work(factory) as session:
        status = session.scalar(
            select(Subscription.status).where(Subscription.subscriber_id == sid)
        )
    assert status == SubscriptionStatus.UNSUBSCRIBED


# --- the doctor's DNS ----------------------------------------------------------------------


class _SlowUdp(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        data, sock = self.request
        time.sleep(self.server.delay)  # type: ignore[attr-defined]
        sock.sendto(answer(self.server.zone, data).pack(), self.client_address)  # type: ignore[attr-defined]


class _SlowServer(socketserver.ThreadingUDPServer):
    daemon_threads = True


@contextmanager
def slow_dns(zone: Zone, delay: float) -> Iterator[int]:
    """The loopback server's answers over UDP, each after `delay` seconds; yields the port."""
    for name in list(zone):
        zone[name.rstrip(".").lower()] = zone.pop(name)
    server = _SlowServer(("127.0.0.1", 0), _SlowUdp)
    server.zone = zone  # type: ignore[attr-defined]
    server.delay = delay  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def many_names_zone(pem: bytes) -> Zone:
    """Ten mx mechanisms (within the lookup limit), each naming ten hosts with an address: 111
    names for every relay, each asked once."""
    zone = good_zone(pem)
    zone[DOMAIN] = [
        ("TXT", "v=spf1 " + " ".join(f"mx:m{i}.example.net" for i in range(10)) + " -all")
    ]
    for i in range(10):
        zone[f"m{i}.example.net"] = [("MX", f"10 h{i}-{j}.example.net") for j in range(10)]
        for j in range(10):
            zone[f"h{i}-{j}.example.net"] = [("A", f"198.51.100.{10 * i + j}")]
    return zone


def test_a_slow_dns_server_costs_the_doctor_a_bounded_time(tmp_path: Path, key: bytes) -> None:
    """A server answering each name 0.15 s late (well within the timeout) does not hold the
    doctor for 111 x 0.15 s: the run's DNS time is bounded, and what is left fails in one line."""
    with slow_dns(many_names_zone(key), 0.15) as port:
        settings = load_settings(write_config(tmp_path, port, key), {"NEWSLETTER_SECRET": SECRET})
        resolver = AuthoritativeDns(timeout=0.5, servers=(("127.0.0.1", port),))
        started = time.monotonic()
        findings = check_dns(settings, resolver, NOW)
        elapsed = time.monotonic() - started
    assert elapsed < 8, elapsed  # 10 timeouts of 0.5 s, and one answer late at most
    assert not passed(findings)
    assert any("budget" in f.message for f in findings), findings
    assert all("\n" not in f.message for f in findings)
    assert {f.check for f in findings} >= {"spf", "dkim", "dmarc"}  # every check still answered


def test_a_long_macro_expansion_is_cut_to_253_in_linear_time(key: bytes) -> None:
    """A 60 KB SPF record (many strings, over TCP) whose exists: expands to a million
    characters for an IPv6 relay is cut from the left at once, not one label at a time."""
    record = "v=spf1 exists:" + "%{i}" * 15_000 + " -all"
    zone: Zone = {DOMAIN: [("TXT", record)]}
    with serve_dns(zone) as port:
        resolver = AuthoritativeDns(timeout=2, servers=(("127.0.0.1", port),))
        assert resolver.txt(DOMAIN) == [record]
        started = time.monotonic()
        result = check_host("2001:db8::25", DOMAIN, f"bounces@{DOMAIN}", resolver)
        elapsed = time.monotonic() - started
    assert result == "fail"  # the cut name has no address: exists does not match
    assert elapsed < 1.5, elapsed


def test_a_macro_with_thousands_of_digits_is_a_permerror_and_the_checks_go_on(
    tmp_path: Path, key: bytes
) -> None:
    """%{d<5,000 digits>} is no macro (RFC 7208 §7.1 asks for at most 128 parts): a permerror,
    where int() used to raise and stop the identity's DKIM and DMARC checks with it."""
    zone = good_zone(key)
    zone[DOMAIN] = [("TXT", "v=spf1 a:%{d" + "9" * 5000 + f"}}.example.org ip4:{RELAY} -all")]
    with serve_dns(zone) as port:
        findings = doctor(write_config(tmp_path, port, key), port)
    assert not by_check(findings, "checks"), findings
    (spf_pass,) = by_check(findings, "spf-pass")
    assert not spf_pass.ok and "permerror" in spf_pass.message
    assert by_check(findings, "dkim")[0].ok and by_check(findings, "dmarc")[0].ok


@pytest.mark.parametrize(("h", "ok"), [("sha1", False), ("sha1:sha256", True), ("SHA256", True)])
def test_a_dkim_record_whose_h_excludes_sha256_fails(
    tmp_path: Path, key: bytes, h: str, ok: bool
) -> None:
    """h= lists the hashes a verifier may accept (RFC 6376 §3.6.1); the service signs with
    sha256, so h=sha1 fails at the providers, and must fail here (dkimpy ignores h=)."""
    zone = good_zone(key)
    zone[f"{SELECTOR}._domainkey.{DOMAIN}"] = [
        ("TXT", dkim_txt(key).replace("k=rsa;", f"k=rsa; h={h};"))
    ]
    with serve_dns(zone) as port:
        findings: list[Finding] = doctor(write_config(tmp_path, port, key), port)
    (dkim,) = by_check(findings, "dkim")
    assert dkim.ok is ok, dkim
    if not ok:
        assert "sha256" in dkim.message and dkim.record_to_publish
