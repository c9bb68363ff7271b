"""The staff console's interface language: the "console" gettext domain, en/be/ru.

Set up as i18n.web_environment is: templates/ with autoescape, StrictUndefined, and the
language's catalogue compiled in memory from templates/locale/LANG/LC_MESSAGES/console.po (none
for English, the source language; a language without a .po yet shows English). Extraction, from
the repository root:

    pybabel extract -F templates/console/babel.cfg -k N_ -o console.pot --no-location .
    pybabel init|update -i console.pot -d templates/locale -D console -l be|ru

The step modules' refusals are extracted too (babel.cfg lists them): an error made with
NewsletterError.of(N_(...), **params) is shown by translate_error in the staffer's language,
while str(error) stays the English line the CLI prints.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jinja2
from markupsafe import Markup, escape

from newsletter.config import LANGUAGES
from newsletter.errors import NewsletterError
from newsletter.i18n import N_ as N_
from newsletter.i18n import gettext_for, make_environment

CONSOLE_DOMAIN = "console"
AUTONYMS = {"en": "English", "be": "Беларуская", "ru": "Русский"}


@functools.cache
def console_environment(lang: str) -> jinja2.Environment:
    """The environment of the console pages in a language, one per language and process."""
    return make_environment(lang if lang in LANGUAGES else "en", CONSOLE_DOMAIN)


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
# The params of an error whose values are among SHOWN_VALUES: translated with the message.
TRANSLATED_PARAMS = frozenset({"status", "role", "kind"})


def console_gettext(lang: str) -> Callable[[str], str]:
    """The console catalogue's gettext for a language (English, or one without a .po: none)."""
    return gettext_for(lang if lang in LANGUAGES else "en", CONSOLE_DOMAIN)


def translate_error(error: BaseException, lang: str) -> str:
    """An error's one line in the console language; str(error) if it has no translatable form.

    A param that is itself a translatable error (approvals' refusal reasons) is translated too,
    and so is a status, role or kind that SHOWN_VALUES lists.
    """
    if not isinstance(error, NewsletterError) or error.template is None:
        return str(error)
    gettext = console_gettext(lang)
    params = {name: _param(name, value, lang) for name, value in error.params.items()}
    try:
        return gettext(error.template) % params
    except (KeyError, TypeError, ValueError):  # a translation that lost a placeholder
        return str(error)


def _param(name: str, value: object, lang: str) -> object:
    if isinstance(value, NewsletterError):
        return translate_error(value, lang)
    if name in TRANSLATED_PARAMS and str(value) in SHOWN_VALUES:
        return console_gettext(lang)(str(value))
    return value


def refusal_line(refusal: BaseException | str, lang: str) -> Markup:
    """What a page shows for a refusal (an error, or an N_ message) in the console language.

    Escaped here: the pages show it through _(), which marks its result safe, and an error's
    line may quote what was typed.
    """
    if isinstance(refusal, str):
        return escape(console_gettext(lang)(refusal))
    return escape(translate_error(refusal, lang))
