"""A case as its message templates see it, in one reader's language: pure data, no session.

The templates (email/action.mjml.j2, text/action.txt.j2) get a CaseView as `case`. The "write
now" links are mailto: URIs built here (RFC 6068): the target's address, the letter's subject and
its text (the target's salutation first) percent-encoded as UTF-8, line breaks as %0D%0A.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import date
from urllib.parse import quote

from babel.dates import get_timezone, get_timezone_location

from newsletter.case_files import Letter, Target
from newsletter.db.models import ActionCase, CaseMessage, CaseRole


@dataclass(frozen=True)
class TargetView:
    name: str
    title: str
    email: str
    postal_lines: tuple[str, ...]
    salutation: str
    language: str  # the languages the target reads, as staff gave them ("" = not said)
    mailto: str  # "" when the target has no email address


@dataclass(frozen=True)
class CaseView:
    reference: str  # "UA 12/26"
    role: str  # first | update | reminder | closing
    number: int  # the update's number (1, 2, ...); 0 otherwise
    status: str  # draft | open | updated | closed, when the message was rendered
    outcome: str  # "" | released | improved | no-change | no-further-action
    title: str
    body_html: str  # the case itself (sanitised)
    actions_html: str  # what else readers are asked to do (sanitised); "" = nothing more
    message_html: str  # the update's or closing message's own text (sanitised); "" for others
    person: str  # the person at risk as this copy may name them (initials on a public copy)
    deadline: date | None
    zone: str  # the portal's time zone, in which the deadline is a day ("Europe/Minsk")
    zone_city: str  # its city in the reader's language ("Minsk", "Мінск"), as the emails name it
    targets: tuple[TargetView, ...]
    letter_subject: str
    letter_body: str
    letter_lang: str  # the letter's language when it is not the reader's ("" = theirs)
    wrote: bool  # carry the reader's "I sent my letter" link (first message, emails only)


def mailto_link(address: str, *, subject: str, body: str) -> str:
    """A mailto: URI (RFC 6068) that opens a message to `address` with subject and body filled."""
    crlf = body.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "\r\n")
    # quote(..., safe="") percent-encodes every reserved character, "&", "=", "?" and "#"
    # included, as UTF-8; spaces become %20 (not "+", which mail clients would show).
    to = quote(address, safe="@!$'()*+,;:")
    link = f"mailto:{to}?subject={quote(subject, safe='')}"
    return f"{link}&body={quote(crlf, safe='')}" if crlf else link


# Mail clients open mailto: links up to some length: Outlook on Windows cuts them near 2,000
# characters (the old Internet Explorer URL limit); most others take far more.
MAILTO_COMFORT = 2000


def long_mailto_links(case: ActionCase) -> list[tuple[str, int]]:
    """(language, length) of each letter whose longest "Write now" link is over MAILTO_COMFORT."""
    found = []
    for lang, stored in sorted((case.letters or {}).items()):
        letter = Letter(str(stored.get("subject", "")), str(stored.get("body", "")))
        lengths = [
            len(mailto_link(t.email, subject=letter.subject, body=letter_text(letter, t)))
            for t in (Target.of(s) for s in case.targets or [])
            if t.email
        ]
        if lengths and max(lengths) > MAILTO_COMFORT:
            found.append((lang, max(lengths)))
    return found


def short_mailto_links(case: CaseView) -> CaseView:
    """The view with each "Write now" link carrying the letter's subject only (no body)."""
    targets = tuple(
        replace(
            t, mailto=mailto_link(t.email, subject=case.letter_subject, body="") if t.email else ""
        )
        for t in case.targets
    )
    return replace(case, targets=targets)


def letter_text(letter: Letter, target: Target | None) -> str:
    """The letter as a reader sends it to one target: their salutation, a blank line, the text."""
    if target is None or not target.salutation:
        return letter.body
    return f"{target.salutation}\n\n{letter.body}"


def initials(name: str) -> str:
    """ "Ales Bialiatski" -> "A. B.": what a public copy shows of a person not to be named."""
    return " ".join(f"{word[0]}." for word in name.replace("-", " ").split() if word[0].isalpha())


def zone_city(zone: str, lang: str) -> str:
    """The city of a time zone in a language ("Europe/Minsk", "be" -> "Мінск"), for "Minsk time"."""
    try:
        return str(get_timezone_location(get_timezone(zone), locale=lang, return_city=True))
    except LookupError:  # not a zone Babel knows: its own last part ("Minsk")
        return zone.rsplit("/", 1)[-1].replace("_", " ")


def choose_letter(case: ActionCase, lang: str, default_lang: str) -> tuple[Letter | None, str]:
    """The letter in the reader's language, else the default language's (and which it is)."""
    letters = case.letters or {}
    for want in (lang, default_lang, *sorted(letters)):
        if want in letters:
            stored = letters[want]
            letter = Letter(str(stored.get("subject", "")), str(stored.get("body", "")))
            return letter, "" if want == lang else want
    return None, ""


def make_case_view(
    case: ActionCase,
    message: CaseMessage,
    *,
    lang: str,
    default_lang: str,
    zone: str,
    public: bool,
) -> CaseView:
    """The case in one language, for a reader's email or (public) for the archive's copy."""
    letter, letter_lang = choose_letter(case, lang, default_lang)
    if public and not case.person_public:
        # Letters name the person, in every grammatical case of every language: a public copy
        # of a case whose person is not to be named carries no letter (nor links made of it).
        letter, letter_lang = None, ""
    targets = []
    for stored in case.targets or []:
        target = Target.of(stored)
        mailto = ""
        if target.email and letter is not None:
            mailto = mailto_link(
                target.email, subject=letter.subject, body=letter_text(letter, target)
            )
        targets.append(
            TargetView(
                name=target.name,
                title=target.title,
                email=target.email,
                postal_lines=tuple(line for line in target.postal.split("\n") if line),
                salutation=target.salutation,
                language=target.language,
                mailto=mailto,
            )
        )
    person = case.person if case.person_public or not public else initials(case.person)
    return CaseView(
        reference=case.reference,
        role=message.role,
        number=message.number,
        status=case.status,
        outcome=case.outcome,
        title=case.title,
        body_html=case.body_html,
        actions_html=case.actions_html,
        message_html=message.body_html,
        person=person,
        deadline=case.deadline,
        zone=zone,
        zone_city=zone_city(zone, lang),
        targets=tuple(targets),
        letter_subject=letter.subject if letter else "",
        letter_body=letter.body if letter else "",
        letter_lang=letter_lang,
        wrote=message.role == CaseRole.FIRST and not public,
    )
