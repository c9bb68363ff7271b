"""Readers' OpenPGP keys and PGP/MIME messages, against the real GnuPG and Sequoia.

Keys are made by gpg (as most readers' are) in a temporary GNUPGHOME, and by Sequoia; messages are
built by newsletter.message as the sender builds them, encrypted by newsletter.openpgp, then read
back by `gpg --decrypt` (and pysequoia.decrypt), which also checks the signatures.
"""

from __future__ import annotations

import base64
import statistics
import time
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path

import pysequoia
import pytest

from newsletter.config import Settings
from newsletter.errors import ConfigError
from newsletter.message import ListInfo, MessageTemplate, Recipient, build_message
from newsletter.openpgp import (
    MAX_KEY_BYTES,
    OBSCURED_SUBJECT,
    KeyProblem,
    Signer,
    encrypt_message,
    key_problem,
    load_signing_key,
    read_key,
)
from newsletter.render import RenderedVariant, link_markers
from tests.conftest import make_settings
from tests.gpg_keys import GpgHome, gpg_time, sequoia_decrypt, sequoia_key

READER = "reader@example.org"
PORTAL = "news@portal.example.org"
SUBJECT_BE = "Штотыднёвы дайджэст: палітвязні, «Вясна» і Алесь Бяляцкі"
NOW = datetime.now(UTC)


@dataclass(frozen=True)
class GpgKey:
    fpr: str
    armored: str


@dataclass(frozen=True)
class Keys:
    """Every reader key the tests need, made once: gpg ones in `home`, a Sequoia one."""

    home: GpgHome
    gpg: dict[str, GpgKey]
    secret: str  # the good key's armored secret key
    mixed_subkeys: list[tuple[str, datetime | None, str]]  # expired, valid, revoked (to gpg)
    sequoia: pysequoia.Tsk


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keys]:
    """The readers' keys, made by gpg in one home (which keeps their secret keys)."""
    home = GpgHome.make(tmp_path_factory.mktemp("reader") / "gnupg")
    try:
        yield make_keys(home)
    finally:
        home.close()


def make_keys(home: GpgHome) -> Keys:
    made: dict[str, GpgKey] = {}

    def keep(name: str, fpr: str) -> None:
        made[name] = GpgKey(fpr, home.export(fpr))

    good = home.generate(f"Reader <{READER}>")
    home.add_key(good)
    keep("good", good)

    expired = home.generate("Old <old@example.org>", expire="1d", at=gpg_time(NOW - timedelta(10)))
    home.add_key(expired, expire="1d", at=gpg_time(NOW - timedelta(10)))
    keep("expired", expired)

    # A primary that never expires, its encryption subkey that did; then a valid and a revoked one.
    mixed = home.generate(
        "Mixed <mixed@example.org>", expire="never", at=gpg_time(NOW - timedelta(20))
    )
    home.add_key(mixed, expire="1d", at=gpg_time(NOW - timedelta(10)))
    keep("subkey_expired", mixed)
    home.add_key(mixed)
    home.add_key(mixed)
    home.revoke_subkey(mixed, 3)
    keep("mixed", mixed)

    revoked = home.generate("Revoked <revoked@example.org>")
    home.add_key(revoked)
    home.revoke(revoked)
    keep("revoked", revoked)

    keep("sign_only", home.generate("Signer <signer@example.org>", usage="sign"))

    subkey_revoked = home.generate("Subrev <subrev@example.org>")
    home.add_key(subkey_revoked)
    home.revoke_subkey(subkey_revoked, 1)
    keep("subkey_revoked", subkey_revoked)

    keep("other", _with_subkey(home, "Other <other@example.org>"))

    # In the past: Sequoia ignores a user ID revocation dated after now, and gpg dates one a
    # second after the binding it revokes when both would fall in the same second.
    before, yesterday = gpg_time(NOW - timedelta(2)), gpg_time(NOW - timedelta(1))
    uid_revoked = home.generate("Someone <someone@example.org>", at=before)
    home.add_key(uid_revoked, at=before)
    home.run("--faked-system-time", before, "--quick-add-uid", uid_revoked, f"Reader <{READER}>")
    home.run(
        "--faked-system-time", yesterday, "--quick-revoke-uid", uid_revoked, f"Reader <{READER}>"
    )
    keep("uid_revoked", uid_revoked)

    keep("rsa", home.generate("Rsa <rsa@example.org>", "rsa2048", "sign,encr"))

    mixed_subkeys = home.subkeys(mixed)
    assert [validity for _fpr, _end, validity in mixed_subkeys] == ["e", "u", "r"]
    sequoia = sequoia_key(f"Reader <{READER}>")
    return Keys(home, made, home.export_secret(good), mixed_subkeys, sequoia)


def _with_subkey(home: GpgHome, uid: str) -> str:
    fpr = home.generate(uid)
    home.add_key(fpr)
    return fpr


@pytest.fixture(scope="module")
def portal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GpgHome, Path]]:
    """The portal's own gpg home, with its signing key; and that key exported to a file."""
    home = GpgHome.make(tmp_path_factory.mktemp("portal") / "gnupg")
    try:
        fpr = home.generate(f"Portal <{PORTAL}>", usage="sign")
        path = home.home.parent / "signing-key.asc"
        path.write_text(home.export_secret(fpr))
        yield home, path
    finally:
        home.close()


@pytest.fixture(scope="module")
def signer(portal: tuple[GpgHome, Path]) -> Signer:
    loaded = load_signing_key(str(portal[1]))
    assert loaded is not None
    return loaded


# --- reading keys ----------------------------------------------------------------------------


def test_a_good_gpg_key_is_read_with_its_fingerprint_user_ids_and_expiry(keys: Keys) -> None:
    key = keys.gpg["good"]
    info = read_key("\n  " + key.armored + "\n", email="Reader@Example.ORG", now=NOW)
    (_subkey, subkey_expiry, _validity), *_ = keys.home.subkeys(key.fpr)
    primary_expiry = keys.home.expiry(key.fpr)
    assert primary_expiry is not None and subkey_expiry is not None
    assert info.fingerprint == key.fpr
    assert info.user_ids == (f"Reader <{READER}>",)
    assert info.expires_at == min(primary_expiry, subkey_expiry)
    assert "PRIVATE" not in info.armored
    assert read_key(info.armored.encode(), email=READER, now=NOW) == info


def test_a_key_whose_primary_encrypts_is_read(keys: Keys) -> None:
    key = keys.gpg["rsa"]
    info = read_key(key.armored, email="rsa@example.org", now=NOW)
    assert (info.fingerprint, info.expires_at) == (key.fpr, keys.home.expiry(key.fpr))


def test_a_good_sequoia_key_is_read_as_gpg_sees_it(keys: Keys) -> None:
    public = str(keys.sequoia.extract_certificate())
    info = read_key(public, email=READER, now=NOW)
    (fpr,) = keys.home.import_key(public)
    expiries = [keys.home.expiry(fpr), *(end for _fpr, end, _validity in keys.home.subkeys(fpr))]
    assert info.fingerprint == fpr
    assert info.user_ids == (f"Reader <{READER}>",)
    assert info.expires_at == min(end for end in expiries if end is not None)


def test_the_expiry_is_the_last_encryption_subkeys_when_the_primary_never_expires(
    keys: Keys,
) -> None:
    """Of an expired, a valid and a revoked subkey, the valid one's expiry is the key's."""
    (_, expired_end, _), (_, valid_end, _), _revoked = keys.mixed_subkeys
    assert expired_end is not None and valid_end is not None and expired_end < NOW
    info = read_key(keys.gpg["mixed"].armored, email="mixed@example.org", now=NOW)
    assert info.expires_at == valid_end
    problem = key_problem(info.armored, email="mixed@example.org", now=valid_end)
    assert problem is not None and problem.code == "expired"


def big_key() -> str:
    """A real key, made too large by its many user IDs."""
    uids = [f"Reader {i} <reader{i}@example.org>" for i in range(400)]
    return str(pysequoia.Tsk.generate(user_ids=uids).extract_certificate())


def refused_inputs(keys: Keys) -> dict[str, tuple[bytes | str, str, str, str]]:
    """name: (what a reader gave, for which address, the code, a part of the message)."""
    gpg = keys.gpg
    expired_on = keys.home.expiry(gpg["expired"].fpr)
    assert expired_on is not None
    _, sub_end, _ = keys.mixed_subkeys[0]
    assert sub_end is not None
    armored = gpg["good"].armored
    return {
        "random-bytes": (bytes(range(256)) * 8, READER, "unreadable", "not an OpenPGP public key"),
        "empty": ("", READER, "unreadable", "no key found"),
        "truncated": (armored[: len(armored) // 2], READER, "unreadable", "not an OpenPGP"),
        "html": ("<html><body><p>my key</p></body></html>", READER, "unreadable", "not an OpenPGP"),
        "two-keys": (armored + gpg["other"].armored, READER, "several", "holds 2 keys"),
        "secret": (keys.secret, READER, "secret", "give your public key"),
        "expired": (
            gpg["expired"].armored,
            "old@example.org",
            "expired",
            f"this key expired on {expired_on:%Y-%m-%d}",
        ),
        "revoked": (gpg["revoked"].armored, "revoked@example.org", "revoked", "revoked"),
        "sign-only": (
            gpg["sign_only"].armored,
            "signer@example.org",
            "no_encryption",
            "no usable encryption subkey",
        ),
        "subkey-revoked": (
            gpg["subkey_revoked"].armored,
            "subrev@example.org",
            "no_encryption",
            "no usable encryption subkey",
        ),
        "subkey-expired": (
            gpg["subkey_expired"].armored,
            "mixed@example.org",
            "expired",
            f"encryption subkey of this key expired on {sub_end:%Y-%m-%d}",
        ),
        "wrong-address": (
            gpg["other"].armored,
            READER,
            "wrong_address",
            f"not for {READER} (it names other@example.org)",
        ),
        "user-id-revoked": (
            gpg["uid_revoked"].armored,
            READER,
            "wrong_address",
            "(it names someone@example.org)",
        ),
        "too-large": (big_key(), READER, "too_large", f"at most {MAX_KEY_BYTES // 1024} KB"),
        # A packet of a private tag (60): Sequoia reads it, then raises when its tag is asked.
        "private-packet": (
            bytes(pysequoia.Cert.from_bytes(gpg["good"].armored.encode())) + b"\xfc\x03abc",
            READER,
            "unreadable",
            "cannot be used",
        ),
    }


REFUSALS = [
    "random-bytes",
    "empty",
    "truncated",
    "html",
    "two-keys",
    "secret",
    "expired",
    "revoked",
    "sign-only",
    "subkey-revoked",
    "subkey-expired",
    "wrong-address",
    "user-id-revoked",
    "too-large",
    "private-packet",
]


@pytest.fixture(scope="module")
def refused(keys: Keys) -> dict[str, tuple[bytes | str, str, str, str]]:
    return refused_inputs(keys)


@pytest.mark.parametrize("case", REFUSALS)
def test_each_unusable_key_is_refused_with_its_code_and_one_line(
    case: str, refused: dict[str, tuple[bytes | str, str, str, str]]
) -> None:
    data, email, code, words = refused[case]
    with pytest.raises(KeyProblem) as caught:
        read_key(data, email=email, now=NOW)
    message = str(caught.value)
    assert (caught.value.code, "\n" in message) == (code, False), message
    assert words in message and len(message) < 200
    assert caught.value.template is not None  # translatable later (NewsletterError.of)


def test_text_from_a_hostile_key_is_shown_on_one_line_without_control_characters() -> None:
    evil = "Evil\x1b[2J\r\nBcc: x@example.org\u202e\u200b " + "long " * 60
    tsk = pysequoia.Tsk.generate(user_id=evil)
    with pytest.raises(KeyProblem) as caught:
        read_key(str(tsk.extract_certificate()), email=READER, now=NOW)
    message = str(caught.value)
    assert caught.value.code == "wrong_address"
    assert not [c for c in message if unicodedata.category(c).startswith("C")], repr(message)
    assert "(it names Evil [2J Bcc: x@example.org long long" in message
    assert message.endswith("…)") and len(message) < 200

    tsk = pysequoia.Tsk.generate(user_id=f"Reader\x07\x1b[31m\u202e <{READER}>")
    info = read_key(str(tsk.extract_certificate()), email=READER, now=NOW)
    assert info.user_ids == (f"Reader [31m <{READER}>",)


def test_key_problem_is_none_for_a_good_key_and_expired_once_past_its_expiry(keys: Keys) -> None:
    info = read_key(keys.gpg["good"].armored, email=READER, now=NOW)
    assert info.expires_at is not None
    assert key_problem(info.armored, email=READER, now=NOW) is None
    later = key_problem(info.armored, email=READER, now=info.expires_at + timedelta(seconds=1))
    assert later is not None and later.code == "expired"
    assert f"expired on {info.expires_at:%Y-%m-%d}" in str(later)
    other = key_problem(info.armored, email="other@example.org", now=NOW)
    assert other is not None and other.code == "wrong_address"
    garbage = key_problem("-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nAAAA", email=READER, now=NOW)
    assert garbage is not None and garbage.code == "unreadable"
    huge = key_problem(info.armored + " " * MAX_KEY_BYTES, email=READER, now=NOW)
    assert huge is not None and huge.code == "too_large"


# --- the signing key -------------------------------------------------------------------------


def test_the_signing_key_setting(portal: tuple[GpgHome, Path], signer: Signer) -> None:
    home, _path = portal
    assert load_signing_key("") is None
    assert home.import_key(signer.armored) == [signer.fingerprint]
    assert "PRIVATE" not in signer.armored and signer.tsk.signer() is not None


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("missing", "cannot read"),
        ("garbage", "is not one OpenPGP secret key"),
        ("public", "holds a public key only"),
        ("passphrase", "no signing key usable without a passphrase"),
        ("no-signing-key", "no signing key usable without a passphrase"),
        ("revoked", "has been revoked"),
    ],
)
def test_an_unusable_signing_key_file_is_a_config_error(
    case: str, words: str, tmp_path: Path, portal: tuple[GpgHome, Path], keys: Keys
) -> None:
    home, _path = portal
    locked = home.generate(f"{case} <{case}@portal.example.org>", usage="sign")
    contents = {
        "garbage": "not a key at all",
        "public": home.export(locked),
        "no-signing-key": keys.secret,  # a certification-only primary and an encryption subkey
    }
    if case == "passphrase":
        # --passphrase again: gpg takes the last one given, and exports the key under it.
        home.run("--passphrase", "s3cret", "--passwd", locked)
        contents[case] = home.run(
            "--passphrase", "s3cret", "--armor", "--export-secret-keys", locked
        ).stdout.decode()
    if case == "revoked":
        home.revoke(locked)
        contents[case] = home.export_secret(locked)
    if case in contents:
        (tmp_path / "key.asc").write_text(contents[case])
    with pytest.raises(ConfigError) as caught:
        load_signing_key(str(tmp_path / "key.asc"))
    message = str(caught.value)
    assert message.startswith("[openpgp] signing_key_file: ") and "\n" not in message
    assert words in message, message


# --- messages --------------------------------------------------------------------------------

PARAGRAPH_BE = (
    "Праваабаронцы «Вясны» паведамляюць пра новыя арышты і суды над палітвязнямі. "
    "Алесь Бяляцкі застаецца ў калоніі; яго жонка Наталля Пінчук заклікае да салідарнасці. "
)


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return make_settings(f"sqlite:///{tmp_path_factory.mktemp('db') / 'unused.db'}")


def variant(subject: str = SUBJECT_BE, size: int = 40_000) -> RenderedVariant:
    """A rendered variant whose message is about `size` bytes once encoded."""
    markers = link_markers("0123456789abcdef0123456789abcdef")
    repeat = max(1, size * 2 // (len(PARAGRAPH_BE.encode()) * 5))
    text = (PARAGRAPH_BE + "\n") * repeat + f"\nUnsubscribe: {markers['unsubscribe']}\n"
    html = (
        "<html><body>"
        + f"<p>{PARAGRAPH_BE}</p>\n" * repeat
        + f'<a href="{markers["unsubscribe"]}">unsubscribe</a>'
        + f'<a href="{markers["preferences"]}">preferences</a></body></html>\n'
    )
    return RenderedVariant("be", subject, html, text, "0123456789abcdef0123456789abcdef")


RECIPIENT = Recipient(7, READER, "Рэдактар Reader")
MLIST = ListInfo(3, "weekly", "weekly.portal.example.org")


def original(settings: Settings, *, fast: bool = False, subject: str = SUBJECT_BE) -> bytes:
    """A message as the sender makes it: build_message, or the fast path (MessageTemplate)."""
    v = variant(subject)
    if fast:
        template = MessageTemplate.build(variant=v, campaign_id=11, mlist=MLIST, settings=settings)
        return template.render(RECIPIENT, settings=settings, now=NOW)
    built = build_message(
        variant=v, campaign_id=11, recipient=RECIPIENT, mlist=MLIST, settings=settings, now=NOW
    )
    return built.as_bytes()


def parse(raw: bytes) -> EmailMessage:
    msg = message_from_bytes(raw, policy=policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def leaves(msg: EmailMessage) -> dict[str, str]:
    """The decoded text of each leaf part, by content type."""
    return {p.get_content_type(): p.get_content() for p in msg.walk() if not p.is_multipart()}


def ciphertext(outer: EmailMessage) -> bytes:
    """The outer message's checked structure (RFC 3156), and its armored OpenPGP message."""
    assert outer.get_content_type() == "multipart/encrypted"
    assert outer.get_param("protocol") == "application/pgp-encrypted"
    version, encrypted = outer.iter_parts()
    assert isinstance(version, EmailMessage) and isinstance(encrypted, EmailMessage)
    assert version.get_content_type() == "application/pgp-encrypted"
    identification = version.get_payload(decode=True)
    assert isinstance(identification, bytes) and identification.strip() == b"Version: 1"
    assert encrypted.get_content_type() == "application/octet-stream"
    assert encrypted.get_filename() == "encrypted.asc"
    data = encrypted.get_payload(decode=True)
    assert isinstance(data, bytes) and data.startswith(b"-----BEGIN PGP MESSAGE-----")
    return data


STRUCTURAL = ("content-", "mime-version")


def check_protection(before: EmailMessage, outer: EmailMessage, inner: EmailMessage) -> None:
    """RFC 9788: the inside has the real fields and one HP-Outer for each outer one."""
    assert inner.get_content_type() == "multipart/alternative"
    assert inner["Content-Type"].params["hp"] == "cipher"
    assert leaves(inner) == leaves(before)
    for name in ("From", "To", "Subject", "Date", "Message-ID", "List-Id", "List-Unsubscribe"):
        assert inner[name] == before[name], name
    kept = [
        (name.lower(), str(value))
        for name, value in outer.items()
        if not name.lower().startswith(STRUCTURAL) and name.lower() != "autocrypt"
    ]
    hp_outer = [str(value).partition(": ") for value in inner.get_all("HP-Outer", [])]
    assert sorted((name.lower(), " ".join(value.split())) for name, _, value in hp_outer) == sorted(
        (name, " ".join(value.split())) for name, value in kept
    )
    for name in ("From", "To", "Date", "Message-ID", "List-Id", "List-Unsubscribe"):
        assert outer[name] == before[name], name
    assert outer["List-Unsubscribe-Post"] == before["List-Unsubscribe-Post"]


def check_wire_form(raw: bytes) -> None:
    assert raw.isascii() and raw.count(b"\n") == raw.count(b"\r\n"), "bare LF or 8-bit"
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998


@pytest.mark.parametrize("fast", [False, True], ids=["build_message", "MessageTemplate"])
def test_a_message_decrypts_with_gpg_to_the_original_with_protected_headers(
    fast: bool, keys: Keys, settings: Settings
) -> None:
    raw = original(settings, fast=fast)
    before = parse(raw)
    sealed = encrypt_message(raw, armored_key=keys.gpg["good"].armored, signer=None)
    check_wire_form(sealed)
    outer = parse(sealed)
    assert outer["Subject"] == OBSCURED_SUBJECT and "Autocrypt" not in outer
    subject_line = next(f for f in raw.split(b"\r\n") if f.startswith(b"Subject:"))
    boundary = before.get_boundary()
    assert boundary is not None
    assert subject_line not in sealed and boundary.encode() not in sealed
    decrypted = keys.home.decrypt(ciphertext(outer))
    inner = parse(decrypted.plaintext)
    assert inner["Subject"] == SUBJECT_BE
    check_protection(before, outer, inner)
    assert "Subject: [...]" in [str(v) for v in inner.get_all("HP-Outer", [])]
    assert decrypted.lines("DECRYPTION_OKAY") and not decrypted.lines("VALIDSIG")


def test_a_signed_message_verifies_with_gpg_and_offers_the_key_by_autocrypt(
    keys: Keys, settings: Settings, signer: Signer
) -> None:
    raw = original(settings)
    sealed = encrypt_message(raw, armored_key=keys.gpg["good"].armored, signer=signer)
    check_wire_form(sealed)
    outer = parse(sealed)
    autocrypt = dict(
        part.strip().partition("=")[::2] for part in str(outer["Autocrypt"]).split(";")
    )
    assert (autocrypt["addr"], autocrypt["prefer-encrypt"]) == (PORTAL, "mutual")
    keydata = base64.b64decode("".join(autocrypt["keydata"].split()))
    assert keys.home.import_key(keydata) == [signer.fingerprint]
    decrypted = keys.home.decrypt(ciphertext(outer))
    (validsig,) = decrypted.lines("VALIDSIG")
    assert validsig[-1] == signer.fingerprint
    assert decrypted.lines("GOODSIG")
    check_protection(parse(raw), outer, parse(decrypted.plaintext))


def test_a_sequoia_key_reads_its_message_with_sequoia(
    keys: Keys, settings: Settings, signer: Signer
) -> None:
    raw = original(settings)
    armored = read_key(str(keys.sequoia.extract_certificate()), email=READER, now=NOW).armored
    sealed = encrypt_message(raw, armored_key=armored, signer=signer)
    outer = parse(sealed)
    data = ciphertext(outer)
    inner = parse(sequoia_decrypt(keys.sequoia, data))
    check_protection(parse(raw), outer, inner)
    portal_cert = pysequoia.Cert.from_bytes(signer.armored.encode())
    verified = pysequoia.decrypt(
        data, decryptor=keys.sequoia.decryptor(), store=lambda _ids: [portal_cert]
    )
    assert len(verified.valid_sigs) == 1


def test_a_neutral_outer_subject_replaces_the_obscured_one(keys: Keys, settings: Settings) -> None:
    raw = original(settings, subject="Hello, «Вясна»")
    neutral = "Навіны партала"
    sealed = encrypt_message(
        raw, armored_key=keys.gpg["good"].armored, signer=None, outer_subject=neutral
    )
    outer = parse(sealed)
    assert outer["Subject"] == neutral
    inner = parse(keys.home.decrypt(ciphertext(outer)).plaintext)
    assert inner["Subject"] == "Hello, «Вясна»"
    hp_subject = [str(v) for v in inner.get_all("HP-Outer", []) if str(v).startswith("Subject:")]
    assert len(hp_subject) == 1 and "[...]" not in hp_subject[0]


@pytest.mark.parametrize("checked", [False, True], ids=["parsed", "checked-when-stored"])
def test_only_the_valid_encryption_subkey_is_encrypted_to(
    keys: Keys, settings: Settings, checked: bool
) -> None:
    """Of an expired, a valid and a revoked encryption subkey, gpg sees only the valid one; also
    on the sender's path (`checked`: the stored key, its expiry checked, not parsed again)."""
    (expired, _, _), (valid, _, _), (revoked, _, _) = keys.mixed_subkeys
    sealed = encrypt_message(
        original(settings), armored_key=keys.gpg["mixed"].armored, signer=None, checked=checked
    )
    decrypted = keys.home.decrypt(ciphertext(parse(sealed)))
    assert [line[0] for line in decrypted.lines("ENC_TO")] == [valid[-16:]]
    assert expired[-16:] != valid[-16:] != revoked[-16:]


@pytest.mark.parametrize("name", ["expired", "revoked", "subkey_expired"])
def test_no_message_is_encrypted_to_a_key_pysequoia_would_take(
    name: str, keys: Keys, settings: Settings
) -> None:
    """pysequoia encrypts to expired and revoked keys without a word; encrypt_message refuses."""
    armored = keys.gpg[name].armored
    assert pysequoia.encrypt(b"x", [pysequoia.Cert.from_bytes(armored.encode())])
    with pytest.raises(KeyProblem) as caught:
        encrypt_message(original(settings), armored_key=armored, signer=None)
    assert caught.value.code in ("expired", "revoked")


def test_time_to_encrypt_a_40_kb_message(keys: Keys, settings: Settings, signer: Signer) -> None:
    """Printed with pytest -s: the median of 50 runs, with and without signing."""
    raw = original(settings)
    assert len(raw) >= 40_000
    armored = keys.gpg["good"].armored
    for label, who in (("unsigned", None), ("signed", signer)):
        times = []
        for _ in range(50):
            start = time.perf_counter()
            sealed = encrypt_message(raw, armored_key=armored, signer=who)
            times.append(time.perf_counter() - start)
        assert len(sealed) > len(raw)
        print(
            f"\nencrypt_message, {len(raw) // 1024} KB, {label}: "
            f"median {statistics.median(times) * 1000:.2f} ms, max {max(times) * 1000:.2f} ms"
        )


@pytest.mark.parametrize("which", ["subkey", "key"])
def test_a_revocation_dated_later_ends_the_key_then(tmp_path: Path, which: str) -> None:
    """A "superseded" revocation dated a day ahead: the key is good now, and its expiry is that
    day, so the sender (which checks the stored expiry, not the key) stops using it then."""
    home = GpgHome.make(tmp_path / "gnupg")
    try:
        email = "later@example.org"
        fpr = home.generate(f"Later <{email}>")
        home.add_key(fpr)
        now = datetime.now(UTC).replace(microsecond=0)
        later = now + timedelta(days=1)
        select = "key 1\n" if which == "subkey" else ""
        answers = f"{select}revkey\ny\n2\n\ny\nsave\n"  # reason 2: superseded (a soft one)
        home.run(
            "--faked-system-time", gpg_time(later) + "!", "--command-fd", "0", "--edit-key", fpr,
            data=answers.encode(),
        )  # fmt: skip
        info = read_key(home.export(fpr), email=email, now=now)
        assert info.expires_at is not None
        assert abs((info.expires_at - later).total_seconds()) < 5
        assert key_problem(info.armored, email=email, now=now) is None
        past = key_problem(info.armored, email=email, now=later + timedelta(minutes=1))
        assert past is not None and past.code in ("expired", "revoked")
    finally:
        home.close()


def test_a_signature_dated_later_makes_the_key_judged_again_then(tmp_path: Path) -> None:
    """A new, short expiry signed with a date three seconds ahead does not count yet: the key
    reads as good, with recheck_at at that date; judged again once it counts, it has expired."""
    home = GpgHome.make(tmp_path / "gnupg")
    try:
        email = "later@example.org"
        fpr = home.generate(f"Later <{email}>")
        home.add_key(fpr)
        now = datetime.now(UTC)
        later = now + timedelta(seconds=3)
        before = home.export(fpr)
        home.run(
            "--faked-system-time", gpg_time(later) + "!", "--quick-set-expire", fpr, "seconds=2"
        )
        # gpg exports only its newest self-signature; the reader's key holds both (merged).
        merged = pysequoia.Cert.from_bytes(before.encode()).merge(
            pysequoia.Cert.from_bytes(home.export(fpr).encode())
        )
        info = read_key(str(merged), email=email, now=now)
        assert info.recheck_at is not None, info
        assert abs((info.recheck_at - later).total_seconds()) < 2
        assert info.expires_at is not None and info.expires_at > now + timedelta(days=300)
        time.sleep(max(0.0, (later - datetime.now(UTC)).total_seconds()) + 3)
        problem = key_problem(info.armored, email=email, now=datetime.now(UTC))
        assert problem is not None and problem.code == "expired"
    finally:
        home.close()
