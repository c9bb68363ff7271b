"""Optional DKIM signing (dkimpy): one signature per message, over the headers we promise."""

from __future__ import annotations

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
    if not conf.key_file:
        return None
    try:
        key = Path(conf.key_file).read_bytes()
    except OSError as e:
        raise ConfigError(f"{settings.source_path}: cannot read 'dkim.key_file': {e}") from None
    domain = conf.domain or settings.mail.from_address.rpartition("@")[2]
    signer = DkimSigner(selector=conf.selector, domain=domain, private_key=key)
    try:
        signer.sign(b"From: check@" + domain.encode() + b"\r\n\r\nkey check\r\n")
    except dkimpy.KeyFormatError as e:
        raise ConfigError(
            f"{settings.source_path}: 'dkim.key_file' is not an RSA key: {e}"
        ) from None
    return signer
