"""What staff give a case: its targets (a TOML file) and its sample letters (a text per language).

Pure functions from text to checked values; every refusal is one line naming the file and the
place. Targets and letters are shown to readers and put into mailto: links, so each value is
one clean line (a postal address: a few), with no markup, controls or bidirectional tricks.
"""

from __future__ import annotations

import tomllib
import unicodedata
from dataclasses import asdict, dataclass
from typing import Any

from newsletter.addresses import normalise_email
from newsletter.config import LANGUAGES
from newsletter.errors import AudienceError, CampaignError
from newsletter.sanitize import clean_line

MAX_TARGETS = 20
MAX_POSTAL_LINES = 8
MAX_LETTER_CHARS = 8000
MAX_FILE_BYTES = 256 * 1024
TARGET_FIELDS = ("name", "title", "email", "postal", "salutation", "language")


@dataclass(frozen=True)
class Target:
    """Someone readers are asked to write to, and how."""

    name: str
    title: str = ""
    email: str = ""
    postal: str = ""  # lines joined by "\n"
    salutation: str = ""
    language: str = ""  # the languages they read, as given ("be, ru"); shown as a hint

    def as_dict(self) -> dict[str, str]:
        """The target as stored (ActionCase.targets)."""
        return asdict(self)

    @classmethod
    def of(cls, stored: dict[str, str]) -> Target:
        """A stored target (unknown keys ignored, so an older row still reads)."""
        return cls(**{k: str(stored.get(k, "")) for k in TARGET_FIELDS})


@dataclass(frozen=True)
class Letter:
    """A sample letter in one language: the subject of the mail a reader sends, and its text."""

    subject: str
    body: str


def parse_targets(text: str, *, where: str) -> tuple[Target, ...]:
    """The targets of a TOML file: one [[target]] table each, in order."""
    if len(text.encode("utf-8", "replace")) > MAX_FILE_BYTES:
        raise CampaignError(f"{where}: over {MAX_FILE_BYTES // 1024} KB; not a targets file")
    text = text.removeprefix("\ufeff")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise CampaignError(f"{where}: not valid TOML: {e}") from None
    except RecursionError:  # arrays nested thousands deep
        raise CampaignError(f"{where}: not valid TOML: nested too deep") from None
    extra = set(data) - {"target"}
    if extra:
        raise CampaignError(f"{where}: unknown key {sorted(extra)[0]!r}; expected [[target]]")
    tables = data.get("target", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise CampaignError(f"{where}: expected [[target]] tables")
    if not tables:
        raise CampaignError(f"{where}: no [[target]] in it")
    if len(tables) > MAX_TARGETS:
        raise CampaignError(f"{where}: {len(tables)} targets, over the limit of {MAX_TARGETS}")
    return tuple(_target(t, where=f"{where}: target {n}") for n, t in enumerate(tables, 1))


def _target(table: dict[str, Any], *, where: str) -> Target:
    unknown = set(table) - set(TARGET_FIELDS)
    if unknown:
        raise CampaignError(
            f"{where}: unknown field {sorted(unknown)[0]!r}; expected {', '.join(TARGET_FIELDS)}"
        )
    if not all(isinstance(v, str) for v in table.values()):
        raise CampaignError(f"{where}: every field must be a string")
    name = clean_line(table.get("name", ""), max_length=200)
    if not name:
        raise CampaignError(f"{where}: no name")
    email = ""
    if table.get("email", "").strip():
        try:
            email = normalise_email(table["email"])
        except AudienceError as e:
            raise CampaignError(f"{where} ({name}): {e}") from None
    postal = "\n".join(
        line
        for line in (clean_line(raw, max_length=200) for raw in table.get("postal", "").split("\n"))
        if line
    )
    if postal.count("\n") >= MAX_POSTAL_LINES:
        raise CampaignError(f"{where} ({name}): a postal address of over {MAX_POSTAL_LINES} lines")
    if not (email or postal):
        raise CampaignError(f"{where} ({name}): give an email or a postal address")
    return Target(
        name=name,
        title=clean_line(table.get("title", ""), max_length=300),
        email=email,
        postal=postal,
        salutation=clean_line(table.get("salutation", ""), max_length=200),
        language=clean_line(table.get("language", ""), max_length=50),
    )


def parse_letter(text: str, *, where: str, default_subject: str) -> Letter:
    """A letter file: an optional first line "Subject: ...", then the text (blank lines kept)."""
    if len(text.encode("utf-8")) > MAX_FILE_BYTES:
        raise CampaignError(f"{where}: over {MAX_FILE_BYTES // 1024} KB; not a letter")
    text = text.removeprefix("\ufeff")  # a byte order mark, as Windows editors write
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    subject = default_subject
    if lines and lines[0].lower().startswith("subject:"):
        subject = lines.pop(0).partition(":")[2]
    subject = clean_line(subject, max_length=200)
    body = "\n".join(_clean_line(line) for line in lines).strip("\n")
    while "\n\n\n" in body:  # at most one blank line between paragraphs
        body = body.replace("\n\n\n", "\n\n")
    if not body.strip():
        raise CampaignError(f"{where}: the letter is empty")
    if len(body) > MAX_LETTER_CHARS:
        raise CampaignError(
            f"{where}: {len(body)} characters, over the limit of {MAX_LETTER_CHARS} "
            "(a mail client cannot open a longer letter from a link)"
        )
    return Letter(subject=subject or default_subject, body=body)


# Noncharacters the MJML renderer refuses (sanitize.clean_line drops them too): a letter with one
# would make every message of the case fail to render.
_NONCHARACTERS = "\ufffe\uffff"


def _clean_line(line: str) -> str:
    """One line of a letter: no controls, format, bidirectional or noncharacters; tabs as spaces."""
    kept = (
        " " if c == "\t" else c
        for c in line
        if c == "\t"
        or (
            unicodedata.category(c) not in ("Cc", "Cf", "Cs", "Zl", "Zp")
            and c not in _NONCHARACTERS
        )
    )
    return "".join(kept).rstrip()


def parse_letter_option(value: str) -> tuple[str, str]:
    """`--letter LANG=FILE` as (lang, path); the language must be one the service renders."""
    lang, sep, path = value.partition("=")
    lang = lang.strip().lower()
    if not sep or not path.strip():
        raise CampaignError(f"--letter {value!r}: expected LANG=FILE, e.g. be=letter-be.txt")
    if lang not in LANGUAGES:
        raise CampaignError(f"--letter {value!r}: language must be one of {', '.join(LANGUAGES)}")
    return lang, path.strip()
