"""The one gettext and Jinja2 set-up, shared by render, notices and the web pages.

Two gettext domains: "newsletter" (the campaign emails, ours) and "web" (the web pages and the
confirmation and goodbye notices). A language's catalogue is compiled from its .po in memory at
first use and kept for the process; English is the source language, and a language outside
LANGUAGES gets no catalogue (so a language from a URL never names a file). Every environment
reads templates/, autoescapes HTML and MJML templates but not .txt.j2 ones, and refuses undefined
variables.
"""

from __future__ import annotations

import functools
import gettext
import io
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jinja2
from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po

from newsletter.config import LANGUAGES

TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "templates"
LOCALE_DIR = TEMPLATES_DIR / "locale"
CAMPAIGN_DOMAIN = "newsletter"
WEB_DOMAIN = "web"


@functools.cache
def translations(lang: str, domain: str) -> gettext.NullTranslations:
    """A language's catalogue in a domain, compiled from its .po in memory (English: none)."""
    po_path = LOCALE_DIR / lang / "LC_MESSAGES" / f"{domain}.po"
    if lang == "en" or lang not in LANGUAGES or not po_path.is_file():
        return gettext.NullTranslations()
    with po_path.open("rb") as po_file:
        catalog = read_po(po_file, locale=lang, domain=domain)
    buffer = io.BytesIO()
    write_mo(buffer, catalog)
    buffer.seek(0)
    return gettext.GNUTranslations(buffer)


def gettext_for(lang: str, domain: str = WEB_DOMAIN) -> Callable[[str], str]:
    """The gettext function of a language, for text made in Python."""
    return translations(lang, domain).gettext


def make_environment(
    lang: str, domain: str, filters: Mapping[str, Callable[..., Any]] | None = None
) -> jinja2.Environment:
    """A new Jinja2 environment over templates/ with a language's catalogue and extra filters."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        autoescape=is_html_template,
        undefined=jinja2.StrictUndefined,
        extensions=["jinja2.ext.i18n"],
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.install_gettext_translations(translations(lang, domain), newstyle=True)  # type: ignore[attr-defined]
    env.filters.update(filters or {})
    return env


@functools.cache
def web_environment(lang: str) -> jinja2.Environment:
    """The environment of the web pages and notices ("web" domain), one per language and process."""
    return make_environment(lang, WEB_DOMAIN)


def is_html_template(name: str | None) -> bool:
    """Whether a template is autoescaped: every one but the plain-text (.txt.j2) ones."""
    return name is None or not name.endswith(".txt.j2")


def N_(message: str) -> str:
    """Mark a message for extraction (pybabel's N_ keyword); it is translated where it is shown."""
    return message
