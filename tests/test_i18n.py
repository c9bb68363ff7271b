"""Three languages: every string of every email (and web page) template is translated."""

from __future__ import annotations

import dataclasses
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
from babel.messages.catalog import Catalog
from babel.messages.extract import extract_from_file
from babel.messages.pofile import read_po
from lxml import html as lxml_html

from newsletter.config import Settings
from newsletter.i18n import LOCALE_DIR, TEMPLATES_DIR
from newsletter.render import (
    CampaignView,
    ItemView,
    render_variant,
)

REPO = TEMPLATES_DIR.parent
TRANSLATED = ("be", "ru")
JINJA_OPTIONS = {
    "extensions": "jinja2.ext.i18n",
    "newstyle_gettext": "true",
    "trim_blocks": "true",
    "lstrip_blocks": "true",
}
# The campaign emails (domain "newsletter", ours) and, when present, the confirmation and goodbye
# emails and the web pages (domain "web", the audience's).
OWN_TEMPLATES = sorted(
    p
    for p in [*TEMPLATES_DIR.glob("email/**/*.j2"), *TEMPLATES_DIR.glob("text/**/*.j2")]
    if not p.name.startswith(("confirm.", "goodbye.", "key_notice."))
)
WEB_TEMPLATES = sorted(
    [
        *TEMPLATES_DIR.glob("web/*.j2"),
        *TEMPLATES_DIR.glob("email/confirm.*.j2"),
        *TEMPLATES_DIR.glob("email/goodbye.*.j2"),
        *TEMPLATES_DIR.glob("text/confirm.*.j2"),
        *TEMPLATES_DIR.glob("text/goodbye.*.j2"),
        *TEMPLATES_DIR.glob("email/key_notice.*.j2"),
        *TEMPLATES_DIR.glob("text/key_notice.*.j2"),
    ]
)
# Python files whose messages are shown through the web domain: the notices' subjects and key
# problems, the Atom feed's title and a refused key's reason on the preferences page (web.py), the
# KeyProblem and ConfigError messages of openpgp.py (made with .of(N_(...)); the key refusals are
# shown on the preferences page in the reader's language), and the staff notices. The refusals of
# readers.py are not here: they are the CLI's and the CSV import's, and the web form answers 400.
WEB_PYTHON = [
    REPO / "newsletter" / name
    for name in ("notices.py", "key_notices.py", "web.py", "openpgp.py", "staff_notices.py")
]
DOMAINS = [
    pytest.param(
        "newsletter",
        [*OWN_TEMPLATES, REPO / "newsletter" / "render.py"],
        lang,
        id=f"newsletter-{lang}",
    )
    for lang in TRANSLATED
] + [
    pytest.param(
        "web",
        [
            *WEB_TEMPLATES,
            *WEB_PYTHON,
        ],
        lang,
        id=f"web-{lang}",
        marks=pytest.mark.skipif(not WEB_TEMPLATES, reason="no web templates yet"),
    )
    for lang in TRANSLATED
]
CYRILLIC_ITEM = ItemView(
    title="Алесь Бяляцкі наведаў Брусель",
    link="https://portal.example.org/be/2014/07/visit/",
    summary_html="<p>Сустрэча з прадстаўнікамі Еўрапейскага саюза.</p>",
    published_at=datetime(2014, 7, 2, 9, 30, tzinfo=UTC),
    categories=("Вясна",),
    lang="be",
)
# Every name the reader sees that does not come from a template is Cyrillic here, so any Latin
# word left in a rendered be/ru email is a template string that escaped translation.
CYRILLIC_SETTINGS = dataclasses.replace(
    Settings(),
    brand=dataclasses.replace(
        Settings().brand,
        name="Навіны",
        postal_address="Скрыня 000, Горад",
        mirror_url="https://mirror.example.net/",
        footer_lines=("Вясна",),
    ),
)
VIEWS = {
    "digest": CampaignView(kind="digest", list_name="Штотыднёвік", items=(CYRILLIC_ITEM,)),
    "alert": CampaignView(
        kind="alert",
        list_name="Акцыі",
        items=(),
        title="Напішыце ліст",
        body_html="<p>Кожны ліст важны.</p>" * 40,
        url="https://portal.example.org/act",
    ),
}
LATIN_WORD = re.compile(r"[A-Za-z]{2,}")
URL = re.compile(r"(?:https?|mailto):\S+|%%\w+%%")


def extract(paths: list[Path]) -> set[str]:
    """Every msgid (the singular, for plurals) used in these templates and Python files."""
    found: set[str] = set()
    for path in paths:
        method = "python" if path.suffix == ".py" else "jinja2"
        options = JINJA_OPTIONS if method == "jinja2" else {}
        for _line, message, _comments, _context in extract_from_file(method, path, options=options):
            found.add(message if isinstance(message, str) else message[0])
    return found


def load_catalog(domain: str, lang: str) -> Catalog:
    """A .po catalogue as Babel reads it."""
    with (LOCALE_DIR / lang / "LC_MESSAGES" / f"{domain}.po").open("rb") as po_file:
        return read_po(po_file, locale=lang)


@pytest.mark.parametrize(("domain", "paths", "lang"), DOMAINS)
def test_every_template_message_is_translated(domain: str, paths: list[Path], lang: str) -> None:
    """Each msgid of the domain's templates has a non-fuzzy translation, placeholders kept."""
    catalog = load_catalog(domain, lang)
    messages = extract(paths)
    assert messages, "no messages extracted: is the extractor configured?"
    for msgid in sorted(messages):
        entry = catalog.get(msgid)
        assert entry is not None, f"{domain}/{lang}: no entry for {msgid!r}"
        strings = entry.string if isinstance(entry.string, tuple) else (entry.string,)
        assert all(strings) and not entry.fuzzy, f"{domain}/{lang}: {msgid!r} is not translated"
        placeholders = set(re.findall(r"%\(\w+\)\w", msgid))
        for string in strings:
            assert set(re.findall(r"%\(\w+\)\w", string)) == placeholders, string


@pytest.mark.parametrize(("domain", "paths", "lang"), DOMAINS)
def test_catalogue_has_no_stale_messages(domain: str, paths: list[Path], lang: str) -> None:
    """Each catalogue holds only messages its domain's templates and Python files still use."""
    used = extract(paths)
    stale = {
        str(m.id if isinstance(m.id, str) else m.id[0]) for m in load_catalog(domain, lang) if m.id
    } - used
    assert not stale


def visible_words(page: str) -> list[str]:
    """Latin words a reader sees in an HTML page, URLs aside."""
    body = lxml_html.document_fromstring(page).body
    for style in body.iter("style"):
        style.drop_tree()
    return LATIN_WORD.findall(URL.sub(" ", body.text_content()))


@pytest.mark.parametrize(
    ("kind", "lang"),
    [pytest.param(k, lang, id=f"{k}-{lang}") for k in VIEWS for lang in TRANSLATED],
)
def test_rendered_email_has_no_untranslated_text(kind: str, lang: str) -> None:
    """A be/ru email with Cyrillic content shows no Latin word: nothing is left in English."""
    variant = render_variant(VIEWS[kind], lang=lang, settings=CYRILLIC_SETTINGS)
    assert visible_words(variant.html) == []
    assert LATIN_WORD.findall(URL.sub(" ", variant.text)) == []
    assert LATIN_WORD.findall(variant.subject) == []


@pytest.mark.parametrize(
    ("lang", "expected"),
    [
        pytest.param("en", "in Belarusian", id="en"),
        pytest.param("ru", "на белорусском языке", id="ru"),
    ],
)
def test_item_from_another_language_is_marked(lang: str, expected: str) -> None:
    """An item shown as published in another language says so and carries its own lang."""
    variant = render_variant(VIEWS["digest"], lang=lang, settings=CYRILLIC_SETTINGS)
    tree = lxml_html.document_fromstring(variant.html)
    assert tree.get("lang") == lang
    assert tree.xpath("//h3/@lang") == ["be"]
    assert expected in tree.text_content()
    assert expected in variant.text


def test_item_in_the_readers_language_is_not_marked() -> None:
    """A Belarusian item in a Belarusian email carries no language note."""
    variant = render_variant(VIEWS["digest"], lang="be", settings=CYRILLIC_SETTINGS)
    assert "на беларускай мове" not in variant.text
    assert not lxml_html.document_fromstring(variant.html).xpath("//h3/@lang")
