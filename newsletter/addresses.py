"""Email addresses: the form the sender delivers, and every form one may be stored under.

Used wherever an address comes in (the command line, CSV import) or is looked up (find,
unsubscribe, forget, suppression). Syntax only: no DNS lookups.
"""

from __future__ import annotations

from email_validator import EmailNotValidError, ValidatedEmail, validate_email

from newsletter.errors import AudienceError

# What an address may hold: printable ASCII without the characters a header would need to quote.
_ADDRESS_CHARS = frozenset(map(chr, range(0x21, 0x7F))) - frozenset('<>()[],;:"\\')
NEEDS_SMTPUTF8 = (
    "the part before @ is not plain ASCII: such an address needs SMTPUTF8, "
    "which this service does not send"
)


def header_problem(address: str) -> str | None:
    """Why an address cannot be carried in a mail header as it is, or None if it can.

    One rule for import and for the sender (message.format_to), so nothing accepted is refused
    at send time. "=?" starts an RFC 2047 encoded-word, which mail clients decode even in an
    address; an address cannot be encoded, so it is refused.
    """
    if not address or "@" not in address or not _ADDRESS_CHARS.issuperset(address):
        return "unusable address (not plain ASCII)"
    if "=?" in address:
        return "unusable address (looks like an RFC 2047 encoded-word)"
    return None


def _validated(raw: str) -> ValidatedEmail:
    """email-validator's verdict on an address (syntax only, no DNS)."""
    try:
        return validate_email(raw.strip(), check_deliverability=False)
    except EmailNotValidError as e:
        raise AudienceError(f"invalid address: {e}") from None


def address_forms(raw: str) -> tuple[str, ...]:
    """The deliverable form of an address, then the older form it may be stored under.

    An internationalised domain becomes its IDNA A-label (xn--...), which plain SMTP carries.
    Before that rule the Unicode form was stored; it is returned second, so that lookups and
    suppression checks still find people imported then.
    """
    info = _validated(raw)
    if info.ascii_email is None:
        raise AudienceError(NEEDS_SMTPUTF8)
    address = info.ascii_email.lower()
    if (problem := header_problem(address)) is not None:
        raise AudienceError(f"invalid address: {problem}")
    older = info.normalized.lower()
    return (address,) if older == address else (address, older)


def normalise_email(raw: str) -> str:
    """Check an address (no DNS) and return the form the sender delivers, or say why not."""
    return address_forms(raw)[0]


def lookup_forms(raw: str) -> tuple[str, ...]:
    """Every form an address may be stored under, also one no longer accepted (to find,
    unsubscribe or forget someone added before the rules above)."""
    info = _validated(raw)
    forms = [info.ascii_email.lower()] if info.ascii_email else []
    return tuple(dict.fromkeys([*forms, info.normalized.lower()]))


def stored_forms(address: str) -> tuple[str, ...]:
    """An address from the database in every form it may have had; itself if it is odd."""
    try:
        return tuple(dict.fromkeys((address, *lookup_forms(address))))
    except AudienceError:
        return (address,)
