"""Optional DKIM signing (dkimpy): one signature per message, over the headers we promise."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import dkim as dkimpy

from newsletter.config import Settings
from newsletter.errors import ConfigError

SIGNED_HEADERS = (
    b"From",
    b"To",
    b"Subject",
    b"Date",
    b"Message-ID",
    b"In-Reply-To",
    b"References",
    b"List-Id",
    b"List-Unsubscribe",
    b"List-Unsubscribe-Post",
    b"MIME-Version",
    b"Content-Type",
)


class DkimSigner:
    """Signs finished message bytes with one key, selector and domain."""

    def __init__(self, *, selector: str, domain: str, private_key: bytes) -> None:
        self.selector = selector.encode("ascii")
        self.domain = domain.encode("ascii")
        self.private_key = private_key

    def sign(self, message: bytes) -> bytes:
        """The message with a DKIM-Signature header in front (relaxed/relaxed, rsa-sha256)."""
        signature = dkimpy.sign(
            message,
            self.selector,
            self.domain,
            self.private_key,
            canonicalize=(b"relaxed", b"relaxed"),
            include_headers=list(SIGNED_HEADERS),
            linesep=b"\r\n",
        )
        return bytes(signature) + message


def load_signer(settings: Settings) -> DkimSigner | None:
    """The configured signer, or None when [dkim] key_file is empty."""
    conf = settings.dkim
    domain = conf.domain or settings.mail.from_address.rpartition("@")[2]
    return _load(settings, "dkim.key_file", conf.key_file, conf.selector, domain)


def load_discreet_signer(settings: Settings) -> DkimSigner | None:
    """The neutral identity's signer ([discreet] dkim_*), or None when it has no key file."""
    conf = settings.discreet
    domain = conf.dkim_domain or conf.from_address.rpartition("@")[2]
    return _load(settings, "discreet.dkim_key_file", conf.dkim_key_file, conf.dkim_selector, domain)


def _load(
    settings: Settings, key_name: str, key_file: str, selector: str, domain: str
) -> DkimSigner | None:
    if not key_file:
        return None
    try:
        key = Path(key_file).read_bytes()
    except OSError as e:
        raise ConfigError(f"{settings.source_path}: cannot read '{key_name}': {e}") from None
    if not (selector.isascii() and domain.isascii()):  # d= and s= are DNS names in ASCII
        named = "dkim.selector" if key_name == "dkim.key_file" else "discreet.dkim_selector"
        raise ConfigError(
            f"{settings.source_path}: '{named}' and the signing domain must be ASCII"
            " (a domain as IDNA A-labels)"
        )
    signer = DkimSigner(selector=selector, domain=domain, private_key=key)
    try:
        signer.sign(b"From: check@" + domain.encode() + b"\r\n\r\nkey check\r\n")
    except (dkimpy.DKIMException, ValueError) as e:  # ValueError: a PEM body not in base64
        raise ConfigError(f"{settings.source_path}: '{key_name}' is not an RSA key: {e}") from None
    return signer


@dataclass(frozen=True)
class IdentitySigners:
    """The DKIM signer of each sending identity, the portal's and the discreet one (either may
    be None: that identity's mail goes unsigned)."""

    plain: DkimSigner | None = None
    discreet: DkimSigner | None = None

    @classmethod
    def load(cls, settings: Settings) -> IdentitySigners:
        """Both configured signers."""
        return cls(load_signer(settings), load_discreet_signer(settings))

    def sign(self, message: bytes, *, discreet: bool) -> bytes:
        """The message signed by its identity's key, if that identity has one."""
        signer = self.discreet if discreet else self.plain
        return signer.sign(message) if signer else message
