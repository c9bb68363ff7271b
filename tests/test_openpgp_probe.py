"""What is kept of a reader's key, and what a hostile key may cost: keys made by gpg and
Sequoia, messages read back by gpg.

Only what names the reader is kept (the primary key, their user ID, the encryption subkeys
usable now, with the key's own signatures), armored without Sequoia's Comment lines; a key is
judged again only for its own signatures dated later; counted limits refuse hostile keys early.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pysequoia
import pytest
from pysequoia.packet import PacketPile, Tag

from newsletter.openpgp import (
    MAX_SELF_SIGNATURES,
    MAX_SUBKEYS,
    MAX_USER_IDS,
    RECHECK_HORIZON,
    KeyProblem,
    encrypt_message,
    kept_form,
    key_problem,
    read_key,
)
from tests.gpg_keys import GpgHome, gpg_time

CAROL = "carol@example.org"
OTHER_UID = "Karalina Real-Surname (Minsk office) <k.surname@employer.example.by>"
MESSAGE = b"From: news@portal.example.org\r\nTo: carol@example.org\r\nSubject: Hi\r\n\r\nHello\r\n"


@pytest.fixture
def home(tmp_path: Path) -> Iterator[GpgHome]:
    gpg = GpgHome.make(tmp_path / "gnupg")
    yield gpg
    gpg.close()


def carol_key(home: GpgHome) -> str:
    """Carol's key with a second user ID naming her employer, as gpg makes it."""
    fpr = home.generate(f"Carol <{CAROL}>")
    home.add_key(fpr)
    home.run("--quick-add-uid", fpr, OTHER_UID)
    return fpr


def packets(armored: str) -> list[pysequoia.packet.Packet]:
    return list(PacketPile.from_bytes(armored.encode()))


def test_only_the_readers_user_id_is_kept_without_comment_lines(home: GpgHome) -> None:
    """Her other identity is neither in the stored key nor in its armor; it still encrypts to
    her (gpg decrypts), and reads again as the same key."""
    fpr = carol_key(home)
    given = home.export(fpr)
    assert "Real-Surname" in str(pysequoia.Cert.from_bytes(given.encode()))  # Comment: lines
    info = read_key(given, email=CAROL, now=datetime.now(UTC))
    assert "Comment" not in info.armored and info.armored.startswith("-----BEGIN PGP PUBLIC")
    kept = packets(info.armored)
    assert [p.user_id for p in kept if p.tag == Tag.UserID] == [f"Carol <{CAROL}>"]
    binary = bytes(pysequoia.Cert.from_bytes(info.armored.encode()))
    assert b"Real-Surname" not in binary and b"employer" not in binary
    assert info.user_ids == (f"Carol <{CAROL}>",)
    assert read_key(info.armored, email=CAROL, now=datetime.now(UTC)) == info

    other = GpgHome.make(home.home.parent / "other")  # gpg reads the armor as it is stored
    try:
        (imported,) = other.import_key(info.armored)
        listing = other.run("--with-colons", "--list-keys", imported).stdout.decode()
        assert imported == fpr and "Real-Surname" not in listing and CAROL in listing
    finally:
        other.close()
    for checked in (False, True):
        sealed = encrypt_message(MESSAGE, armored_key=info.armored, signer=None, checked=checked)
        armor = sealed[sealed.index(b"-----BEGIN PGP MESSAGE") :]
        armor = armor[: armor.index(b"-----END PGP MESSAGE-----") + 25]
        assert b"Hello" in home.decrypt(armor).plaintext


def test_a_key_stored_whole_is_exported_in_the_kept_form(home: GpgHome) -> None:
    """A key stored before (Sequoia's armor of it all): the export keeps only her user ID."""
    fpr = carol_key(home)
    whole = str(pysequoia.Cert.from_bytes(home.export(fpr).encode()))
    assert "Comment: Karalina Real-Surname" in whole
    exported = kept_form(whole, email=CAROL)
    assert "Comment" not in exported and "Real-Surname" not in exported
    assert [p.user_id for p in packets(exported) if p.tag == Tag.UserID] == [f"Carol <{CAROL}>"]
    now = datetime.now(UTC)
    assert read_key(exported, email=CAROL, now=now).armored == exported
    assert kept_form(exported, email=CAROL) == exported


def test_anothers_certification_dated_later_neither_is_kept_nor_asks_a_recheck(
    home: GpgHome,
) -> None:
    """A friend's certification of the reader's user ID, dated a day ahead: no recheck."""
    fpr = carol_key(home)
    friend = home.generate("Friend <friend@example.org>")
    later = gpg_time(datetime.now(UTC) + timedelta(days=1)) + "!"
    home.run("--faked-system-time", later, "--default-key", friend, "--quick-sign-key", fpr)
    given = home.export(fpr)
    issuers = {p.issuer_fingerprint for p in packets(given) if p.tag == Tag.Signature}
    assert friend.lower() in issuers
    info = read_key(given, email=CAROL, now=datetime.now(UTC))
    assert info.recheck_at is None
    assert friend.lower() not in {p.issuer_fingerprint for p in packets(info.armored)}


def test_an_own_signature_dated_beyond_the_horizon_asks_no_recheck(home: GpgHome) -> None:
    """A new expiry signed with a date two years ahead is not waited for; one a day ahead is."""
    email = "later@example.org"
    fpr = home.generate(f"Later <{email}>", expire="5y")
    home.add_key(fpr, expire="5y")
    before = pysequoia.Cert.from_bytes(home.export(fpr).encode())
    now = datetime.now(UTC).replace(microsecond=0)
    found = {}
    for ahead in (timedelta(days=1), RECHECK_HORIZON + timedelta(days=365)):
        signed = gpg_time(now + ahead) + "!"
        home.run("--faked-system-time", signed, "--quick-set-expire", fpr, "3y")
        merged = before.merge(pysequoia.Cert.from_bytes(home.export(fpr).encode()))
        found[ahead.days] = read_key(str(merged), email=email, now=now).recheck_at
    [near, far] = found.values()
    assert near is not None and abs((near - now - timedelta(days=1)).total_seconds()) < 5
    assert far is None


def with_unbound_subkeys(armored: str, count: int) -> bytes:
    """The key with `count` more subkeys taken from keys Sequoia made: none bound to it."""
    extra = []
    while len(extra) < count:
        cert = pysequoia.Tsk.generate(user_id="x <x@example.org>").extract_certificate()
        extra += [p for p in PacketPile.from_bytes(bytes(cert)) if p.tag == Tag.PublicSubkey]
    mine = list(PacketPile.from_bytes(armored.encode()))
    return bytes(pysequoia.Cert.from_packets(mine + extra[:count]))


def test_unbound_subkeys_count_towards_the_limit_of_subkeys(home: GpgHome) -> None:
    """Attack: hundreds of subkeys without bindings escaped MAX_SUBKEY_BINDINGS, each costing a
    trial encryption. One subkey too many, bound or not, is refused before any trial."""
    fpr = carol_key(home)
    at_limit = with_unbound_subkeys(home.export(fpr), MAX_SUBKEYS - 1)
    assert read_key(at_limit, email=CAROL, now=datetime.now(UTC)).fingerprint == fpr
    over = with_unbound_subkeys(home.export(fpr), 3 * MAX_SUBKEYS)
    with pytest.raises(KeyProblem) as caught:
        read_key(over, email=CAROL, now=datetime.now(UTC))
    assert caught.value.code == "unreadable"
    assert f"{3 * MAX_SUBKEYS + 1} subkeys; at most {MAX_SUBKEYS}" in str(caught.value)


def test_a_key_with_more_user_ids_than_the_limit_is_refused() -> None:
    uids = [f"Reader {i} <r{i}@example.org>" for i in range(MAX_USER_IDS)]
    good = pysequoia.Tsk.generate(user_ids=uids).extract_certificate()
    assert read_key(str(good), email="r7@example.org", now=datetime.now(UTC)).user_ids == (
        "Reader 7 <r7@example.org>",
    )
    many = pysequoia.Tsk.generate(user_ids=[*uids, "One more <r7@example.org>"])
    problem = key_problem(
        str(many.extract_certificate()), email="r7@example.org", now=datetime.now(UTC)
    )
    assert problem is not None and problem.code == "unreadable"
    assert f"at most {MAX_USER_IDS}" in str(problem) and "\n" not in str(problem)


def test_a_stored_key_is_armored_with_a_correct_checksum(home: GpgHome) -> None:
    info = read_key(home.export(carol_key(home)), email=CAROL, now=datetime.now(UTC))
    lines = info.armored.strip().splitlines()
    assert lines[0] == "-----BEGIN PGP PUBLIC KEY BLOCK-----" and lines[1] == ""
    assert lines[-1] == "-----END PGP PUBLIC KEY BLOCK-----" and lines[-2].startswith("=")
    data = base64.b64decode("".join(lines[2:-2]))
    assert data == bytes(pysequoia.Cert.from_bytes(info.armored.encode()))
    home.run("--dearmor", data=info.armored.encode())  # gpg checks the CRC


def test_a_key_with_more_self_signatures_than_the_limit_is_refused() -> None:
    """Each trial encryption checks the kept self-signatures again: past MAX_SELF_SIGNATURES
    (here new expiries, two signatures each), the key is refused before any trial."""
    tsk = pysequoia.Tsk.generate(user_id=f"Carol <{CAROL}>")
    cert = tsk.extract_certificate()
    now = datetime.now(UTC)
    for i in range(MAX_SELF_SIGNATURES // 2 - 1):
        cert = cert.set_expiration(now + timedelta(days=400 + i), tsk.certifier())
    assert read_key(str(cert), email=CAROL, now=now).fingerprint == cert.fingerprint.upper()
    cert = cert.set_expiration(now + timedelta(days=300), tsk.certifier())
    with pytest.raises(KeyProblem) as caught:
        read_key(str(cert), email=CAROL, now=now)
    assert caught.value.code == "unreadable"
    assert f"self-signatures; at most {MAX_SELF_SIGNATURES}" in str(caught.value)
