"""`newsletter doctor`: what the big mailbox providers check, asked of the sending domains' DNS.

For each sending identity (the portal's, and the discreet one when configured) one finding per
check, each with the exact record to publish when something is wrong:

- SPF of the envelope (bounce) domain: one record, within the 10-lookup limit, passing for every
  relay address given in [smtp] ips and each relay's ips.
- DKIM: the selector the service signs with is published, its key is the configured key's, and
  a message signed now with the service's own signer verifies against it (dkimpy).
- DMARC of the From domain: a record, its policy, and alignment through SPF or DKIM.
- With --live: the one-click unsubscribe (RFC 8058) of a throwaway subscriber, over HTTP
  (`one-click`, the mechanics; the whole POST within [doctor] timeout_seconds), and whether
  [web] base_url is a public https URL as RFC 8058 requires (`one-click-https`). The throwaway
  subscriber is forgotten afterwards, and any an earlier, killed run left is forgotten first.

The checks are functions of what DNS answers (an `AuthoritativeDns`, or any object with its
methods); DNS failures become failed findings of one line, never an exception.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from email.utils import format_datetime, make_msgid
from typing import Any
from urllib.parse import urlsplit

import dkim as dkimpy
import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from publicsuffixlist import PublicSuffixList
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from newsletter.audit import record_event
from newsletter.config import Settings
from newsletter.db.models import MailingList, Subscriber, Subscription, SubscriptionStatus
from newsletter.dkim import DkimSigner, load_discreet_signer, load_signer
from newsletter.dns_records import DnsError
from newsletter.message import ListInfo, Recipient, link_urls, plain_identity
from newsletter.spf import (
    LOOKUP_LIMIT,
    Lookup,
    SpfPermError,
    Term,
    count_lookups,
    describe_char,
    evaluate,
    parse_spf,
    spf_records,
    suggest_spf,
    term_cost,
)
from newsletter.subscriptions import forget, subscribe

DOCTOR_ACTION = "doctor.checked"
_PSL = PublicSuffixList()  # the bundled list: offline


@dataclass(frozen=True)
class Finding:
    """One line of the report: which identity and check, whether it passed, and the fix."""

    identity: str
    check: str
    ok: bool
    message: str
    record_to_publish: str = ""

    def as_json(self) -> dict[str, Any]:
        """The finding for --json."""
        return asdict(self)


@dataclass(frozen=True)
class SendingIdentity:
    """What one identity's mail says: From domain, envelope address, DKIM signer."""

    name: str
    from_domain: str
    envelope_address: str
    signer: DkimSigner | None

    @property
    def envelope_domain(self) -> str:
        """The domain SPF is checked for (the VERP bounce address's)."""
        return domain_of(self.envelope_address)


def domain_of(address: str) -> str:
    """The lower-case domain of an address."""
    return address.rpartition("@")[2].lower().rstrip(".")


def sending_identities(settings: Settings) -> list[SendingIdentity]:
    """The portal's identity, and the discreet one when [discreet] base_url is configured."""
    found = [
        SendingIdentity(
            "main",
            domain_of(settings.mail.from_address),
            settings.mail.bounce_address,
            load_signer(settings),
        )
    ]
    if settings.discreet.configured:
        d = settings.discreet
        found.append(
            SendingIdentity(
                "discreet",
                domain_of(d.from_address),
                d.bounce_address,
                load_discreet_signer(settings),
            )
        )
    return found


def relay_ips(settings: Settings) -> list[str]:
    """Every public address the relays send from ([smtp] ips and each relay's), once each."""
    return list(dict.fromkeys(ip for relay in settings.smtp.all_relays() for ip in relay.ips))


def txt_record(name: str, text: str) -> str:
    """A zone-file line publishing `text` at `name`, in strings of at most 255 characters."""
    chunks = [text[i : i + 255] for i in range(0, len(text), 255)] or [""]
    return f"{name}. IN TXT " + " ".join(f'"{c}"' for c in chunks)


def organizational_domain(domain: str) -> str:
    """The registrable domain (public suffix + one label): mail.example.co.uk → example.co.uk."""
    return str(_PSL.privatesuffix(domain.lower()) or domain.lower())


def aligned(from_domain: str, other: str, mode: str) -> bool:
    """DMARC identifier alignment: strict = the same domain; relaxed = the same org domain."""
    a, b = from_domain.lower().rstrip("."), other.lower().rstrip(".")
    if mode == "s":
        return a == b
    return organizational_domain(a) == organizational_domain(b)


# The white space a DKIM tag list may hold around and inside tags (FWS, RFC 6376 §3.2); DMARC
# allows only SP and HTAB around its tags (WSP, RFC 7489 §6.4). str.strip() and str.split()
# would also take away a non-breaking space, which a receiver keeps as part of the tag.
_FWS = " \t\r\n"
_NO_FWS = str.maketrans("", "", _FWS)
_WSP = " \t"


def parse_tags(record: str) -> dict[str, str]:
    """The tag=value pairs of a DKIM record (tag names lower-cased, values without FWS)."""
    tags: dict[str, str] = {}
    for part in record.split(";"):
        name, eq, value = part.partition("=")
        if eq:
            tags.setdefault(name.strip(_FWS).lower(), value.translate(_NO_FWS))
    return tags


def dmarc_tags(record: str) -> dict[str, str]:
    """The tag=value pairs of a DMARC record (tag names lower-cased, SP and HTAB around each
    name and value taken off, nothing else)."""
    tags: dict[str, str] = {}
    for part in record.split(";"):
        name, eq, value = part.partition("=")
        if eq:
            tags.setdefault(name.strip(_WSP).lower(), value.strip(_WSP))
    return tags


def is_dmarc(txt: str) -> bool:
    """Whether a TXT record is a DMARC record: its first tag is v, exactly "DMARC1" (RFC 7489
    §6.3: the value must match precisely, and v must come first)."""
    name, eq, value = txt.partition(";")[0].partition("=")
    return bool(eq) and name.strip(_WSP).lower() == "v" and value.strip(_WSP) == "DMARC1"


# --- SPF -------------------------------------------------------------------------------------


def check_spf(identity: SendingIdentity, ips: Sequence[str], dns: Lookup) -> list[Finding]:
    """The SPF findings of an identity's envelope domain: one record, lookups, pass per relay."""
    domain = identity.envelope_domain
    name = identity.name

    def finding(check: str, ok: bool, message: str, record: str = "") -> Finding:
        return Finding(name, check, ok, message, record)

    try:
        records = spf_records(dns.txt(domain))
    except DnsError as e:
        return [finding("spf", False, str(e))]

    def cost(term: Term) -> int:
        nested = 0
        if term.name in ("include", "redirect") and "%" not in term.value:
            try:
                nested = count_lookups(term.value, dns)
            except (SpfPermError, DnsError):
                nested = 0
        return term_cost(term) + nested

    failing: list[str] = []
    results: dict[str, str] = {}
    for ip in ips:
        try:
            result, why = evaluate(ip, domain, identity.envelope_address, dns)
            results[ip] = f"{result} ({why})" if why else result
        except DnsError as e:
            results[ip] = f"temperror ({e})"
        if results[ip] != "pass":
            failing.append(ip)
    suggestion, dropped = suggest_spf(records, failing, cost)
    fix = txt_record(domain, suggestion)
    if not ips:
        fix_ips = "set [smtp] ips (and each of [smtp] relays' ips) to the relays' public addresses"
    findings: list[Finding] = []
    if not records:
        extra = "" if ips else f"; {fix_ips}, then publish one"
        return [finding("spf", False, f"{domain}: no SPF record{extra}", fix if ips else "")]
    if len(records) > 1:
        findings.append(
            finding("spf", False, f"{domain}: {len(records)} SPF records (permerror): merge", fix)
        )
        return findings
    try:
        parse_spf(records[0])
    except SpfPermError as e:  # a receiver's permerror: the record is there but does not count
        findings.append(finding("spf", False, f"{domain}: one SPF record, a permerror: {e}", fix))
    else:
        findings.append(finding("spf", True, f"{domain}: one SPF record: {records[0]}"))
    try:
        lookups = count_lookups(domain, dns)
    except (SpfPermError, DnsError) as e:
        findings.append(finding("spf-lookups", False, f"{domain}: {e}", fix))
    else:
        over = lookups > LOOKUP_LIMIT
        message = f"{domain}: {lookups} DNS lookups of at most {LOOKUP_LIMIT}"
        if over:
            message += " (permerror): replace includes by their addresses" + (
                f"; left out: {' '.join(dropped)}" if dropped else ""
            )
        findings.append(finding("spf-lookups", not over, message, fix if over else ""))
    if not ips:
        findings.append(finding("spf-pass", False, f"{domain}: cannot tell: {fix_ips}"))
    for ip in ips:
        ok = results[ip] == "pass"
        message = f"{domain}: mail from {ip} gets SPF {results[ip]}"
        findings.append(finding("spf-pass", ok, message, "" if ok else fix))
    return findings


# --- DKIM ------------------------------------------------------------------------------------


def public_key_b64(private_pem: bytes) -> str:
    """The base64 SubjectPublicKeyInfo (the p= of a DKIM record) of a PEM RSA private key."""
    key = serialization.load_pem_private_key(private_pem, password=None)
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode("ascii")


def same_public_key(published_b64: str, private_pem: bytes) -> bool:
    """Whether a published p= (SubjectPublicKeyInfo or bare RSAPublicKey) is the key's."""
    try:
        published = dkimpy.crypto.parse_public_key(base64.b64decode(published_b64, validate=True))
    except (ValueError, dkimpy.crypto.UnparsableKeyError, IndexError):
        return False
    key = serialization.load_pem_private_key(private_pem, password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        return False
    numbers = key.public_key().public_numbers()
    return bool(published["modulus"] == numbers.n and published["publicExponent"] == numbers.e)


def dkim_name(signer: DkimSigner) -> str:
    """Where a signer's public key is published: <selector>._domainkey.<domain>."""
    return f"{signer.selector.decode()}._domainkey.{signer.domain.decode()}"


def test_message(identity: SendingIdentity, now: datetime) -> bytes:
    """A small message as the service sends them, to sign and verify."""
    lines = [
        f"From: doctor <doctor@{identity.from_domain}>",
        f"To: doctor <doctor@{identity.from_domain}>",
        "Subject: newsletter doctor DKIM check",
        f"Date: {format_datetime(now)}",
        f"Message-ID: {make_msgid('doctor', identity.from_domain)}",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "",
        "This message is signed and verified by newsletter doctor; it is never sent.",
        "",
    ]
    return "\r\n".join(lines).encode()


def check_dkim(identity: SendingIdentity, dns: Lookup, now: datetime) -> list[Finding]:
    """The DKIM finding: the selector published, with the configured key, a signature verifies."""
    signer = identity.signer
    if signer is None:
        key = (
            "[discreet] dkim_selector and dkim_key_file"
            if identity.name == "discreet"
            else ("[dkim] selector and key_file")
        )
        message = f"mail is not DKIM-signed: set {key} (openssl genrsa -out dkim.pem 2048)"
        return [Finding(identity.name, "dkim", False, message)]
    name = dkim_name(signer)
    record = txt_record(name, f"v=DKIM1; k=rsa; p={public_key_b64(signer.private_key)}")

    def fail(message: str) -> list[Finding]:
        return [Finding(identity.name, "dkim", False, f"{name}: {message}", record)]

    try:
        published = [t for t in dns.txt(name) if "p" in parse_tags(t)]
    except DnsError as e:
        return [Finding(identity.name, "dkim", False, str(e))]
    if not published:
        return fail("no DKIM key published for the selector the service signs with")
    if len(published) > 1:
        return fail(f"{len(published)} DKIM records: keep one")
    tags = parse_tags(published[0])
    if not tags.get("p"):
        return fail("the key is revoked (empty p=)")
    if not same_public_key(tags["p"], signer.private_key):
        return fail("the published key is not the configured key's ([dkim] key_file)")
    hashes = tags.get("h", "")
    if hashes and "sha256" not in hashes.lower().split(":"):
        # RFC 6376 §3.6.1: a verifier refuses a signature whose hash h= does not list; dkimpy
        # ignores h=, so its verification below would pass what the providers fail.
        return fail(f"h={hashes[:40]} does not allow sha256, which the service signs with")
    signed = signer.sign(test_message(identity, now))

    def dnsfunc(qname: bytes, timeout: float = 5) -> bytes:
        return published[0].encode()

    try:
        verified = dkimpy.verify(signed, dnsfunc=dnsfunc)
    except dkimpy.DKIMException as e:
        return fail(f"a test signature does not verify: {e}")
    if not verified:
        return fail("a test signature does not verify against the published record")
    domain = signer.domain.decode()
    message = f"{name}: published, the configured key, a test signature verifies (d={domain})"
    return [Finding(identity.name, "dkim", True, message)]


# --- DMARC -----------------------------------------------------------------------------------


def dmarc_record(dns: Lookup, from_domain: str) -> tuple[str, str, list[str], list[str]]:
    """The DMARC record that governs `from_domain`: (where, policy tag, records found there,
    records receivers ignore on the way that look meant for DMARC).

    The From domain's own, else the organizational domain's (its sp=, RFC 7489 §6.6.3).
    """
    org = organizational_domain(from_domain)
    ignored: list[str] = []
    for domain in dict.fromkeys([from_domain, org]):
        txts = dns.txt(f"_dmarc.{domain}")
        found = [t for t in txts if is_dmarc(t)]
        if found:
            return domain, ("p" if domain == from_domain else "sp"), found, ignored
        ignored += [f"_dmarc.{domain}: {t!r}" for t in txts if "dmarc" in t.lower()]
    return from_domain, "p", [], ignored


def check_dmarc(
    identity: SendingIdentity, dns: Lookup, *, spf_ok: bool, dkim_ok: bool
) -> list[Finding]:
    """DMARC findings: the record and its policy, then alignment through SPF and/or DKIM."""
    name, from_domain = identity.name, identity.from_domain
    suggestion = txt_record(
        f"_dmarc.{from_domain}",
        f"v=DMARC1; p=none; rua=mailto:dmarc-reports@{organizational_domain(from_domain)}",
    )
    try:
        where, policy_tag, records, ignored = dmarc_record(dns, from_domain)
    except DnsError as e:
        return [Finding(name, "dmarc", False, str(e))]
    if not records and ignored:
        message = (
            f"{ignored[0]} is no DMARC record to receivers: its first tag must be v=DMARC1, "
            "exactly so (RFC 7489 §6.3)"
        )
        return [Finding(name, "dmarc", False, message, suggestion)]
    if not records:
        message = f"_dmarc.{from_domain}: no DMARC record (the big providers want p=none at least)"
        return [Finding(name, "dmarc", False, message, suggestion)]
    if len(records) > 1:
        message = f"_dmarc.{where}: {len(records)} DMARC records: receivers ignore them all"
        return [Finding(name, "dmarc", False, message, suggestion)]
    tags = dmarc_tags(records[0])
    policies = ("none", "quarantine", "reject")  # case-insensitive (RFC 7489 §6.4)
    policy = tags.get(policy_tag, "").lower()
    if policy not in policies:
        policy = tags.get("p", "").lower()
    note = ""
    if "p" not in tags and "rua" in tags:
        # RFC 7489 §6.6.3: no p= but a rua= is read as p=none.
        policy, note = "none", " (no p= tag: read as p=none, RFC 7489 §6.6.3; add p=none)"
    if policy not in policies:
        message = f"_dmarc.{where}: no valid policy (p={tags.get('p') or 'missing'})"
        return [Finding(name, "dmarc", False, message + _odd_tag(tags), suggestion)]
    message = f"_dmarc.{where}: policy {policy}{note}: {records[0]}"
    findings = [Finding(name, "dmarc", True, message)]
    aspf, adkim = tags.get("aspf", "r")[:1], tags.get("adkim", "r")[:1]
    envelope = identity.envelope_domain
    dkim_domain = identity.signer.domain.decode() if identity.signer else ""
    by_spf = spf_ok and aligned(from_domain, envelope, aspf)
    by_dkim = dkim_ok and bool(dkim_domain) and aligned(from_domain, dkim_domain, adkim)
    mode = {"s": "strict", "r": "relaxed"}
    parts = [
        f"SPF {envelope} {'aligned' if by_spf else 'not aligned'} ({mode.get(aspf, aspf)}"
        + ("" if spf_ok else ", SPF not passing")
        + ")",
        f"DKIM d={dkim_domain or '(none)'} {'aligned' if by_dkim else 'not aligned'} "
        f"({mode.get(adkim, adkim)}" + ("" if dkim_ok else ", DKIM not passing") + ")",
    ]
    message = f"From {from_domain}: " + "; ".join(parts)
    if by_spf or by_dkim:
        findings.append(Finding(name, "dmarc-alignment", True, message))
        return findings
    relaxed_helps = (spf_ok and aligned(from_domain, envelope, "r")) or (
        dkim_ok and bool(dkim_domain) and aligned(from_domain, dkim_domain, "r")
    )
    if relaxed_helps:
        items = _tag_items(records[0])
        text = "; ".join(f"{k}={'r' if k in ('aspf', 'adkim') else v}" for k, v in items)
        fix = txt_record(f"_dmarc.{where}", text)
        message += ": relaxed alignment would pass"
    else:
        fix = ""
        message += (
            f": sign with d={from_domain} ([dkim] domain) or send from a bounce address under "
            f"{organizational_domain(from_domain)}"
        )
    findings.append(Finding(name, "dmarc-alignment", False, message, fix))
    return findings


def _odd_tag(tags: dict[str, str]) -> str:
    """Why a tag name is no DMARC tag, when it holds something besides letters and digits
    (a non-breaking space after a ";"), else ""."""
    for tag in tags:
        odd = next((c for c in tag if not (c.isascii() and c.isalnum())), None)
        if odd is not None:
            return (
                f"; the tag {tag!r} holds {describe_char(odd)}, so receivers do not know it: "
                "only spaces or tabs may surround a tag"
            )
    return ""


def _tag_items(record: str) -> list[tuple[str, str]]:
    """The tags of a record in their order, as (name, value)."""
    items = []
    for part in record.split(";"):
        key, eq, value = part.partition("=")
        if eq:
            items.append((key.strip(), value.strip()))
    return items


# --- the whole check ------------------------------------------------------------------------


def check_dns(settings: Settings, dns: Lookup, now: datetime) -> list[Finding]:
    """Every DNS finding for every sending identity."""
    ips = relay_ips(settings)
    findings: list[Finding] = []
    for identity in sending_identities(settings):
        try:
            spf = check_spf(identity, ips, dns)
            dkim = check_dkim(identity, dns, now)
            spf_ok = bool(ips) and all(f.ok for f in spf)
            dkim_ok = all(f.ok for f in dkim)
            findings += spf + dkim + check_dmarc(identity, dns, spf_ok=spf_ok, dkim_ok=dkim_ok)
        except Exception as e:  # a backstop: one failed line, the report and verdict still out
            message = f"the checks stopped: {type(e).__name__}: {e}"
            findings.append(Finding(identity.name, "checks", False, message))
    return findings


def passed(findings: Sequence[Finding]) -> bool:
    """Whether everything the big providers require passed."""
    return all(f.ok for f in findings)


def record_verdict(session: Session, *, now: datetime, actor: str, ok: bool, failed: int) -> None:
    """Keep the verdict in the audit events (the status warnings read the latest)."""
    record_event(session, now=now, actor=actor, action=DOCTOR_ACTION, passed=ok, failed=failed)


# --- one-click unsubscribe, live ------------------------------------------------------------


# Every throwaway address is doctor-<16 hex digits>@doctor.example, a reserved domain (RFC 2606):
# no reader can have one. Linear: a fullmatch of literals around one bounded run of hex digits.
THROWAWAY_DOMAIN = "doctor.example"
_THROWAWAY = re.compile(r"doctor-[0-9a-f]{16}@doctor\.example")


def check_one_click(
    settings: Settings,
    factory: sessionmaker[Session],
    now: Callable[[], datetime],
    *,
    timeout: float,
) -> Finding:
    """Subscribe a throwaway address, POST its one-click link once, check it left; forget it.

    The whole POST, answer included, takes at most `timeout` seconds. Throwaway subscribers an
    earlier run left behind (killed before its cleanup) are forgotten first.
    """
    secret = settings.security.require_secret()
    swept = forget_throwaways(factory, secret=secret, now=now())
    note = f"; forgot {swept} throwaway subscriber(s) an earlier run left" if swept else ""
    address = f"doctor-{secrets.token_hex(8)}@{THROWAWAY_DOMAIN}"
    with factory() as session:
        mlist = session.scalar(select(MailingList).order_by(MailingList.id).limit(1))
        if mlist is None:
            return Finding("main", "one-click", False, "no list to subscribe a test reader to")
        result = subscribe(
            session=session,
            email=address,
            lists=[mlist],
            secret=secret,
            now=now(),
            actor="doctor",
            confirmed=True,
        )
        info = ListInfo(mlist.id, mlist.slug, mlist.list_id)
        session.commit()
    subscriber_id = result.subscriber_id
    try:
        urls = link_urls(
            recipient=Recipient(subscriber_id, address, ""),
            mlist=info,
            settings=settings,
            identity=plain_identity(settings),
        )
        url = urls["unsubscribe"]
        try:
            status_code = asyncio.run(post_one_click(url, timeout=timeout))
        except TimeoutError:
            message = f"POST {_origin(url)}: no complete answer within {timeout:g} s{note}"
            return Finding("main", "one-click", False, message)
        except httpx.HTTPError as e:
            message = f"POST {_origin(url)}: {type(e).__name__}: {e}{note}"
            return Finding("main", "one-click", False, message)
        with factory() as session:
            status = session.scalar(
                select(Subscription.status).where(
                    Subscription.subscriber_id == subscriber_id,
                    Subscription.list_id == info.id,
                )
            )
        left = status == SubscriptionStatus.UNSUBSCRIBED
        ok = left and 200 <= status_code < 300
        message = f"POST {_origin(url)}/unsubscribe/…: HTTP {status_code}, " + (
            "unsubscribed in one request" if left else "still subscribed"
        )
        return Finding("main", "one-click", ok, message + note)
    finally:
        remove_subscriber(factory, address, secret=secret, now=now())


async def post_one_click(url: str, *, timeout: float) -> int:
    """POST an RFC 8058 one-click unsubscribe; the answer's status code (its body is not read).

    TimeoutError past `timeout` seconds for the whole exchange: httpx's timeout bounds each read
    only, so a server sending a byte now and then would hold it forever. (A host name is looked
    up by the system resolver, within its own timeouts.)
    """
    async with (
        asyncio.timeout(timeout),
        httpx.AsyncClient(timeout=timeout, follow_redirects=False) as client,
        client.stream(
            "POST",
            url,
            content=b"List-Unsubscribe=One-Click",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        ) as response,
    ):
        return response.status_code


def forget_throwaways(factory: sessionmaker[Session], *, secret: str, now: datetime) -> int:
    """Forget the throwaway subscribers earlier runs left behind; how many there were.

    Only the addresses the doctor makes match. A run going on at the same moment loses its own
    and reports its one-click check failed, which is all.
    """
    with factory() as session:
        candidates = session.scalars(
            select(Subscriber.email).where(Subscriber.email.like(f"doctor-%@{THROWAWAY_DOMAIN}"))
        ).all()
    left = [email for email in candidates if _THROWAWAY.fullmatch(email)]
    for email in left:
        remove_subscriber(factory, email, secret=secret, now=now)
    return len(left)


def remove_subscriber(
    factory: sessionmaker[Session], address: str, *, secret: str, now: datetime
) -> None:
    """Forget the throwaway subscriber: no personal data left, the row kept as a tombstone.

    Not deleted: its id is in the unsubscribe URL the doctor used (and maybe logged), and a
    deleted id could be given to the next real subscriber (SQLite reuses the highest id).
    """
    with factory() as session:
        forget(session=session, email=address, secret=secret, now=now, actor="doctor")
        session.commit()


def check_public_https(settings: Settings) -> Finding:
    """Whether [web] base_url is an https URL the mailbox providers can reach (RFC 8058)."""
    url = settings.web.base_url
    parts = urlsplit(url)
    host = (parts.hostname or "").lower().rstrip(".")
    problem = ""
    if parts.scheme != "https":
        problem = "is not https (RFC 8058 needs an https URI)"
    elif not _public_host(host):
        problem = f"names {host or 'no host'}, which the mailbox providers cannot reach"
    if problem:
        message = f"[web] base_url {_origin(url)} {problem}: set it to the public https address"
        return Finding("main", "one-click-https", False, message)
    return Finding("main", "one-click-https", True, f"{_origin(url)}: https, a public host")


def _public_host(host: str) -> bool:
    """Whether a host may be reachable from the Internet: a global address, or a dotted name
    outside the loopback and reserved names (not resolved: only what the name says)."""
    try:
        return ipaddress.ip_address(host).is_global
    except ValueError:
        pass
    reserved = ("localhost", "local", "internal", "lan", "home.arpa", "test", "example", "invalid")
    return "." in host and not any(host == r or host.endswith("." + r) for r in reserved)


def _origin(url: str) -> str:
    """The scheme and host of a URL, without the token (a secret of sorts)."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.partition('/')[0]}"
