"""Real keys for the OpenPGP tests: GnuPG in a temporary GNUPGHOME, and Sequoia.

GnuPG is what most readers use, so their keys are made and their mail is read by gpg itself
(`--batch --pinentry-mode loopback` with an empty passphrase, so nothing prompts). A key in the
past (an expired one) is made with `--faked-system-time`, as gpg refuses an expiry in the past.
Every other key is made a minute before the real time (MADE_BEFORE), so that a test clock read
before the key was made never finds its signatures dated later (which would count only from
then, KeyInfo.recheck_at) when the making crosses a second.
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pysequoia
import pytest

from tests.conftest import IN_CI

STATUS = "[GNUPG:] "
MADE_BEFORE = timedelta(minutes=1)


def require_gpg() -> str:
    """GnuPG for the OpenPGP tests: skipped locally when absent, a failure in CI."""
    path = shutil.which("gpg") or ""
    if path:
        return path
    reason = "gpg not installed (apt-get install gnupg)"
    if IN_CI:
        pytest.fail(reason + " — CI must provide it")
    pytest.skip(reason)


@dataclass(frozen=True)
class Decrypted:
    plaintext: bytes
    status: list[str]  # gpg's status lines, without the "[GNUPG:] " prefix

    def lines(self, keyword: str) -> list[list[str]]:
        """The arguments of each status line with this keyword (e.g. VALIDSIG, ENC_TO)."""
        return [line.split()[1:] for line in self.status if line.split()[0] == keyword]


@dataclass(frozen=True)
class GpgHome:
    """One GnuPG home directory, as a reader (or the portal) would have it."""

    gpg: str
    home: Path

    @classmethod
    def make(cls, path: Path) -> GpgHome:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        return cls(require_gpg(), path)

    def run(self, *args: str, data: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        """gpg with these arguments in this home; raises with gpg's stderr if it fails."""
        command = [self.gpg, "--homedir", str(self.home), "--batch", "--no-tty"]
        command += ["--pinentry-mode", "loopback", "--passphrase", "", *args]
        done = subprocess.run(command, input=data, capture_output=True, timeout=60, check=False)
        if done.returncode != 0:
            raise AssertionError(f"gpg {' '.join(args)} failed: {done.stderr.decode()}")
        return done

    def generate(
        self,
        uid: str,
        algo: str = "ed25519",
        usage: str = "cert",
        expire: str = "1y",
        *,
        at: str = "",
    ) -> str:
        """A new primary key (at a faked time "YYYYmmddTHHMMSS" if given); its fingerprint."""
        done = self.run(
            "--status-fd", "1", *_faked(at), "--quick-gen-key", uid, algo, usage, expire
        )
        created = [line.split() for line in done.stdout.decode().splitlines()]
        return next(words[3] for words in created if words[1:3] == ["KEY_CREATED", "P"])

    def add_key(
        self,
        fpr: str,
        algo: str = "cv25519",
        usage: str = "encr",
        expire: str = "1y",
        *,
        at: str = "",
    ) -> None:
        """A new subkey (an encryption one by default) on the key `fpr`."""
        self.run(*_faked(at), "--quick-add-key", fpr, algo, usage, expire)

    def subkeys(self, fpr: str) -> list[tuple[str, datetime | None, str]]:
        """Each subkey's fingerprint, expiry and validity ("e" expired, "r" revoked...) to gpg."""
        listing = self.run("--with-colons", "--list-keys", fpr).stdout.decode().splitlines()
        out: list[tuple[str, datetime | None, str]] = []
        for line, following in itertools.pairwise(listing):
            if line.startswith("sub:"):
                fields = line.split(":")
                out.append((following.split(":")[9], _epoch(fields[6]), fields[1]))
        return out

    def expiry(self, fpr: str) -> datetime | None:
        """The primary key's expiry, as gpg sees it."""
        listing = self.run("--with-colons", "--list-keys", fpr).stdout.decode()
        pub = next(line for line in listing.splitlines() if line.startswith("pub:"))
        return _epoch(pub.split(":")[6])

    def export(self, fpr: str) -> str:
        """The armored public key."""
        return self.run("--armor", "--export", fpr).stdout.decode()

    def export_secret(self, fpr: str) -> str:
        """The armored secret key (made without a passphrase)."""
        return self.run("--armor", "--export-secret-keys", fpr).stdout.decode()

    def import_key(self, key: bytes | str) -> list[str]:
        """Import a key; the fingerprints gpg reports importing (IMPORT_OK)."""
        data = key.encode() if isinstance(key, str) else key
        status = self.run("--status-fd", "1", "--import", data=data).stdout.decode()
        return [
            line.split()[3] for line in status.splitlines() if line.startswith(STATUS + "IMPORT_OK")
        ]

    def revoke(self, fpr: str) -> None:
        """Revoke the key with the revocation certificate gpg made when it made the key."""
        text = (self.home / "openpgp-revocs.d" / f"{fpr}.rev").read_text()
        # gpg writes it with ":-----BEGIN", so that it is not imported by mistake.
        self.import_key(text.replace(":-----BEGIN", "-----BEGIN"))

    def revoke_uid(self, fpr: str, uid: str) -> None:
        self.run("--quick-revoke-uid", fpr, uid)

    def revoke_subkey(self, fpr: str, index: int) -> None:
        """Revoke the index-th subkey (1 is the first) through --edit-key's prompts."""
        answers = f"key {index}\nrevkey\ny\n0\n\ny\nsave\n"
        self.run("--command-fd", "0", "--edit-key", fpr, data=answers.encode())

    def decrypt(self, message: bytes) -> Decrypted:
        """gpg --decrypt: the plaintext and the status lines (ENC_TO, VALIDSIG, ...)."""
        done = self.run("--status-fd", "2", "--decrypt", data=message)
        status = [
            line.removeprefix(STATUS)
            for line in done.stderr.decode("utf-8", "replace").splitlines()
            if line.startswith(STATUS)
        ]
        return Decrypted(done.stdout, status)

    def close(self) -> None:
        """Stop the gpg-agent this home started (only this home's)."""
        gpgconf = shutil.which("gpgconf")
        if gpgconf:
            subprocess.run(
                [gpgconf, "--homedir", str(self.home), "--kill", "gpg-agent"],
                capture_output=True,
                timeout=30,
                check=False,
            )


def _faked(at: str) -> list[str]:
    """gpg's clock: the time given, else a running clock a minute behind the real one."""
    return ["--faked-system-time", at or gpg_time(datetime.now(UTC) - MADE_BEFORE)]


def _epoch(value: str) -> datetime | None:
    return datetime.fromtimestamp(int(value), UTC) if value else None


def gpg_time(moment: datetime) -> str:
    """A time for --faked-system-time (gpg reads it as UTC)."""
    return moment.astimezone(UTC).strftime("%Y%m%dT%H%M%S")


# --- Sequoia ---------------------------------------------------------------------------------


def sequoia_key(uid: str, *, days: int = 365) -> pysequoia.Tsk:
    """A new key made by Sequoia: certification primary, signing and encryption subkeys."""
    return pysequoia.Tsk.generate(user_id=uid, validity_seconds=days * 86400)


def sequoia_decrypt(tsk: pysequoia.Tsk, message: bytes) -> bytes:
    """Decrypt with Sequoia and the secret key."""
    plaintext = pysequoia.decrypt(message, decryptor=tsk.decryptor()).bytes
    assert plaintext is not None
    return plaintext
