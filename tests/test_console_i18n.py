"""The staff console in be and ru: every console message is translated, placeholders kept."""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from typing import Any

import pytest
from babel.messages.catalog import Catalog
from babel.messages.extract import extract_from_dir
from babel.messages.frontend import parse_mapping_cfg
from babel.messages.pofile import read_po
from lxml import html as lxml_html

from newsletter.config import Settings
from newsletter.console_i18n import AUTONYMS, CONSOLE_DOMAIN, console_environment
from newsletter.console_signin import WRONG
from newsletter.i18n import LOCALE_DIR, TEMPLATES_DIR

REPO = TEMPLATES_DIR.parent
TRANSLATED = ("be", "ru")
# Each alternative stops at its first closing character, so matching is linear in the text.
PLACEHOLDER = re.compile(r"%\(\w+\)[a-z]|%[a-z%]|\{\w*\}|</?[A-Za-z][^<>]*>")
LATIN_WORD = re.compile(r"[A-Za-z]{2,}")
# "Sign in" (the title, the heading and the button) in each language.
SIGN_IN = {"be": "Увайсці", "ru": "Войти"}


def extract_console() -> set[str]:
    """Every msgid of the console domain, extracted as templates/console/babel.cfg says."""
    with (TEMPLATES_DIR / "console" / "babel.cfg").open() as cfg:
        method_map, options_map = parse_mapping_cfg(cfg)  # type: ignore[no-untyped-call]
    found: set[str] = set()
    for _file, _line, message, _comments, _context in extract_from_dir(
        REPO, method_map, options_map
    ):
        found.add(message if isinstance(message, str) else message[0])
    return found


def load_catalog(lang: str) -> Catalog:
    """A language's console .po as Babel reads it."""
    with (LOCALE_DIR / lang / "LC_MESSAGES" / f"{CONSOLE_DOMAIN}.po").open("rb") as po_file:
        return read_po(po_file, locale=lang, domain=CONSOLE_DOMAIN)


def placeholders(text: str) -> Counter[str]:
    """The %-formats, {fields} and HTML tags of a message, which a translation must keep."""
    return Counter(PLACEHOLDER.findall(text))


@pytest.fixture(scope="module")
def console_messages() -> set[str]:
    """The console's msgids, extracted once for the module."""
    messages = extract_console()
    assert len(messages) > 100, "too few messages extracted: is babel.cfg read?"
    return messages


def test_placeholder_check_sees_a_lost_or_renamed_placeholder() -> None:
    """The placeholder comparison is exact: a lost, renamed or extra one differs."""
    msgid = "Up to %(n)s of {count} <b>addresses</b>"
    assert placeholders(msgid) == placeholders("Да {count} з %(n)s <b>адрасоў</b>")
    assert placeholders(msgid) != placeholders("Да {count} <b>адрасоў</b>")
    assert placeholders(msgid) != placeholders("Да %(num)s з {count} <b>адрасоў</b>")
    assert placeholders(msgid) != placeholders("Да %(n)s з {count} адрасоў")


@pytest.mark.parametrize("lang", TRANSLATED)
def test_every_console_message_is_translated(lang: str, console_messages: set[str]) -> None:
    """Each extracted msgid has a non-empty, non-fuzzy translation with the same placeholders."""
    catalog = load_catalog(lang)
    untranslated = sorted(
        msgid
        for msgid in console_messages
        if (entry := catalog.get(msgid)) is None or not entry.string or entry.fuzzy
    )
    assert untranslated == []
    mismatched = sorted(
        msgid
        for msgid in console_messages
        if placeholders(msgid) != placeholders(str(catalog[msgid].string))
    )
    assert mismatched == []


@pytest.mark.parametrize("lang", TRANSLATED)
def test_console_catalogue_has_no_stale_messages(lang: str, console_messages: set[str]) -> None:
    """The console catalogue holds only messages the console still uses."""
    held = {str(m.id) for m in load_catalog(lang) if m.id}
    assert held - console_messages == set()


def render_console(lang: str, name: str, **context: Any) -> str:
    """A console page as the console renders it for a visitor not signed in, training on."""
    brand = dataclasses.replace(Settings().brand, name="Вясна")
    page = console_environment(lang).get_template(f"console/{name}.html.j2")
    return page.render(
        lang=lang,
        languages=AUTONYMS,
        brand=brand,
        info=None,
        me=None,
        csrf="token",
        training=True,
        static={"console.css": "1", "console.js": "1"},
        path="/signin",
        when=str,
        **context,
    )


def visible_words(page: str) -> list[str]:
    """Latin words a reader sees on a page, the language switch (with "English") aside."""
    body = lxml_html.document_fromstring(page).body
    for nav in body.xpath("//nav[contains(@class, 'langs')]"):
        nav.drop_tree()
    return LATIN_WORD.findall(body.text_content())


PAGES: dict[str, tuple[str, dict[str, Any]]] = {
    "password": ("signin", {"step": "password", "email": "", "error": WRONG}),
    "code": ("signin", {"step": "code", "pending": "p", "error": ""}),
    "throttled": (
        "signin",
        {"step": "password", "email": "", "error": "throttled", "retry_after": 90},
    ),
    "refused": ("error", {"code": 403, "message": ""}),
}


@pytest.mark.parametrize(
    ("lang", "page"),
    [pytest.param(lang, page, id=f"{page}-{lang}") for lang in TRANSLATED for page in PAGES],
)
def test_console_pages_render_in_the_language(lang: str, page: str) -> None:
    """A be/ru sign-in or refusal page shows its language's words and no English one."""
    name, context = PAGES[page]
    text = render_console(lang, name, **context)
    assert f'<html lang="{lang}">' in text
    assert visible_words(text) == []
    if name == "signin":
        assert SIGN_IN[lang] in text and "Sign in" not in text


def test_console_page_in_english_is_the_source_text() -> None:
    """English, the source language, shows the msgids themselves (the check above can fail)."""
    name, context = PAGES["password"]
    text = render_console("en", name, **context)
    assert "Sign in" in text and "Training mode" in text
    assert "Email" in visible_words(text)
