"""The staff console's interface language: the "console" gettext domain, en/be/ru.

Set up as i18n.web_environment is: templates/ with autoescape, StrictUndefined, and the
language's catalogue compiled in memory from templates/locale/LANG/LC_MESSAGES/console.po (none
yet for English, the source language; a language without a .po falls back to English).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jinja2

from newsletter.config import LANGUAGES
from newsletter.i18n import gettext_for, make_environment

CONSOLE_DOMAIN = "console"
AUTONYMS = {"en": "English", "be": "Беларуская", "ru": "Русский"}


@functools.cache
def console_environment(lang: str) -> jinja2.Environment:
    """The environment of the console pages in a language, one per language and process."""
    return make_environment(lang if lang in LANGUAGES else "en", CONSOLE_DOMAIN)


def console_gettext(lang: str) -> Callable[[str], str]:
    """The gettext function of the console domain, for messages made in Python."""
    return gettext_for(lang if lang in LANGUAGES else "en", CONSOLE_DOMAIN)


def N_(message: str) -> str:
    """Mark a message for extraction; it is translated where it is shown."""
    return message
