"""`newsletter doctor` against a real authoritative DNS server on loopback, and --live over HTTP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import dns.flags
import dns.message
import dns.query
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from newsletter.clock import FrozenClock
from newsletter.config import load_settings
from newsletter.db import unit_of_work
from newsletter.db.models import (
    Event,
    MailingList,
    Subscriber,
    SubscriberStatus,
    Subscription,
)
from newsletter.dns_records import AuthoritativeDns, DnsError
from newsletter.doctor import (
    Finding,
    aligned,
    check_dns,
    check_public_https,
    organizational_domain,
    passed,
    public_key_b64,
    txt_record,
)
from newsletter.lists import read_lists, sync_lists
from newsletter.spf import SpfPermError, count_lookups, parse_spf, suggest_spf, term_cost
from newsletter.subscriptions import subscribe
from tests.builders import run
from tests.conftest import SECRET
from tests.dns_server import Zone, serve_dns, silent_dns
from tests.webserver import serve_pages

ROOT = Path(__file__).resolve().parents[1]
RELAY = "192.0.2.25"
NOW = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
DOMAIN = "portal.example.org"
SELECTOR = "s1"
GOOD_SPF = f"v=spf1 ip4:{RELAY} -all"
GOOD_DMARC = "v=DMARC1; p=none; rua=mailto:dmarc@portal.example.org"


def _pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


@pytest.fixture(scope="module")
def keys() -> tuple[bytes, bytes]:
    """The configured DKIM key and another one (PEM)."""
    make = rsa.generate_private_key
    return _pem(make(public_exponent=65537, key_size=2048)), _pem(make(65537, 2048))


def dkim_txt(pem: bytes) -> str:
    return f"v=DKIM1; k=rsa; p={public_key_b64(pem)}"


def good_zone(pem: bytes) -> Zone:
    """SPF for the relay, the selector with the configured key, DMARC p=none: everything passes."""
    return {
        DOMAIN: [("TXT", GOOD_SPF), ("TXT", "google-site-verification=abc")],
        f"{SELECTOR}._domainkey.{DOMAIN}": [("TXT", dkim_txt(pem))],
        f"_dmarc.{DOMAIN}": [("TXT", GOOD_DMARC)],
    }


def write_config(tmp_path: Path, port: int, key: bytes, extra: str = "", **mail: str) -> Path:
    """A config file: the portal's addresses, the DKIM key, the relay's address, our DNS."""
    key_file = tmp_path / "dkim.pem"
    key_file.write_bytes(key)
    from_address = mail.get("from_address", f"news@{DOMAIN}")
    bounce = mail.get("bounce_address", f"bounces@{DOMAIN}")
    dkim_domain = mail.get("dkim_domain", "")
    path = tmp_path / "config.toml"
    path.write_text(
        f"[database]\nurl = 'sqlite:///{tmp_path / 'n.db'}'\n"
        f"[smtp]\nips = ['{RELAY}']\n"
        f"[mail]\nfrom_address = '{from_address}'\nbounce_address = '{bounce}'\n"
        f"[dkim]\nselector = '{SELECTOR}'\nkey_file = '{key_file}'\ndomain = '{dkim_domain}'\n"
        f"[doctor]\nnameservers = ['127.0.0.1:{port}']\ntimeout_seconds = 2.0\n{extra}"
    )
    return path


def doctor(config: Path, port: int) -> list[Finding]:
    """The DNS findings for a config file, asked of the test server."""
    settings = load_settings(config, {"NEWSLETTER_SECRET": SECRET})
    dns = AuthoritativeDns.from_settings(settings.doctor.nameservers, 2.0)
    return check_dns(settings, dns, NOW)


def by_check(findings: list[Finding], check: str) -> list[Finding]:
    return [f for f in findings if f.check == check]


# --- the server itself ----------------------------------------------------------------------


def test_server_answers_authoritatively_and_long_txt_comes_whole(
    keys: tuple[bytes, bytes],
) -> None:
    """AA flag set; a 2048-bit key's record (over 255 bytes) arrives whole, through TCP when the
    UDP answer is truncated."""
    record = dkim_txt(keys[0])
    assert len(record) > 255
    with serve_dns(good_zone(keys[0]), udp_limit=300) as port:
        query = dns.message.make_query(f"{SELECTOR}._domainkey.{DOMAIN}", "TXT")
        udp = dns.query.udp(query, "127.0.0.1", port=port, timeout=2)
        assert udp.flags & dns.flags.AA
        assert udp.flags & dns.flags.TC and not udp.answer  # the client must retry over TCP
        resolver = AuthoritativeDns(timeout=2, servers=(("127.0.0.1", port),))
        assert resolver.txt(f"{SELECTOR}._domainkey.{DOMAIN}") == [record]
        assert resolver.txt(f"nothing.{DOMAIN}") == []


# --- the verdicts ---------------------------------------------------------------------------


def test_good_setup_passes(tmp_path: Path, keys: tuple[bytes, bytes]) -> None:
    with serve_dns(good_zone(keys[0])) as port:
        findings = doctor(write_config(tmp_path, port, keys[0]), port)
    assert passed(findings), findings
    assert {f.check for f in findings} == {
        "spf",
        "spf-lookups",
        "spf-pass",
        "dkim",
        "dmarc",
        "dmarc-alignment",
    }
    assert all(f.record_to_publish == "" for f in findings)
    assert "0 DNS lookups of at most 10" in by_check(findings, "spf-lookups")[0].message
    assert "policy none" in by_check(findings, "dmarc")[0].message


def test_spf_over_the_lookup_limit_through_nested_includes(
    tmp_path: Path, keys: tuple[bytes, bytes]
) -> None:
    """12 lookups: include spf1 (1 + its 8, nested) and include spf2 (1 + 2)."""
    zone = good_zone(keys[0])
    zone[DOMAIN] = [
        ("TXT", f"v=spf1 ip4:{RELAY} include:spf1.example.net include:spf2.example.net -all")
    ]
    zone["spf1.example.net"] = [
        (
            "TXT",
            "v=spf1 include:spf3.example.net a:x.example.net mx:x.example.net "
            "exists:x.example.net -all",
        )
    ]
    zone["spf3.example.net"] = [("TXT", "v=spf1 a:y1.example.net a:y2.example.net a:y3 a:y4 ?all")]
    zone["spf2.example.net"] = [("TXT", "v=spf1 a:z1.example.net a:z2.example.net ~all")]
    with serve_dns(zone) as port:
        findings = doctor(write_config(tmp_path, port, keys[0]), port)
    assert not passed(findings)
    (lookups,) = by_check(findings, "spf-lookups")
    assert not lookups.ok
    assert "12 DNS lookups of at most 10" in lookups.message
    assert "left out: include:spf2.example.net" in lookups.message
    assert lookups.record_to_publish == (
        f'{DOMAIN}. IN TXT "v=spf1 ip4:{RELAY} include:spf1.example.net -all"'
    )
    assert by_check(findings, "spf-pass")[0].ok  # the relay itself matches early
    assert all(f.ok for f in findings if f.check != "spf-lookups")


def test_two_spf_records_fail_with_one_merged_record(
    tmp_path: Path, keys: tuple[bytes, bytes]
) -> None:
    zone = good_zone(keys[0])
    zone[DOMAIN] = [("TXT", GOOD_SPF), ("TXT", "v=spf1 include:_spf.mailer.example.net ~all")]
    zone["_spf.mailer.example.net"] = [("TXT", "v=spf1 ip4:198.51.100.0/24 ~all")]
    with serve_dns(zone) as port:
        findings = doctor(write_config(tmp_path, port, keys[0]), port)
    (spf,) = by_check(findings, "spf")
    assert not spf.ok and "2 SPF records" in spf.message
    assert spf.record_to_publish == (
        f'{DOMAIN}. IN TXT "v=spf1 ip4:{RELAY} include:_spf.mailer.example.net -all"'
    )
    assert not passed(findings)


def test_spf_that_does_not_cover_the_relay(tmp_path: Path, keys: tuple[bytes, bytes]) -> None:
    zone = good_zone(keys[0])
    zone[DOMAIN] = [("TXT", "v=spf1 mx ~all")]
    zone[DOMAIN].append(("MX", f"10 mx.{DOMAIN}"))
    zone[f"mx.{DOMAIN}"] = [("A", "203.0.113.9")]
    with serve_dns(zone) as port:
        findings = doctor(write_config(tmp_path, port, keys[0]), port)
    (result,) = by_check(findings, "spf-pass")
    assert not result.ok and "softfail" in result.message
    assert result.record_to_publish == f'{DOMAIN}. IN TXT "v=spf1 ip4:{RELAY} mx ~all"'
    assert "1 DNS lookups" in by_check(findings, "spf-lookups")[0].message


def test_dkim_selector_with_the_wrong_key(tmp_path: Path, keys: tuple[bytes, bytes]) -> None:
    right, wrong = keys
    zone = good_zone(right)
    zone[f"{SELECTOR}._domainkey.{DOMAIN}"] = [("TXT", dkim_txt(wrong))]
    with serve_dns(zone) as port:
        findings = doctor(write_config(tmp_path, port, right), port)
    (dkim,) = by_check(findings, "dkim")
    assert not dkim.ok and "not the configured key" in dkim.message
    assert dkim.record_to_publish == txt_record(f"{SELECTOR}._domainkey.{DOMAIN}", dkim_txt(right))
    # The record is split into strings a zone file accepts.
    assert dkim.record_to_publish.count('" "') == 1
    assert not passed(findings)


def test_dkim_missing_selector(tmp_path: Path, keys: tuple[bytes, bytes]) -> None:
    zone = good_zone(keys[0])
    del zone[f"{SELECTOR}._domainkey.{DOMAIN}"]
    with serve_dns(zone) as port:
        findings = doctor(write_config(tmp_path, port, keys[0]), port)
    (dkim,) = by_check(findings, "dkim")
    assert not dkim.ok and "no DKIM key published" in dkim.message
    assert public_key_b64(keys[0])[:200] in dkim.record_to_publish
    # DKIM failed but SPF is aligned: DMARC alignment still holds through SPF.
    assert by_check(findings, "dmarc-alignment")[0].ok


def test_dmarc_missing(tmp_path: Path, keys: tuple[bytes, bytes]) -> None:
    zone = good_zone(keys[0])
    del zone[f"_dmarc.{DOMAIN}"]
    with serve_dns(zone) as port:
        findings = doctor(write_config(tmp_path, port, keys[0]), port)
    (dmarc,) = by_check(findings, "dmarc")
    assert not dmarc.ok
    assert dmarc.record_to_publish == (
        f'_dmarc.{DOMAIN}. IN TXT "v=DMARC1; p=none; rua=mailto:dmarc-reports@example.org"'
    )
    assert not passed(findings)


def test_dmarc_of_the_organizational_domain_governs_a_subdomain(
    tmp_path: Path, keys: tuple[bytes, bytes]
) -> None:
    zone = good_zone(keys[0])
    del zone[f"_dmarc.{DOMAIN}"]
    zone["_dmarc.example.org"] = [("TXT", "v=DMARC1; p=reject; sp=quarantine")]
    with serve_dns(zone) as port:
        findings = doctor(write_config(tmp_path, port, keys[0]), port)
    assert "_dmarc.example.org: policy quarantine" in by_check(findings, "dmarc")[0].message
    assert passed(findings)


def test_dmarc_strict_not_aligned_suggests_relaxed(
    tmp_path: Path, keys: tuple[bytes, bytes]
) -> None:
    """Bounces and signature under subdomains of the From domain: only relaxed alignment holds."""
    zone = {
        f"bounce.{DOMAIN}": [("TXT", GOOD_SPF)],
        f"{SELECTOR}._domainkey.mail.{DOMAIN}": [("TXT", dkim_txt(keys[0]))],
        f"_dmarc.{DOMAIN}": [("TXT", "v=DMARC1; p=quarantine; adkim=s; aspf=s")],
    }
    config_args = {"bounce_address": f"b@bounce.{DOMAIN}", "dkim_domain": f"mail.{DOMAIN}"}
    with serve_dns(zone) as port:
        findings = doctor(write_config(tmp_path, port, keys[0], **config_args), port)
    (alignment,) = by_check(findings, "dmarc-alignment")
    assert not alignment.ok
    assert "not aligned (strict)" in alignment.message
    assert alignment.record_to_publish == (
        f'_dmarc.{DOMAIN}. IN TXT "v=DMARC1; p=quarantine; adkim=r; aspf=r"'
    )
    assert all(f.ok for f in findings if f.check != "dmarc-alignment")
    assert not passed(findings)


def test_dmarc_not_aligned_with_another_domain(tmp_path: Path, keys: tuple[bytes, bytes]) -> None:
    """SPF and DKIM pass, but for a mailer's domain: DMARC fails; the fix is in the config."""
    zone = good_zone(keys[0])
    zone["mailer.example.net"] = [("TXT", GOOD_SPF)]
    zone[f"{SELECTOR}._domainkey.mailer.example.net"] = [("TXT", dkim_txt(keys[0]))]
    config_args = {"bounce_address": "b@mailer.example.net", "dkim_domain": "mailer.example.net"}
    with serve_dns(zone) as port:
        findings = doctor(write_config(tmp_path, port, keys[0], **config_args), port)
    (alignment,) = by_check(findings, "dmarc-alignment")
    assert not alignment.ok and alignment.record_to_publish == ""
    assert f"sign with d={DOMAIN}" in alignment.message
    assert all(f.ok for f in findings if f.check != "dmarc-alignment")


def test_discreet_identity_is_checked_too(tmp_path: Path, keys: tuple[bytes, bytes]) -> None:
    zone = good_zone(keys[0])
    extra = "[discreet]\nbase_url = 'https://notes.example.net'\n"
    with serve_dns(zone) as port:
        findings = doctor(write_config(tmp_path, port, keys[0], extra=extra), port)
    discreet = [f for f in findings if f.identity == "discreet"]
    assert {f.check for f in discreet} >= {"spf", "dkim", "dmarc"}
    assert all(f.ok for f in findings if f.identity == "main")
    assert not by_check(discreet, "dkim")[0].ok  # no discreet key configured
    assert "notes.example.net: no SPF record" in by_check(discreet, "spf")[0].message


def test_silent_dns_server_gives_one_line_in_bounded_time(
    tmp_path: Path, keys: tuple[bytes, bytes]
) -> None:
    with silent_dns() as port:
        config = write_config(tmp_path, port, keys[0])
        started = time.monotonic()
        findings = doctor(config, port)
        elapsed = time.monotonic() - started
        assert elapsed < 6  # one 2 s timeout: the server is not asked again
        result = run(["--config", str(config), "doctor"], tmp_path, ok=False, timeout=30)
    assert not passed(findings) and findings
    assert f"no answer from 127.0.0.1:{port} within 2s" in findings[0].message
    assert result.returncode == 1
    assert "Traceback" not in result.stderr + result.stdout
    assert f"no answer from 127.0.0.1:{port} within 2s" in result.stdout


# --- the command ----------------------------------------------------------------------------


def test_cli_exit_codes_json_and_the_verdict_event(
    tmp_path: Path, keys: tuple[bytes, bytes]
) -> None:
    env = {"NEWSLETTER_SECRET": SECRET}
    zone = good_zone(keys[0])
    with serve_dns(zone) as port:
        config = write_config(tmp_path, port, keys[0])
        run(["--config", str(config), "init"], tmp_path, env)
        good = run(["--config", str(config), "doctor"], tmp_path, env)
        del zone[f"_dmarc.{DOMAIN}"]
        bad = run(["--config", str(config), "doctor", "--json"], tmp_path, env, ok=False)
    assert good.returncode == 0 and "passes" in good.stdout
    assert bad.returncode == 1
    findings = json.loads(bad.stdout)
    assert set(findings[0]) == {"identity", "check", "ok", "message", "record_to_publish"}
    failed = [f for f in findings if not f["ok"]]
    assert [f["check"] for f in failed] == ["dmarc"]
    assert failed[0]["record_to_publish"].startswith(f'_dmarc.{DOMAIN}. IN TXT "v=DMARC1; p=none')
    settings = load_settings(config, env)
    from newsletter.db import make_engine, make_sessionmaker

    engine = make_engine(settings.database.url)
    with make_sessionmaker(engine)() as session:
        verdicts = session.scalars(
            select(Event).where(Event.action == "doctor.checked").order_by(Event.id)
        ).all()
        assert [e.detail["passed"] for e in verdicts] == [True, False]
    engine.dispose()


def test_cli_help() -> None:
    result = run(["doctor", "--help"], Path.cwd())
    assert "--live" in result.stdout and "--json" in result.stdout


# --- pure functions -------------------------------------------------------------------------


def test_alignment_and_organizational_domain() -> None:
    assert organizational_domain("mail.example.co.uk") == "example.co.uk"
    assert aligned("portal.example.org", "bounce.portal.example.org", "r")
    assert not aligned("portal.example.org", "bounce.portal.example.org", "s")
    assert not aligned("example.co.uk", "other.co.uk", "r")


def test_spf_parse_and_suggest() -> None:
    terms = parse_spf("v=spf1 a/24 mx:m.example//64 -ip4:10.0.0.0/8 redirect=x.example")
    assert [t.text() for t in terms] == [
        "a/24",
        "mx:m.example//64",
        "-ip4:10.0.0.0/8",
        "redirect=x.example",
    ]
    assert [term_cost(t) for t in terms] == [1, 1, 0, 1]
    record, dropped = suggest_spf(["v=spf1 include:a include:b ?all"], [RELAY], lambda t: 6)
    assert record == f"v=spf1 ip4:{RELAY} include:a -all"
    assert dropped == ["include:b"]


def test_count_lookups_stops_on_an_include_loop() -> None:
    class Loop:
        def txt(self, name: str) -> list[str]:
            return [f"v=spf1 include:{name} -all"]

        def addresses(self, name: str, version: int) -> list[str]:
            return []

        def mx(self, name: str) -> list[str]:
            return []

    assert count_lookups("loop.example", Loop()) > 10


# --- --live against a running `newsletter web` ----------------------------------------------


@pytest.fixture
def lists_ready(factory: sessionmaker[Session]) -> sessionmaker[Session]:
    with unit_of_work(factory) as session:
        sync_lists(session=session, specs=read_lists(ROOT / "subscribers" / "lists.toml"))
    return factory


def test_live_one_click_unsubscribes_and_leaves_a_tombstone(
    tmp_path: Path,
    keys: tuple[bytes, bytes],
    lists_ready: sessionmaker[Session],
    database_url: str,
    clock: FrozenClock,
) -> None:
    env = {"NEWSLETTER_SECRET": SECRET, "NEWSLETTER_DATABASE_URL": database_url}
    base = load_settings(None, env)
    with unit_of_work(lists_ready) as session:
        before = session.scalars(select(Subscriber.id)).all()
        first_list = session.scalars(select(MailingList.id).order_by(MailingList.id)).first()
    with serve_pages(base, lists_ready, clock) as (url, _), serve_dns(good_zone(keys[0])) as port:
        config = write_config(tmp_path, port, keys[0], extra=f"[web]\nbase_url = '{url}'\n")
        args = ["--config", str(config), "doctor", "--live", "--json"]
        result = run(args, tmp_path, env, ok=False)
    findings = json.loads(result.stdout)
    (one_click,) = [f for f in findings if f["check"] == "one-click"]
    assert one_click["ok"], one_click  # the mechanics work
    assert "unsubscribed in one request" in one_click["message"]
    # ... but an http URL on loopback is no RFC 8058 link: the doctor does not pass.
    (https,) = [f for f in findings if f["check"] == "one-click-https"]
    assert not https["ok"] and "is not https" in https["message"]
    assert result.returncode == 1
    with unit_of_work(lists_ready) as session:
        (tombstone,) = session.scalars(select(Subscriber).where(Subscriber.id.not_in(before))).all()
        # No personal data left; the row stays, so its id is never given to a real reader.
        assert tombstone.status == SubscriberStatus.FORGOTTEN
        assert tombstone.email == f"{tombstone.id}@forgotten.invalid"
        assert session.scalar(select(Subscriber).where(Subscriber.email.like("doctor-%"))) is None
        assert not session.scalars(
            select(Subscription).where(Subscription.subscriber_id == tombstone.id)
        ).all()
        actions = session.scalars(select(Event.action).order_by(Event.id)).all()
        assert "subscriber.unsubscribed" in actions  # through the web, by the one POST
        assert actions[-1] == "doctor.checked"
    assert first_list is not None


def test_live_one_click_fails_when_the_site_is_down(
    tmp_path: Path, keys: tuple[bytes, bytes], lists_ready: sessionmaker[Session], database_url: str
) -> None:
    env = {"NEWSLETTER_SECRET": SECRET, "NEWSLETTER_DATABASE_URL": database_url}
    from newsletter.devsmtp import free_port

    with serve_dns(good_zone(keys[0])) as port:
        extra = f"[web]\nbase_url = 'http://127.0.0.1:{free_port()}'\n"
        config = write_config(tmp_path, port, keys[0], extra=extra)
        result = run(["--config", str(config), "doctor", "--live"], tmp_path, env, ok=False)
    assert result.returncode == 1
    assert "FAIL main one-click: POST http://127.0.0.1" in result.stdout
    with unit_of_work(lists_ready) as session:
        assert session.scalar(select(Subscriber).where(Subscriber.email.like("doctor-%"))) is None


# --- review fixes ---------------------------------------------------------------------------


def test_malformed_domain_in_the_spf_chain_is_a_permerror_not_a_crash(
    tmp_path: Path, keys: tuple[bytes, bytes]
) -> None:
    """A vendor's include with an empty label; the CLI still writes JSON and the verdict."""
    env = {"NEWSLETTER_SECRET": SECRET}
    zone = good_zone(keys[0])
    zone[DOMAIN] = [("TXT", f"v=spf1 include:spf.vendor.example.net ip4:{RELAY} -all")]
    zone["spf.vendor.example.net"] = [("TXT", "v=spf1 include:_spf.vendor..example -all")]
    with serve_dns(zone) as port:
        resolver = AuthoritativeDns(timeout=2, servers=(("127.0.0.1", port),))
        with pytest.raises(DnsError, match="not a domain name"):
            resolver.txt("_spf.vendor..example")
        with pytest.raises(DnsError, match="not a domain name"):
            resolver.txt("a" * 70 + ".example.org")
        config = write_config(tmp_path, port, keys[0])
        run(["--config", str(config), "init"], tmp_path, env)
        result = run(["--config", str(config), "doctor", "--json"], tmp_path, env, ok=False)
    assert result.returncode == 1, result.stderr
    findings = json.loads(result.stdout)
    (spf_pass,) = [f for f in findings if f["check"] == "spf-pass"]
    assert not spf_pass["ok"] and "permerror" in spf_pass["message"]
    settings = load_settings(config, env)
    from newsletter.db import make_engine, make_sessionmaker

    engine = make_engine(settings.database.url)
    with make_sessionmaker(engine)() as session:
        verdict = session.scalar(select(Event).where(Event.action == "doctor.checked"))
        assert verdict is not None and verdict.detail["passed"] is False
    engine.dispose()


def test_an_unexpected_error_in_one_identity_is_one_failed_finding(
    tmp_path: Path, keys: tuple[bytes, bytes]
) -> None:
    class Broken:
        def txt(self, name: str) -> list[str]:
            raise RuntimeError("boom")

        def addresses(self, name: str, version: int) -> list[str]:
            return []

        def mx(self, name: str) -> list[str]:
            return []

    settings = load_settings(write_config(tmp_path, 53, keys[0]), {"NEWSLETTER_SECRET": SECRET})
    findings = check_dns(settings, Broken(), NOW)
    assert [(f.check, f.ok) for f in findings] == [("checks", False)]
    assert "RuntimeError: boom" in findings[0].message


@pytest.mark.parametrize(
    "record",
    [
        f"v=spf1 ip4:{RELAY} ip4:999.1.1.1 -all",
        f"v=spf1 ip4:{RELAY} ip4:2001:db8::1 -all",
        f"v=spf1 ip4:{RELAY} ip4:192.0.2.0/33 -all",
        f"v=spf1 ip4:{RELAY} ip6:192.0.2.1 -all",
        f"v=spf1 ip4:{RELAY} a/33 -all",
        f"v=spf1 ip4:{RELAY} exists:%{{x}}.example.org -all",
        f"v=spf1 ip4:{RELAY} exists:100%.example.org -all",
        f"v=spf1 ip4:{RELAY} redirect=a.example redirect=b.example",
        f"v=spf1 ip4:{RELAY} bogus:x.example -all",
    ],
)
def test_spf_syntax_errors_after_the_match_are_a_permerror(
    tmp_path: Path, keys: tuple[bytes, bytes], record: str
) -> None:
    zone = good_zone(keys[0])
    zone[DOMAIN] = [("TXT", record)]
    with serve_dns(zone) as port:
        findings = doctor(write_config(tmp_path, port, keys[0]), port)
    (spf_pass,) = by_check(findings, "spf-pass")
    assert not spf_pass.ok and "permerror" in spf_pass.message
    assert not passed(findings)


def test_spf_parse_accepts_valid_macros_and_cidrs() -> None:
    record = (
        "v=spf1 ip4:192.0.2.0/24 ip6:2001:db8::/32 a:mail.example.org/24//64 mx//64 "
        "exists:%{ir}.%{l1r-}._spf.%{d} include:%{d2}.spf.example.org ptr "
        "exp=explain.%{d} -all"
    )
    assert len(parse_spf(record)) == 9
    with pytest.raises(SpfPermError):
        parse_spf("v=spf1 exists:%{d}% -all")


def test_a_macro_include_counts_one_lookup_unexpanded() -> None:
    asked: list[str] = []

    class Dns:
        def txt(self, name: str) -> list[str]:
            asked.append(name)
            return [f"v=spf1 ip4:{RELAY} include:%{{d}}.spf.example.org -all"]

        def addresses(self, name: str, version: int) -> list[str]:
            return []

        def mx(self, name: str) -> list[str]:
            return []

    assert count_lookups("example.org", Dns()) == 1
    assert asked == ["example.org"]


@pytest.mark.parametrize(
    ("record", "policy"),
    [
        ("v=DMARC1; p=Reject", "policy reject"),
        ("v=DMARC1; rua=mailto:d@portal.example.org", "policy none (no p= tag"),
    ],
)
def test_dmarc_policy_case_and_missing_p_with_rua(
    tmp_path: Path, keys: tuple[bytes, bytes], record: str, policy: str
) -> None:
    zone = good_zone(keys[0])
    zone[f"_dmarc.{DOMAIN}"] = [("TXT", record)]
    with serve_dns(zone) as port:
        findings = doctor(write_config(tmp_path, port, keys[0]), port)
    (dmarc,) = by_check(findings, "dmarc")
    assert dmarc.ok and policy in dmarc.message
    assert passed(findings)


def test_recursion_desired_only_of_configured_nameservers(keys: tuple[bytes, bytes]) -> None:
    log: list[tuple[str, bool]] = []
    with serve_dns(good_zone(keys[0]), log=log) as port:
        configured = AuthoritativeDns(timeout=2, servers=(("127.0.0.1", port),))
        assert configured.txt(DOMAIN)
        assert log == [(DOMAIN, True)]
        log.clear()
        walking = AuthoritativeDns(timeout=2)  # as if the NS walk had found this server
        walking._zones[f"{DOMAIN}."] = (("127.0.0.1", port),)
        assert walking.txt(DOMAIN)
        assert log == [(DOMAIN, False)]


@pytest.mark.parametrize(
    ("base_url", "ok"),
    [
        ("https://news.example", False),  # a reserved name (RFC 2606)
        ("https://portal.campaign.net", True),
        ("http://portal.campaign.net", False),
        ("https://127.0.0.1:8000", False),
        ("https://10.1.2.3", False),
        ("https://localhost", False),
        ("https://8.8.8.8", True),
    ],
)
def test_live_needs_a_public_https_base_url(
    tmp_path: Path, keys: tuple[bytes, bytes], base_url: str, ok: bool
) -> None:
    config = write_config(tmp_path, 53, keys[0], extra=f"[web]\nbase_url = '{base_url}'\n")
    finding = check_public_https(load_settings(config, {"NEWSLETTER_SECRET": SECRET}))
    assert finding.check == "one-click-https" and finding.ok is ok, finding


# --- records receivers refuse, a web server that trickles, a killed run ----------------------


@pytest.mark.parametrize(
    ("record", "check", "words"),
    [
        (f"v=spf1 ip4:{RELAY}\u00a0-all", "spf-lookups", "a non-breaking space (U+00A0) in"),
        (f"v=spf1 ip4:{RELAY}\t-all", "spf-lookups", "a tab (U+0009) in"),
        (f"v=spf1 ip4:{RELAY}\t-all", "spf-pass", "permerror (a tab (U+0009)"),
        (f"v=spf1 ip4:{RELAY}\u00a0-all", "spf", "one SPF record, a permerror: a non-breaking"),
    ],
)
def test_spf_terms_apart_by_anything_but_spaces_are_a_permerror(
    tmp_path: Path, keys: tuple[bytes, bytes], record: str, check: str, words: str
) -> None:
    """RFC 7208 §4.6.1 separates terms by SP only: a receiver reads ip4:…\\u00a0-all as one
    term, a bad address."""
    zone = good_zone(keys[0])
    zone[DOMAIN] = [("TXT", record)]
    with serve_dns(zone) as port:
        findings = doctor(write_config(tmp_path, port, keys[0]), port)
    (finding,) = by_check(findings, check)
    assert not finding.ok and words in finding.message, finding
    assert "separated by plain spaces only" in finding.message
    assert by_check(findings, "spf-pass")[0].record_to_publish.endswith(f'ip4:{RELAY} -all"')
    assert not passed(findings)


def test_spf_mx_with_more_than_ten_hosts_is_a_permerror(
    tmp_path: Path, keys: tuple[bytes, bytes]
) -> None:
    """RFC 7208 §4.6.4: more than 10 MX hosts for one mx is a permerror, even for the relay
    that is the first of them."""
    zone = good_zone(keys[0])
    zone[DOMAIN] = [("TXT", "v=spf1 mx -all")]
    zone[DOMAIN] += [("MX", f"{i} mx{i}.{DOMAIN}") for i in range(11)]
    for i in range(11):
        zone[f"mx{i}.{DOMAIN}"] = [("A", RELAY if i == 0 else f"203.0.113.{i + 1}")]
    with serve_dns(zone) as port:
        findings = doctor(write_config(tmp_path, port, keys[0]), port)
    (spf_pass,) = by_check(findings, "spf-pass")
    assert not spf_pass.ok and "permerror" in spf_pass.message
    assert f"mx:{DOMAIN} has 11 MX hosts" in spf_pass.message
    zone[DOMAIN] = [r for r in zone[DOMAIN] if r[1] != f"10 mx10.{DOMAIN}"]  # ten are allowed
    with serve_dns(zone) as port:
        assert passed(doctor(write_config(tmp_path, port, keys[0]), port))


@pytest.mark.parametrize(
    ("record", "words"),
    [
        ("v=DMARC10; p=none", "its first tag must be v=DMARC1, exactly so"),
        ("v=DMARC1.0; p=none", "its first tag must be v=DMARC1, exactly so"),
        ("v=dmarc1; p=none", "its first tag must be v=DMARC1, exactly so"),
        ("p=none; v=DMARC1", "its first tag must be v=DMARC1, exactly so"),
        ("v=DMARC1;\u00a0p=none", "a non-breaking space (U+00A0)"),
        ("v=DMARC1; p=n o n e", "no valid policy (p=n o n e)"),
    ],
)
def test_dmarc_records_receivers_ignore_fail_and_say_why(
    tmp_path: Path, keys: tuple[bytes, bytes], record: str, words: str
) -> None:
    zone = good_zone(keys[0])
    zone[f"_dmarc.{DOMAIN}"] = [("TXT", record)]
    with serve_dns(zone) as port:
        findings = doctor(write_config(tmp_path, port, keys[0]), port)
    (dmarc,) = by_check(findings, "dmarc")
    assert not dmarc.ok and words in dmarc.message, dmarc
    assert dmarc.record_to_publish.startswith(f'_dmarc.{DOMAIN}. IN TXT "v=DMARC1; p=none;')
    assert not passed(findings)


@pytest.mark.parametrize(
    "record", ["v=DMARC1;p=none", "v = DMARC1 ;\tp = none", "V=DMARC1; P=None; rua=mailto:a@b.c"]
)
def test_dmarc_spaces_and_tabs_around_tags_are_fine(
    tmp_path: Path, keys: tuple[bytes, bytes], record: str
) -> None:
    zone = good_zone(keys[0])
    zone[f"_dmarc.{DOMAIN}"] = [("TXT", record)]
    with serve_dns(zone) as port:
        findings = doctor(write_config(tmp_path, port, keys[0]), port)
    assert passed(findings), findings


@contextmanager
def trickling_web() -> Iterator[str]:
    """A web server that answers a status line, then one byte every half second, for ever."""
    stop = threading.Event()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)

    def trickle(conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            try:
                conn.sendall(b"HTTP/1.1 200 OK\r\n")
                while not stop.wait(0.5):
                    conn.sendall(b"X")
            except OSError:
                pass  # the doctor hung up

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=trickle, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


def throwaways(factory: sessionmaker[Session]) -> list[str]:
    """The addresses of subscribers the doctor made and has not forgotten."""
    with unit_of_work(factory) as session:
        found = select(Subscriber.email).where(Subscriber.email.like("doctor-%@doctor.example"))
        return list(session.scalars(found))


def test_live_one_click_gives_up_on_a_trickling_answer(
    tmp_path: Path, keys: tuple[bytes, bytes], lists_ready: sessionmaker[Session], database_url: str
) -> None:
    """A byte every half second never trips a 2 s read timeout; the whole answer has 2 s."""
    env = {"NEWSLETTER_SECRET": SECRET, "NEWSLETTER_DATABASE_URL": database_url}
    with trickling_web() as url, serve_dns(good_zone(keys[0])) as port:
        config = write_config(tmp_path, port, keys[0], extra=f"[web]\nbase_url = '{url}'\n")
        started = time.monotonic()
        result = run(
            ["--config", str(config), "doctor", "--live"], tmp_path, env, ok=False, timeout=40
        )
    assert time.monotonic() - started < 20
    assert result.returncode == 1, result.stderr
    assert f"FAIL main one-click: POST {url}: no complete answer within 2 s" in result.stdout
    assert throwaways(lists_ready) == []


def test_live_check_killed_by_sigterm_forgets_its_throwaway(
    tmp_path: Path, keys: tuple[bytes, bytes], lists_ready: sessionmaker[Session], database_url: str
) -> None:
    """SIGTERM in the middle of the POST (cron, a monitor's timeout): the throwaway subscriber
    is forgotten on the way out, not left on the first list for the next campaign."""
    env = {"NEWSLETTER_SECRET": SECRET, "NEWSLETTER_DATABASE_URL": database_url}
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    with trickling_web() as url, serve_dns(good_zone(keys[0])) as port:
        config = write_config(tmp_path, port, keys[0], extra=f"[web]\nbase_url = '{url}'\n")
        config.write_text(
            config.read_text().replace("timeout_seconds = 2.0", "timeout_seconds = 60")
        )
        doctor_run = subprocess.Popen(
            [sys.executable, "-m", "newsletter", "--config", str(config), "doctor", "--live"],
            cwd=tmp_path,
            env=full_env | env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 30
            while not throwaways(lists_ready) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert throwaways(lists_ready), "the live check never subscribed its throwaway"
            time.sleep(0.5)  # well into the POST
            doctor_run.send_signal(signal.SIGTERM)
            out, err = doctor_run.communicate(timeout=20)
        finally:
            if doctor_run.poll() is None:
                doctor_run.kill()
                doctor_run.wait()
    assert doctor_run.returncode == 128 + signal.SIGTERM, err
    assert "terminated (SIGTERM) during the live check" in out + err
    assert throwaways(lists_ready) == []


def test_live_check_forgets_throwaways_an_earlier_run_left(
    tmp_path: Path,
    keys: tuple[bytes, bytes],
    lists_ready: sessionmaker[Session],
    database_url: str,
    clock: FrozenClock,
) -> None:
    """A throwaway a killed run left is forgotten by the next run; addresses that only look
    like one (a real reader's) are not touched."""
    left = "doctor-0123456789abcdef@doctor.example"
    lookalikes = [
        "doctor-0123456789abcdef@doctor.example.org",
        "doctor-0123456789abcdeg@doctor.example",
        "doctor-0123456789abcde@doctor.example",
        "xdoctor-0123456789abcdef@doctor.example",
        "doctor-0123456789ABCDEF@doctor.example.net",
    ]
    with unit_of_work(lists_ready) as session:
        first = session.scalars(select(MailingList).order_by(MailingList.id)).first()
        assert first is not None
        for email in [left, *lookalikes]:
            subscribe(
                session=session,
                email=email,
                lists=[first],
                secret=SECRET,
                now=clock.now(),
                actor="doctor" if email == left else "web",
                confirmed=True,
            )
    env = {"NEWSLETTER_SECRET": SECRET, "NEWSLETTER_DATABASE_URL": database_url}
    base = load_settings(None, env)
    with serve_pages(base, lists_ready, clock) as (url, _), serve_dns(good_zone(keys[0])) as port:
        config = write_config(tmp_path, port, keys[0], extra=f"[web]\nbase_url = '{url}'\n")
        result = run(
            ["--config", str(config), "doctor", "--live", "--json"], tmp_path, env, ok=False
        )
    (one_click,) = [f for f in json.loads(result.stdout) if f["check"] == "one-click"]
    assert one_click["ok"], one_click
    assert "forgot 1 throwaway subscriber(s) an earlier run left" in one_click["message"]
    with unit_of_work(lists_ready) as session:
        emails = session.scalars(
            select(Subscriber.email).where(Subscriber.status == SubscriberStatus.ACTIVE)
        ).all()
        assert left not in emails
        assert sorted(e.lower() for e in lookalikes) == sorted(
            e.lower() for e in emails if "doctor" in e
        )
