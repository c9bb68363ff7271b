"""OpenPGP for readers who give us a public key: check the key, encrypt each message to it.

Pure functions around pysequoia (Sequoia-PGP in process): nothing is written to disk, nothing of
a message is logged, and gpg is never run.

pysequoia encrypts to a revoked or expired certificate without a word, and says nothing about
subkeys, so the checks are ours. What it can tell, it tells after checking the self-signatures
against Sequoia's standard policy: whether the certificate is revoked, when the primary key
expires, which user IDs are not revoked. For the subkeys we read the packets (pysequoia.packet)
for the expiry, and let Sequoia judge the rest by a trial encryption to a certificate holding only
that subkey: pysequoia.encrypt takes only keys Sequoia finds valid under its policy, not revoked
and flagged for encryption (the alive ones, or else, silently, the expired ones; hence the expiry
is ours). The message itself is encrypted to a certificate holding only the encryption subkeys
that are usable now, so nothing else can be chosen.

What is kept of a reader's key is what names them: the primary key, their user ID, the encryption
subkeys usable now, each with the key's own signatures, armored without Sequoia's Comment lines
(another name, a work address, a friend's certification are dropped).

encrypt_message makes a PGP/MIME message (RFC 3156) with header protection (RFC 9788): the
original header fields go inside with the body, the outside keeps what delivery and the list
headers need, and the Subject outside is obscured.
"""

from __future__ import annotations

import base64
import secrets
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import parseaddr
from pathlib import Path

import pysequoia
from pysequoia.packet import Packet, PacketPile, SignatureType, Tag

from newsletter.addresses import header_problem, stored_forms
from newsletter.errors import ConfigError, NewsletterError, PermanentDeliveryError
from newsletter.i18n import N_
from newsletter.message import POLICY, set_subject

MAX_KEY_BYTES = 64 * 1024
# Each subkey is checked by a trial encryption (0.5-0.75 s of CPU, holding the GIL, for the 250
# that fit in MAX_KEY_BYTES), bound or not. Real keys have a few; a key rotated yearly for
# decades, 30. The limits count the key as given, before anything is dropped.
MAX_SUBKEY_BINDINGS = 50
MAX_SUBKEYS = 50
# User IDs (and user attributes, photos) are checked once, but cost each time the key is read:
# a real key has a handful, a much-travelled one a few dozen.
MAX_USER_IDS = 100
# Each trial encryption checks again every self-signature of what is kept of the key (the
# primary key and the reader's user ID): a key extended yearly for decades has a few dozen.
MAX_SELF_SIGNATURES = 100
# A self-signature dated later than now counts from then (KeyInfo.recheck_at). One dated more
# than a year ahead is no clock a minute wrong nor a change a reader plans: it is not waited
# for, so that no key keeps a recheck pending for decades. (Ignoring it costs little: once it
# counts, a shorter expiry it sets goes unseen until the key is given again.)
RECHECK_HORIZON = timedelta(days=366)
OBSCURED_SUBJECT = "[...]"  # RFC 9788's obscured Subject
_SHOWN_CHARS = 100  # the most of a key's text (a user ID, an error) a message shows
_SETTING = "[openpgp] signing_key_file"


class KeyProblem(NewsletterError):
    """A reader's key we will not encrypt to; `code` names the check that refused it."""

    code: str = "unreadable"  # or several, secret, expired, revoked, no_encryption, ...
    # Set when the key parsed but failed a check: whose it is, and its public form.
    fingerprint: str = ""
    armored: str = ""


@dataclass(frozen=True)
class KeyInfo:
    """A reader's public key as read_key accepted it."""

    fingerprint: str  # upper-case hex, no spaces
    expires_at: datetime | None  # the key's, or its last encryption subkey's if that is earlier
    user_ids: tuple[str, ...]  # the user IDs kept (those naming the reader), safe to print
    # The key as kept (_stored_form): the primary key, the reader's user ID, the encryption
    # subkeys usable now, their self-signatures; never any secret material, no Comment lines.
    armored: str
    revoked: bool = False  # readers.set_key learnt the revocation of the reader's own key
    # The first self-signature kept dated later than now (within RECHECK_HORIZON): Sequoia
    # counts it only from then (a new expiry), so the stored judgement holds until then and is
    # made again after (readers.recheck_key).
    recheck_at: datetime | None = None


@dataclass(frozen=True)
class Signer:
    """The portal's own key: it signs every encrypted message and is offered by Autocrypt."""

    tsk: pysequoia.Tsk  # the secret key
    armored: str  # its public key, armored
    fingerprint: str
    keydata: bytes  # its public key, binary

    def autocrypt_header(self, from_address: str) -> str:
        """The value of an Autocrypt header for this key, folded: "Autocrypt: " + it + CRLF."""
        if (problem := header_problem(from_address)) is not None:
            raise ConfigError.of(
                N_("the Autocrypt header cannot carry %(address)s: %(problem)s"),
                address=_printable(from_address),
                problem=problem,
            )
        data = base64.b64encode(self.keydata).decode("ascii")
        lines = [data[i : i + 76] for i in range(0, len(data), 76)]
        return f"addr={from_address}; prefer-encrypt=mutual; keydata=\r\n " + "\r\n ".join(lines)

    def _signing(self) -> pysequoia.PySigner:
        """A signer for one message, chosen now: a signing key that expired is not used."""
        try:
            return self.tsk.signer()
        except Exception as e:  # pysequoia raises RuntimeError for every Sequoia error
            raise ConfigError.of(
                N_("%(setting)s: the key %(fingerprint)s cannot sign any more (%(reason)s)"),
                setting=_SETTING,
                fingerprint=self.fingerprint,
                reason=_reason(e),
            ) from None


@dataclass(frozen=True)
class _Subkey:
    """A valid, unrevoked encryption subkey, whatever its expiry."""

    fingerprint: str
    expires_at: datetime | None
    packets: tuple[Packet, ...]  # the subkey and its signatures


@dataclass(frozen=True)
class _Key:
    """What the checks need of one parsed certificate (without the time: that is per call)."""

    fingerprint: str
    user_ids: tuple[str, ...]  # all that are not revoked, as in the key (to name in a refusal)
    named: tuple[str, ...]  # those kept: naming the reader (all, when no address is given)
    revoked: bool
    expires_at: datetime | None  # the primary key's
    primary_encrypts: bool  # the primary key itself is a valid encryption key
    # The primary key, the kept user IDs, and their self-signatures (none of others' making).
    head: tuple[Packet, ...]
    subkeys: tuple[_Subkey, ...]


def read_key(data: bytes | str, *, email: str, now: datetime) -> KeyInfo:
    """Parse and check a reader's public key; raises KeyProblem with a one-line reason."""
    raw = data.encode("utf-8", "replace") if isinstance(data, str) else data
    if len(raw) > MAX_KEY_BYTES:
        raise _too_large(len(raw))
    key = _parse(raw, email=email)
    kept = _kept_packets(key, now)
    armored = _stored_form(kept)
    if (problem := _check(key, email=email, now=now)) is not None:
        problem.fingerprint, problem.armored = key.fingerprint, armored
        raise problem
    # What is stored is checked again when its recheck comes: it must pass the size too.
    if len(armored) > MAX_KEY_BYTES:
        raise _too_large(len(armored))
    return KeyInfo(
        fingerprint=key.fingerprint,
        expires_at=_expires_at(key, now),
        recheck_at=_recheck_at(kept, now),
        user_ids=tuple(_printable(uid) for uid in key.named),
        armored=armored,
    )


def key_problem(armored: str, *, email: str, now: datetime) -> KeyProblem | None:
    """The problem with a stored key at `now`, or None if messages to `email` may use it."""
    if len(armored) > MAX_KEY_BYTES:
        return _too_large(len(armored))
    try:
        # Parsed afresh, never from a cache: Sequoia judges a key at the time of day, and this
        # is the check made again once a signature dated later counts (KeyInfo.recheck_at).
        key = _parse(armored.encode("utf-8", "replace"), email=email)
    except KeyProblem as problem:
        return problem
    return _check(key, email=email, now=now)


def kept_form(armored: str, *, email: str) -> str:
    """A stored key in the form read_key keeps now, without judging it again: for a key stored
    before, whole (Sequoia's armor: every user ID, also as a readable Comment line).

    The primary key, the user IDs naming `email`, the subkeys, with their self-signatures.
    """
    if "Comment:" not in armored:  # only Sequoia's armor has them: the kept form already
        return armored
    try:
        cert = pysequoia.Cert.from_bytes(armored.encode("utf-8", "replace"))
        primary, components = _components(tuple(PacketPile.from_bytes(bytes(cert))))
        own = _own_packets(primary)
        kept = own(components[0])
        for component in components[1:]:
            uid = component[0].user_id if component[0].tag == Tag.UserID else None
            if component[0].tag == Tag.PublicSubkey or (uid and _naming((uid,), email)):
                kept += own(component)
        return _stored_form(kept)
    except Exception:  # stored keys were read before: at least no user ID in clear
        lines = armored.splitlines()
        return "\n".join(line for line in lines if not line.startswith("Comment:")) + "\n"


def load_signing_key(path: str) -> Signer | None:
    """The key in [openpgp] signing_key_file (armored, no passphrase); None if the setting is ""."""
    if not path.strip():
        return None
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError.of(
            N_("%(setting)s: cannot read %(path)s (%(reason)s)"),
            setting=_SETTING,
            path=path,
            reason=e.strerror or type(e).__name__,
        ) from None
    try:
        tsk = pysequoia.Tsk.from_bytes(data)
        public = tsk.extract_certificate()
        revoked = public.is_revoked
    except Exception as e:  # pysequoia raises RuntimeError for every Sequoia error
        raise ConfigError.of(
            N_("%(setting)s: %(path)s is not one OpenPGP secret key (%(reason)s)"),
            setting=_SETTING,
            path=path,
            reason=_reason(e),
        ) from None
    if bytes(tsk) == bytes(public):
        raise ConfigError.of(
            N_("%(setting)s: %(path)s holds a public key only: export the secret key"),
            setting=_SETTING,
            path=path,
        )
    if revoked:
        raise ConfigError.of(
            N_("%(setting)s: the key in %(path)s has been revoked"), setting=_SETTING, path=path
        )
    try:
        tsk.signer()
    except Exception as e:  # no signing key that is valid now, or one under a passphrase
        raise ConfigError.of(
            N_("%(setting)s: %(path)s has no signing key usable without a passphrase (%(reason)s)"),
            setting=_SETTING,
            path=path,
            reason=_reason(e),
        ) from None
    return Signer(tsk, str(public), public.fingerprint.upper(), bytes(public))


def encrypt_message(
    message: bytes,
    *,
    armored_key: str,
    signer: Signer | None,
    outer_subject: str = OBSCURED_SUBJECT,
    autocrypt: bool = True,
    checked: bool = False,
) -> bytes:
    """PGP/MIME (RFC 3156) with header protection (RFC 9788) around a finished message.

    With `autocrypt=False` a signed message carries no Autocrypt header: to a discreet reader
    the portal's key (its user ID) would name the portal outside the encryption.
    `checked`: the key is one read_key passed when it was stored, and the caller has checked
    its stored expiry (KeyInfo.expires_at: the last usable encryption subkey's, at most the
    key's) against now, so at least one of its encryption subkeys is alive and Sequoia uses
    only live ones. What read_key judged cannot change for the same text but with time, so the
    full parse (most of the cost per message) is skipped; a revocation comes as a new text.
    """
    if checked:
        recipient = _stored_cert(armored_key)
    else:
        key = _parse(armored_key.encode("utf-8", "replace"), email=None)
        # Sequoia judges keys at the time of day, so we do: never fall back to an expired key.
        now = datetime.now(UTC)
        if (problem := _check(key, email=None, now=now)) is not None:
            raise problem
        recipient = _recipient(key, tuple(sub.fingerprint for sub in _usable(key, now)))

    head, blank, body = message.partition(b"\r\n\r\n")
    if not blank:
        raise PermanentDeliveryError("not sent: the message to encrypt has no header section")
    outside: list[bytes] = []  # the outer header fields, but for the structure
    protected: list[bytes] = []  # the original header fields, but for the structure
    structure: list[bytes] = []  # the original Content-* fields
    for field in _fields(head):
        name = _field_name(field)
        if name == "mime-version":
            continue
        if name.startswith("content-"):
            structure.append(field + b'; hp="cipher"' if name == "content-type" else field)
        elif not (name == "autocrypt" and signer is not None):  # ours replaces it
            protected.append(field)
            outside.append(_subject_field(outer_subject) if name == "subject" else field)
    if not any(_field_name(field) == "content-type" for field in structure):
        structure.insert(0, b'Content-Type: text/plain; charset="us-ascii"; hp="cipher"')
    # RFC 9788 2.2: one HP-Outer for each non-structural field the outside shows. The Autocrypt
    # field is added after, as DKIM-Signature is: it describes our key, not the message.
    hp_outer = [b"HP-Outer: " + field for field in outside]
    payload = b"\r\n".join(structure + protected + hp_outer) + b"\r\n\r\n" + body

    signing = signer._signing() if signer is not None else None  # ConfigError if it cannot
    try:
        sealed = pysequoia.encrypt(payload, [recipient], signer=signing)
    except Exception as e:  # pysequoia raises RuntimeError for every Sequoia error
        raise _problem(
            "no_encryption", N_("this key cannot be used (%(reason)s)"), reason=_reason(e)
        ) from None
    sealed = sealed.replace(b"\r\n", b"\n").rstrip(b"\n").replace(b"\n", b"\r\n")

    if signer is not None and autocrypt:
        sender = parseaddr(_field_value(protected, "from"))[1]
        if sender:
            outside.append(b"Autocrypt: " + signer.autocrypt_header(sender).encode("ascii"))
    # "=_" can be in neither base64 nor an armor line, so the boundary never occurs in the parts.
    boundary = b"=_" + secrets.token_hex(16).encode("ascii")
    outside += [
        b"MIME-Version: 1.0",
        b'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted";\r\n'
        b' boundary="' + boundary + b'"',
    ]
    parts = [
        b"This is an OpenPGP/MIME encrypted message (RFC 4880 and 3156)",
        b"--" + boundary,
        b"Content-Type: application/pgp-encrypted",
        b"Content-Description: PGP/MIME version identification",
        b"",
        b"Version: 1",
        b"",
        b"--" + boundary,
        b'Content-Type: application/octet-stream; name="encrypted.asc"',
        b"Content-Description: OpenPGP encrypted message",
        b'Content-Disposition: inline; filename="encrypted.asc"',
        b"",
        sealed,
        b"--" + boundary + b"--",
        b"",
    ]
    return b"\r\n".join(outside) + b"\r\n\r\n" + b"\r\n".join(parts)


# --- the checks ------------------------------------------------------------------------------


def _check(key: _Key, *, email: str | None, now: datetime) -> KeyProblem | None:
    """The first check the key fails at `now` (the address too, unless email is None)."""
    if key.revoked:
        return _problem("revoked", N_("this key has been revoked"))
    if key.expires_at is not None and key.expires_at <= now:
        return _problem("expired", N_("this key expired on %(date)s"), date=_day(key.expires_at))
    if email is not None and not key.named:
        addresses = [address for uid in key.user_ids if (address := _address(uid)) is not None]
        named = ", ".join(addresses or key.user_ids) or "no address"
        return _problem(
            "wrong_address",
            N_("this key is not for %(email)s (it names %(named)s)"),
            email=_printable(email),
            named=_printable(named),
        )
    if not key.primary_encrypts and not key.subkeys:
        return _problem("no_encryption", N_("this key has no usable encryption subkey"))
    if not key.primary_encrypts and not _usable(key, now):
        last = max(sub.expires_at for sub in key.subkeys if sub.expires_at is not None)
        return _problem(
            "expired",
            N_("the encryption subkey of this key expired on %(date)s"),
            date=_day(last),
        )
    return None


def _naming(user_ids: tuple[str, ...], email: str | None) -> tuple[str, ...]:
    """The user IDs whose address is `email` (in any form); all of them when email is None."""
    if email is None:
        return user_ids
    wanted = email.strip().lower()
    return tuple(
        uid
        for uid in user_ids
        if (address := _address(uid)) is not None
        and (address == wanted or _same_mailbox(wanted, [address]))
    )


def _same_mailbox(wanted: str, addresses: list[str]) -> bool:
    """Whether one of the addresses is `wanted` in another form: an internationalised domain
    as Unicode (as gpg writes what the reader typed) where we store its xn-- form, or back."""
    forms = set(stored_forms(wanted))
    # No stored address is longer than 254 characters: a longer user ID is not checked further.
    return any(
        forms.intersection(stored_forms(address))
        for address in addresses
        if len(address) <= 254 and (not address.isascii() or "xn--" in address)
    )


def _usable(key: _Key, now: datetime) -> tuple[_Subkey, ...]:
    """The encryption subkeys that have not expired at `now`."""
    return tuple(sub for sub in key.subkeys if sub.expires_at is None or sub.expires_at > now)


def _expires_at(key: _Key, now: datetime) -> datetime | None:
    """When the key stops being usable: it expires, or its last encryption subkey does."""
    ends = [sub.expires_at for sub in _usable(key, now)]
    if key.primary_encrypts or None in ends:
        last = None  # the primary key, or a subkey that never expires, lasts as long as the key
    else:
        last = max((end for end in ends if end is not None), default=None)
    return min((end for end in (key.expires_at, last) if end is not None), default=None)


def _address(user_id: str) -> str | None:
    """The address in "Name <addr>", "<addr>" or a bare "addr", in lower case; else None."""
    uid = user_id.strip()
    if uid.endswith(">") and "<" in uid:
        return uid[uid.rfind("<") + 1 : -1].strip().lower()
    if "@" in uid and not any(c.isspace() for c in uid):
        return uid.lower()
    return None


# --- parsing ---------------------------------------------------------------------------------


def _parse(data: bytes, *, email: str | None) -> _Key:
    """One public certificate from what a reader gave; KeyProblem if it is not exactly that.

    Only what names the reader is judged and kept: the primary key, the user IDs with their
    address, the subkeys, each with its self-signatures. Other user IDs (another name, a work
    address) and signatures of others' making are dropped.
    """
    try:
        certs = pysequoia.Cert.split_bytes(data)
    except Exception as e:  # pysequoia raises RuntimeError for every Sequoia error
        raise _problem(
            "unreadable",
            N_("this is not an OpenPGP public key (%(reason)s)"),
            reason=_reason(e),
        ) from None
    if not certs:
        raise _problem("unreadable", N_("this is not an OpenPGP public key (no key found)"))
    if len(certs) > 1:
        raise _problem(
            "several", N_("this holds %(count)s keys: give only your own"), count=len(certs)
        )
    if _holds_secrets(data):
        raise _problem(
            "secret",
            N_("this is a secret key: give your public key, and keep the secret one to yourself"),
        )
    cert = certs[0]
    try:
        packets = tuple(PacketPile.from_bytes(bytes(cert)))
        _within_limits(packets)
        user_ids = tuple(str(uid) for uid in cert.user_ids)  # each checked once, here
        named = _naming(user_ids, email)
        primary, components = _components(packets)
        own = _own_packets(primary)
        head = [*own(components[0])]
        for component in components[1:]:
            if component[0].tag == Tag.UserID and component[0].user_id in named:
                head += own(component)
        if not named:  # not the reader's key: judged as a whole, no subkey tried
            return _Key(
                fingerprint=cert.fingerprint.upper(),
                user_ids=user_ids,
                named=(),
                revoked=cert.is_revoked,
                expires_at=_earliest(
                    cert.expiration, _revoked_from(head, SignatureType.KeyRevocation)
                ),
                primary_encrypts=False,
                head=tuple(head),
                subkeys=(),
            )
        signatures = sum(1 for packet in head if packet.tag == Tag.Signature)
        if signatures > MAX_SELF_SIGNATURES:
            raise _limit_problem("self-signatures", signatures, MAX_SELF_SIGNATURES)
        mine = pysequoia.Cert.from_packets(head)  # judged as it is kept
        groups = [tuple(own(c)) for c in components[1:] if c[0].tag == Tag.PublicSubkey]
        return _Key(
            fingerprint=cert.fingerprint.upper(),
            user_ids=user_ids,
            named=named,
            revoked=mine.is_revoked,
            expires_at=_earliest(mine.expiration, _revoked_from(head, SignatureType.KeyRevocation)),
            primary_encrypts=_encrypts(head),
            head=tuple(head),
            subkeys=tuple(sub for group in groups if (sub := _subkey(tuple(head), group))),
        )
    except KeyProblem:
        raise
    except Exception as e:  # e.g. no self-signature Sequoia's policy accepts, odd packets
        raise _problem(
            "unreadable", N_("this key cannot be used (%(reason)s)"), reason=_reason(e)
        ) from None


def _within_limits(packets: Sequence[Packet]) -> None:
    """KeyProblem if the key has more subkeys, bindings or user IDs than any real key."""
    subkeys = sum(1 for p in packets if p.tag == Tag.PublicSubkey)
    bindings = sum(
        1
        for p in packets
        if p.tag == Tag.Signature and p.signature_type == SignatureType.SubkeyBinding
    )
    user_ids = sum(1 for p in packets if p.tag in (Tag.UserID, Tag.UserAttribute))
    if bindings > MAX_SUBKEY_BINDINGS:
        raise _limit_problem("subkey bindings", bindings, MAX_SUBKEY_BINDINGS)
    if subkeys > MAX_SUBKEYS:
        raise _limit_problem("subkeys", subkeys, MAX_SUBKEYS)
    if user_ids > MAX_USER_IDS:
        raise _limit_problem("user IDs", user_ids, MAX_USER_IDS)


def _limit_problem(what: str, count: int, limit: int) -> KeyProblem:
    return _problem(
        "unreadable",
        N_("this key cannot be used (%(reason)s)"),
        reason=f"{count} {what}; at most {limit}",
    )


def _own_packets(primary: Packet) -> Callable[[Sequence[Packet]], list[Packet]]:
    """A filter keeping a component (its first packet) and the signatures the primary key made.

    A signature naming no issuer is kept: Sequoia tries it as a self-signature.
    """
    fingerprint, key_id = primary.fingerprint, primary.key_id

    def own(component: Sequence[Packet]) -> list[Packet]:
        return [component[0]] + [
            sig
            for sig in component[1:]
            if sig.tag == Tag.Signature
            and sig.issuer_fingerprint in (None, fingerprint)
            and sig.issuer_key_id in (None, key_id)
        ]

    return own


def _kept_packets(key: _Key, now: datetime) -> list[Packet]:
    """What is kept of a key: its head and the encryption subkeys usable at `now`."""
    return list(key.head) + [p for sub in _usable(key, now) for p in sub.packets]


def _stored_form(packets: Sequence[Packet]) -> str:
    """These packets as one certificate, armored without the Comment lines Sequoia adds (each
    user ID in clear, which a discreet reader's export must not show)."""
    try:
        data = bytes(pysequoia.Cert.from_packets(packets))
    except Exception as e:  # pysequoia raises RuntimeError for every Sequoia error
        raise _problem(
            "unreadable", N_("this key cannot be used (%(reason)s)"), reason=_reason(e)
        ) from None
    text = base64.b64encode(data).decode("ascii")
    crc = base64.b64encode(_crc24(data).to_bytes(3, "big")).decode("ascii")
    lines = [text[i : i + 64] for i in range(0, len(text), 64)]
    begin, end = "-----BEGIN PGP PUBLIC KEY BLOCK-----", "-----END PGP PUBLIC KEY BLOCK-----"
    return "\n".join([begin, "", *lines, "=" + crc, end, ""])


def _crc24(data: bytes) -> int:
    """The armor checksum (RFC 4880 6.1)."""
    crc = 0xB704CE
    for byte in data:
        crc ^= byte << 16
        for _ in range(8):
            crc <<= 1
            if crc & 0x1000000:
                crc ^= 0x1864CFB
    return crc & 0xFFFFFF


def _recheck_at(packets: Sequence[Packet], now: datetime) -> datetime | None:
    """When the first kept self-signature dated after `now` counts, if within RECHECK_HORIZON."""
    times = [p.signature_created for p in packets if p.tag == Tag.Signature]
    return min((t for t in times if t and now < t <= now + RECHECK_HORIZON), default=None)


def _revoked_from(packets: Sequence[Packet], kind: SignatureType) -> datetime | None:
    """The earliest time a revocation among these packets takes effect.

    Sequoia counts a revocation dated in the future (a "soft" one: superseded, retired) only
    from then, so a key valid now is revoked later: that time is an expiry for our checks, which
    the sender reads from the stored expiry instead of parsing the key again. Counted whether or
    not it verifies: a bogus one can only end a key sooner.
    """
    times = [p.signature_created for p in packets if p.tag == Tag.Signature]
    kinds = [p.signature_type for p in packets if p.tag == Tag.Signature]
    return min((t for t, k in zip(times, kinds, strict=True) if k == kind and t), default=None)


def _earliest(*moments: datetime | None) -> datetime | None:
    return min((m for m in moments if m is not None), default=None)


def _stored_cert(armored: str) -> pysequoia.Cert:
    """A stored key as Sequoia's certificate, without the checks (see encrypt_message)."""
    try:
        return pysequoia.Cert.from_bytes(armored.encode("utf-8", "replace"))
    except Exception as e:  # pysequoia raises RuntimeError for every Sequoia error
        raise _problem(
            "unreadable", N_("this key cannot be used (%(reason)s)"), reason=_reason(e)
        ) from None


def _holds_secrets(data: bytes) -> bool:
    """Whether the (first) key in the data carries secret key material."""
    try:
        packets = PacketPile.from_bytes(data)
        return any(packet.tag in (Tag.SecretKey, Tag.SecretSubkey) for packet in packets)
    except Exception:  # split_bytes read it: a failure here (an odd packet) is no secret found
        return False


def _components(packets: Sequence[Packet]) -> tuple[Packet, list[tuple[Packet, ...]]]:
    """The primary key, then each component (the primary key, a user ID or attribute, a
    subkey) with the signatures that follow it."""
    components: list[list[Packet]] = []
    for packet in packets:
        if packet.tag == Tag.Signature and components:
            components[-1].append(packet)
        else:
            components.append([packet])
    if not components or components[0][0].tag != Tag.PublicKey:
        raise ValueError("no primary key first")
    return components[0][0], [tuple(c) for c in components]


def _subkey(head: tuple[Packet, ...], group: tuple[Packet, ...]) -> _Subkey | None:
    """The subkey as an encryption key, or None if Sequoia would not encrypt to it."""
    if not _encrypts(head + group):
        return None
    key = group[0]
    bindings = [sig for sig in group[1:] if sig.signature_type == SignatureType.SubkeyBinding]
    # Sequoia goes by the newest valid binding; a later one (a new expiry) must be checked alone.
    if len(bindings) > 1:
        bindings = [sig for sig in bindings if _encrypts((*head, key, sig))]
    if not bindings or key.fingerprint is None:
        return None
    binding = max(
        bindings, key=lambda sig: sig.signature_created or datetime.min.replace(tzinfo=UTC)
    )
    ends = [binding.signature_expiration_time, _revoked_from(group, SignatureType.SubkeyRevocation)]
    created, period = key.key_created, binding.key_validity_period
    if created is not None and period:  # a period of 0 means it does not expire
        ends.append(created + period)
    expires_at = min((end for end in ends if end is not None), default=None)
    return _Subkey(key.fingerprint.upper(), expires_at, group)


def _encrypts(packets: Sequence[Packet]) -> bool:
    """Whether Sequoia finds a valid, unrevoked encryption key among these packets."""
    try:
        pysequoia.encrypt(b"", [pysequoia.Cert.from_packets(packets)], armor=False)
    except Exception:  # "No suitable encryption subkey", or packets that make no certificate
        return False
    return True


def _recipient(key: _Key, fingerprints: tuple[str, ...]) -> pysequoia.Cert:
    """The reader's certificate with only these encryption subkeys, the ones usable now."""
    packets = list(key.head)
    for sub in key.subkeys:
        if sub.fingerprint in fingerprints:
            packets += sub.packets
    return pysequoia.Cert.from_packets(packets)


# --- small helpers ---------------------------------------------------------------------------


def _problem(code: str, template: str, /, **params: object) -> KeyProblem:
    problem = KeyProblem.of(template, **params)
    problem.code = code
    return problem


def _too_large(size: int) -> KeyProblem:
    return _problem(
        "too_large",
        N_("this key is too large (%(size)s KB; at most %(limit)s KB)"),
        size=-(-size // 1024),
        limit=MAX_KEY_BYTES // 1024,
    )


def _day(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d")


def _printable(text: str, limit: int = _SHOWN_CHARS) -> str:
    """Outside text made safe to show on one line: no control or format characters, cut short."""
    kept = "".join(" " if unicodedata.category(c).startswith("C") else c for c in text)
    shown = " ".join(kept.split())
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


def _reason(error: Exception) -> str:
    """The first line of a pysequoia error (the rest is a Rust backtrace), safe to show."""
    lines = str(error).strip().splitlines()
    return _printable(lines[0] if lines else type(error).__name__)


def _fields(head: bytes) -> list[bytes]:
    """The header fields of a header section, each with its folded lines as they are."""
    fields: list[bytes] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += b"\r\n" + line
        else:
            fields.append(line)
    return fields


def _field_name(field: bytes) -> str:
    return field.partition(b":")[0].strip().decode("ascii", "replace").lower()


def _field_value(fields: list[bytes], name: str) -> str:
    """The unfolded value of the first field of this name, or ""."""
    for field in fields:
        if _field_name(field) == name:
            value = field.partition(b":")[2].replace(b"\r\n", b"")
            return value.decode("ascii", "replace").strip()
    return ""


def _subject_field(subject: str) -> bytes:
    """A Subject field as the sender writes one (message.set_subject: RFC 2047 if need be)."""
    msg = EmailMessage(policy=POLICY)
    set_subject(msg, subject)
    return msg.as_bytes().rstrip(b"\r\n")
