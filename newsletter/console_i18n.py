"""The staff console's interface language: the "console" gettext domain, en/be/ru.

Set up as i18n.web_environment is: templates/ with autoescape, StrictUndefined, and the
language's catalogue compiled in memory from templates/locale/LANG/LC_MESSAGES/console.po (none
for English, the source language; a language without a .po yet shows English). Extraction, from
the repository root:

    pybabel extract -F templates/console/babel.cfg -k N_ -o console.pot --no-location .
    pybabel init|update -i console.pot -d templates/locale -D console -l be|ru
"""

from __future__ import annotations

import functools

import jinja2

from newsletter.config import LANGUAGES
from newsletter.i18n import make_environment

CONSOLE_DOMAIN = "console"
AUTONYMS = {"en": "English", "be": "Беларуская", "ru": "Русский"}


@functools.cache
def console_environment(lang: str) -> jinja2.Environment:
    """The environment of the console pages in a language, one per language and process."""
    return make_environment(lang if lang in LANGUAGES else "en", CONSOLE_DOMAIN)


def N_(message: str) -> str:
    """Mark a message for extraction; it is translated where it is shown."""
    return message


# Values the pages show through _() that no template spells out: roles, statuses, kinds.
SHOWN_VALUES = (
    N_("editor"),
    N_("approver"),
    N_("admin"),
    N_("draft"),
    N_("scheduled"),
    N_("running"),
    N_("paused"),
    N_("finished"),
    N_("cancelled"),
    N_("alert"),
    N_("digest"),
)
